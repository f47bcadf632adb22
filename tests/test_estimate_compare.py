"""``ksmcore compare`` on a live KSM workload of the test's own: what the real ksmd
holds against what the estimate says it converges to; compare never writes a knob."""

from __future__ import annotations

import json
import time

import pytest
from test_estimate_procmem import live, make_area

from ksmcore import kernel

from clirun import run


def knobs_now() -> dict[str, int | str]:
    return kernel.save_knobs()


def test_compare_on_a_live_ksm_workload() -> None:
    ok, why = kernel.kernel_available()  # asked under kernel_lock (conftest)
    if not ok:
        pytest.skip(f"needs a writable /sys/kernel/mm/ksm: {why}")
    saved = kernel.save_knobs()
    try:
        kernel._reset()  # run=2: nothing merged
        with live([make_area(20, npages=3000, nwritten=2500),
                   make_area(21, npages=200, nwritten=150)]) as child:
            others = [p for p in kernel._other_ksm_users() if p != child.pid]
            if others:
                pytest.skip(f"other processes use KSM: {others}")
            kernel._write("pages_to_scan", 1000)
            kernel._write("sleep_millisecs", 10)
            # ksmd stopped: it holds nothing of what it would save
            before = knobs_now()
            code, out, err = run("compare", "--json")
            assert code == 0, err
            assert knobs_now() == before  # read, never written
            r = json.loads(out)
            assert [p["pid"] for p in r["host"]["processes"]] == [child.pid]
            assert r["host"]["saved_pages"] == 0 and r["fraction_reached"] == 0.0
            assert r["converged_saved_pages"] > 0

            kernel._write("run", 1)
            deadline = time.monotonic() + 30
            while kernel._read_int("full_scans") < 5:
                if time.monotonic() > deadline:
                    pytest.fail("the real ksmd made no 5 full scans in 30 s")
                time.sleep(0.05)
            before = knobs_now()
            code, out, err = run("compare", "--json")
            assert code == 0, err
            assert knobs_now() == before
            r = json.loads(out)
            host, est = r["host"], r["estimate"]
            # static memory after 5 full scans: ksmd holds what the estimate converges to
            for name in ("pages_shared", "pages_sharing", "ksm_zero_pages"):
                assert host["ksm"][name] == est["ksm"][name], name
            assert r["fraction_reached"] == 1.0
            (proc,) = host["processes"]
            assert proc["ksm_stat"]["ksm_merging_pages"] == \
                est["processes"][0]["ksm_stat"]["ksm_merging_pages"]
            assert est["ksm"]["pages_to_scan"] == 1000 and est["ksm"]["sleep_millisecs"] == 10
            f = r["faster"]
            assert f["pages_to_scan"] == 10_000
            assert 0 < f["time_to_converge_s"] < r["time_to_converge_s"]
            code, out, err = run("compare")
            assert code == 0, err
            assert "ksmd holds 100% of the savings it converges to" in out
            assert f"{child.pid} (" in out and "at pages_to_scan 10000" in out
    finally:
        kernel.restore_knobs(saved)


def test_compare_takes_no_sources() -> None:
    code, out, err = run("compare", "some.img")
    assert code == 2 and not out and "unexpected some.img" in err
