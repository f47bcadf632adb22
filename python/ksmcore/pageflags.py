"""Reading what backs a live process's pages: /proc/PID/pagemap and /proc/kpageflags.

Both need root for the frame numbers (without CAP_SYS_ADMIN pagemap reports pfn 0).
Used by the kernel parity harness (how many PTEs map the shared zero page after a THP
split) and by ``estimate --pid`` (which pages are THP-mapped).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .constants import PAGE_SIZE

PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1

# include/uapi/linux/kernel-page-flags.h
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17
KPF_ZERO_PAGE = 24
KPF_THP = 22


def pagemap(pid: int | str, start: int, npages: int) -> np.ndarray:
    """The raw pagemap entries (uint64) of ``npages`` pages from ``start``."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek((start // PAGE_SIZE) * 8)
        data = f.read(npages * 8)
    return np.frombuffer(data, dtype=np.uint64).copy()


def kpageflags(pfns: np.ndarray) -> np.ndarray:
    """/proc/kpageflags of each pfn (uint64), read in runs of consecutive frames."""
    out = np.zeros(len(pfns), dtype=np.uint64)
    if not len(pfns):
        return out
    order = np.argsort(pfns, kind="stable")
    sorted_pfns = pfns[order]
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        i = 0
        n = len(sorted_pfns)
        while i < n:
            j = i
            while j + 1 < n and sorted_pfns[j + 1] - sorted_pfns[i] < 4096 and \
                    sorted_pfns[j + 1] >= sorted_pfns[j]:
                j += 1
            first = int(sorted_pfns[i])
            count = int(sorted_pfns[j]) - first + 1
            raw = os.pread(fd, count * 8, first * 8)
            flags = np.frombuffer(raw, dtype=np.uint64)
            out[order[i : j + 1]] = flags[sorted_pfns[i : j + 1] - first]
            i = j + 1
    finally:
        os.close(fd)
    return out


def mergeable_areas(pid: int | str) -> Iterator[tuple[int, int, set[str]]]:
    """(start, end, VmFlags) of each VM_MERGEABLE area ('mg') in /proc/PID/smaps."""
    start = end = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:
            lo, hi = head.split("-")
            start, end = int(lo, 16), int(hi, 16)
        elif line.startswith("VmFlags:"):
            flags = set(line.split()[1:])
            if "mg" in flags:
                yield start, end, flags


def zero_page_ptes(pid: int | str) -> int:
    """PTEs of the process's mergeable areas that map the shared zero page (KPF_ZERO_PAGE,
    not a huge one): KSM's zero pages (use_zero_pages) and those a THP split placed."""
    total = 0
    for start, end, _ in mergeable_areas(pid):
        entries = pagemap(pid, start, (end - start) // PAGE_SIZE)
        present = (entries & np.uint64(PM_PRESENT)) != 0
        pfns = (entries[present] & np.uint64(PM_PFN_MASK)).astype(np.int64)
        flags = kpageflags(pfns)
        zero = (flags >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1)
        thp = (flags >> np.uint64(KPF_THP)) & np.uint64(1)
        total += int((zero.astype(bool) & ~thp.astype(bool)).sum())
    return total


def thp_pages(pid: int | str, start: int, npages: int) -> np.ndarray:
    """Per page of [start, start + npages pages): True where a THP backs it (KPF_THP)."""
    entries = pagemap(pid, start, npages)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    out = np.zeros(npages, dtype=bool)
    pfns = (entries[present] & np.uint64(PM_PFN_MASK)).astype(np.int64)
    flags = kpageflags(pfns)
    out[present] = ((flags >> np.uint64(KPF_THP)) & np.uint64(1)).astype(bool)
    return out
