"""Memory images as a process's private anonymous memory: what mmap_image() accepts,
and what happens when an image file changes underneath.

A path is mapped read-only and shared (never read whole into memory); the mapping
keeps its own descriptor of the file, so the file's identity and state (inode, size,
modification and change times) can be compared with what they were when it was
mapped. The engine reads images in place, so it must notice a file that another
process truncates or rewrites:

- **truncated**: a read past the new end would raise SIGBUS. The C core's image guard
  (csrc/image_guard.c) maps a zero page there instead, and the machine refuses the
  call and every later one with ``OSError(ESTALE)``;
- **rewritten** (size or mtime moved): the machine checks after
  every call and refuses in the same way. The model no longer describes the file:
  map it again on a new machine. A file replaced by rename is not a change: the
  mapping still reads the old file.

The reference copies an image into its frames when it is mapped, reading a path with
read(2) (which cannot raise SIGBUS): a snapshot. ``np.memmap`` arrays handed in as
images are watched by their file name.
"""

from __future__ import annotations

import errno
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import PAGE_SIZE
from .errors import ksm_error


@dataclass(frozen=True)
class FileState:
    """What must not change while a file is mapped (ctime is kept for the record)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileState:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileMap(mmap.mmap):
    """A read-only shared mapping of a whole file, with a descriptor kept for fstat."""

    path: str
    fd: int
    state: FileState

    def changed(self) -> str | None:
        """Why the file no longer matches the mapping's start, or None."""
        st = os.fstat(self.fd)
        was = self.state
        if (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) == \
                (was.mtime_ns, was.size, was.ino, was.dev):
            return None  # the common case, without building a FileState
        return _difference(self.path, was, FileState.of(st))


def _difference(path: str, was: FileState, now: FileState) -> str | None:
    if (now.dev, now.ino) != (was.dev, was.ino):
        return f"{path} was replaced by another file"
    if now.size != was.size:
        return f"{path} changed size from {was.size} to {now.size} bytes"
    if now.mtime_ns != was.mtime_ns:  # not ctime: unlinking the file moves it too
        return f"{path} was modified"
    return None


def map_file(path: str | os.PathLike[str]) -> np.ndarray:
    """The whole file as a read-only 1-D uint8 array over a shared mapping (nothing is
    read yet); OSError if it cannot be opened or mapped, or is empty."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size == 0:
            raise ksm_error(errno.EINVAL, f"{name}: empty file, no pages")
        fm = FileMap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    fm.path, fm.fd, fm.state = name, fd, FileState.of(st)
    weakref.finalize(fm, os.close, fd)
    return np.frombuffer(fm, dtype=np.uint8)


MADV_POPULATE_READ = 22  # Linux 5.14+


def populate(image: np.ndarray) -> None:
    """Map every page of ``image`` (a view into a file mapping: :func:`map_file`'s, or
    an ``np.memmap``) now, in one madvise(MADV_POPULATE_READ), rather than by a fault
    every 16 pages as a scan first reads them: the same pages, read once, at a third of
    the kernel time. Anything else, or a kernel without it, is left to fault as
    before."""
    obj: Any = image
    while isinstance(obj, np.ndarray):
        obj = obj.base
    if isinstance(obj, memoryview):
        obj = obj.obj
    if not isinstance(obj, mmap.mmap) or not image.nbytes:
        return
    start = image.ctypes.data - np.frombuffer(obj, dtype=np.uint8).ctypes.data
    offset = start - start % mmap.PAGESIZE
    try:
        obj.madvise(MADV_POPULATE_READ, offset, image.nbytes + start - offset)
    except OSError:
        pass  # EINVAL before 5.14; EFAULT past a shrunk file's end (the guard's business)


def file_watch(image: np.ndarray) -> tuple[object, Any] | None:
    """(key, watch) for the file behind ``image``: ``watch()`` says why the file changed
    (None while it has not); images of one file share the key, so a caller watching
    many segments of one file checks it once. None for memory that is no file."""
    obj: Any = image
    memmap_name = None
    while isinstance(obj, np.ndarray):
        if isinstance(obj, np.memmap) and getattr(obj, "filename", None):
            memmap_name = obj.filename
        obj = obj.base
    if isinstance(obj, memoryview):
        obj = obj.obj
    if isinstance(obj, FileMap):
        return ("map", id(obj)), obj.changed
    if memmap_name is not None:
        name = str(memmap_name)
        was = FileState.of(os.stat(name))

        quick = (was.mtime_ns, was.size, was.ino, was.dev)

        def changed() -> str | None:
            try:
                st = os.stat(name)
            except OSError as e:
                return f"{name}: {e.strerror}"
            if (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) == quick:
                return None
            return _difference(name, was, FileState.of(st))

        return ("path", name), changed
    return None


def _pages(data: np.ndarray, what: str) -> np.ndarray:
    if data.size == 0 or data.size % PAGE_SIZE:
        raise ksm_error(errno.EINVAL, f"{what}: {data.size} bytes is not a whole number of "
                        f"{PAGE_SIZE}-byte pages")
    return data.reshape(-1, PAGE_SIZE)


def open_image(source: Any) -> np.ndarray:
    """A read-only (n, 4096) uint8 view of ``source``: a path (mapped, never read whole
    into memory) or a numpy array (a C-contiguous uint8 array, used in place)."""
    if isinstance(source, (str, os.PathLike)):
        size = os.path.getsize(source)
        if size == 0 or size % PAGE_SIZE:
            raise ksm_error(errno.EINVAL, f"{os.fspath(source)}: {size} bytes is not a whole "
                            f"number of {PAGE_SIZE}-byte pages")
        return _pages(map_file(source), os.fspath(source))
    return check_array(source)


def check_array(source: Any) -> np.ndarray:
    if not isinstance(source, np.ndarray) or source.dtype != np.uint8:
        raise ValueError("an image is a path or a numpy uint8 array")
    if not source.flags.c_contiguous:
        raise ValueError("an image array must be C-contiguous (it is used in place)")
    if source.size == 0 or source.size % PAGE_SIZE:
        raise ValueError(f"an image of {source.size} bytes is not a whole number of pages")
    return source.reshape(-1, PAGE_SIZE)


def read_image(source: Any) -> np.ndarray:
    """Like :func:`open_image`, but a path is read into memory with read(2): a snapshot
    that a later truncation or rewrite of the file cannot touch."""
    if not isinstance(source, (str, os.PathLike)):
        return check_array(source)
    name = os.fspath(source)
    with open(name, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0 or size % PAGE_SIZE:
            raise ksm_error(errno.EINVAL, f"{name}: {size} bytes is not a whole number of "
                            f"{PAGE_SIZE}-byte pages")
        out = np.empty(size, dtype=np.uint8)
        view = out.data
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise ksm_error(errno.ESTALE, f"{name}: the file shrank to {done} bytes "
                                f"while it was read ({size} expected)")
            done += n
    return out.reshape(-1, PAGE_SIZE)
