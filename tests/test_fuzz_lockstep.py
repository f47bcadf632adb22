"""A bounded random lockstep fuzz: seeded programs of valid and invalid operations on
the engine and the reference together. After every operation both give the same result
or the same error, an error changes nothing, the observable states are equal, and both
invariant checkers pass.

CI runs a fixed budget of seeds. A longer soak: ``KSMCORE_FUZZ_SECONDS=600 python -m
pytest tests/test_fuzz_lockstep.py`` (new seeds until the time is up; a failure names
its seed, and ``KSMCORE_FUZZ_SEED=N`` replays it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ksmcore.constants import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE
from ksmcore.errors import KsmdNotRunning

from conftest import machine_class
from observe import normalized_maps, snapshot

STEPS = 300
CI_SEEDS = range(16)
# how often each kind of operation comes (by kind number in _op): mostly mapping,
# filling, advising and scanning, so that pages merge; the rest now and then
_W = np.array([1, 3, 5, 3, 1, 1, 0.5, 4, 4, 1, 2, 1, 2, 1, 1, 1])
WEIGHTS = _W / _W.sum()

Op = Callable[[Any, list[Any]], Any]


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        fn()
    except OSError as e:
        return ("error", type(e).__name__, e.errno)
    except (KsmdNotRunning, ValueError, TypeError) as e:
        return ("error", type(e).__name__)
    return ("ok",)


def program(seed: int) -> list[tuple[str, Op]]:
    """A list of (description, op); each op takes (machine, processes) and may append
    to the processes. Every random choice is drawn here, once, so that the op runs
    alike on both machines: processes and mappings are chosen by position."""
    rng = np.random.default_rng(seed)
    ops: list[tuple[str, Op]] = []
    bad_values: list[Any] = [True, 0.5, None, -1, 1 << 63, 1 << 62, "1", np.float64(1.0)]
    for _ in range(STEPS):
        ops.append(_op(rng, bad_values))
    return ops


def _pick(procs: list[Any], j: int) -> Any:
    return procs[j % len(procs)] if procs else None


def _addr(p: Any, k: int) -> int:
    """A page of one of p's mappings (by position), or an unmapped address."""
    return _where(p, k, 1)[0]


def _where(p: Any, k: int, n: int) -> tuple[int, int]:
    """(address, pages): up to n pages inside one of p's mappings, chosen by k; now and
    then (k % 8 == 0) n pages that may run past its end."""
    # joined as observed: how a model splits its VMAs is not part of the contract
    maps = normalized_maps(p) if p is not None and not p.exited else []
    if not maps:
        return 0x7F0000000000 + k * PAGE_SIZE, n
    start, end, _ = maps[k % len(maps)]
    size = max(1, (end - start) // PAGE_SIZE)
    first = (k // 7) % size
    return start + first * PAGE_SIZE, (n if k % 8 == 0 else max(1, min(n, size - first)))


def _op(rng: np.random.Generator, bad_values: list[Any]) -> tuple[str, Op]:
    j, k = (int(x) for x in rng.integers(1 << 16, size=2))
    kind = int(rng.choice(16, p=WEIGHTS))
    n = int(rng.integers(1, 7))
    fill = int(rng.choice([0, 1, 2, 0xCF]))
    bad = bad_values[int(rng.integers(len(bad_values)))]

    def on_process(fn: Callable[[Any], Any]) -> Op:
        def op(m: Any, ps: list[Any]) -> Any:
            p = _pick(ps, j)
            return None if p is None else fn(p)
        return op

    if kind == 0:
        return "spawn", lambda m, ps: ps.append(m.spawn(k % 2))
    if kind == 1:
        return f"mmap {n}", on_process(lambda p: p.mmap(n))
    if kind == 2:
        def fill_pages(p: Any) -> None:
            addr, count = _where(p, k, n)
            p.fill(addr, np.full((count, PAGE_SIZE), fill, np.uint8))
        return f"fill {n}x{fill}", on_process(fill_pages)
    if kind == 3:
        adv = (MADV_MERGEABLE, MADV_MERGEABLE, MADV_MERGEABLE, MADV_UNMERGEABLE,
               MADV_DONTNEED)[k % 5]
        def advise(p: Any) -> None:
            addr, count = _where(p, k, n)
            p.madvise(addr, count * PAGE_SIZE, adv)
        return f"madvise {adv}", on_process(advise)
    if kind == 4:
        return "munmap", on_process(lambda p: p.munmap(_addr(p, k), n * PAGE_SIZE))
    if kind == 5:
        return "fork", lambda m, ps: on_process(lambda p: ps.append(p.fork()))(m, ps)
    if kind == 6:
        return "exit", on_process(lambda p: p.exit())
    if kind in (7, 8):
        return f"do_scan {k % 50}", lambda m, ps: m.ksm.do_scan(k % 50)
    if kind == 9:
        run = (1, 1, 1, 0, 2)[k % 5]
        return f"run {run}", lambda m, ps: setattr(m.ksm, "run", run)
    if kind == 10:
        return "write", on_process(
            lambda p: p.write(_addr(p, k) + k % PAGE_SIZE, bytes([k % 3]) * (k % 9 + 1)))
    if kind == 11:
        return "use_zero_pages", lambda m, ps: setattr(m.ksm, "use_zero_pages", k % 2)
    if kind == 12:  # a bad argument where an integer belongs
        calls: list[Callable[[Any, list[Any]], Any]] = [
            on_process(lambda p: p.mmap(bad)),
            on_process(lambda p: p.munmap(bad, PAGE_SIZE)),
            on_process(lambda p: p.madvise(bad, PAGE_SIZE, MADV_MERGEABLE)),
            on_process(lambda p: p.read(bad, 8)),
            on_process(lambda p: p.mmap(2, node=bad)),
            lambda m, ps: m.ksm.do_scan(bad),
            lambda m, ps: m.ksm.scan(bad),
            lambda m, ps: m.spawn(bad),
            on_process(lambda p: p.prctl_set_memory_merge(bad)),
            lambda m, ps: m.pfn_to_nid(bad),
        ]
        return f"bad argument {k % len(calls)}: {bad!r}", calls[k % len(calls)]
    if kind == 13:
        value = (1e20, -1.0, 3.5)[k % 3]
        return f"clock = {value}", lambda m, ps: setattr(m, "clock", m.clock + value)
    if kind == 14:
        seconds = (0.01, 1e12, 0.0)[k % 3]
        return f"run_for {seconds}", lambda m, ps: m.run_for(seconds)
    return "prctl", on_process(lambda p: p.prctl_set_memory_merge(k % 2))


def run_program(seed: int) -> None:
    machines = [machine_class("engine")(nodes=2), machine_class("reference")(nodes=2)]
    procs: list[list[Any]] = [[], []]
    for step, (what, op) in enumerate(program(seed)):
        before = [snapshot(m, procs[s]) for s, m in enumerate(machines)]
        got = []
        for s, m in enumerate(machines):
            got.append(outcome(lambda m=m, s=s, op=op: op(m, procs[s])))
        where = f"seed {seed} step {step} ({what})"
        assert got[0] == got[1], f"{where}: engine {got[0]} != reference {got[1]}"
        after = [snapshot(m, procs[s]) for s, m in enumerate(machines)]
        if got[0][0] == "error":
            assert after == before, f"{where}: a failed call changed the state"
        assert after[0] == after[1], f"{where}: states differ"
        assert machines[0].clock_ns == machines[1].clock_ns, where
        for m in machines:
            m.check_invariants()


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_lockstep_fuzz(seed: int) -> None:
    replay = os.environ.get("KSMCORE_FUZZ_SEED")
    run_program(int(replay) if replay else seed)


SOAK_SECONDS = float(os.environ.get("KSMCORE_FUZZ_SECONDS", "0"))
if SOAK_SECONDS > 0:  # collected only when asked for

    def test_lockstep_soak() -> None:
        deadline = time.monotonic() + SOAK_SECONDS
        seed = 1000
        while time.monotonic() < deadline:
            run_program(seed)
            seed += 1
        assert seed > 1000
