"""``Machine.check_invariants``: recount everything and compare with the counters.

One check per structure of mm/ksm.c, each naming the invariant it holds the model to;
:func:`check_invariants` runs them in a fixed order (the stable trees first, the frames
last), and each later check uses what the earlier ones collected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..constants import PAGE_SIZE, SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG, ZERO_PFN
from ..thp import HPAGE_PMD_SIZE
from .ksm import Ksm
from .ksm_structs import HEAD_DUP, HEAD_MIGRATE, HEAD_TREE, MmSlot, RmapItem, StableNode
from .mm import PAGE_MASK, SPLIT_ZERO_PFN, Frame, Mm, PhysMem
from .rbtree import RbRoot, rb_check


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def _live_frame(mem: PhysMem, node: StableNode) -> Frame | None:
    """The node's page if the node is not stale (ksm_get_folio's keyhole test)."""
    frame = mem.frames[node.kpfn]
    if frame.allocated and frame.ksm and frame.stable_node is node:
        return frame
    return None


# --------------------------------------------------------------------------------
# the stable trees: root_stable_tree[], stable node chains, migrate_nodes


def _collect(nid: int, node: StableNode, what: str, mem: PhysMem, nodes: list[StableNode],
             contents: list[bytearray]) -> None:
    """A regular node or dup met in tree ``nid``: its nid is the tree's. Adds it to
    ``nodes``, and its page's content to ``contents`` if the node is live."""
    if node.nid != nid:
        _fail(f"stable tree {nid}: a {what} has nid {node.nid}")
    frame = _live_frame(mem, node)
    if frame is not None:
        contents.append(frame.data)
    nodes.append(node)


def check_stable_chain(nid: int, chain: StableNode, mem: PhysMem,
                       nodes: list[StableNode]) -> list[bytearray]:
    """A stable_node_chain (rmap_hlist_len == STABLE_NODE_CHAIN) holds only its own
    dups: each is_stable_node_dup(), points back to the chain, is no chain itself and
    sits in the chain's tree (nid). Collects the dups into ``nodes``; returns the
    contents of the live ones."""
    contents: list[bytearray] = []
    for dup in chain.dups:
        if dup.head != HEAD_DUP or dup.chain is not chain or dup.is_chain():
            _fail(f"stable tree {nid}: a chain holds a node that is not its dup")
        _collect(nid, dup, "dup", mem, nodes, contents)
    return contents


def check_stable_tree(nid: int, root: RbRoot, mem: PhysMem, nodes: list[StableNode]) -> None:
    """root_stable_tree[nid] is a red-black tree whose in-order walk is strictly
    increasing in memcmp_pages() order of the live KSM pages (what stable_tree_search
    descends by), every node in it marked as a tree node with its tree's nid, and the
    dups of a chain all holding the same content. Collects every regular node and dup
    into ``nodes``."""
    rb_check(root)
    prev: bytearray | None = None
    for tree_node in root:
        assert isinstance(tree_node, StableNode)
        node = tree_node
        if node.head != HEAD_TREE:
            _fail(f"stable tree {nid}: a node in the tree is not marked as a tree node")
        contents: list[bytearray] = []
        if node.is_chain():
            contents = check_stable_chain(nid, node, mem, nodes)
        else:
            _collect(nid, node, "node", mem, nodes, contents)
        if any(c != contents[0] for c in contents[1:]):
            _fail(f"stable tree {nid}: the dups of a chain differ in content")
        if contents:
            if prev is not None and not prev < contents[0]:
                _fail(f"stable tree {nid}: in-order walk is not strictly increasing")
            prev = contents[0]


def check_migrate_nodes(ksm: Ksm, nodes: list[StableNode]) -> None:
    """migrate_nodes holds only regular nodes whose head is &migrate_nodes (taken out
    of their tree when their page moved to another node, waiting to be re-placed).
    Collects them into ``nodes``."""
    for node in ksm.migrate_nodes:
        if node.head != HEAD_MIGRATE or node.is_chain():
            _fail("migrate_nodes holds a node not marked as on it")
        nodes.append(node)


def check_stable_node_placement(ksm: Ksm, mem: PhysMem, nodes: list[StableNode]) -> None:
    """Every stable node is in exactly one place (one tree, one chain or
    migrate_nodes); with merge_across_nodes=0, a KSM page sits in the tree of its own
    node (get_kpfn_nid(kpfn) == NUMA(nid)) unless it migrated since ksmd last met it
    (cmp_and_merge_page moves such a node to migrate_nodes when it does)."""
    if len({id(n) for n in nodes}) != len(nodes):
        _fail("a stable node is in two places")
    if not ksm.ksm_merge_across_nodes:
        for node in nodes:
            frame = _live_frame(mem, node)
            # only a migration ksmd has not met yet leaves a page in another node's tree
            if (node.head != HEAD_MIGRATE and frame is not None and not node.migrated
                    and frame.nid != node.nid):
                _fail(f"KSM page {node.kpfn} on node {frame.nid} is in tree {node.nid}")


def check_stable_trees(ksm: Ksm, mem: PhysMem) -> list[StableNode]:
    """Shape, placement and memcmp order of the stable trees; return every node (the
    regular nodes and dups of every tree, then migrate_nodes)."""
    nodes: list[StableNode] = []
    for nid, root in enumerate(ksm.root_stable_tree):
        check_stable_tree(nid, root, mem, nodes)
    check_migrate_nodes(ksm, nodes)
    check_stable_node_placement(ksm, mem, nodes)
    return nodes


# --------------------------------------------------------------------------------
# stable nodes' rmap_items and the counters of the stable side


def check_stable_node_hlist(node: StableNode) -> list[RmapItem]:
    """A stable node's hlist of rmap_items: rmap_hlist_len counts it, each item has
    STABLE_FLAG and head == this node (stable_tree_append), and the prev links hold.
    Returns the items."""
    items = node.hlist_items()
    if node.rmap_hlist_len != len(items):
        _fail(f"stable node: rmap_hlist_len {node.rmap_hlist_len} != {len(items)} items")
    prev_item = None
    for item in items:
        if item.head is not node or not item.address & STABLE_FLAG:
            _fail("an rmap_item on a stable node's hlist is not marked stable on it")
        if item.hlist_prev is not prev_item:
            _fail("stable node hlist: broken prev link")
        prev_item = item
    return items


def check_stable_counters(ksm: Ksm, nodes: list[StableNode]) -> None:
    """ksm_pages_shared counts the stable nodes with an rmap_item (KSM pages in use),
    ksm_pages_sharing the mappings beyond the first of each, ksm_stable_node_chains
    the chains in the trees and ksm_stable_node_dups their dups (also the dups on
    migrate_nodes: none, as check_migrate_nodes holds)."""
    shared = sharing = 0
    chains = sum(1 for root in ksm.root_stable_tree for n in root
                 if isinstance(n, StableNode) and n.is_chain())
    dups = sum(1 for n in nodes if n.head == HEAD_DUP)
    for node in nodes:
        items = check_stable_node_hlist(node)
        if items:
            shared += 1
            sharing += len(items) - 1
    if shared != ksm.ksm_pages_shared:
        _fail(f"pages_shared {ksm.ksm_pages_shared} != recount {shared}")
    if sharing != ksm.ksm_pages_sharing:
        _fail(f"pages_sharing {ksm.ksm_pages_sharing} != recount {sharing}")
    if chains != ksm.ksm_stable_node_chains:
        _fail(f"stable_node_chains {ksm.ksm_stable_node_chains} != recount {chains}")
    if dups != ksm.ksm_stable_node_dups:
        _fail(f"stable_node_dups {ksm.ksm_stable_node_dups} != recount {dups}")


# --------------------------------------------------------------------------------
# mm_slots and their rmap_lists


def check_mm_slots(ksm: Ksm) -> list[MmSlot]:
    """ksm_mm_head's list of mm_slots is circular with consistent prev links, every
    slot's mm points back to it (mm_slots_hash) and has MMF_VM_MERGEABLE, and the scan
    cursor ksm_scan.mm_slot is the head or on the list. Returns the slots in order."""
    head = ksm.ksm_mm_head
    slots: list[MmSlot] = []
    slot = head.next
    prev = head
    while slot is not head:
        if slot.prev is not prev:
            _fail("mm_slot list: broken prev link")
        mm = slot.mm
        if mm is None or mm.ksm_slot is not slot or not mm.mmf_vm_mergeable:
            _fail("mm_slot list: slot and mm disagree")
        slots.append(slot)
        prev, slot = slot, slot.next
        if len(slots) > 1_000_000:
            _fail("mm_slot list: not circular")
    if head.prev is not prev:
        _fail("mm_slot list: broken prev link at the head")
    cursor = ksm.ksm_scan.mm_slot
    if cursor is not head and cursor not in slots:
        _fail("ksm_scan.mm_slot is not on the list")
    return slots


@dataclass
class RmapRecount:
    """What the rmap_lists hold, for the checks after them: rmap_items and stable
    ones per mm (by id), and the unstable items that must be in this round's trees."""

    between_rounds: bool
    items: dict[int, int] = field(default_factory=dict)
    merging: dict[int, int] = field(default_factory=dict)
    fresh_unstable: set[int] = field(default_factory=set)


def check_rmap_item(item: RmapItem, ksm: Ksm, node_ids: set[int], recount: RmapRecount) -> bool:
    """One rmap_item's flags: never both STABLE_FLAG and UNSTABLE_FLAG; a stable one
    hangs on a node of the stable trees; an unstable one was put in the unstable tree
    this scan or the last (its seqnr: remove_rmap_item_from_tree's BUG_ON(age > 1)); one
    with no flag keeps no seqnr (remove_rmap_item_from_tree clears it). Counts it in
    ``recount``; returns whether it is unstable (pages_unshared)."""
    flags = item.address & (STABLE_FLAG | UNSTABLE_FLAG)
    if flags == STABLE_FLAG | UNSTABLE_FLAG:
        _fail("an rmap_item is both stable and unstable")
    if flags == STABLE_FLAG:
        if item.head is None or id(item.head) not in node_ids:
            _fail("a stable rmap_item's node is not in the stable tree")
        recount.merging[id(item.mm)] = recount.merging.get(id(item.mm), 0) + 1
    elif flags == UNSTABLE_FLAG:
        age = (ksm.ksm_scan.seqnr - item.address) & SEQNR_MASK
        if age > 1:
            _fail("an unstable rmap_item is older than one scan")
        if age == 0 and not recount.between_rounds:
            recount.fresh_unstable.add(id(item))
        return True
    elif item.address & SEQNR_MASK:
        _fail("an rmap_item with no flag keeps a seqnr")
    return False


def check_rmap_lists(ksm: Ksm, slots: list[MmSlot], node_ids: set[int]) -> RmapRecount:
    """Each mm_slot's rmap_list holds only its mm's rmap_items, sorted by address with
    no two for one page (get_next_rmap_item inserts in order), and ksm_rmap_items and
    ksm_pages_unshared count the items and the unstable ones."""
    recount = RmapRecount(between_rounds=ksm.ksm_scan.mm_slot is ksm.ksm_mm_head)
    total_items = unshared = 0
    for slot in slots:
        mm = slot.mm
        assert mm is not None
        cur: RmapItem | None = slot.rmap_list
        last = -1
        while cur is not None:
            if cur.mm is not mm:
                _fail("an rmap_item is on another mm's rmap_list")
            addr = cur.address & PAGE_MASK
            if addr <= last:
                _fail("an rmap_list is not sorted by address")
            last = addr
            total_items += 1
            recount.items[id(mm)] = recount.items.get(id(mm), 0) + 1
            unshared += check_rmap_item(cur, ksm, node_ids, recount)
            cur = cur.rmap_list
    if total_items != ksm.ksm_rmap_items:
        _fail(f"ksm_rmap_items {ksm.ksm_rmap_items} != recount {total_items}")
    if unshared != ksm.ksm_pages_unshared:
        _fail(f"pages_unshared {ksm.ksm_pages_unshared} != recount {unshared}")
    return recount


# --------------------------------------------------------------------------------
# the unstable trees


def check_unstable_trees(ksm: Ksm, recount: RmapRecount) -> None:
    """During a round, root_unstable_tree[nid] is a red-black tree holding exactly the
    rmap_items made unstable this round (unstable_tree_search_insert), each with its
    tree's nid. Between rounds the trees are dead (scan_get_next_rmap_item resets them
    when the next round starts) and are not checked."""
    in_trees: set[int] = set()
    for nid, root in enumerate(ksm.root_unstable_tree):
        if recount.between_rounds:
            # Dead until the next round resets it: run=2 may have freed its items.
            continue
        rb_check(root)
        for tree_item in root:
            assert isinstance(tree_item, RmapItem)
            if tree_item.nid != nid or id(tree_item) not in recount.fresh_unstable:
                _fail(f"unstable tree {nid} holds an item not inserted there this round")
            in_trees.add(id(tree_item))
    if not recount.between_rounds and in_trees != recount.fresh_unstable:
        _fail("an unstable rmap_item of this round is missing from its tree")


# --------------------------------------------------------------------------------
# each mm: its KSM counters, page table and huge zero pages


def check_mm_counters(mm: Mm, recount: RmapRecount) -> None:
    """mm->ksm_rmap_items and mm->ksm_merging_pages (/proc/PID/ksm_stat) count the
    mm's rmap_items and the stable ones."""
    if recount.items.get(id(mm), 0) != mm.ksm_rmap_items:
        _fail(f"mm ksm_rmap_items {mm.ksm_rmap_items} != {recount.items.get(id(mm), 0)}")
    if recount.merging.get(id(mm), 0) != mm.ksm_merging_pages:
        _fail(f"mm ksm_merging_pages {mm.ksm_merging_pages} != "
              f"{recount.merging.get(id(mm), 0)}")


def check_page_table(mm: Mm, mem: PhysMem, mapcount: dict[int, int]) -> tuple[int, int]:
    """Every PTE lies in a VMA and maps an allocated frame, the KSM zero page
    (is_ksm_zero_pte) or the zero page of a THP split; a subpage of a large folio is
    mapped where the folio says. mm->ksm_zero_pages and thp_split_zero_pages count
    those zero PTEs. Adds each frame's PTEs to ``mapcount``; returns the two counts."""
    if sorted(mm.pte) != mm.pte_addrs:
        _fail("a page table's address index is out of date")
    zero = split = 0
    for addr, pfn in mm.pte.items():
        if mm.vma_lookup(addr) is None:
            _fail(f"a PTE at {addr:#x} lies outside every VMA")
        if pfn == ZERO_PFN:
            zero += 1
            continue
        if pfn == SPLIT_ZERO_PFN:
            split += 1
            continue
        folio = mem.frames[pfn].folio
        if folio is not None and (mm, addr - mem.frames[pfn].subpage * PAGE_SIZE) \
                not in [(m, a) for m, a in folio.maps if m is mm]:
            _fail(f"a huge page mapped at {addr:#x} does not list that mapping")
        if not mem.frames[pfn].allocated:
            _fail(f"a PTE maps freed frame {pfn}")
        mapcount[pfn] = mapcount.get(pfn, 0) + 1
    if zero != mm.ksm_zero_pages:
        _fail(f"mm ksm_zero_pages {mm.ksm_zero_pages} != {zero} KSM zero PTEs")
    if split != mm.thp_split_zero_pages:
        _fail(f"mm thp_split_zero_pages {mm.thp_split_zero_pages} != {split} PTEs")
    return zero, split


def check_huge_zero_pmds(mm: Mm) -> None:
    """A PMD range maps the huge zero page or has a page table, never both, and no
    page is present in a range the huge zero page maps."""
    if mm.pmd_table & mm.pmd_hzero:
        _fail("a PMD range both has a page table and maps the huge zero page")
    for haddr in mm.pmd_hzero:
        if mm.present_in(haddr, haddr + HPAGE_PMD_SIZE):
            _fail(f"the huge zero page at {haddr:#x} shares its range with pages")


def check_mms(mms: list[Mm], mem: PhysMem, recount: RmapRecount) -> dict[int, int]:
    """Every mm's counters and page table, then the global ksm_zero_pages and
    thp_split_zero_pages as their sums. Returns the PTEs mapping each frame."""
    mapcount: dict[int, int] = {}
    zero_total = 0
    split_total = 0
    for mm in mms:
        check_mm_counters(mm, recount)
        zero, split = check_page_table(mm, mem, mapcount)
        zero_total += zero
        split_total += split
        check_huge_zero_pmds(mm)
    if zero_total != mem.ksm_zero_pages:
        _fail(f"ksm_zero_pages {mem.ksm_zero_pages} != recount {zero_total}")
    if split_total != mem.thp_split_zero_pages:
        _fail(f"thp_split_zero_pages {mem.thp_split_zero_pages} != recount {split_total}")
    return mapcount


# --------------------------------------------------------------------------------
# page frames and folios


def check_folio_subpage(frame: Frame) -> None:
    """A subpage of a large folio: subpage k is the folio's frames[k], KSM never marks
    it (it merges small folios only, after split_huge_page), and the folio lives only
    while a subpage is mapped."""
    folio = frame.folio
    assert folio is not None
    if folio.frames[frame.subpage] is not frame or frame.ksm:
        _fail(f"frame {frame.pfn}: inconsistent huge page subpage")
    if not any(f.mapcount for f in folio.frames):
        _fail(f"frame {frame.pfn}: a huge page with no mapped subpage lives on")


def check_frame_stable_node(frame: Frame, node_ids: set[int]) -> None:
    """folio_stable_node(): a frame with a stable node is a KSM page, and that node
    is in the stable trees with kpfn naming this frame."""
    snode = frame.stable_node
    if snode is None:
        return
    if not frame.ksm:
        _fail(f"frame {frame.pfn} has a stable node but is not KSM")
    if snode.kpfn != frame.pfn or id(snode) not in node_ids:
        _fail(f"frame {frame.pfn}: its stable node does not point back to it")


def check_frames(mem: PhysMem, mapcount: dict[int, int], node_ids: set[int]) -> None:
    """Every page frame: a freed one keeps no state; an allocated one's mapcount is
    the number of PTEs mapping it, its folio and stable node agree with it."""
    for frame in mem.frames[1:]:
        if not frame.allocated:
            if frame.ksm or frame.stable_node is not None or frame.mapcount or frame.folio:
                _fail(f"freed frame {frame.pfn} keeps state")
            continue
        if frame.folio is not None:
            check_folio_subpage(frame)
        if frame.mapcount != mapcount.get(frame.pfn, 0):
            _fail(f"frame {frame.pfn}: mapcount {frame.mapcount} != "
                  f"{mapcount.get(frame.pfn, 0)} PTEs")
        check_frame_stable_node(frame, node_ids)


# --------------------------------------------------------------------------------


def check_invariants(ksm: Ksm, mem: PhysMem, mms: list[Mm]) -> None:
    """Every check above, in order; the first broken invariant raises AssertionError
    naming it."""
    nodes = check_stable_trees(ksm, mem)
    node_ids = {id(n) for n in nodes}
    check_stable_counters(ksm, nodes)
    slots = check_mm_slots(ksm)
    recount = check_rmap_lists(ksm, slots, node_ids)
    check_unstable_trees(ksm, recount)
    mapcount = check_mms(mms, mem, recount)
    check_frames(mem, mapcount, node_ids)
