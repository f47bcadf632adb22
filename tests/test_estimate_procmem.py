"""ksmcore estimate on live processes: which pages it takes, that reading changes
nothing, the errors, and the real ksmd on the same live process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.cli import main
from ksmcore.constants import COUNTERS, KSM_STAT_FIELDS, PAGE_SIZE
from ksmcore.estimate.errors import EstimateError
from ksmcore.estimate.procmem import METHODS, ProcessUnreadable, _compact, read_process
from ksmcore.workloads import make_result

IS_ROOT = os.geteuid() == 0
AVAILABLE, WHY = kernel.kernel_available()
NOBODY = 65534


@dataclass
class Area:
    """One anonymous mapping of a live test process: ``rows`` written at ``written``
    (page indices), pages ``read`` only read (the zero page), the rest never touched."""

    npages: int
    written: np.ndarray
    rows: np.ndarray
    read: Sequence[int] = ()
    mergeable: bool = True

    def present(self) -> np.ndarray:
        """What ksmd would scan: the written pages, in address order."""
        order = np.argsort(self.written)
        return self.rows[order]


def make_area(seed: int, npages: int = 400, nwritten: int = 300, mergeable: bool = True) -> Area:
    rng = np.random.default_rng(seed)
    written = np.sort(rng.choice(npages, nwritten, replace=False))
    distinct = rng.integers(0, 256, (12, PAGE_SIZE), dtype=np.uint8)
    distinct[0] = 0  # written zeros: a real page, unlike a read fault's zero page
    rows = distinct[rng.integers(0, 12, nwritten)]
    rows[: nwritten // 3] = rng.integers(0, 256, (nwritten // 3, PAGE_SIZE), dtype=np.uint8)
    rng.shuffle(rows)
    rest = np.setdiff1d(np.arange(npages), written)
    return Area(npages, written, np.ascontiguousarray(rows), read=rest[::2].tolist(),
                mergeable=mergeable)


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    addresses: list[int]
    go_w: int
    reaped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if not self.reaped:
            os.close(self.go_w)  # the child reads EOF and exits
            self.proc.wait()
            self.reaped = True


# The test process: a fresh interpreter, not a fork of this one. A fork would carry all
# of pytest's memory, and under the sanitized build ASan's terabytes of shadow mappings,
# into every read of the whole process. Its areas come on stdin (np.savez).
CHILD = r"""
import io, mmap, os, struct, sys
import numpy as np
ready_w, go_r, uid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = dict(np.load(io.BytesIO(sys.stdin.buffer.read())))
if uid >= 0:  # after every import: the interpreter's files may be root's alone
    os.setgid(uid)
    os.setuid(uid)
maps, addrs = [], []
for k in range(int(data["n"])):
    npages, mergeable = (int(x) for x in data[f"shape{k}"])
    m = mmap.mmap(-1, npages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)  # before the first fault: 4 KiB pages only
    view = np.frombuffer(m, dtype=np.uint8).reshape(npages, 4096)
    view[data[f"written{k}"]] = data[f"rows{k}"]
    for i in data[f"read{k}"]:
        _ = m[int(i) * 4096]  # a read fault maps the zero page
    if mergeable:
        m.madvise(mmap.MADV_MERGEABLE)
    maps.append((m, view))
    addrs.append(view.ctypes.data)
os.write(ready_w, struct.pack(f"{len(addrs)}Q", *addrs))
os.read(go_r, 1)
"""


@contextlib.contextmanager
def live(areas: Sequence[Area], uid: int | None = None) -> Iterator[Child]:
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    payload = io.BytesIO()
    arrays: dict[str, np.ndarray] = {"n": np.array(len(areas))}
    for k, a in enumerate(areas):
        arrays[f"shape{k}"] = np.array([a.npages, int(a.mergeable)])
        arrays[f"written{k}"] = np.asarray(a.written)
        arrays[f"rows{k}"] = a.rows
        arrays[f"read{k}"] = np.asarray(a.read, dtype=np.int64)
    np.savez(payload, **arrays)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ready_w), str(go_r), str(-1 if uid is None else uid)],
        stdin=subprocess.PIPE, pass_fds=(ready_w, go_r), env=env)
    os.close(ready_w)
    os.close(go_r)
    child = Child(proc, [], go_w)
    try:
        assert proc.stdin is not None
        proc.stdin.write(payload.getvalue())
        proc.stdin.close()
        data = os.read(ready_r, 8 * len(areas))
        assert len(data) == 8 * len(areas), "the test child failed"
        child.addresses = list(struct.unpack(f"{len(areas)}Q", data))
        yield child
    finally:
        os.close(ready_r)
        child.close()


def pagemap(pid: int, addr: int, npages: int) -> np.ndarray:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE_SIZE * 8)
        return np.frombuffer(f.read(npages * 8), dtype=np.uint64)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# --- which pages --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_takes_present_anonymous_pages_of_mergeable_ranges(method: str) -> None:
    merge, other = make_area(1), make_area(2, npages=50, nwritten=40, mergeable=False)
    with live([merge, other]) as child:
        src = read_process(child.pid, mergeable_only=True, method=method)
        assert src.kind == "process" and src.pid == child.pid
        (seg,) = src.segments
        assert np.array_equal(seg, merge.present())
        everything = read_process(child.pid, mergeable_only=False, method=method)
        pages = np.concatenate(everything.segments)
        assert len(pages) > 300 + 40
        for rows in (merge.present(), other.present()):  # both areas, in address order
            first = np.flatnonzero((pages == rows[0]).all(axis=1))
            assert any(np.array_equal(pages[f : f + len(rows)], rows) for f in first)


def test_reading_changes_nothing_in_the_process() -> None:
    area = make_area(3)
    with live([area]) as child:
        addr = child.addresses[0]
        before = pagemap(child.pid, addr, area.npages)
        present_before = (before >> np.uint64(63)) & np.uint64(1)
        for method in METHODS:
            read_process(child.pid, mergeable_only=True, method=method)
        code, out, err = run_cli("estimate", "--pid", str(child.pid), "--json", "--no-progress")
        assert code == 0, err
        after = pagemap(child.pid, addr, area.npages)
        # no page faulted in (not even the zero page), none copied (same pfns as root)
        assert np.array_equal(before, after)
        assert int(present_before.sum()) == len(area.written) + len(area.read)
        assert np.array_equal(read_process(child.pid, True).segments[0], area.present())


def test_cli_estimate_of_a_live_process_matches_its_image(tmp_path) -> None:
    area = make_area(4)
    with live([area]) as child:
        code, out, err = run_cli("estimate", "--pid", f"{child.pid}@1", "--nodes", "2",
                                 "--mergeable-only", "--json", "--no-progress")
    assert code == 0, err
    live_result = json.loads(out)
    path = tmp_path / "same.img"
    area.present().tofile(path)
    code, out, err = run_cli("estimate", f"{path}@1", "--nodes", "2", "--json", "--no-progress")
    image_result = json.loads(out)
    assert live_result["ksm"] == image_result["ksm"]
    (p,) = live_result["processes"]
    assert p["pid"] == child.pid and p["kind"] == "process" and p["node"] == 1
    assert p["ksm_stat"] == image_result["processes"][0]["ksm_stat"]
    assert live_result["nodes"][1]["pages"] == 300 and live_result["nodes"][0]["pages"] == 0


# --- errors -------------------------------------------------------------------------


def test_gone_process() -> None:
    with live([make_area(5, npages=4, nwritten=2)]) as child:
        pid = child.pid
    code, out, err = run_cli("estimate", "--pid", str(pid))
    assert (code, out) == (1, "")
    assert err == f"ksmcore estimate: process {pid}: no such process (it has exited?)\n"


def test_kernel_thread_has_no_memory() -> None:
    if not os.path.exists("/proc/2/status") or open("/proc/2/comm").read().strip() != "kthreadd":
        pytest.skip("pid 2 is not kthreadd here")
    with pytest.raises(ProcessUnreadable, match="no user memory") as e:
        read_process(2)
    assert e.value.reason == "empty"


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become another user")
def test_unreadable_process_names_the_privilege() -> None:
    """An unprivileged reader of root's process: one line naming what is needed."""
    with live([make_area(6, npages=8, nwritten=4)]) as child:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 99
            try:
                os.close(r)
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    code = main(["estimate", "--pid", str(child.pid)])
                os.write(w, f"{code}\n{err.getvalue()}".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            reply = f.read()
        os.waitpid(pid, 0)
    code, _, message = reply.partition("\n")
    assert code == "1"
    assert message.count("\n") == 1
    assert f"process {child.pid}: cannot read /proc/{child.pid}/" in message
    assert "permission denied" in message and "CAP_SYS_PTRACE" in message


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start processes of another user")
def test_all_processes_of_a_user() -> None:
    a, b = make_area(7, npages=60, nwritten=50), make_area(8, npages=30, nwritten=20)
    with live([a], uid=NOBODY) as c1, live([b], uid=NOBODY) as c2:
        code, out, err = run_cli("estimate", "--all", "--user", str(NOBODY), "--mergeable-only",
                                 "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    by_pid = {p["pid"]: p for p in result["processes"]}
    assert by_pid[c1.pid]["pages"] == 50 and by_pid[c2.pid]["pages"] == 20
    assert by_pid[c1.pid]["ksm_stat"]["ksm_rmap_items"] == 50
    assert "--all:" in result["remarks"][0]
    code, out, err = run_cli("estimate", "--user", "nobody")
    assert (code, out) == (2, "") and "--user applies to --all only" in err


def test_compaction_in_place() -> None:
    rows = np.random.default_rng(0).integers(0, 256, (10_000, 8), dtype=np.uint8)
    keep = np.random.default_rng(1).random(10_000) < 0.7
    got = _compact(rows.copy(), keep)
    assert np.array_equal(got, rows[keep])


def test_budget_refuses_what_does_not_fit() -> None:
    with live([make_area(9, npages=20, nwritten=10)]) as child:
        with pytest.raises(EstimateError, match="needs more memory than this machine has"):
            read_process(child.pid, True, budget=5 * PAGE_SIZE)


# --- against the real ksmd on the same live process ---------------------------------


def real_ksmd(pid: int, knobs: dict[str, int], full_scans: int) -> tuple[dict, list]:
    """The real ksmd on the live process ``pid`` (the only KSM user), stopped between
    rounds after ``full_scans`` full scans, as ksmcore.kernel.run_kernel does; every
    knob is restored."""
    saved = kernel.save_knobs()
    try:
        for _attempt in range(2):
            kernel._reset()  # run=2: nothing merged, full_scans 0; the process stays
            others = [p for p in kernel._other_ksm_users() if p != pid]
            if others:  # as kernel_available(): their pages would change the counters
                pytest.skip(f"other processes use KSM: {others}")
            kernel._write("advisor_mode", "none")
            for name, value in knobs.items():  # merge_across_nodes, max_page_sharing first
                kernel._write(name, value)
            kernel._write("sleep_millisecs", kernel.LONG_SLEEP_MS)
            before = kernel.read_sysfs()
            kernel._write("run", 1)
            try:
                kernel._stop_after(full_scans, False, time.monotonic() + 60)
            except kernel._Missed:
                continue
            result = make_result(before, kernel.read_sysfs(), [kernel.read_ksm_stat(pid)])
            return result.counters, result.ksm_stat
        pytest.fail("could not stop ksmd between two full scans")
    finally:
        kernel.restore_knobs(saved)


@pytest.mark.skipif(not AVAILABLE, reason=f"needs a writable /sys/kernel/mm/ksm: {WHY}")
@pytest.mark.parametrize("options", [
    {},
    {"use_zero_pages": 1, "smart_scan": 0, "pages_to_scan": 64, "max_page_sharing": 4},
])
def test_live_process_against_the_real_ksmd(options: dict[str, int]) -> None:
    knobs = {"merge_across_nodes": 1, "max_page_sharing": 256, "pages_to_scan": 100,
             "smart_scan": 1, "use_zero_pages": 0, "stable_node_chains_prune_millisecs": 2000}
    knobs.update(options)
    area = make_area(10)
    argv = ["estimate", "--pid", "PID", "--mergeable-only", "--json", "--no-progress"]
    for name in ("max_page_sharing", "pages_to_scan", "smart_scan", "use_zero_pages"):
        argv += ["--" + name.replace("_", "-"), str(knobs[name])]
    with live([area, make_area(11, npages=40, nwritten=30, mergeable=False)]) as child:
        argv[2] = str(child.pid)
        code, out, err = run_cli(*argv)
        assert code == 0, err
        est = json.loads(out)
        counters, ksm_stat = real_ksmd(child.pid, knobs, est["ksm"]["full_scans"])
    assert {c: est["ksm"][c] for c in COUNTERS} == counters
    assert [{k: p["ksm_stat"][k] for k in KSM_STAT_FIELDS} for p in est["processes"]] == ksm_stat
    assert est["saved"]["pages"] > 0
