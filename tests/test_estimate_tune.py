"""``ksmcore tune`` output that can be applied as printed: the lines to apply (checked
by writing them to a machine's sysfs), the grid-edge remark, folded rows, CPU per
saved GiB, and the merge_across_nodes trade-off when sources sit on several nodes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import ksmcore
from ksmcore.constants import PAGE_SIZE
from ksmcore.estimate.procmem import parse_numa_maps
from ksmcore.estimate.samples import write_images
from ksmcore.estimate.tune import edge_remark, fold

from clirun import run

LINE = re.compile(r"echo (\S+) > /sys/kernel/mm/ksm/(\w+)")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("images"), vms=3, pages=400, seed=3)


def apply(lines: list[str]) -> dict[str, str]:
    """Write the lines to a simulated machine's sysfs, with the kernel's parsing."""
    m = ksmcore.Machine()
    for line in lines:
        value, name = LINE.fullmatch(line).groups()
        m.ksm.sysfs_write(name, value + "\n")
    return {k: str(v) for k, v in m.ksm.stats().items()}


def tune_json(*argv: str) -> dict:
    code, out, err = run("tune", "--json", "--no-progress", *argv)
    assert code == 0, err
    return json.loads(out)


def test_lines_to_apply_the_pick(images: list[Path]) -> None:
    r = tune_json(*map(str, images), "--pages-to-scan-values", "50,400",
                  "--sleep-millisecs-values", "20,200", "--within", "2s",
                  "--max-page-sharing", "64")
    best = r["cheapest"]
    assert not best["advisor"]
    lines = r["apply"]
    assert lines[0] == "echo 2 > /sys/kernel/mm/ksm/run"  # max_page_sharing needs no KSM page
    assert lines[-1] == "echo 1 > /sys/kernel/mm/ksm/run"
    sysfs = apply(lines)
    assert sysfs["pages_to_scan"] == str(best["pages_to_scan"])
    assert sysfs["sleep_millisecs"] == str(best["sleep_millisecs"])
    assert sysfs["smart_scan"] == str(best["smart_scan"])
    assert sysfs["max_page_sharing"] == "64" and sysfs["run"] == "1"
    assert sysfs["advisor_mode"] == "none"
    _, out, _ = run("tune", "--no-progress", *map(str, images), "--pages-to-scan-values", "50,400",
                    "--sleep-millisecs-values", "20,200", "--within", "2s")
    assert "to apply it (as root):" in out
    assert f"  echo {best['pages_to_scan']} > /sys/kernel/mm/ksm/pages_to_scan" in out


def test_advisor_pick_applies_advisor_mode_not_its_pages_to_scan(images: list[Path]) -> None:
    # a grid too slow for the target, which only the advisor (500 pages a batch at
    # least) reaches
    r = tune_json(*map(str, images), "--pages-to-scan-values", "10",
                  "--sleep-millisecs-values", "200", "--smart-scan-values", "1",
                  "--within", "30s")
    best = r["cheapest"]
    assert best is not None and best["advisor"]
    sysfs = apply(r["apply"])
    assert sysfs["advisor_mode"] == "scan-time"
    assert not any(x.endswith("/pages_to_scan") for x in r["apply"])
    for name in ("advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
                 "advisor_target_scan_time"):
        assert any(x.endswith(f"/{name}") for x in r["apply"])
    assert sysfs["sleep_millisecs"] == "200" and sysfs["smart_scan"] == "1"


def test_edge_fold_and_cpu_per_saved(images: list[Path]) -> None:
    r = tune_json(*map(str, images), "--pages-to-scan-values", "50,400",
                  "--sleep-millisecs-values", "20,200", "--within", "1h")
    best = r["cheapest"]
    assert best["pages_to_scan"] == 50 and best["sleep_millisecs"] == 200
    assert "pages_to_scan below 50" in r["edge"] and "sleep_millisecs above 200" in r["edge"]
    for x in r["settings"]:
        gib = x["saved_pages"] * PAGE_SIZE / 2**30
        assert x["cpu_percent_per_gib_saved"] == pytest.approx(100 * x["cpu_fraction"] / gib)
    # static memory: smart_scan 0 and 1 give identical results, folded into one row
    folded = fold(r["settings"])
    assert len(folded) < len(r["settings"])
    assert any(smart == [0, 1] for _, smart in folded)
    _, out, _ = run("tune", "--no-progress", *map(str, images), "--pages-to-scan-values", "50,400",
                    "--sleep-millisecs-values", "20,200", "--within", "1h")
    assert "the pick sits on the edge of the grid" in out
    assert re.search(r"^\s+0,1\s+50\s+200\s", out, re.M)
    assert "CPU%/GiB" in out
    inside = {"advisor": False, "pages_to_scan": 50, "sleep_millisecs": 200}
    assert edge_remark(inside, (10, 50, 400), (20, 200, 1000)) is None
    assert edge_remark(inside | {"advisor": True}, (50, 400), (20, 200, 1000)) is None


def test_merge_across_nodes_tradeoff(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    common = rng.integers(0, 256, (200, PAGE_SIZE), dtype=np.uint8)
    paths = []
    for i in range(3):
        own = rng.integers(0, 256, (100, PAGE_SIZE), dtype=np.uint8)
        p = tmp_path / f"vm{i}.img"
        np.concatenate([common, own, own[:20]]).tofile(p)
        paths.append(p)
    r = tune_json(f"{paths[0]}@0", f"{paths[1]}@1", f"{paths[2]}@1", "--nodes", "2",
                  "--pages-to-scan-values", "1000", "--sleep-millisecs-values", "20",
                  "--smart-scan-values", "1")
    one, zero = r["merge_across_nodes"]
    assert one["merge_across_nodes"] == 1 and zero["merge_across_nodes"] == 0
    # one tree: the 200 common pages of the node-0 source map a KSM page of node 1, or
    # the node-1 sources map one of node 0; per-node trees lose one copy of them
    assert one["remote_mappings"] >= 200 and zero["remote_mappings"] == 0
    assert zero["savings_lost"] == one["saved_pages"] - zero["saved_pages"] == 200
    assert one["saved_pages"] == 2 * 200 + 3 * 20
    _, out, _ = run("tune", "--no-progress", f"{paths[0]}@0", f"{paths[1]}@1", "--nodes", "2",
                    "--pages-to-scan-values", "1000", "--sleep-millisecs-values", "20")
    assert "merge_across_nodes (the sources sit on several nodes):" in out
    # on one node, no trade-off is shown
    assert tune_json(*map(str, paths), "--pages-to-scan-values", "1000",
                     "--sleep-millisecs-values", "20")["merge_across_nodes"] is None


def test_numa_maps_node() -> None:
    text = ("7f00 default anon=10 dirty=10 N0=4 N1=6 kernelpagesize_kB=4\n"
            "7f10 default file=/lib/x.so mapped=50 N0=50 kernelpagesize_kB=4\n"
            "7f20 interleave:0-1 anon=3 dirty=3 N1=3 kernelpagesize_kB=4\n")
    assert parse_numa_maps(text) == {0: 4, 1: 9}
