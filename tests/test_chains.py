"""max_page_sharing: stable node chains and dups, the choice of dup, chain collapse,
stable_node_chains_prune_millisecs and the fork bypass, on both implementations.
Kernel parity of the counts: the dup1000 and mps* workloads of test_kernel_parity.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE

P = PAGE_SIZE


def copies(m: Any, p: Any, n: int, byte: int = 0x2A) -> int:
    a = p.mmap(n)
    p.fill(a, np.full((n, P), byte, np.uint8))
    p.madvise(a, n * P, MADV_MERGEABLE)
    return a


def expected_ksm_pages_count(n: int, m: int) -> tuple[int, int]:
    """ksm_tests.c assert_ksm_pages_count(): (pages_shared, pages_sharing)."""
    if n % m in (0, 1):
        shared = n // m
        return shared, shared * (m - 1)
    shared = n // m + 1
    return shared, n - shared


def counts(m: Any) -> tuple[int, int, int, int]:
    s = m.ksm.stats()
    return s["pages_shared"], s["pages_sharing"], s["stable_node_chains"], s["stable_node_dups"]


def test_one_content_in_1000_copies(Machine: type) -> None:
    """At the default limit (256): four KSM pages, dups of one chain."""
    m = Machine()
    p = m.spawn()
    a = copies(m, p, 1000)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert counts(m) == (4, 996, 1, 4)
    assert sorted(n["rmap_hlist_len"] for n in m.ksm.stable_nodes()) == [232, 256, 256, 256]
    assert len({p.pfn(a + i * P) for i in range(1000)}) == 4
    m.check_invariants()


@pytest.mark.parametrize("limit", [2, 3, 16])
def test_the_count_algebra_around_multiples_of_the_limit(Machine: type, limit: int) -> None:
    """assert_ksm_pages_count() for n copies around 1, 2 and 3 times the limit; a chain
    (with one dup per KSM page) exactly when more than one KSM page holds the content."""
    for n in sorted({2, *(k * limit + d for k in (1, 2, 3) for d in (-1, 0, 1))} - {1}):
        m = Machine()
        m.ksm.max_page_sharing = limit
        p = m.spawn()
        copies(m, p, n)
        m.ksm.run = 1
        m.ksm.scan(full_scans=2)
        shared, sharing = expected_ksm_pages_count(n, limit)
        chained = shared > 1
        assert counts(m) == (shared, sharing, int(chained), shared if chained else 0), n
        m.check_invariants()


def test_dups_fill_in_list_order_and_a_chain_collapses(Machine: type) -> None:
    """A freed dup is pruned on the next walk; when one dup is left the chain
    collapses into it (chains and dups both go down)."""
    m = Machine()
    m.ksm.max_page_sharing = 2
    m.ksm.smart_scan = 0  # every page is visited every round
    p = m.spawn()
    a = copies(m, p, 4, 6)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert counts(m) == (2, 2, 1, 2)
    k_first = p.pfn(a)
    for i in range(4):
        if p.pfn(a + i * P) == k_first:
            p.write(a + i * P, b"\x01")  # that dup's page goes
    m.ksm.scan(full_scans=1)
    assert counts(m) == (1, 1, 1, 1)  # the stale dup is gone, the chain stays
    freed = [a + i * P for i in range(4) if p.read(a + i * P, 1) == b"\x01"]
    p.write(freed[0], b"\x06")  # back to the chain's content; freed[1] stays as it is
    # freed[1]'s checksum held since the last round: its stable search walks the chain,
    # finds one dup left, and collapses it
    m.ksm.scan(full_scans=1)
    assert counts(m) == (1, 1, 0, 0)
    p.write(freed[1], b"\x06")
    m.ksm.scan(full_scans=2)
    assert counts(m) == (2, 2, 1, 2)  # the rewritten copies build a new dup
    m.check_invariants()


@pytest.mark.parametrize("clock_ms, picks_fuller", [(0, False), (1999, False), (2000, True)])
def test_prune_time_gates_the_full_dup_walk(Machine: type, clock_ms: int,
                                            picks_fuller: bool) -> None:
    """Without a prune the first candidate in list order wins; a prune (once
    stable_node_chains_prune_millisecs passed since the last) walks every dup and picks
    the candidate with the most mappings."""
    m = Machine()
    m.ksm.max_page_sharing = 4
    p = m.spawn()
    a = copies(m, p, 7, 6)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    k1, k2 = p.pfn(a), p.pfn(a + 4 * P)
    assert [p.pfn(a + i * P) for i in range(7)] == [k1] * 4 + [k2] * 3
    for i, byte in ((0, 1), (1, 2), (4, 3), (5, 4)):
        p.write(a + i * P, bytes([byte]) * P)
    m.ksm.scan(full_scans=1)
    assert counts(m)[:3] == (2, 1, 1)  # k2 (1 mapping) listed first, then k1 (2)
    q = m.spawn()
    b = copies(m, q, 1, 6)
    m.clock_ms = max(m.clock_ms, clock_ms)
    m.ksm.scan(full_scans=2)
    assert q.pfn(b) == (k1 if picks_fuller else k2)
    m.check_invariants()


@pytest.mark.parametrize("wait_s, picks_fuller", [(0.3, False), (2.5, True)])
def test_prune_period_follows_simulated_time(Machine: type, wait_s: float,
                                             picks_fuller: bool) -> None:
    """With run_for the period is simulated time: until 2 s after the chain was made
    no walk prunes it and a newcomer takes the first candidate in list order; later
    a walk prunes it, which moves the fullest candidate to the head."""
    m = Machine()
    m.ksm.max_page_sharing = 4
    m.ksm.sleep_millisecs = 100
    p = m.spawn()
    a = copies(m, p, 7, 6)
    m.ksm.run = 1
    m.run_for(0.15)  # two full scans: merged into a chain of two dups
    assert counts(m)[2:] == (1, 2)
    k1, k2 = p.pfn(a), p.pfn(a + 4 * P)
    for i, byte in ((0, 1), (1, 2), (4, 3), (5, 4)):
        p.write(a + i * P, bytes([byte]) * P)
    m.run_for(wait_s)
    q = m.spawn()
    b = copies(m, q, 1, 6)
    m.run_for(0.3)
    assert q.pfn(b) == (k1 if picks_fuller else k2)
    m.check_invariants()


def test_fork_goes_past_the_limit(Machine: type) -> None:
    """A forked KSM page joins its node even when that is full (bypass): a node's
    rmap_hlist_len exceeds max_page_sharing and no new KSM page appears."""
    m = Machine()
    m.ksm.max_page_sharing = 3
    p = m.spawn()
    a = copies(m, p, 3, 5)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert counts(m) == (1, 2, 0, 0)
    c = p.fork()
    c2 = p.fork()
    m.ksm.scan(full_scans=2)
    assert counts(m) == (1, 8, 0, 0)
    (node,) = m.ksm.stable_nodes()
    assert node["rmap_hlist_len"] == 9 > m.ksm.max_page_sharing
    assert c.pfn(a) == c2.pfn(a + 2 * P) == p.pfn(a)
    # new copies find the node full: a second KSM page, in a chain
    d = m.spawn()
    copies(m, d, 2, 5)
    m.ksm.scan(full_scans=2)
    assert counts(m) == (2, 9, 1, 2)
    m.check_invariants()


def test_fork_joins_existing_stable_node(Machine: type) -> None:
    """Will Huck's question in the seed thread: a forked child's KSM pages join the
    existing stable nodes when ksmd reaches the child; no new KSM page appears."""
    m = Machine()
    p = m.spawn()
    a = copies(m, p, 512, 0xCF)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    before = m.ksm.stats()
    child = p.fork()
    m.ksm.scan(full_scans=2)
    after = m.ksm.stats()
    # 512 copies at max_page_sharing 256: two KSM pages (a chain of two dups)
    assert (before["pages_shared"], before["pages_sharing"]) == expected_ksm_pages_count(512, 256)
    assert after["pages_shared"] == before["pages_shared"]
    assert after["stable_node_dups"] == before["stable_node_dups"] == 2
    assert after["pages_sharing"] == before["pages_sharing"] + 512
    assert child.ksm_stat()["ksm_merging_pages"] == 512
    assert child.pfn(a) == p.pfn(a)
    m.check_invariants()

