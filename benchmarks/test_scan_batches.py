"""The per-batch Python path of the engine (m.ksm.scan -> Ksmd.ksm_do_scan ->
scan_get_next_rmap_item -> one ksm_scan_range per VMA run): 1 GiB of pages (4,096
distinct x 64 copies) in one process, pages_to_scan 100, four full scans, about
10,500 batches. Small batches make ksmd's Python walk, not the C merge, the cost.
Run: python -m pytest benchmarks/test_scan_batches.py -q
"""

from __future__ import annotations

from typing import Any

import numpy as np

import ksmcore

NPAGES = 262144
DISTINCT = 4096


def prepare() -> tuple[tuple[Any], dict]:
    rng = np.random.default_rng(1)
    distinct = rng.integers(0, 256, size=(DISTINCT, 4096), dtype=np.uint8)
    m = ksmcore.Machine()
    p = m.spawn()
    addr = p.mmap(NPAGES)
    p.fill(addr, distinct[np.arange(NPAGES) % DISTINCT])
    p.madvise(addr, NPAGES * 4096, ksmcore.MADV_MERGEABLE)
    m.ksm.pages_to_scan = 100
    m.ksm.run = 1
    return (m,), {}


def four_scans(m: Any) -> Any:
    m.ksm.scan(4)
    return m


def test_small_batches(benchmark: Any, record: Any) -> None:
    m = benchmark.pedantic(four_scans, setup=prepare, rounds=3, iterations=1)
    s = m.ksm.stats()
    assert (s["full_scans"], s["pages_shared"], s["pages_sharing"]) == (
        4, DISTINCT, NPAGES - DISTINCT)
    assert s["pages_scanned"] == 4 * NPAGES
    record("small batches", "engine", benchmark.stats.stats.median, 4 * NPAGES)
