"""ELF core dumps as sources: process cores (the kernel's, gdb's ``gcore``) and guest
memory dumps (QEMU's ``dump-guest-memory``), parsed with pyelftools.

What KSM could merge in a core:

- a process core has an ``NT_FILE`` note listing its file-backed mappings; the
  ``PT_LOAD`` segments outside them (heap, stacks, anonymous mmaps, a VM's guest RAM
  inside a QEMU process) are its private anonymous memory. File-backed segments and
  the vDSO (``AT_SYSINFO_EHDR`` of ``NT_AUXV``) are left out: KSM never merges
  page-cache pages, and the vDSO is a special mapping KSM ignores;
- a core without ``NT_FILE`` (QEMU's guest dump, whose segments are guest physical
  RAM, or an old kernel's core) is taken whole.

Only the part of a segment present in the file (``p_filesz``) is memory; pages past
it were not dumped and count as never touched.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile

from .errors import EstimateError
from .extents import data_extents, holes_within
from .sources import Source, check_file, map_file, present_rows

# A raw memory image may start with the ELF magic (a guest's RAM holding a kernel).
RAW_HINT = "; if it is a raw memory image, --format raw reads it as one"
AT_SYSINFO_EHDR = 33  # auxv: address of the vDSO
NT_AUXV = 6
NT_FILE = 0x46494C45  # "FILE"
# The notes of a core are small (registers, auxv, the file table: kilobytes, a few
# MiB for a process with very many mappings); a note segment larger than this is not
# read, so that a hostile core cannot make us read gigabytes before we refuse it.
MAX_NOTE_SEGMENT = 64 << 20
# Segments shorter than this are copied into one array instead of being mapped on
# their own: each mapped image costs the engine frame metadata for 4096 pages.
SMALL_SEGMENT_PAGES = 64

_ELF_TYPES = {
    "ET_EXEC": "an executable",
    "ET_DYN": "a shared object or PIE executable",
    "ET_REL": "a relocatable object",
    "ET_NONE": "an ELF file of no type",
}


@dataclass
class _Load:
    vaddr: int
    offset: int
    filesz: int
    memsz: int


class _Corrupt(Exception):
    pass


def _auxv_vdso(desc: bytes, elfclass: int, little: bool) -> int | None:
    fmt = ("<" if little else ">") + ("QQ" if elfclass == 64 else "II")
    step = struct.calcsize(fmt)
    for i in range(0, len(desc) - step + 1, step):
        key, value = struct.unpack_from(fmt, desc, i)
        if key == AT_SYSINFO_EHDR:
            return int(value)
        if key == 0:  # AT_NULL
            break
    return None


def _notes(raw: bytes, little: bool, seg: int) -> Iterator[tuple[str, int, bytes]]:
    """(name, type, desc) of each note of a PT_NOTE segment, every size checked against
    the bytes that are really there (a core's notes are 4-byte aligned)."""
    end = ("<" if little else ">") + "III"
    pos = 0
    while pos + 12 <= len(raw):
        namesz, descsz, ntype = struct.unpack_from(end, raw, pos)
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        nxt = desc_at + ((descsz + 3) & ~3)
        if desc_at + descsz > len(raw) or nxt > len(raw) + 3:
            raise _Corrupt(f"note at byte {pos} of note segment {seg} claims a "
                           f"{namesz}-byte name and a {descsz}-byte description, past the "
                           f"segment's {len(raw)} bytes")
        name = raw[name_at:name_at + namesz].split(b"\0", 1)[0].decode("latin-1")
        yield name, ntype, raw[desc_at:desc_at + descsz]
        pos = nxt


def _nt_file(desc: bytes, elfclass: int, little: bool) -> list[tuple[int, int]]:
    """The (start, end) ranges of an NT_FILE note: count and page size, then count
    (start, end, file offset) triples, then the names; the count is checked against
    the description's real size before anything is read."""
    word = 8 if elfclass == 64 else 4
    fmt = ("<" if little else ">") + ("Q" if word == 8 else "I")
    if len(desc) < 2 * word:
        raise _Corrupt(f"NT_FILE note of {len(desc)} bytes has no header")
    count = struct.unpack_from(fmt, desc, 0)[0]
    if count > (len(desc) - 2 * word) // (3 * word):
        raise _Corrupt(f"NT_FILE note claims {count} mappings but holds at most "
                       f"{(len(desc) - 2 * word) // (3 * word)}")
    triples = np.frombuffer(desc, dtype=np.dtype(fmt[1]).newbyteorder("<" if little else ">"),
                            count=3 * count, offset=2 * word).reshape(count, 3)
    return [(int(a), int(b)) for a, b in triples[:, :2]]


def _parse(path: str, size: int) -> tuple[list[_Load], list[tuple[int, int]], int | None, str]:
    """PT_LOAD segments, NT_FILE ranges, the vDSO address and what made the core."""
    loads: list[_Load] = []
    files: list[tuple[int, int]] = []
    vdso = None
    names: set[str] = set()
    has_file_note = False
    with open(path, "rb") as f:
        elf = ELFFile(f)
        etype = elf.header["e_type"]
        if etype != "ET_CORE":
            what = _ELF_TYPES.get(etype, f"an ELF file of type {etype}")
            raise EstimateError(f"{path}: {what}, not a core dump (ELF type ET_CORE){RAW_HINT}")
        for i, seg in enumerate(elf.iter_segments()):
            h = seg.header
            if h["p_type"] not in ("PT_NOTE", "PT_LOAD"):
                continue
            if h["p_filesz"] and h["p_offset"] + h["p_filesz"] > size:
                raise _Corrupt(
                    f"segment {i} ({h['p_type']} at {h['p_vaddr']:#x}) ends at byte "
                    f"{h['p_offset'] + h['p_filesz']}, past the end of the file ({size} bytes): "
                    "truncated?"
                )
            if h["p_type"] == "PT_LOAD":
                loads.append(_Load(h["p_vaddr"], h["p_offset"], h["p_filesz"], h["p_memsz"]))
                continue
            if h["p_filesz"] > MAX_NOTE_SEGMENT:
                raise _Corrupt(f"note segment {i} claims {h['p_filesz']} bytes "
                               f"(cores write at most a few MiB of notes)")
            f.seek(h["p_offset"])
            raw = f.read(h["p_filesz"])
            for name, ntype, desc in _notes(raw, elf.little_endian, i):
                if name:
                    names.add(name)
                if ntype == NT_FILE and name == "CORE":
                    has_file_note = True
                    files.extend(_nt_file(desc, elf.elfclass, elf.little_endian))
                elif ntype == NT_AUXV and name == "CORE":
                    vdso = _auxv_vdso(desc, elf.elfclass, elf.little_endian)
    if "QEMU" in names:
        origin = "QEMU guest memory"
    elif has_file_note:
        origin = "process core"
    else:
        origin = "core without NT_FILE"
    return loads, sorted(files) if has_file_note else [], vdso, origin


def _file_backed(files: list[tuple[int, int]], starts: list[int], lo: int, hi: int) -> bool:
    i = bisect.bisect_right(starts, lo) - 1
    if i >= 0 and files[i][1] > lo:
        return True
    return i + 1 < len(files) and files[i + 1][0] < hi


def _pack(segments: list[np.ndarray]) -> list[np.ndarray]:
    """Runs of small segments copied into one array each; large ones kept in place."""
    out: list[np.ndarray] = []
    small: list[np.ndarray] = []
    for s in segments:
        if len(s) < SMALL_SEGMENT_PAGES:
            small.append(s)
            continue
        if small:
            out.append(np.concatenate(small))
            small = []
        out.append(s)
    if small:
        out.append(np.concatenate(small))
    return out


def open_core(path: str, allow_partial: bool = False, zero_pages: str = "absent") -> Source:
    """An ELF core as one process: its anonymous memory segments in address order.
    ``zero_pages="absent"``: all-zero pages (holes too) count as never touched."""
    size = check_file(path)
    try:
        loads, files, vdso, origin = _parse(path, size)
    except EstimateError:
        raise
    except _Corrupt as e:
        raise EstimateError(f"{path}: corrupt ELF core: {e}{RAW_HINT}") from None
    except (ELFError, ConstructError, struct.error, ValueError, EOFError) as e:
        raise EstimateError(f"{path}: corrupt ELF core: {e}{RAW_HINT}") from None
    except OSError as e:
        raise EstimateError(f"{path}: cannot read: {e.strerror}") from None
    starts = [a for a, _ in files]
    data = map_file(path)
    segments: list[np.ndarray] = []
    notes: list[str] = []
    left_out = {"file-backed": 0, "vDSO": 0, "not dumped": 0}
    zeros = holes = 0
    # A core with holes (the kernel's: dump_skip() seeks over every page that was not
    # present or was the zero page) says which pages were untouched: its holes. Its
    # all-zero pages written as data were present (zero-filled) and count as such.
    # A core without holes (gcore, or a pipe) cannot tell, so all its zero pages
    # count as untouched.
    extents = data_extents(path, 0, size)
    sparse = any(holes_within(extents, ld.offset, ld.offset + ld.filesz) for ld in loads
                 if ld.filesz)
    absent = zero_pages == "absent"
    for ld in sorted(loads, key=lambda x: x.vaddr):
        if ld.filesz == 0:
            left_out["not dumped"] += ld.memsz
            continue
        if vdso is not None and ld.vaddr == vdso:
            left_out["vDSO"] += ld.filesz
            continue
        if files and _file_backed(files, starts, ld.vaddr, ld.vaddr + max(ld.memsz, 1)):
            left_out["file-backed"] += ld.filesz
            continue
        left_out["not dumped"] += max(0, ld.memsz - ld.filesz)
        what = f"{path}: segment at {ld.vaddr:#x}"
        got = present_rows(path, data, ld.offset, ld.filesz, allow_partial, what,
                           drop_holes=absent and sparse, drop_zero=absent and not sparse)
        segments.extend(got.segments)
        zeros += got.zero_pages + got.hole_pages
        holes += got.hole_pages
    if not segments and not zeros:
        raise EstimateError(f"{path}: the core holds no anonymous memory to scan ({origin})")
    for why, nbytes in left_out.items():
        if nbytes:
            notes.append(f"{nbytes / 2**20:.1f} MiB {why} left out")
    if zeros and sparse:
        notes.append(f"{zeros} pages ({zeros * 4096 / 2**20:.1f} MiB) in holes of the core "
                     "left out as never touched (--zero-pages present counts them)")
    elif zeros:
        notes.append(f"{zeros} all-zero pages ({zeros * 4096 / 2**20:.1f} MiB) left out as "
                     "never touched (--zero-pages present counts them)")
    packed = _pack(segments)
    # guest memory is guest RAM (QEMU madvises it MADV_HUGEPAGE); a process core's
    # anonymous memory gets huge pages only where THP is "always"
    guest = origin != "process core"
    return Source(path, "core", packed, notes=[origin, *notes], zero_pages=zeros,
                  hugepage=[guest] * len(packed))

