"""The scan's shortcuts (struct ksm_ctx scan_shortcuts) decide nothing differently.

- A page of the last round's unstable tree, not written since, is searched with the
  prefix its tree node recorded instead of reading its first bytes.
- A page whose prefix no node of the stable trees has, outside every chain's range,
  while no stable node is stale, is not searched: the walk is decided by prefixes
  and finds nothing (stable_walk_decided).

Two engines run the lockstep fuzz programs (tests/test_fuzz_lockstep.py): one takes
the shortcuts (the default), one reads and walks everything (``scan_shortcuts = 0``).
After every operation their observable states are equal. On memory that keeps still,
the shortcuts answer most pages of the later rounds, and the counters stay the
reference's; a stale stable node stops the decided walks. (The sanitized build also
checks each answer against the page and the walk: KSMCORE_CHECK_SHORTCUTS.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from test_fuzz_lockstep import outcome, program

from ksmcore.constants import MADV_DONTNEED, MADV_MERGEABLE, PAGE_SIZE

from conftest import machine_class
from observe import snapshot

SEEDS = range(12)


def _lockstep(seed: int) -> int:
    """One fuzz program on both engines; returns how often a shortcut answered."""
    Engine = machine_class("engine")
    fast, slow = Engine(nodes=2), Engine(nodes=2)
    slow.ctx.scan_shortcuts = 0
    procs: list[list[Any]] = [[], []]
    for step, (what, op) in enumerate(program(seed)):
        got = [outcome(lambda m=m, s=s, op=op: op(m, procs[s]))
               for s, m in enumerate((fast, slow))]
        where = f"seed {seed} step {step} ({what})"
        assert got[0] == got[1], where
        assert snapshot(fast, procs[0]) == snapshot(slow, procs[1]), where
    fast.check_invariants()
    counters = ("nr_prefix_recorded", "nr_walks_decided")
    assert not any(getattr(slow.ctx, name) for name in counters)
    return np.array([getattr(fast.ctx, name) for name in counters])


def test_shortcuts_change_nothing_on_the_fuzz_programs() -> None:
    answered = sum(_lockstep(seed) for seed in SEEDS)
    assert all(answered > 0), f"a shortcut was never taken: {answered}"


def _workload(m: Any, npages: int = 3000) -> tuple[Any, int]:
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
    pages[1:300] = pages[0]  # one content 300 times: a chain at max_page_sharing 256
    pages[300:800] = pages[300:400].repeat(5, axis=0)  # 100 plain stable nodes
    pages[800:900] = 0
    p = m.spawn()
    addr = p.mmap(npages)
    p.fill(addr, pages)
    p.madvise(addr, npages * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.pages_to_scan = 500
    m.ksm.smart_scan = 0  # every page every round: the rounds below are whole
    m.ksm.run = 1
    return p, addr


def _stats(m: Any) -> dict[str, int]:
    return {k: v for k, v in m.ksm.stats().items() if k != "ksmd_cpu_ns"}


def _round(eng: Any, ref: Any) -> tuple[int, int]:
    """One full scan on both, counters compared; how many prefixes were recorded and
    how many walks decided in it."""
    recorded, decided = int(eng.ctx.nr_prefix_recorded), int(eng.ctx.nr_walks_decided)
    eng.ksm.scan(full_scans=1)
    ref.ksm.scan(full_scans=1)
    assert _stats(eng) == _stats(ref)
    eng.check_invariants()
    return int(eng.ctx.nr_prefix_recorded) - recorded, int(eng.ctx.nr_walks_decided) - decided


def test_still_memory_is_answered_by_the_shortcuts_with_the_references_counters() -> None:
    eng, ref = machine_class("engine")(), machine_class("reference")()
    (pe, ae), (pr, ar) = _workload(eng), _workload(ref)
    rounds = [_round(eng, ref) for _ in range(5)]
    unique = _stats(eng)["pages_unshared"]
    assert unique > 1000
    # round 1 only takes checksums; from round 3 on, every page of the unstable tree is
    # searched with its recorded prefix, and its walk is decided unless it passes the
    # chain
    assert rounds[0] == (0, 0) and rounds[1][1] > 0
    assert rounds[2] == rounds[3] == rounds[4]
    assert rounds[3][0] == unique and unique // 2 < rounds[3][1] <= unique

    # a write to a KSM page: counters still equal, the walks still decided
    for p, a in ((pe, ae), (pr, ar)):
        p.write(a + 9 * PAGE_SIZE, b"changed")
    assert _round(eng, ref)[1] > 0
    # a KSM page freed (pages 300-304 were its only mappings): its stable node goes
    # stale, and no walk is decided while it stays in the tree
    for p, a in ((pe, ae), (pr, ar)):
        p.madvise(a + 300 * PAGE_SIZE, 5 * PAGE_SIZE, MADV_DONTNEED)
    assert eng.ctx.stable_stale == 1
    walked = 0
    while eng.ctx.stable_stale:  # page by page, until a walk passes the stale node
        decided = int(eng.ctx.nr_walks_decided)
        searched = int(eng.ctx.pages_scanned)
        eng.ksm.do_scan(1)
        ref.ksm.do_scan(1)
        assert eng.ctx.nr_walks_decided == decided
        walked += int(eng.ctx.pages_scanned) - searched
        assert walked < 2 * 3000  # the stale node is gone within two rounds
    assert _stats(eng) == _stats(ref)
    for _ in range(2):
        assert _round(eng, ref)[1] > 0


def test_more_chains_than_listed_turn_the_decided_walks_off_until_they_go() -> None:
    """chain_list holds 8 chains: with more, no walk is decided (nr_chain_list -1),
    and the counters stay the reference's; once unmerging frees every chain, decided
    walks come back."""
    rng = np.random.default_rng(11)
    pages = rng.integers(0, 256, (400, PAGE_SIZE), dtype=np.uint8)
    pages[:120] = pages[:12].repeat(10, axis=0)  # 12 contents x 10 copies: 12 chains
    eng, ref = machine_class("engine")(), machine_class("reference")()
    for m in (eng, ref):
        p = m.spawn()
        addr = p.mmap(400)
        p.fill(addr, pages)
        p.madvise(addr, 400 * PAGE_SIZE, MADV_MERGEABLE)
        m.ksm.max_page_sharing = 2
        m.ksm.smart_scan = 0
        m.ksm.pages_to_scan = 100
        m.ksm.run = 1
    for _ in range(4):
        eng.ksm.scan(full_scans=1)
        ref.ksm.scan(full_scans=1)
        assert _stats(eng) == _stats(ref)
        eng.check_invariants()
    assert _stats(eng)["stable_node_chains"] == 12 and eng.ctx.nr_chain_list == -1
    decided = int(eng.ctx.nr_walks_decided)
    eng.ksm.scan(full_scans=1)
    ref.ksm.scan(full_scans=1)
    assert _stats(eng) == _stats(ref) and eng.ctx.nr_walks_decided == decided
    for m in (eng, ref):
        m.ksm.run = 2  # unmerge: every stable node and chain goes
    assert eng.ctx.nr_chain_list == 0 and _stats(eng) == _stats(ref)
    eng.check_invariants()
    for m in (eng, ref):
        m.ksm.run = 1
    eng.ksm.scan(full_scans=3)
    ref.ksm.scan(full_scans=3)
    assert _stats(eng) == _stats(ref)
    eng.check_invariants()
