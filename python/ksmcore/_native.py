"""The compiled core: ``ffi`` and ``lib`` of the cffi module ``ksmcore._ksmcore``."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from ._ksmcore import ffi, lib  # compiled by cffi: untyped (pyproject [tool.mypy])

__all__ = ["ffi", "lib", "ptr", "calc_checksums"]

ABI_VERSION = 8  # csrc/ksmcore.h KSMCORE_ABI_VERSION, which this Python code follows


def _check_build(header: Path | None = None) -> None:
    """Refuse a compiled core built for other Python code: its ABI version differs, or
    (in a source tree, as after ``pip install -e .``) csrc/ksmcore.h changed since."""
    how = "rebuild it: pip install -e . (or reinstall the package)"
    if lib.KSMCORE_ABI_VERSION != ABI_VERSION:
        raise ImportError(f"ksmcore: the compiled core has ABI version "
                          f"{lib.KSMCORE_ABI_VERSION}, this Python code needs {ABI_VERSION}; {how}")
    if header is None:
        header = Path(__file__).resolve().parents[2] / "csrc" / "ksmcore.h"
    if not header.is_file():
        return  # an installed wheel: no source to compare with
    m = re.search(r"/\* CFFI-BEGIN \*/(.*?)/\* CFFI-END \*/", header.read_text(), re.S)
    built = ffi.string(lib.ksmcore_cdef_hash()).decode()
    if m and hashlib.sha256(m.group(1).encode()).hexdigest() != built:
        raise ImportError(f"ksmcore: the compiled core is stale: {header} changed since it was "
                          f"built; {how}")


_check_build()

_CTYPES = {
    np.dtype(np.uint8): "uint8_t *",
    np.dtype(np.int16): "int16_t *",
    np.dtype(np.uint16): "uint16_t *",
    np.dtype(np.int32): "int32_t *",
    np.dtype(np.uint32): "uint32_t *",
    np.dtype(np.int64): "int64_t *",
    np.dtype(np.uint64): "uint64_t *",
}


def ptr(arr: np.ndarray) -> Any:
    """A C pointer to a C-contiguous numpy array, without copying it."""
    if not arr.flags.c_contiguous:
        raise ValueError("array must be C-contiguous")
    return ffi.cast(_CTYPES[arr.dtype], ffi.from_buffer(arr, require_writable=True))


def calc_checksums(pages: np.ndarray) -> np.ndarray:
    """calc_checksum() of every row of a (n, 4096) uint8 array, in one C call."""
    pages = np.ascontiguousarray(pages, dtype=np.uint8)
    if pages.ndim != 2 or pages.shape[1] != 4096:
        raise ValueError("pages must have shape (n, 4096)")
    out = np.empty(pages.shape[0], dtype=np.uint32)
    lib.calc_checksums(ffi.from_buffer(pages), pages.shape[0], ptr(out))
    return out


def page_hashes(pages: np.ndarray) -> np.ndarray:
    """The 64-bit XXH64 of every row of a (n, 4096) uint8 array, in one C call."""
    pages = np.ascontiguousarray(pages, dtype=np.uint8)
    if pages.ndim != 2 or pages.shape[1] != 4096:
        raise ValueError("pages must have shape (n, 4096)")
    out = np.empty(pages.shape[0], dtype=np.uint64)
    if len(out):
        lib.ksm_page_hashes(ffi.from_buffer(pages), pages.shape[0], ptr(out))
    return out
