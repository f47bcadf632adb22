"""Live processes as sources, read through /proc without changing them.

Which memory: the VMAs KSM would accept (``vma_ksm_compatible()``: private, none of
VM_SHARED, VM_MAYSHARE, VM_PFNMAP, VM_IO, VM_DONTEXPAND, VM_HUGETLB, VM_MIXEDMAP,
VM_DROPPABLE, read from the ``VmFlags`` of /proc/PID/smaps), all of them (what
``prctl(PR_SET_MEMORY_MERGE)`` would make mergeable) or, with ``mergeable_only``,
those already VM_MERGEABLE (``mg``: what the running kernel's ksmd scans today).
Which pages: those ksmd's ``scan_get_next_rmap_item()`` would visit: present,
anonymous (file pages in the page cache are never merged) and not the shared zero
page. Swapped-out and never-touched pages are not visited by ksmd either.

How: /proc/PID/pagemap tells the pages, with the PAGEMAP_SCAN ioctl where the kernel
has it (6.7+: whole ranges at once, and the zero page even without privilege), else
by reading the pagemap entries. Then /proc/PID/mem (opened read-only) is read for
those pages only, one pread per run of pages: reading a page that is not present
would fault it in (the zero page, or a swap-in), changing the process.

The pages are copied once, packed in address order, into one array per process:
non-present pages cost ksmd no budget and hold no rmap_item, so leaving the holes out
changes no counter.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..constants import PAGE_SHIFT, PAGE_SIZE
from ..pageflags import KPF_THP, kpageflags, pagemap
from ..thp import HPAGE_PMD_NR
from .errors import EstimateError
from .sources import Source

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_FILE = 1 << 61  # file page or shared anonymous
PM_EXCLUSIVE = 1 << 56  # mapped exactly once
PM_PFN_MASK = (1 << 55) - 1

# PAGEMAP_SCAN (include/uapi/linux/fs.h)
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_PFNZERO = 1 << 5
_PM_SCAN_ARG = struct.Struct("=12Q")  # struct pm_scan_arg
PAGEMAP_SCAN = (3 << 30) | (_PM_SCAN_ARG.size << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, ...)
_SCAN_VEC = 4096  # page_regions per ioctl call

# VmFlags mnemonics of the flags vma_ksm_compatible() refuses
INCOMPATIBLE = frozenset({"sh", "ms", "pf", "io", "de", "ht", "mm", "dp"})
SPECIAL = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]"})
READ_CHUNK = 64 << 20  # bytes per pread of /proc/PID/mem
HEADROOM = 256 << 20  # memory left to the rest of the machine when copying
HPAGE_PMD_ORDER = 9
METHODS = ("auto", "scan", "pagemap", "pagemap-nopfn")

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")


class ProcessUnreadable(EstimateError):
    """A process that cannot be read: ``reason`` is "gone", "denied" or "empty"."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    name: str
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def mergeable(self) -> bool:
        return "mg" in self.flags

    @property
    def ksm_compatible(self) -> bool:
        return self.perms[3] == "p" and not self.flags & INCOMPATIBLE and self.name not in SPECIAL


def parse_smaps(text: str) -> list[Vma]:
    """The VMAs of /proc/PID/smaps with their VmFlags."""
    vmas: list[Vma] = []
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            vmas.append(Vma(int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4)))
        elif line.startswith("VmFlags:") and vmas:
            vmas[-1].flags = frozenset(line.split()[1:])
    return vmas


def select_vmas(vmas: list[Vma], mergeable_only: bool) -> list[Vma]:
    return [v for v in vmas if v.ksm_compatible and (v.mergeable or not mergeable_only)]


# --------------------------------------------------------------------------------
# privileges and errors


def _ptrace_scope() -> str:
    try:
        return Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        return ""


def _denied(pid: int, what: str) -> ProcessUnreadable:
    scope = _ptrace_scope()
    yama = f"; kernel.yama.ptrace_scope={scope} may forbid it too" if scope not in ("", "0") else ""
    return ProcessUnreadable(
        f"process {pid}: cannot read /proc/{pid}/{what}: permission denied; reading a "
        f"process needs ptrace access to it (the same user and a dumpable process, or "
        f"CAP_SYS_PTRACE, e.g. as root){yama}",
        "denied",
    )


def _gone(pid: int) -> ProcessUnreadable:
    return ProcessUnreadable(f"process {pid}: no such process (it has exited?)", "gone")


def _proc_error(pid: int, what: str, e: OSError) -> ProcessUnreadable:
    if isinstance(e, (FileNotFoundError, ProcessLookupError)) or e.errno == errno.ESRCH:
        return _gone(pid)
    if e.errno in (errno.EACCES, errno.EPERM):
        return _denied(pid, what)
    return ProcessUnreadable(f"process {pid}: cannot read /proc/{pid}/{what}: {e.strerror}",
                             "denied")


def _read_text(pid: int, what: str) -> str:
    try:
        return Path(f"/proc/{pid}/{what}").read_text()
    except OSError as e:
        raise _proc_error(pid, what, e) from None


def _open(pid: int, what: str) -> int:
    try:
        return os.open(f"/proc/{pid}/{what}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _proc_error(pid, what, e) from None


# --------------------------------------------------------------------------------
# which pages


@functools.cache
def zero_pfn() -> int | None:
    """The zero page's pfn, from a page of ours that was only read; None when the
    kernel hides pfns from us (no CAP_SYS_ADMIN)."""
    area = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _ = area[0]  # a read fault maps the shared zero page
        cbuf = ctypes.c_char.from_buffer(area)
        addr = ctypes.addressof(cbuf)
        del cbuf  # the mmap cannot close while a ctypes view exports it
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((addr >> PAGE_SHIFT) * 8)
            (entry,) = struct.unpack("=Q", f.read(8))
    finally:
        area.close()
    pfn = entry & PM_PFN_MASK
    return pfn if entry & PM_PRESENT and pfn else None


def _scan_regions(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) ranges of present, anonymous, non-zero-page pages (PAGEMAP_SCAN)."""
    vec = np.zeros((_SCAN_VEC, 3), dtype=np.uint64)  # struct page_region
    out: list[tuple[int, int]] = []
    want = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO
    while start < end:
        arg = bytearray(_PM_SCAN_ARG.pack(
            _PM_SCAN_ARG.size, 0, start, end, 0, vec.ctypes.data, _SCAN_VEC, 0,
            PAGE_IS_FILE | PAGE_IS_PFNZERO,  # category_inverted: want these clear
            want,  # category_mask: every one of these must match
            0,
            PAGE_IS_PRESENT,  # return_mask
        ))
        n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)
        walk_end = _PM_SCAN_ARG.unpack(arg)[4]
        # Only what lies before walk_end is final: a walk that stops early can hand
        # back regions past it, which the next call (from walk_end) reports again.
        out.extend((int(a), min(int(b), walk_end)) for a, b, _ in vec[:n] if a < walk_end)
        if walk_end <= start:
            break
        start = walk_end
    return out


def _pagemap_pages(fd: int, start: int, end: int,
                   zpfn: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Page numbers of present anonymous pages by reading pagemap entries, and which of
    them may be the zero page (pfns hidden: shared, to be told by their contents)."""
    first, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    vpns, maybe = [], []
    step = 1 << 18  # entries per read (2 MiB of pagemap, 1 GiB of memory)
    for lo in range(first, last, step):
        n = min(step, last - lo)
        raw = os.pread(fd, n * 8, lo * 8)
        e = np.frombuffer(raw, dtype=np.uint64)
        present = (e & np.uint64(PM_PRESENT)) != 0
        anon = (e & np.uint64(PM_FILE)) == 0
        pfn = e & np.uint64(PM_PFN_MASK)
        sel = present & anon
        if zpfn is not None:
            sel &= pfn != np.uint64(zpfn)
            unknown = np.zeros(len(e), dtype=bool)
        else:
            # The zero page is never exclusively mapped; neither is a COW-shared page.
            unknown = sel & ((e & np.uint64(PM_EXCLUSIVE)) == 0)
        idx = np.flatnonzero(sel)
        vpns.append(idx.astype(np.int64) + lo)
        maybe.append(unknown[idx])
    if not vpns:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(vpns), np.concatenate(maybe)


def _regions_to_vpns(regions: list[tuple[int, int]]) -> np.ndarray:
    if not regions:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(a >> PAGE_SHIFT, b >> PAGE_SHIFT, dtype=np.int64)
                           for a, b in regions])


def _runs(vpns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of consecutive page numbers."""
    if not len(vpns):
        return vpns, vpns
    cut = np.flatnonzero(np.diff(vpns) != 1) + 1
    starts = np.concatenate([[0], cut])
    lengths = np.diff(np.concatenate([starts, [len(vpns)]]))
    return starts, lengths


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


# --------------------------------------------------------------------------------
# reading


def read_process(pid: int, mergeable_only: bool = False, method: str = "auto",
                 budget: int | None = None) -> Source:
    """Process ``pid`` as a Source (its candidate pages, packed in address order).

    ``method``: "scan" (PAGEMAP_SCAN), "pagemap" (pagemap entries with pfns, as root),
    "pagemap-nopfn" (entries as an unprivileged reader sees them) or "auto" (the
    first that works). ``budget``: bytes this copy may take (default: what the
    machine has available, less a margin)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    if not Path(f"/proc/{pid}").is_dir():
        raise _gone(pid)
    comm = _read_text(pid, "comm").strip()
    smaps_text = _read_text(pid, "smaps")
    vmas = parse_smaps(smaps_text)
    if not vmas:
        raise ProcessUnreadable(
            f"process {pid} ({comm}) has no user memory (a kernel thread or a zombie)", "empty"
        )
    chosen = select_vmas(vmas, mergeable_only)
    name = f"pid {pid} ({comm})"

    pm = _open(pid, "pagemap")
    try:
        vpns, maybe_zero = _choose_pages(pm, chosen, method)
    except OSError as e:
        raise _proc_error(pid, "pagemap", e) from None
    finally:
        os.close(pm)

    need = len(vpns) * PAGE_SIZE
    if budget is None:
        budget = mem_available() - HEADROOM
    if need > budget:
        raise EstimateError(
            f"{name}: copying its {need >> 20} MiB of candidate memory needs more memory "
            f"than this machine has available ({max(budget, 0) >> 20} MiB)"
        )
    pages = np.empty((len(vpns), PAGE_SIZE), dtype=np.uint8)
    got = _read_pages(pid, vpns, pages)
    keep = got
    if maybe_zero.any():
        idx = np.flatnonzero(maybe_zero & got)
        zero = np.zeros(len(vpns), dtype=bool)
        for k in range(0, len(idx), 4096):  # bounded temporaries
            part = idx[k : k + 4096]
            zero[part] = ~pages[part].any(axis=1)
        keep = got & ~zero
    if not keep.all():
        pages = _compact(pages, keep)
    notes = [
        f"{len(chosen)} of {len(vmas)} mappings "
        + ("already mergeable (VM_MERGEABLE)" if mergeable_only else "KSM could merge"),
        f"{len(pages)} pages present (anonymous, not the zero page)",
    ]
    if (~got).any():
        notes.append(f"{int((~got).sum())} pages vanished while being read")
    kept = vpns[keep] if not keep.all() else vpns
    huge, how = thp_mapped(pid, kept, chosen, smaps_text)
    segments, hugepage = thp_segments(pages, kept, huge)
    if how:
        notes.append(f"{int(huge.sum()) // HPAGE_PMD_NR} huge pages (THP) {how}")
    return Source(name, "process", segments, pid=pid, notes=notes, hugepage=hugepage)


def thp_mapped(pid: int, vpns: np.ndarray, vmas: list[Vma],
               smaps_text: str) -> tuple[np.ndarray, str]:
    """Per page of ``vpns``: does a huge page (a PMD-sized THP, whole) back it, and how
    that was learnt: /proc/kpageflags (KPF_THP, as root), else smaps AnonHugePages and
    alignment (the first whole, present, aligned 2 MiB ranges of each mapping, as many
    as AnonHugePages counts). "" when there are none."""
    huge = np.zeros(len(vpns), dtype=bool)
    if not len(vpns):
        return huge, ""
    groups = vpns >> HPAGE_PMD_ORDER
    # whole aligned ranges: 512 consecutive entries of one group
    whole = np.zeros(len(vpns), dtype=bool)
    starts = np.flatnonzero((vpns & (HPAGE_PMD_NR - 1)) == 0)
    starts = starts[starts + HPAGE_PMD_NR <= len(vpns)]
    starts = starts[groups[starts + HPAGE_PMD_NR - 1] == groups[starts]]
    for s in starts:
        whole[s : s + HPAGE_PMD_NR] = True
    if not whole.any():
        return huge, ""
    try:
        flags = _kpageflags_of(pid, vpns)
    except OSError:
        flags = None
    if flags is not None:
        thp = ((flags >> np.uint64(KPF_THP)) & np.uint64(1)).astype(bool)
        for s in starts:
            if thp[s : s + HPAGE_PMD_NR].all():
                huge[s : s + HPAGE_PMD_NR] = True
        how = "found in /proc/kpageflags (KPF_THP)"
    else:
        anon_huge = _anon_huge_pages(smaps_text)
        for v in vmas:
            n = anon_huge.get(v.start, 0) // (HPAGE_PMD_NR * PAGE_SIZE // 1024)
            for s in starts:
                if n and v.start >> PAGE_SHIFT <= vpns[s] < v.end >> PAGE_SHIFT:
                    huge[s : s + HPAGE_PMD_NR] = True
                    n -= 1
        how = ("assumed from smaps AnonHugePages and alignment (/proc/kpageflags "
               "needs root)")
    return huge, how if huge.any() else ""


def _kpageflags_of(pid: int, vpns: np.ndarray) -> np.ndarray | None:
    """The kpageflags of the frames behind ``vpns`` (None: pagemap hides pfns)."""
    if not os.access("/proc/kpageflags", os.R_OK):
        return None
    entries = np.zeros(len(vpns), dtype=np.uint64)
    starts, lengths = _runs(vpns)  # indices into vpns, and run lengths
    for i, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        entries[i : i + length] = pagemap(pid, int(vpns[i]) * PAGE_SIZE, length)
    pfns = (entries & np.uint64(PM_PFN_MASK)).astype(np.int64)
    if not pfns.any():
        return None
    return kpageflags(pfns)


def _anon_huge_pages(smaps_text: str) -> dict[int, int]:
    """AnonHugePages (kB) of each mapping of /proc/PID/smaps, by start address."""
    out: dict[int, int] = {}
    start = 0
    for line in smaps_text.splitlines():
        m = _HEADER.match(line)
        if m:
            start = int(m.group(1), 16)
        elif line.startswith("AnonHugePages:"):
            out[start] = int(line.split()[1])
    return out


def thp_segments(pages: np.ndarray, vpns: np.ndarray,
                 huge: np.ndarray) -> tuple[list[np.ndarray], list[bool]]:
    """``pages`` cut into runs that huge pages back (whole 2 MiB each, mapped as such)
    and runs that they do not."""
    if not len(pages):
        return [], []
    if not huge.any():
        return [pages], [False]
    cuts = np.flatnonzero(np.diff(huge.astype(np.int8))) + 1
    # a run of huge pages must not join two ranges with a hole between them
    gaps = np.flatnonzero(huge[1:] & huge[:-1] & (np.diff(vpns) != 1)) + 1
    bounds = [0, *sorted(set(cuts.tolist()) | set(gaps.tolist())), len(pages)]
    segments = [pages[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return segments, [bool(huge[a]) for a in bounds[:-1]]


def _compact(pages: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The rows ``keep`` of ``pages``, moved down in place chunk by chunk (a row only
    ever moves to a lower index), so the copy never needs twice the memory."""
    kept = np.flatnonzero(keep)
    for k in range(0, len(kept), 4096):
        part = kept[k : k + 4096]
        pages[k : k + len(part)] = pages[part]
    return pages[: len(kept)]


def _choose_pages(fd: int, vmas: list[Vma], method: str) -> tuple[np.ndarray, np.ndarray]:
    if method in ("auto", "scan"):
        try:
            regions: list[tuple[int, int]] = []
            for v in vmas:
                regions.extend(_scan_regions(fd, v.start, v.end))
            vpns = _regions_to_vpns(regions)
            return vpns, np.zeros(len(vpns), dtype=bool)
        except OSError as e:
            if method == "scan" or e.errno not in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                raise
    zpfn = zero_pfn() if method != "pagemap-nopfn" else None
    parts = [_pagemap_pages(fd, v.start, v.end, zpfn) for v in vmas]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_pages(pid: int, vpns: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Read the pages ``vpns`` of ``pid`` into ``out``, one pread per run of
    consecutive pages; returns which were read (a page may vanish meanwhile). The
    process runs on: a page reclaimed since pagemap was read is faulted back in by the
    read (the only way reading can change it, and only where it raced)."""
    got = np.ones(len(vpns), dtype=bool)
    if not len(vpns):
        return got
    fd = _open(pid, "mem")
    try:
        flat = out.reshape(-1)
        starts, lengths = _runs(vpns)
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            addr = int(vpns[s]) << PAGE_SHIFT
            done = 0
            while done < n * PAGE_SIZE:
                want = min(READ_CHUNK, n * PAGE_SIZE - done)
                view = flat[s * PAGE_SIZE + done : s * PAGE_SIZE + done + want].data
                try:
                    k = os.preadv(fd, [view], addr + done)
                except OSError as e:
                    if e.errno not in (errno.EIO, errno.EFAULT):
                        raise _proc_error(pid, "mem", e) from None
                    k = 0
                if k < want:
                    # unmapped since pagemap was read: drop the rest of this run
                    got[s + (done + k) // PAGE_SIZE : s + n] = False
                    break
                done += k
    finally:
        os.close(fd)
    return got


def real_uid(pid: int | str) -> int | None:
    # /proc/PID itself is owned by root when the process is not dumpable (after a
    # setuid, for one), so ask its status for its real uid.
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def readable_pids(uid: int | None = None) -> list[int]:
    """Every process but this one (optionally only those whose real uid is ``uid``)."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if uid is not None and real_uid(entry) != uid:
            continue
        pids.append(int(entry))
    return sorted(pids)


def parse_numa_maps(text: str) -> dict[int, int]:
    """Anonymous pages per node, from /proc/PID/numa_maps (``anon=`` lines, ``N<k>=``)."""
    pages: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if not any(f.startswith("anon=") for f in fields):
            continue
        for f in fields:
            m = re.fullmatch(r"N(\d+)=(\d+)", f)
            if m:
                pages[int(m.group(1))] = pages.get(int(m.group(1)), 0) + int(m.group(2))
    return pages


def process_node(pid: int) -> int | None:
    """The NUMA node holding most of the process's anonymous memory (None: unknown)."""
    try:
        pages = parse_numa_maps(Path(f"/proc/{pid}/numa_maps").read_text())
    except OSError:
        return None
    return max(pages, key=lambda n: (pages[n], -n)) if pages else None
