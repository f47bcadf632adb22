"""Memory (issue 5): everything but page contents, per scanned page, at 4M pages.

A 16 GiB sparse image (4,194,304 pages) is mapped in place with mmap_image(), so page
contents live in the page cache, not in the process's anonymous memory; the growth of
RssAnon from before the machine exists to after two full scans is then what the model
itself costs: page tables, rmap_items, frames, stable nodes, the unstable tree.
Runs in a fresh interpreter so that nothing else is counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

NPAGES = 4 * 1024 * 1024

SCRIPT = r"""
import json, sys
import numpy as np
import ksmcore

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

path, npages = sys.argv[1], int(sys.argv[2])
image = np.memmap(path, dtype=np.uint8, mode="r", shape=(npages, 4096))
before = rss_anon()
m = ksmcore.Machine()
p = m.spawn()
addr = p.mmap_image(image)
p.madvise(addr, npages * 4096, ksmcore.MADV_MERGEABLE)
mapped = rss_anon()
m.ksm.pages_to_scan = 100_000
m.ksm.run = 1
m.ksm.scan(full_scans=2)
after = rss_anon()
print(json.dumps({"before": before, "mapped": mapped, "after": after,
                  "stats": m.ksm.stats()}))
"""


def test_bytes_per_scanned_page(tmp_path: Path) -> None:
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(NPAGES * 4096)  # sparse: reads are zeros, costs no disk
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(image), str(NPAGES)],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["stats"]["pages_sharing"] + r["stats"]["pages_shared"] == NPAGES
    per_page = (r["after"] - r["before"]) / NPAGES
    print(f"\nanonymous memory per scanned page: {per_page:.1f} bytes "
          f"({(r['mapped'] - r['before']) / NPAGES:.1f} after mmap_image and madvise)")
    assert per_page <= 32
