"""ksm_scan_thread()'s stepping on the simulated clock, written once for both
implementations (the engine's ``Ksmd`` and the reference's ``Ksm``): batches of
pages_to_scan and sleeps of sleep_millisecs. The batch itself (ksm_do_scan()) is each
implementation's own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .timing import CostModel


class ScanThread(Protocol):
    """What ksm_scan_thread() reads and moves: ksmd's knobs, the clock (ktime_get()),
    ksmd's CPU time and when ksmd next wakes (None while it waits for work)."""

    @property
    def knobs(self) -> Mapping[str, Any]: ...
    @property
    def cost(self) -> CostModel: ...
    clock_ns: int
    ksmd_cpu_ns: int
    ksmd_wake: int | None

    def ksmd_should_run(self) -> bool: ...
    def ksm_do_scan(self, scan_npages: int) -> int: ...


def ksm_scan_thread(ksmd: ScanThread, duration_ns: int) -> None:
    """ksm_scan_thread() for duration_ns of simulated time: while ksmd should run,
    ksm_do_scan(pages_to_scan) then a sleep of sleep_millisecs (whole jiffies);
    otherwise a wait for work. A batch started before the end runs to its end."""
    end = ksmd.clock_ns + duration_ns
    while True:
        if ksmd.ksmd_wake is None:  # wait_event_freezable(ksm_thread_wait, ...)
            if not ksmd.ksmd_should_run():
                break
            ksmd.ksmd_wake = ksmd.clock_ns  # woken when work appeared
        if ksmd.ksmd_wake >= end:
            break
        ksmd.clock_ns = max(ksmd.clock_ns, ksmd.ksmd_wake)
        cost = ksmd.cost
        if int(ksmd.knobs["pages_to_scan"]) == 0 and ksmd.ksmd_should_run():
            # ksm_do_scan(0) changes nothing but time: all the wake-ups until the
            # end at once (with sleep_millisecs 0 they would be countless)
            period = round(cost.period(0, int(ksmd.knobs["sleep_millisecs"])))
            wakeups = max(1, -(-(end - ksmd.clock_ns) // period))  # one is due now
            ksmd.ksmd_cpu_ns += wakeups * cost.batch_ns
            last = ksmd.clock_ns + (wakeups - 1) * period
            ksmd.clock_ns = last + cost.batch_ns
            ksmd.ksmd_wake = last + period
            continue
        start = ksmd.clock_ns
        if ksmd.ksmd_should_run():
            ksmd.ksm_do_scan(int(ksmd.knobs["pages_to_scan"]))
        if ksmd.ksmd_should_run():
            # msecs_to_jiffies() and schedule_timeout() (CostModel.wake)
            ksmd.ksmd_wake = cost.wake(start, ksmd.clock_ns, int(ksmd.knobs["sleep_millisecs"]))
        else:
            ksmd.ksmd_wake = None
    ksmd.clock_ns = max(ksmd.clock_ns, end)
