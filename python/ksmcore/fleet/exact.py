"""Exact figures for one host: the engine runs ksmd on the host's sources to
convergence (as ``ksmcore estimate`` does), on the worker that reads them."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

from ..constants import PAGE_SIZE
from ..estimate.simulate import Knobs, load, new_machine, run_ksmd
from ..estimate.sources import Source
from .sources import open_source

# Static memory: the batch size changes when ksmd merges, never what it merges, so the
# verification scans in large batches (fewer calls into the engine).
VERIFY_PAGES_TO_SCAN = 1 << 16


def exact_savings(sources: Sequence[Source], max_page_sharing: int = 256,
                  use_zero_pages: int = 0, max_scans: int = 50) -> dict[str, Any]:
    """ksmd's counters at convergence on ``sources`` placed on one host (one node)."""
    t0 = time.perf_counter()
    knobs = Knobs(max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages,
                  pages_to_scan=VERIFY_PAGES_TO_SCAN)
    # 4 KiB pages, as the sketches model them: with THP-backed guest RAM (estimate's
    # --thp) zero-filled subpages would be freed by huge-page splits instead of KSM
    m = new_machine(1, knobs, thp="never")
    load(m, sources)
    run = run_ksmd(m, max_scans)
    s = m.ksm.stats()
    pages = sum(src.npages for src in sources)
    saved = int(s["pages_sharing"]) + int(s["ksm_zero_pages"])
    return {
        "pages": pages,
        "saved_pages": saved,
        "saved_bytes": saved * PAGE_SIZE,
        "general_profit": int(s["general_profit"]),
        **{k: int(s[k]) for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                  "ksm_zero_pages", "stable_node_chains", "stable_node_dups",
                                  "full_scans")},
        "converged": run.converged,
        "seconds": time.perf_counter() - t0,
    }


def verify_group(specs: Sequence[str], max_page_sharing: int = 256,
                 use_zero_pages: int = 0) -> dict[str, Any]:
    """The exact figures of one host, its sources opened here (on the worker)."""
    if not specs:
        return {"pages": 0, "saved_pages": 0, "saved_bytes": 0, "general_profit": 0,
                "converged": True, "seconds": 0.0}
    try:
        return exact_savings([open_source(s) for s in specs], max_page_sharing, use_zero_pages)
    finally:
        # the machine and its processes refer to each other: collect them now, or a
        # worker keeps every host's pages it verified until the collector runs
        gc.collect()
