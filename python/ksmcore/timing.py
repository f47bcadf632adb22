"""Simulated time, shared by the engine and the reference.

Both machines keep one integer clock in nanoseconds since "boot" (``m.clock_ns``); the
kernel's clocks are views of it: ``ktime_get()`` is the clock itself and ``jiffies``
are whole milliseconds (HZ=1000). Time passes only when ksmd works (a batch costs
what the :class:`CostModel` says) or sleeps (``m.run_for``), or when the user moves the
clock forward. Integer nanoseconds keep both implementations bit-for-bit equal.
"""

from __future__ import annotations

from dataclasses import dataclass

NSEC_PER_MSEC = 1_000_000
NSEC_PER_SEC = 1_000_000_000


@dataclass(frozen=True)
class CostModel:
    """What ksmd's work costs in simulated time (and in ksmd's CPU time, which the
    scan-time advisor reads as ``task_sched_runtime``).

    ``page_ns`` is charged for every page passed to cmp_and_merge_page (the pages
    that ``pages_scanned`` counts); ``batch_ns`` for every ksm_do_scan() call that
    runs. The defaults come from this project's measurements of the real ksmd
    (schedstat run time over many rounds): about 2.6 us per scanned page of unique
    content, and a per-batch overhead too small to measure (under ~0.2 us). A batch
    must cost something, so that simulated time moves on even when ksmd finds
    nothing to do with sleep_millisecs at 0.
    """

    page_ns: int = 2600
    batch_ns: int = 100
    # ksmd's sleep. hz 0: exactly sleep_millisecs after the batch. Else as a kernel
    # with ``hz`` ticks a second sleeps: msecs_to_jiffies() rounds up to whole jiffies
    # j; schedule_timeout(j) arms a timer for jiffies + j, which the timer wheel files
    # one jiffy later (calc_index() rounds up, so that no timer fires early): from a
    # batch started at a tick, ksmd wakes at the tick j + 1 jiffies after the one its
    # batch ended in. ``wake_ns`` is then the mean time until it runs (scheduling
    # latency; on a busy machine it can exceed a jiffy), added to every period.
    hz: int = 0
    wake_ns: int = 0

    def __post_init__(self) -> None:
        for name in ("page_ns", "batch_ns", "hz", "wake_ns"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"CostModel.{name} must be a non-negative int, not {value!r}")
        if self.batch_ns < 1:
            raise ValueError("CostModel.batch_ns must be at least 1 ns: a ksmd batch takes time")
        if not 0 <= self.hz <= 10_000:
            raise ValueError(f"CostModel.hz must be 0 (exact sleeps) or 1..10000, not {self.hz}")

    def batch(self, pages: int) -> int:
        """The cost in ns of one ksm_do_scan() that processed ``pages`` pages."""
        return self.batch_ns + pages * self.page_ns

    @property
    def jiffy_ns(self) -> int:
        return NSEC_PER_SEC // self.hz if self.hz else NSEC_PER_MSEC

    def jiffies(self, msecs: int) -> int:
        """msecs_to_jiffies(): rounded up to whole jiffies."""
        return -(-msecs * self.hz // 1000)

    def wake(self, start_ns: int, end_ns: int, sleep_millisecs: int) -> int:
        """When ksmd runs again after a batch from ``start_ns`` to ``end_ns`` and a sleep
        of ``sleep_millisecs``."""
        if not self.hz:
            return end_ns + sleep_millisecs * NSEC_PER_MSEC
        j = self.jiffies(sleep_millisecs)
        if j == 0:
            return end_ns  # wait_event_*_timeout(..., 0) does not sleep
        jn = self.jiffy_ns
        return start_ns + ((end_ns - start_ns) // jn + j + 1) * jn + self.wake_ns

    def period(self, pages: int, sleep_millisecs: int) -> float:
        """The time (ns) from one batch of ``pages`` to the next: ksmd's rhythm."""
        work = self.batch(pages)
        return float(self.wake(0, work, sleep_millisecs))


def seconds_to_ns(seconds: float | int, what: str = "time") -> int:
    """A non-negative duration in seconds (int or float) as integer nanoseconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} is a number of seconds, not {type(seconds).__name__}")
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ValueError(f"{what} must be a finite non-negative number of seconds, not {seconds}")
    if isinstance(seconds, int):
        return seconds * NSEC_PER_SEC
    return round(seconds * NSEC_PER_SEC)
