"""Scale of ``ksmcore fleet`` (issue 15): 200 sources of 64 MiB (12.5 GiB) on 20 hosts.

The sources are synthetic (``synth:20x10x64MiB``: 20 families of 10 VM-like images):
each worker builds the pages of the source it reads from the seed, so nothing is
written to disk, and the driver only ever holds sketches. The whole command runs in a
fresh process on a LocalCluster of one worker per CPU; the benchmark reports its wall
time, the driver's peak memory (from the report) and the largest peak of any process
of the run (the workers: a host's sources and the engine's model of them).

``KSMCORE_FLEET_FAMILIES`` / ``KSMCORE_FLEET_PER_FAMILY`` / ``KSMCORE_FLEET_HOSTS``
shrink it for a quick run; ``KSMCORE_FLEET_PLOT=FILE.png`` keeps the plot.
Run it under ``nice`` on a shared machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

FAMILIES = int(os.environ.get("KSMCORE_FLEET_FAMILIES", "20"))
PER_FAMILY = int(os.environ.get("KSMCORE_FLEET_PER_FAMILY", "10"))
HOSTS = int(os.environ.get("KSMCORE_FLEET_HOSTS", str(FAMILIES)))


def test_fleet_200_sources_of_64mib(benchmark, tmp_path: Path) -> None:
    spec = f"synth:{FAMILIES}x{PER_FAMILY}x64MiB@1"
    plot = Path(os.environ.get("KSMCORE_FLEET_PLOT", tmp_path / "fleet-scale.png"))
    out: dict = {}

    def run() -> None:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "ksmcore.cli", "fleet", spec, "--hosts", str(HOSTS),
             "--json", "--plot", str(plot)],
            check=True, capture_output=True, text=True)
        out["wall"] = time.perf_counter() - t0
        out["report"] = json.loads(proc.stdout)

    benchmark.pedantic(run, rounds=1, iterations=1)
    r = out["report"]
    peak_any = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    place = r["placement"]
    # every host holds whole families, and the predictions are the engine's within 2%
    for h in place["hosts"]:
        assert len({i % FAMILIES for i in h["index"]}) == 1
        assert abs(h["predicted_saved_pages"] - h["exact"]["saved_pages"]) <= (
            0.02 * h["exact"]["saved_pages"])
    gib = r["pages"] * 4096 / 2**30
    exact = place["total"]["exact_saved_pages"] * 4096 / 2**30
    given = r["given_order"]["total"]["exact_saved_pages"] * 4096 / 2**30
    s = r["seconds"]
    print(f"\nksmcore fleet {spec} --hosts {HOSTS}: {len(r['sources'])} sources, {gib:.1f} GiB, "
          f"{r['dask']['workers']} workers: {out['wall']:.0f} s wall (sketch {s['sketch']:.0f} s, "
          f"place {s['place']:.1f} s, verify {s['verify']:.0f} s); sketches "
          f"{r['sketch']['bytes'] / 2**20:.1f} MiB ({r['sketch']['fraction']:.3%}); driver "
          f"peak {r['max_rss_bytes']['driver'] / 2**20:.0f} MiB, largest process "
          f"{peak_any / 2**20:.0f} MiB; saved {exact:.2f} GiB exact (given order "
          f"{given:.2f} GiB); plot {plot}")
    benchmark.extra_info.update({"wall_s": out["wall"], "seconds": s, "gib": gib,
                                 "driver_peak_bytes": r["max_rss_bytes"]["driver"],
                                 "largest_process_bytes": peak_any,
                                 "saved_gib": exact, "given_order_saved_gib": given})
