"""Memory images as a process's private anonymous memory: what mmap_image() accepts."""

from __future__ import annotations

import errno
import os
from typing import Any

import numpy as np

from .constants import PAGE_SIZE
from .errors import ksm_error


def open_image(source: Any) -> np.ndarray:
    """A read-only (n, 4096) uint8 view of ``source``: a path (mapped, never read whole
    into memory) or a numpy array (a C-contiguous uint8 array, used in place)."""
    if isinstance(source, (str, os.PathLike)):
        size = os.path.getsize(source)
        if size == 0 or size % PAGE_SIZE:
            raise ksm_error(errno.EINVAL, f"{os.fspath(source)}: {size} bytes is not a whole "
                            f"number of {PAGE_SIZE}-byte pages")
        return np.memmap(source, dtype=np.uint8, mode="r", shape=(size // PAGE_SIZE, PAGE_SIZE))
    if not isinstance(source, np.ndarray) or source.dtype != np.uint8:
        raise ValueError("an image is a path or a numpy uint8 array")
    if not source.flags.c_contiguous:
        raise ValueError("an image array must be C-contiguous (it is used in place)")
    if source.size == 0 or source.size % PAGE_SIZE:
        raise ValueError(f"an image of {source.size} bytes is not a whole number of pages")
    return source.reshape(-1, PAGE_SIZE)
