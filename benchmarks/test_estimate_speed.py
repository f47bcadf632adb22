"""Speed of a whole `ksmcore estimate` on a static raw image against a page-cache read of
the same file, side by side in one run (issue 14's first target: at most 3x).

The image is 4 GiB by default (KSMCORE_BENCH_IMAGE_GIB to change it): a third of its
pages from a shared set, a tenth zero, the rest unique. Both sides run as commands, so
start-up and import costs count: `cat IMAGE > /dev/null` once the file is in the page
cache, and `ksmcore estimate IMAGE --json --thp never` (4 KiB pages: the same work for
every run), whose counters are checked before any time is reported. Each side runs
three times, alternating, and the medians count (the machine is shared). Needs the
image's size free in the temporary directory plus its size in free memory; skips
otherwise.
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
from pathlib import Path

import numpy as np
import pytest

from ksmcore.constants import PAGE_SIZE

GIB = 1 << 30
SIZE = int(float(os.environ.get("KSMCORE_BENCH_IMAGE_GIB", "4")) * GIB)
TMP = Path(tempfile.gettempdir())


def _free_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


ROOM = shutil.disk_usage(TMP).free > 2 * SIZE and _free_memory() > 2 * SIZE


def write_image(path: Path, size: int, seed: int = 14) -> int:
    """Shared, zero and unique pages, shuffled; returns the number of shared contents."""
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


# as an installed package runs: its modules compiled once (a machine that sets
# PYTHONDONTWRITEBYTECODE would compile every module on every start)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str], stdout: int | None = subprocess.DEVNULL) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, stdout=stdout if stdout is not None else subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, check=True, env=ENV)
    return time.perf_counter() - t0, out.stdout or ""


@pytest.mark.skipif(not ROOM, reason=f"needs {2 * SIZE >> 30} GiB free in {TMP} and in memory")
def test_estimate_against_page_cache_read() -> None:
    d = Path(tempfile.mkdtemp(dir=TMP))
    try:
        image = d / "image.img"
        write_image(image, SIZE)
        timed(["cat", str(image)])  # into the page cache
        estimate = [sys.executable, "-m", "ksmcore.cli", "estimate", str(image), "--json",
                    "--no-progress", "--thp", "never"]
        timed(estimate[:3] + ["--help"])  # compiles the modules once
        cats, runs, results = [], [], []
        for _ in range(3):  # side by side, three times each: the medians count
            cats.append(timed(["cat", str(image)])[0])
            seconds, out = timed(estimate, stdout=None)
            runs.append(seconds)
            results.append(json.loads(out))
        cat, seconds = statistics.median(cats), statistics.median(runs)
        # the counters first: every run converged on the whole image, to the same counters
        for result in results:
            assert result["pages"] == SIZE // PAGE_SIZE
            assert result["converged"] and result["ksm"]["pages_sharing"] > 0
            assert result["full_scans"] == results[0]["full_scans"]
        print(f"\n{SIZE >> 30} GiB image, medians of 3: page-cache read {cat:.2f} s, "
              f"ksmcore estimate {seconds:.2f} s: {seconds / cat:.1f}x the read "
              f"({len(results[0]['full_scans'])} full scans; runs "
              f"{', '.join(f'{r:.2f}' for r in runs)} s; reads "
              f"{', '.join(f'{c:.2f}' for c in cats)} s)")
    finally:
        shutil.rmtree(d)
