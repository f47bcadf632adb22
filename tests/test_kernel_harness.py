"""The kernel parity harness (ksmcore.kernel) on this machine's real ksmd, and the
workload library it shares with the model tests."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.constants import COUNTERS, KNOB_DEFAULTS, KSM_STAT_FIELDS, MADV_MERGEABLE, PAGE_SIZE
from ksmcore.workloads import Workload, parity_workloads, run_model

AVAILABLE, WHY = kernel.kernel_available()
needs_kernel = pytest.mark.skipif(
    not AVAILABLE, reason=f"needs root and a writable /sys/kernel/mm/ksm: {WHY}"
)


def knob_texts() -> dict[str, str]:
    """The raw text of every writable file of /sys/kernel/mm/ksm/."""
    d = kernel.KSM_DIR
    return {n: (d / n).read_text() for n in KNOB_DEFAULTS if (d / n).exists()}


def assert_no_children() -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@pytest.fixture
def machine_state() -> Iterator[dict[str, str]]:
    """The knobs as found; checks after the test that they are exactly as found, that
    no child is left and that nothing else is registered with KSM."""
    saved = kernel.save_knobs()
    before = knob_texts()
    try:
        yield before
    finally:
        after = knob_texts()
        if after != before:
            kernel.restore_knobs(saved)  # leave the machine as found, then fail
        assert after == before
        assert_no_children()
        assert kernel._other_ksm_users() == []


def star(n: int) -> np.ndarray:
    return np.full((n, PAGE_SIZE), ord("*"), dtype=np.uint8)


# --- the workload library (no kernel needed) ---------------------------------------


def test_parity_workloads_are_valid_and_deterministic() -> None:
    a, b = parity_workloads(), parity_workloads()
    assert len(a) >= 14
    assert len({w.name for w in a}) == len(a)
    for wa, wb in zip(a, b, strict=True):
        assert wa.name == wb.name and wa.knobs == wb.knobs and wa.full_scans == wb.full_scans
        assert all(np.array_equal(x, y) for x, y in zip(wa.processes, wb.processes, strict=True))
        assert wa.npages <= 2000
        assert set(wa.effective_knobs()) >= {"pages_to_scan", "smart_scan", "use_zero_pages"}


def test_workload_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Workload("w", [np.zeros((2, 100), dtype=np.uint8)])
    with pytest.raises(ValueError):
        Workload("w", [star(2)], knobs={"sleep_millisecs": 0})
    with pytest.raises(ValueError):
        Workload("w", [star(4)[:, ::-1]])  # not C-contiguous


def test_run_model_drives_the_machine_api() -> None:
    calls: list[tuple] = []

    class Proc:
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def mmap(self, n: int) -> int:
            calls.append(("mmap", self.pid, n))
            return 0x10000000

        def fill(self, addr: int, arr: np.ndarray) -> None:
            calls.append(("fill", self.pid, arr.shape))

        def madvise(self, addr: int, length: int, advice: int) -> None:
            calls.append(("madvise", self.pid, length, advice))

        def ksm_stat(self) -> dict:
            return {f: 0 for f in KSM_STAT_FIELDS} | {"extra": 1}

    class Ksm:
        def __init__(self) -> None:
            object.__setattr__(self, "scans", 0)

        def __setattr__(self, name: str, value: int) -> None:
            calls.append(("set", name, value))

        def scan(self, full_scans: int) -> None:
            calls.append(("scan", full_scans))
            object.__setattr__(self, "scans", full_scans)

        def stats(self) -> dict:
            return {c: 0 for c in COUNTERS} | {"pages_scanned": 7 * self.scans}

    class Machine:
        def __init__(self) -> None:
            self.ksm = Ksm()
            self.n = 0

        def spawn(self) -> Proc:
            self.n += 1
            return Proc(self.n)

    w = Workload("w", [star(3), star(2)], {"max_page_sharing": 5}, full_scans=4)
    r = run_model(Machine, w)
    assert calls[:6] == [
        ("mmap", 1, 3),
        ("fill", 1, (3, PAGE_SIZE)),
        ("madvise", 1, 3 * PAGE_SIZE, MADV_MERGEABLE),
        ("mmap", 2, 2),
        ("fill", 2, (2, PAGE_SIZE)),
        ("madvise", 2, 2 * PAGE_SIZE, MADV_MERGEABLE),
    ]
    assert ("set", "max_page_sharing", 5) in calls and ("set", "pages_to_scan", 100) in calls
    assert calls[-2:] == [("set", "run", 1), ("scan", 4)]
    assert r.counters["pages_scanned"] == 28 and set(r.counters) == set(COUNTERS)
    assert r.ksm_stat == [{f: 0 for f in KSM_STAT_FIELDS}] * 2


def test_kernel_available_reports_a_reason() -> None:
    ok, why = kernel.kernel_available()
    assert isinstance(ok, bool) and why


@pytest.mark.skipif(not Path("/proc/self/ksm_stat").exists(), reason="no ksm_stat")
def test_read_ksm_stat() -> None:
    stat = kernel.read_ksm_stat("self")
    assert set(KSM_STAT_FIELDS) <= set(stat)
    assert isinstance(stat["ksm_mergeable"], bool) and isinstance(stat["ksm_rmap_items"], int)


# --- the harness on the real kernel -------------------------------------------------


@needs_kernel
def test_kselftest_M_p10(machine_state: dict[str, str]) -> None:
    w = Workload("-M -p 10", [star(10)], {"pages_to_scan": 10}, full_scans=2)
    r = kernel.run_kernel(w)
    c = r.counters
    assert (c["pages_shared"], c["pages_sharing"], c["full_scans"]) == (1, 9, 2)
    assert c["pages_unshared"] == c["pages_volatile"] == c["pages_skipped"] == 0
    assert c["pages_scanned"] == 20  # two visits of each page
    assert r.ksm_stat == [
        {
            "ksm_rmap_items": 10,
            "ksm_zero_pages": 0,
            "ksm_merging_pages": 10,
            "ksm_process_profit": 10 * PAGE_SIZE - 10 * 64,
            "ksm_merge_any": False,
            "ksm_mergeable": True,
        }
    ]
    assert c["general_profit"] == 9 * PAGE_SIZE - 10 * 64


@needs_kernel
def test_stops_exactly_after_n_full_scans(machine_state: dict[str, str]) -> None:
    # One visit per page per round: pages_scanned tells whether a round was overshot.
    for n in (1, 2, 3):
        r = kernel.run_kernel(Workload(f"dup10x{n}", [star(10)], full_scans=n))
        assert r.counters["full_scans"] == n
        assert r.counters["pages_scanned"] == 10 * n
        assert r.counters["pages_sharing"] == (0 if n == 1 else 9)


@needs_kernel
def test_batches_do_not_change_the_result(machine_state: dict[str, str]) -> None:
    # pages_to_scan 7 runs the fast phase (many batches a round); 100 does not.
    w7 = next(w for w in parity_workloads() if w.name == "pts7")
    assert kernel._fast_sleep_ms(w7) is not None
    w100 = Workload("pts100", w7.processes, {"pages_to_scan": 100}, w7.full_scans)
    assert kernel._fast_sleep_ms(w100) is None
    assert kernel.run_kernel(w7) == kernel.run_kernel(w100)


@needs_kernel
def test_knobs_restored_exactly(machine_state: dict[str, str]) -> None:
    odd = {
        "pages_to_scan": 123,
        "sleep_millisecs": 37,
        "smart_scan": 0,
        "use_zero_pages": 1,
        "max_page_sharing": 100,
        "stable_node_chains_prune_millisecs": 1234,
        "advisor_max_cpu": 55,
        "advisor_target_scan_time": 150,
    }
    saved = kernel.save_knobs()
    try:
        kernel._write("run", 2)
        for name, value in odd.items():
            kernel._write(name, value)
        kernel._write("run", 0)
        before = knob_texts()
        w = Workload("w", [star(20), star(20)], {"max_page_sharing": 3, "pages_to_scan": 5}, 2)
        r = kernel.run_kernel(w)
        assert r.counters["pages_sharing"] > 0
        assert knob_texts() == before
        assert kernel.read_sysfs()["pages_shared"] == 0  # run=2 unmerged on the way out
    finally:
        kernel.restore_knobs(saved)


@needs_kernel
def test_knobs_restored_when_a_child_fails(
    machine_state: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fill = kernel._fill_area

    def failing_fill(area, pages):  # runs in the forked child
        if pages[0, 0] == 0xEE:
            raise OSError(errno.EIO, "injected failure")
        real_fill(area, pages)

    monkeypatch.setattr(kernel, "_fill_area", failing_fill)
    bad = np.full((4, PAGE_SIZE), 0xEE, dtype=np.uint8)
    w = Workload("child fails", [star(8), bad, star(8)], full_scans=2)
    with pytest.raises(RuntimeError, match="child for process 1 failed.*injected failure"):
        kernel.run_kernel(w)


@needs_kernel
def test_knobs_restored_when_a_knob_is_rejected(machine_state: dict[str, str]) -> None:
    w = Workload("bad knob", [star(4)], {"max_page_sharing": 1})
    with pytest.raises(OSError) as e:
        kernel.run_kernel(w)
    assert e.value.errno == errno.EINVAL


@needs_kernel
def test_knobs_restored_on_keyboard_interrupt(
    machine_state: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object) -> float:
        time.sleep(0.1)  # ksmd is running and merging
        raise KeyboardInterrupt

    monkeypatch.setattr(kernel, "_stop_after", interrupted)
    w = Workload("interrupted", [star(50), star(50)], full_scans=3)
    with pytest.raises(KeyboardInterrupt):
        kernel.run_kernel(w)
    assert kernel.read_sysfs()["pages_shared"] == 0


@needs_kernel
def test_a_missed_stop_is_retried_once(
    machine_state: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_stop = kernel._stop_after
    misses: list[int] = []

    def miss_once(full_scans: int, fast: bool, deadline: float) -> float:
        gap = real_stop(full_scans, fast, deadline)
        if len(misses) < misses_wanted:
            misses.append(1)
            raise kernel._Missed("injected")
        return gap

    misses_wanted = 1
    monkeypatch.setattr(kernel, "_stop_after", miss_once)
    r = kernel.run_kernel(Workload("dup10", [star(10)]))
    assert r.info["attempts"] == 2
    assert (r.counters["pages_sharing"], r.counters["full_scans"]) == (9, 2)
    misses_wanted = 3
    with pytest.raises(RuntimeError, match="could not stop ksmd between rounds"):
        kernel.run_kernel(Workload("dup10", [star(10)]))
