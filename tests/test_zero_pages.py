"""use_zero_pages: merging with the kernel zero page, ksm_zero_pages (global and per
process), the lazy freeing of their rmap_items, COW, unmerge, fork, munmap, exit, on
both implementations. Kernel parity: the zero* and mix_zero* workloads of
test_kernel_parity.py; the numbers of test_unmerge_zero_pages are in
test_ksm_functional_tests.py."""

from __future__ import annotations

from typing import Any

import numpy as np

from ksmcore.constants import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, SIZEOF_RMAP_ITEM

P = PAGE_SIZE


def area(p: Any, bytes_: list[int]) -> int:
    a = p.mmap(len(bytes_))
    p.fill(a, np.array([np.full(P, b, np.uint8) for b in bytes_]))
    p.madvise(a, len(bytes_) * P, MADV_MERGEABLE)
    return a


def zero_machine(Machine: type, bytes_: list[int]) -> tuple[Any, Any, int]:
    m = Machine()
    m.ksm.use_zero_pages = 1
    p = m.spawn()
    a = area(p, bytes_)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    return m, p, a


def test_zero_pages_map_the_zero_page_and_are_counted_apart(Machine: type) -> None:
    m, p, a = zero_machine(Machine, [0, 0, 0, 5, 5, 9])
    assert [p.pfn(a + i * P) for i in range(3)] == [0, 0, 0]
    s = m.ksm.stats()
    assert (s["ksm_zero_pages"], s["pages_shared"], s["pages_sharing"]) == (3, 1, 1)
    stat = p.ksm_stat()
    assert (stat["ksm_zero_pages"], stat["ksm_merging_pages"]) == (3, 2)
    # general_profit = (pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * 64
    assert s["general_profit"] == (1 + 3) * P - stat["ksm_rmap_items"] * SIZEOF_RMAP_ITEM
    assert stat["ksm_process_profit"] == (2 + 3) * P - stat["ksm_rmap_items"] * SIZEOF_RMAP_ITEM
    assert p.read(a, 3 * P) == bytes(3 * P)
    m.check_invariants()


def test_their_rmap_items_go_at_the_next_pass(Machine: type) -> None:
    """The merge leaves the item with no flag (volatile); the scan never sees the zero
    page, so get_next_rmap_item()/remove_trailing_rmap_items() free it next time."""
    m, p, a = zero_machine(Machine, [0, 0, 7])
    assert p.ksm_stat()["ksm_rmap_items"] == 3
    assert m.ksm.pages_volatile == 2
    m.ksm.scan(full_scans=1)
    assert p.ksm_stat()["ksm_rmap_items"] == 1
    assert (m.ksm.pages_volatile, m.ksm.ksm_zero_pages) == (0, 2)
    m.check_invariants()


def test_cow_of_a_zero_mapped_page(Machine: type) -> None:
    m, p, a = zero_machine(Machine, [0, 0])
    p.write(a + P + 10, b"hi")
    assert p.pfn(a + P) not in (0, None)
    assert p.read(a + P, 12) == bytes(10) + b"hi"
    assert (m.ksm.ksm_zero_pages, p.ksm_stat()["ksm_zero_pages"]) == (1, 1)
    p.write(a, bytes(P))  # writing zeros still faults a new page
    assert p.pfn(a) != 0 and m.ksm.ksm_zero_pages == 0
    m.ksm.scan(full_scans=2)  # the all-zero page merges again
    assert p.pfn(a) == 0 and m.ksm.ksm_zero_pages == 1
    m.check_invariants()


def test_unmerge_munmap_fork_exit_and_run_2(Machine: type) -> None:
    m, p, a = zero_machine(Machine, [0] * 6)
    p.madvise(a, 2 * P, MADV_UNMERGEABLE)  # break_ksm: fresh zeroed pages
    assert [p.pfn(a + i * P) == 0 for i in range(3)] == [False, False, True]
    assert m.ksm.ksm_zero_pages == 4
    p.munmap(a + 5 * P, P)
    assert m.ksm.ksm_zero_pages == p.ksm_stat()["ksm_zero_pages"] == 3
    c = p.fork()  # the zero PTEs are copied: the global count grows
    assert c.ksm_stat()["ksm_zero_pages"] == 3 and m.ksm.ksm_zero_pages == 6
    c.exit()
    assert m.ksm.ksm_zero_pages == 3
    m.ksm.run = 2  # unmerges the zero pages too
    assert m.ksm.ksm_zero_pages == p.ksm_stat()["ksm_zero_pages"] == 0
    assert p.read(a, 5 * P) == bytes(5 * P)
    m.check_invariants()


def test_the_knob_only_affects_future_merges(Machine: type) -> None:
    """Zero pages merged as ordinary KSM pages stay so when the knob is turned on; zero
    PTEs stay when it is turned off."""
    m = Machine()
    p = m.spawn()
    area(p, [0, 0, 0])
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing, m.ksm.ksm_zero_pages) == (1, 2, 0)
    m.ksm.use_zero_pages = 1
    m.ksm.scan(full_scans=3)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing, m.ksm.ksm_zero_pages) == (1, 2, 0)
    q = m.spawn()
    b = area(q, [0, 0])
    m.ksm.scan(full_scans=2)
    assert q.pfn(b) == q.pfn(b + P) == 0 and m.ksm.ksm_zero_pages == 2
    m.ksm.use_zero_pages = 0
    m.ksm.scan(full_scans=2)
    assert m.ksm.ksm_zero_pages == 2
    m.check_invariants()
