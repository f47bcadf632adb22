"""W2-W4 (issue 5): engine, kernel ksmd (where this machine can run the workload) and
reference (on a slice: per-page cost) on the same contents in one run; the counters
are checked equal before any time is reported. Run: python -m pytest benchmarks -q"""

from __future__ import annotations

from typing import Any

import pytest

import ksmcore
import ksmcore.reference
from ksmcore.bench import (
    KNOBS,
    MERGE_COUNTERS,
    merge_counters,
    time_fork_tree,
    time_numa_migrations,
    time_workload,
    w2_workload,
    w3_fork_tree,
)
from ksmcore.kernel import kernel_available, time_kernel
from ksmcore.workloads import Workload

AVAILABLE, WHY = kernel_available()
W2 = w2_workload()
W2_SLICE = w2_workload(npages=8192)
W3 = w3_fork_tree()
W3_SLICE = w3_fork_tree(npages=1024)


def run(benchmark: Any, fn: Any, rounds: int) -> Any:
    out = []
    benchmark.pedantic(lambda: out.append(fn()), rounds=rounds, iterations=1)
    return out


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


@pytest.mark.parametrize("impl", ["engine", "reference"])
def test_w2(benchmark: Any, record: Any, impl: str) -> None:
    cls, w, rounds = ((ksmcore.Machine, W2, 3) if impl == "engine"
                      else (ksmcore.reference.Machine, W2_SLICE, 1))
    runs = run(benchmark, lambda: time_workload(cls, w), rounds)
    reference = time_workload(ksmcore.Machine, w) if impl == "reference" else runs[0]
    assert merge_counters(runs[0].stats) == merge_counters(reference.stats)
    record("W2", impl, median([r.seconds for r in runs]), w.npages)


@pytest.mark.skipif(not AVAILABLE, reason=f"the kernel's ksmd needs it: {WHY}")
def test_w2_kernel(benchmark: Any, record: Any) -> None:
    runs = run(benchmark, lambda: time_kernel(W2), 2)
    engine = time_workload(ksmcore.Machine, W2)
    for _, result in runs:
        assert {k: result.counters[k] for k in MERGE_COUNTERS} == merge_counters(engine.stats)
    record("W2", "kernel", median([s for s, _ in runs]), W2.npages)


@pytest.mark.parametrize("impl", ["engine", "reference"])
def test_w3(benchmark: Any, record: Any, impl: str) -> None:
    cls, tree, rounds = ((ksmcore.Machine, W3, 3) if impl == "engine"
                         else (ksmcore.reference.Machine, W3_SLICE, 1))
    runs = run(benchmark, lambda: time_fork_tree(cls, tree), rounds)
    if impl == "reference":
        assert merge_counters(runs[0].stats) == merge_counters(
            time_fork_tree(ksmcore.Machine, tree).stats)
    record("W3", impl, median([r.seconds for r in runs]), tree.npages)


@pytest.mark.skipif(not AVAILABLE, reason=f"the kernel's ksmd needs it: {WHY}")
def test_w3_kernel(benchmark: Any, record: Any) -> None:
    w = Workload("W3", [W3.parent], knobs=dict(KNOBS), full_scans=2)
    runs = run(benchmark, lambda: time_kernel(w, writes=W3.writes), 2)
    engine = time_fork_tree(ksmcore.Machine, W3)
    for _, result in runs:
        assert {k: result.counters[k] for k in MERGE_COUNTERS} == merge_counters(engine.stats)
    record("W3", "kernel", median([s for s, _ in runs]), W3.npages)


@pytest.mark.parametrize("impl", ["engine", "reference"])
def test_w4(benchmark: Any, record: Any, impl: str) -> None:
    """No kernel here: this machine has one NUMA node."""
    cls, npages, rounds = ((ksmcore.Machine, 262_144, 3) if impl == "engine"
                           else (ksmcore.reference.Machine, 8192, 1))
    runs = run(benchmark, lambda: time_numa_migrations(cls, npages=npages), rounds)
    if impl == "reference":
        assert merge_counters(runs[0].stats) == merge_counters(
            time_numa_migrations(ksmcore.Machine, npages=npages).stats)
    record("W4", impl, median([r.seconds for r in runs]), runs[0].npages)
