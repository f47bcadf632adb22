"""The recorded processes' write faults, through a private tracefs instance (root).

A write to a page whose page table entry is read-only faults. A KSM page is always
mapped read-only, so every write to a merged page, whatever bytes it writes, faults
and is copied on write (do_wp_page): the one change that matters most to ksmd and
that hashing pages cannot see when the bytes are unchanged. :class:`WriteFaults`
turns on the x86 ``exceptions/page_fault_user`` event in its own tracefs instance
(:class:`ksmcore.kernel.TracefsInstance`), filtered to write faults (error code bit 1,
X86_PF_WRITE) of the recorded processes' threads (``set_event_pid``, and
``event-fork`` for the threads they start), on the monotonic trace clock, and reads
them back from ``trace_pipe`` (a consuming read: nothing is read twice, nothing is
written to the targets).

A fault on a present page (X86_PF_PROT) is a copy on write, of a KSM page, a page
shared since fork or the shared zero page, or the reuse of an exclusive page that was
write-protected (a merge attempt that failed after write_protect_page); one on an
absent page makes it present. The recorder records each as a write of the page, with
the contents its next sample reads: a page ksmd had not merged is unchanged by it, a
merged one is copied, in the replay as in the kernel.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import numpy as np

from ..kernel import TracefsInstance

EVENT = "exceptions/page_fault_user"
X86_PF_PROT = 1  # the page was present: a protection fault
X86_PF_WRITE = 2
BUFFER_KB = 4096  # per CPU: many seconds of faults between two reads
# "comm-TID [CPU] flags seconds: page_fault_user: address=0x... ip=0x... error_code=0x.."
_LINE = re.compile(rb"-(\d+)\s+\[\d+\]\s+\S+\s+(\d+\.\d+): page_fault_user: "
                   rb"address=(?:0x)?([0-9a-f]+)\S* ip=\S+ error_code=0x([0-9a-f]+)")


class FaultTraceUnavailable(RuntimeError):
    """This host cannot trace page faults (not root, no tracefs, not x86)."""


def fault_trace_available() -> tuple[bool, str]:
    """Whether :class:`WriteFaults` can work here (without setting anything up)."""
    try:
        if "tracefs" not in Path("/proc/filesystems").read_text():
            return False, "no tracefs in this kernel"
    except OSError:
        return False, "no /proc/filesystems"
    if os.geteuid() != 0:
        return False, "tracing page faults needs root"
    if os.uname().machine not in ("x86_64", "i686", "i386"):
        return False, "the page_fault_user event is x86's"
    return True, "ok"


def parse(text: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thread ids, times (seconds, the trace clock), addresses and error codes of the
    page_fault_user lines in ``text`` (other lines are left out)."""
    found = _LINE.findall(text)
    if not found:
        return (np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.uint64),
                np.zeros(0, np.int64))
    tids, times, addrs, codes = zip(*found, strict=True)
    return (np.array(tids, np.int64), np.array(times, np.float64),
            np.array([int(a, 16) for a in addrs], np.uint64),
            np.array([int(c, 16) for c in codes], np.int64))


def _tgid(tid: int) -> int | None:
    try:
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class WriteFaults:
    """Write faults of ``pids`` (and their threads) from now on, until ``stack`` unwinds
    (which disables the event and removes the instance on every path).
    :meth:`drain` returns those not returned before, :meth:`lost` how many the ring
    buffer dropped."""

    def __init__(self, stack: contextlib.ExitStack, pids: list[int]) -> None:
        ok, why = fault_trace_available()
        if not ok:
            raise FaultTraceUnavailable(why)
        try:
            self.inst = TracefsInstance(stack, "faults-")
        except (OSError, subprocess.CalledProcessError) as e:
            raise FaultTraceUnavailable(f"no tracefs instance: {e}") from None
        if not self.inst.has_event(EVENT):
            raise FaultTraceUnavailable(f"this kernel has no {EVENT} event")
        self.pids = set(pids)
        self.tgid: dict[int, int | None] = {}
        tids = []
        for pid in pids:
            try:
                threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                threads = [pid]
            for t in threads:
                self.tgid[t] = pid
                tids.append(t)
        self.inst.set("trace_clock", "mono")  # time.monotonic()'s clock
        self.inst.set("buffer_size_kb", BUFFER_KB)
        self.inst.set("options/event-fork", 1)  # threads started later are traced too
        self.inst.set("set_event_pid", " ".join(map(str, tids)))
        self.fd = os.open(self.inst.dir / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        stack.callback(os.close, self.fd)  # before the instance is removed
        self.inst.enable(EVENT, f"error_code & {X86_PF_WRITE}")
        self.rest = b""
        self.count = 0

    def _read(self) -> bytes:
        chunks = [self.rest]
        while True:
            try:
                b = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            if not b:
                break
            chunks.append(b)
        data = b"".join(chunks)
        cut = data.rfind(b"\n") + 1  # a line may be cut by the read
        self.rest = data[cut:]
        return data[:cut]

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(pids, times, addresses, present) of the write faults since the last call:
        the recorded process each thread belongs to, the time on time.monotonic()'s
        clock, the faulting address, whether the page was present."""
        tids, times, addrs, codes = parse(self._read())
        pids = np.empty(len(tids), np.int64)
        for i, t in enumerate(tids.tolist()):
            if t not in self.tgid:
                self.tgid[t] = _tgid(t)  # a thread started after the recording began
            g = self.tgid[t]
            pids[i] = g if g is not None and g in self.pids else -1
        keep = pids >= 0
        self.count += int(keep.sum())
        return (pids[keep], times[keep], addrs[keep],
                (codes[keep] & X86_PF_PROT) != 0)

    def lost(self) -> int:
        """Events the ring buffer overwrote before they were read (per_cpu stats)."""
        n = 0
        for stats in (self.inst.dir / "per_cpu").glob("cpu*/stats"):
            with contextlib.suppress(OSError, ValueError):
                for line in stats.read_text().splitlines():
                    if line.startswith("overrun:"):
                        n += int(line.split()[1])
        return n
