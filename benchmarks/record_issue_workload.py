"""The issue's closing evidence (issue 10): the issue's workload under the real ksmd,
recorded with the console script ``ksmcore record``, replayed with ``ksmcore estimate
TRACE --json`` and ``ksmcore tune TRACE``; both timelines side by side.

    python benchmarks/record_issue_workload.py [--seconds 30] [--runs 3] [--out DIR]

Root on a KSM kernel. Holds ``kernel_lock()`` while it touches KSM and restores every
knob. The workload (trace/moving.py): three processes of 3,000 pages (a third common,
rewritten with their own bytes at 1,500 pages/s; a third private; a third rewritten
with fresh bytes at 200 pages/s); pages_to_scan 200, sleep_millisecs 20, smart_scan 0.
``ksmcore record`` starts its clock once it has written the initial pages (its first
TICK record): this script watches the trace file for that record, then writes
``run=1`` and lets the processes write, so the kernel's t = 0 is the trace's. A
sampler reads every sysfs counter, ksmd's CPU time and vmstat cow_ksm every 100 ms.
Prints, per run, both timelines every 3 s, the second-half means and their
differences, and (for the run given by --tune-run, default the median one) the tune
table as printed; with --out, the traces and JSON go there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ksmcore import kernel
from ksmcore.trace import kernelrun
from ksmcore.trace.format import _FRAME, TICK
from ksmcore.trace.moving import Group, MovingWorkload, ProcessSpec, Running
from ksmcore.trace.replay import steady_state

KNOBS = {"max_page_sharing": 256, "merge_across_nodes": 1, "use_zero_pages": 0,
         "pages_to_scan": 200, "sleep_millisecs": 20, "smart_scan": 0}
COLS = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
        "general_profit")
MEANS = ("pages_sharing", "pages_volatile", "general_profit", "pages_shared",
         "pages_unshared", "full_scans_per_s", "cow_per_s", "cpu_fraction")


def workload(seconds: float) -> MovingWorkload:
    groups = [Group(1000, "common", "same", 1500.0), Group(1000, "private"),
              Group(1000, "private", "fresh", 200.0)]
    return MovingWorkload([ProcessSpec(groups, seconds=seconds + 5) for _ in range(3)])


def first_tick(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Wait until the trace at ``path`` holds its first TICK record."""
    deadline = time.monotonic() + timeout
    off = 16
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ksmcore record ended early ({proc.returncode})")
        try:
            with open(path, "rb") as f:
                f.seek(off)
                while True:
                    head = f.read(_FRAME.size)
                    if len(head) < _FRAME.size:
                        break
                    kind, length, _ = _FRAME.unpack(head)
                    if kind & 0x3F == TICK:
                        return
                    if len(f.read(length)) < length:
                        break
                    off += _FRAME.size + length
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise RuntimeError("no TICK in the trace in time")


def run_once(seconds: float, trace: Path) -> dict[str, Any]:
    w = workload(seconds)
    timeline: list[dict[str, Any]] = []
    with kernel.kernel_lock():
        ok, why = kernelrun.wait_for_kernel(120)
        if not ok:
            raise RuntimeError(f"the real ksmd cannot be used: {why}")
        saved = kernel.save_knobs()
        stop = threading.Event()
        kpid = kernelrun.ksmd_pid()
        disturbed: set[int] = set()
        try:
            kernelrun.set_knobs(KNOBS)
            with Running(w) as procs:
                cmd = ["ksmcore", "record", "--mergeable-only", "--seconds", str(seconds),
                       "-o", str(trace)] + [a for pid in procs.pids for a in ("--pid", str(pid))]
                trace.unlink(missing_ok=True)
                rec = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                first_tick(trace, rec)
                cow0, cpu0 = kernelrun.cow_ksm(), kernelrun.ksmd_cpu_ns(kpid)
                scanned0 = int(kernel._read("pages_scanned"))
                kernel._write("run", 1)
                t0 = time.monotonic()
                procs.go()

                def sample() -> None:
                    k = 0
                    while not stop.is_set():
                        due = t0 + k * 0.1
                        if due > time.monotonic() and stop.wait(due - time.monotonic()):
                            break
                        row: dict[str, Any] = {"t": round(time.monotonic() - t0, 6)}
                        row.update(kernel.read_sysfs())
                        row["pages_scanned"] = int(row["pages_scanned"]) - scanned0
                        row["ksmd_cpu_ns"] = kernelrun.ksmd_cpu_ns(kpid) - cpu0
                        row["cow_ksm"] = kernelrun.cow_ksm() - cow0
                        timeline.append(row)
                        if k % 10 == 0:
                            disturbed.update(set(kernel._other_ksm_users()) - set(procs.pids))
                        k += 1

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                out, _ = rec.communicate()
                stop.set()
                sampler.join()
        finally:
            stop.set()
            kernel._write("run", 2)
            kernel.restore_knobs(saved)
    if rec.returncode != 0:
        raise RuntimeError(f"ksmcore record failed: {out.decode()}")
    return {"kernel_timeline": timeline, "record_output": out.decode(),
            "disturbed": sorted(disturbed), "load": os.getloadavg()[0]}


def knob_args() -> list[str]:
    return ["--pages-to-scan", "200", "--sleep-millisecs", "20", "--smart-scan", "0",
            "--max-page-sharing", "256", "--use-zero-pages", "0"]


def table(kt: list[dict[str, Any]], st: list[dict[str, Any]], end: float) -> str:
    def at(tl: list[dict[str, Any]], t: float) -> dict[str, Any]:
        return min(tl, key=lambda r: abs(float(r["t"]) - t))

    lines = ["| t (s) | " + " | ".join(f"{c} k / replay" for c in COLS) + " |",
             "|---|" + "---|" * len(COLS)]
    t = 0.0
    while t <= end + 1e-9:
        a, b = at(kt, t), at(st, t)
        cells = []
        for c in COLS:
            if c == "general_profit":
                cells.append(f"{a[c] / 2**20:.2f} / {b[c] / 2**20:.2f} MiB")
            else:
                cells.append(f"{a[c]} / {b[c]}")
        lines.append(f"| {t:.0f} | " + " | ".join(cells) + " |")
        t += 3.0
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="/tmp/ksmcore-issue10")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i in range(args.runs):
        trace = out / f"issue-{i + 1}.trace"
        r = run_once(args.seconds, trace)
        est = subprocess.run(["ksmcore", "estimate", str(trace), "--json"] + knob_args(),
                             capture_output=True, text=True, check=True)
        rj = json.loads(est.stdout)
        k = steady_state(r["kernel_timeline"], args.seconds)
        s = rj["steady_state"]
        r.update({"trace": str(trace), "kernel": k, "replay": s,
                  "replay_timeline": rj["timeline"], "trace_bytes": trace.stat().st_size})
        (out / f"issue-{i + 1}.json").write_text(json.dumps(r, default=str))
        results.append(r)
        print(f"## run {i + 1} (load {r['load']:.2f}, trace {r['trace_bytes'] / 2**20:.1f} MiB"
              f", other KSM users: {r['disturbed'] or 'none'})\n")
        print(r["record_output"])
        print(table(r["kernel_timeline"], rj["timeline"], args.seconds))
        print("\nsecond half means (kernel / replay / difference):")
        for key in MEANS:
            kv, sv = k.get(key), s.get(key)
            if kv is None or sv is None:
                continue
            d = (sv - kv) / kv * 100 if kv else 0.0
            print(f"  {key:18s} {kv:12.2f} {sv:12.2f} {d:+6.1f}%")
        print(flush=True)
    order = sorted(range(len(results)), key=lambda i: results[i]["kernel"]["pages_sharing"]
                   - results[i]["replay"]["pages_sharing"])
    med = order[len(order) // 2]
    print(f"median run (by the pages_sharing difference): {med + 1}")
    for key in ("pages_sharing", "pages_volatile", "general_profit"):
        diffs = [(r["replay"][key] - r["kernel"][key]) / r["kernel"][key] * 100 for r in results]
        print(f"  {key}: differences {', '.join(f'{d:+.1f}%' for d in diffs)}; median "
              f"{statistics.median(diffs):+.1f}%")
    tune = subprocess.run(["ksmcore", "tune", results[med]["trace"]], capture_output=True,
                          text=True, check=True)
    print("\n`ksmcore tune` on the median run's trace:\n")
    print(tune.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
