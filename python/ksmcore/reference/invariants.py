"""``Machine.check_invariants``: recount everything and compare with the counters."""

from __future__ import annotations

from ..constants import PAGE_SIZE, SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG, ZERO_PFN
from ..thp import HPAGE_PMD_SIZE
from .ksm import Ksm
from .ksm_structs import HEAD_DUP, HEAD_MIGRATE, HEAD_TREE, MmSlot, RmapItem, StableNode
from .mm import PAGE_MASK, SPLIT_ZERO_PFN, Frame, Mm, PhysMem
from .rbtree import rb_check


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def _live_frame(mem: PhysMem, node: StableNode) -> Frame | None:
    """The node's page if the node is not stale (ksm_get_folio's keyhole test)."""
    frame = mem.frames[node.kpfn]
    if frame.allocated and frame.ksm and frame.stable_node is node:
        return frame
    return None


def _check_stable_trees(ksm: Ksm, mem: PhysMem) -> list[StableNode]:
    """Shape, placement and memcmp order of the stable trees; return every node."""
    nodes: list[StableNode] = []
    for nid, root in enumerate(ksm.root_stable_tree):
        rb_check(root)
        prev: bytearray | None = None
        for tree_node in root:
            assert isinstance(tree_node, StableNode)
            node = tree_node
            if node.head != HEAD_TREE:
                _fail(f"stable tree {nid}: a node in the tree is not marked as a tree node")
            contents: list[bytearray] = []
            if node.is_chain():
                for dup in node.dups:
                    if dup.head != HEAD_DUP or dup.chain is not node or dup.is_chain():
                        _fail(f"stable tree {nid}: a chain holds a node that is not its dup")
                    if dup.nid != nid:
                        _fail(f"stable tree {nid}: a dup has nid {dup.nid}")
                    frame = _live_frame(mem, dup)
                    if frame is not None:
                        contents.append(frame.data)
                    nodes.append(dup)
            else:
                if node.nid != nid:
                    _fail(f"stable tree {nid}: a node has nid {node.nid}")
                frame = _live_frame(mem, node)
                if frame is not None:
                    contents.append(frame.data)
                nodes.append(node)
            if any(c != contents[0] for c in contents[1:]):
                _fail(f"stable tree {nid}: the dups of a chain differ in content")
            if contents:
                if prev is not None and not prev < contents[0]:
                    _fail(f"stable tree {nid}: in-order walk is not strictly increasing")
                prev = contents[0]
    for node in ksm.migrate_nodes:
        if node.head != HEAD_MIGRATE or node.is_chain():
            _fail("migrate_nodes holds a node not marked as on it")
        nodes.append(node)
    if len({id(n) for n in nodes}) != len(nodes):
        _fail("a stable node is in two places")
    if not ksm.ksm_merge_across_nodes:
        for node in nodes:
            frame = _live_frame(mem, node)
            # only a migration ksmd has not met yet leaves a page in another node's tree
            if (node.head != HEAD_MIGRATE and frame is not None and not node.migrated
                    and frame.nid != node.nid):
                _fail(f"KSM page {node.kpfn} on node {frame.nid} is in tree {node.nid}")
    return nodes


def _check_slots(ksm: Ksm) -> list[MmSlot]:
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


def check_invariants(ksm: Ksm, mem: PhysMem, mms: list[Mm]) -> None:
    nodes = _check_stable_trees(ksm, mem)
    node_ids = {id(n) for n in nodes}

    # ---- stable nodes and their rmap_items ----
    shared = sharing = 0
    chains = sum(1 for root in ksm.root_stable_tree for n in root
                 if isinstance(n, StableNode) and n.is_chain())
    dups = sum(1 for n in nodes if n.head == HEAD_DUP)
    for node in nodes:
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

    # ---- mm_slots and rmap_items ----
    slots = _check_slots(ksm)
    total_items = unshared = 0
    per_mm_items: dict[int, int] = {}
    per_mm_merging: dict[int, int] = {}
    seqnr = ksm.ksm_scan.seqnr
    between_rounds = ksm.ksm_scan.mm_slot is ksm.ksm_mm_head
    fresh_unstable: set[int] = set()  # items that must be in this round's unstable trees
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
            per_mm_items[id(mm)] = per_mm_items.get(id(mm), 0) + 1
            flags = cur.address & (STABLE_FLAG | UNSTABLE_FLAG)
            if flags == STABLE_FLAG | UNSTABLE_FLAG:
                _fail("an rmap_item is both stable and unstable")
            if flags == STABLE_FLAG:
                if cur.head is None or id(cur.head) not in node_ids:
                    _fail("a stable rmap_item's node is not in the stable tree")
                per_mm_merging[id(mm)] = per_mm_merging.get(id(mm), 0) + 1
            elif flags == UNSTABLE_FLAG:
                unshared += 1
                age = (seqnr - cur.address) & SEQNR_MASK
                if age > 1:
                    _fail("an unstable rmap_item is older than one scan")
                if age == 0 and not between_rounds:
                    fresh_unstable.add(id(cur))
            elif cur.address & SEQNR_MASK:
                _fail("an rmap_item with no flag keeps a seqnr")
            cur = cur.rmap_list
    if total_items != ksm.ksm_rmap_items:
        _fail(f"ksm_rmap_items {ksm.ksm_rmap_items} != recount {total_items}")
    if unshared != ksm.ksm_pages_unshared:
        _fail(f"pages_unshared {ksm.ksm_pages_unshared} != recount {unshared}")

    # ---- unstable trees ----
    in_trees: set[int] = set()
    for nid, root in enumerate(ksm.root_unstable_tree):
        if between_rounds:
            # Dead until the next round resets it: run=2 may have freed its items.
            continue
        rb_check(root)
        for tree_item in root:
            assert isinstance(tree_item, RmapItem)
            if tree_item.nid != nid or id(tree_item) not in fresh_unstable:
                _fail(f"unstable tree {nid} holds an item not inserted there this round")
            in_trees.add(id(tree_item))
    if not between_rounds and in_trees != fresh_unstable:
        _fail("an unstable rmap_item of this round is missing from its tree")

    # ---- per-mm counters, page tables and frames ----
    mapcount: dict[int, int] = {}
    zero_total = 0
    split_total = 0
    for mm in mms:
        if per_mm_items.get(id(mm), 0) != mm.ksm_rmap_items:
            _fail(f"mm ksm_rmap_items {mm.ksm_rmap_items} != {per_mm_items.get(id(mm), 0)}")
        if per_mm_merging.get(id(mm), 0) != mm.ksm_merging_pages:
            _fail(f"mm ksm_merging_pages {mm.ksm_merging_pages} != "
                  f"{per_mm_merging.get(id(mm), 0)}")
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
        zero_total += zero
        if split != mm.thp_split_zero_pages:
            _fail(f"mm thp_split_zero_pages {mm.thp_split_zero_pages} != {split} PTEs")
        split_total += split
        if mm.pmd_table & mm.pmd_hzero:
            _fail("a PMD range both has a page table and maps the huge zero page")
        for haddr in mm.pmd_hzero:
            if mm.present_in(haddr, haddr + HPAGE_PMD_SIZE):
                _fail(f"the huge zero page at {haddr:#x} shares its range with pages")
    if zero_total != mem.ksm_zero_pages:
        _fail(f"ksm_zero_pages {mem.ksm_zero_pages} != recount {zero_total}")
    if split_total != mem.thp_split_zero_pages:
        _fail(f"thp_split_zero_pages {mem.thp_split_zero_pages} != recount {split_total}")
    for frame in mem.frames[1:]:
        if not frame.allocated:
            if frame.ksm or frame.stable_node is not None or frame.mapcount or frame.folio:
                _fail(f"freed frame {frame.pfn} keeps state")
            continue
        folio = frame.folio
        if folio is not None:
            # a large folio: subpage k is frames[k]; a subpage KSM never marks; the
            # folio lives while a subpage is mapped
            if folio.frames[frame.subpage] is not frame or frame.ksm:
                _fail(f"frame {frame.pfn}: inconsistent huge page subpage")
            if not any(f.mapcount for f in folio.frames):
                _fail(f"frame {frame.pfn}: a huge page with no mapped subpage lives on")
        if frame.mapcount != mapcount.get(frame.pfn, 0):
            _fail(f"frame {frame.pfn}: mapcount {frame.mapcount} != "
                  f"{mapcount.get(frame.pfn, 0)} PTEs")
        snode = frame.stable_node
        if snode is not None:
            if not frame.ksm:
                _fail(f"frame {frame.pfn} has a stable node but is not KSM")
            if snode.kpfn != frame.pfn or id(snode) not in node_ids:
                _fail(f"frame {frame.pfn}: its stable node does not point back to it")
