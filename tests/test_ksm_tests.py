"""tools/testing/selftests/mm/ksm_tests.c, ported: one test per mode, named after the
kernel function that mode runs, with the option defaults (-p 10, -l 120, -a rw,
-z 0, -m 1, -t 0) and run_vmtests.sh's invocations. Each runs on both implementations.

Global setup as main(): run=2, sleep_millisecs=0, merge_across_nodes=1 and
pages_to_scan=page_count (numa_available() is 0 here: libnuma is there). Waiting for
"2 full scans" busy-polls full_scans as ksm_do_scan() does, while ksmd runs on the
simulated clock (m.run_for); the -l time limit is simulated time too.

-H (ksm_merge_hugepages_time) maps its area with transparent huge pages (MADV_HUGEPAGE;
allocate_transhuge()'s MAP_FIXED remap of each 2 MiB is a fresh range in the model
anyway). The -a protection option has no effect to port (the model has no mprotect;
KSM merges any protection).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ksmcore.constants import MADV_HUGEPAGE, MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE
from ksmcore.thp import HPAGE_PMD_NR, HPAGE_PMD_SIZE

KSM_SCAN_LIMIT_SEC_DEFAULT = 120
KSM_PAGE_COUNT_DEFAULT = 10
KSM_MERGE_MADVISE, KSM_MERGE_PRCTL = 0, 1
MB = 1 << 20
POLL_S = 0.0005  # the busy-poll's reads of full_scans, in simulated time


class ScanTimeout(AssertionError):
    """ksm_do_scan(): "Scan time limit exceeded"."""


def setup_ksm(Machine: type, page_count: int = KSM_PAGE_COUNT_DEFAULT, nodes: int = 1) -> Any:
    m = Machine(nodes=nodes)
    m.ksm.run = 2
    m.ksm.sleep_millisecs = 0
    m.ksm.merge_across_nodes = 1
    m.ksm.pages_to_scan = page_count
    return m


def allocate_memory(p: Any, data: int, map_size: int, node: int | None = None) -> int:
    """mmap, memset(data); (mprotect to -a's protection: nothing to model)."""
    n = map_size // PAGE_SIZE
    addr = p.mmap(n, node=node)
    p.fill(addr, np.full((n, PAGE_SIZE), data, np.uint8))
    return addr


def ksm_do_scan(m: Any, scan_count: int, start_ns: int,
                timeout: int = KSM_SCAN_LIMIT_SEC_DEFAULT) -> None:
    init_scan = m.ksm.full_scans
    while m.ksm.full_scans < init_scan + scan_count:
        m.run_for(POLL_S)
        if (m.clock_ns - start_ns) // 1_000_000_000 > timeout:
            raise ScanTimeout("Scan time limit exceeded")


def ksm_merge_pages(m: Any, p: Any, merge_type: int, addr: int, size: int,
                    start_ns: int) -> None:
    if merge_type == KSM_MERGE_MADVISE:
        p.madvise(addr, size, MADV_MERGEABLE)
    else:
        p.prctl_set_memory_merge(1)
    m.ksm.run = 1
    # "Since merging occurs only after 2 scans, make sure to get at least 2 full scans"
    ksm_do_scan(m, 2, start_ns)


def assert_ksm_pages_count(m: Any, dupl_page_count: int) -> bool:
    max_page_sharing = m.ksm.max_page_sharing
    shared, sharing = m.ksm.pages_shared, m.ksm.pages_sharing
    if dupl_page_count % max_page_sharing in (0, 1):
        return (shared == dupl_page_count // max_page_sharing
                and sharing == shared * (max_page_sharing - 1))
    return shared == dupl_page_count // max_page_sharing + 1 and \
        sharing == dupl_page_count - shared


@pytest.mark.parametrize("merge_type", [KSM_MERGE_MADVISE, KSM_MERGE_PRCTL])
@pytest.mark.parametrize("page_count", [KSM_PAGE_COUNT_DEFAULT, 2, 255, 256, 257, 1000])
def test_check_ksm_merge(Machine: type, page_count: int, merge_type: int) -> None:
    """-M [-p N] [-t 0|1]: N pages of '*' merge as assert_ksm_pages_count(N) says."""
    m = setup_ksm(Machine, page_count)
    p = m.spawn()
    start = m.clock_ns
    addr = allocate_memory(p, ord("*"), PAGE_SIZE * page_count)
    ksm_merge_pages(m, p, merge_type, addr, PAGE_SIZE * page_count, start)
    assert assert_ksm_pages_count(m, page_count)
    p.munmap(addr, PAGE_SIZE * page_count)
    if merge_type == KSM_MERGE_PRCTL:
        p.prctl_set_memory_merge(0)
    m.check_invariants()


def test_check_ksm_unmerge(Machine: type) -> None:
    """-U: two merged pages; one byte changed in each; after one more scan none is
    merged."""
    m = setup_ksm(Machine)
    p = m.spawn()
    start = m.clock_ns
    page_count = 2
    addr = allocate_memory(p, ord("*"), PAGE_SIZE * page_count)
    ksm_merge_pages(m, p, KSM_MERGE_MADVISE, addr, PAGE_SIZE * page_count, start)
    p.write(addr, b"-")
    p.write(addr + PAGE_SIZE, b"+")
    ksm_do_scan(m, 1, start)
    assert assert_ksm_pages_count(m, 0)
    m.check_invariants()


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_check_ksm_zero_page_merge(Machine: type, use_zero_pages: int) -> None:
    """-Z -p 10 -z 0|1: zero pages merge like others, or with the zero page (0 / 0)."""
    page_count = KSM_PAGE_COUNT_DEFAULT
    m = setup_ksm(Machine, page_count)
    m.ksm.use_zero_pages = use_zero_pages
    p = m.spawn()
    start = m.clock_ns
    addr = allocate_memory(p, 0, PAGE_SIZE * page_count)
    ksm_merge_pages(m, p, KSM_MERGE_MADVISE, addr, PAGE_SIZE * page_count, start)
    assert assert_ksm_pages_count(m, 0 if use_zero_pages else page_count)
    assert m.ksm.ksm_zero_pages == (page_count if use_zero_pages else 0)
    m.check_invariants()


@pytest.mark.parametrize("merge_across_nodes", [1, 0])
def test_check_ksm_numa_merge(Machine: type, merge_across_nodes: int) -> None:
    """-N -m 1|0 (run_vmtests' ksm_numa): one page of '*' on each of two nodes, merged
    one after the other: 1 / 1 across nodes, 0 / 0 with a tree per node."""
    m = setup_ksm(Machine, nodes=2)
    m.ksm.merge_across_nodes = merge_across_nodes
    p = m.spawn()
    start = m.clock_ns
    numa1 = allocate_memory(p, ord("*"), PAGE_SIZE, node=0)  # numa_alloc_onnode
    numa2 = allocate_memory(p, ord("*"), PAGE_SIZE, node=1)
    ksm_merge_pages(m, p, KSM_MERGE_MADVISE, numa1, PAGE_SIZE, start)
    ksm_merge_pages(m, p, KSM_MERGE_MADVISE, numa2, PAGE_SIZE, start)
    assert assert_ksm_pages_count(m, 2 if merge_across_nodes else 0)
    m.check_invariants()


def test_ksm_merge_time(Machine: type) -> None:
    """-P -s 100: the time from madvise to two more full scans, pages_to_scan 10 and
    sleep 0 (on the simulated clock: 25,600 pages, 2,560 batches a scan). The kernel
    checks nothing but the time limit; the model also checks what merged."""
    size_mb = 100
    m = setup_ksm(Machine)
    p = m.spawn()
    map_size = size_mb * MB
    addr = allocate_memory(p, ord("*"), map_size)
    start = m.clock_ns
    ksm_merge_pages(m, p, KSM_MERGE_MADVISE, addr, map_size, start)
    scan_time_s = (m.clock_ns - start) / 1e9
    speed = size_mb / scan_time_s  # "Average speed: %.3f MiB/s"
    assert 0 < scan_time_s < KSM_SCAN_LIMIT_SEC_DEFAULT
    # 2 x 25,600 pages at cost_model.page_ns plus 2 x 2,561 batches at batch_ns
    cost = m.cost_model
    pages = 2 * map_size // PAGE_SIZE
    assert scan_time_s * 1e9 >= pages * cost.page_ns + 2 * (pages // 20) * cost.batch_ns
    assert speed > 100
    assert assert_ksm_pages_count(m, map_size // PAGE_SIZE)


def test_ksm_unmerge_time(Machine: type) -> None:
    """-D -s 4 (not in run_vmtests): merge (untimed), then MADV_UNMERGEABLE the whole
    area. MADV_UNMERGEABLE costs no simulated time in the model (only ksmd's work
    does), so what is checked is that every page is private again."""
    size_mb = 4
    m = setup_ksm(Machine)
    p = m.spawn()
    map_size = size_mb * MB
    addr = allocate_memory(p, ord("*"), map_size)
    start = m.clock_ns
    ksm_merge_pages(m, p, KSM_MERGE_MADVISE, addr, map_size, start)
    p.madvise(addr, map_size, MADV_UNMERGEABLE)
    pfns = [p.pfn(addr + i * PAGE_SIZE) for i in range(map_size // PAGE_SIZE)]
    assert len(set(pfns)) == len(pfns)


def test_ksm_cow_time(Machine: type) -> None:
    """-C: 4000 pages of '*'; a write to each even page (not merged); then 2000 pairs
    of equal pages (i/2+1 bytes of '+'), merged; then a write to the first page of
    each pair breaks COW. The kernel times the writes and checks nothing else; the
    model checks the pairs merged and the COW breaks left each page private."""
    page_count = 4000
    m = setup_ksm(Machine)
    p = m.spawn()
    addr = allocate_memory(p, ord("*"), PAGE_SIZE * page_count)
    for i in range(0, page_count - 1, 2):
        p.write(addr + PAGE_SIZE * i, b"-")
    for i in range(0, page_count - 1, 2):
        p.write(addr + PAGE_SIZE * i, b"+" * (i // 2 + 1))
        p.write(addr + PAGE_SIZE * (i + 1), b"+" * (i // 2 + 1))
    start = m.clock_ns
    ksm_merge_pages(m, p, KSM_MERGE_MADVISE, addr, PAGE_SIZE * page_count, start)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (2000, 2000)
    for i in range(0, page_count - 1, 2):
        p.write(addr + PAGE_SIZE * i, b"-")
    pfns = [p.pfn(addr + PAGE_SIZE * i) for i in range(page_count)]
    assert len(set(pfns)) == page_count
    m.check_invariants()


def allocate_transhuge(p: Any, ptr: int) -> bool:
    """vm_util's allocate_transhuge(): MADV_HUGEPAGE on the 2 MiB at ptr and one store
    to it; True if a huge page now backs it (the store mapped all 512 subpages)."""
    p.madvise(ptr, HPAGE_PMD_SIZE, MADV_HUGEPAGE)
    p.write(ptr, ptr.to_bytes(8, "little"))
    return all(p.pfn(ptr + k * PAGE_SIZE) is not None for k in range(HPAGE_PMD_NR))


def test_ksm_merge_hugepages_time(Machine: type) -> None:
    """-H -s 100 (run_vmtests): mmap len + 2 MiB, align, MADV_HUGEPAGE, a huge page per
    2 MiB (allocate_transhuge), memset '*', then merge and time two full scans. The
    kernel prints the counts and the time; the model checks what the scans did: every
    huge page is split (a merge splits the huge page of the page it merges), none had
    a zero-filled subpage, and every page merged but at most one: the second subpage
    of the first huge page met the first in the unstable tree while both were subpages
    of one huge page, which split_huge_page() refuses (ksmd holds both), so
    cmp_and_merge_page() split it without merging; it merges in the third scan, whose
    first batches run before the busy-poll sees the second one end."""
    size_mb = 100
    m = setup_ksm(Machine)
    p = m.spawn()
    map_size = size_mb * MB
    length = map_size - map_size % HPAGE_PMD_SIZE
    orig = p.mmap((length + HPAGE_PMD_SIZE) // PAGE_SIZE)
    ptr = orig + HPAGE_PMD_SIZE - orig % HPAGE_PMD_SIZE
    p.madvise(ptr, length, MADV_HUGEPAGE)
    huge = sum(allocate_transhuge(p, a) for a in range(ptr, ptr + length, HPAGE_PMD_SIZE))
    normal = length // HPAGE_PMD_SIZE - huge
    assert (huge, normal) == (50, 0)  # "Number of huge pages: 50"
    p.fill(ptr, np.full((length // PAGE_SIZE, PAGE_SIZE), ord("*"), np.uint8))
    start = m.clock_ns
    ksm_merge_pages(m, p, KSM_MERGE_MADVISE, ptr, map_size, start)
    scan_time_s = (m.clock_ns - start) / 1e9
    assert 0 < scan_time_s < KSM_SCAN_LIMIT_SEC_DEFAULT
    n = length // PAGE_SIZE
    stats = m.ksm.stats()
    assert m.thp_splits == huge
    assert m.thp_split_zero_pages == 0
    merged = stats["pages_shared"] + stats["pages_sharing"]
    assert merged in (n - 1, n) and stats["pages_volatile"] == n - merged
    assert stats["pages_unshared"] == 0
    p.munmap(orig, length + HPAGE_PMD_SIZE)
    m.check_invariants()
