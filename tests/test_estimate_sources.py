"""ksmcore estimate's file sources: raw images (mapped in place) and ELF cores (written
here to the ELF spec, and made by gdb's gcore from a live process)."""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ksmcore.constants import PAGE_SIZE
from ksmcore.estimate.elfcore import open_core
from ksmcore.estimate.errors import EstimateError
from ksmcore.estimate.sources import open_file, open_raw_image, split_node

NT_PRSTATUS, NT_AUXV, NT_FILE = 1, 6, 0x46494C45
AT_SYSINFO_EHDR = 33


def pages(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def write_core(path: Path, loads: list[tuple[int, bytes, int]], files: list[tuple[int, int]] = (),
               vdso: int | None = None, qemu: bool = False, etype: int = 4,
               file_note: bool = True) -> None:
    """A little-endian ELF64 core: ``loads`` are (vaddr, dumped bytes, memsz); ``files``
    the NT_FILE ranges; the segments' data sit at unaligned offsets, as gcore's do."""
    notes = _note(b"CORE", NT_PRSTATUS, bytes(336))
    if file_note and not qemu:
        names = b"".join(b"/lib/x.so\0" for _ in files)
        desc = struct.pack("<QQ", len(files), PAGE_SIZE)
        desc += b"".join(struct.pack("<QQQ", a, b, 0) for a, b in files) + names
        notes += _note(b"CORE", NT_FILE, desc)
    if vdso is not None:
        notes += _note(b"CORE", NT_AUXV, struct.pack("<4Q", AT_SYSINFO_EHDR, vdso, 0, 0))
    if qemu:
        notes += _note(b"QEMU", 0, bytes(64))
    phnum = 1 + len(loads)
    offset = 64 + 56 * phnum
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, offset, 0, 0, len(notes), 0, 4)]  # PT_NOTE
    data = [notes]
    offset += len(notes) + 8  # unaligned on purpose
    data.append(bytes(8))
    for vaddr, blob, memsz in loads:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 6, offset, vaddr, 0, len(blob), memsz, 1))
        data.append(blob)
        offset += len(blob)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack("<HHIQQQIHHHHHH", etype, 62, 1, 0, 64, 0, 0, 64, 56, phnum,
                                 64, 0, 0)
    path.write_bytes(header + b"".join(phdrs) + b"".join(data))


# --- raw images ---------------------------------------------------------------


def test_raw_image_is_mapped_in_place(tmp_path: Path) -> None:
    img = pages(20)
    path = tmp_path / "guest.img"
    img.tofile(path)
    src = open_file(str(path))
    assert src.kind == "image" and src.npages == 20
    (seg,) = src.segments
    assert isinstance(seg.base, np.memmap) or isinstance(seg, np.memmap)
    assert seg.flags.c_contiguous and not seg.flags.writeable
    assert np.array_equal(seg, img)


def test_partial_image_is_refused_or_padded(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(pages(2).tobytes() + b"tail")
    with pytest.raises(EstimateError, match=r"8196 bytes is not a whole number of 4096-byte "
                                            r"pages \(2 pages and 4 bytes\).*--allow-partial"):
        open_raw_image(str(path))
    src = open_raw_image(str(path), allow_partial=True)
    assert src.npages == 3 and "padded" in src.notes[0]
    assert bytes(src.segments[-1][0, :6]) == b"tail\0\0"


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_bytes(b""), "empty file"),
])
def test_bad_files(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "x.img"
    make(path)
    with pytest.raises(EstimateError, match=message) as e:
        open_file(str(path))
    assert str(path) in str(e.value) and e.value.exit_code == 1


def test_node_suffix(tmp_path: Path) -> None:
    assert split_node("a.img@1", "source") == ("a.img", 1)
    assert split_node("a.img", "source") == ("a.img", None)
    odd = tmp_path / "b.img@2"
    odd.write_bytes(b"")
    assert split_node(str(odd), "source") == (str(odd), None)  # the file exists as named


# --- ELF cores ------------------------------------------------------------------


def test_process_core_keeps_anonymous_segments(tmp_path: Path) -> None:
    heap, anon, lib, vdso = pages(3, 1), pages(70, 2), pages(2, 3), pages(1, 4)
    path = tmp_path / "core"
    write_core(path, [
        (0x400000, lib.tobytes(), 2 * PAGE_SIZE),  # file-backed: left out
        (0x600000, heap.tobytes(), 3 * PAGE_SIZE),
        (0x700000, b"", 5 * PAGE_SIZE),  # not dumped
        (0x7F0000000000, anon.tobytes(), 72 * PAGE_SIZE),  # 2 pages not dumped
        (0x7FFF0000, vdso.tobytes(), PAGE_SIZE),
    ], files=[(0x400000, 0x402000)], vdso=0x7FFF0000)
    src = open_core(str(path))
    assert src.kind == "core" and src.npages == 73
    assert src.notes[0] == "process core"
    assert any("file-backed" in n for n in src.notes) and any("vDSO" in n for n in src.notes)
    # the small heap is copied; the big segment is read in place from the file
    assert [len(s) for s in src.segments] == [3, 70]
    assert np.array_equal(src.segments[0], heap) and np.array_equal(src.segments[1], anon)
    assert not src.segments[1].flags.owndata


def test_qemu_guest_dump_is_taken_whole(tmp_path: Path) -> None:
    ram = [pages(80, 5), pages(64, 6)]
    path = tmp_path / "guest.core"
    write_core(path, [(0, ram[0].tobytes(), 80 * PAGE_SIZE),
                      (0x100000000, ram[1].tobytes(), 64 * PAGE_SIZE)], qemu=True)
    src = open_file(str(path))  # auto: by the ELF magic
    assert src.notes[0] == "QEMU guest memory" and src.npages == 144
    assert np.array_equal(np.concatenate(src.segments), np.concatenate(ram))


def test_core_errors(tmp_path: Path) -> None:
    path = tmp_path / "core"
    write_core(path, [(0x1000, pages(4).tobytes(), 4 * PAGE_SIZE)])
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) - 100])
    with pytest.raises(EstimateError, match=r"corrupt ELF core: segment 1 .* past the end of "
                                            r"the file .*truncated"):
        open_core(str(tmp_path / "cut"))
    (tmp_path / "headonly").write_bytes(data[:40])
    with pytest.raises(EstimateError, match="corrupt ELF core"):
        open_core(str(tmp_path / "headonly"))
    write_core(tmp_path / "exe", [(0x1000, pages(1).tobytes(), PAGE_SIZE)], etype=2)
    with pytest.raises(EstimateError, match="an executable, not a core dump"):
        open_file(str(tmp_path / "exe"))
    write_core(tmp_path / "odd", [(0x1000, pages(1).tobytes() + b"xy", PAGE_SIZE + 2)],
               file_note=False)
    with pytest.raises(EstimateError, match="segment at 0x1000: 4098 bytes is not a whole"):
        open_core(str(tmp_path / "odd"))
    assert open_core(str(tmp_path / "odd"), allow_partial=True).npages == 2
    write_core(tmp_path / "empty", [(0x400000, pages(1).tobytes(), PAGE_SIZE)],
               files=[(0x400000, 0x401000)])
    with pytest.raises(EstimateError, match="holds no anonymous memory"):
        open_core(str(tmp_path / "empty"))
    # a raw image may be read as such even if it starts like an ELF file
    assert open_file(str(tmp_path / "headonly"), fmt="raw", allow_partial=True).npages == 1


@pytest.mark.skipif(shutil.which("gcore") is None, reason="needs gdb's gcore")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under the sanitizer run the forked child carries ASan's shadow "
                           "mappings, which gcore would dump (tens of GiB)")
def test_gcore_of_a_live_process(tmp_path: Path) -> None:
    """gcore's core of a process holds its anonymous mapping, byte for byte."""
    content = np.repeat(pages(8, 9), 5, axis=0)  # 40 pages: 8 contents x 5
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(go_w)  # else the pipe never reaches EOF
            os.close(r)
            area = mmap.mmap(-1, len(content) * PAGE_SIZE,
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            area.write(content.tobytes())
            os.write(w, b"r")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    try:
        assert os.read(r, 1) == b"r"
        out = tmp_path / "core"
        try:
            # gdb without the sanitizer run's preloaded ASan (it would crawl)
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            proc = subprocess.run(["gcore", "-o", str(out), str(pid)], capture_output=True,
                                  timeout=60, env=env)
        except subprocess.TimeoutExpired:
            pytest.skip("gcore timed out")
        core = tmp_path / f"core.{pid}"
        if proc.returncode or not core.exists():
            pytest.skip(f"gcore cannot dump here: {proc.stderr.decode()[-200:]}")
    finally:
        os.close(go_w)
        os.close(r)
        os.waitpid(pid, 0)
    src = open_core(str(core))
    assert src.notes[0] == "process core"
    all_pages = np.concatenate(src.segments)
    # the area is among the anonymous pages (contiguous, in address order)
    hits = np.flatnonzero((all_pages == content[0]).all(axis=1))
    assert any(np.array_equal(all_pages[h : h + len(content)], content) for h in hits)
