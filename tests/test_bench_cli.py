"""``ksmcore bench``: the W1-W4 table, then the two speeds of ksmcore.benchspeed (a whole
estimate of a raw image against a page-cache read, a 60 s trace replay against real
time), small here: the timings are the benchmarks' business, the tests check that the
measurements run and check their answers."""

from __future__ import annotations

import re

from ksmcore.benchspeed import estimate_vs_read, write_image

from clirun import run


def test_bench_prints_the_table_and_both_speeds() -> None:
    code, out, err = run("bench", "--scale", "0.02", "--no-kernel", "--no-reference")
    assert code == 0, err
    assert re.search(r"^W1\s+engine\s+\d+\s", out, re.M)
    m = re.search(r"estimate of a 81 MiB raw image: ([\d.]+) s, a page-cache read "
                  r"([\d.]+) s: ([\d.]+)x the read \(medians of 3; 4 full scans\)", out)
    assert m, out
    m = re.search(r"replay of a 60 s trace .*: ([\d.]+) s of CPU, (\d+)x real time", out)
    assert m and int(m.group(2)) > 1, out


def test_bench_without_the_speeds() -> None:
    code, out, _ = run("bench", "--scale", "0.02", "--no-kernel", "--no-reference",
                       "--no-speeds")
    assert code == 0 and "estimate of a" not in out and "replay of" not in out


def test_the_estimate_of_the_image_is_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    e = estimate_vs_read(8 << 20, runs=1, where=tmp_path)
    npages = (8 << 20) // 4096
    shared = write_image(tmp_path / "again.img", 8 << 20)
    ksm = e.result["ksm"]
    assert e.result["pages"] == npages and e.result["converged"]
    # every shared content and the zero page have a KSM page, possibly several (chains)
    assert ksm["pages_shared"] >= shared + 1
    assert ksm["pages_shared"] + ksm["pages_sharing"] + ksm["pages_unshared"] == npages
    assert len(e.runs) == len(e.reads) == 1 and e.ratio > 0
    assert not list(tmp_path.glob("tmp*/image.img"))  # the image went
