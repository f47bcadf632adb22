"""A moving workload under this machine's real ksmd, recorded at the same time: the
kernel's timeline next to a trace to replay (the proof of ``ksmcore record``).

:func:`run` holds ``kernel_lock()``, saves every knob, resets KSM (``run=2``), sets
the knobs, starts the workload's processes (each madvises its area), takes the
trace's initial pages, then at once writes ``run=1`` and lets the processes write:
that instant is t = 0 of the trace and of the kernel's timeline. A sampler thread
reads every sysfs counter and ksmd's CPU time (``/proc/<ksmd>/schedstat``) every
``sample_ms`` while ``ksmcore record`` samples the processes every ``interval_ms``.
Every knob is restored on every path.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import kernel
from .moving import MovingWorkload, Running
from .recorder import RecordResult, record


def ksmd_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "ksmd":
                    return int(entry.name)
            except OSError:
                continue
    return None


def cow_ksm() -> int:
    """/proc/vmstat cow_ksm: copies of KSM pages on write, machine-wide (0 if absent)."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("cow_ksm "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def ksmd_cpu_ns(pid: int | None) -> int:
    """ksmd's time on a CPU so far (the first field of schedstat), or 0."""
    if pid is None:
        return 0
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class KernelRun:
    timeline: list[dict[str, Any]] = field(default_factory=list)  # as replay's rows
    recording: RecordResult | None = None
    knobs: dict[str, int] = field(default_factory=dict)
    # other processes that used KSM during the run (their pages are in the counters)
    disturbed: list[int] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)  # the 1-minute load average, before and after


KNOBS = {"max_page_sharing": 256, "merge_across_nodes": 1, "use_zero_pages": 0,
         "pages_to_scan": 100, "sleep_millisecs": 20, "smart_scan": 1}


def set_knobs(want: dict[str, int]) -> None:
    """The real ksmd from a clean state (run=2, then stopped) with ``want`` written:
    merge_across_nodes and max_page_sharing first (the kernel takes them only while no
    KSM page exists), the advisor off. The caller holds kernel_lock and restores the
    knobs it saved."""
    kernel._reset()
    kernel._write("advisor_mode", "none")
    for name in ("merge_across_nodes", "max_page_sharing"):
        kernel._write(name, want[name])
    for name, value in want.items():
        if name not in ("merge_across_nodes", "max_page_sharing"):
            kernel._write(name, value)


def run(w: MovingWorkload, seconds: float, out: str | os.PathLike[str] | IO[bytes] | None,
        interval_ms: int = 100, sample_ms: int = 100, knobs: dict[str, int] | None = None,
        settle_s: float = 0.0) -> KernelRun:
    """Run ``w`` under the real ksmd for ``seconds`` with ``knobs`` (over KNOBS),
    recording it into ``out`` (None: into memory, ``result.recording.buffer``)."""
    want = dict(KNOBS)
    want.update(w.knobs)
    want.update(knobs or {})
    res = KernelRun(knobs=want)
    with kernel.kernel_lock():
        ok, why = kernel.kernel_available()
        if not ok:
            raise RuntimeError(f"the real ksmd cannot be used: {why}")
        saved = kernel.save_knobs()
        load0 = os.getloadavg()[0]
        stop = threading.Event()
        t0 = [0.0]
        sampler: threading.Thread | None = None
        kpid = ksmd_pid()
        try:
            set_knobs(want)
            with Running(w) as procs:

                def sample() -> None:
                    step = sample_ms / 1000
                    k = 0
                    while not stop.is_set():
                        due = t0[0] + k * step
                        now = time.monotonic()
                        if due > now:
                            stop.wait(due - now)
                            if stop.is_set():
                                break
                        row: dict[str, Any] = {"t": round(time.monotonic() - t0[0], 6)}
                        row.update(kernel.read_sysfs())
                        # pages_scanned is never reset: counted from run=1
                        row["pages_scanned"] = int(row["pages_scanned"]) - scanned0[0]
                        row["ksmd_cpu_ns"] = ksmd_cpu_ns(kpid) - cpu0[0]
                        row["cow_ksm"] = cow_ksm() - cow0[0]
                        res.timeline.append(row)
                        if k % 10 == 0:
                            others = set(kernel._other_ksm_users()) - set(procs.pids)
                            res.disturbed = sorted(set(res.disturbed) | others)
                        k += 1

                cpu0 = [0]
                scanned0 = [0]

                cow0 = [0]

                def start() -> None:
                    cow0[0] = cow_ksm()
                    cpu0[0] = ksmd_cpu_ns(kpid)
                    scanned0[0] = int(kernel._read("pages_scanned"))
                    kernel._write("run", 1)
                    t0[0] = time.monotonic()
                    procs.go()
                    nonlocal sampler
                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()

                res.recording = record(procs.pids, seconds, out, interval_ms,
                                       mergeable_only=True, on_start=start,
                                       meta={"workload": "kernelrun"})
                stop.set()
                if sampler is not None:
                    sampler.join()
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                kernel._write("run", 2)
            kernel.restore_knobs(saved)
    res.load = (load0, os.getloadavg()[0])
    return res


COMPARED = ("pages_sharing", "pages_volatile", "general_profit")
FINAL = ("pages_shared", "pages_sharing", "pages_unshared")


def kernel_period_ns(timeline: list[dict[str, Any]], pages_to_scan: int,
                     since: float = 0.0) -> float | None:
    """The real ksmd's mean time from one batch to the next from ``since`` seconds on:
    the time over the batches (pages_scanned / pages_to_scan: ksm_do_scan() counts
    only the pages it passes to cmp_and_merge_page, as a batch's quota does)."""
    rows = [r for r in timeline if r["t"] >= since]
    if len(rows) < 2 or pages_to_scan <= 0:
        return None
    first, last = rows[0], rows[-1]
    batches = (int(last["pages_scanned"]) - int(first["pages_scanned"])) / pages_to_scan
    span = float(last["t"]) - float(first["t"])
    return span * 1e9 / batches if batches >= 1 else None


def matched_rhythm(cost: Any, period_ns: float | None, replayed_ns: float | None) -> Any:
    """``cost`` with its wake-up delay moved so that the replay's batch period
    (``replayed_ns``, measured on a replay with ``cost``) becomes ``period_ns`` (the
    rhythm the real ksmd had on this machine during the run); ``cost`` as it is
    when either is unknown. The period grows with the wake-up delay one for one as
    long as a batch ends in the jiffy it started in."""
    import dataclasses

    if period_ns is None or replayed_ns is None:
        return cost
    return dataclasses.replace(cost, wake_ns=max(0, round(cost.wake_ns + period_ns
                                                            - replayed_ns)))


def compare(w: MovingWorkload, seconds: float, knobs: dict[str, int], cost: Any,
            interval_ms: int = 100, machine_cls: Any = None,
            match_rhythm: bool = False) -> dict[str, Any]:
    """``w`` under the real ksmd, recorded; the trace replayed with ``cost`` (a
    CostModel); both timelines, both steady states (the second half), and the last
    rows (the static tail, when the workload stops writing before the end).

    ``match_rhythm``: replay with ``cost``'s wake-up delay fitted to the kernel's own
    mean batch period over the second half (``cost_used``): on a shared machine the load
    of the moment moves ksmd's wake-ups by up to a jiffy from run to run, and how
    many pages stay volatile follows the scan period. ``period_ns`` (the kernel's)
    and ``model_period_ns`` (the replay's with ``cost``) say how far the rhythm was
    off."""
    from .format import read_trace
    from .replay import replay, steady_state

    if machine_cls is None:
        from .. import Machine as machine_cls
    kr = run(w, seconds, None, interval_ms, interval_ms, knobs)
    assert kr.recording is not None and kr.recording.buffer is not None
    trace = read_trace(kr.recording.buffer)
    pts = kr.knobs["pages_to_scan"]
    duration = trace.duration

    def replay_with(cm: Any) -> Any:
        m = machine_cls()
        for name, value in kr.knobs.items():
            setattr(m.ksm, name, value)
        m.cost_model = cm
        return replay(trace, m, interval_ms)

    # the steady rhythm: the second half (the first scan, which allocates every
    # rmap_item, is slower)
    period = kernel_period_ns(kr.timeline, pts, duration / 2)
    rp = replay_with(cost)
    model_period = kernel_period_ns(rp.timeline, pts, duration / 2)
    used = cost
    if match_rhythm:
        used = matched_rhythm(cost, period, model_period)
        if used != cost:
            rp = replay_with(used)
    return {
        "period_ns": period,
        "model_period_ns": model_period,
        "cost_used": used,
        "kernel": steady_state(kr.timeline, duration),
        "replay": steady_state(rp.timeline, duration),
        "kernel_last": kr.timeline[-1] if kr.timeline else {},
        "replay_last": rp.timeline[-1] if rp.timeline else {},
        "kernel_timeline": kr.timeline,
        "replay_timeline": rp.timeline,
        "disturbed": kr.disturbed,
        "load": kr.load,
        "late_samples": kr.recording.late_samples,
        "write_faults": kr.recording.write_faults,
        "lost_faults": kr.recording.lost_faults,
        "imputed_writes": kr.recording.imputed_writes,
        "samples": kr.recording.samples,
        "duration": duration,
        "knobs": kr.knobs,
    }


def wait_for_kernel(timeout: float) -> tuple[bool, str]:
    """kernel_available(), waiting up to ``timeout`` seconds for other KSM users to go."""
    deadline = time.monotonic() + timeout
    while True:
        ok, why = kernel.kernel_available()
        if ok or time.monotonic() > deadline:
            return ok, why
        time.sleep(1.0)


def compare_with_trace(w: MovingWorkload, seconds: float, knobs: dict[str, int], trace: Any,
                       cost: Any, sample_ms: int = 100) -> dict[str, Any]:
    """``w`` under the real ksmd (recorded too, for the same load on the machine) next to
    the replay of ``trace``, a trace of the same workload made otherwise (e.g. with
    every write, as soft-dirty bits would record it)."""
    from .. import Machine
    from .replay import replay, steady_state

    kr = run(w, seconds, None, sample_ms, sample_ms, knobs)
    m = Machine()
    for name, value in kr.knobs.items():
        setattr(m.ksm, name, value)
    m.cost_model = cost
    rp = replay(trace, m, sample_ms)
    return {"kernel": steady_state(kr.timeline, seconds),
            "replay": steady_state(rp.timeline, seconds),
            "disturbed": kr.disturbed, "kernel_timeline": kr.timeline,
            "replay_timeline": rp.timeline}
