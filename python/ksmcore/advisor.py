"""The scan-time advisor's arithmetic (mm/ksm.c, 6.8+: scan_time_advisor()), written
once for both implementations: each keeps an :class:`AdvisorCtx` and calls
:func:`scan_time_advisor` at the end of every full scan with its clock and ksmd's CPU
time. The kernel computes in unsigned integers (64-bit ``unsigned long``, 32-bit
``unsigned int``); so does this, quirks included: the EWMA starts at 0,
advisor_min_pages_to_scan is no floor, the first CPU sample is ksmd's whole run time,
and pages_to_scan is cut to 32 bits."""

from __future__ import annotations

from collections.abc import Mapping

from .constants import EWMA_WEIGHT, KSM_ADVISOR_MIN_CPU
from .timing import NSEC_PER_MSEC

ULONG = (1 << 64) - 1
UINT = (1 << 32) - 1
MSEC_PER_SEC = 1000


class AdvisorCtx:
    """``struct advisor_ctx``: what the scan-time advisor keeps between full scans."""

    __slots__ = ("start_scan", "scan_time", "change", "cpu_time")

    def __init__(self) -> None:
        self.start_scan = 0  # ktime_t (ns) at the start of the current full scan
        self.scan_time = 0  # seconds the previous full scan took
        self.change = 0  # EWMA of the change, in percent
        self.cpu_time = 0  # ksmd's task_sched_runtime (ns) after the previous scan


def ewma(prev: int, curr: int) -> int:
    """((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) / 100, in unsigned long."""
    return (((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) & ULONG) // 100


def scan_time_advisor(ctx: AdvisorCtx, knobs: Mapping[str, int | str], now_ns: int,
                      cpu_ns: int) -> tuple[int, int, int]:
    """scan_time_advisor() at the end of a full scan that ends at ``now_ns`` with ksmd's
    run time ``cpu_ns``: updates ``ctx`` and returns what the ksm_advisor tracepoint
    reports: (the new pages_to_scan as an unsigned long, the scan time in seconds,
    ksmd's CPU percent). The caller stores the pages into the unsigned int
    pages_to_scan (``& UINT``)."""
    pages_to_scan = int(knobs["pages_to_scan"])  # unsigned int
    # ktime_ms_delta() / MSEC_PER_SEC: whole seconds, at least 1
    scan_time = (now_ns - ctx.start_scan) // NSEC_PER_MSEC // MSEC_PER_SEC or 1
    cpu_time = cpu_ns & ULONG
    cpu_time_diff_ms = ((cpu_time - ctx.cpu_time) & ULONG) // 1000 // 1000
    cpu_percent = ((cpu_time_diff_ms * 100 & ULONG) // (scan_time * 1000 & ULONG)) & UINT
    cpu_percent = cpu_percent or 1
    last_scan_time = ctx.scan_time or scan_time
    # scan time as a percentage of the target, and of the last scan time (smoothed)
    factor = (int(knobs["advisor_target_scan_time"]) * 100 & ULONG) // scan_time or 1
    change = (scan_time * 100 & ULONG) // last_scan_time or 1
    change = ewma(ctx.change, change)
    # the new scan rate (unsigned int * int stays 32-bit), capped by the CPU limits
    pages = (pages_to_scan * 100 & UINT) // factor
    pages = (pages * change & ULONG) // 100
    per_page_cost = pages_to_scan // cpu_percent or 1
    pages = min(pages, per_page_cost * int(knobs["advisor_max_cpu"]) & ULONG)
    pages = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU & ULONG)
    pages = min(pages, int(knobs["advisor_max_pages_to_scan"]))
    ctx.change = change
    ctx.scan_time = scan_time
    ctx.cpu_time = cpu_time
    return pages, scan_time, cpu_percent
