"""The two speeds users feel, for ``ksmcore bench`` and ``benchmarks/``:

- a whole ``ksmcore estimate`` of a static raw image, as a command (start-up and imports
  count), against a page-cache read of the same file (``cat IMAGE > /dev/null``), side
  by side, with the estimate's counters checked;
- a replay of the record/replay issue's workload (3 processes of 3,000 pages, 60 s)
  against the real time it covers.

Each side runs ``runs`` times, alternating, and the medians count: the machines this
runs on are shared.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .constants import PAGE_SIZE

GIB = 1 << 30

# as an installed package runs: its modules compiled once (an environment that sets
# PYTHONDONTWRITEBYTECODE would compile every module on every start)
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def write_image(path: Path, size: int, seed: int = 14) -> int:
    """A raw image of ``size`` bytes: a third of its pages from a shared set (one
    content per 300 pages), a tenth zero, the rest unique, shuffled; returns the number
    of shared contents."""
    rng = np.random.default_rng(seed)
    npages = size // PAGE_SIZE
    shared = rng.integers(0, 256, (max(1, npages // 300), PAGE_SIZE), dtype=np.uint8)
    kinds = rng.choice(3, size=npages, p=[1 / 3, 1 / 10, 1 - 1 / 3 - 1 / 10])
    with open(path, "wb") as f:
        for k in range(0, npages, 16384):
            part = kinds[k:k + 16384]
            out = rng.integers(0, 256, (len(part), PAGE_SIZE), dtype=np.uint8)
            sel = part == 0
            out[sel] = shared[rng.integers(0, len(shared), int(sel.sum()))]
            out[part == 1] = 0
            f.write(out.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return len(shared)


def room_for_image(size: int, where: Path | None = None) -> bool:
    """Free space for the image and free memory to keep it in the page cache."""
    where = Path(tempfile.gettempdir()) if where is None else where
    available = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return shutil.disk_usage(where).free > 2 * size and available > 2 * size


def _timed(cmd: list[str], capture: bool = False) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, check=True, env=_ENV)
    return time.perf_counter() - t0, out.stdout or ""


@dataclass
class EstimateSpeed:
    size: int
    reads: list[float]  # seconds of each page-cache read
    runs: list[float]  # seconds of each whole estimate
    full_scans: int
    result: dict[str, Any]  # the estimate's JSON (every run gave the same counters)

    @property
    def read_s(self) -> float:
        return statistics.median(self.reads)

    @property
    def estimate_s(self) -> float:
        return statistics.median(self.runs)

    @property
    def ratio(self) -> float:
        return self.estimate_s / self.read_s


def estimate_vs_read(size: int = 4 * GIB, runs: int = 3, where: Path | None = None
                     ) -> EstimateSpeed:
    """Write the image, read it once into the page cache, then time ``cat`` and
    ``ksmcore estimate IMAGE --json --thp never`` (4 KiB pages: the same work every
    run) ``runs`` times each, alternating; the image is removed afterwards."""
    d = Path(tempfile.mkdtemp(dir=where))
    try:
        image = d / "image.img"
        write_image(image, size)
        estimate = [sys.executable, "-m", "ksmcore.cli", "estimate", str(image), "--json",
                    "--no-progress", "--thp", "never"]
        _timed(["cat", str(image)])  # into the page cache
        _timed(estimate[:3] + ["--help"])  # compiles the modules once
        reads, times, results = [], [], []
        for _ in range(runs):
            reads.append(_timed(["cat", str(image)])[0])
            seconds, out = _timed(estimate, capture=True)
            times.append(seconds)
            results.append(json.loads(out))
    finally:
        shutil.rmtree(d)
    for result in results:
        # the counters first: every run converged on the whole image, to one answer
        if result["pages"] != size // PAGE_SIZE or not result["converged"]:
            raise RuntimeError(f"the estimate did not converge on the image: {result}")
        if result["full_scans"] != results[0]["full_scans"]:
            raise RuntimeError("two estimates of one image differ")
    return EstimateSpeed(size, reads, times, len(results[0]["full_scans"]), results[0])


@dataclass
class ReplaySpeed:
    trace_s: float  # the real time the trace covers
    cpu: list[float]  # CPU seconds of each replay
    wall: list[float]
    steady: dict[str, Any]  # the replay's steady state (second half)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu)

    @property
    def ratio(self) -> float:
        """How many times faster than real time (by CPU time: the machine is shared)."""
        return self.trace_s / self.cpu_s


def replay_speed(seconds: float = 60.0, runs: int = 3) -> ReplaySpeed:
    """Replay the issue's workload, recorded synthetically for ``seconds``, at
    pages_to_scan 200, sleep_millisecs 20, smart_scan 0 with the host cost model."""
    import ksmcore

    from .estimate.replay import HOST_MODEL
    from .trace.replay import replay, steady_state
    from .trace.synthetic import issue_workload

    trace = issue_workload(seconds)
    cpu, wall = [], []
    steady: dict[str, Any] = {}
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        m = ksmcore.Machine()
        m.ksm.pages_to_scan = 200
        m.ksm.sleep_millisecs = 20
        m.ksm.smart_scan = 0
        m.cost_model = HOST_MODEL
        rp = replay(trace, m)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
        steady = steady_state(rp.timeline, rp.duration)
    return ReplaySpeed(seconds, cpu, wall, steady)
