"""tools/testing/selftests/mm/ksm_functional_tests.c, ported: every test that applies to
the model, named as in the kernel, with its helpers (__mmap_and_merge_range,
range_maps_duplicates, vm_util.c's ksm_start/ksm_stop). Each runs on both
implementations. The test binary is one process ("self"); children are forks, and the
fork+exec child of test_prctl_fork_exec is an exec in the forked child.

Ranges are 2 MiB (512 pages) as in the kernel. ksm_start() writes run=1 and busy-polls
full_scans until it grew by two, while ksmd runs on the simulated clock (m.run_for).

Not ported: test_unmerge_uffd_wp (the model has no userfaultfd). Adapted:
test_prot_none: the model has no page protections, so the PROT_NONE area is an
ordinary one and the writes through /proc/self/mem (FOLL_FORCE) are ordinary writes,
which break COW the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ksmcore.constants import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE

MiB = 1 << 20
KSM_MERGE_PRCTL, KSM_MERGE_MADVISE, KSM_MERGE_NONE = 0, 1, 2
pagesize = PAGE_SIZE


def ksm_stop(m: Any) -> None:
    m.ksm.run = 2


def ksm_start(m: Any) -> None:
    """vm_util.c ksm_start(): run=1, then wait for two full scans."""
    start_scans = m.ksm.full_scans
    m.ksm.run = 1
    while m.ksm.full_scans < start_scans + 2:
        m.run_for(0.001)


def ksm_get_self_merging_pages(p: Any) -> int:
    return int(p.ksm_stat()["ksm_merging_pages"])


def ksm_get_self_zero_pages(p: Any) -> int:
    return int(p.ksm_stat()["ksm_zero_pages"])


def range_maps_duplicates(p: Any, addr: int, size: int) -> bool:
    """No two present pages of the range map the same pfn (the zero page, pfn 0, is
    skipped as the kernel test skips PFNs it cannot see)."""
    pfns = [p.pfn(addr + offs) for offs in range(0, size, pagesize)]
    present = [pfn for pfn in pfns if pfn]
    return len(set(present)) != len(present)


def __mmap_and_merge_range(m: Any, p: Any, val: int, size: int, mode: int) -> int:
    ksm_stop(m)  # stabilize accounting by disabling KSM completely
    assert ksm_get_self_merging_pages(p) == 0, "Still pages merged"
    npages = size // pagesize
    addr = p.mmap(npages)
    p.fill(addr, np.full((npages, pagesize), val, np.uint8))  # memset(map, val, size)
    if mode == KSM_MERGE_PRCTL:
        p.prctl_set_memory_merge(1)
    elif mode == KSM_MERGE_MADVISE:
        p.madvise(addr, size, MADV_MERGEABLE)
    ksm_start(m)
    # zero pages are accounted differently (depending on kernel support)
    if val:
        assert ksm_get_self_merging_pages(p) > 0, "No pages got merged"
    return addr


def test_unmerge(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    size = 2 * MiB
    addr = __mmap_and_merge_range(m, p, 0xCF, size, KSM_MERGE_MADVISE)
    assert range_maps_duplicates(p, addr, size)
    p.madvise(addr, size, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, addr, size), "Pages were unmerged"
    ksm_stop(m)
    m.check_invariants()


def test_unmerge_zero_pages(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    size = 2 * MiB
    m.ksm.use_zero_pages = 1  # ksm_use_zero_pages()
    addr = __mmap_and_merge_range(m, p, 0x00, size, KSM_MERGE_MADVISE)
    pages_expected = size // pagesize
    assert ksm_get_self_zero_pages(p) == pages_expected == 512  # after merging
    p.madvise(addr, size // 2, MADV_UNMERGEABLE)
    pages_expected //= 2
    assert ksm_get_self_zero_pages(p) == pages_expected == 256  # after unmerging
    for offs in range(size // 2, size, pagesize):
        p.write(addr + offs, offs.to_bytes(4, "little"))  # *(unsigned int *) = offs
    assert ksm_get_self_zero_pages(p) == 0  # after write faults
    assert m.ksm.ksm_zero_pages == 0
    assert not range_maps_duplicates(p, addr, size), "KSM zero pages were unmerged"
    ksm_stop(m)
    m.check_invariants()


def test_unmerge_discarded(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    size = 2 * MiB
    addr = __mmap_and_merge_range(m, p, 0xCF, size, KSM_MERGE_MADVISE)
    p.madvise(addr, size // 2, MADV_DONTNEED)  # pte_none() entries in the first half
    p.madvise(addr, size, MADV_UNMERGEABLE)
    assert not range_maps_duplicates(p, addr, size), "Pages were unmerged"
    ksm_stop(m)
    m.check_invariants()


def test_prot_none(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    size = 2 * MiB
    addr = __mmap_and_merge_range(m, p, 0x11, size, KSM_MERGE_MADVISE)
    for i in range(0, size // 2, pagesize):  # a unique value in each page of one half
        p.write(addr + i, i.to_bytes(4, "little"))
    p.madvise(addr + size // 2, size // 2, MADV_UNMERGEABLE)  # unshare the other half
    assert not range_maps_duplicates(p, addr, size), "Pages were unmerged"
    ksm_stop(m)
    m.check_invariants()


def test_prctl(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    p.prctl_set_memory_merge(1)
    assert p.prctl_get_memory_merge() == 1, "PR_SET_MEMORY_MERGE=1 not effective"
    p.prctl_set_memory_merge(0)
    assert p.prctl_get_memory_merge() == 0, "PR_SET_MEMORY_MERGE=0 not effective"


def child_ksm(m: Any, child: Any) -> int:
    """The kernel's test_child_ksm(), run in the child: 0 on success, 1 if the flag is
    not set, 2 if nothing merged."""
    if child.prctl_get_memory_merge() != 1:
        return 1
    size = 2 * MiB
    try:
        addr = __mmap_and_merge_range(m, child, 0xCF, size, KSM_MERGE_NONE)
    except AssertionError:
        return 2
    ksm_stop(m)
    child.munmap(addr, size)
    return 0


def test_prctl_fork(Machine: type) -> None:
    """PR_SET_MEMORY_MERGE is inherited, and merging works in the child."""
    m = Machine()
    p = m.spawn()
    p.prctl_set_memory_merge(1)
    child = p.fork()
    ksm_stop(m)  # the child's init_global_file_handles()
    status = child_ksm(m, child)
    child.exit()
    assert status == 0
    p.prctl_set_memory_merge(0)
    m.check_invariants()


def test_prctl_fork_exec(Machine: type) -> None:
    """The flag survives fork and exec (MMF_VM_MERGE_ANY is in MMF_INIT_MASK), with
    the 2025 patch's frequency: pages_to_scan 2000, sleep 0 while it runs."""
    m = Machine()
    p = m.spawn()
    m.ksm.run = 1  # start_ksmd_and_set_frequency("2000", "0")
    m.ksm.pages_to_scan = 2000
    m.ksm.sleep_millisecs = 0
    p.prctl_set_memory_merge(1)
    child = p.fork()
    child.exec()  # execv("./ksm_functional_tests", {..., "ksm_fork_exec_child"})
    ksm_stop(m)
    status = child_ksm(m, child)
    child.exit()
    assert status == 0
    p.prctl_set_memory_merge(0)
    m.ksm.run = 2  # stop_ksmd_and_restore_frequency()
    m.ksm.pages_to_scan = 100
    m.ksm.sleep_millisecs = 20
    m.check_invariants()


def test_prctl_unmerge(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    size = 2 * MiB
    addr = __mmap_and_merge_range(m, p, 0xCF, size, KSM_MERGE_PRCTL)
    p.prctl_set_memory_merge(0)
    assert not range_maps_duplicates(p, addr, size), "Pages were unmerged"
    ksm_stop(m)
    m.check_invariants()


def test_fork_ksm_merging_page_count(Machine: type) -> None:
    """ksm_merging_pages is not inherited after fork (the child exits with its own)."""
    m = Machine()
    p = m.spawn()
    size = 2 * MiB
    __mmap_and_merge_range(m, p, 0xCF, size, KSM_MERGE_MADVISE)
    child = p.fork()
    status = ksm_get_self_merging_pages(child)
    child.exit()
    assert status == 0, f"ksm_merging_page in child: {status}"
    ksm_stop(m)
    m.check_invariants()
