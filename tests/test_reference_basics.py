"""Small scenarios, each run on both implementations (the shared ``Machine`` fixture)."""

from __future__ import annotations

import errno
import random
from typing import Any

import numpy as np
import pytest

from ksmcore.constants import (
    FIRST_PID,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MMAP_BASE,
    PAGE_SIZE,
    SYSFS_FILES,
    ZERO_PFN,
)
from ksmcore.errors import KsmdNotRunning

P = PAGE_SIZE


def page(byte: int) -> bytes:
    return bytes([byte]) * P


def mergeable_area(m: Any, p: Any, contents: list[bytes], node: int | None = None) -> int:
    addr = p.mmap(len(contents), node=node)
    for i, c in enumerate(contents):
        p.write(addr + i * P, c)
    p.madvise(addr, len(contents) * P, MADV_MERGEABLE)
    m.check_invariants()
    return addr


def stats(m: Any, *names: str) -> tuple[int | str, ...]:
    s = m.ksm.stats()
    return tuple(s[n] for n in names)


def pfns(p: Any, addr: int, n: int) -> list[int | None]:
    return [p.pfn(addr + i * P) for i in range(n)]


# ---- merging ---------------------------------------------------------------------------


def test_ten_identical_pages_merge_into_one(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    assert p.pid == FIRST_PID
    a = p.mmap(10)
    assert a == MMAP_BASE
    p.fill(a, np.full((10, P), 0x5A, dtype=np.uint8))
    p.madvise(a, 10 * P, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=1)
    m.check_invariants()
    # The first visit only records checksums: nothing merges, all items volatile.
    assert stats(m, "pages_shared", "pages_sharing", "pages_volatile", "full_scans") == (
        0, 0, 10, 1)
    assert len(set(pfns(p, a, 10))) == 10
    m.ksm.scan(full_scans=1)
    m.check_invariants()
    assert stats(m, "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "full_scans", "pages_scanned") == (1, 9, 0, 0, 2, 20)
    assert len(set(pfns(p, a, 10))) == 1
    assert p.read(a + 5 * P, P) == page(0x5A)
    st = p.ksm_stat()
    assert st["ksm_rmap_items"] == 10 and st["ksm_merging_pages"] == 10
    assert st["ksm_process_profit"] == 10 * P - 10 * 64
    assert st["ksm_mergeable"] is True and st["ksm_merge_any"] is False
    assert m.ksm.general_profit == 9 * P - 10 * 64


def test_two_processes_share_one_ksm_page(Machine: type) -> None:
    m = Machine()
    p, q = m.spawn(), m.spawn()
    a = mergeable_area(m, p, [page(1), page(2), page(3)])
    b = mergeable_area(m, q, [page(3), page(1), page(9)])
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    m.check_invariants()
    assert p.pfn(a) == q.pfn(b + P)
    assert p.pfn(a + 2 * P) == q.pfn(b)
    assert p.pfn(a + P) != q.pfn(b + 2 * P)
    # two KSM pages, each with two mappings; two unique pages sit in the unstable tree
    assert stats(m, "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile") == (
        2, 2, 2, 0)
    assert p.ksm_stat()["ksm_merging_pages"] == 2
    assert q.ksm_stat()["ksm_merging_pages"] == 2


def test_scanned_page_survives_two_page_merge(Machine: type) -> None:
    m = Machine()
    p, q = m.spawn(), m.spawn()
    a = mergeable_area(m, p, [page(7)])
    b = mergeable_area(m, q, [page(7)])
    m.ksm.run = 1
    m.ksm.scan(full_scans=1)
    q_frame = q.pfn(b)
    m.ksm.scan(full_scans=1)
    # p's item went into the unstable tree; q's page, scanned next, became the KSM page.
    assert p.pfn(a) == q.pfn(b) == q_frame
    m.check_invariants()


def test_cow_after_merge_is_lazy(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = mergeable_area(m, p, [page(4)] * 4)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    kpfn = p.pfn(a)
    p.write(a + P + 10, b"hello")
    m.check_invariants()
    assert p.pfn(a + P) != kpfn and p.pfn(a) == kpfn
    assert p.read(a + P, P) == page(4)[:10] + b"hello" + page(4)[15:]
    assert p.read(a, P) == page(4)
    # Counters fall only when ksmd passes the address.
    assert stats(m, "pages_shared", "pages_sharing") == (1, 3)
    assert p.ksm_stat()["ksm_merging_pages"] == 4
    m.ksm.scan(full_scans=1)
    m.check_invariants()
    assert stats(m, "pages_shared", "pages_sharing", "pages_volatile") == (1, 2, 1)
    assert p.ksm_stat()["ksm_merging_pages"] == 3


def test_write_of_same_bytes_still_copies_a_ksm_page(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = mergeable_area(m, p, [page(4)] * 2)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    kpfn = p.pfn(a)
    p.write(a, b"\x04")
    assert p.pfn(a) != kpfn
    # An unchanged private copy re-merges on the very next visit (old checksum kept).
    m.ksm.scan(full_scans=1)
    assert p.pfn(a) == kpfn
    assert stats(m, "pages_shared", "pages_sharing") == (1, 1)
    m.check_invariants()


def test_run_2_unmerges_everything_and_resets_full_scans(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = mergeable_area(m, p, [page(4)] * 6 + [page(5)])
    m.ksm.run = 1
    m.ksm.scan(full_scans=3)
    assert stats(m, "pages_shared", "pages_sharing", "full_scans") == (1, 5, 3)
    m.ksm.run = 2
    m.check_invariants()
    assert len(set(pfns(p, a, 7))) == 7
    assert [p.read(a + i * P, P) for i in range(7)] == [page(4)] * 6 + [page(5)]
    s = m.ksm.stats()
    assert (s["pages_shared"], s["pages_sharing"], s["pages_unshared"], s["pages_volatile"],
            s["full_scans"], s["run"]) == (0, 0, 0, 0, 0, 2)
    assert p.ksm_stat()["ksm_rmap_items"] == 0
    assert s["pages_scanned"] == 21  # never reset
    with pytest.raises(KsmdNotRunning):
        m.ksm.scan()
    assert m.ksm.do_scan(100) == 0
    # The slot stayed registered: merging resumes from scratch.
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert stats(m, "pages_shared", "pages_sharing", "full_scans") == (1, 5, 2)
    m.check_invariants()


def test_fork_joins_the_existing_stable_node(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = mergeable_area(m, p, [page(8)] * 5)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    kpfn = p.pfn(a)
    child = p.fork()
    m.check_invariants()
    assert pfns(child, a, 5) == [kpfn] * 5
    assert child.ksm_stat()["ksm_rmap_items"] == 0
    assert child.maps() == p.maps()
    m.ksm.scan(full_scans=1)
    m.check_invariants()
    # No new KSM page: the child's items join the node ("KSM page forked").
    assert stats(m, "pages_shared", "pages_sharing") == (1, 9)
    assert child.ksm_stat()["ksm_merging_pages"] == 5
    assert pfns(child, a, 5) == [kpfn] * 5


def test_fork_of_unmerged_pages_never_pairs_them(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = mergeable_area(m, p, [page(3)])
    child = p.fork()
    m.ksm.run = 1
    m.ksm.scan(full_scans=3)
    m.check_invariants()
    # The COW-shared frame is the same page in both: the tp == page rule.
    assert p.pfn(a) == child.pfn(a)
    assert stats(m, "pages_shared", "pages_sharing") == (0, 0)


def test_unshared_volatile_and_round_boundaries(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = mergeable_area(m, p, [page(i) for i in range(1, 6)])
    m.ksm.smart_scan = 0
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert stats(m, "pages_unshared", "pages_volatile") == (5, 0)
    # A changed page leaves the unstable tree on its next visit: volatile.
    p.write(a, page(99))
    m.ksm.scan(full_scans=1)
    assert stats(m, "pages_unshared", "pages_volatile") == (4, 1)
    m.check_invariants()
    # Between rounds the four items keep UNSTABLE_FLAG (the tree is dead, the
    # counter lazy); the changed page's checksum held, so it goes back in.
    m.ksm.do_scan(1)
    assert stats(m, "pages_unshared", "pages_volatile") == (5, 0)
    m.check_invariants()
    # munmap: the items stay until ksmd passes.
    p.munmap(a + 3 * P, 2 * P)
    assert p.ksm_stat()["ksm_rmap_items"] == 5
    assert m.ksm.pages_unshared == 5
    m.check_invariants()
    m.ksm.scan(full_scans=1)
    assert p.ksm_stat()["ksm_rmap_items"] == 3
    assert stats(m, "pages_unshared", "pages_volatile") == (3, 0)
    m.check_invariants()


def test_smart_scan_skip_pattern(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    mergeable_area(m, p, [page(1)])
    m.ksm.run = 1
    skipped, scanned = [], []
    for _ in range(14):
        m.ksm.scan(full_scans=1)
        skipped.append(m.ksm.pages_skipped)
        scanned.append(m.ksm.pages_scanned)
        m.check_invariants()
    # Visits 1-4 processed, 5 skipped, 6 processed, 7-8 skipped, 9 processed, 10-13 skipped.
    assert skipped == [0, 0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 7, 7]
    assert scanned == [1, 2, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6, 7]
    # A skipped page leaves the unstable tree: volatile.
    assert stats(m, "pages_unshared", "pages_volatile") == (1, 0)
    m.ksm.scan(full_scans=1)
    assert stats(m, "pages_unshared", "pages_volatile") == (0, 1)


def test_batches_end_at_the_round_boundary(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    mergeable_area(m, p, [page(i) for i in range(1, 8)])
    assert m.ksm.do_scan(5) == 0  # run is 0
    m.ksm.run = 1
    assert m.ksm.do_scan(5) == 5
    assert m.ksm.do_scan(5) == 2  # the round ends: the rest of the batch is dropped
    assert m.ksm.full_scans == 1
    assert m.ksm.do_scan(3) == 3
    assert m.ksm.pages_scanned == 10
    m.ksm.pages_to_scan = 0
    with pytest.raises(KsmdNotRunning):
        m.ksm.scan()
    m.check_invariants()


def test_new_mm_is_scanned_last(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    mergeable_area(m, p, [page(1), page(2)])
    m.ksm.run = 1
    assert m.ksm.do_scan(1) == 1  # the cursor is now on p's slot
    q = m.spawn()
    mergeable_area(m, q, [page(3)])  # inserted just behind the cursor
    assert m.ksm.do_scan(10) == 1  # the round ends after p; q waits for the next one
    assert q.ksm_stat()["ksm_rmap_items"] == 0
    assert m.ksm.do_scan(10) == 3
    assert q.ksm_stat()["ksm_rmap_items"] == 1
    m.check_invariants()


def test_slot_dropped_when_nothing_is_mergeable(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = mergeable_area(m, p, [page(1), page(1)])
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    p.madvise(a, 2 * P, MADV_UNMERGEABLE)
    assert p.pfn(a) != p.pfn(a + P)  # break_ksm unshared them at once
    assert p.maps() == [(a, a + 2 * P, False)]
    m.check_invariants()
    assert stats(m, "pages_shared", "pages_sharing") == (1, 1)  # lazy
    m.ksm.scan(full_scans=1)
    assert stats(m, "pages_shared", "pages_sharing") == (0, 0)
    assert p.ksm_stat()["ksm_rmap_items"] == 0
    # The slot was dropped: ksmd has nothing to do.
    with pytest.raises(KsmdNotRunning):
        m.ksm.scan()
    m.check_invariants()


def test_exit_frees_items_through_ksmd(Machine: type) -> None:
    m = Machine()
    p, q = m.spawn(), m.spawn()
    mergeable_area(m, p, [page(2)] * 3)
    b = mergeable_area(m, q, [page(2)] * 3)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert stats(m, "pages_shared", "pages_sharing") == (1, 5)
    p.exit()
    assert m.processes == [q] and p.exited
    with pytest.raises(ProcessLookupError):
        p.read(b, 1)
    m.check_invariants()
    assert m.ksm.pages_sharing == 5  # lazy until ksmd reaches the exiting mm
    m.ksm.scan(full_scans=1)
    assert stats(m, "pages_shared", "pages_sharing", "pages_volatile") == (1, 2, 0)
    assert m.ksm.stats()["general_profit"] == 2 * P - 3 * 64
    m.check_invariants()


# ---- zero pages, chains, odd paths ---------------------------------------------------


def test_use_zero_pages(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = mergeable_area(m, p, [bytes(P)] * 3 + [page(1)])
    m.ksm.use_zero_pages = True
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    m.check_invariants()
    assert pfns(p, a, 3) == [ZERO_PFN] * 3
    assert stats(m, "ksm_zero_pages", "pages_shared", "pages_volatile") == (3, 0, 3)
    m.ksm.scan(full_scans=1)  # zero PTEs are invisible to the scan: items freed
    assert p.ksm_stat()["ksm_rmap_items"] == 1
    assert p.ksm_stat()["ksm_zero_pages"] == 3
    child = p.fork()
    assert child.ksm_stat()["ksm_zero_pages"] == 3 and m.ksm.ksm_zero_pages == 6
    p.write(a, b"x")  # a write to a KSM zero PTE gets a new frame
    assert p.pfn(a) not in (None, ZERO_PFN)
    assert p.ksm_stat()["ksm_zero_pages"] == 2 and m.ksm.ksm_zero_pages == 5
    child.munmap(a, 2 * P)
    assert m.ksm.ksm_zero_pages == 3
    p.madvise(a, 4 * P, MADV_UNMERGEABLE)
    assert m.ksm.ksm_zero_pages == 1 and child.pfn(a + 2 * P) == ZERO_PFN
    m.check_invariants()


def test_max_page_sharing_builds_a_chain_of_dups(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    m.ksm.max_page_sharing = 2
    a = mergeable_area(m, p, [page(6)] * 4)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    m.check_invariants()
    assert stats(m, "pages_shared", "pages_sharing", "stable_node_chains",
                 "stable_node_dups") == (2, 2, 1, 2)
    assert len(set(pfns(p, a, 4))) == 2
    # Free one dup's page: the chain collapses into the other on the next search.
    p.write(a, b"\x01")
    p.write(a + P, b"\x01")
    m.ksm.scan(full_scans=1)
    m.check_invariants()
    assert stats(m, "pages_shared", "pages_sharing", "stable_node_chains",
                 "stable_node_dups") == (1, 1, 1, 1)
    p.write(a, page(6))
    m.ksm.scan(full_scans=1)  # the search walks the chain and collapses it
    m.check_invariants()
    assert stats(m, "stable_node_chains", "stable_node_dups") == (0, 0)


def test_empty_chain_is_freed_by_the_next_search(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    m.ksm.max_page_sharing = 2
    a = mergeable_area(m, p, [page(6)] * 4)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    for i in range(4):
        p.write(a + i * P, page(7))  # every KSM page goes
    m.ksm.scan(full_scans=1)
    m.check_invariants()
    # Both dups were found stale; the empty chain stays until a walk meets it.
    assert stats(m, "pages_shared", "stable_node_chains", "stable_node_dups") == (0, 1, 0)
    assert m.ksm.do_scan(1) == 1  # the first stable search meets it: freed
    m.check_invariants()
    assert stats(m, "stable_node_chains", "stable_node_dups") == (0, 0)
    m.ksm.scan(full_scans=1)  # the new content builds a new chain of two dups
    m.check_invariants()
    assert stats(m, "pages_shared", "pages_sharing", "stable_node_chains",
                 "stable_node_dups") == (2, 2, 1, 2)


def test_tree_page_turned_ksm_costs_a_break_cow(Machine: type) -> None:
    # An unstable-tree item whose page becomes KSM (through its fork sibling) cannot
    # be merged into: write_protect_page fails on a KSM page, and the scanned page,
    # already made KSM by step 1 of try_to_merge_two_pages, is unshared again.
    m = Machine()
    m.ksm.max_page_sharing = 2
    d, a_proc = m.spawn(), m.spawn()
    x, y = page(0x40), page(0x20)
    dd = mergeable_area(m, d, [y])
    aa = mergeable_area(m, a_proc, [x])
    b_proc = a_proc.fork()  # shares a's page P; slot order: d, a, b, f
    f = m.spawn()
    ff = mergeable_area(m, f, [x])
    m.ksm.run = 1
    m.ksm.scan(full_scans=1)  # checksums
    p_frame = a_proc.pfn(aa)
    q_frame = f.pfn(ff)
    m.ksm.do_scan(1)  # d: y goes into the unstable tree (the root)
    m.ksm.do_scan(1)  # a: x goes into the unstable tree
    d.write(dd, x)  # d's tree page now holds x too
    m.ksm.do_scan(1)  # b: meets d's item first; P becomes the KSM page of d and b
    m.check_invariants()
    assert d.pfn(dd) == b_proc.pfn(aa) == a_proc.pfn(aa) == p_frame
    assert stats(m, "pages_shared", "pages_sharing", "pages_unshared") == (1, 1, 1)
    m.ksm.do_scan(1)  # f: the node is full; the unstable tree's a has P, now KSM
    m.check_invariants()
    assert f.pfn(ff) not in (p_frame, q_frame)  # break_cow gave f a fresh copy
    assert f.read(ff, P) == x
    assert stats(m, "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile") == (
        1, 1, 1, 1)
    # Next round: a's page is KSM and a is not on its node: "KSM page forked",
    # appended over the limit (bypass); f finds the node full and waits in the tree.
    m.ksm.scan(full_scans=2)
    m.check_invariants()
    assert stats(m, "pages_shared", "pages_sharing", "pages_unshared") == (1, 2, 1)
    assert a_proc.ksm_stat()["ksm_merging_pages"] == 1


def test_merge_across_nodes_zero_keeps_nodes_apart(Machine: type) -> None:
    for across, expect in ((1, 1), (0, 2)):
        m = Machine(nodes=2)
        m.ksm.merge_across_nodes = across
        p = m.spawn()
        a0 = mergeable_area(m, p, [page(5)] * 2, node=0)
        a1 = mergeable_area(m, p, [page(5)] * 2, node=1)
        m.ksm.run = 1
        m.ksm.scan(full_scans=2)
        m.check_invariants()
        assert len({p.pfn(a0), p.pfn(a0 + P), p.pfn(a1), p.pfn(a1 + P)}) == expect
        assert m.ksm.pages_shared == expect


# ---- sysfs ----------------------------------------------------------------------------


def test_sysfs_knobs_and_errors(Machine: type) -> None:
    m = Machine()
    assert list(m.ksm.stats()) == list(SYSFS_FILES)
    assert m.ksm.sysfs_read("advisor_mode") == "[none] scan-time\n"
    assert m.ksm.sysfs_read("run") == "0\n"
    m.ksm.sysfs_write("use_zero_pages", "on\n")
    assert m.ksm.use_zero_pages == 1
    with pytest.raises(OSError) as e:
        m.ksm.pages_shared = 3
    assert e.value.errno == errno.EACCES
    with pytest.raises(OSError) as e:
        m.ksm.run = 3
    assert e.value.errno == errno.EINVAL and m.ksm.run == 0
    m.ksm.advisor_mode = "scan-time"
    assert m.ksm.pages_to_scan == 500
    with pytest.raises(OSError) as e:
        m.ksm.pages_to_scan = 10
    assert e.value.errno == errno.EINVAL and m.ksm.pages_to_scan == 500
    m.ksm.advisor_mode = "none"
    assert m.ksm.pages_to_scan == 100
    with pytest.raises(OSError) as e:
        m.ksm.max_page_sharing = 1
    assert e.value.errno == errno.EINVAL
    # EBUSY while KSM pages exist; the same value is always accepted.
    p = m.spawn()
    mergeable_area(m, p, [page(1)] * 2)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    for knob, value in (("max_page_sharing", 10), ("merge_across_nodes", 0)):
        with pytest.raises(OSError) as e:
            setattr(m.ksm, knob, value)
        assert e.value.errno == errno.EBUSY
    m.ksm.max_page_sharing = 256
    m.ksm.run = 2
    m.ksm.max_page_sharing = 10
    assert m.ksm.max_page_sharing == 10
    m.check_invariants()


# ---- API misuse -----------------------------------------------------------------------


def test_misuse_raises_and_changes_nothing(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = p.mmap(4)
    p.write(a, b"abc")
    before = (p.maps(), pfns(p, a, 4), p.read(a, 4 * P))
    for call, err in (
        (lambda: p.write(a + 3 * P, b"x" * (P + 1)), errno.EFAULT),
        (lambda: p.read(a - 1, 2), errno.EFAULT),
        (lambda: p.madvise(a + 1, P, MADV_MERGEABLE), errno.EINVAL),
        (lambda: p.madvise(a, 0, MADV_MERGEABLE), errno.EINVAL),
        (lambda: p.madvise(a, P, 99), errno.EINVAL),
        (lambda: p.madvise(a, 5 * P, MADV_MERGEABLE), errno.ENOMEM),
        (lambda: p.munmap(a + 7, P), errno.EINVAL),
        (lambda: p.fill(a + 3 * P, np.zeros((2, P), np.uint8)), errno.EFAULT),
        (lambda: p.pfn(a + 4 * P), errno.EFAULT),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == err
        assert (p.maps(), pfns(p, a, 4), p.read(a, 4 * P)) == before
    with pytest.raises(ValueError):
        p.fill(a, np.zeros((2, 100), np.uint8))
    with pytest.raises(ValueError):
        p.fill(a, np.zeros((2, P), np.int16))
    assert p.read(a + P, 3) == b"\0\0\0" and p.pfn(a + P) is None
    p.exit()
    with pytest.raises(ProcessLookupError):
        p.mmap(1)
    m.check_invariants()


def test_madvise_splits_vmas_and_munmap_punches_holes(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = p.mmap(8)
    b = p.mmap(2)
    assert b == a + 9 * P  # one guard page
    p.write(a, bytes(8 * P))
    p.madvise(a + 2 * P, 3 * P, MADV_MERGEABLE)
    assert p.maps() == [(a, a + 2 * P, False), (a + 2 * P, a + 5 * P, True),
                        (a + 5 * P, a + 8 * P, False), (b, b + 2 * P, False)]
    p.munmap(a + P, 2 * P)
    assert p.maps() == [(a, a + P, False), (a + 3 * P, a + 5 * P, True),
                        (a + 5 * P, a + 8 * P, False), (b, b + 2 * P, False)]
    p.munmap(a, 20 * P)  # holes are allowed
    assert p.maps() == []
    m.check_invariants()


# ---- a random walk, checking the invariants after every step ------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_invariants(Machine: type, seed: int) -> None:
    rng = random.Random(seed)
    m = Machine(nodes=rng.choice([1, 2]))
    m.ksm.run = 1
    contents = [page(i) for i in range(rng.choice([3, 10]))] + [bytes(P)]
    areas: dict[int, list[tuple[int, int]]] = {}
    for _ in range(300):
        procs = m.processes
        r = rng.random()
        try:
            if not procs or r < 0.03:
                areas[m.spawn().pid] = []
                continue
            p = rng.choice(procs)
            if r < 0.08:
                n = rng.randint(1, 10)
                areas[p.pid].append((p.mmap(n, node=rng.randrange(m.nodes)), n))
            elif r < 0.50:
                if not areas[p.pid]:
                    continue
                a, n = rng.choice(areas[p.pid])
                i = rng.randrange(n)
                k = rng.randint(1, n - i)
                if r < 0.33:
                    p.write(a + i * P, rng.choice(contents))
                elif r < 0.45:
                    advice = MADV_MERGEABLE if rng.random() < 0.8 else MADV_UNMERGEABLE
                    p.madvise(a + i * P, k * P, advice)
                else:
                    p.munmap(a + i * P, k * P)
            elif r < 0.53:
                child = p.fork()
                areas[child.pid] = list(areas[p.pid])
            elif r < 0.55:
                p.exit()
            elif r < 0.85:
                m.ksm.do_scan(rng.randint(1, 25))
            elif r < 0.88:
                m.ksm.max_page_sharing = rng.choice([2, 3, 256])
            elif r < 0.90:
                m.ksm.use_zero_pages = rng.random() < 0.5
            elif r < 0.93:
                m.ksm.run = rng.choice([0, 1, 1, 2])
            elif r < 0.95:
                m.ksm.merge_across_nodes = rng.choice([0, 1])
            else:
                m.clock_ms += rng.choice([0, 3000])
                m.ksm.stable_node_chains_prune_millisecs = rng.choice([0, 2000])
        except OSError as e:
            assert e.errno in (errno.EFAULT, errno.ENOMEM, errno.EBUSY, errno.ESRCH)
        m.check_invariants()
