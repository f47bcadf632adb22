"""Recording live processes: their pages at the start, then what changed, interval by
interval (``ksmcore record``).

Which memory is the memory ``ksmcore estimate --pid`` reads (:mod:`ksmcore.estimate.procmem`):
the mappings KSM would accept (or, ``mergeable_only``, those already VM_MERGEABLE) and
in them the pages ksmd would visit: present, anonymous, not the shared zero page.

How changes are found, at each sample:

- ``"hash"`` (the default; never writes to the target): /proc/PID/smaps for the
  mappings, /proc/PID/pagemap for which pages are present, then every present page is
  read from /proc/PID/mem (read-only) and hashed (xxh3); a page whose hash differs
  from the last sample's was written. Pages written with the bytes they already held
  are invisible to a hash. As root (pfns visible in pagemap) one such write is seen
  anyway: a page that was mapped more than once (merged by the running kernel's KSM,
  or shared with a forked process) and is now an exclusive page at another pfn was
  copied on write; pagemap alone is read every 20 ms between samples for those, so
  that a copy merged again before the next sample is seen too.
- ``"soft-dirty"`` (opt-in: **writes /proc/PID/clear_refs**, clearing the soft-dirty
  bits, which write-protects the target's page table entries): a page whose
  soft-dirty bit is set was written since the last sample, whatever it wrote; only
  those pages and newly present ones are read. Each first write to a page in an
  interval costs the target one minor fault.

Neither method sees what happened between two samples: a page written twice counts
once, with its last contents, at the sample's time; a page that came and went between
two samples is not seen at all.

With ``"hash"``, as root on x86, the recorder also traces the targets' write faults
(:mod:`.faults`: a private tracefs instance, nothing written to the targets; on by
default where it works, ``fault_trace=False`` to leave it off): every write to a page
mapped read-only, a merged (KSM) page above all, faults, and is recorded as a write
of that page at the fault's time (to FAULT_BUCKET_MS), with the contents the next
sample reads. That is what a copy on write of a merged page is to ksmd, even when the
bytes did not change (the pfn check of the poll is then not needed). Writes that do not fault
(to pages already writable: not merged) are still seen only by their hashes, at the
sample's time. Those matter to a replay whose ksmd merges pages at other times than
the recorded kernel's (its writes to a page it merged while the kernel had not would
be missing), so with the faults and pfns the recorder also imputes them
(``impute_writes``, the default): pagemap, read with every read of the faults (each
poll and each sample), tells which pages the kernel had read-only (mapped more than
once: merged) and writable (faulted, or moved to a page of its own: copied on
write); each page's write rate is its faults over its read-only time (after a
second of it), and each interval gets Poisson(rate x writable time) writes of the
page, with its contents, at random times (a fixed seed): an estimate that assumes
steady writers.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import functools
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from .._native import page_hashes
from ..constants import PAGE_SHIFT, PAGE_SIZE
from ..estimate.errors import EstimateError
from ..estimate.procmem import (
    HEADROOM,
    PM_EXCLUSIVE,
    PM_FILE,
    PM_PFN_MASK,
    PM_PRESENT,
    ProcessUnreadable,
    _open,
    _proc_error,
    _read_pages,
    _read_text,
    mem_available,
    parse_smaps,
    select_vmas,
    zero_pfn,
)
from .faults import FaultTraceUnavailable, WriteFaults
from .format import DEFAULT_INTERVAL_MS, TraceWriter

PM_SOFT_DIRTY = 1 << 55
METHODS = ("hash", "soft-dirty")
POLL_S = 0.02  # pagemap polls (or fault-trace reads) between samples, as root
FAULT_BUCKET_MS = 10  # write faults are recorded at their time rounded up to this


@dataclass
class _State:
    """What the recorder last saw of one process."""

    pid: int
    index: int
    maps: list[tuple[int, int]]
    vpns: np.ndarray  # int64, sorted: the present pages
    hashes: np.ndarray  # uint64 per present page
    entries: np.ndarray  # uint64 pagemap entries per present page
    alive: bool = True
    cow: set[int] = field(default_factory=set)  # copies on write seen by poll()
    cache: _MapsCache = field(default_factory=lambda: _MapsCache())
    # write-rate estimates (impute): per present page, seconds the kernel had it mapped
    # read-only (merged: not exclusive), write faults seen meanwhile, and seconds it was
    # writable since the last sample (its writes unseen)
    ro_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nfaults: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rw_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ro: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # read-only now
    pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    polled: float = 0.0


@dataclass
class _Emit:
    """One CHANGES record to write: what one process changed by ``t``."""

    t: int
    index: int
    vpns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pages: np.ndarray | None = None
    gone: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    maps: list[tuple[int, int]] | None = None
    exited: bool = False


@dataclass
class Snapshot:
    """One process at one sample: its chosen mappings and present pages."""

    maps: list[tuple[int, int]]
    vpns: np.ndarray  # int64 sorted
    entries: np.ndarray  # uint64 pagemap entries


@dataclass
class RecordResult:
    """What a recording did (the report of ``ksmcore record``)."""

    path: str | None
    seconds: float
    samples: int
    processes: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0
    unique_pages: int = 0
    late_samples: int = 0  # samples that started late because the last one overran
    method: str = "hash"
    notes: list[str] = field(default_factory=list)
    buffer: builtins.bytes | None = None  # the trace, when recorded into memory (the field
    # above named bytes hides the builtin here)
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable, by reason
    interrupted: bool = False
    fault_trace: bool = False  # the targets' write faults were traced
    imputed_writes: int = 0  # writes added at the pages' rates (impute_writes)
    write_faults: int = 0  # write faults of the targets seen
    lost_faults: int = 0  # fault events the trace buffer dropped before they were read


def _entries(pid: int, maps: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Page numbers and pagemap entries of the present anonymous pages in ``maps``
    (less the zero page where its pfn can be told)."""
    fd = _open(pid, "pagemap")
    zpfn = zero_pfn()
    vp, en = [], []
    try:
        for start, end in maps:
            first, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
            step = 1 << 18
            for lo in range(first, last, step):
                n = min(step, last - lo)
                e = np.frombuffer(os.pread(fd, n * 8, lo * 8), dtype=np.uint64)
                sel = ((e & np.uint64(PM_PRESENT)) != 0) & ((e & np.uint64(PM_FILE)) == 0)
                if zpfn is not None:
                    sel &= (e & np.uint64(PM_PFN_MASK)) != np.uint64(zpfn)
                idx = np.flatnonzero(sel)
                vp.append(idx.astype(np.int64) + lo)
                en.append(e[idx])
    except OSError as e:
        raise _proc_error(pid, "pagemap", e) from None
    finally:
        os.close(fd)
    if not vp:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    return np.concatenate(vp), np.concatenate(en)


SMAPS_EVERY_S = 1.0  # smaps (VmFlags) at least this often; /proc/PID/maps at every sample


class _MapsCache:
    """The chosen mappings of one process: /proc/PID/smaps is long to read and parse
    (most of a sample's time for a small process), so it is read again only when
    /proc/PID/maps changed, or SMAPS_EVERY_S after the last read (VmFlags such as
    VM_MERGEABLE can change without a new line in maps)."""

    def __init__(self) -> None:
        self.text = ""
        self.when = -1e9
        self.maps: list[tuple[int, int]] = []

    def chosen(self, pid: int, mergeable_only: bool) -> list[tuple[int, int]]:
        text = _read_text(pid, "maps")
        if not text:
            raise ProcessUnreadable(f"process {pid} has no user memory (exited?)", "empty")
        now = time.monotonic()
        if text != self.text or now - self.when >= SMAPS_EVERY_S:
            all_vmas = parse_smaps(_read_text(pid, "smaps"))
            if not all_vmas:
                raise ProcessUnreadable(f"process {pid} has no user memory (exited?)",
                                        "empty")
            self.maps = [(v.start, v.end) for v in select_vmas(all_vmas, mergeable_only)]
            self.text, self.when = text, now
        return self.maps


def snapshot(pid: int, mergeable_only: bool, cache: _MapsCache | None = None) -> Snapshot:
    """The chosen mappings of ``pid`` and its present pages in them (ProcessUnreadable
    "gone" or "empty" once it has exited)."""
    maps = (cache or _MapsCache()).chosen(pid, mergeable_only)
    vpns, entries = _entries(pid, maps)
    return Snapshot(list(maps), vpns, entries)


def _hashes(pages: np.ndarray) -> np.ndarray:
    """Which pages changed between samples is told by these (64-bit XXH64, one C call
    for all of them)."""
    return page_hashes(pages)


def _read(pid: int, vpns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pages ``vpns`` (and which could be read: a page may vanish meanwhile)."""
    pages = np.empty((len(vpns), PAGE_SIZE), np.uint8)
    got = _read_pages(pid, vpns, pages)
    return pages, got


def _zero_unknown(entries: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """Pages that may be the shared zero page (pfns hidden: not exclusive, all zeros)."""
    if zero_pfn() is not None or not len(pages):
        return np.zeros(len(pages), bool)
    shared = (entries & np.uint64(PM_EXCLUSIVE)) == 0
    out = np.zeros(len(pages), bool)
    idx = np.flatnonzero(shared)
    if len(idx):
        out[idx] = ~pages[idx].any(axis=1)
    return out


@functools.cache
def soft_dirty_supported() -> bool:
    """Whether this kernel keeps soft-dirty bits (CONFIG_MEM_SOFT_DIRTY): a page just
    written by a fault of ours must show one."""
    area = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area[0] = 1
        cbuf = ctypes.c_char.from_buffer(area)
        addr = ctypes.addressof(cbuf)
        del cbuf
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((addr >> PAGE_SHIFT) * 8)
            (entry,) = struct.unpack("=Q", f.read(8))
    finally:
        area.close()
    return bool(entry & PM_SOFT_DIRTY)


def clear_soft_dirty(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("4")
    except OSError as e:
        raise _proc_error(pid, "clear_refs", e) from None


class Recorder:
    """Records processes into a :class:`TraceWriter`: :meth:`start` takes the initial
    pages, each :meth:`sample` the changes since the last one."""

    def __init__(self, writer: TraceWriter, pids: Sequence[tuple[int, int | None]],
                 mergeable_only: bool = False, method: str = "hash",
                 skip_unreadable: bool = False, faults: WriteFaults | None = None,
                 impute: bool = False) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if method == "soft-dirty" and not soft_dirty_supported():
            raise EstimateError("--soft-dirty: this kernel keeps no soft-dirty bits (built "
                                "without CONFIG_MEM_SOFT_DIRTY); record without it")
        self.w = writer
        self.pids = list(pids)
        self.mergeable_only = mergeable_only
        self.method = method
        self.states: list[_State] = []
        self.t0 = 0.0
        self.pfns = zero_pfn() is not None
        self.notes: list[str] = []
        self.skip_unreadable = skip_unreadable  # --all: leave out what cannot be read
        self.skipped: dict[str, int] = {}
        self.last_t = 0
        self.pages = 0
        self.faults = faults  # the targets' write faults, traced (hash method)
        self.impute = impute and faults is not None and self.pfns
        self.rng = np.random.default_rng(0x4B534D)
        self.imputed = 0
        # faults read, not yet recorded: (pid, time ns since t0 (before start: < 0), vpn)
        self._fault_pids: list[np.ndarray] = []
        self._fault_times: list[np.ndarray] = []
        self._fault_vpns: list[np.ndarray] = []

    def _pull(self) -> None:
        """Read the write faults traced since the last read."""
        assert self.faults is not None
        pids, times, addrs, _present = self.faults.drain()
        if len(pids):
            self._fault_pids.append(pids)
            self._fault_times.append(np.round((times - self.t0) * 1e9).astype(np.int64))
            self._fault_vpns.append((addrs >> np.uint64(PAGE_SHIFT)).astype(np.int64))

    def _faults_until(self, t: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per pid, the pages written (faulted) up to ``t`` and the times to record
        them at: the fault's time rounded up to FAULT_BUCKET_MS, within (last sample, t]."""
        if self.faults is None or not self._fault_pids:
            return {}
        pids = np.concatenate(self._fault_pids)
        times = np.concatenate(self._fault_times)
        vpns = np.concatenate(self._fault_vpns)
        now = times <= t
        later = ~now
        self._fault_pids = [pids[later]]
        self._fault_times = [times[later]]
        self._fault_vpns = [vpns[later]]
        pids, times, vpns = pids[now], times[now], vpns[now]
        bucket = FAULT_BUCKET_MS * 1_000_000
        times = np.clip(-(-times // bucket) * bucket, self.last_t, t)
        out = {}
        for pid in np.unique(pids).tolist():
            sel = pids == pid
            out[int(pid)] = (vpns[sel], times[sel])
        return out

    def _now_ns(self) -> int:
        return max(0, round((time.monotonic() - self.t0) * 1e9))

    def start(self) -> None:
        """The initial pages of every process (t = 0); the clock starts here."""
        first: list[tuple[int, int | None, str, Snapshot, np.ndarray, np.ndarray,
                          _MapsCache]] = []
        for pid, node in self.pids:
            try:
                comm = _read_text(pid, "comm").strip()
                if self.method == "soft-dirty":
                    clear_soft_dirty(pid)  # before reading: no write after it is missed
                cache = _MapsCache()
                snap = snapshot(pid, self.mergeable_only, cache)
                pages, got = _read(pid, snap.vpns)
            except ProcessUnreadable as e:
                if not self.skip_unreadable:
                    raise
                self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                continue
            if self.skip_unreadable and not got.any():
                self.skipped["empty"] = self.skipped.get("empty", 0) + 1
                continue
            # the recorder keeps a copy of every distinct page, and reads a process
            # whole at every sample
            self.pages += int(got.sum())
            if self.pages * PAGE_SIZE * 2 > mem_available() - HEADROOM:
                raise EstimateError(
                    f"recording {self.pages * PAGE_SIZE >> 20} MiB of candidate memory "
                    f"needs about twice that, more than this machine has available")
            keep = got & ~_zero_unknown(snap.entries, pages)
            first.append((pid, node, comm, Snapshot(snap.maps, snap.vpns[keep],
                                                    snap.entries[keep]), pages[keep],
                          _hashes(pages[keep]), cache))
        if not first:
            why = ", ".join(f"{n} {r}" for r, n in self.skipped.items()) or "no process"
            raise EstimateError(f"nothing to record ({why}: none with candidate memory "
                                f"this user may read)")
        for pid, node, comm, snap, pages, hashes, cache in first:
            idx = self.w.process(pid, f"pid {pid} ({comm})", node, 0)
            self.w.changes(0, idx, snap.vpns, pages, maps=snap.maps)
            self.states.append(_State(pid, idx, snap.maps, snap.vpns, hashes, snap.entries,
                                      cache=cache))
        self.w.tick(0)
        # the clock starts once the initial pages are written (compressing a large
        # process takes seconds): what changed meanwhile is in the first sample
        self.t0 = time.monotonic()

    def sample(self) -> int:
        """Every process's changes since the last sample; returns the time (ns)."""
        t = self._now_ns()
        if self.faults is not None:
            self._pull_and_expose()
        faults = self._faults_until(t)
        out: list[_Emit] = []
        bucket = FAULT_BUCKET_MS * 1_000_000
        for st in self.states:
            if st.alive:
                f = faults.get(st.pid)
                if self.impute:
                    fv = f[0] if f is not None else np.zeros(0, np.int64)
                    iv, it = self._imputed(st, fv, t)
                    it = np.clip(-(-it // bucket) * bucket, self.last_t, t)
                    f = (np.concatenate([fv, iv]), np.concatenate(
                        [f[1] if f is not None else np.zeros(0, np.int64), it]))
                out += self._sample_one(st, t, f)
        # every process's writes at fault times first, in time order (the trace's
        # times never go back), then what the sample found at t
        out.sort(key=lambda e: e.t)
        for e in out:
            self.w.changes(e.t, e.index, e.vpns, e.pages, e.gone, e.maps, e.exited)
        self.w.tick(t)
        self.last_t = t
        return t

    def poll(self) -> None:
        """Between two samples: read the traced write faults; or, without them (pfns
        visible, hash method), read only pagemap, and note the pages copied on write
        since the last look (shared, now exclusive at another pfn), so that a copy that
        ksmd merges again before the next sample is seen."""
        if self.faults is not None:
            self._pull_and_expose()
            return
        if not self.pfns or self.method != "hash":
            return
        excl, pfn = np.uint64(PM_EXCLUSIVE), np.uint64(PM_PFN_MASK)
        for st, vpns, entries in self._pagemaps():
            pos = np.minimum(np.searchsorted(st.vpns, vpns), len(st.vpns) - 1)
            old = st.vpns[pos] == vpns
            oe = st.entries[pos]
            cow = old & ((oe & excl) == 0) & ((entries & excl) != 0) \
                & ((oe & pfn) != (entries & pfn))
            st.cow.update(vpns[cow].tolist())
            # what is mapped now is the reference for the next look
            st.entries = st.entries.copy()
            st.entries[pos[old]] = entries[old]

    def _pagemaps(self) -> Iterator[tuple[_State, np.ndarray, np.ndarray]]:
        """Each live process with pages, with its present pages and pagemap entries
        now (a process that cannot be read is passed over: the next sample tells)."""
        for st in self.states:
            if not st.alive or not len(st.vpns):
                continue
            try:
                vpns, entries = _entries(st.pid, st.maps)
            except ProcessUnreadable:
                continue
            yield st, vpns, entries

    def _pull_and_expose(self) -> None:
        """Read the traced write faults, and (imputing) update which pages are read-only
        with them. Every read of the faults goes with a look at pagemap: a page copied
        on write moves to another pfn, and only its fault tells that move from ksmd's
        (a fault read without that look, at a sample, left the copy taken for a merge:
        read-only while writable, its write rate underestimated)."""
        n = len(self._fault_pids)
        self._pull()
        if self.impute:
            new = self._fault_pids[n:]
            self._exposure(
                np.concatenate(new) if new else np.zeros(0, np.int64),
                np.concatenate(self._fault_vpns[n:]) if new else np.zeros(0, np.int64))

    def _exposure(self, fpids: np.ndarray, fvpns: np.ndarray) -> None:
        """Add the time since the last poll to each page's read-only time (mapped
        read-only in the kernel: a write faults) or writable time (a write is unseen),
        then update which pages are read-only: a page written (faulted: ``fpids``,
        ``fvpns`` since the last poll), or moved to a page of its own, is writable; one
        mapped more than once (merged), read-only."""
        excl, pfnm = np.uint64(PM_EXCLUSIVE), np.uint64(PM_PFN_MASK)
        now = time.monotonic()
        for st, vpns, entries in self._pagemaps():
            m = len(st.vpns)
            if len(st.ro_s) != m:
                st.ro_s, st.rw_s, st.nfaults = np.zeros(m), np.zeros(m), np.zeros(m)
                st.ro = (st.entries & excl) == 0
                st.pfns = st.entries & pfnm
            dt = now - (st.polled or now)
            st.polled = now
            st.ro_s[st.ro] += dt
            st.rw_s[~st.ro] += dt
            fv = fvpns[fpids == st.pid]
            at = np.minimum(np.searchsorted(st.vpns, fv), m - 1)
            faulted = np.zeros(m, bool)
            faulted[at[st.vpns[at] == fv]] = True
            st.ro[faulted] = False
            pos = np.minimum(np.searchsorted(st.vpns, vpns), m - 1)
            old = st.vpns[pos] == vpns
            p, e = pos[old], entries[old]
            # a page ksmd merged is mapped more than once (with the KSM page's other
            # mappers); one that moved to a page of its own was copied on write, even
            # when its fault has not been read yet (the event can come after pagemap
            # shows the copy)
            shared = (e & excl) == 0
            moved = (e & pfnm) != st.pfns[p]
            st.ro[p[shared]] = True
            st.ro[p[moved & ~shared]] = False
            st.pfns[p] = e & pfnm

    def _imputed(self, st: _State, fv: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Writes the kernel could not show (to pages it had writable), drawn at each
        page's write rate as seen while it was read-only: page numbers and times."""
        if len(st.nfaults) != len(st.vpns) or not len(st.vpns):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        at = np.searchsorted(st.vpns, fv)
        ok = at < len(st.vpns)
        ok[ok] = st.vpns[at[ok]] == fv[ok]
        np.add.at(st.nfaults, at[ok], 1)
        rate = np.where(st.ro_s >= 1.0, st.nfaults / np.maximum(st.ro_s, 1e-9), 0.0)
        k = self.rng.poisson(rate * st.rw_s)
        st.rw_s[:] = 0
        pos = np.repeat(np.arange(len(st.vpns)), k)
        times = self.rng.integers(self.last_t + 1, max(t, self.last_t + 1) + 1, len(pos))
        self.imputed += len(pos)
        return st.vpns[pos], times

    def _exit(self, st: _State, t: int) -> _Emit:
        st.alive = False
        self.notes.append(f"pid {st.pid} exited after {t / 1e9:.1f} s (kept up to its exit)")
        return _Emit(t, st.index, exited=True)

    def _sample_one(self, st: _State, t: int,
                    faults: tuple[np.ndarray, np.ndarray] | None = None) -> list[_Emit]:
        try:
            snap = snapshot(st.pid, self.mergeable_only, st.cache)
            dirty = None
            if self.method == "soft-dirty":
                dirty = (snap.entries & np.uint64(PM_SOFT_DIRTY)) != 0
                clear_soft_dirty(st.pid)  # after pagemap, before reading the pages
            n = len(snap.vpns)
            # which present pages were present at the last sample too
            pos = np.minimum(np.searchsorted(st.vpns, snap.vpns), max(len(st.vpns) - 1, 0))
            old = st.vpns[pos] == snap.vpns if len(st.vpns) else np.zeros(n, bool)
            want = ~old | dirty if dirty is not None else np.ones(n, bool)
            idx = np.flatnonzero(want)
            pages, got = _read(st.pid, snap.vpns[idx])
        except ProcessUnreadable as e:
            if e.reason in ("gone", "empty"):
                return [self._exit(st, t)]
            raise
        ok = got & ~_zero_unknown(snap.entries[idx], pages)
        read = np.zeros(n, bool)
        read[idx[ok]] = True
        present = ~want | read  # a clean page (soft-dirty) is taken as still there
        hashes = np.zeros(n, np.uint64)
        hashes[old] = st.hashes[pos[old]]
        hashes[idx[ok]] = _hashes(pages[ok])
        changed = read & ~old  # newly present
        if dirty is not None:
            changed |= read & old  # written since the last sample, whatever it wrote
        else:
            changed |= read & old & (hashes != np.where(old, st.hashes[pos], 0))
            if self.pfns and len(st.vpns):
                # copied on write: a page mapped more than once (merged by the running
                # kernel's KSM, or shared after fork) is now an exclusive page at
                # another pfn, whatever its bytes
                oe, ne = st.entries[pos], snap.entries
                excl, pfn = np.uint64(PM_EXCLUSIVE), np.uint64(PM_PFN_MASK)
                changed |= read & old & ((oe & excl) == 0) & ((ne & excl) != 0) \
                    & ((oe & pfn) != (ne & pfn))
        if st.cow:
            changed |= read & np.isin(snap.vpns, np.fromiter(st.cow, np.int64, len(st.cow)))
            st.cow = set()
        rows = np.zeros(n, np.int64)
        rows[idx] = np.arange(len(idx))
        out: list[_Emit] = []
        maps = snap.maps if snap.maps != st.maps else None
        if faults is not None and len(faults[0]):
            # written pages (faulted) still present and read: at their fault times, with
            # the contents read now; the sample need not record them again
            fv, ft = faults
            at = np.minimum(np.searchsorted(snap.vpns, fv), max(n - 1, 0))
            hit = (snap.vpns[at] == fv) & read[at] if n else np.zeros(len(fv), bool)
            pairs = np.unique(np.stack([ft[hit], at[hit]]), axis=1) if hit.any() \
                else np.zeros((2, 0), np.int64)
            for tf in np.unique(pairs[0]).tolist():
                pos_f = pairs[1][pairs[0] == tf]
                out.append(_Emit(int(tf), st.index, snap.vpns[pos_f], pages[rows[pos_f]],
                                 maps=maps))
                maps = None  # the first record carries the new mappings
            changed[pairs[1]] = False
        emit = np.flatnonzero(changed)
        now_vpns = snap.vpns[present]
        gone = np.setdiff1d(st.vpns, now_vpns, assume_unique=True)
        if len(emit) or len(gone) or maps is not None:
            out.append(_Emit(t, st.index, snap.vpns[emit], pages[rows[emit]], gone, maps))
        if self.impute and len(st.ro_s) == len(st.vpns):
            keep_old = old & present
            acc = [np.zeros(n) for _ in range(3)]
            for a, b in zip(acc, (st.ro_s, st.nfaults, st.rw_s), strict=True):
                a[keep_old] = b[pos[keep_old]]
            st.ro_s, st.nfaults, st.rw_s = (a[present] for a in acc)
            ro = np.zeros(n, bool)
            ro[keep_old] = st.ro[pos[keep_old]]
            pf = snap.entries & np.uint64(PM_PFN_MASK)
            pf[keep_old] = st.pfns[pos[keep_old]]
            st.ro, st.pfns = ro[present], pf[present]
        st.maps = snap.maps
        st.vpns = now_vpns
        st.hashes = hashes[present]
        st.entries = snap.entries[present]
        return out


def record(pids: Sequence[int | tuple[int, int | None]], seconds: float,
           out: str | os.PathLike[str] | IO[bytes] | None = None,
           interval_ms: int = DEFAULT_INTERVAL_MS, mergeable_only: bool = False,
           method: str = "hash", meta: dict[str, Any] | None = None,
           on_start: Callable[[], None] | None = None, codec: str = "auto",
           skip_unreadable: bool = False, fault_trace: bool | None = None,
           impute_writes: bool = True) -> RecordResult:
    """Record ``pids`` (PID or (PID, NODE)) for ``seconds`` into ``out`` (a path or a
    binary stream; None: into memory, the bytes in ``result.buffer``, for
    :func:`ksmcore.trace.read_trace`). ``on_start`` is called right after the initial pages were
    taken, when the trace's clock starts. ``fault_trace``: trace the targets' write
    faults (:mod:`.faults`; True: or fail, None: where this host can, False: no).
    ``impute_writes`` (with traced faults and pfns): add the writes the kernel could not
    show, drawn at each page's write rate (see the module's docstring)."""
    import io

    if seconds <= 0 or interval_ms <= 0:
        raise EstimateError("the recording needs a positive duration and interval")
    specs = [(p, None) if isinstance(p, int) else (int(p[0]), p[1]) for p in pids]
    buf = io.BytesIO() if out is None else None
    target: Any = buf if buf is not None else out
    info = dict(meta or {})
    info.update({"interval_ms": interval_ms, "method": method, "mergeable_only": mergeable_only,
                 "seconds": seconds, "pfns_visible": zero_pfn() is not None,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "host": os.uname().nodename, "kernel": os.uname().release})
    with contextlib.ExitStack() as stack:  # the fault trace's instance, on every path
        _sigterm_as_interrupt(stack)
        faults, why = start_fault_trace(stack, [p for p, _ in specs], method, fault_trace)
        info["fault_trace"] = faults is not None
        if faults is not None:
            info["fault_bucket_ms"] = FAULT_BUCKET_MS
            info["imputed_writes"] = bool(impute_writes and zero_pfn() is not None)
        w = TraceWriter(target, info, codec=codec)
        rec = Recorder(w, specs, mergeable_only, method, skip_unreadable, faults,
                       impute_writes)
        if why:
            rec.notes.append(why)
        samples, late, interrupted = _run(rec, seconds, interval_ms, on_start)
        lost = faults.lost() if faults is not None else 0
    if lost:
        rec.notes.append(f"{lost} write faults were lost (the trace buffer overflowed)")
    res = RecordResult(None if buf is not None else str(out), rec.last_t / 1e9, samples,
                       bytes=w.bytes_written, unique_pages=w.unique_pages,
                       late_samples=late, method=method, fault_trace=faults is not None,
                       write_faults=faults.count if faults is not None else 0,
                       lost_faults=lost, imputed_writes=rec.imputed)
    for st in rec.states:
        res.processes.append({"pid": st.pid, "pages_at_end": len(st.vpns),
                              "exited": not st.alive})
    res.notes = rec.notes
    res.skipped = dict(rec.skipped)
    res.interrupted = interrupted
    if buf is not None:
        res.buffer = buf.getvalue()
    return res


def _sigterm_as_interrupt(stack: contextlib.ExitStack) -> None:
    """SIGTERM ends the recording as Ctrl-C does (a whole trace, the tracefs instance
    removed), until ``stack`` unwinds; only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    stack.callback(signal.signal, signal.SIGTERM, signal.SIG_DFL if old is None else old)


def start_fault_trace(stack: contextlib.ExitStack, pids: list[int], method: str,
                      wanted: bool | None) -> tuple[WriteFaults | None, str | None]:
    """The targets' write faults traced until ``stack`` unwinds, when ``wanted`` (True:
    or an EstimateError; None: where this host can, with a note where it cannot)."""
    if wanted is False:
        return None, None
    if method != "hash":
        if wanted:
            raise EstimateError("tracing write faults goes with the hash method only")
        return None, None
    try:
        return WriteFaults(stack, pids), None
    except FaultTraceUnavailable as e:
        if wanted:
            raise EstimateError(f"cannot trace write faults: {e}") from None
        return None, (f"write faults not traced ({e}): writes of unchanged bytes are "
                      f"seen only as copies on write found by pfn, as root")


def _run(rec: Recorder, seconds: float, interval_ms: int,
         on_start: Callable[[], None] | None) -> tuple[int, int, bool]:
    """The initial pages, then a sample every ``interval_ms`` for ``seconds`` (polls in
    between); the trace is closed whole on every path. Returns the samples, the late
    ones, and whether Ctrl-C stopped it."""
    samples = late = 0
    interrupted = False
    try:
        rec.start()
        if on_start is not None:
            on_start()
        step = interval_ms / 1000.0
        k = 1
        while True:
            due = rec.t0 + k * step
            if due > rec.t0 + seconds + 1e-9:
                break
            now = time.monotonic()
            while due - now > POLL_S:  # pagemap or the fault trace, between two samples
                time.sleep(POLL_S)
                rec.poll()
                now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > step:
                late += 1
            rec.sample()
            samples += 1
            k += 1
            if not any(s.alive for s in rec.states):
                rec.notes.append("every process exited: the recording ended early")
                break
    except KeyboardInterrupt:
        # stop early, with a whole trace of what was recorded
        interrupted = True
        rec.notes.append(f"interrupted after {samples} samples")
    finally:
        rec.w.close({"samples": samples, "late_samples": late, "notes": rec.notes})
    return samples, late, interrupted
