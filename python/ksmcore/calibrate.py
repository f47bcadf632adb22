"""``ksmcore calibrate``: measure this host's ksmd and write a cost model.

On a workload of its own (processes of pages half common to all, half unique,
MADV_MERGEABLE), after two full scans (so that the trees are built and the common
pages merged), ksmd runs whole rounds at a few settings of pages_to_scan and
sleep_millisecs. For each: the wall time and ksmd's CPU time (``/proc/<ksmd>/schedstat``)
per round, and the batches per round (a round of R pages at P a batch is ceil(R / P)
batches, one more when P divides R: the batch that finds the end of the list).

- cost per page and per batch: ksmd's CPU per round is ``page_ns * R + batch_ns *
  batches``, fitted by least squares over the settings;
- sleep: the kernel's HZ (from /proc/config.gz, else the best fit among 100, 250, 300
  and 1000), and ``wake_ns``: what the measured period per batch adds to the model's
  (work, then the sleep to the tick), on average: the wake-up latency, and the CPU
  ksmd waits for on a busy machine.

Holds ``kernel_lock()``; every knob is restored on every path.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from . import kernel
from .timing import CostModel
from .trace.kernelrun import ksmd_cpu_ns, ksmd_pid
from .trace.moving import Group, MovingWorkload, ProcessSpec, Running

SETTINGS = ((100, 20), (1000, 20), (200, 10), (400, 50))
HZ_CANDIDATES = (100, 250, 300, 1000)
RETRIES = 5


def config_hz() -> int | None:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                m = re.match(r"CONFIG_HZ=(\d+)", line)
                if m:
                    return int(m.group(1))
    except OSError:
        return None
    return None


def _batches(round_pages: int, pts: int) -> int:
    return -(-round_pages // pts) + (1 if round_pages % pts == 0 else 0)


def _rounds(n: int, timeout: float) -> tuple[float, int, int, int]:
    """Wait for the next round's start, then time ``n`` whole rounds: seconds, ksmd CPU
    ns, pages scanned, rounds."""
    kpid = ksmd_pid()
    deadline = time.monotonic() + timeout
    fs = int(kernel._read("full_scans"))
    while int(kernel._read("full_scans")) == fs:
        if time.monotonic() > deadline:
            raise RuntimeError("ksmd ended no round in time")
        time.sleep(0.0005)
    t0, c0 = time.monotonic(), ksmd_cpu_ns(kpid)
    p0, f0 = int(kernel._read("pages_scanned")), int(kernel._read("full_scans"))
    while int(kernel._read("full_scans")) < f0 + n:
        if time.monotonic() > deadline:
            raise RuntimeError("ksmd ended too few rounds in time")
        time.sleep(0.0005)
    t1, c1 = time.monotonic(), ksmd_cpu_ns(kpid)
    p1, f1 = int(kernel._read("pages_scanned")), int(kernel._read("full_scans"))
    return t1 - t0, c1 - c0, p1 - p0, f1 - f0


def model_period(cm: CostModel, pages: int, sleep_ms: int) -> float:
    return cm.period(pages, sleep_ms)


def calibrate(processes: int = 2, pages: int = 3000, rounds: int = 3,
              settings: tuple[tuple[int, int], ...] = SETTINGS,
              log: Any = None) -> dict[str, Any]:
    """Measure and fit; returns {"cost_model": {...}, "measured": [...], ...}."""
    groups = [Group(pages // 2, "common"), Group(pages - pages // 2, "private")]
    w = MovingWorkload([ProcessSpec(groups, seconds=0.0) for _ in range(processes)])
    measured = []
    with kernel.kernel_lock():
        ok, why = kernel.kernel_available()
        if not ok:
            raise RuntimeError(f"ksmcore calibrate needs the real ksmd: {why}")
        saved = kernel.save_knobs()
        try:
            kernel._reset()
            kernel._write("advisor_mode", "none")
            kernel._write("smart_scan", 0)  # every page every round: the cost per page
            kernel._write("use_zero_pages", 0)
            with Running(w):
                kernel._write("pages_to_scan", 1000)
                kernel._write("sleep_millisecs", 10)
                kernel._write("run", 1)
                _rounds(2, 120)  # the trees built, the common pages merged
                for pts, sleep in settings:
                    kernel._write("pages_to_scan", pts)
                    kernel._write("sleep_millisecs", sleep)
                    for _ in range(RETRIES):
                        secs, cpu, scanned, n = _rounds(rounds, 300)
                        rp = scanned // n
                        # another process registered with KSM meanwhile: its pages
                        # are in the rounds; measure again
                        if rp == processes * pages:
                            break
                        if log is not None:
                            log(f"  (another process used KSM: {rp} pages a round, not "
                                f"{processes * pages}; measuring again)")
                    else:
                        raise RuntimeError("other processes kept using KSM: no clean rounds")
                    b = _batches(rp, pts) * n
                    row = {"pages_to_scan": pts, "sleep_millisecs": sleep, "rounds": n,
                           "round_pages": rp, "batches": b, "seconds": secs, "cpu_ns": cpu,
                           "full_scans_per_s": n / secs, "period_ns": secs * 1e9 / b}
                    measured.append(row)
                    if log is not None:
                        log(f"pages_to_scan {pts}, sleep_millisecs {sleep}: "
                            f"{row['full_scans_per_s']:.3f} full scans/s, "
                            f"{row['period_ns'] / 1e6:.2f} ms per batch, ksmd "
                            f"{cpu / secs / 1e7:.2f}% of a CPU")
        finally:
            kernel.restore_knobs(saved)
    return fit(measured)


def fit(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost model that explains ``measured`` best."""
    a = np.array([[r["round_pages"] * r["rounds"], r["batches"]] for r in measured], float)
    y = np.array([r["cpu_ns"] for r in measured], float)
    (page_ns, batch_ns), *_ = np.linalg.lstsq(a, y, rcond=None)
    page_ns = max(1, round(page_ns))
    batch_ns = max(1, round(batch_ns))
    hz = config_hz()
    best: tuple[float, int, int] | None = None
    for h in ([hz] if hz else HZ_CANDIDATES):
        base = CostModel(page_ns=page_ns, batch_ns=batch_ns, hz=h, wake_ns=0)
        extra = [r["period_ns"] - base.period(r["pages_to_scan"], r["sleep_millisecs"])
                 for r in measured]
        wake = max(0, round(float(np.mean(extra))))
        cm = replace_wake(base, wake)
        err = sum((r["period_ns"] - cm.period(r["pages_to_scan"], r["sleep_millisecs"])) ** 2
                  for r in measured)
        if best is None or err < best[0]:
            best = (err, h, wake)
    assert best is not None
    cm = CostModel(page_ns=page_ns, batch_ns=batch_ns, hz=best[1], wake_ns=best[2])
    for r in measured:
        r["model_period_ns"] = cm.period(r["pages_to_scan"], r["sleep_millisecs"])
    return {"cost_model": asdict(cm), "hz_from": "config" if hz else "fit",
            "measured": measured, "host": os.uname().nodename,
            "kernel": os.uname().release, "load_average": os.getloadavg()[0],
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def replace_wake(cm: CostModel, wake: int) -> CostModel:
    return CostModel(page_ns=cm.page_ns, batch_ns=cm.batch_ns, hz=cm.hz, wake_ns=wake)


def main(args: Any) -> int:
    import sys

    ok, why = kernel.kernel_available()
    if not ok:
        print(f"ksmcore calibrate: needs the real ksmd: {why}", file=sys.stderr)
        return 1
    try:
        result = calibrate(log=lambda s: print(s, file=sys.stderr))
    except (RuntimeError, OSError) as e:
        print(f"ksmcore calibrate: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=1) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    cm = result["cost_model"]
    print(f"cost model: {cm['page_ns'] / 1000:.2f} us per page, {cm['batch_ns'] / 1000:.1f} us "
          f"per batch, HZ={cm['hz']} ({result['hz_from']}), {cm['wake_ns'] / 1000:.0f} us "
          f"to wake" + (f"; written to {args.output}" if args.output else ""))
    for r in result["measured"]:
        print(f"  pages_to_scan {r['pages_to_scan']:>5}, sleep {r['sleep_millisecs']:>3} ms: "
              f"{r['period_ns'] / 1e6:6.2f} ms per batch (model {r['model_period_ns'] / 1e6:6.2f}"
              f"), {r['full_scans_per_s']:.3f} full scans/s")
    return 0
