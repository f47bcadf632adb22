"""check_invariants() for the engine: the trees, the counters and the page tables agree.

Run after every step of the differential tests. Counters are lazy in the kernel, so
the recounts count what the kernel's counters count (stale stable nodes included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._native import ffi, lib
from ..thp import HPAGE_PMD_NR
from .memory import folio_of

if TYPE_CHECKING:
    from .machine import Machine
    from .memory import Memory

NIL = lib.KSM_NIL


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def rb_parent(n) -> int:
    """The parent index of an rb node (packed with its colour, as the kernel does)."""
    return (n.parent_color >> 1) - 1


def rb_color(n) -> int:
    """0 red, 1 black."""
    return n.parent_color & 1


def _rb_black_height(rb, node: int) -> int:
    if node == NIL:
        return 1
    n = rb[node]
    for child in (n.left, n.right):
        if child != NIL:
            _check(rb_parent(rb[child]) == node, f"rb node {child}: wrong parent")
            if rb_color(n) == 0:
                _check(rb_color(rb[child]) == 1, f"rb node {node}: red with a red child")
    lh = _rb_black_height(rb, n.left)
    _check(lh == _rb_black_height(rb, n.right), f"rb node {node}: unequal black heights")
    return lh + (rb_color(n) == 1)


def check_invariants(m: Machine) -> None:
    """Recount every structure and compare: the stable trees (chains), the stable
    nodes, the rmap_items and their caches, the unstable tree's nodes, the counters,
    the per-mm counters, the mm_slots, the page tables and frames, the folios."""
    c = m.ctx
    mem = m.mem
    sl = {k: v[: mem.nr_slots] for k, v in mem.slots.items()}
    flags = sl["ri_flags"].astype(np.int64)
    seen_in_tree = _check_stable_trees(c, mem)
    recount = _check_stable_nodes(c, mem, seen_in_tree, sl)
    _check_stable_walk_caches(c, seen_in_tree)
    _check_rmap_items(c, mem, sl, flags, recount["stable_items"])
    _check_unstable_tree(c, mem, sl, flags)
    _check_counters(c, sl, flags, recount)
    _check_mm_counters(mem, sl, flags)
    _check_mm_slots(m)
    counts = _check_frames(c, mem, sl)
    _check_folios(c, mem, counts, len(mem.chunks) << 12)


def _valid(c: Any, mem: Memory, node: int) -> bool:
    """The stable node is not stale: its frame still names it (get_ksm_page())."""
    return bool(mem.frames["frame_stable"][c.stable[node].kpfn] == node)


def _check_stable_trees(c: Any, mem: Memory) -> set[int]:
    """The stable trees: kernel red-black shape and memcmp order of live contents
    (a chain by its live dups). Returns the nodes in the trees."""
    stable = c.stable
    seen_in_tree: set[int] = set()
    for nid in range(64):
        root = c.root_stable_tree[nid]
        if root == NIL:
            continue
        _check(nid < c.ksm_nr_node_ids, f"stable tree {nid} in use past ksm_nr_node_ids")
        _check(rb_color(c.stable_rb[root]) == 1, "stable root is red")
        _check(rb_parent(c.stable_rb[root]) == NIL, "stable root has a parent")
        _rb_black_height(c.stable_rb, root)
        prev: bytes | None = None
        node = lib.ksm_rb_first(c.stable_rb, root)
        while node != NIL:
            seen_in_tree.add(node)
            sn = stable[node]
            _check(sn.head == lib.KSM_HEAD_TREE, f"tree node {node} has head {sn.head}")
            _check(sn.nid == nid, f"stable node {node} is in tree {nid} but has nid {sn.nid}")
            live = [d for d in _dups(c, node) if _valid(c, mem, d)] if _is_chain(c, node) \
                else ([node] if _valid(c, mem, node) else [])
            if live:
                content = bytes(mem.page(stable[live[0]].kpfn))
                if prev is not None:
                    _check(prev < content, f"stable tree {nid} out of memcmp order at {node}")
                prev = content
            node = lib.ksm_rb_next(c.stable_rb, node)
    return seen_in_tree


def _check_chain(c: Any, node: int, seen_in_tree: set[int]) -> None:
    """A stable_node_chain: in a tree, and its dups link back to it."""
    _check(node in seen_in_tree, f"chain {node} not in a tree")
    for d in _dups(c, node):
        _check(c.stable[d].head == lib.KSM_HEAD_DUP and c.stable[d].chain == node,
               f"dup {d} of chain {node} badly linked")


def _check_stable_walk_caches(c: Any, seen_in_tree: set[int]) -> None:
    """What stable_walk_decided() trusts: spfx counts the prefixes of exactly the
    nodes linked in the trees, chain_list names exactly the chains among them (unless
    it gave up, -1), and stable_stale counts the stale nodes."""
    stable = c.stable
    if c.spfx_ok:
        want: dict[int, int] = {}
        for node in seen_in_tree:
            want[int(stable[node].prefix)] = want.get(int(stable[node].prefix), 0) + 1
        got = {int(c.spfx_key[h]): int(c.spfx_count[h])
               for h in range(c.spfx_mask + 1) if c.spfx_count[h]}
        _check(got == want, "spfx does not count the prefixes of the tree nodes")
        _check(c.spfx_used == len(want), f"spfx_used {c.spfx_used} != {len(want)}")
    chains = {n for n in seen_in_tree if _is_chain(c, n)}
    if c.nr_chain_list >= 0:
        listed = [int(c.chain_list[i]) for i in range(c.nr_chain_list)]
        _check(sorted(listed) == sorted(chains), f"chain_list {listed} != chains {chains}")
    stale = sum(1 for n in range(c.stable_used)
                if stable[n].head != lib.KSM_HEAD_FREE and stable[n].stale)
    _check(c.stable_stale == stale, f"stable_stale {c.stable_stale} != {stale}")


def _migrate_nodes(c: Any) -> set[int]:
    """The nodes on migrate_nodes, each marked as on it."""
    migrate = set()
    i = c.migrate_nodes
    while i != NIL:
        _check(c.stable[i].head == lib.KSM_HEAD_MIGRATE,
               f"node {i} on migrate_nodes with bad head")
        migrate.add(i)
        i = c.stable[i].next
    return migrate


def _check_stable_nodes(c: Any, mem: Memory, seen_in_tree: set[int],
                        sl: dict[str, np.ndarray]) -> dict[str, int]:
    """Every stable node in use: where it is, its stale mark, its node, its hlist of
    rmap_items. Returns the counters they make (and the items on hlists)."""
    stable = c.stable
    migrate = _migrate_nodes(c)
    out = {"pages_shared": 0, "pages_sharing": 0, "stable_node_chains": 0,
           "stable_node_dups": 0, "stable_items": 0}
    for node in range(c.stable_used):
        sn = stable[node]
        if sn.head == lib.KSM_HEAD_FREE:
            continue
        if _is_chain(c, node):
            out["stable_node_chains"] += 1
            _check_chain(c, node, seen_in_tree)
            continue
        valid = _valid(c, mem, node)
        # the stale mark is get_ksm_page()'s test: the frame no longer names the node
        _check(bool(sn.stale) != valid,
               f"stable node {node}: stale is {sn.stale} but its frame says otherwise")
        if sn.head == lib.KSM_HEAD_DUP:
            out["stable_node_dups"] += 1
        elif sn.head == lib.KSM_HEAD_TREE:
            _check(node in seen_in_tree, f"stable node {node} says tree but is not in one")
        else:
            _check(node in migrate, f"stable node {node} says migrate but is not listed")
        if (not c.merge_across_nodes and sn.head != lib.KSM_HEAD_MIGRATE and valid
                and not sn.migrated):
            # only a migration ksmd has not met yet leaves a page in another node's tree
            _check(mem.frame_nid(sn.kpfn) == sn.nid,
                   f"KSM page {sn.kpfn} on node {mem.frame_nid(sn.kpfn)} is in tree {sn.nid}")
        count = 0
        s = sn.hlist
        while s != NIL:
            _check(sl["ri_flags"][s] & lib.KSM_STABLE_FLAG and sl["ri_head"][s] == node,
                   f"slot {s} on node {node}'s hlist is not a stable item of it")
            count += 1
            s = int(sl["ri_hnext"][s])
        _check(count == sn.rmap_hlist_len,
               f"node {node}: rmap_hlist_len {sn.rmap_hlist_len} != {count}")
        out["stable_items"] += count
        if count:
            out["pages_shared"] += 1
            out["pages_sharing"] += count - 1
    return out


def _check_rmap_items(c: Any, mem: Memory, sl: dict[str, np.ndarray], flags: np.ndarray,
                      stable_items: int) -> None:
    """rmap_items: the stable ones are all on stable nodes, a freed one keeps no flag,
    and a fresh cached checksum (oldchecksum) is the checksum of the page mapped now."""
    exists = (flags & lib.KSM_ITEM_EXISTS) != 0
    _check(stable_items == int(((flags & lib.KSM_STABLE_FLAG) != 0).sum()),
           "stable rmap_items not all on stable nodes")
    slot_bits = lib.KSM_SLOT_VM_MERGEABLE
    _check(not (((flags & ~slot_bits) != 0) & ~exists).any(), "flags on a freed rmap_item")
    pte_all = sl["pte"]
    fresh = np.nonzero(((flags & lib.KSM_SLOT_CSUM_FRESH) != 0) & (pte_all > 0))[0]
    for s in fresh:
        page = mem.page(int(pte_all[s]))
        _check(lib.calc_checksum(ffi.from_buffer(page)) == sl["ri_oldchecksum"][s],
               f"slot {s}: the cached checksum is not the page's")


def _check_unstable_tree(c: Any, mem: Memory, sl: dict[str, np.ndarray],
                         flags: np.ndarray) -> None:
    """The unstable nodes' prefix cache: an item of this round whose page was not
    written since (its checksum fresh) has the prefix its node recorded."""
    if not c.ucount:
        return
    pte_all = sl["pte"]
    uslot = np.frombuffer(ffi.buffer(c.uslot, 4 * c.ucount), dtype=np.int32)
    uprefix = np.frombuffer(ffi.buffer(c.uprefix, 8 * c.ucount), dtype=np.uint64)
    in_tree = ((flags & lib.KSM_UNSTABLE_FLAG) != 0) & \
        ((flags & lib.KSM_SEQNR_MASK) == (c.seqnr & lib.KSM_SEQNR_MASK))
    fresh_in_tree = in_tree & ((flags & lib.KSM_SLOT_CSUM_FRESH) != 0) & (pte_all > 0)
    for fs in np.nonzero(fresh_in_tree)[0]:
        tn = int(sl["ri_head"][fs])
        if 0 <= tn < c.ucount and uslot[tn] == fs:
            page = mem.page(int(pte_all[fs]))
            _check(int(uprefix[tn]) == int.from_bytes(bytes(page[:8]), "big"),
                   f"slot {fs}: unstable node {tn} has a stale prefix")
    # nodes inserted since the last change outside the scan: their pages are still
    # mapped, mergeable and unwritten (a walk trusts their prefix without looking)
    for tn in range(max(c.uquiet_from, 0), c.ucount):
        s = int(uslot[tn])
        if not (in_tree[s] and sl["ri_head"][s] == tn):
            continue  # no longer in the tree
        _check(bool(flags[s] & lib.KSM_SLOT_VM_MERGEABLE) and pte_all[s] >= 0,
               f"quiet unstable node {tn}: slot {s} unmapped or not mergeable")
        page = mem.page(int(pte_all[s]))
        _check(int(uprefix[tn]) == int.from_bytes(bytes(page[:8]), "big"),
               f"quiet unstable node {tn}: slot {s} was written")


def _check_counters(c: Any, sl: dict[str, np.ndarray], flags: np.ndarray,
                    recount: dict[str, int]) -> None:
    """The global counters of /sys/kernel/mm/ksm (and the THP split count)."""
    exists = (flags & lib.KSM_ITEM_EXISTS) != 0
    for name, want in (
        ("pages_shared", recount["pages_shared"]),
        ("pages_sharing", recount["pages_sharing"]),
        ("stable_node_chains", recount["stable_node_chains"]),
        ("stable_node_dups", recount["stable_node_dups"]),
        ("pages_unshared", int(((flags & lib.KSM_UNSTABLE_FLAG) != 0).sum())),
        ("rmap_items", int(exists.sum())),
        ("ksm_zero_pages", int((sl["pte"] == lib.KSM_PTE_ZERO).sum())),
        ("thp_split_zero_pages", int((sl["pte"] == lib.KSM_PTE_SPLIT_ZERO).sum())),
    ):
        _check(getattr(c, name) == want, f"{name} is {getattr(c, name)}, a recount gives {want}")


def _check_mm_counters(mem: Memory, sl: dict[str, np.ndarray], flags: np.ndarray) -> None:
    """The per-mm counters (ksm_stat) against the slots each mm owns."""
    exists = (flags & lib.KSM_ITEM_EXISTS) != 0
    mm_ids = np.repeat(mem.slot_mm, 64)[: mem.nr_slots]
    nmm = mem.nr_mm
    per_mm = {
        "mm_rmap_items": np.bincount(mm_ids[exists], minlength=nmm),
        "mm_merging_pages": np.bincount(mm_ids[(flags & lib.KSM_STABLE_FLAG) != 0], minlength=nmm),
        "mm_zero_pages": np.bincount(mm_ids[sl["pte"] == lib.KSM_PTE_ZERO], minlength=nmm),
        "mm_thp_split_zero_pages": np.bincount(mm_ids[sl["pte"] == lib.KSM_PTE_SPLIT_ZERO],
                                               minlength=nmm),
    }
    for name, recount in per_mm.items():
        got = mem.mm[name][:nmm]
        _check(np.array_equal(got, recount[:nmm]),
               f"{name} per mm {got} != recount {recount[:nmm]}")


def _check_mm_slots(m: Machine) -> None:
    """ksmd's mm_slot list: each mm at most once and MMF_VM_MERGEABLE; the cursor on
    it (or at its head); an mm with rmap_items keeps its slot until ksmd frees them."""
    ksmd = m.ksm.ksmd
    mms = [slot.mm for slot in ksmd.mm_slots]
    _check(len({id(mm) for mm in mms}) == len(mms), "an mm has two mm_slots")
    for mm in mms:
        _check(mm.ksm_registered, f"mm of process {mm.pid} has a slot but not MMF_VM_MERGEABLE")
    _check(ksmd.cursor is None or any(s is ksmd.cursor for s in ksmd.mm_slots),
           "ksm_scan.mm_slot is not on the list")
    slotted = {mm.mm_id for mm in mms}
    items = m.mem.mm["mm_rmap_items"][: m.mem.nr_mm]
    for mm_id in np.nonzero(items)[0]:
        _check(int(mm_id) in slotted, f"mm {mm_id} has rmap_items but no mm_slot")


def _check_frames(c: Any, mem: Memory, sl: dict[str, np.ndarray]) -> np.ndarray:
    """Page tables and frames: mapcounts, no mapping of a free frame, KSM marks.
    Returns the PTEs per frame."""
    stable = c.stable
    frames = mem.frames
    pte = sl["pte"]
    mapped = pte[pte >= 0]
    nframes = len(mem.chunks) << 12
    counts = np.bincount(mapped, minlength=nframes)
    _check(np.array_equal(counts, frames["frame_mapcount"][:nframes]),
           "frame mapcounts != PTE count")
    _check(not (mapped == 0).any(), "a PTE maps pfn 0 as an ordinary page")
    ksm_frames = np.nonzero(frames["frame_stable"][:nframes] >= 0)[0]
    for f in ksm_frames:
        node = int(frames["frame_stable"][f])
        _check(stable[node].head != lib.KSM_HEAD_FREE and stable[node].kpfn == f,
               f"frame {f} names stable node {node}, which does not name it")
        _check(counts[f] > 0, f"KSM frame {f} is not mapped")
    return counts


def _check_folios(c, mem: Memory, counts: np.ndarray, nframes: int) -> None:
    """Large folios (THP): frame_folio names a live folio whose head..head+511 are its
    frames; its mapped/shared counts match the mapcounts; every slot that maps a
    subpage k is listed as a mapping (its slot minus k); no subpage is KSM."""
    frame_folio = folio_of(mem.frames["frame_folio"][:nframes])
    pte = mem.slots["pte"][: mem.nr_slots]
    in_folio = np.nonzero(frame_folio >= 0)[0]
    folios = {int(f) for f in np.unique(frame_folio[in_folio])}
    free = set()
    i = c.folios_free
    while i != NIL:
        free.add(i)
        i = c.folios[i].next_free
    for f in folios:
        _check(f not in free and 0 <= f < c.folios_used, f"frame names freed folio {f}")
        fo = c.folios[f]
        head = int(fo.head)
        sub = np.arange(head, head + HPAGE_PMD_NR)
        _check(bool((frame_folio[sub] == f).all()), f"folio {f}: frames {head}.. disagree")
        mc = counts[sub]
        _check(int((mc > 0).sum()) == fo.mapped and fo.mapped > 0,
               f"folio {f}: mapped {fo.mapped} != {(mc > 0).sum()}")
        _check(int((mc > 1).sum()) == fo.shared, f"folio {f}: shared {fo.shared} != recount")
        _check(not (mem.frames["frame_stable"][sub] >= 0).any(), f"folio {f}: a KSM subpage")
        bases = {int(fo.maps[i]) for i in range(fo.nr_maps)}
        slots = np.nonzero((pte >= head) & (pte < head + HPAGE_PMD_NR))[0]
        for s in slots:
            _check(int(s) - (int(pte[s]) - head) in bases,
                   f"folio {f}: slot {s} maps it but is not listed")


def _is_chain(c, node: int) -> bool:
    return c.stable[node].rmap_hlist_len == lib.KSM_STABLE_NODE_CHAIN


def _dups(c, chain: int) -> list[int]:
    out = []
    d = c.stable[chain].hlist
    while d != NIL:
        out.append(d)
        d = c.stable[d].next
    return out
