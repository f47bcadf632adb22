"""prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE), fork and exec (kernel/sys.c,
ksm_enable_merge_any, ksm_disable_merge_any, ksm_vma_flags, ksm_fork, ksm_execve of
6.18), on both implementations."""

from __future__ import annotations

import errno
from typing import Any

import numpy as np
import pytest

from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE
from ksmcore.errors import KsmdNotRunning

P = PAGE_SIZE


def filled(p: Any, n: int, byte: int) -> int:
    a = p.mmap(n)
    p.fill(a, np.full((n, P), byte, np.uint8))
    return a


def shares(p: Any, a: int, n: int) -> bool:
    pfns = [p.pfn(a + i * P) for i in range(n)]
    present = [f for f in pfns if f]
    return len(set(present)) < len(present)


def test_set_and_get(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    assert p.prctl_get_memory_merge() == 0
    p.prctl_set_memory_merge(1)
    assert p.prctl_get_memory_merge() == 1
    p.prctl_set_memory_merge(7)  # any non-zero value; already set: nothing happens
    assert p.prctl_get_memory_merge() == 1
    p.prctl_set_memory_merge(0)
    assert p.prctl_get_memory_merge() == 0
    assert p.ksm_stat()["ksm_merge_any"] is False


@pytest.mark.parametrize("call", [
    lambda p: p.prctl_set_memory_merge(1, 1),
    lambda p: p.prctl_set_memory_merge(1, 0, 0, 1),
    lambda p: p.prctl_set_memory_merge(0, 0, 2, 0),
    lambda p: p.prctl_get_memory_merge(1),
    lambda p: p.prctl_get_memory_merge(0, 0, 0, 1),
])
def test_unused_arguments_must_be_zero(Machine: type, call: Any) -> None:
    m = Machine()
    p = m.spawn()
    a = filled(p, 2, 3)
    with pytest.raises(OSError) as e:
        call(p)
    assert e.value.errno == errno.EINVAL
    assert p.prctl_get_memory_merge() == 0 and p.maps() == [(a, a + 2 * P, False)]
    with pytest.raises(TypeError):
        p.prctl_set_memory_merge("1")
    p.exit()
    with pytest.raises(ProcessLookupError):
        p.prctl_get_memory_merge()


def test_merge_any_marks_present_and_future_vmas(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = filled(p, 4, 0xCF)
    p.prctl_set_memory_merge(1)
    b = filled(p, 4, 0xCF)  # mapped after: VM_MERGEABLE from its creation
    c = p.mmap_image(np.full((2, P), 0xCF, np.uint8))
    assert [mergeable for _, _, mergeable in p.maps()] == [True, True, True]
    stat = p.ksm_stat()
    assert stat["ksm_merge_any"] is True and stat["ksm_mergeable"] is True
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert p.pfn(a) == p.pfn(b) == p.pfn(c + P)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (1, 9)
    m.check_invariants()


def test_disabling_unmerges_every_mergeable_vma(Machine: type) -> None:
    """ksm_disable_merge_any(): madvised VMAs are unmerged and cleared too; the mm stays
    registered until ksmd finds nothing mergeable; the counters are lazy."""
    m = Machine()
    p = m.spawn()
    a = filled(p, 4, 0xCF)
    p.madvise(a, 4 * P, MADV_MERGEABLE)
    p.prctl_set_memory_merge(1)
    b = filled(p, 4, 0xCF)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert shares(p, a, 4) and p.ksm_stat()["ksm_merging_pages"] == 8
    p.prctl_set_memory_merge(0)
    assert not shares(p, a, 4) and not shares(p, b, 4) and p.pfn(a) != p.pfn(b)
    assert [mergeable for _, _, mergeable in p.maps()] == [False, False]
    assert p.ksm_stat()["ksm_merging_pages"] == 8  # until ksmd passes
    m.ksm.scan(full_scans=1)
    stat = p.ksm_stat()
    assert (stat["ksm_merging_pages"], stat["ksm_rmap_items"]) == (0, 0)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (0, 0)
    m.check_invariants()


def test_disabling_without_merge_any_changes_nothing(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = filled(p, 2, 5)
    p.madvise(a, 2 * P, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    p.prctl_set_memory_merge(0)  # MERGE_ANY was never set: a no-op
    assert p.maps() == [(a, a + 2 * P, True)] and shares(p, a, 2)


def test_fork_inherits_merge_any_with_counters_at_zero(Machine: type) -> None:
    """test_prctl_fork and test_fork_ksm_merging_page_count together: the child is
    under MERGE_ANY, registered, its KSM counters start at 0, and it merges."""
    m = Machine()
    p = m.spawn()
    a = filled(p, 8, 0xCF)
    p.prctl_set_memory_merge(1)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    c = p.fork()
    assert c.prctl_get_memory_merge() == 1
    stat = c.ksm_stat()
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"]) == (0, 0)
    assert stat["ksm_merge_any"] and stat["ksm_mergeable"]
    d = filled(c, 4, 0x11)
    m.ksm.scan(full_scans=2)
    assert shares(c, d, 4) and c.pfn(a) == p.pfn(a)
    assert c.ksm_stat()["ksm_merging_pages"] == 8 + 4
    m.check_invariants()


def test_exec_keeps_merge_any_and_enters_the_new_mm(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = filled(p, 6, 0xCF)
    p.prctl_set_memory_merge(1)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    rmap_items = m.ksm.stats()["pages_volatile"] + m.ksm.pages_shared + m.ksm.pages_sharing
    assert rmap_items == 6
    with m.tracing() as events:
        p.exec()
    assert [e["event"] for e in events] == ["ksm_enter", "ksm_exit"]
    assert p.prctl_get_memory_merge() == 1 and p.maps() == []
    stat = p.ksm_stat()
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"]) == (0, 0)
    assert stat["ksm_mergeable"] is False
    b = filled(p, 4, 0x22)
    assert b == a  # a new address space starts at the same base
    m.ksm.scan(full_scans=2)  # the old mm's items go; the new mm's pages merge
    assert shares(p, b, 4) and p.ksm_stat()["ksm_merging_pages"] == 4
    assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (1, 3)
    m.check_invariants()


def test_exec_without_merge_any_leaves_the_new_mm_alone(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = filled(p, 2, 7)
    p.madvise(a, 2 * P, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    p.exec()
    filled(p, 2, 7)
    m.ksm.scan(full_scans=1)
    assert p.ksm_stat()["ksm_rmap_items"] == 0 and m.ksm.pages_shared == 0
    with pytest.raises(KsmdNotRunning):
        m.ksm.scan(full_scans=1)  # nothing is registered any more: ksmd sleeps
    m.check_invariants()


def test_merge_any_mm_reentered_after_ksmd_dropped_it(Machine: type) -> None:
    """6.18: ksmd drops a slot with no VM_MERGEABLE VMA but keeps MERGE_ANY, and
    ksm_vma_flags() enters the mm again at the next mmap."""
    m = Machine()
    p = m.spawn()
    p.prctl_set_memory_merge(1)  # registered, nothing mapped
    m.ksm.run = 1
    m.ksm.scan(full_scans=1)  # a whole pass finds no mergeable VMA: slot dropped
    assert m.ksm.do_scan(10) == 0  # nothing registered
    assert p.prctl_get_memory_merge() == 1
    with m.tracing() as events:
        a = filled(p, 3, 9)
    assert events == [{"event": "ksm_enter", "mm": p.pid}]
    m.ksm.scan(full_scans=2)
    assert shares(p, a, 3)
    m.check_invariants()


def test_enabling_a_registered_mm_does_not_enter_it_again(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = filled(p, 2, 1)
    p.madvise(a, P, MADV_MERGEABLE)  # only the first page
    with m.tracing() as events:
        p.prctl_set_memory_merge(1)
    assert events == []
    assert p.maps() == [(a, a + P, True), (a + P, a + 2 * P, True)]
