"""The simulated clock, ksmd's cost model and CPU time, and the tracepoints, as both
machines show them: written once here (docs/MODEL.md, "Time"); each implementation
gives the few accessors at the top, which reach its own ksmd state."""

from __future__ import annotations

import contextlib
import os
from typing import IO

from .checks import as_int, check_clock
from .guard import serialized
from .timing import NSEC_PER_MSEC, NSEC_PER_SEC, CostModel, seconds_to_ns
from .tracing import Event, Tracer, tracing


@serialized
class SimulatedTime:
    """Mixed into both Machines; every member runs under the machine's lock."""

    # ---- what each implementation provides

    def _clock_now(self) -> int:
        raise NotImplementedError

    def _clock_move(self, ns: int) -> None:
        raise NotImplementedError

    def _cost(self) -> CostModel:
        raise NotImplementedError

    def _set_cost(self, value: CostModel) -> None:
        raise NotImplementedError

    def _cpu_ns(self) -> int:
        raise NotImplementedError

    def _tracer(self) -> Tracer:
        raise NotImplementedError

    def _scan_thread(self, ns: int) -> None:
        """ksm_scan_thread() for ns of simulated time (the end is checked already)."""
        raise NotImplementedError

    # ---- the API

    @property
    def clock_ns(self) -> int:
        """Simulated time since boot in nanoseconds (ktime_get())."""
        return self._clock_now()

    @clock_ns.setter
    def clock_ns(self, value: int) -> None:
        value = check_clock(as_int(value, "the clock (ns)"))
        if value < self._clock_now():
            raise ValueError("the clock never goes back")
        self._clock_move(value)

    @property
    def clock(self) -> float:
        """Simulated time since boot in seconds (a view of clock_ns); settable forward."""
        return self._clock_now() / NSEC_PER_SEC

    @clock.setter
    def clock(self, seconds: float) -> None:
        self.clock_ns = seconds_to_ns(seconds, "the clock")

    @property
    def clock_ms(self) -> int:
        """jiffies with HZ=1000: whole milliseconds of the clock; settable forward."""
        return self._clock_now() // NSEC_PER_MSEC

    @clock_ms.setter
    def clock_ms(self, value: int) -> None:
        value = as_int(value, "clock_ms")
        if value < self._clock_now() // NSEC_PER_MSEC:
            raise ValueError("the clock never goes back")
        self._clock_move(max(self._clock_now(), check_clock(value * NSEC_PER_MSEC)))

    @property
    def cost_model(self) -> CostModel:
        """What ksmd's batches cost in simulated time and CPU time (settable)."""
        return self._cost()

    @cost_model.setter
    def cost_model(self, value: CostModel) -> None:
        if not isinstance(value, CostModel):
            raise TypeError("cost_model takes a ksmcore.timing.CostModel")
        self._set_cost(value)

    @property
    def ksmd_cpu_ns(self) -> int:
        """ksmd's CPU time so far (task_sched_runtime), in nanoseconds."""
        return self._cpu_ns()

    def run_for(self, seconds: float) -> None:
        """Let ksmd run as the kernel's ksm_scan_thread() does for ``seconds`` of
        simulated time: a batch of pages_to_scan, then sleep_millisecs, and so on."""
        ns = seconds_to_ns(seconds, "run_for")
        check_clock(self._clock_now() + ns, "run_for's end")
        self._scan_thread(ns)

    @property
    def trace(self) -> Tracer:
        """The KSM tracepoints: subscribe(fn), unsubscribe(fn), collect(), record(path)."""
        return self._tracer()

    def tracing(self, record: str | os.PathLike[str] | IO[str] | None = None
                ) -> contextlib.AbstractContextManager[list[Event]]:
        """``with m.tracing() as events:`` collects the block's events (dicts); with
        ``record`` they are also written there as JSON lines."""
        return tracing(self._tracer(), record)
