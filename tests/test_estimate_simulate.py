"""ksmcore estimate's simulation: the convergence rule, the time model, and the same
counters as the model API driven directly (engine and reference)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ksmcore
import ksmcore.reference
from ksmcore.constants import COUNTERS, KSM_STAT_FIELDS, PAGE_SIZE
from ksmcore.estimate import report
from ksmcore.estimate.errors import EstimateError
from ksmcore.estimate.simulate import (
    DEFAULT_COST_PER_PAGE_US,
    Knobs,
    converged_at_scan,
    cpu_fraction,
    ksmd_times,
    load,
    milestone_times,
    new_machine,
    pages_per_second,
    run_ksmd,
)
from ksmcore.estimate.sources import Source
from ksmcore.timing import CostModel
from ksmcore.workloads import Workload, parity_workloads, run_model


def src(name: str, *segments: np.ndarray, node: int | None = None) -> Source:
    return Source(name, "sample", [np.ascontiguousarray(s) for s in segments], node=node)


def scans(*savings: tuple[int, int, int]) -> list[dict[str, int]]:
    return [{"pages_shared": a, "pages_sharing": b, "ksm_zero_pages": c} for a, b, c in savings]


def test_convergence_needs_two_unchanged_scans_after_the_second() -> None:
    z, s = (0, 0, 0), (3, 9, 0)
    assert converged_at_scan(scans(z, s, s)) is None  # only one unchanged scan
    assert converged_at_scan(scans(z, s, s, s)) == 2
    assert converged_at_scan(scans(z, z, z, z)) == 2  # nothing merges: known after scan 2
    assert converged_at_scan(scans(z, s, (4, 9, 0), s, s)) is None
    assert converged_at_scan(scans(z, s, (4, 9, 0), (4, 9, 0), (4, 9, 0))) == 3
    assert converged_at_scan(scans(z, z, z, s, s, s)) == 4


def test_time_model() -> None:
    cost = 2e-6
    t = ksmd_times(np.array([100, 100, 0]), 20, cost)
    # each batch's work ends after the earlier batches' work and sleeps
    assert t == pytest.approx([100 * cost, 200 * cost + 0.02, 200 * cost + 0.04])
    assert pages_per_second(100, 20, cost) == pytest.approx(100 / (100 * cost + 0.02))
    assert pages_per_second(100, 0, cost) == pytest.approx(1 / cost)
    assert cpu_fraction(100, 0, cost) == 1.0
    # one cost model: the machine's (what m.run_for charges)
    assert DEFAULT_COST_PER_PAGE_US == CostModel().page_ns / 1000
    ms = milestone_times(np.array([0, 5, 9, 10, 10]), np.arange(5.0), 10)
    assert ms == {"50%": 1.0, "90%": 2.0, "100%": 3.0}
    assert milestone_times(np.array([0, 0]), np.arange(2.0), 0)["90%"] is None


def test_static_memory_converges_at_scan_2_with_exact_time() -> None:
    pages = np.full((1000, PAGE_SIZE), ord("*"), np.uint8)
    pages[::2] = np.random.default_rng(1).integers(0, 256, (500, PAGE_SIZE), dtype=np.uint8)
    knobs = Knobs(pages_to_scan=100, sleep_millisecs=20)
    m = new_machine(1, knobs)
    procs = load(m, [src("a", pages)])
    run = run_ksmd(m)
    assert run.converged and run.converged_at == 2 and run.full_scans == 4
    # 1000 pages in batches of 100: the 11th batch only ends the scan (processes 0)
    assert run.processed[:11].tolist() == [100] * 10 + [0]
    assert run.scan_ends.tolist() == [10, 21, 32, 43]
    cost = 2e-6
    result = report.build(m, procs, [src("a", pages)], run, knobs, cost)
    # two full scans: 2000 pages of work and 21 sleeps before the 22nd batch ended
    assert result["time_to_converge_s"] == pytest.approx(2000 * cost + 21 * 0.020)
    # 500 copies of '*' with max_page_sharing 256: a chain of two KSM pages
    assert result["saved"]["pages"] == 498 and result["ksm"]["pages_shared"] == 2
    assert result["full_scans"][1]["pages_sharing"] == 498


def test_smart_scan_does_not_block_convergence() -> None:
    rng = np.random.default_rng(3)
    uniques = rng.integers(0, 256, (300, PAGE_SIZE), dtype=np.uint8)
    dups = np.repeat(uniques[:5], 10, axis=0)
    m = new_machine(1, Knobs(smart_scan=1, pages_to_scan=50))
    load(m, [src("a", np.concatenate([uniques, dups]))])
    run = run_ksmd(m, max_scans=12)
    assert run.converged and run.converged_at == 2


def test_max_scans_stops_without_convergence() -> None:
    m = new_machine(1, Knobs())
    load(m, [src("a", np.full((10, PAGE_SIZE), 1, np.uint8))])
    run = run_ksmd(m, max_scans=3)
    assert not run.converged and run.full_scans == 3


def test_nothing_to_scan() -> None:
    m = new_machine(1, Knobs())
    procs = load(m, [Source("empty", "process", [])])
    run = run_ksmd(m)
    assert run.converged and run.full_scans == 0
    result = report.build(m, procs, [Source("empty", "process", [])], run, Knobs(), 1e-6)
    assert result["time_to_converge_s"] == 0.0 and result["saved"]["pages"] == 0
    assert "nothing to scan" in report.text(result)


def test_bad_knobs_name_the_option() -> None:
    with pytest.raises(EstimateError, match="--max-page-sharing 1") as e:
        new_machine(1, Knobs(max_page_sharing=1))
    assert e.value.exit_code == 2
    with pytest.raises(EstimateError, match="--merge-across-nodes 2"):
        new_machine(1, Knobs(merge_across_nodes=2))
    with pytest.raises(EstimateError, match="--pages-to-scan 0"):
        new_machine(1, Knobs(pages_to_scan=0))
    with pytest.raises(EstimateError, match="--nodes 0"):
        new_machine(0, Knobs())


def _as_workload_result(m: Any, procs: list[Any]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    s = m.ksm.stats()
    return {c: int(s[c]) for c in COUNTERS}, [
        {k: p.ksm_stat()[k] for k in KSM_STAT_FIELDS} for p in procs
    ]


@pytest.mark.parametrize("name", ["share3", "mix_zero_z1", "mps2", "smart1", "pts33"])
def test_same_counters_as_the_model_api(name: str) -> None:
    """The estimate's machine after N full scans is run_model's after N full scans, for
    the engine and the reference."""
    w = next(x for x in parity_workloads() if x.name == name)
    kn = w.effective_knobs()
    knobs = Knobs(max_page_sharing=kn["max_page_sharing"], pages_to_scan=kn["pages_to_scan"],
                  smart_scan=kn["smart_scan"], use_zero_pages=kn["use_zero_pages"])
    sources = [src(f"p{i}", a) for i, a in enumerate(w.processes)]
    results = []
    for cls in (ksmcore.Machine, ksmcore.reference.Machine):
        m = new_machine(1, knobs, machine_cls=cls)
        procs = load(m, sources)
        run = run_ksmd(m)
        assert run.converged
        results.append(_as_workload_result(m, procs))
        w2 = Workload(w.name, w.processes, w.knobs, full_scans=run.full_scans)
        expect = run_model(cls, w2)
        assert results[-1] == (expect.counters, expect.ksm_stat)
    assert results[0] == results[1]


def test_numa_merge_across_nodes() -> None:
    same = np.full((50, PAGE_SIZE), 7, np.uint8)
    sources = [src("a", same, node=0), src("b", same.copy(), node=1)]
    saved = {}
    for mam in (0, 1):
        m = new_machine(2, Knobs(merge_across_nodes=mam))
        procs = load(m, sources)
        run = run_ksmd(m)
        result = report.build(m, procs, sources, run, Knobs(merge_across_nodes=mam), 1e-6)
        saved[mam] = result["saved"]["pages"]
        assert [n["node"] for n in result["nodes"]] == [0, 1]
        assert [n["pages"] for n in result["nodes"]] == [50, 50]
        if hasattr(m.ksm, "node_stats"):  # numastat-like figures, where the machine has them
            for name in ("pages_shared", "pages_sharing"):
                assert sum(n[name] for n in result["nodes"]) == result["ksm"][name]
        assert "per node:" in report.text(result)
    assert saved == {0: 98, 1: 99}  # one KSM page per node, or one for both
