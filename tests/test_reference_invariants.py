"""The reference's invariant checker, one structure at a time: each per-structure check
passes on a consistent machine and names the invariant when one piece of that
structure is broken by hand."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE, STABLE_FLAG, UNSTABLE_FLAG
from ksmcore.reference import Machine
from ksmcore.reference import invariants as inv
from ksmcore.reference.ksm_structs import StableNode

P = PAGE_SIZE


def _machine(max_page_sharing: int = 256, full_scans: int = 2) -> Machine:
    """Two processes, each with 4 pages in common and 4 of its own, scanned."""
    m = Machine()
    m.ksm.max_page_sharing = max_page_sharing
    rng = np.random.default_rng(0)
    common = rng.integers(0, 256, (4, P), np.uint8)
    for _ in range(2):
        p = m.spawn()
        a = p.mmap(8)
        p.fill(a, np.concatenate([common, rng.integers(0, 256, (4, P), np.uint8)]))
        p.madvise(a, 8 * P, MADV_MERGEABLE)
    m.ksm.pages_to_scan = 100
    m.ksm.run = 1
    m.ksm.scan(full_scans)
    m.check_invariants()
    return m


def _tree_nodes(m: Machine) -> list[StableNode]:
    return [n for root in m._ksm.root_stable_tree for n in root if isinstance(n, StableNode)]


def _broken(m: Machine, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        m.check_invariants()


def test_each_check_passes_on_a_consistent_machine() -> None:
    m = _machine()
    ksm, mem = m._ksm, m._mem
    nodes = inv.check_stable_trees(ksm, mem)
    assert len(nodes) == 4 and m.ksm.pages_shared == 4
    inv.check_stable_counters(ksm, nodes)
    slots = inv.check_mm_slots(ksm)
    assert len(slots) == 2
    recount = inv.check_rmap_lists(ksm, slots, {id(n) for n in nodes})
    # 8 rmap_items per mm, 4 of them stable
    assert sorted(recount.items.values()) == [8, 8]
    assert sorted(recount.merging.values()) == [4, 4]
    inv.check_unstable_trees(ksm, recount)
    mapcount = inv.check_mms(m._all_mms, mem, recount)
    # the 4 KSM pages are mapped twice, the 8 private pages once
    assert sorted(mapcount.values()) == [1] * 8 + [2] * 4
    inv.check_frames(mem, mapcount, {id(n) for n in nodes})


def _corrupt_counter(m: Machine) -> None:
    m._ksm.ksm_pages_sharing += 1


def _corrupt_hlist(m: Machine) -> None:
    _tree_nodes(m)[0].rmap_hlist_len += 1


def _corrupt_tree_order(m: Machine) -> None:
    # the smallest KSM page's bytes made the largest
    node = _tree_nodes(m)[0]
    m._mem.frames[node.kpfn].data[:] = b"\xff" * P


def _corrupt_migrate_nodes(m: Machine) -> None:
    m._ksm.migrate_nodes.append(_tree_nodes(m)[0])


def _corrupt_slot_list(m: Machine) -> None:
    head = m._ksm.ksm_mm_head
    head.next.next.prev = head


def _corrupt_rmap_flags(m: Machine) -> None:
    slot = m._ksm.ksm_mm_head.next
    assert slot.rmap_list is not None
    slot.rmap_list.address |= STABLE_FLAG | UNSTABLE_FLAG


def _corrupt_mm_counter(m: Machine) -> None:
    m._all_mms[0].ksm_merging_pages += 1


def _corrupt_mapcount(m: Machine) -> None:
    mm = m._all_mms[0]
    m._mem.frames[next(iter(mm.pte.values()))].mapcount += 1


def _corrupt_frame_node(m: Machine) -> None:
    node = _tree_nodes(m)[0]
    m._mem.frames[node.kpfn].ksm = False


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_counter, r"pages_sharing \d+ != recount"),
    (_corrupt_hlist, "rmap_hlist_len"),
    (_corrupt_tree_order, "in-order walk is not strictly increasing"),
    (_corrupt_migrate_nodes, "migrate_nodes holds a node not marked as on it"),
    (_corrupt_slot_list, "mm_slot list: broken prev link"),
    (_corrupt_rmap_flags, "both stable and unstable"),
    (_corrupt_mm_counter, "mm ksm_merging_pages"),
    (_corrupt_mapcount, r"mapcount \d+ != \d+ PTEs"),
    (_corrupt_frame_node, "has a stable node but is not KSM"),
])
def test_a_broken_structure_is_named(corrupt: Callable[[Machine], None], message: str) -> None:
    m = _machine()
    corrupt(m)
    _broken(m, message)


def test_chains_are_checked() -> None:
    """max_page_sharing 2 and 6 copies of one page: a chain of 3 dups; a dup that
    claims another chain is caught."""
    m = Machine()
    m.ksm.max_page_sharing = 2
    p = m.spawn()
    a = p.mmap(6)
    p.fill(a, np.full((6, P), 0x2A, np.uint8))
    p.madvise(a, 6 * P, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(3)
    m.check_invariants()
    (chain,) = _tree_nodes(m)
    assert chain.is_chain() and len(chain.dups) == 3 and m.ksm.stable_node_dups == 3
    chain.dups[0].chain = chain.dups[1]
    _broken(m, "a chain holds a node that is not its dup")


def test_the_unstable_tree_is_checked_during_a_round() -> None:
    """Mid-round the unstable tree holds exactly this round's unstable rmap_items."""
    m = _machine(full_scans=1)
    m.ksm.do_scan(6)  # into the second round: the first mm's pages, unstable now
    ksm = m._ksm
    assert ksm.ksm_scan.mm_slot is not ksm.ksm_mm_head and ksm.ksm_pages_unshared
    m.check_invariants()
    item = ksm.ksm_mm_head.next.rmap_list
    while item is not None and not item.address & UNSTABLE_FLAG:
        item = item.rmap_list
    assert item is not None
    item.nid = 1
    _broken(m, "unstable tree 0 holds an item not inserted there this round")
