"""Which pages of a file are memory: holes and all-zero pages.

- **Holes** (``SEEK_HOLE``/``SEEK_DATA``): a hole in a raw image is memory that was
  never written (a sparse guest RAM file, a core the kernel wrote with ``dump_skip()``).
  Such pages are not present: ksmd never visits memory that was never touched. They
  are found without reading them, so a huge sparse image costs only its data.
- **All-zero pages of a core**: a core cannot tell untouched memory from a page that
  was zero-filled. gcore reads untouched anonymous memory as zeros, and a VM dump
  holds every page of guest RAM, touched or not. ksmd never visits untouched memory,
  so by default those pages are left out (``zero_pages="absent"``); ``"present"``
  keeps them (each then merges with the other zero pages, or with ``use_zero_pages``
  is replaced by the zero page).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import numpy as np

from ..constants import PAGE_SIZE

ZERO_PAGES = ("absent", "present")
CHUNK_PAGES = 4096  # pages tested for zeros per step (16 MiB): bounded temporaries


def data_extents(path: str, start: int, end: int) -> list[tuple[int, int]]:
    """The ``[a, b)`` byte ranges of ``[start, end)`` that hold data (not holes), by
    SEEK_DATA/SEEK_HOLE; the whole range where the filesystem cannot tell."""
    out: list[tuple[int, int]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return [(start, end)] if end > start else []
    try:
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from pos to the end of the file
                    break
                return [(start, end)]  # no SEEK_DATA here: all data
            if data >= end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, min(hole, end)))
            pos = hole
    finally:
        os.close(fd)
    return out


def data_runs(extents: list[tuple[int, int]], offset: int, npages: int) -> list[tuple[int, int]]:
    """The ``[i, j)`` runs of the ``npages`` pages from byte ``offset`` that hold any
    byte of data, straight from the (address-ordered) extents: no per-page mask, so a
    huge sparse image costs nothing for its holes."""
    out: list[tuple[int, int]] = []
    for a, b in extents:
        lo = max(0, (a - offset) // PAGE_SIZE)
        hi = min(npages, -(-(b - offset) // PAGE_SIZE))
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:  # extents sharing a page join
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def pages_with_data(extents: list[tuple[int, int]], offset: int, npages: int) -> np.ndarray:
    """Which of the ``npages`` pages starting at byte ``offset`` hold any byte of data
    (a page wholly inside a hole reads as zeros and is never read)."""
    mask = np.zeros(npages, dtype=bool)
    for a, b in extents:
        lo = max(0, (a - offset) // PAGE_SIZE)
        hi = min(npages, -(-(b - offset) // PAGE_SIZE))
        if hi > lo:
            mask[lo:hi] = True
    return mask


def nonzero_pages(rows: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """Which rows of the (n, 4096) array ``rows`` hold a non-zero byte; rows not among
    ``candidates`` (a mask) are taken as zero without being read."""
    n = len(rows)
    out = np.zeros(n, dtype=bool)
    for k in range(0, n, CHUNK_PAGES):
        sel = slice(k, min(n, k + CHUNK_PAGES))
        if candidates is not None and not candidates[sel].any():
            continue
        part = rows[sel]
        if part.ctypes.data % 8 == 0:
            out[sel] = part.view(np.uint64).any(axis=1)
        else:
            out[sel] = part.any(axis=1)
    if candidates is not None:
        out &= candidates
    return out


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The ``[i, j)`` runs of True in ``mask``."""
    if not len(mask):
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@dataclass
class Present:
    """The pages of one stretch of a file that count as memory."""

    segments: list[np.ndarray] = field(default_factory=list)  # (n, 4096) views, in order
    hole_pages: int = 0  # wholly in holes: never written
    zero_pages: int = 0  # all-zero pages left out (not counting holes)


def present_pages(rows: np.ndarray, extents: list[tuple[int, int]], offset: int,
                  drop_holes: bool, drop_zero: bool) -> Present:
    """The pages of ``rows`` (the file's bytes from ``offset``, as (n, 4096)) that
    count as memory. ``drop_holes``: pages wholly in holes are left out (a raw image:
    never written). ``drop_zero``: all-zero pages are left out, holes among them (a
    core, which writes untouched pages as zeros or as holes)."""
    n = len(rows)
    if not drop_holes and not drop_zero:
        return Present([rows] if n else [])
    if drop_zero:
        keep = nonzero_pages(rows, pages_with_data(extents, offset, n))
        return Present([rows[a:b] for a, b in runs(keep)], 0, n - int(keep.sum()))
    data = data_runs(extents, offset, n)
    return Present([rows[a:b] for a, b in data], n - sum(b - a for a, b in data), 0)


def holes_within(extents: list[tuple[int, int]], start: int, end: int) -> int:
    """Bytes of ``[start, end)`` that lie in holes, given the file's data ``extents``."""
    covered = sum(max(0, min(b, end) - max(a, start)) for a, b in extents)
    return max(0, end - start - covered)


def zero_merge_savings(zero: int, max_page_sharing: int, use_zero_pages: int) -> int:
    """Pages saved by ``zero`` all-zero pages in one tree, on their own: with
    use_zero_pages each is replaced by the zero page (ksm_zero_pages); else they merge
    into KSM pages of at most max_page_sharing mappings each (stable node chains), so
    all but one page per KSM page is saved (pages_sharing)."""
    if use_zero_pages:
        return zero
    if zero < 2:
        return 0
    return zero - -(-zero // max(2, max_page_sharing))
