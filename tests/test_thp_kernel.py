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
import time
from collections.abc import Iterator

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.constants import (
    COUNTERS,
    KSM_STAT_FIELDS,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    PAGE_SIZE,
)
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


# ---- fork of huge pages: the child's writes copy 4 KiB, the split reaches both -------

FORK_PAGES = 2 * HPAGE_PMD_NR
FORK_WRITES = (3, 4, 600, 700, 1000)  # pages the child writes after the fork


def _fork_tree(rows: np.ndarray, ready_w: int, go_r: int) -> None:
    """The parent maps THP-backed mergeable memory, forks a child that flips a byte of
    each FORK_WRITES page (COW), reports the child's pid and waits."""
    area = mmap.mmap(-1, len(rows) * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    np.frombuffer(area, dtype=np.uint8)[:] = rows.reshape(-1)
    kernel._check_thp(area, len(rows))
    area.madvise(mmap.MADV_MERGEABLE)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the grandchild never returns
        view = np.frombuffer(area, dtype=np.uint8).reshape(len(rows), PAGE_SIZE)
        for k in FORK_WRITES:
            view[k, 0] ^= 0xFF
        os.write(w, b"k")
        os.read(go_r, 1)
        os._exit(0)
    os.read(r, 1)
    os.write(ready_w, pid.to_bytes(8, "little"))
    os.read(go_r, 1)
    os.waitpid(pid, 0)


def _fork_model(cls: type, rows: np.ndarray, knobs: dict[str, int],
                full_scans: int) -> tuple[dict, list, list]:
    m = cls()
    p = m.spawn()
    a = p.mmap(len(rows))
    p.madvise(a, len(rows) * PAGE_SIZE, MADV_HUGEPAGE)
    p.fill(a, rows)
    p.madvise(a, len(rows) * PAGE_SIZE, MADV_MERGEABLE)
    c = p.fork()
    for k in FORK_WRITES:
        c.write(a + k * PAGE_SIZE, bytes([rows[k, 0] ^ 0xFF]))
    m.ksm.run = 2  # as the kernel run: run=2 first, then the knobs, then run=1
    for name, value in knobs.items():
        setattr(m.ksm, name, value)
    m.ksm.run = 1
    m.ksm.scan(full_scans=full_scans)
    stats = [{k: s[k] for k in KSM_STAT_FIELDS} for s in (p.ksm_stat(), c.ksm_stat())]
    return ({k: m.ksm.stats()[k] for k in COUNTERS if k not in ("pages_scanned",
                                                                 "pages_skipped")},
            stats, [p.thp_split_zero_pages, c.thp_split_zero_pages])


@pytest.mark.skipif(not AVAILABLE, reason=f"needs a writable /sys/kernel/mm/ksm: {WHY}")
@pytest.mark.skipif(not THP_ON, reason=f"THP is off: {THP_WHY}")
def test_fork_of_huge_pages_against_the_real_ksmd() -> None:
    rows = _vm_like(11, FORK_PAGES)
    knobs = {"merge_across_nodes": 1, "max_page_sharing": 256, "pages_to_scan": 500,
             "smart_scan": 1, "use_zero_pages": 0, "stable_node_chains_prune_millisecs": 2000}
    full_scans = 4
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    ppid = os.fork()
    if ppid == 0:  # pragma: no cover - the child never returns
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            _fork_tree(rows, ready_w, go_r)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    saved = kernel.save_knobs()
    try:
        data = os.read(ready_r, 8)
        assert len(data) == 8, "the THP fork test process failed"
        cpid = int.from_bytes(data, "little")
        kernel._reset()
        others = [p for p in kernel._other_ksm_users() if p not in (ppid, cpid)]
        if others:
            pytest.skip(f"other processes use KSM: {others}")
        kernel._write("advisor_mode", "none")
        for name, value in knobs.items():
            kernel._write(name, value)
        kernel._write("sleep_millisecs", kernel.LONG_SLEEP_MS)
        kernel._write("run", 1)
        kernel._stop_after(full_scans, False, time.monotonic() + 60)
        after = kernel.read_sysfs()
        stats = [kernel.read_ksm_stat(pid) for pid in (ppid, cpid)]
        split = [zero_page_ptes(pid) - int(s["ksm_zero_pages"])
                 for pid, s in zip((ppid, cpid), stats, strict=True)]
    finally:
        with contextlib.suppress(OSError):
            kernel._write("run", 0)
        kernel.restore_knobs(saved)
        os.close(ready_r)
        os.close(go_w)
        os.waitpid(ppid, 0)
    for impl in IMPLEMENTATIONS:
        counters, ksm_stat, model_split = _fork_model(machine_class(impl), rows, knobs,
                                                      full_scans)
        assert counters == {k: int(after[k]) for k in counters}, impl
        assert ksm_stat == [{k: s[k] for k in KSM_STAT_FIELDS} for s in stats], impl
        assert model_split == split, impl
    assert all(split)
