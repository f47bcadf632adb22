"""Smart scan (should_skip_rmap_item, 6.7+) and the 6.10 pages_scanned accounting, on
both implementations. Kernel parity of the pattern: the smart0/smart1/smart_pattern
workloads of tests/test_kernel_parity.py."""

from __future__ import annotations

from typing import Any

import numpy as np

from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE

P = PAGE_SIZE


def area(p: Any, contents: np.ndarray) -> int:
    a = p.mmap(len(contents))
    p.fill(a, contents)
    p.madvise(a, len(contents) * P, MADV_MERGEABLE)
    return a


def unique(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, P), dtype=np.uint8)


def processed_visits(m: Any, visits: int) -> list[int]:
    """The visits (1-based full scans) in which the one page was processed."""
    out = []
    for visit in range(1, visits + 1):
        before = m.ksm.pages_scanned
        m.ksm.scan(full_scans=1)
        if m.ksm.pages_scanned > before:
            out.append(visit)
    return out


def test_a_page_that_never_merges(Machine: type) -> None:
    """Processed at visits 1-4, 6, 9, 14, then one visit in nine."""
    m = Machine()
    p = m.spawn()
    area(p, unique(1))
    m.ksm.run = 1
    visits = processed_visits(m, 60)
    assert visits == [1, 2, 3, 4, 6, 9, 14, 23, 32, 41, 50, 59]
    assert (m.ksm.pages_scanned, m.ksm.pages_skipped) == (12, 48)
    m.check_invariants()


def test_the_age_saturates_and_the_pattern_holds(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    area(p, unique(1))
    m.ksm.run = 1
    m.ksm.scan(full_scans=300)  # age is a u8: it stops at 255
    # processed at 14 + 9k: 293, then 302, 311, 320
    assert processed_visits(m, 27) == [2, 11, 20]
    m.check_invariants()


def test_skips_use_no_budget_and_count_in_pages_skipped(Machine: type) -> None:
    """Ten pages that never merge, pages_to_scan 1: in a round where all are skipped
    one batch ends the round having processed nothing."""
    m = Machine()
    p = m.spawn()
    area(p, unique(10))
    m.ksm.run = 1
    m.ksm.scan(full_scans=4)  # visits 1-4: processed
    assert (m.ksm.pages_scanned, m.ksm.pages_skipped) == (40, 0)
    full = m.ksm.full_scans
    assert m.ksm.do_scan(1) == 0  # visit 5: all ten skipped, the round ends
    assert (m.ksm.full_scans, m.ksm.pages_skipped, m.ksm.pages_scanned) == (full + 1, 10, 40)
    assert m.ksm.do_scan(1) == 1  # visit 6: processed one by one
    m.check_invariants()


def test_ksm_pages_are_never_skipped(Machine: type) -> None:
    """A KSM page's item is not aged: after any number of scans a merged page is still
    visited each round (and takes the fast path)."""
    m = Machine()
    p = m.spawn()
    a = area(p, np.concatenate([np.full((2, P), 7, np.uint8), unique(1)]))
    m.ksm.run = 1
    m.ksm.scan(full_scans=30)
    assert p.pfn(a) == p.pfn(a + P)
    before = (m.ksm.pages_scanned, m.ksm.pages_skipped)
    m.ksm.scan(full_scans=9)
    scanned, skipped = m.ksm.pages_scanned - before[0], m.ksm.pages_skipped - before[1]
    assert (scanned, skipped) == (2 * 9 + 1, 8)  # the unique page: one visit in nine


def test_duplicates_meet_only_when_their_visits_coincide(Machine: type) -> None:
    """The unstable tree lives for one round, so two duplicates merge only in a round
    in which both are processed. A page at one visit in nine (p: rounds 14, 23, 32..)
    and a newcomer (processed at its visits 1-4, 6, 9, 14, then every ninth) may never
    meet: a twin first seen in round 16 never does; one first seen in round 20 meets
    p in round 23, its fourth visit."""
    for first_round, merged_at in ((16, None), (20, 23)):
        m = Machine()
        p = m.spawn()
        content = unique(1)
        a = area(p, content)
        m.ksm.run = 1
        m.ksm.scan(full_scans=first_round - 1)
        q = m.spawn()
        b = area(q, content.copy())
        rounds = []
        for r in range(first_round, first_round + 60):
            m.ksm.scan(full_scans=1)
            rounds.append(r)
            if m.ksm.pages_shared:
                break
        if merged_at is None:
            assert m.ksm.pages_shared == 0
        else:
            assert rounds[-1] == merged_at and p.pfn(a) == q.pfn(b)
        m.check_invariants()


def test_smart_scan_off_processes_every_page(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    area(p, unique(3))
    m.ksm.smart_scan = 0
    m.ksm.run = 1
    m.ksm.scan(full_scans=20)
    assert (m.ksm.pages_scanned, m.ksm.pages_skipped) == (60, 0)
    m.ksm.smart_scan = 1  # the age only moves while smart_scan is on: it starts at 0
    m.ksm.scan(full_scans=9)
    assert m.ksm.pages_skipped == 3 * 3  # visits 5, 7 and 8 skipped
