"""W1: 262,144 pages (1 GiB) in one process, 4,096 distinct pages x 64 copies, two full
scans from cold (the first records checksums, the second merges).

The kernel's ksmd (pages_to_scan=100000, sleep_millisecs=0, smart_scan=0), the engine
and the reference (on a 1/64 slice: per-page cost) run the same contents in one run;
the counters are checked before any time is reported.
Run: python -m pytest benchmarks -q  (the kernel part needs root and KSM).
"""

from __future__ import annotations

from typing import Any

import pytest

import ksmcore
import ksmcore.reference
from ksmcore.kernel import kernel_available, time_kernel
from ksmcore.workloads import Workload, w1_workload

AVAILABLE, WHY = kernel_available()
W1 = w1_workload()
W1_SLICE = w1_workload(npages=4096, copies=64)
MERGE_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


def expected(w: Workload) -> dict[str, int]:
    distinct = W1.processes[0].shape[0] // 64 if w is W1 else w.processes[0].shape[0] // 64
    return {
        "pages_shared": distinct,
        "pages_sharing": w.npages - distinct,
        "pages_unshared": 0,
        "pages_volatile": 0,
    }


def prepare(machine_cls: type, w: Workload) -> tuple[tuple[Any], dict]:
    m = machine_cls()
    for pages in w.processes:
        p = m.spawn()
        addr = p.mmap(len(pages))
        p.fill(addr, pages)
        p.madvise(addr, len(pages) * 4096, ksmcore.MADV_MERGEABLE)
    for name, value in w.knobs.items():
        setattr(m.ksm, name, value)
    return (m,), {}


def two_scans(m: Any) -> Any:
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    return m


@pytest.mark.parametrize(
    "impl,w",
    [("engine", W1), ("reference", W1_SLICE)],
    ids=["engine", "reference-slice"],
)
def test_w1_model(benchmark: Any, record: Any, impl: str, w: Workload) -> None:
    cls = ksmcore.Machine if impl == "engine" else ksmcore.reference.Machine
    rounds = 3 if impl == "engine" else 1
    m = benchmark.pedantic(two_scans, setup=lambda: prepare(cls, w), rounds=rounds, iterations=1)
    s = m.ksm.stats()
    assert {k: s[k] for k in MERGE_COUNTERS} == expected(w)
    record("W1", impl, benchmark.stats.stats.median, w.npages)


@pytest.mark.skipif(not AVAILABLE, reason=f"the kernel's ksmd needs it: {WHY}")
def test_w1_kernel(benchmark: Any, record: Any) -> None:
    results = []

    def run() -> None:
        results.append(time_kernel(W1))

    benchmark.pedantic(run, rounds=2, iterations=1)
    for _, result in results:
        assert {k: result.counters[k] for k in MERGE_COUNTERS} == expected(W1)
    times = sorted(s for s, _ in results)
    record("W1", "kernel", times[len(times) // 2], W1.npages)
