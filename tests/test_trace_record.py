"""Recording live processes (``ksmcore record``, ``ksmcore.trace.recorder.record``).

The recorded processes madvise MADV_MERGEABLE (so that ``--mergeable-only`` takes their
area alone): this module holds kernel_lock (tests/conftest.py KERNEL_MODULES), and
leaves ksmd as it is (run stays whatever it was, normally 0)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ksmcore.cli import main
from ksmcore.estimate.errors import EstimateError
from ksmcore.trace import ABSENT, read_trace
from ksmcore.trace.moving import Group, MovingWorkload, ProcessSpec, Running, _common
from ksmcore.trace.recorder import record, soft_dirty_supported

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/sys/kernel/mm/ksm"),
    reason="the recorded workloads madvise MADV_MERGEABLE: needs a kernel with KSM",
)


def _ksm_idle() -> bool:
    try:
        with open("/sys/kernel/mm/ksm/run") as f:
            return f.read().strip() != "1"
    except OSError:
        return True


def _workload(exit_after: float | None = None) -> MovingWorkload:
    groups = [Group(64, "common"), Group(64, "private", "fresh", 40.0), Group(32, "zero"),
              Group(32, "common", "same", 40.0)]
    return MovingWorkload([ProcessSpec(groups, seconds=5, exit_after=exit_after)
                           for _ in range(2)])


def test_record_initial_pages_and_changes() -> None:
    if not _ksm_idle():
        pytest.skip("the real ksmd is running: merged pages would change the contents seen")
    with Running(_workload()) as r:
        res = record(r.pids, 1.0, None, 100, mergeable_only=True, on_start=r.go)
    assert res.buffer is not None and res.samples >= 8
    t = read_trace(res.buffer)
    assert t.complete and [p.pid for p in t.processes] == r.pids
    assert t.meta["method"] == "hash" and t.meta["interval_ms"] == 100
    first = [c for c in t.changes if c.t_ns == 0]
    assert [c.proc for c in first] == [0, 1]
    for c in first:
        # the initial state: the whole area (192 pages; the zero group too: those pages
        # were written, so they are anonymous pages of zeros, not the zero page)
        assert len(c.vpns) == 192 and (c.ids != ABSENT).all()
        assert c.maps is not None and len(c.maps) == 1
        (start, end), = c.maps
        assert (end - start) >> 12 == 192
        pages = t.contents[c.ids[np.argsort(c.vpns)]]
        assert (pages[:64] == _common(7, 0, 64)).all()
        assert not pages[128:160].any()
    # the common pages are stored once for both processes
    assert (first[0].ids[np.argsort(first[0].vpns)][:64]
            == first[1].ids[np.argsort(first[1].vpns)][:64]).all()
    # later changes: only the written "fresh" group (rewrites of the same bytes are
    # invisible to hashing); nothing disappears
    later = [c for c in t.changes if c.t_ns > 0]
    assert later and all((c.ids != ABSENT).all() for c in later)
    for c in later:
        off = (c.vpns.astype(np.int64) - (first[c.proc].maps[0][0] >> 12))
        assert ((off >= 64) & (off < 128)).all()
    written = sum(len(c.vpns) for c in later)
    assert 20 <= written <= 2 * 40 * 1.5


def test_soft_dirty_sees_writes_of_the_same_bytes() -> None:
    if not soft_dirty_supported():
        with pytest.raises(EstimateError, match="soft-dirty"):
            record([os.getpid()], 1.0, None, 100, method="soft-dirty")
        pytest.skip("this kernel keeps no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY unset)")
    if not _ksm_idle():
        pytest.skip("the real ksmd is running")
    with Running(_workload()) as r:
        res = record(r.pids, 1.0, None, 100, mergeable_only=True, method="soft-dirty",
                     on_start=r.go)
    t = read_trace(res.buffer)
    assert t.meta["method"] == "soft-dirty"
    base = {c.proc: c.maps[0][0] >> 12 for c in t.changes if c.t_ns == 0 and c.maps}
    same = 0
    for c in t.changes:
        if c.t_ns == 0:
            continue
        off = c.vpns.astype(np.int64) - base[c.proc]
        assert ((off >= 64) & (off < 128) | (off >= 160)).all()
        same += int((off >= 160).sum())
        # a rewrite of the same bytes is recorded as a write of the same content
        for v, cid in zip(off.tolist(), c.ids.tolist(), strict=True):
            if v >= 160:
                assert (t.contents[cid] == _common(7, 3, 32)[v - 160]).all()
    assert same >= 20


def test_a_process_that_exits_is_kept_up_to_its_exit(tmp_path) -> None:
    out = tmp_path / "t.trace"
    with Running(_workload(exit_after=0.5)) as r:
        res = record(r.pids, 2.0, out, 100, mergeable_only=True, on_start=r.go)
    assert all(p["exited"] for p in res.processes)
    assert any("exited after" in n for n in res.notes)
    t = read_trace(out)
    assert t.complete and all(p.exited_ns is not None for p in t.processes)
    assert all(0.4e9 <= p.exited_ns <= 1.2e9 for p in t.processes)
    assert t.end_ns < 1.5e9  # every process gone: the recording ended early


def test_record_command(tmp_path) -> None:
    out = tmp_path / "w.trace"
    with Running(_workload()) as r:
        r.go()
        cmd = [sys.executable, "-m", "ksmcore.cli", "record", "--mergeable-only",
               "--seconds", "0.5", "--interval-ms", "100", "-o", str(out),
               "--pid", str(r.pids[0]), "--pid", f"{r.pids[1]}@0"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "2 processes" in done.stdout and f"trace {out}" in done.stdout
    t = read_trace(out)
    assert t.complete and t.processes[1].node == 0 and t.processes[0].node is None
    assert t.meta["command"].startswith("record")


@pytest.mark.parametrize("argv, code, message", [
    (["--seconds", "1", "-o", "X"], 2, "name the processes"),
    (["--pid", "1", "--all", "--seconds", "1", "-o", "X"], 2, "name the processes"),
    (["--pid", "1", "--seconds", "1", "--interval-ms", "0", "-o", "X"], 2, "at least 1"),
    (["--pid", "1", "--seconds", "1", "--interval-ms", "5000", "-o", "X"], 2, "longer"),
    (["--pid", "x1", "--seconds", "1", "-o", "X"], 2, "expected a process id"),
    (["--pid", "1@3", "--seconds", "1", "-o", "X"], 2, "node"),
    (["--pid", "999999999", "--seconds", "1", "-o", "X"], 1, "no such process"),
    (["--pid", "1"], 2, "required"),
    (["--all", "--user", "65534", "--mergeable-only", "--seconds", "1", "-o", "X"], 1,
     "nothing to record"),
])
def test_record_refuses_bad_input_in_one_line(tmp_path, capsys, argv, code, message) -> None:
    argv = [str(tmp_path / "o.trace") if a == "X" else a for a in argv]
    try:
        got = main(["record", *argv])
    except SystemExit as e:  # argparse's own errors
        got = e.code
    out, err = capsys.readouterr()
    assert got == code
    assert out == ""
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o.trace").exists()
