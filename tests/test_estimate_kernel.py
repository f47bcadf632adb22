"""``ksmcore estimate --json`` on generated image files against this machine's real
ksmd on the same contents (one kernel process per file, ksmcore.kernel.run_kernel),
after the same number of full scans the estimate needed."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.cli import main
from ksmcore.constants import COUNTERS, KSM_STAT_FIELDS, PAGE_SIZE
from ksmcore.estimate.samples import write_images
from ksmcore.workloads import Workload

AVAILABLE, WHY = kernel.kernel_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"needs a writable /sys/kernel/mm/ksm: {WHY}")

CASES = {
    "defaults": {},
    "zero_pages_chains": {"use_zero_pages": 1, "max_page_sharing": 2, "pages_to_scan": 37},
    "no_smart_scan": {"smart_scan": 0, "pages_to_scan": 1000},
}


def estimate_json(paths: list[Path], knobs: dict[str, int]) -> dict:
    argv = ["estimate", "--json", "--no-progress"]
    for name, value in knobs.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv + [str(p) for p in paths]) == 0, err.getvalue()
    return json.loads(out.getvalue())


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_of_images_equals_the_real_ksmd(case: str, tmp_path: Path) -> None:
    knobs = CASES[case]
    paths = write_images(tmp_path, vms=3, pages=400, seed=7)
    est = estimate_json(paths, knobs)
    assert est["converged"] and est["saved"]["pages"] > 0
    contents = [np.fromfile(p, dtype=np.uint8).reshape(-1, PAGE_SIZE) for p in paths]
    w = Workload(f"estimate_{case}", contents, dict(knobs), full_scans=est["ksm"]["full_scans"])
    ok, why = kernel.kernel_available()  # again: another test run may be using KSM now
    if not ok:
        pytest.skip(why)
    got = kernel.run_kernel(w)
    assert {c: est["ksm"][c] for c in COUNTERS} == got.counters
    assert [{k: p["ksm_stat"][k] for k in KSM_STAT_FIELDS} for p in est["processes"]] == \
        got.ksm_stat
