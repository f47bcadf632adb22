"""Transparent huge pages in the model (docs/MODEL.md, "Transparent huge pages"): the
faults that map huge pages, what ksmd's merges do to them, fork, zaps and the knobs.
Each test runs on both implementations."""

from __future__ import annotations

import errno
from typing import Any

import numpy as np
import pytest

from ksmcore.constants import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    PAGE_SIZE,
)
from ksmcore.thp import HPAGE_PMD_NR, HPAGE_PMD_SIZE

N = HPAGE_PMD_NR


def huge(p: Any, addr: int) -> bool:
    """A huge page backs the PMD range at addr: one write mapped all 512 pages, on
    consecutive frames in the engine (the reference's frames are any)."""
    return all(p.pfn(addr + k * PAGE_SIZE) not in (None, 0) for k in range(N))


def test_defaults_are_the_kernels(Machine: type) -> None:
    m = Machine()
    assert (m.thp_enabled, m.thp_use_zero_page) == ("madvise", 1)
    for bad in ("sometimes", 3):
        with pytest.raises(OSError) as e:
            m.thp_enabled = bad
        assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        m.thp_use_zero_page = 2
    assert m.thp_enabled == "madvise"


def test_2mib_multiples_are_pmd_aligned(Machine: type) -> None:
    p = Machine().spawn()
    p.mmap(3)
    assert p.mmap(N) % HPAGE_PMD_SIZE == 0
    assert p.mmap(2 * N) % HPAGE_PMD_SIZE == 0
    assert p.mmap(N + 1) % HPAGE_PMD_SIZE != 0  # only whole multiples (6.13+)


@pytest.mark.parametrize("enabled,advice,expect", [
    ("madvise", None, False), ("madvise", MADV_HUGEPAGE, True),
    ("always", None, True), ("always", MADV_NOHUGEPAGE, False),
    ("never", MADV_HUGEPAGE, False),
])
def test_write_fault_maps_a_huge_page_where_allowed(Machine: type, enabled: str,
                                                    advice: int | None, expect: bool) -> None:
    m = Machine()
    m.thp_enabled = enabled
    p = m.spawn()
    addr = p.mmap(N)
    if advice is not None:
        p.madvise(addr, N * PAGE_SIZE, advice)
    p.write(addr + 7 * PAGE_SIZE, b"x")
    assert huge(p, addr) == expect
    assert p.read(addr, 1) == b"\0"


def test_a_range_not_wholly_in_one_vma_gets_small_pages(Machine: type) -> None:
    m = Machine()
    m.thp_enabled = "always"
    p = m.spawn()
    addr = p.mmap(2 * N)
    p.madvise(addr + 100 * PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE)  # cuts the first range
    p.write(addr, b"x")
    p.write(addr + N * PAGE_SIZE, b"y")
    assert p.pfn(addr + PAGE_SIZE) is None  # 4 KiB: only the written page
    assert huge(p, addr + N * PAGE_SIZE)


def test_read_fault_maps_the_huge_zero_page_then_writes_get_small_pages(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    addr = p.mmap(N)
    p.madvise(addr, N * PAGE_SIZE, MADV_HUGEPAGE)
    p.read_fault(addr, PAGE_SIZE)
    assert p.pfn(addr + 300 * PAGE_SIZE) == 0  # the huge zero page
    p.write(addr, b"x")  # do_huge_pmd_wp_page() falls back to 4 KiB
    assert p.pfn(addr) not in (None, 0) and p.pfn(addr + PAGE_SIZE) is None
    # with use_zero_page 0 a read fault maps a huge page
    m.thp_use_zero_page = 0
    b = p.mmap(N)
    p.madvise(b, N * PAGE_SIZE, MADV_HUGEPAGE)
    p.read_fault(b + PAGE_SIZE, 1)
    assert huge(p, b)


def test_merging_splits_and_zero_filled_subpages_become_the_zero_page(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    addr = p.mmap(N)
    p.madvise(addr, N * PAGE_SIZE, MADV_HUGEPAGE)
    pages = np.zeros((N, PAGE_SIZE), np.uint8)
    pages[10:20] = 5
    pages[30] = 6
    p.fill(addr, pages)
    p.madvise(addr, N * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=3)
    s = m.ksm.stats()
    # subpage 11 met 10 in the unstable tree: one huge page, so split without a merge
    assert (s["pages_shared"], s["pages_sharing"], s["ksm_zero_pages"]) == (1, 9, 0)
    assert m.thp_splits == 1
    assert m.thp_split_zero_pages == p.thp_split_zero_pages == N - 11
    assert p.pfn(addr) == 0 and p.pfn(addr + 30 * PAGE_SIZE) not in (None, 0)
    assert p.ksm_stat()["ksm_rmap_items"] == 11  # the zero page is never visited again
    assert p.read(addr + 10 * PAGE_SIZE, 1) == b"\x05"
    p.write(addr, b"z")  # a write to the zero page gets a new page
    assert m.thp_split_zero_pages == N - 12
    m.check_invariants()


def test_use_zero_pages_does_not_count_split_zero_pages(Machine: type) -> None:
    m = Machine()
    m.ksm.use_zero_pages = 1
    p = m.spawn()
    addr = p.mmap(N)
    p.madvise(addr, N * PAGE_SIZE, MADV_HUGEPAGE)
    p.write(addr, b"x")  # a huge page, all zero but one byte
    p.madvise(addr, N * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=3)
    assert m.ksm.ksm_zero_pages == 0
    assert m.thp_split_zero_pages == N - 1
    m.check_invariants()


def test_fork_shares_and_a_write_copies_one_subpage(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    addr = p.mmap(N)
    p.madvise(addr, N * PAGE_SIZE, MADV_HUGEPAGE)
    p.fill(addr, np.full((N, PAGE_SIZE), 3, np.uint8))
    c = p.fork()
    assert c.pfn(addr) == p.pfn(addr)
    c.write(addr + 5 * PAGE_SIZE, b"c")
    assert c.pfn(addr + 5 * PAGE_SIZE) != p.pfn(addr + 5 * PAGE_SIZE)
    assert c.pfn(addr + 6 * PAGE_SIZE) == p.pfn(addr + 6 * PAGE_SIZE)
    p.write(addr + 5 * PAGE_SIZE, b"p")  # still shared by the child's other pages: copied
    old = p.pfn(addr + 6 * PAGE_SIZE)
    c.exit()
    p.write(addr + 6 * PAGE_SIZE, b"p")  # now only p maps it: written in place
    assert p.pfn(addr + 6 * PAGE_SIZE) == old
    m.check_invariants()


def test_split_reaches_every_mm_that_maps_the_huge_page(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    addr = p.mmap(N)
    p.madvise(addr, N * PAGE_SIZE, MADV_HUGEPAGE)
    p.write(addr, b"\x01")
    p.write(addr + PAGE_SIZE, b"\x01")
    c = p.fork()
    p.madvise(addr, N * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=3)
    assert p.thp_split_zero_pages == c.thp_split_zero_pages == N - 2
    assert c.ksm_stat()["ksm_rmap_items"] == 0  # the child is not registered
    m.check_invariants()


def test_zaps_of_whole_and_partial_ranges(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    addr = p.mmap(N)
    p.madvise(addr, N * PAGE_SIZE, MADV_HUGEPAGE)
    p.write(addr, b"x")
    p.madvise(addr, 10 * PAGE_SIZE, MADV_DONTNEED)  # splits the PMD; the folio stays
    p.madvise(addr + 10 * PAGE_SIZE, (N - 10) * PAGE_SIZE, MADV_DONTNEED)
    p.write(addr, b"y")  # the page table is left: 4 KiB
    assert p.pfn(addr + PAGE_SIZE) is None
    p.madvise(addr, N * PAGE_SIZE, MADV_DONTNEED)  # the whole range: empty again
    p.write(addr, b"z")
    assert huge(p, addr)
    m.check_invariants()


def test_hugepage_images(Machine: type) -> None:
    image = np.zeros((N + 5, PAGE_SIZE), np.uint8)
    image[:3] = 9
    m = Machine()
    p = m.spawn()
    addr = p.mmap_image(image, hugepage=True)
    assert addr % HPAGE_PMD_SIZE == 0
    p.write(addr + 4 * PAGE_SIZE, b"w")  # a copy leaves the huge page
    p.madvise(addr, (N + 5) * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=3)
    # the huge page's zero pages go in the split; the 5 pages past it are 4 KiB
    assert m.thp_split_zero_pages == N - 4
    # the 3 pages of 9 merge (the second met the first inside the huge page: that
    # split merged nothing, the third merged with the first in that scan, the second in
    # the next); the 5 zero pages past the huge page merge into one KSM page
    s = m.ksm.stats()
    assert (s["pages_shared"], s["pages_sharing"]) == (2, 2 + 4)
    m.check_invariants()
