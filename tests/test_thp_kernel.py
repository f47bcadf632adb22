"""Transparent huge pages against the real ksmd: THP-backed workloads (PMD-aligned,
MADV_HUGEPAGE) through this machine's kernel and both implementations; every counter,
every ksm_stat field and, per process, the PTEs that a huge page split mapped to the
shared zero page (counted from /proc/PID/pagemap and /proc/kpageflags) must be equal.

Skips (with the reason) where /sys/kernel/mm/ksm is not writable or THP is off. The
host's THP settings are read, never written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.constants import COUNTERS, KSM_STAT_FIELDS, PAGE_SIZE
from ksmcore.kernel import kernel_available, run_kernel, thp_setting
from ksmcore.pageflags import zero_page_ptes
from ksmcore.thp import HPAGE_PMD_NR
from ksmcore.workloads import Result, run_model, thp_workloads

from conftest import IMPLEMENTATIONS, machine_class

AVAILABLE, WHY = kernel_available()
WORKLOADS = {w.name: w for w in thp_workloads()}


def _thp_on() -> tuple[bool, str]:
    try:
        setting = thp_setting()
    except OSError:
        return False, "no /sys/kernel/mm/transparent_hugepage"
    return setting in ("always", "madvise"), f"transparent_hugepage/enabled is {setting}"


THP_ON, THP_WHY = _thp_on()


@functools.cache
def kernel_result(name: str) -> Result:
    return run_kernel(WORKLOADS[name])


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_models_agree_on_thp_workloads(name: str) -> None:
    w = WORKLOADS[name]
    engine, reference = (run_model(machine_class(impl), w) for impl in IMPLEMENTATIONS)
    assert engine == reference
    assert engine.thp_split_zero_pages == reference.thp_split_zero_pages


def test_thp_workloads_free_pages_by_splitting() -> None:
    """The workloads are worth running: the splits map zero-filled subpages to the
    zero page, which no KSM counter shows."""
    freed = {name: sum(run_model(machine_class("engine"), w).thp_split_zero_pages)
             for name, w in WORKLOADS.items()}
    assert freed["thp_within"] == 512 - 40
    assert freed["thp_half_zero_2p"] == 2 * 256
    assert freed["thp_ksm_tests_H"] == 0  # no zero-filled subpage
    assert all(v for name, v in freed.items() if name != "thp_ksm_tests_H")


@pytest.mark.skipif(not AVAILABLE, reason=f"kernel parity needs it: {WHY}")
@pytest.mark.skipif(not THP_ON, reason=f"THP is off: {THP_WHY}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_thp_kernel_parity(name: str, impl: str) -> None:
    w = WORKLOADS[name]
    kernel = kernel_result(name)
    model = run_model(machine_class(impl), w)
    assert model.counters == kernel.counters, f"{name}: counters differ"
    assert model.ksm_stat == kernel.ksm_stat, f"{name}: ksm_stat differs"
    assert model.thp_split_zero_pages == kernel.thp_split_zero_pages, \
        f"{name}: pages freed by splitting differ"


# ---- estimate --pid on a live THP-backed process, against the real ksmd ------------


def _vm_like(seed: int, npages: int) -> np.ndarray:
    """30% zero-filled pages, 30% of 16 contents, 40% unique: pages repeat within one
    huge page and across huge pages."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, npages, p=[0.3, 0.3, 0.4])
    rows = rng.integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)
    rows[kind == 0] = 0
    common = rng.integers(0, 256, (16, PAGE_SIZE), dtype=np.uint8)
    rows[kind == 1] = common[rng.integers(0, 16, int((kind == 1).sum()))]
    return rows


@contextlib.contextmanager
def thp_child(rows: np.ndarray) -> Iterator[int]:
    """A child with one PMD-aligned MADV_HUGEPAGE + MADV_MERGEABLE area of ``rows``,
    every page a huge page (checked); yields its pid."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            area = mmap.mmap(-1, len(rows) * PAGE_SIZE,
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            area.madvise(mmap.MADV_HUGEPAGE)
            np.frombuffer(area, dtype=np.uint8)[:] = rows.reshape(-1)
            kernel._check_thp(area, len(rows))
            area.madvise(mmap.MADV_MERGEABLE)
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported as a missing "r"
            os.write(ready_w, repr(e).encode()[:200])
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    try:
        msg = os.read(ready_r, 200)
        assert msg == b"r", f"the THP test child failed: {msg!r}"
        yield pid
    finally:
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(pid, 0)


@pytest.mark.skipif(not AVAILABLE, reason=f"needs a writable /sys/kernel/mm/ksm: {WHY}")
@pytest.mark.skipif(not THP_ON, reason=f"THP is off: {THP_WHY}")
def test_estimate_pid_on_huge_pages_against_the_real_ksmd() -> None:
    from test_estimate_procmem import real_ksmd, run_cli

    knobs = {"merge_across_nodes": 1, "max_page_sharing": 256, "pages_to_scan": 500,
             "smart_scan": 1, "use_zero_pages": 0, "stable_node_chains_prune_millisecs": 2000}
    with thp_child(_vm_like(7, 4 * HPAGE_PMD_NR)) as pid:
        code, out, err = run_cli("estimate", "--pid", str(pid), "--mergeable-only", "--json",
                                 "--no-progress", "--pages-to-scan", "500")
        assert code == 0, err
        est = json.loads(out)
        assert any("huge pages (THP) found in /proc/kpageflags" in n
                   for n in est["processes"][0]["notes"])
        counters, ksm_stat = real_ksmd(pid, knobs, est["ksm"]["full_scans"])
        split = zero_page_ptes(pid) - int(ksm_stat[0]["ksm_zero_pages"])
    assert {c: est["ksm"][c] for c in COUNTERS} == counters
    assert [{k: p["ksm_stat"][k] for k in KSM_STAT_FIELDS} for p in est["processes"]] == ksm_stat
    assert est["processes"][0]["thp_split_zero_pages"] == split > 0
    assert est["thp_split_zero_pages"]["pages"] == split
    assert est["saved_total"]["pages"] == est["saved"]["pages"] + split
