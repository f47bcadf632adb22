"""``m.ksm.do_scans(n, count)``: many ksm_do_scan(n) batches in one call decide and cost
exactly what as many ``do_scan(n)`` calls do, on both implementations, and the engine's
rows equal the reference's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ksmcore.api import BATCH_COLUMNS
from ksmcore.checks import MAX_BATCHES
from ksmcore.constants import MADV_HUGEPAGE, MADV_MERGEABLE, PAGE_SIZE
from ksmcore.timing import CostModel

from conftest import machine_class


def _workload(m: Any, seed: int) -> list[Any]:
    """Duplicates beyond max_page_sharing (chains), zero pages, unique pages, a huge
    page, several processes and VMAs; a cost model whose batches cross many jiffies so
    that chain pruning depends on the clock."""
    rng = np.random.default_rng(seed)
    m.cost_model = CostModel(page_ns=700_000, batch_ns=300_000)
    m.ksm.max_page_sharing = 3
    m.ksm.use_zero_pages = seed % 2
    m.ksm.smart_scan = 1
    m.ksm.stable_node_chains_prune_millisecs = 7
    m.thp_enabled = "madvise"
    common = rng.integers(0, 256, (4, PAGE_SIZE), dtype=np.uint8)
    procs = []
    for k in range(3):
        p = m.spawn()
        for npages in (23 + k, 9):
            pages = rng.integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
            pick = rng.random(npages)
            pages[pick < 0.5] = common[rng.integers(0, 4, int((pick < 0.5).sum()))]
            pages[(pick >= 0.5) & (pick < 0.65)] = 0
            a = p.mmap(npages)
            p.fill(a, pages)
            p.madvise(a, npages * PAGE_SIZE, MADV_MERGEABLE)
        procs.append(p)
    # a huge page of two contents (merging splits it)
    p = procs[0]
    a = p.mmap(1024)
    h = a + (-a) % (512 * PAGE_SIZE)
    p.madvise(h, 512 * PAGE_SIZE, MADV_HUGEPAGE)
    p.madvise(h, 512 * PAGE_SIZE, MADV_MERGEABLE)
    huge = np.zeros((512, PAGE_SIZE), np.uint8)
    huge[::2] = common[1]
    p.fill(h, huge)
    m.ksm.run = 1
    return procs


def _counters(m: Any) -> tuple[Any, ...]:
    return (m.ksm.stats(every=True), m.clock_ns, m.ksmd_cpu_ns,
            [p.ksm_stat(every=True) for p in m.processes])


def _state(m: Any) -> tuple[Any, ...]:
    """Within one implementation: the counters and every stable node by its pfn."""
    return (*_counters(m), m.ksm.stable_nodes())


@pytest.mark.parametrize("impl", ["engine", "reference"])
@pytest.mark.parametrize("seed,n,count", [(0, 5, 7), (1, 1, 40), (2, 16, 3), (3, 64, 1000)])
def test_do_scans_is_do_scan_repeated(impl: str, seed: int, n: int, count: int) -> None:
    cls = machine_class(impl)
    one, many = cls(), cls()
    procs = _workload(one, seed)
    _workload(many, seed)
    with one.tracing() as ev_one, many.tracing() as ev_many:
        for round_ in range(12):
            rows = many.ksm.do_scans(n, count)
            assert rows.dtype == np.int64 and rows.shape[1] == len(BATCH_COLUMNS)
            expect = []
            seqnr = one.ksm.full_scans
            while len(expect) < count:
                done = one.ksm.do_scan(n)
                s = one.ksm.stats(every=True)
                expect.append([done, s["pages_sharing"], s["ksm_zero_pages"],
                               s["general_profit"]])
                if one.ksm.full_scans != seqnr:
                    break
            assert rows.tolist() == expect, f"round {round_}"
            assert _state(many) == _state(one), f"round {round_}"
            one.check_invariants()
            many.check_invariants()
            if round_ == 5:
                # the memory moves between calls: a write, an exit
                for m in (one, many):
                    m.processes[1].exit()
                    q = m.processes[0]
                    q.write(q.maps()[0][0], b"\x01" * 100)
        assert ev_many == ev_one
    assert procs[0].exited is False


def test_engine_rows_equal_the_reference() -> None:
    e, r = machine_class("engine")(), machine_class("reference")()
    _workload(e, 4)
    _workload(r, 4)
    for _ in range(10):
        assert e.ksm.do_scans(10, 9).tolist() == r.ksm.do_scans(10, 9).tolist()
        assert _counters(e) == _counters(r)  # (pfns are numbered differently)


def test_a_full_scan_ends_the_call(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = p.mmap(10)
    p.fill(a, np.zeros((10, PAGE_SIZE), np.uint8))
    p.madvise(a, 10 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    rows = m.ksm.do_scans(4, 100)
    # 4 + 4 + 2 pages, and the full scan ended with the third batch
    assert rows[:, 0].tolist() == [4, 4, 2]
    assert m.ksm.full_scans == 1
    # a scan ending exactly at a batch's end: the next batch processes nothing and ends it
    rows = m.ksm.do_scans(5, 100)
    assert rows[:, 0].tolist() == [5, 5, 0]
    assert m.ksm.full_scans == 2
    assert m.ksm.do_scans(0, 3)[:, 0].tolist() == [0, 0, 0]
    m.ksm.run = 0
    assert m.ksm.do_scans(4, 5).shape == (0, len(BATCH_COLUMNS))


def test_bad_arguments_change_nothing(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    a = p.mmap(3)
    p.madvise(a, 3 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    before = _state(m)
    for n, count, err in ((-1, 1, ValueError), (1, -1, ValueError), (2**32, 1, ValueError),
                          (1, MAX_BATCHES + 1, ValueError), (True, 1, TypeError),
                          (1, 1.5, TypeError)):
        with pytest.raises(err):
            m.ksm.do_scans(n, count)
        assert _state(m) == before
