"""move_pages(2) statuses as mm/migrate.c do_pages_move() produces them: pages are
isolated onto a list one address at a time; an address that is not queued stores its
status and migrates the list so far; a second address of a page already on the list
finds it isolated (-EBUSY)."""

from __future__ import annotations

import errno

import numpy as np

from ksmcore.constants import MADV_MERGEABLE, MPOL_MF_MOVE, MPOL_MF_MOVE_ALL, PAGE_SIZE

EBUSY, EACCES, EFAULT = -errno.EBUSY, -errno.EACCES, -errno.EFAULT


def merged(Machine: type, contents: list[int], node: int = 0) -> tuple[object, object, int]:
    """One process on node 2-node machine, one page per entry of contents, merged."""
    m = Machine(nodes=2)
    p = m.spawn(node=node)
    addr = p.mmap(len(contents))
    p.fill(addr, np.array([np.full(PAGE_SIZE, c, np.uint8) for c in contents]))
    p.madvise(addr, len(contents) * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    return m, p, addr


def test_second_address_of_a_queued_ksm_page_is_busy(Machine: type) -> None:
    """The issue's minimal case: 26 equal merged pages on node 1, move_pages of 3 of them
    to node 0 with MPOL_MF_MOVE_ALL. The first address queues the KSM page, the second
    finds it isolated (-EBUSY) and migrates the list; the third finds it on node 0."""
    m, p, addr = merged(Machine, [7] * 26, node=1)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (1, 25)
    assert p.move_pages(addr, 3, 0, MPOL_MF_MOVE_ALL) == [0, EBUSY, 0]
    assert m.pfn_to_nid(p.pfn(addr)) == 0
    assert len({p.pfn(addr + i * PAGE_SIZE) for i in range(26)}) == 1
    assert m.ksm.node_stats() == {0: {"pages_shared": 1, "pages_sharing": 25},
                                  1: {"pages_shared": 0, "pages_sharing": 0}}
    m.check_invariants()


def test_queue_migrates_at_each_unqueued_status(Machine: type) -> None:
    """Pages A B A B (two KSM pages, each mapped twice): A and B queue, the second A is
    -EBUSY and migrates both, so the second B finds its page on the target already."""
    m, p, addr = merged(Machine, [1, 2, 1, 2], node=0)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (2, 2)
    assert p.move_pages(addr, 4, 1, MPOL_MF_MOVE_ALL) == [1, 1, EBUSY, 1]
    assert {m.pfn_to_nid(p.pfn(addr + i * PAGE_SIZE)) for i in range(4)} == {1}
    m.check_invariants()


def test_shared_page_without_move_all(Machine: type) -> None:
    """Without MPOL_MF_MOVE_ALL a page mapped twice is -EACCES at both addresses (checked
    before the isolation), and the unshared page after them still moves."""
    m, p, addr = merged(Machine, [5, 5, 9], node=0)
    assert p.move_pages(addr, 3, 1, MPOL_MF_MOVE) == [EACCES, EACCES, 1]
    assert m.pfn_to_nid(p.pfn(addr)) == 0 and m.pfn_to_nid(p.pfn(addr + 2 * PAGE_SIZE)) == 1
    m.check_invariants()


def test_zero_page_and_unmapped_addresses(Machine: type) -> None:
    """The KSM zero page does not move (-EFAULT), nor does an address past the VMA."""
    m = Machine(nodes=2)
    m.ksm.use_zero_pages = 1
    p = m.spawn()
    addr = p.mmap(2)
    p.fill(addr, np.zeros((2, PAGE_SIZE), np.uint8))
    p.madvise(addr, 2 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert p.pfn(addr) == 0
    assert p.move_pages(addr, 3, 1, MPOL_MF_MOVE_ALL) == [EFAULT, EFAULT, EFAULT]
    m.check_invariants()
