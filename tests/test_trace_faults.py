"""Write faults of the recorded processes (``ksmcore.trace.faults``, ``record(...,
fault_trace=...)``): the tracefs lines parsed, a copy on write of unchanged bytes
recorded at its time, the tracefs instance gone afterwards on every path.

The live tests need root and tracefs (x86's exceptions/page_fault_user event) and skip
without them; they use no KSM: the copies on write are those of a forked child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.estimate.errors import EstimateError
from ksmcore.trace import read_trace
from ksmcore.trace.faults import X86_PF_PROT, X86_PF_WRITE, fault_trace_available, parse
from ksmcore.trace.recorder import FAULT_BUCKET_MS, record

LINES = (
    b"# tracer: nop\n#\n"
    b"           <...>-14101   [000] d....  4933.869753: page_fault_user: "
    b"address=0x7f60e2f52000 ip=0x7f60e2ec0b03 error_code=0x6\n"
    b"   python3.12-14102   [001] d....  4933.869767: page_fault_user: "
    b"address=0x7f60e2f54000 ip=0x7f60e2ec0b03 error_code=0x7\n"
    b"          ksmd-52     [001] .....  4933.9: ksm_start_scan: seq 3 rmap_entries 12\n"
)

FAULT_OK, FAULT_WHY = fault_trace_available()
live = pytest.mark.skipif(not FAULT_OK, reason=f"cannot trace page faults here: {FAULT_WHY}")

# The processes recorded are plain ones: not under the sanitizer run's preloaded ASan,
# whose shadow mappings (tens of TiB) a recording of the whole process would walk.
PLAIN = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

# a parent fills PAGES pages and forks; the child rewrites each page with its own bytes
# after "go" (a copy on write of a page shared since fork: the bytes do not change)
CHILD = """
import ctypes, mmap, os, sys, time
n = int(sys.argv[1])
area = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf = ctypes.c_char.from_buffer(area)
addr = ctypes.addressof(buf)
del buf
for i in range(n):
    area[i * 4096 : (i + 1) * 4096] = bytes([i + 1]) * 4096
pid = os.fork()
if pid:
    os.waitpid(pid, 0)
    sys.exit(0)
print(os.getpid(), addr, flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(0)
for i in range(n):
    time.sleep(0.013)
    area[i * 4096] = area[i * 4096]
sys.stdin.readline()
"""
PAGES = 24


def test_parse_the_page_fault_lines() -> None:
    tids, times, addrs, codes = parse(LINES)
    assert tids.tolist() == [14101, 14102]
    assert times.tolist() == [4933.869753, 4933.869767]
    assert addrs.tolist() == [0x7F60E2F52000, 0x7F60E2F54000]
    assert codes.tolist() == [6, 7]
    assert ((codes & X86_PF_WRITE) != 0).all()
    assert ((codes & X86_PF_PROT) != 0).tolist() == [False, True]
    empty = parse(b"# nothing\n")
    assert all(len(a) == 0 for a in empty)


def _instances_left() -> list[str]:
    """ksmcore fault instances in a mounted tracefs, and temporary tracefs mounts."""
    left = []
    root = kernel._tracefs_root()
    if root is not None:
        left += [p.name for p in (root / "instances").iterdir()
                 if p.name.startswith("ksmcore-faults-")]
    left += [line for line in Path("/proc/mounts").read_text().splitlines()
             if "ksmcore-tracefs-" in line]
    return left


@live
def test_a_copy_on_write_of_the_same_bytes_is_recorded_at_its_time() -> None:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(PAGES)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=PLAIN)
    try:
        assert p.stdout is not None and p.stdin is not None
        pid, addr = map(int, p.stdout.readline().split())

        def go() -> None:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

        res = record([pid], 1.0, None, 200, on_start=go, fault_trace=True)
    finally:
        if p.stdin is not None:
            p.stdin.close()
        p.wait(timeout=10)
    assert res.fault_trace and res.write_faults >= PAGES and res.lost_faults == 0
    assert res.buffer is not None
    t = read_trace(res.buffer)
    assert t.complete and t.meta["fault_trace"] is True
    assert t.meta["fault_bucket_ms"] == FAULT_BUCKET_MS
    first = addr >> 12
    bucket = FAULT_BUCKET_MS * 1_000_000
    seen: dict[int, int] = {}
    for c in t.changes[1:]:
        for v, cid in zip(c.vpns.tolist(), c.ids.tolist(), strict=True):
            if first <= v < first + PAGES:
                # the bytes are unchanged: the same content as at the start
                assert (t.contents[cid] == v - first + 1).all()
                seen.setdefault(v - first, c.t_ns)
    assert sorted(seen) == list(range(PAGES))
    # at the faults' times (rounded up to a bucket; one in the last bucket before a
    # sample is at the sample's time), not every sample's
    on_bucket = sum(t_ns % bucket == 0 for t_ns in seen.values())
    assert on_bucket >= PAGES // 2
    times = np.array([seen[i] for i in range(PAGES)])
    # written one page every 13 ms: the recorded times follow, within a bucket or two
    # (sleeps overrun on a loaded machine)
    assert (np.diff(times) >= 0).all()
    assert times[-1] - times[0] >= (PAGES - 1) * 13e6 - 2 * bucket
    assert not _instances_left()


@live
def test_the_instance_is_removed_when_the_recording_fails() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=PLAIN)
    try:
        with pytest.raises(EstimateError):
            # no candidate memory to record in a process that only sleeps? it has some;
            # a pid that does not exist fails for sure
            record([p.pid, 2**22 + 17], 0.5, None, 100, fault_trace=True)
    finally:
        p.kill()
        p.wait()
    assert not _instances_left()


def test_fault_trace_refused_with_soft_dirty_or_where_unavailable() -> None:
    with pytest.raises(EstimateError, match="hash method"):
        record([os.getpid()], 0.1, None, 100, method="soft-dirty", fault_trace=True)
    if not FAULT_OK:
        with pytest.raises(EstimateError, match="cannot trace write faults"):
            record([os.getpid()], 0.1, None, 100, fault_trace=True)


@live
def test_an_instance_left_by_a_dead_process_is_removed() -> None:
    import contextlib

    dead = subprocess.Popen([sys.executable, "-c", "pass"], env=PLAIN)
    dead.wait()
    with contextlib.ExitStack() as stack:
        inst = kernel.TracefsInstance(stack, "test-")
        stale = inst.root / "instances" / f"ksmcore-faults-{dead.pid}"
        stale.mkdir()
        try:
            with contextlib.ExitStack() as inner:
                kernel.TracefsInstance(inner, "faults-")
                assert not stale.exists()
        finally:
            if stale.exists():
                stale.rmdir()
        assert inst.dir.exists()  # a live process's instance is kept
    assert not _instances_left()


@live
def test_a_tracefs_mount_left_by_a_dead_process_is_unmounted(tmp_path: Path) -> None:
    import contextlib

    if kernel._tracefs_root() is not None:
        pytest.skip("tracefs is mounted where ksmcore looks: no temporary mount is made")
    dead = subprocess.Popen([sys.executable, "-c", "pass"], env=PLAIN)
    dead.wait()
    stale = tmp_path / f"ksmcore-tracefs-{dead.pid}-x"  # as a SIGKILLed recorder leaves it
    stale.mkdir()
    subprocess.run(["mount", "-t", "tracefs", "nodev", str(stale)], check=True)
    try:
        with contextlib.ExitStack() as stack:
            kernel.TracefsInstance(stack, "test-")
            mounts = Path("/proc/mounts").read_text()
            assert str(stale) not in mounts and not stale.exists()
            assert f"ksmcore-tracefs-{os.getpid()}-" in mounts  # its own, named by its pid
    finally:
        if str(stale) in Path("/proc/mounts").read_text():
            subprocess.run(["umount", str(stale)], check=False)
    assert not _instances_left()


@live
def test_sigterm_ends_the_recording_whole_and_removes_the_instance(tmp_path) -> None:
    import signal
    import time

    out = tmp_path / "t.ksmtrace"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=PLAIN)
    try:
        rec = subprocess.Popen([sys.executable, "-m", "ksmcore.cli", "record", "--pid",
                                str(sleeper.pid), "--seconds", "30", "--fault-trace",
                                "-o", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 64):
            time.sleep(0.05)
        time.sleep(0.5)
        rec.send_signal(signal.SIGTERM)
        stdout, stderr = rec.communicate(timeout=20)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert rec.returncode == 0, stderr
    t = read_trace(out)
    assert t.complete and any("interrupted" in n for n in t.summary.get("notes", []))
    assert not _instances_left()
