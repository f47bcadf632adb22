"""The engine against the reference: the same random programs, step by step.

Every step must leave both machines in the same observable state (sysfs counters,
every process's ksm_stat, maps, which pages share a frame, contents, the simulated
clock), raise the same errors, raise the same tracepoint events in the same order,
and pass both invariant checkers.
"""

from __future__ import annotations

import errno
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import ksmcore
from ksmcore.constants import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    MPOL_MF_MOVE,
    MPOL_MF_MOVE_ALL,
    PAGE_SIZE,
)
from ksmcore.errors import KsmdNotRunning
from ksmcore.thp import HPAGE_PMD_NR, HPAGE_PMD_SIZE
from ksmcore.tracing import EVENT_FIELDS

from conftest import machine_class
from observe import canonical_events, snapshot

# few distinct contents, so that duplicates are common; 0 makes zero pages
FILLS = (0, 1, 2, 0xCF)
index = st.integers(0, 1 << 16)


class Differential(RuleBasedStateMachine):
    KERNEL = "6.18"  # the kernel profile both machines follow

    def __init__(self) -> None:
        super().__init__()
        self.machines = [machine_class(name)(nodes=2, kernel=self.KERNEL)
                         for name in ("engine", "reference")]
        self.procs: list[list[Any]] = [[], []]
        self.vmas: list[tuple[int, int, int]] = []  # (process index, address, npages)
        # every tracepoint event of each machine since the last check
        self.events: list[list[dict[str, Any]]] = [[], []]
        for m, events in zip(self.machines, self.events, strict=True):
            m.trace.subscribe(events.append)
        self.seen: set[str] = set()  # event names raised so far
        self.move_statuses: set[int] = set()  # move_pages statuses returned so far

    # ---- helpers

    def both(self, fn: Any) -> Any:
        """Run fn(side, machine) on both; they must agree on result or error."""
        outcomes = []
        for side, m in enumerate(self.machines):
            try:
                outcomes.append(("ok", fn(side, m)))
            except OSError as e:
                outcomes.append(("error", type(e).__name__, e.errno))
            except (KsmdNotRunning, ValueError, TypeError, AttributeError) as e:
                # AttributeError: a sysfs file this kernel profile does not have
                outcomes.append(("error", type(e).__name__, None))
        assert outcomes[0] == outcomes[1], f"engine {outcomes[0]} != reference {outcomes[1]}"
        return outcomes[0]

    def both_refuse(self, fn: Any) -> None:
        """An invalid call: both raise the same error and neither changes anything."""
        before = [snapshot(m, self.procs[s]) for s, m in enumerate(self.machines)]
        clocks = [m.clock_ns for m in self.machines]
        out = self.both(fn)
        assert out[0] == "error", f"accepted: {out}"
        assert [snapshot(m, self.procs[s]) for s, m in enumerate(self.machines)] == before
        assert [m.clock_ns for m in self.machines] == clocks

    def live(self) -> list[int]:
        return [i for i, p in enumerate(self.procs[0]) if not p.exited]

    def pick_vma(self, k: int) -> tuple[int, int, int]:
        return self.vmas[k % len(self.vmas)]

    # ---- rules

    @initialize(npages=st.integers(1, 6), merge=st.booleans(),
                fills=st.lists(st.sampled_from(FILLS), min_size=6, max_size=6))
    def start(self, npages: int, merge: bool, fills: list[int]) -> None:
        # ksmd running, two processes with a mapping each: most programs then merge
        self.both(lambda side, m: setattr(m.ksm, "run", 1))
        for _ in range(2):
            self.spawn()
            i = len(self.procs[0]) - 1
            self.mmap(i, npages)
            self.fill(len(self.vmas) - 1, 0, fills)
            if merge:
                self.madvise(len(self.vmas) - 1, 0, npages, True)

    @rule(node=st.integers(0, 1))
    def spawn(self, node: int = 0) -> None:
        for side, m in enumerate(self.machines):
            self.procs[side].append(m.spawn(node=node))

    @precondition(lambda self: self.live())
    @rule(k=index, npages=st.integers(1, 6), node=st.sampled_from([None, None, 0, 1]))
    def mmap(self, k: int, npages: int, node: int | None = None) -> None:
        i = self.live()[k % len(self.live())]
        out = self.both(lambda side, m: self.procs[side][i].mmap(npages, node=node))
        if out[0] == "ok":
            self.vmas.append((i, out[1], npages))

    @precondition(lambda self: self.vmas)
    @rule(k=index, first=st.integers(0, 5), fills=st.lists(st.sampled_from(FILLS), min_size=1,
                                                             max_size=6))
    def fill(self, k: int, first: int, fills: list[int]) -> None:
        i, addr, npages = self.pick_vma(k)
        first %= npages
        fills = fills[: npages - first]  # past the end is tested by write()
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
    def madvise_dontneed(self, k: int, first: int, count: int) -> None:
        i, addr, npages = self.pick_vma(k)
        start = addr + (first % npages) * PAGE_SIZE
        self.both(lambda side, m: self.procs[side][i].madvise(start, count * PAGE_SIZE,
                                                               MADV_DONTNEED))

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

    @rule(n=st.integers(0, 9), count=st.integers(0, 30))
    def do_scans(self, n: int, count: int) -> None:
        # many batches in one call: the rows (and all state, checked after every rule)
        self.both(lambda side, m: m.ksm.do_scans(n, count).tolist())

    @rule()
    def do_scan_to_round_end(self) -> None:
        # a batch larger than every mm: it ends where the full scan ends
        self.both(lambda side, m: m.ksm.do_scan(1 << 20))

    @rule(run=st.sampled_from([0, 1, 1, 1, 2]))
    def set_run(self, run: int) -> None:
        self.both(lambda side, m: setattr(m.ksm, "run", run))

    @rule(name=st.sampled_from(["use_zero_pages", "smart_scan"]), value=st.booleans())
    def set_bool_knob(self, name: str, value: bool) -> None:
        self.both(lambda side, m: setattr(m.ksm, name, value))

    # ---- NUMA

    @precondition(lambda self: self.live())
    @rule(k=index, mode=st.integers(0, 7), nodes=st.lists(st.integers(0, 2), max_size=2))
    def set_mempolicy(self, k: int, mode: int, nodes: list[int]) -> None:
        i = self.live()[k % len(self.live())]
        self.both(lambda side, m: self.procs[side][i].set_mempolicy(mode, nodes))

    @precondition(lambda self: self.vmas)
    @rule(k=index, page=st.integers(0, 5), node=st.integers(0, 1))
    def migrate_page(self, k: int, page: int, node: int) -> None:
        """NUMA balancing or compaction moves the frame behind one page (and so every
        mapping of it); the pfn differs between implementations, the page does not."""
        i, addr, npages = self.pick_vma(k)
        a = addr + (page % npages) * PAGE_SIZE

        def move(side: int, m: Any) -> None:
            p = self.procs[side][i]
            pfn = p.pfn(a)
            if pfn:  # present, not the zero page
                m.migrate_page(pfn, node)

        self.both(move)

    @precondition(lambda self: self.vmas)
    @rule(k=index, first=st.integers(0, 5), count=st.integers(1, 7), node=st.integers(0, 1),
          all_=st.booleans())
    def move_pages(self, k: int, first: int, count: int, node: int, all_: bool) -> None:
        i, addr, npages = self.pick_vma(k)
        start = addr + (first % npages) * PAGE_SIZE
        flags = MPOL_MF_MOVE_ALL if all_ else MPOL_MF_MOVE
        out = self.both(lambda side, m: self.procs[side][i].move_pages(start, count, node, flags))
        if out[0] == "ok":
            self.move_statuses |= set(out[1])

    @rule(value=st.integers(0, 1))
    def set_merge_across_nodes(self, value: int) -> None:
        self.both(lambda side, m: setattr(m.ksm, "merge_across_nodes", value))

    @rule(value=st.sampled_from([2, 3, 256]))
    def set_max_page_sharing(self, value: int) -> None:
        self.both(lambda side, m: setattr(m.ksm, "max_page_sharing", value))

    @rule(text=st.sampled_from(["1", "0\n", "3", "-1", "", "x", "2000", "on"]))
    def sysfs_write_run(self, text: str) -> None:
        self.both(lambda side, m: m.ksm.sysfs_write("run", text))

    # ---- prctl, exec, time and the advisor

    @precondition(lambda self: self.live())
    @rule(k=index, value=st.sampled_from([0, 1, 1, 2]), bad=st.booleans())
    def prctl_set_memory_merge(self, k: int, value: int, bad: bool = False) -> None:
        i = self.live()[k % len(self.live())]
        arg3 = 1 if bad and value == 2 else 0  # now and then EINVAL
        self.both(lambda side, m: self.procs[side][i].prctl_set_memory_merge(value, arg3))
        self.both(lambda side, m: self.procs[side][i].prctl_get_memory_merge())

    @precondition(lambda self: self.live())
    @rule(k=index)
    def exec(self, k: int) -> None:
        i = self.live()[k % len(self.live())]
        out = self.both(lambda side, m: self.procs[side][i].exec())
        if out[0] == "ok":
            self.vmas = [v for v in self.vmas if v[0] != i]

    @rule(ms=st.sampled_from([0, 1, 3, 10, 25]))
    def run_for(self, ms: int) -> None:
        self.both(lambda side, m: m.run_for(ms / 1000))

    @rule(ms=st.sampled_from([1, 500, 2000]))
    def advance_clock(self, ms: int) -> None:
        self.both(lambda side, m: setattr(m, "clock_ms", m.clock_ms + ms))

    @rule(value=st.sampled_from([1, 5, 20]))
    def set_sleep_millisecs(self, value: int) -> None:
        self.both(lambda side, m: setattr(m.ksm, "sleep_millisecs", value))

    @rule(mode=st.sampled_from(["none", "scan-time", "scan-time\n", "other"]))
    def set_advisor_mode(self, mode: str) -> None:
        self.both(lambda side, m: m.ksm.sysfs_write("advisor_mode", mode))

    @rule(name=st.sampled_from(["advisor_max_cpu", "advisor_min_pages_to_scan",
                                "advisor_max_pages_to_scan", "advisor_target_scan_time",
                                "pages_to_scan", "stable_node_chains_prune_millisecs"]),
          value=st.sampled_from(["0", "1", "3", "40", "200", "4294967297", "x"]))
    def set_tuning_knob(self, name: str, value: str) -> None:
        self.both(lambda side, m: m.ksm.sysfs_write(name, value))

    # ---- invalid operations: the same error on both, and nothing changes

    @precondition(lambda self: self.vmas)
    @rule(k=index, op=st.integers(0, 23))
    def invalid_call(self, k: int, op: int) -> None:
        i, addr, npages = self.pick_vma(k)
        big = 1 << 63

        def call(side: int, m: Any) -> Any:
            p = self.procs[side][i]
            return [
                lambda: p.mmap(True),
                lambda: p.mmap(4, node=0.5),
                lambda: p.mmap(4, node=2),
                lambda: p.mmap(-3),
                lambda: p.mmap(m.max_pages + 1),
                lambda: p.munmap(-PAGE_SIZE, PAGE_SIZE),
                lambda: p.munmap(addr, 0),
                lambda: p.madvise(-PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE),
                lambda: p.madvise(addr, npages * PAGE_SIZE, 1.0),
                lambda: p.madvise(addr, (npages + 1) * PAGE_SIZE, MADV_UNMERGEABLE),
                lambda: p.read(addr + npages * PAGE_SIZE, 1 << 31),
                lambda: p.read(addr, -1),
                lambda: p.write(-5, b"x"),
                lambda: p.prctl_set_memory_merge(1, 0.0),
                lambda: p.prctl_set_memory_merge(0, 1),
                lambda: p.set_mempolicy(1, [0.5]),
                lambda: p.move_pages(addr, 1, 0, flags=0),
                lambda: p.move_pages(addr + 1, 1, 0),
                lambda: m.ksm.do_scan(big),
                lambda: m.ksm.do_scan(None),
                lambda: m.ksm.scan(-1),
                lambda: setattr(m, "clock", 1e20),
                lambda: m.run_for(1e12),
                lambda: m.pfn_to_nid(1 << 40),
            ][op]()

        self.both_refuse(call)

    @precondition(lambda self: self.vmas)
    @rule(k=index, count=st.integers(1, 6))
    def numpy_integers(self, k: int, count: int) -> None:
        """numpy integers are integers: accepted wherever an int is."""
        i, addr, npages = self.pick_vma(k)
        self.both(lambda side, m: self.procs[side][i].read(np.int64(addr),
                                                           np.uint16(count * PAGE_SIZE)))
        self.both(lambda side, m: m.ksm.do_scan(np.int32(count)))

    # ---- after every step

    def check(self) -> dict[str, Any]:
        """Both invariant checkers pass and the observable states are equal."""
        for m in self.machines:
            m.check_invariants()
        engine, reference = (snapshot(m, self.procs[s]) for s, m in enumerate(self.machines))
        assert engine == reference
        assert [m.clock_ns for m in self.machines] == [self.machines[1].clock_ns] * 2
        assert self.machines[0].ksmd_cpu_ns == self.machines[1].ksmd_cpu_ns
        # the same tracepoint events in the same order (pfns compared by what they name)
        traced = [canonical_events(self.events[s], self.procs[s]) for s in (0, 1)]
        assert traced[0] == traced[1]
        self.seen |= {e["event"] for e in self.events[0]}
        for events in self.events:
            events.clear()
        # where things are: stable nodes (placement, nid, sharing) and memory per node
        placed = [
            sorted((n["nid"], n["where"], n["rmap_hlist_len"], m.pfn_to_nid(n["kpfn"]))
                   for n in m.ksm.stable_nodes())
            for m in self.machines
        ]
        assert placed[0] == placed[1]
        assert self.machines[0].ksm.node_stats() == self.machines[1].ksm.node_stats()
        # huge pages: the pages their splits freed, per process and in all
        split_zero = [(m.thp_split_zero_pages, m.thp_splits,
                       [p.thp_split_zero_pages for p in self.procs[s] if not p.exited])
                      for s, m in enumerate(self.machines)]
        assert split_zero[0] == split_zero[1]
        return engine["stats"]

    @invariant()
    def same_state(self) -> None:
        stats = self.check()
        for name in ("pages_sharing", "pages_unshared", "stable_node_chains", "ksm_zero_pages",
                     "pages_skipped"):
            if stats.get(name):
                event(f"reached {name} > 0")


class ThpDifferential(Differential):
    """The same, with mappings that huge pages back: PMD-aligned mmaps of 2 MiB
    multiples, MADV_HUGEPAGE, the THP knobs, zero-filled subpages, duplicates within
    and across huge pages, read faults (the huge zero page), fork + write, zaps of
    whole and partial PMD ranges."""

    @rule(k=index, huge=st.sampled_from([HPAGE_PMD_NR, 2 * HPAGE_PMD_NR, HPAGE_PMD_NR + 3]),
          advise=st.sampled_from([MADV_HUGEPAGE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, None]))
    def mmap_huge(self, k: int, huge: int, advise: int | None) -> None:
        if not self.live():
            self.spawn()
        i = self.live()[k % len(self.live())]
        out = self.both(lambda side, m: self.procs[side][i].mmap(huge))
        if out[0] != "ok":
            return
        self.vmas.append((i, out[1], huge))
        if advise is not None:
            self.both(lambda side, m: self.procs[side][i].madvise(out[1], huge * PAGE_SIZE,
                                                                   advise))

    def huge_vmas(self) -> list[tuple[int, int, int]]:
        return [v for v in self.vmas if v[2] >= HPAGE_PMD_NR]

    @precondition(lambda self: any(v[2] >= HPAGE_PMD_NR for v in self.vmas))
    @rule(k=index, seed=st.integers(0, 1 << 16), start=st.integers(0, 600),
          count=st.sampled_from([1, 3, 64, 512, 1024]))
    def fill_huge(self, k: int, seed: int, start: int, count: int) -> None:
        """Pages of few contents (zero-filled ones among them), so that subpages repeat
        within one huge page and across huge pages and processes."""
        i, addr, npages = self.huge_vmas()[k % len(self.huge_vmas())]
        start %= npages
        count = min(count, npages - start)
        rng = np.random.default_rng(seed)
        fills = rng.choice([0, 0, 0, 1, 2, 3, 0xCF], count)
        pages = np.repeat(fills.astype(np.uint8)[:, None], PAGE_SIZE, axis=1)
        self.both(lambda side, m: self.procs[side][i].fill(addr + start * PAGE_SIZE, pages))

    @precondition(lambda self: any(v[2] >= HPAGE_PMD_NR for v in self.vmas))
    @rule(k=index, which=st.integers(0, 3), whole=st.booleans(), advice=st.sampled_from(
        [MADV_DONTNEED, MADV_MERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_UNMERGEABLE]))
    def madvise_pmd(self, k: int, which: int, whole: bool, advice: int) -> None:
        """madvise() of a whole PMD range, or of a piece that cuts one."""
        i, addr, npages = self.huge_vmas()[k % len(self.huge_vmas())]
        first = (which * HPAGE_PMD_NR) % npages
        count = min(HPAGE_PMD_NR, npages - first) if whole else 7
        start = addr + (first + (0 if whole else 100)) * PAGE_SIZE
        self.both(lambda side, m: self.procs[side][i].madvise(start, count * PAGE_SIZE, advice))

    @precondition(lambda self: any(v[2] >= HPAGE_PMD_NR for v in self.vmas))
    @rule(k=index, first=st.integers(0, 1100), count=st.sampled_from([1, 5, HPAGE_PMD_NR]))
    def read_fault(self, k: int, first: int, count: int) -> None:
        i, addr, npages = self.huge_vmas()[k % len(self.huge_vmas())]
        first %= npages
        count = min(count, npages - first)
        self.both(lambda side, m: self.procs[side][i].read_fault(addr + first * PAGE_SIZE,
                                                                  count * PAGE_SIZE))

    @precondition(lambda self: any(v[2] >= HPAGE_PMD_NR for v in self.vmas))
    @rule(k=index, page=st.integers(0, 1100), data=st.binary(min_size=1, max_size=3))
    def write_huge(self, k: int, page: int, data: bytes) -> None:
        """A write anywhere in a huge mapping (after a fork: the COW of one subpage)."""
        i, addr, npages = self.huge_vmas()[k % len(self.huge_vmas())]
        a = addr + (page % npages) * PAGE_SIZE
        self.both(lambda side, m: self.procs[side][i].write(a, data))

    @rule(enabled=st.sampled_from(["always", "madvise", "madvise", "never", "bad"]),
          use_zero_page=st.sampled_from([0, 1, 1]))
    def set_thp(self, enabled: str, use_zero_page: int) -> None:
        self.both(lambda side, m: setattr(m, "thp_enabled", enabled))
        self.both(lambda side, m: setattr(m, "thp_use_zero_page", use_zero_page))

    @invariant()
    def huge_vmas_aligned(self) -> None:
        for _, addr, npages in self.vmas:
            if npages % HPAGE_PMD_NR == 0:
                assert addr % HPAGE_PMD_SIZE == 0


ThpDifferential.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestThpDifferential = ThpDifferential.TestCase


Differential.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDifferential = Differential.TestCase


def test_engine_is_the_default_machine() -> None:
    assert ksmcore.Machine is machine_class("engine")


# ---- long seeded programs: the same rules, weighted towards merging, 250 steps each

WEIGHTS = {
    "fill": 6, "write": 4, "do_scan": 5, "do_scan_to_round_end": 6, "madvise": 3,
    "munmap": 1, "fork": 2, "exit": 1, "mmap": 2, "spawn": 1, "set_run": 1,
    "set_bool_knob": 1, "set_max_page_sharing": 1, "set_mempolicy": 1, "migrate_page": 3,
    "move_pages": 1, "set_merge_across_nodes": 1, "prctl_set_memory_merge": 1, "exec": 1,
    "run_for": 3, "advance_clock": 1, "set_sleep_millisecs": 1, "set_advisor_mode": 1,
    "set_tuning_knob": 1, "madvise_dontneed": 1,
}


# NUMA programs: merge_across_nodes=0 from the start, migrations between small batches
NUMA_WEIGHTS = dict(WEIGHTS, migrate_page=8, do_scan=8, set_merge_across_nodes=0, munmap=0,
                    exit=0, set_max_page_sharing=0)


def run_program(seed: int, steps: int = 250, numa: bool = False,
                kernel: str = Differential.KERNEL) -> set[str]:
    """Run one seeded random program through both machines (the kernel profile
    ``kernel``); returns what it reached."""
    rng = np.random.default_rng(seed)
    d = type(f"Differential_{kernel}", (Differential,), {"KERNEL": kernel})()
    if numa:
        d.both(lambda side, m: setattr(m.ksm, "merge_across_nodes", 0))
    d.start(int(rng.integers(1, 7)), True, [int(x) for x in rng.choice(FILLS, 6)])
    reached: set[str] = set()
    weights = NUMA_WEIGHTS if numa else WEIGHTS
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    k = lambda: int(rng.integers(0, 1 << 16))  # noqa: E731
    for _ in range(steps):
        op = names[rng.choice(len(names), p=p / p.sum())]
        if op in ("fill", "write", "madvise", "munmap", "migrate_page", "move_pages",
                  "madvise_dontneed") and not d.vmas:
            continue
        if op in ("mmap", "fork", "exit", "set_mempolicy", "prctl_set_memory_merge", "exec") \
                and not d.live():
            continue
        if op == "fill":
            d.fill(k(), int(rng.integers(0, 6)),
                   [int(x) for x in rng.choice(FILLS, int(rng.integers(1, 7)))])
        elif op == "write":
            d.write(k(), int(rng.integers(0, 6 * PAGE_SIZE)),
                    bytes(rng.choice([0, 1, 0xCF], int(rng.integers(1, 9))).astype(np.uint8)))
        elif op == "do_scan":
            d.do_scan(int(rng.integers(1, 41)))
        elif op == "do_scan_to_round_end":
            d.do_scan_to_round_end()
        elif op == "madvise":
            d.madvise(k(), int(rng.integers(0, 7)), int(rng.integers(1, 7)),
                      bool(rng.random() < 0.8))
        elif op == "munmap":
            d.munmap(k(), int(rng.integers(0, 7)), int(rng.integers(1, 7)))
        elif op == "madvise_dontneed":
            d.madvise_dontneed(k(), int(rng.integers(0, 7)), int(rng.integers(1, 7)))
        elif op == "fork":
            d.fork(k())
        elif op == "exit":
            d.exit(k())
        elif op == "mmap":
            d.mmap(k(), int(rng.integers(1, 7)), [None, None, 0, 1][int(rng.integers(0, 4))])
        elif op == "spawn":
            d.spawn(int(rng.integers(0, 2)))
        elif op == "set_run":
            d.set_run(int(rng.choice([0, 1, 1, 1, 1, 2])))
        elif op == "set_bool_knob":
            d.set_bool_knob(str(rng.choice(["use_zero_pages", "smart_scan"])),
                            bool(rng.random() < 0.5))
        elif op == "set_max_page_sharing":
            d.set_max_page_sharing(int(rng.choice([2, 3, 256])))
        elif op == "set_mempolicy":
            d.set_mempolicy(k(), int(rng.integers(0, 8)),
                            [int(x) for x in rng.integers(0, 3, int(rng.integers(0, 3)))])
        elif op == "migrate_page":
            d.migrate_page(k(), int(rng.integers(0, 6)), int(rng.integers(0, 2)))
        elif op == "move_pages":
            d.move_pages(k(), int(rng.integers(0, 6)), int(rng.integers(1, 8)),
                         int(rng.integers(0, 2)), bool(rng.random() < 0.5))
        elif op == "prctl_set_memory_merge":
            d.prctl_set_memory_merge(k(), int(rng.choice([0, 1, 1, 2])), bool(rng.random() < 0.2))
        elif op == "exec":
            d.exec(k())
        elif op == "run_for":
            d.run_for(int(rng.choice([0, 1, 3, 10, 25])))
        elif op == "advance_clock":
            d.advance_clock(int(rng.choice([1, 500, 2000])))
        elif op == "set_sleep_millisecs":
            d.set_sleep_millisecs(int(rng.choice([1, 5, 20])))
        elif op == "set_advisor_mode":
            d.set_advisor_mode(str(rng.choice(["none", "scan-time", "scan-time\n", "other"])))
        elif op == "set_tuning_knob":
            d.set_tuning_knob(
                str(rng.choice(["advisor_max_cpu", "advisor_min_pages_to_scan",
                                "advisor_max_pages_to_scan", "advisor_target_scan_time",
                                "pages_to_scan", "stable_node_chains_prune_millisecs"])),
                str(rng.choice(["0", "1", "3", "40", "200", "4294967297", "x"])))
        elif op == "set_merge_across_nodes":
            # run=2 first most of the time, so that the switch is allowed
            if rng.random() < 0.7:
                d.set_run(2)
            d.set_merge_across_nodes(int(rng.integers(0, 2)))
            d.set_run(1)
        stats = d.check()
        reached |= {n for n in ("pages_sharing", "pages_unshared", "stable_node_chains",
                                "ksm_zero_pages", "pages_skipped") if stats.get(n)}
        if any(n["where"] == "migrate" for n in d.machines[0].ksm.stable_nodes()):
            reached.add("migrate_nodes")
        if not stats["merge_across_nodes"] and stats["pages_sharing"]:
            reached.add("per-node trees")
        if any(p.ksm_stat().get("ksm_merge_any") for p in d.procs[0] if not p.exited):
            reached.add("merge_any")
    reached |= {f"event {name}" for name in d.seen}
    if -errno.EBUSY in d.move_statuses:  # two addresses of one page queued in one call
        reached.add("move_pages -EBUSY")
    return reached


@pytest.mark.parametrize("seed", range(24))
def test_seeded_program(seed: int) -> None:
    run_program(seed)


@pytest.mark.parametrize("seed", range(12))
def test_seeded_numa_program(seed: int) -> None:
    run_program(seed, numa=True)


@pytest.mark.parametrize("kernel", ["6.1", "6.6", "6.8", "6.12"])
@pytest.mark.parametrize("seed", range(3))
def test_seeded_program_older_kernels(kernel: str, seed: int) -> None:
    """The profiles of older kernels keep the engine and the reference in agreement."""
    reached = run_program(1000 + seed, steps=150, numa=bool(seed % 2), kernel=kernel)
    assert "pages_sharing" in reached


def test_seeded_programs_reach_every_path() -> None:
    """The seeded programs are only worth something if they reach the interesting states."""
    reached: set[str] = set()
    for seed in range(100, 112):
        reached |= run_program(seed, steps=150)
    # a stable node stays on migrate_nodes only in rarer programs (a single-mapped
    # migrated page meeting equal content, or the replace path): these seeds get there;
    # 351 moves two addresses of one KSM page in one move_pages call (-EBUSY)
    for seed in (321, 334, 341, 351):
        reached |= run_program(seed, steps=250, numa=True)
    assert reached >= {"pages_sharing", "pages_unshared", "stable_node_chains",
                       "ksm_zero_pages", "pages_skipped", "migrate_nodes", "per-node trees",
                       "merge_any", "move_pages -EBUSY"} \
        | {f"event {name}" for name in EVENT_FIELDS}


THP_WEIGHTS = dict(WEIGHTS, mmap_huge=2, fill_huge=6, madvise_pmd=3, read_fault=2,
                   write_huge=4, set_thp=1, munmap=0)


def run_thp_program(seed: int, steps: int = 80) -> set[str]:
    """A seeded program over huge mappings: THP on (madvise), MADV_MERGEABLE and
    MADV_HUGEPAGE on most of them, with the base rules mixed in."""
    rng = np.random.default_rng(seed)
    d = ThpDifferential()
    d.start(int(rng.integers(1, 7)), True, [int(x) for x in rng.choice(FILLS, 6)])
    reached: set[str] = set()
    names = list(THP_WEIGHTS)
    p = np.array([THP_WEIGHTS[n] for n in names], dtype=float)
    k = lambda: int(rng.integers(0, 1 << 16))  # noqa: E731
    for _ in range(steps):
        op = names[rng.choice(len(names), p=p / p.sum())]
        huge = [v for v in d.vmas if v[2] >= HPAGE_PMD_NR]
        if op in ("fill_huge", "madvise_pmd", "read_fault", "write_huge") and not huge:
            op = "mmap_huge"
        if op == "mmap_huge":
            d.mmap_huge(k(), int(rng.choice([HPAGE_PMD_NR, 2 * HPAGE_PMD_NR])), MADV_HUGEPAGE)
            i, addr, npages = d.vmas[-1]
            d.both(lambda side, m, i=i, addr=addr, npages=npages: d.procs[side][i].madvise(
                addr, npages * PAGE_SIZE, MADV_MERGEABLE))
        elif op == "fill_huge":
            d.fill_huge(k(), k(), int(rng.integers(0, 600)),
                        int(rng.choice([1, 3, 64, 512, 1024])))
        elif op == "madvise_pmd":
            d.madvise_pmd(k(), int(rng.integers(0, 4)), bool(rng.random() < 0.5),
                          int(rng.choice([MADV_DONTNEED, MADV_MERGEABLE, MADV_HUGEPAGE,
                                          MADV_NOHUGEPAGE, MADV_UNMERGEABLE])))
        elif op == "read_fault":
            d.read_fault(k(), int(rng.integers(0, 1100)), int(rng.choice([1, 5, 512])))
        elif op == "write_huge":
            d.write_huge(k(), int(rng.integers(0, 1100)), b"\x01")
        elif op == "set_thp":
            d.set_thp(str(rng.choice(["always", "madvise", "never"])), int(rng.integers(0, 2)))
        elif op == "fill":
            d.fill(k(), int(rng.integers(0, 6)), [int(x) for x in rng.choice(FILLS, 3)])
        elif op == "fork" and d.live():
            d.fork(k())
        elif op == "exit" and d.live():
            d.exit(k())
        elif op in ("do_scan", "run_for"):
            d.do_scan(int(rng.integers(1, 400)))
        elif op == "do_scan_to_round_end":
            d.do_scan_to_round_end()
        elif op == "set_bool_knob":
            d.set_bool_knob(str(rng.choice(["use_zero_pages", "smart_scan"])),
                            bool(rng.random() < 0.5))
        elif op == "migrate_page" and d.vmas:
            d.migrate_page(k(), int(rng.integers(0, 6)), int(rng.integers(0, 2)))
        else:
            continue
        stats = d.check()
        if d.machines[0].thp_split_zero_pages:
            reached.add("split zero pages")
        if d.machines[0].thp_splits:
            reached.add("huge page split")
        if stats["pages_sharing"]:
            reached.add("pages_sharing")
    return reached


@pytest.mark.parametrize("seed", range(6))
def test_seeded_thp_program(seed: int) -> None:
    run_thp_program(seed)


def test_seeded_thp_programs_split_huge_pages() -> None:
    reached: set[str] = set()
    for seed in range(200, 203):
        reached |= run_thp_program(seed, steps=60)
    assert reached >= {"split zero pages", "huge page split", "pages_sharing"}
