"""The scan-time advisor (mm/ksm.c, 6.8+: scan_time_advisor and its helpers).

At the end of every full scan it sets pages_to_scan so that a full scan takes
advisor_target_scan_time seconds, within ksmd CPU limits. The kernel computes in
unsigned integers (64-bit ``unsigned long``, 32-bit ``unsigned int``); so does this.
"""

from __future__ import annotations

from ..advisor import UINT, AdvisorCtx, scan_time_advisor
from ..constants import KNOB_DEFAULTS
from .merge import MergeOps


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

    def scan_time_advisor(self) -> None:
        """scan_time_advisor(): the arithmetic is ksmcore.advisor's, shared with the
        engine; here it reads ktime_get() and task_sched_runtime(ksmd)."""
        pages, scan_time, cpu_percent = scan_time_advisor(
            self.advisor_ctx, self.knobs, self.ktime_get(), self.task_sched_runtime())
        self.knobs["pages_to_scan"] = pages & UINT  # into an unsigned int
        if self.tracer.active:
            self.tracer.emit({"event": "ksm_advisor", "scan_time": scan_time,
                              "pages_to_scan": pages, "cpu_percent": cpu_percent})
