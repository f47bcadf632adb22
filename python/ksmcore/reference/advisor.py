"""The scan-time advisor (mm/ksm.c, 6.8+: scan_time_advisor and its helpers).

At the end of every full scan it sets pages_to_scan so that a full scan takes
advisor_target_scan_time seconds, within ksmd CPU limits. The kernel computes in
unsigned integers (64-bit ``unsigned long``, 32-bit ``unsigned int``); so does this.
"""

from __future__ import annotations

from ..constants import EWMA_WEIGHT, KNOB_DEFAULTS, KSM_ADVISOR_MIN_CPU
from ..timing import NSEC_PER_MSEC
from .merge import MergeOps
from .state import AdvisorCtx

ULONG = (1 << 64) - 1
UINT = (1 << 32) - 1
MSEC_PER_SEC = 1000


class AdvisorOps(MergeOps):
    """set_advisor_defaults, advisor_start_scan, advisor_stop_scan, scan_time_advisor."""

    @property
    def ksm_advisor_scan_time(self) -> bool:
        return self.knobs["advisor_mode"] == "scan-time"

    def set_advisor_defaults(self) -> None:
        """On a change of advisor_mode: none restores DEFAULT_PAGES_TO_SCAN; scan-time
        zeroes the context and starts from advisor_min_pages_to_scan."""
        if not self.ksm_advisor_scan_time:
            self.knobs["pages_to_scan"] = KNOB_DEFAULTS["pages_to_scan"]
        else:
            self.advisor_ctx = AdvisorCtx()
            self.knobs["pages_to_scan"] = int(self.knobs["advisor_min_pages_to_scan"]) & UINT

    def advisor_start_scan(self) -> None:
        if self.ksm_advisor_scan_time:
            self.advisor_ctx.start_scan = self.ktime_get()

    def advisor_stop_scan(self) -> None:
        if self.ksm_advisor_scan_time:
            self.scan_time_advisor()

    @staticmethod
    def prev_scan_time(ctx: AdvisorCtx, scan_time: int) -> int:
        """The previous scan time, or the current one when there is none yet."""
        return ctx.scan_time if ctx.scan_time else scan_time

    @staticmethod
    def ewma(prev: int, curr: int) -> int:
        return (((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) & ULONG) // 100

    def scan_time_advisor(self) -> None:
        ctx = self.advisor_ctx
        ksm_thread_pages_to_scan = int(self.knobs["pages_to_scan"])  # unsigned int

        # Convert scan time to seconds (div_s64 of a non-negative ms delta)
        scan_time = (self.ktime_get() - ctx.start_scan) // NSEC_PER_MSEC // MSEC_PER_SEC
        scan_time = scan_time if scan_time else 1

        # CPU consumption of ksmd; the first sample (ctx zeroed) is its whole run time
        cpu_time = self.task_sched_runtime() & ULONG
        cpu_time_diff = (cpu_time - ctx.cpu_time) & ULONG
        cpu_time_diff_ms = cpu_time_diff // 1000 // 1000

        cpu_percent = ((cpu_time_diff_ms * 100 & ULONG) // (scan_time * 1000 & ULONG)) & UINT
        cpu_percent = cpu_percent if cpu_percent else 1
        last_scan_time = self.prev_scan_time(ctx, scan_time)

        # Scan time as a percentage of the target scan time
        factor = (int(self.knobs["advisor_target_scan_time"]) * 100 & ULONG) // scan_time
        factor = factor if factor else 1

        # Scan time as a percentage of the last scan time, smoothed (EWMA from 0)
        change = (scan_time * 100 & ULONG) // last_scan_time
        change = change if change else 1
        change = self.ewma(ctx.change, change)

        # New scan rate from the target rate (unsigned int * int stays 32-bit)
        pages = (ksm_thread_pages_to_scan * 100 & UINT) // factor
        pages = (pages * change & ULONG) // 100

        # Cap by the CPU limits; advisor_min_pages_to_scan is not a floor
        per_page_cost = ksm_thread_pages_to_scan // cpu_percent
        per_page_cost = per_page_cost if per_page_cost else 1

        pages = min(pages, per_page_cost * int(self.knobs["advisor_max_cpu"]) & ULONG)
        pages = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU & ULONG)
        pages = min(pages, int(self.knobs["advisor_max_pages_to_scan"]))

        ctx.change = change
        ctx.scan_time = scan_time
        ctx.cpu_time = cpu_time

        self.knobs["pages_to_scan"] = pages & UINT  # into an unsigned int
        if self.tracer.active:
            self.tracer.emit({"event": "ksm_advisor", "scan_time": scan_time,
                              "pages_to_scan": pages, "cpu_percent": cpu_percent})
