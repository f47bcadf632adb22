"""The kernel's own KSM tests, run on the model: tools/testing/selftests/mm/ksm_tests.c,
ksm_functional_tests.c and LTP's ksm01, with the counters those tests expect.

Each test runs on both implementations (the ``Machine`` fixture).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ksmcore.constants import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE


def expected_ksm_pages_count(n: int, max_page_sharing: int) -> tuple[int, int]:
    """ksm_tests.c assert_ksm_pages_count(): (pages_shared, pages_sharing) for n equal pages."""
    m = max_page_sharing
    if n % m in (0, 1):
        shared = n // m
        return shared, shared * (m - 1)
    shared = n // m + 1
    return shared, n - shared


def ksm_merge_pages(m: Any, p: Any, addr: int, npages: int) -> None:
    """ksm_tests.c ksm_merge_pages(): madvise, run=1, wait for two more full scans."""
    p.madvise(addr, npages * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)


def ksm_tests_setup(Machine: type, page_count: int) -> Any:
    """ksm_tests.c global setup: run=2, sleep_millisecs=0, merge_across_nodes=1,
    pages_to_scan=page_count."""
    m = Machine()
    m.ksm.run = 2
    m.ksm.sleep_millisecs = 0
    m.ksm.merge_across_nodes = 1
    m.ksm.pages_to_scan = page_count
    return m


def filled(p: Any, npages: int, byte: int) -> int:
    addr = p.mmap(npages)
    p.fill(addr, np.full((npages, PAGE_SIZE), byte, np.uint8))
    return addr


@pytest.mark.parametrize("page_count", [2, 10, 100, 255, 256, 257])
def test_ksm_tests_M_merge(Machine: type, page_count: int) -> None:
    """ksm_tests -M -p N: N pages of '*' merge as assert_ksm_pages_count(N) says."""
    m = ksm_tests_setup(Machine, page_count)
    p = m.spawn()
    addr = filled(p, page_count, ord("*"))
    ksm_merge_pages(m, p, addr, page_count)
    s = m.ksm.stats()
    assert (s["pages_shared"], s["pages_sharing"]) == expected_ksm_pages_count(page_count, 256)
    m.check_invariants()


def test_ksm_tests_U_unmerge(Machine: type) -> None:
    """ksm_tests -U: two merged pages, each written, are no longer shared after one scan."""
    m = ksm_tests_setup(Machine, 10)
    p = m.spawn()
    addr = filled(p, 2, ord("*"))
    ksm_merge_pages(m, p, addr, 2)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (1, 1)
    p.write(addr, b"-")
    p.write(addr + PAGE_SIZE, b"+")
    m.ksm.scan(full_scans=1)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (0, 0)
    m.check_invariants()


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_ksm_tests_Z_zero_pages(Machine: type, use_zero_pages: int) -> None:
    """ksm_tests -Z -p 10 -z 0|1: zero pages merge like others (1/9), or map the zero page (0/0)."""
    m = ksm_tests_setup(Machine, 10)
    m.ksm.use_zero_pages = use_zero_pages
    p = m.spawn()
    addr = filled(p, 10, 0)
    ksm_merge_pages(m, p, addr, 10)
    s = m.ksm.stats()
    if use_zero_pages:
        assert (s["pages_shared"], s["pages_sharing"], s["ksm_zero_pages"]) == (0, 0, 10)
        assert all(p.pfn(addr + i * PAGE_SIZE) == 0 for i in range(10))
    else:
        assert (s["pages_shared"], s["pages_sharing"], s["ksm_zero_pages"]) == (1, 9, 0)
    m.check_invariants()


def test_ksm_tests_N_single_node(Machine: type) -> None:
    """ksm_tests -N -m 1 on one node: the two pages of '*' merge into 1 / 1."""
    m = ksm_tests_setup(Machine, 10)
    p = m.spawn()
    a = filled(p, 1, ord("*"))
    b = filled(p, 1, ord("*"))
    ksm_merge_pages(m, p, a, 1)
    ksm_merge_pages(m, p, b, 1)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (1, 1)


# ---- ksm_functional_tests.c (2 MiB ranges)

RANGE_PAGES = 512


def mmap_and_merge_range(Machine: type, byte: int) -> tuple[Any, Any, int]:
    """__mmap_and_merge_range(): run=2, map and fill 2 MiB, MADV_MERGEABLE, +2 scans."""
    m = Machine()
    m.ksm.run = 2
    m.ksm.pages_to_scan = 2000
    p = m.spawn()
    assert p.ksm_stat()["ksm_merging_pages"] == 0
    addr = filled(p, RANGE_PAGES, byte)
    ksm_merge_pages(m, p, addr, RANGE_PAGES)
    if byte:
        assert p.ksm_stat()["ksm_merging_pages"] > 0, "No pages got merged"
    return m, p, addr


def range_maps_duplicates(p: Any, addr: int, npages: int) -> bool:
    pfns = [p.pfn(addr + i * PAGE_SIZE) for i in range(npages)]
    present = [f for f in pfns if f is not None]
    return len(set(present)) != len(present)


def test_functional_unmerge(Machine: type) -> None:
    m, p, addr = mmap_and_merge_range(Machine, 0xCF)
    assert range_maps_duplicates(p, addr, RANGE_PAGES)
    p.madvise(addr, RANGE_PAGES * PAGE_SIZE, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, addr, RANGE_PAGES)
    m.check_invariants()


def test_functional_unmerge_zero_pages(Machine: type) -> None:
    m = Machine()
    m.ksm.run = 2
    m.ksm.use_zero_pages = 1
    m.ksm.pages_to_scan = 2000
    p = m.spawn()
    addr = filled(p, RANGE_PAGES, 0)
    ksm_merge_pages(m, p, addr, RANGE_PAGES)
    assert p.ksm_stat()["ksm_zero_pages"] == RANGE_PAGES
    half = RANGE_PAGES // 2
    p.madvise(addr, half * PAGE_SIZE, MADV_UNMERGEABLE)
    assert p.ksm_stat()["ksm_zero_pages"] == half
    for i in range(half, RANGE_PAGES):
        p.write(addr + i * PAGE_SIZE, (i).to_bytes(4, "little"))
    assert p.ksm_stat()["ksm_zero_pages"] == 0
    assert m.ksm.ksm_zero_pages == 0
    assert not range_maps_duplicates(p, addr, RANGE_PAGES)
    m.check_invariants()


def test_functional_unmerge_discarded(Machine: type) -> None:
    """test_unmerge_discarded with munmap for MADV_DONTNEED: unmerge copes with holes."""
    m, p, addr = mmap_and_merge_range(Machine, 0xCF)
    half = RANGE_PAGES // 2
    p.munmap(addr, half * PAGE_SIZE)
    p.madvise(addr + half * PAGE_SIZE, half * PAGE_SIZE, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, addr + half * PAGE_SIZE, half)
    m.check_invariants()


def test_functional_fork_ksm_merging_page_count(Machine: type) -> None:
    """The child of a process with merged pages starts with ksm_merging_pages 0."""
    m, p, addr = mmap_and_merge_range(Machine, 0xCF)
    child = p.fork()
    assert child.ksm_stat()["ksm_merging_pages"] == 0
    assert child.ksm_stat()["ksm_rmap_items"] == 0
    assert p.ksm_stat()["ksm_merging_pages"] == RANGE_PAGES
    m.check_invariants()


def test_fork_joins_existing_stable_node(Machine: type) -> None:
    """Will Huck's question in the seed thread: a forked child's KSM pages join the
    existing stable node when ksmd reaches the child; no new KSM page appears."""
    m, p, addr = mmap_and_merge_range(Machine, 0xCF)
    before = m.ksm.stats()
    child = p.fork()
    m.ksm.scan(full_scans=2)
    after = m.ksm.stats()
    # 512 copies at max_page_sharing 256: two KSM pages (a chain of two dups)
    assert (before["pages_shared"], before["pages_sharing"]) == expected_ksm_pages_count(512, 256)
    assert after["pages_shared"] == before["pages_shared"]
    assert after["stable_node_dups"] == before["stable_node_dups"] == 2
    assert after["pages_sharing"] == before["pages_sharing"] + RANGE_PAGES
    assert child.ksm_stat()["ksm_merging_pages"] == RANGE_PAGES
    assert child.pfn(addr) == p.pfn(addr)
    m.check_invariants()


# ---- LTP ksm01: three processes, four phases of contents

def test_ltp_ksm01_phases(Machine: type) -> None:
    """LTP ksm01 (create_same_memory), scaled to 4 MiB per child in 1 MiB units."""
    size_pages, unit_pages, nproc = 1024, 256, 3
    total = size_pages * nproc
    m = Machine()
    m.ksm.run = 2
    m.ksm.max_page_sharing = total
    m.ksm.run = 1
    m.ksm.pages_to_scan = total
    m.ksm.sleep_millisecs = 0
    m.ksm.smart_scan = 0
    procs = [m.spawn() for _ in range(nproc)]
    units: list[list[int]] = []
    for p in procs:
        addrs = [p.mmap(unit_pages) for _ in range(size_pages // unit_pages)]
        for a in addrs:
            p.madvise(a, unit_pages * PAGE_SIZE, MADV_MERGEABLE)
        units.append(addrs)

    def set_contents(i: int, byte: int) -> None:
        for a in units[i]:
            procs[i].fill(a, np.full((unit_pages, PAGE_SIZE), byte, np.uint8))

    def check(shared: int, sharing: int, volatile: int, unshared: int) -> None:
        m.ksm.scan(full_scans=3)  # wait_ksmd_full_scan()
        m.ksm.run = 0
        s = m.ksm.stats()
        got = (s["pages_shared"], s["pages_sharing"], s["pages_volatile"], s["pages_unshared"])
        assert got == (shared, sharing, volatile, unshared)
        m.check_invariants()
        m.ksm.run = 1

    for i, c in enumerate(b"caa"):
        set_contents(i, c)
    check(2, total - 2, 0, 0)
    set_contents(1, ord("b"))
    check(3, total - 3, 0, 0)
    for i in range(nproc):
        set_contents(i, ord("d"))
    check(1, total - 1, 0, 0)
    procs[1].write(units[1][-1] + unit_pages * PAGE_SIZE - 1, b"e")
    check(1, total - 2, 0, 1)
    m.ksm.run = 2
    s = m.ksm.stats()
    assert (s["pages_shared"], s["pages_sharing"], s["pages_volatile"], s["pages_unshared"]) == (
        0, 0, 0, 0)
    m.ksm.run = 0
    m.check_invariants()
