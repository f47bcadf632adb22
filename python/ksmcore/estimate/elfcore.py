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
from dataclasses import dataclass

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile

from .errors import EstimateError
from .sources import Source, check_file, map_file, page_rows

AT_SYSINFO_EHDR = 33  # auxv: address of the vDSO
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
            raise EstimateError(f"{path}: {what}, not a core dump (ELF type ET_CORE)")
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
            for note in seg.iter_notes():
                if note["n_name"]:
                    names.add(note["n_name"])
                if note["n_type"] == "NT_FILE":
                    has_file_note = True
                    for e in note["n_desc"]["Elf_Nt_File_Entry"]:
                        files.append((int(e["vm_start"]), int(e["vm_end"])))
                elif note["n_type"] == "NT_AUXV":
                    vdso = _auxv_vdso(bytes(note["n_desc"]), elf.elfclass, elf.little_endian)
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


def open_core(path: str, allow_partial: bool = False) -> Source:
    """An ELF core as one process: its anonymous memory segments in address order."""
    size = check_file(path)
    try:
        loads, files, vdso, origin = _parse(path, size)
    except EstimateError:
        raise
    except _Corrupt as e:
        raise EstimateError(f"{path}: corrupt ELF core: {e}") from None
    except (ELFError, ConstructError, struct.error, ValueError, EOFError) as e:
        raise EstimateError(f"{path}: corrupt ELF core: {e}") from None
    except OSError as e:
        raise EstimateError(f"{path}: cannot read: {e.strerror}") from None
    starts = [a for a, _ in files]
    data = map_file(path)
    segments: list[np.ndarray] = []
    notes: list[str] = []
    left_out = {"file-backed": 0, "vDSO": 0, "not dumped": 0}
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
        segments.extend(page_rows(data, ld.offset, ld.filesz, allow_partial, what))
    if not segments:
        raise EstimateError(f"{path}: the core holds no anonymous memory to scan ({origin})")
    for why, nbytes in left_out.items():
        if nbytes:
            notes.append(f"{nbytes / 2**20:.1f} MiB {why} left out")
    packed = _pack(segments)
    # guest memory is guest RAM (QEMU madvises it MADV_HUGEPAGE); a process core's
    # anonymous memory gets huge pages only where THP is "always"
    guest = origin != "process core"
    return Source(path, "core", packed, notes=[origin, *notes],
                  hugepage=[guest] * len(packed))

