"""``ksmcore estimate`` and ``ksmcore tune`` as commands: the report, the JSON object,
the plots, the progress bar, and one clear line for bad input with nothing on stdout."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import numpy as np
import pytest

from ksmcore.cli import main
from ksmcore.constants import KSM_STAT_FIELDS, PAGE_SIZE, SYSFS_FILES
from ksmcore.estimate.samples import write_images
from ksmcore.estimate.tune import cheapest, parse_duration

from clirun import run

PNG = b"\x89PNG\r\n\x1a\n"
ENV = dict(os.environ, SKBUILD_EDITABLE_VERBOSE="0")  # an editable install stays quiet


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("images"), vms=3, pages=400, seed=3)


def test_sample_report(tmp_path: Path) -> None:
    plot = tmp_path / "saved.png"
    code, out, err = run("estimate", "--sample", "--plot", str(plot))
    assert code == 0, err
    assert out.startswith("ksmcore estimate: 4 sources, 65536 pages (256.0 MiB), 1 NUMA node\n")
    for text in ("memory saved ", "general_profit ", "time to converge ", "savings reached ",
                 "/sys/kernel/mm/ksm after 4 full scans:", "per source (/proc/<pid>/ksm_stat):",
                 "sample:vm3", f"plot: {plot}"):
        assert text in out
    assert plot.read_bytes()[:8] == PNG and plot.stat().st_size > 10_000


def test_json_object(images: list[Path]) -> None:
    code, out, err = run("estimate", "--json", f"{images[0]}@0", f"{images[1]}@1", "--nodes", "2",
                         str(images[2]), "--merge-across-nodes", "0")
    assert code == 0, err
    r = json.loads(out)
    assert list(r["ksm"]) == list(SYSFS_FILES)
    assert r["ksm"]["merge_across_nodes"] == 0 and r["ksm"]["full_scans"] == 4
    assert [p["source"] for p in r["processes"]] == [str(p) for p in images]
    assert [p["node"] for p in r["processes"]] == [0, 1, 0]
    for p in r["processes"]:
        assert list(p["ksm_stat"]) == list(KSM_STAT_FIELDS) and p["pages"] == 400
    assert [n["pages"] for n in r["nodes"]] == [800, 400]
    assert r["time_to_converge_s"] > 0 and r["converged_at_full_scan"] == 2
    saved = r["ksm"]["pages_sharing"] + r["ksm"]["ksm_zero_pages"]
    assert r["saved"]["pages"] == saved and r["saved"]["bytes"] == saved * PAGE_SIZE
    assert set(r["savings_time_s"]) == {"50%", "90%", "100%"}
    assert len(r["full_scans"]) == 4


def test_tune_table_and_cheapest(images: list[Path], tmp_path: Path) -> None:
    plot = tmp_path / "tune.png"
    code, out, err = run("tune", *map(str, images), "--pages-to-scan-values", "50,400",
                         "--sleep-millisecs-values", "20,200", "--within", "2s",
                         "--plot", str(plot), "--json")
    assert code == 0, err
    r = json.loads(out)
    rows = r["settings"]
    assert len([x for x in rows if not x["advisor"]]) == 2 * 2 * 2
    assert [x["pages_per_second"] for x in rows] == sorted(x["pages_per_second"] for x in rows)
    for x in rows:
        assert x["t50_s"] <= x["t90_s"] <= x["t100_s"]
        assert x["saved_pages"] == r["reference_saved_pages"]  # static memory: all converge
    best = r["cheapest"]
    assert best is not None and best["t90_s"] <= 2.0
    assert all(x["pages_per_second"] >= best["pages_per_second"] for x in rows
               if x["t90_s"] <= 2.0)
    assert r["advisor"]["reason"]
    assert r["advisor"]["included"]
    assert len([x for x in rows if x["advisor"]]) == 2
    assert plot.read_bytes()[:8] == PNG
    code, out, err = run("tune", *map(str, images), "--pages-to-scan-values", "50",
                         "--sleep-millisecs-values", "200", "--smart-scan-values", "1",
                         "--within", "1ms")
    assert code == 0, err
    assert "no setting reaches 90% of the savings within 1 ms" in out
    assert "advisor rows" in out


def test_tune_with_the_scan_time_advisor(images: list[Path]) -> None:
    code, out, err = run("tune", *map(str, images), "--pages-to-scan-values", "100",
                         "--sleep-millisecs-values", "20", "--smart-scan-values", "1", "--json")
    assert code == 0, err
    rows = json.loads(out)["settings"]
    (adv,) = [x for x in rows if x["advisor"]]
    (fixed,) = [x for x in rows if not x["advisor"]]
    assert adv["converged"] and adv["saved_pages"] == fixed["saved_pages"]
    assert adv["pages_to_scan"] > 0 and adv["pages_per_second"] > 0
    assert 0 < adv["t50_s"] <= adv["t90_s"] <= adv["t100_s"]


def test_tune_helpers() -> None:
    assert parse_duration("10m") == 600 and parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("250ms") == 0.25
    rows = [{"pages_per_second": 10, "t90_s": 50.0, "smart_scan": 0},
            {"pages_per_second": 10, "t90_s": 50.0, "smart_scan": 1},
            {"pages_per_second": 5, "t90_s": 90.0, "smart_scan": 1},
            {"pages_per_second": 1, "t90_s": None, "smart_scan": 1}]
    assert cheapest(rows, 60) is rows[1] and cheapest(rows, 100) is rows[2]
    assert cheapest(rows, 10) is None


@pytest.mark.parametrize("argv, code, message", [
    (["estimate", "/nonexistent/x.img"], 1, "/nonexistent/x.img: no such file"),
    (["estimate"], 2, "nothing to estimate"),
    (["estimate", "--sample", "--max-page-sharing", "1"], 2, "--max-page-sharing 1: refused"),
    (["estimate", "--sample", "--use-zero-pages", "2"], 2, "--use-zero-pages 2: refused"),
    (["estimate", "--sample", "--nodes", "0"], 2, "--nodes 0: expected 1..64"),
    (["estimate", "--sample", "--pid", "x"], 2, "--pid 'x': expected a process id"),
    (["estimate", "--sample", "--plot", "/nonexistent/dir/p.png"], 1, "is not writable"),
    (["estimate", "--sample", "--plot", "p.svg"], 2, "the plot is a PNG file"),
    (["tune", "--sample", "--within", "soon"], 2, "--within 'soon': expected a duration"),
    (["tune", "--sample", "--pages-to-scan-values", "0"], 2, "--pages-to-scan-values '0'"),
])
def test_bad_options(argv: list[str], code: int, message: str) -> None:
    got, out, err = run(*argv)
    assert (got, out) == (code, "")
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("argv", [
    ["estimate", "--sample", "--smart-scan", "x"],
    ["tune", "--sample", "--no-such-option"],
    ["estimate", "--format", "zip", "a.img"],
])
def test_malformed_options_get_one_line(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and out.getvalue() == ""
    assert err.getvalue().count("\n") == 1
    assert err.getvalue().startswith(f"ksmcore {argv[0]}: ")


def test_bad_files_say_what_is_wrong(tmp_path: Path, images: list[Path]) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(PAGE_SIZE + 100))
    code, out, err = run("estimate", str(images[0]), str(odd))
    assert (code, out) == (1, "")
    assert err == (f"ksmcore estimate: {odd}: 4196 bytes is not a whole number of 4096-byte "
                   f"pages (1 pages and 100 bytes); --allow-partial pads the last page with "
                   f"zeros\n")
    code, out, err = run("estimate", "--json", "--allow-partial", str(odd))
    assert code == 0 and json.loads(out)["pages"] == 2
    code, out, err = run("estimate", f"{images[0]}@3", "--nodes", "2")
    assert (code, out) == (2, "") and "no NUMA node 3" in err
    bad = tmp_path / "bad.core"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    code, out, err = run("estimate", str(bad))
    assert (code, out) == (1, "") and f"{bad}: corrupt ELF core" in err
    code, out, err = run("estimate", sys.executable)
    assert (code, out) == (1, "") and "not a core dump" in err


@pytest.mark.skipif(shutil.which("ksmcore") is None, reason="the console script is not installed")
def test_installed_console_script(images: list[Path]) -> None:
    p = subprocess.run(["ksmcore", "estimate", "--json", *map(str, images)], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["processes"][2]["source"] == str(images[2])
    p = subprocess.run(["ksmcore", "estimate", "/nonexistent.img"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == "ksmcore estimate: /nonexistent.img: no such file\n"


def test_progress_bar_on_a_terminal(images: list[Path]) -> None:
    master, slave = pty.openpty()
    # a terminal of 0 columns (a fresh pty's) would get an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    seen: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the terminal is closed
            while chunk := os.read(master, 65536):
                seen.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        p = subprocess.Popen([sys.executable, "-m", "ksmcore.cli", "estimate", "--json",
                              *map(str, images)], stdout=subprocess.PIPE, stderr=slave, env=ENV)
        os.close(slave)
        out = p.communicate(timeout=120)[0]
        reader.join(10)
    finally:
        os.close(master)
    assert p.returncode == 0
    assert json.loads(out)["ksm"]["full_scans"] == 4  # stdout stays clean JSON
    assert b"full scan 1" in b"".join(seen)


def test_demo_is_kept() -> None:
    code, out, _ = run("demo", "--processes", "2", "--pages", "64")
    assert code == 0 and "converged after" in out


def test_images_written_whole(images: list[Path]) -> None:
    for p in images:
        assert p.stat().st_size == 400 * PAGE_SIZE
        assert np.fromfile(p, dtype=np.uint8).reshape(-1, PAGE_SIZE).shape == (400, PAGE_SIZE)
