"""The kernel parity harness: run a :class:`~ksmcore.workloads.Workload` through this
machine's real ksmd and read back what the models must reproduce.

Needs root and a writable ``/sys/kernel/mm/ksm`` (see :func:`kernel_available`).
:func:`run_kernel` saves every writable knob first and restores all of them on every
path, including exceptions and KeyboardInterrupt.

One run:

1. ``run=2`` (unmerge everything, ``full_scans`` back to 0; written through ``run=0``
   when ``run`` is already 2, because writing the current value does nothing), then
   ``advisor_mode=none``, every workload knob (the workload's value or the kernel
   default) and ``sleep_millisecs`` (see below).
2. One forked child per workload process, one after another in workload order (the
   order of the mm_slot list): ``mmap(MAP_PRIVATE|MAP_ANONYMOUS)``,
   ``MADV_NOHUGEPAGE`` (checked in ``/proc/self/smaps``: ``THPeligible: 0``), fill,
   ``MADV_MERGEABLE``, tell the parent, then wait on a pipe without touching the area.
   Nothing else of a child is mergeable (the parent must not be under
   ``PR_SET_MEMORY_MERGE``, which children would inherit; this is checked), and no
   other process on the machine may be registered with KSM (checked too).
3. ``run=1``, poll ``full_scans`` until it reaches the workload's ``full_scans``, write
   ``run=0`` at once, read every sysfs file and each child's ``/proc/<pid>/ksm_stat``.

Stopping exactly between rounds. ``ksm_do_scan`` ends its batch when a full scan ends
(``full_scans`` is incremented last), and ksmd then sleeps ``sleep_millisecs`` before
the next batch, which would start a new round. Writing ``run=0`` during that sleep
leaves the state "after N full scans": ksmd wakes, sees run=0 and scans nothing. A
timeout of ``msecs_to_jiffies(ms)`` jiffies lasts at least one jiffy less than that,
so ``LONG_SLEEP_MS`` = 60 ms guarantees a window of 50 ms for any HZ >= 100 (58 ms at
this machine's HZ=250). The harness proves it hit the window: it keeps the time just
before the last read that still showed fewer than N full scans (the round ended after
that read) and the time after its ``run=0`` write returned; if they are more than
``SAFE_WINDOW_S`` (50 ms) apart, or ``full_scans`` is not exactly N afterwards, the
attempt is discarded and the whole run is redone once; a second miss raises.

Speed. Every batch, not only the last, is followed by the sleep, so a round costs
``(npages // pages_to_scan + 1) * sleep``. Within a round the batch boundaries do not
change what the kernel decides (only the wall clock moves, which matters for chain
pruning alone), so when the workload has two or more full scans and at least
``FAST_MIN_BATCHES`` batches a round, the harness starts with ``FAST_SLEEP_MS`` (8 ms,
at least one jiffy) and writes ``LONG_SLEEP_MS`` as soon as it sees N-1 full scans
(writing ``sleep_millisecs`` wakes ksmd early, which is harmless). It then checks that
``full_scans`` is still N-1, i.e. the last round had not ended before the switch
(otherwise the attempt is discarded, and the retry uses the long sleep throughout).
Only the last round then runs with 60 ms sleeps. Keep workloads at most a few dozen
batches a round: a 2,000-page workload at pages_to_scan 100 takes about 0.6 s.

Chains: with ``stable_node_chains_prune_millisecs`` at its default 2000 ms a kernel run
shorter than 2 s never prunes (prune time is in jiffies); use 0 for "always prune".

One user at a time. The knobs and the counters are global, so two runs at once (two
test sessions, a benchmark next to a test) would spoil each other. Every entry point
here holds :func:`kernel_lock`, an ``flock`` on ``KERNEL_LOCK_PATH`` that other
processes of ksmcore wait for; it is re-entrant within a process.

Tracepoints. ``run_kernel(w, trace=True)`` also records the ``ksm`` trace events
(include/trace/events/ksm.h) from just before the children are spawned to the
``run=0``, in a private tracefs instance (tracefs is mounted on a temporary directory
if it is not mounted; the instance is removed and the mount undone on every path), and
returns them parsed (:func:`parse_trace_line`) in ``result.info["trace"]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import math
import mmap
import os
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .constants import KNOB_DEFAULTS, KSM_STAT_FIELDS, PAGE_SIZE, SYSFS_FILES
from .pageflags import zero_page_ptes
from .thp import HPAGE_PMD_SIZE as THP_PMD_SIZE
from .workloads import Result, Workload, make_result

__all__ = [
    "kernel_available",
    "kernel_lock",
    "read_ksm_stat",
    "read_sysfs",
    "restore_knobs",
    "run_kernel",
    "save_knobs",
    "time_kernel",
]

KSM_DIR = Path("/sys/kernel/mm/ksm")
THP_ENABLED_PATH = Path("/sys/kernel/mm/transparent_hugepage/enabled")

LONG_SLEEP_MS = 60  # sleep after the last round: the window for writing run=0
FAST_SLEEP_MS = 8  # sleep during the earlier rounds (>= 1 jiffy up to HZ=250)
FAST_MIN_BATCHES = 4  # use the fast phase only with at least this many batches a round
SAFE_WINDOW_S = 0.050  # guaranteed part of the LONG_SLEEP_MS sleep, for HZ >= 100
POLL_S = 0.0002  # busy-poll period for full_scans
CHILD_READY_TIMEOUT_S = 30.0
KERNEL_LOCK_PATH = Path(os.environ.get("KSMCORE_KERNEL_LOCK", "/run/lock/ksmcore-kernel.lock"))


TRACEFS_MOUNTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# the fields after "name: " in the kernel's TP_printk formats
_TRACE_FORMATS = {
    "ksm_start_scan": re.compile(r"seq (-?\d+) rmap size (\d+)$"),
    "ksm_stop_scan": re.compile(r"seq (-?\d+) rmap size (\d+)$"),
    "ksm_enter": re.compile(r"mm (\S+)$"),
    "ksm_exit": re.compile(r"mm (\S+)$"),
    "ksm_merge_one_page": re.compile(r"ksm pfn (\d+) rmap_item (\S+) mm (\S+) error (-?\d+)$"),
    "ksm_merge_with_ksm_page": re.compile(
        r"(ksm )?pfn (\d+) rmap_item (\S+) mm (\S+) error (-?\d+)$"),
    "ksm_remove_ksm_page": re.compile(r"pfn (\d+)$"),
    "ksm_remove_rmap_item": re.compile(r"pfn (\d+) rmap_item (\S+) mm (\S+)$"),
    "ksm_advisor": re.compile(r"ksm scan time (-?\d+) pages_to_scan (\d+) cpu percent (\d+)$"),
}
_TRACE_LINE = re.compile(r"^\s*.+-\d+\s+\[\d+\]\s+\S+\s+[\d.]+: (\w+): (.*)$")


def parse_trace_line(line: str) -> dict[str, Any] | None:
    """One line of a tracefs ``trace`` file as an event dict shaped like the model's
    (ksmcore.tracing): pointers stay the kernel's (hashed) strings, and since the
    kernel prints only whether ``ksm_page`` is NULL, it is ``True`` or ``None``.
    Comment lines and events of other systems give None."""
    m = _TRACE_LINE.match(line)
    if not m or m.group(1) not in _TRACE_FORMATS:
        return None
    name, text = m.group(1), m.group(2)
    f = _TRACE_FORMATS[name].match(text)
    if not f:
        raise ValueError(f"unexpected {name} format: {text!r}")
    g = f.groups()
    if name in ("ksm_start_scan", "ksm_stop_scan"):
        return {"event": name, "seq": int(g[0]), "rmap_entries": int(g[1])}
    if name in ("ksm_enter", "ksm_exit"):
        return {"event": name, "mm": g[0]}
    if name == "ksm_merge_one_page":
        return {"event": name, "pfn": int(g[0]), "rmap_item": g[1], "mm": g[2], "err": int(g[3])}
    if name == "ksm_merge_with_ksm_page":
        return {"event": name, "ksm_page": True if g[0] else None, "pfn": int(g[1]),
                "rmap_item": g[2], "mm": g[3], "err": int(g[4])}
    if name == "ksm_remove_ksm_page":
        return {"event": name, "pfn": int(g[0])}
    if name == "ksm_remove_rmap_item":
        return {"event": name, "pfn": int(g[0]), "rmap_item": g[1], "mm": g[2]}
    return {"event": name, "scan_time": int(g[0]), "pages_to_scan": int(g[1]),
            "cpu_percent": int(g[2])}


def _tracefs_root() -> Path | None:
    for root in TRACEFS_MOUNTS:
        if (root / "instances").is_dir():
            return root
    return None


def trace_available() -> tuple[bool, str]:
    """Whether run_kernel(trace=True) can record the ksm tracepoints here."""
    if "tracefs" not in Path("/proc/filesystems").read_text():
        return False, "no tracefs in this kernel"
    if os.geteuid() != 0:
        return False, "needs root"
    return True, "ok"


_INSTANCE_NAME = re.compile(r"^ksmcore-(?:[a-z]+-)?(\d+)$")


def _remove_stale_instances(root: Path) -> None:
    """Remove the instances left by ksmcore processes that died without unwinding
    (SIGKILL): an instance with events on would keep tracing them for nobody."""
    try:
        names = [p.name for p in (root / "instances").iterdir()]
    except OSError:
        return
    for name in names:
        m = _INSTANCE_NAME.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            with contextlib.suppress(OSError):
                (root / "instances" / name).rmdir()


_MOUNT_NAME = re.compile(r"/ksmcore-tracefs-(\d+)-[^/]*$")


def _remove_stale_mounts() -> None:
    """Unmount the temporary tracefs mounts of ksmcore processes that died without
    unwinding (SIGKILL): the mount directory names its owner's pid."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or fields[2] != "tracefs":
            continue
        m = _MOUNT_NAME.search(fields[1])
        if m and not Path(f"/proc/{m.group(1)}").exists():
            done = subprocess.run(["umount", fields[1]], capture_output=True)
            if done.returncode == 0:
                with contextlib.suppress(OSError):
                    Path(fields[1]).rmdir()


class TracefsInstance:
    """A private tracefs instance (tracefs mounted on a temporary directory first when
    it is not mounted), named ``ksmcore-<tag><pid>``. Everything it sets up is undone
    by ``stack`` (the events it enabled off, the instance removed, tracefs unmounted)
    on every path; close files opened in it before ``stack`` unwinds, since an
    instance in use cannot be removed."""

    def __init__(self, stack: contextlib.ExitStack, tag: str = "") -> None:
        root = _tracefs_root()
        if root is None:
            _remove_stale_mounts()
            mount_dir = Path(tempfile.mkdtemp(prefix=f"ksmcore-tracefs-{os.getpid()}-"))
            stack.callback(mount_dir.rmdir)
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(mount_dir)], check=True,
                           capture_output=True)
            stack.callback(subprocess.run, ["umount", str(mount_dir)], check=True,
                           capture_output=True)
            root = mount_dir
        self.root = root
        _remove_stale_instances(root)
        self.dir = root / "instances" / f"ksmcore-{tag}{os.getpid()}"
        self.dir.mkdir()
        stack.callback(self.dir.rmdir)
        self._stack = stack

    def has_event(self, event: str) -> bool:
        """Whether this kernel has ``event`` ("system" or "system/name")."""
        return (self.dir / "events" / event).is_dir()

    def set(self, name: str, value: str | int) -> None:
        (self.dir / name).write_text(f"{value}\n")

    def enable(self, event: str, event_filter: str | None = None) -> None:
        """Enable ``event`` ("system" or "system/name"), with ``event_filter`` (tracefs
        filter syntax) when given; it is disabled again when the stack unwinds."""
        d = self.dir / "events" / event
        if event_filter is not None:
            (d / "filter").write_text(event_filter)
        self._stack.callback((d / "enable").write_text, "0")
        (d / "enable").write_text("1")


class _KsmTrace(TracefsInstance):
    """A tracefs instance with the ksm events on; ``read()`` parses its buffer."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        super().__init__(stack)
        if not self.has_event("ksm"):
            raise RuntimeError("this kernel has no ksm trace events")
        self.enable("ksm")

    def clear(self) -> None:
        (self.dir / "trace").write_text("")

    def read(self) -> list[dict[str, Any]]:
        events = []
        for line in (self.dir / "trace").read_text().splitlines():
            e = parse_trace_line(line)
            if e is not None:
                events.append(e)
        return events


class _Missed(Exception):
    """ksmd was not stopped exactly between two rounds; the attempt is discarded."""


# --------------------------------------------------------------------------------
# one user of the real KSM at a time

_lock_mutex = threading.RLock()
_lock_state: dict[str, Any] = {"fd": None, "depth": 0}


@contextlib.contextmanager
def kernel_lock() -> Iterator[None]:
    """Hold the machine-wide lock on the real KSM (an flock other ksmcore processes
    wait for). Re-entrant: nested holders in one process share the flock."""
    with _lock_mutex:
        if _lock_state["depth"] == 0:
            fd = os.open(KERNEL_LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            _lock_state["fd"] = fd
        _lock_state["depth"] += 1
        try:
            yield
        finally:
            _lock_state["depth"] -= 1
            if _lock_state["depth"] == 0:
                os.close(_lock_state["fd"])  # closing the description drops the flock
                _lock_state["fd"] = None


# --------------------------------------------------------------------------------
# sysfs and procfs


def _read(name: str) -> int | str:
    text = (KSM_DIR / name).read_text().strip()
    if name == "advisor_mode":  # "[none] scan-time"
        m = re.search(r"\[(\S+)\]", text)
        return m.group(1) if m else text
    return int(text)


def _read_int(name: str) -> int:
    return int((KSM_DIR / name).read_text())


def _write(name: str, value: int | str) -> None:
    with open(KSM_DIR / name, "w") as f:
        f.write(f"{value}\n")


def read_sysfs() -> dict[str, int | str]:
    """Every file of ``constants.SYSFS_FILES`` that exists, in sysfs order."""
    return {n: _read(n) for n in SYSFS_FILES if (KSM_DIR / n).exists()}


def save_knobs() -> dict[str, int | str]:
    """The current value of every writable knob (``constants.KNOB_DEFAULTS``)."""
    return {n: _read(n) for n in KNOB_DEFAULTS if (KSM_DIR / n).exists()}


def restore_knobs(saved: dict[str, int | str]) -> None:
    """Write ``saved`` back: run=2 first (so merge_across_nodes and max_page_sharing
    are writable), advisor_mode=none (so pages_to_scan is), the other knobs, then the
    saved advisor_mode and last the saved run. Tries every knob, then raises if any
    write failed. (Switching the advisor to scan-time resets pages_to_scan to
    advisor_min_pages_to_scan, so a saved scan-time pages_to_scan cannot be restored.)"""
    errors: list[str] = []

    def put(name: str, value: int | str) -> None:
        try:
            _write(name, value)
        except OSError as e:
            errors.append(f"{name}={value}: {e}")

    if _read("run") != 2:
        put("run", 2)
    put("advisor_mode", "none")
    first = ("merge_across_nodes", "max_page_sharing")
    rest = [n for n in saved if n not in first and n not in ("run", "advisor_mode")]
    for name in [n for n in first if n in saved] + rest:
        put(name, saved[name])
    if "advisor_mode" in saved:
        put("advisor_mode", saved["advisor_mode"])
    put("run", saved["run"])
    if errors:
        raise RuntimeError("could not restore ksm knobs: " + "; ".join(errors))


def read_ksm_stat(pid: int | str) -> dict[str, int | bool]:
    """``/proc/<pid>/ksm_stat`` as ints, with ``ksm_merge_any``/``ksm_mergeable`` as bools."""
    out: dict[str, int | bool] = {}
    for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        value = value.strip()
        out[key.rstrip(":")] = value == "yes" if value in ("yes", "no") else int(value)
    return out


def _other_ksm_users() -> list[int]:
    """Pids, other than ours, with a VM_MERGEABLE area or under PR_SET_MEMORY_MERGE."""
    users = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = read_ksm_stat(entry.name)
        except (OSError, ValueError):
            continue  # gone, or a kernel thread (empty file)
        if stat.get("ksm_mergeable") or stat.get("ksm_merge_any"):
            users.append(int(entry.name))
    return users


def kernel_available() -> tuple[bool, str]:
    """Whether :func:`run_kernel` can run here, and why not."""
    if not KSM_DIR.is_dir():
        return False, "no /sys/kernel/mm/ksm (kernel without CONFIG_KSM)"
    if os.geteuid() != 0:
        return False, "needs root"
    if not os.access(KSM_DIR / "run", os.W_OK):
        return False, "/sys/kernel/mm/ksm/run is not writable"
    if not Path("/proc/self/ksm_stat").exists():
        return False, "no /proc/<pid>/ksm_stat"
    users = _other_ksm_users()
    if users:
        return False, f"other processes use KSM and would change the counters: {users}"
    return True, "ok"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM off while cleaning up; they are delivered afterwards."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------------
# children


def _fill_area(area: mmap.mmap, pages: np.ndarray) -> None:
    np.frombuffer(area, dtype=np.uint8)[:] = pages.reshape(-1)


def _check_no_thp(area: mmap.mmap) -> None:
    start = ctypes.addressof(ctypes.c_char.from_buffer(area))
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m and int(m.group(1), 16) <= start < int(m.group(2), 16):
            for field_line in lines[i + 1 :]:
                if re.match(r"[0-9a-f]+-[0-9a-f]+ ", field_line):
                    break
                if field_line.startswith("THPeligible:") and field_line.split()[1] != "0":
                    raise RuntimeError("the area is THP-eligible despite MADV_NOHUGEPAGE")
            return
    raise RuntimeError("the area is not in /proc/self/smaps")


def _check_thp(area: mmap.mmap, npages: int) -> None:
    """Every page of a THP workload's area is backed by a huge page (smaps
    AnonHugePages), so that the kernel and the model start alike."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(area))
    if start % THP_PMD_SIZE:
        raise RuntimeError(f"the THP area at {start:#x} is not PMD-aligned")
    for lo, hi, fields in _smaps_areas():
        if lo <= start < hi:
            huge_kb = fields.get("AnonHugePages", 0)
            if huge_kb != npages * PAGE_SIZE // 1024:
                raise RuntimeError(f"only {huge_kb} kB of the {npages * 4} kB area are huge "
                                   "pages (THP allocation failed?)")
            return
    raise RuntimeError("the area is not in /proc/self/smaps")


def _smaps_areas() -> Iterator[tuple[int, int, dict[str, int]]]:
    lo = hi = 0
    fields: dict[str, int] = {}
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            if hi:
                yield lo, hi, fields
            lo, hi, fields = int(m.group(1), 16), int(m.group(2), 16), {}
        elif line.endswith(" kB"):
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0])
    if hi:
        yield lo, hi, fields


def thp_setting() -> str:
    """The host's /sys/kernel/mm/transparent_hugepage/enabled (the bracketed word)."""
    text = THP_ENABLED_PATH.read_text()
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else text.strip()


def _child(pages: np.ndarray, ready_w: int, go_r: int, thp: bool = False) -> None:
    npages = pages.shape[0]
    area = mmap.mmap(
        -1,
        npages * PAGE_SIZE,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
    )
    if thp:
        area.madvise(mmap.MADV_HUGEPAGE)  # before the first fault
        _fill_area(area, pages)
        _check_thp(area, npages)
        area.madvise(mmap.MADV_MERGEABLE)
        os.write(ready_w, b"ready")
        os.close(ready_w)
        os.read(go_r, 1)
        return
    try:
        area.madvise(mmap.MADV_NOHUGEPAGE)  # before the first fault
    except OSError:
        if Path("/sys/kernel/mm/transparent_hugepage").exists():
            raise  # EINVAL is fine only without THP support
    _check_no_thp(area)
    _fill_area(area, pages)
    area.madvise(mmap.MADV_MERGEABLE)
    os.write(ready_w, b"ready")
    os.close(ready_w)
    os.read(go_r, 1)  # returns at EOF: the parent closed the pipe (or died)


def _child_tree(
    pages: np.ndarray, writes: list[tuple[np.ndarray, np.ndarray]], ready_w: int, go_r: int
) -> None:
    """A parent that maps and madvises ``pages``, then forks one child per entry of
    ``writes``; each child overwrites its pages (COW) and waits like the parent."""
    npages = pages.shape[0]
    area = mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with contextlib.suppress(OSError):
        area.madvise(mmap.MADV_NOHUGEPAGE)
    _check_no_thp(area)
    _fill_area(area, pages)
    area.madvise(mmap.MADV_MERGEABLE)
    kids = []
    for idx, contents in writes:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                np.frombuffer(area, dtype=np.uint8).reshape(npages, PAGE_SIZE)[idx] = contents
                os.write(w, b"k")
                os.close(w)
                os.read(go_r, 1)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        if os.read(r, 1) != b"k":
            raise RuntimeError("a forked child died before writing its pages")
        os.close(r)
        kids.append(pid)
    os.write(ready_w, b"ready")
    os.close(ready_w)
    os.read(go_r, 1)
    for pid in kids:
        os.waitpid(pid, 0)


def _spawn(pages: np.ndarray, go_r: int, go_w: int, deadline: float,
           writes: list[tuple[np.ndarray, np.ndarray]] | None = None,
           thp: bool = False) -> tuple[int, bytes]:
    """Fork a child for ``pages`` (with ``writes``: a fork tree, see _child_tree); return
    its pid and its report (b"ready" or an error) once it has madvised its area."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            if writes is None:
                _child(pages, ready_w, go_r, thp)
            else:
                _child_tree(pages, writes, ready_w, go_r)
            code = 0
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            with contextlib.suppress(OSError):
                os.write(ready_w, f"error: {e!r}".encode()[:4000])
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        msg = b""
        while True:
            wait = max(
                0.0, min(deadline, time.monotonic() + CHILD_READY_TIMEOUT_S) - time.monotonic()
            )
            if not select.select([ready_r], [], [], wait)[0]:
                return pid, b"error: timed out waiting for the child to madvise"
            chunk = os.read(ready_r, 4096)
            if not chunk:
                return pid, msg or b"error: the child died before madvise"
            msg += chunk
            if msg == b"ready":
                return pid, msg
    finally:
        os.close(ready_r)


def _reap(pids: list[int]) -> None:
    """Wait for the children (they exit at EOF on the go pipe); SIGKILL stragglers."""
    end = time.monotonic() + 2.0
    left = list(pids)
    while left:
        for pid in list(left):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            left.remove(pid)
        if left and time.monotonic() > end:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            end = math.inf
        if left:
            time.sleep(0.001)


# --------------------------------------------------------------------------------
# the run


@contextlib.contextmanager
def _children(w: Workload, deadline: float,
              writes: list[tuple[np.ndarray, np.ndarray]] | None = None) -> Iterator[list[int]]:
    """One child per process of ``w``, each madvised in workload order (with
    ``writes``, a fork tree: see _child_tree); yields their pids. They exit when the
    go pipe closes on leaving the block, and are reaped, on every path."""
    pids: list[int] = []
    go_r, go_w = os.pipe()
    try:
        for i, pages in enumerate(w.processes):
            pid, msg = _spawn(pages, go_r, go_w, deadline, writes, w.thp)
            pids.append(pid)
            if msg != b"ready":
                raise RuntimeError(f"{w.name}: child for process {i} failed: {msg.decode()}")
        yield pids
    finally:
        with _signals_deferred():
            os.close(go_w)  # the children see EOF and exit
            os.close(go_r)
            _reap(pids)


def _fast_sleep_ms(w: Workload) -> int | None:
    """FAST_SLEEP_MS for the rounds before the last, or None to sleep long throughout."""
    batches_per_round = w.npages // w.effective_knobs()["pages_to_scan"] + 1
    if w.full_scans >= 2 and batches_per_round >= FAST_MIN_BATCHES:
        return FAST_SLEEP_MS
    return None


def _reset() -> None:
    """run=2: unmerge everything, free all rmap_items, full_scans = 0."""
    if _read("run") == 2:
        _write("run", 0)  # writing 2 again would do nothing
    _write("run", 2)
    if _read_int("full_scans") != 0:
        raise RuntimeError("run=2 did not reset full_scans")


def _stop_after(full_scans: int, fast: bool, deadline: float) -> float:
    """Poll until ``full_scans`` rounds have ended, write run=0 within the sleep that
    follows the last one, and prove it (raise _Missed otherwise). Returns the time from
    the last read that showed fewer full scans to the end of the run=0 write."""
    switched = not fast
    t_below = time.monotonic()  # the last round ended after this time
    while True:
        t = time.monotonic()
        fs = _read_int("full_scans")
        if fs >= full_scans:
            _write("run", 0)
            t_done = time.monotonic()
            break
        t_below = t
        if not switched and fs == full_scans - 1:
            _write("sleep_millisecs", LONG_SLEEP_MS)
            t = time.monotonic()
            if _read_int("full_scans") != full_scans - 1:
                _write("run", 0)
                raise _Missed("the last round ended before the long sleep was set")
            t_below, switched = t, True
        if t > deadline:
            _write("run", 0)
            raise TimeoutError(f"ksmd did not make {full_scans} full scans in time ({fs} so far)")
        time.sleep(POLL_S)
    if fs != full_scans or not switched:
        raise _Missed(f"full_scans was {fs} (switched to long sleep: {switched})")
    gap = t_done - t_below
    if gap >= SAFE_WINDOW_S:
        raise _Missed(f"run=0 was written {gap * 1000:.1f} ms after the last round could end")
    fs = _read_int("full_scans")
    if fs != full_scans:
        raise _Missed(f"full_scans is {fs} after run=0")
    return gap


def _attempt(w: Workload, fast_ms: int | None, deadline: float, info: dict[str, Any],
             trace: _KsmTrace | None = None) -> Result:
    _reset()
    if read_ksm_stat("self").get("ksm_merge_any"):
        raise RuntimeError("this process is under PR_SET_MEMORY_MERGE; its children would be too")
    users = _other_ksm_users()
    if users:
        raise RuntimeError(f"other processes use KSM and would change the counters: {users}")
    _write("advisor_mode", "none")
    for name, value in w.effective_knobs().items():  # merge_across_nodes, max_page_sharing first
        if (KSM_DIR / name).exists():
            _write(name, value)
    _write("sleep_millisecs", fast_ms if fast_ms is not None else LONG_SLEEP_MS)

    if trace is not None:
        trace.clear()
    with _children(w, deadline) as pids:
        before = read_sysfs()
        t0 = time.monotonic()
        _write("run", 1)
        gap = _stop_after(w.full_scans, fast_ms is not None, deadline)
        elapsed = time.monotonic() - t0
        after = read_sysfs()
        stats = [read_ksm_stat(pid) for pid in pids]
        result = make_result(before, after, stats, elapsed)
        if w.thp:
            # the zero-page PTEs KSM did not place are the ones THP splits placed
            result.thp_split_zero_pages = [zero_page_ptes(pid) - int(s["ksm_zero_pages"])
                                           for pid, s in zip(pids, stats, strict=True)]
        result.info = dict(info, fast_sleep_ms=fast_ms, stop_gap_ms=round(gap * 1000, 3))
        if trace is not None:
            result.info["trace"] = trace.read()
        return result


def _run_kernel_locked(workload: Workload, timeout: float = 60.0, trace: bool = False) -> Result:
    """Run ``workload`` through the real ksmd; the knobs are restored on every path.
    With ``trace``, ``result.info["trace"]`` holds the ksm trace events of the run."""
    ok, why = kernel_available()
    if not ok:
        raise RuntimeError(f"cannot run the kernel harness: {why}")
    if workload.thp and thp_setting() not in ("always", "madvise"):
        raise RuntimeError(f"THP workloads need transparent_hugepage/enabled always or "
                           f"madvise, not {thp_setting()}")
    missing = set(KSM_STAT_FIELDS) - set(read_ksm_stat("self"))
    if missing:
        raise RuntimeError(f"/proc/<pid>/ksm_stat lacks {sorted(missing)}")
    deadline = time.monotonic() + timeout
    saved = save_knobs()
    with contextlib.ExitStack() as stack:
        try:
            tracer = _KsmTrace(stack) if trace else None
            first = _fast_sleep_ms(workload)
            try:
                return _attempt(workload, first, deadline, {"attempts": 1}, tracer)
            except _Missed as e:
                miss = e
            try:  # the retry sleeps long throughout
                return _attempt(workload, None, deadline, {"attempts": 2, "missed": str(miss)},
                                tracer)
            except _Missed as e:
                raise RuntimeError(
                    f"{workload.name}: could not stop ksmd between rounds ({miss}; then {e})"
                ) from e
        finally:
            with _signals_deferred():
                restore_knobs(saved)
    raise AssertionError("unreachable")


def _time_kernel_locked(workload: Workload, timeout: float = 300.0,
                writes: list[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[float, Result]:
    """Time the real ksmd on ``workload`` as ksm_tests -P does: from ``run=1`` until
    ``full_scans`` reaches the workload's count, with ``sleep_millisecs=0``.

    With ``writes``, the single process of ``workload`` forks one child per entry after
    its madvise, and each child overwrites those pages (W3 of the benchmarks); the
    Result's ksm_stat then covers the parent only.

    Returns the seconds and the counters read right after ``run=0``. Without a sleep
    ksmd may already have begun the next round when it is stopped, so the cumulative
    counters (pages_scanned) can run ahead; what merged is final for converged
    workloads. The knobs are restored on every path.
    """
    ok, why = kernel_available()
    if not ok:
        raise RuntimeError(f"cannot run the kernel harness: {why}")
    deadline = time.monotonic() + timeout
    saved = save_knobs()
    try:
        _reset()
        _write("advisor_mode", "none")
        for name, value in workload.effective_knobs().items():
            if (KSM_DIR / name).exists():
                _write(name, value)
        _write("sleep_millisecs", 0)
        with _children(workload, deadline, writes) as pids:
            before = read_sysfs()
            t0 = time.perf_counter()
            _write("run", 1)
            while _read_int("full_scans") < workload.full_scans:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{workload.name}: ksmd too slow")
            elapsed = time.perf_counter() - t0
            _write("run", 0)
            after = read_sysfs()
            stats = [read_ksm_stat(pid) for pid in pids]
            return elapsed, make_result(before, after, stats, elapsed)
    finally:
        with _signals_deferred():
            restore_knobs(saved)


def _run_kernel_advisor_locked(workload: Workload, advisor: dict[str, int], sleep_millisecs: int,
                       timeout: float = 30.0) -> list[dict[str, Any]]:
    """Run ``workload`` with the scan-time advisor on (``advisor``: the advisor_* knobs
    other than advisor_mode, written first; then advisor_mode=scan-time, which sets
    pages_to_scan to advisor_min_pages_to_scan) until ``workload.full_scans`` full scans
    ended, recording the ksm trace events. Nothing here stops ksmd exactly between
    rounds: what is compared is each ksm_advisor event's arithmetic. The knobs and
    tracefs are restored on every path."""
    ok, why = kernel_available()
    if not ok:
        raise RuntimeError(f"cannot run the kernel harness: {why}")
    deadline = time.monotonic() + timeout
    saved = save_knobs()
    with contextlib.ExitStack() as stack:
        try:
            tracer = _KsmTrace(stack)
            _reset()  # ksmd's cursor at the list head: the first round starts cleanly
            _write("advisor_mode", "none")
            for name, value in workload.effective_knobs().items():
                if name != "pages_to_scan" and (KSM_DIR / name).exists():
                    _write(name, value)
            for name, value in advisor.items():
                _write(name, value)
            _write("sleep_millisecs", sleep_millisecs)
            _write("advisor_mode", "scan-time")
            tracer.clear()
            with _children(workload, deadline):
                _write("run", 1)
                while _read_int("full_scans") < workload.full_scans:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{workload.name}: ksmd too slow")
                    time.sleep(0.005)
                _write("run", 0)
                return tracer.read()
        finally:
            with _signals_deferred():
                restore_knobs(saved)
    raise AssertionError("unreachable")


def run_kernel(workload: Workload, timeout: float = 60.0, trace: bool = False) -> Result:
    """Run ``workload`` through the real ksmd; the knobs are restored on every path.
    With ``trace``, ``result.info["trace"]`` holds the ksm trace events of the run."""
    with kernel_lock():
        return _run_kernel_locked(workload, timeout, trace)


def time_kernel(workload: Workload, timeout: float = 300.0,
                writes: list[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[float, Result]:
    """Time the real ksmd on ``workload``, holding :func:`kernel_lock` (see
    ``_time_kernel_locked``)."""
    with kernel_lock():
        return _time_kernel_locked(workload, timeout, writes)


def run_kernel_advisor(workload: Workload, advisor: dict[str, int], sleep_millisecs: int,
                       timeout: float = 30.0) -> list[dict[str, Any]]:
    """The scan-time advisor on the real ksmd, holding :func:`kernel_lock` (see
    ``_run_kernel_advisor_locked``)."""
    with kernel_lock():
        return _run_kernel_advisor_locked(workload, advisor, sleep_millisecs, timeout)
