"""mmap_image(): a memory image as a process's private anonymous memory, read in place
by the engine, never modified, merged exactly like filled memory."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE

from conftest import machine_class
from observe import snapshot


def image_pages(n: int = 3000, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    distinct = rng.integers(0, 256, size=(40, PAGE_SIZE), dtype=np.uint8)
    pages = distinct[rng.integers(0, 40, n)]
    pages[::7] = 0
    return np.ascontiguousarray(pages)


def run(Machine: type, source: object) -> tuple[object, list[object], int]:
    m = Machine()
    p = m.spawn()
    addr = p.mmap_image(source)
    start, end, _ = p.maps()[0]
    p.madvise(start, end - start, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    m.check_invariants()
    return m, [p], addr


def test_image_merges_like_filled_memory(Machine: type) -> None:
    pages = image_pages()
    m1, (p1,), a1 = run(Machine, pages)
    m2 = Machine()
    p2 = m2.spawn()
    a2 = p2.mmap(len(pages))
    p2.fill(a2, pages)
    p2.madvise(a2, len(pages) * PAGE_SIZE, MADV_MERGEABLE)
    m2.ksm.run = 1
    m2.ksm.scan(full_scans=2)
    assert m1.ksm.stats() == m2.ksm.stats()
    assert p1.read(a1, len(pages) * PAGE_SIZE) == pages.tobytes()


def test_image_is_never_written(Machine: type, tmp_path) -> None:
    pages = image_pages(500)
    path = tmp_path / "guest.img"
    pages.tofile(path)
    before = path.read_bytes()
    m, (p,), addr = run(Machine, path)
    p.write(addr, b"written")
    child = p.fork()
    child.write(addr + PAGE_SIZE, b"child")
    assert p.read(addr, 7) == b"written"
    assert child.read(addr + PAGE_SIZE, 5) == b"child"
    assert p.read(addr + PAGE_SIZE, 5) == pages[1, :5].tobytes()
    m.ksm.scan(full_scans=2)
    m.check_invariants()
    assert path.read_bytes() == before


def test_read_only_array_in_place(Machine: type) -> None:
    pages = image_pages(600)
    pages.flags.writeable = False
    m, (p,), addr = run(Machine, pages)
    assert m.ksm.pages_sharing > 0


def test_engine_and_reference_agree_on_images() -> None:
    pages = image_pages(2000, seed=9)
    states = []
    for impl in ("engine", "reference"):
        m, procs, addr = run(machine_class(impl), pages)
        procs[0].write(addr + 5 * PAGE_SIZE, b"x")
        procs.append(procs[0].fork())
        m.ksm.scan(full_scans=3)
        m.check_invariants()
        states.append(snapshot(m, procs))
    assert states[0] == states[1]


@pytest.mark.parametrize("size", [0, 100, PAGE_SIZE + 1])
def test_partial_image_file_is_refused(Machine: type, tmp_path, size: int) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"\1" * size)
    p = Machine().spawn()
    with pytest.raises(OSError) as info:
        p.mmap_image(path)
    assert info.value.errno == errno.EINVAL
    assert p.maps() == []


def test_missing_file(Machine: type, tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        Machine().spawn().mmap_image(tmp_path / "nope.img")
