"""What ``ksmcore estimate`` reads: each source becomes one process of the simulated
machine, with one private anonymous mapping per memory segment.

A :class:`Source` holds its memory as (n, 4096) uint8 arrays in address order. Files
(raw images and ELF cores) are mapped read-only with ``np.memmap`` and handed to
``Process.mmap_image``, so their pages are read in place and never copied; live
processes are copied once (see :mod:`.procmem`). Every reader checks its input
completely before returning, so a bad source fails before any output.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

import numpy as np

from ..constants import PAGE_SIZE
from .errors import EXIT_USAGE, EstimateError
from .extents import ZERO_PAGES, Present, data_extents, present_pages

ELF_MAGIC = b"\x7fELF"
FORMATS = ("auto", "raw", "core")


@dataclass
class Source:
    """One process of the simulated machine."""

    name: str  # how the report names it: a path, "pid 1234 (comm)", "sample:vm0"
    kind: str  # "image", "core", "process" or "sample"
    segments: list[np.ndarray]  # C-contiguous (n, 4096) uint8, in address order
    node: int | None = None  # NUMA node of its memory (None: node 0)
    pid: int | None = None  # the live process it was read from
    notes: list[str] = field(default_factory=list)  # what was padded or left out
    zero_pages: int = 0  # all-zero pages of a core left out as never touched
    hole_pages: int = 0  # pages of an image in holes (never written), left out
    # per segment: map it as guest RAM is mapped (PMD-aligned, MADV_HUGEPAGE), so that
    # huge pages back it where THP allows (empty: no segment is)
    hugepage: list[bool] = field(default_factory=list)

    @property
    def npages(self) -> int:
        return sum(len(s) for s in self.segments)


def split_node(spec: str, what: str) -> tuple[str, int | None]:
    """``"X@N"`` -> ("X", N); ``"X"`` -> ("X", None). A path that exists as written
    wins, so a file whose name ends in ``@1`` can still be named."""
    if os.path.lexists(spec):
        return spec, None
    m = re.fullmatch(r"(.+)@(\d+)", spec)
    if not m:
        return spec, None
    node = int(m.group(2))
    if not m.group(1):
        raise EstimateError(f"{what} {spec!r}: nothing before '@{node}'", EXIT_USAGE)
    return m.group(1), node


def check_file(path: str) -> int:
    """The size of the regular file ``path``, or EstimateError naming what is wrong."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise EstimateError(f"{path}: no such file") from None
    except PermissionError:
        raise EstimateError(f"{path}: permission denied (cannot reach the file)") from None
    except OSError as e:
        raise EstimateError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise EstimateError(f"{path}: is a directory, not a memory image or core")
    if not stat.S_ISREG(st.st_mode):
        raise EstimateError(f"{path}: not a regular file (a memory image or core is a file)")
    if not os.access(path, os.R_OK):
        raise EstimateError(f"{path}: not readable (permission denied)")
    return st.st_size


def _head(path: str, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise EstimateError(f"{path}: cannot read: {e.strerror}") from None


def map_file(path: str) -> np.ndarray:
    """The whole file as a read-only 1-D uint8 memory map (nothing is read yet)."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise EstimateError(f"{path}: cannot map the file: {e}") from None


def page_rows(data: np.ndarray, offset: int, size: int, allow_partial: bool,
              what: str) -> list[np.ndarray]:
    """``data[offset:offset+size]`` as (n, 4096) views (in place) and, when ``size`` is
    not a whole number of pages and ``allow_partial`` is set, one padded copy of the tail."""
    whole, tail = divmod(size, PAGE_SIZE)
    if tail and not allow_partial:
        raise EstimateError(
            f"{what}: {size} bytes is not a whole number of {PAGE_SIZE}-byte pages "
            f"({whole} pages and {tail} bytes); --allow-partial pads the last page with zeros"
        )
    rows = []
    if whole:
        rows.append(data[offset : offset + whole * PAGE_SIZE].reshape(whole, PAGE_SIZE))
    if tail:
        last = np.zeros((1, PAGE_SIZE), dtype=np.uint8)
        last[0, :tail] = data[offset + whole * PAGE_SIZE : offset + size]
        rows.append(last)
    return rows


def present_rows(path: str, data: np.ndarray, offset: int, size: int, allow_partial: bool,
                 what: str, drop_holes: bool, drop_zero: bool) -> Present:
    """The pages of ``data[offset:offset+size]`` that count as memory (see
    :mod:`.extents`): with ``drop_holes`` those in holes left out, with ``drop_zero``
    the all-zero pages (holes included)."""
    rows = page_rows(data, offset, size, allow_partial, what)
    whole, tail = divmod(size, PAGE_SIZE)
    out = Present()
    if whole:
        extents = data_extents(path, offset, offset + size) if drop_holes or drop_zero else []
        out = present_pages(rows[0], extents, offset, drop_holes, drop_zero)
    if tail:  # the padded copy of the last page
        if drop_zero and not rows[-1].any():
            out.zero_pages += 1
        else:
            out.segments.append(rows[-1])
    return out


def open_raw_image(path: str, allow_partial: bool = False) -> Source:
    """A raw memory image: the file's bytes are the pages, in order; holes
    (SEEK_HOLE) are memory never written, left out without being read."""
    size = check_file(path)
    if size == 0:
        raise EstimateError(f"{path}: empty file (0 bytes), no pages to scan")
    got = present_rows(path, map_file(path), 0, size, allow_partial, path, True, False)
    notes = []
    if size % PAGE_SIZE:
        notes.append(f"last {size % PAGE_SIZE} bytes padded to a whole page")
    if got.hole_pages:
        notes.append(f"{got.hole_pages} pages ({got.hole_pages * PAGE_SIZE / 2**20:.1f} MiB) "
                     "in holes of the file left out (never written)")
    # a raw image is a VM's RAM: QEMU maps guest RAM PMD-aligned with MADV_HUGEPAGE
    return Source(path, "image", got.segments, notes=notes, hole_pages=got.hole_pages,
                  hugepage=[True] * len(got.segments))


def open_file(path: str, fmt: str = "auto", allow_partial: bool = False,
              zero_pages: str = "absent") -> Source:
    """A raw image or an ELF core dump; ``fmt="auto"`` tells them by the ELF magic.
    ``zero_pages``: whether the all-zero pages of a core count as present."""
    if fmt not in FORMATS:
        raise EstimateError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}", EXIT_USAGE)
    if zero_pages not in ZERO_PAGES:
        raise EstimateError(f"--zero-pages {zero_pages!r}: expected one of "
                            f"{', '.join(ZERO_PAGES)}", EXIT_USAGE)
    size = check_file(path)
    is_elf = size >= 4 and _head(path, 4) == ELF_MAGIC
    if fmt == "core" or (fmt == "auto" and is_elf):
        from .elfcore import open_core  # pyelftools is needed for cores only

        return open_core(path, allow_partial, zero_pages)
    return open_raw_image(path, allow_partial)


def check_node(node: int | None, nodes: int, what: str) -> None:
    if node is not None and not 0 <= node < nodes:
        raise EstimateError(
            f"{what}@{node}: no NUMA node {node} (the machine has {nodes}; see --nodes)",
            EXIT_USAGE,
        )
