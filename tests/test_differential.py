"""The engine against the reference: the same random programs, step by step.

Every step must leave both machines in the same observable state (sysfs counters,
every process's ksm_stat, maps, which pages share a frame, contents), raise the
same errors, and pass both invariant checkers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from conftest import machine_class
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from observe import snapshot

import ksmcore
from ksmcore.constants import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE
from ksmcore.errors import KsmdNotRunning

# few distinct contents, so that duplicates are common; 0 makes zero pages
FILLS = (0, 1, 2, 0xCF)
index = st.integers(0, 1 << 16)


class Differential(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.machines = [machine_class("engine")(), machine_class("reference")()]
        self.procs: list[list[Any]] = [[], []]
        self.vmas: list[tuple[int, int, int]] = []  # (process index, address, npages)

    # ---- helpers

    def both(self, fn: Any) -> Any:
        """Run fn(side, machine) on both; they must agree on result or error."""
        outcomes = []
        for side, m in enumerate(self.machines):
            try:
                outcomes.append(("ok", fn(side, m)))
            except OSError as e:
                outcomes.append(("error", type(e).__name__, e.errno))
            except (KsmdNotRunning, ValueError) as e:
                outcomes.append(("error", type(e).__name__, None))
        assert outcomes[0] == outcomes[1], f"engine {outcomes[0]} != reference {outcomes[1]}"
        return outcomes[0]

    def live(self) -> list[int]:
        return [i for i, p in enumerate(self.procs[0]) if not p.exited]

    def pick_vma(self, k: int) -> tuple[int, int, int]:
        return self.vmas[k % len(self.vmas)]

    # ---- rules

    @rule()
    def spawn(self) -> None:
        for side, m in enumerate(self.machines):
            self.procs[side].append(m.spawn())

    @precondition(lambda self: self.live())
    @rule(k=index, npages=st.integers(1, 6))
    def mmap(self, k: int, npages: int) -> None:
        i = self.live()[k % len(self.live())]
        out = self.both(lambda side, m: self.procs[side][i].mmap(npages))
        if out[0] == "ok":
            self.vmas.append((i, out[1], npages))

    @precondition(lambda self: self.vmas)
    @rule(k=index, first=st.integers(0, 5), fills=st.lists(st.sampled_from(FILLS), min_size=1,
                                                             max_size=6))
    def fill(self, k: int, first: int, fills: list[int]) -> None:
        i, addr, npages = self.pick_vma(k)
        first %= npages
        pages = np.array([np.full(PAGE_SIZE, f, np.uint8) for f in fills])
        self.both(lambda side, m: self.procs[side][i].fill(addr + first * PAGE_SIZE, pages))

    @precondition(lambda self: self.vmas)
    @rule(k=index, offset=st.integers(0, 6 * PAGE_SIZE), data=st.binary(min_size=1, max_size=9))
    def write(self, k: int, offset: int, data: bytes) -> None:
        i, addr, npages = self.pick_vma(k)
        self.both(lambda side, m: self.procs[side][i].write(addr + offset, data))

    @precondition(lambda self: self.vmas)
    @rule(k=index, first=st.integers(0, 6), count=st.integers(1, 6), merge=st.booleans())
    def madvise(self, k: int, first: int, count: int, merge: bool) -> None:
        i, addr, npages = self.pick_vma(k)
        advice = MADV_MERGEABLE if merge else MADV_UNMERGEABLE
        start = addr + (first % npages) * PAGE_SIZE
        self.both(lambda side, m: self.procs[side][i].madvise(start, count * PAGE_SIZE, advice))

    @precondition(lambda self: self.vmas)
    @rule(k=index, first=st.integers(0, 6), count=st.integers(1, 6))
    def munmap(self, k: int, first: int, count: int) -> None:
        i, addr, npages = self.pick_vma(k)
        start = addr + (first % npages) * PAGE_SIZE
        self.both(lambda side, m: self.procs[side][i].munmap(start, count * PAGE_SIZE))

    @precondition(lambda self: self.live())
    @rule(k=index)
    def fork(self, k: int) -> None:
        i = self.live()[k % len(self.live())]
        out = self.both(lambda side, m: self.procs[side].append(self.procs[side][i].fork()))
        if out[0] == "ok":
            child = len(self.procs[0]) - 1
            self.vmas += [(child, a, n) for (j, a, n) in self.vmas if j == i]

    @precondition(lambda self: self.live())
    @rule(k=index)
    def exit(self, k: int) -> None:
        i = self.live()[k % len(self.live())]
        self.both(lambda side, m: self.procs[side][i].exit())

    @rule(n=st.integers(1, 40))
    def do_scan(self, n: int) -> None:
        self.both(lambda side, m: m.ksm.do_scan(n))

    @rule(run=st.sampled_from([0, 1, 1, 1, 2]))
    def set_run(self, run: int) -> None:
        self.both(lambda side, m: setattr(m.ksm, "run", run))

    @rule(name=st.sampled_from(["use_zero_pages", "smart_scan"]), value=st.booleans())
    def set_bool_knob(self, name: str, value: bool) -> None:
        self.both(lambda side, m: setattr(m.ksm, name, value))

    @rule(value=st.sampled_from([2, 3, 256]))
    def set_max_page_sharing(self, value: int) -> None:
        self.both(lambda side, m: setattr(m.ksm, "max_page_sharing", value))

    @rule(text=st.sampled_from(["1", "0\n", "3", "-1", "", "x", "2000", "on"]))
    def sysfs_write_run(self, text: str) -> None:
        self.both(lambda side, m: m.ksm.sysfs_write("run", text))

    # ---- after every step

    @invariant()
    def same_state(self) -> None:
        for m in self.machines:
            m.check_invariants()
        engine, reference = (snapshot(m, self.procs[s]) for s, m in enumerate(self.machines))
        assert engine == reference


Differential.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDifferential = Differential.TestCase


def test_engine_is_the_default_machine() -> None:
    assert ksmcore.Machine is machine_class("engine")
