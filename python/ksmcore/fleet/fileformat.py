"""The sketch file (``ksmcore sketch -o FILE``), version 1.

Layout (all integers little-endian)::

    offset 0   8 bytes   magic b"KSMSKTCH"
    offset 8   uint32    format version (1)
    offset 12  uint32    H: length of the header
    offset 16  H bytes   header: UTF-8 JSON, {"version": 1, "sketches": [...]}
    then       the arrays of every sketch, back to back, where the header says

Each entry of ``sketches`` holds the scalar fields of a sketch (``name``, ``source``,
``kind``, ``pages``, ``zero_pages``, ``distinct``, ``chain_corr``,
``max_page_sharing``, ``sample_shift``, ``bits_log2``, ``members``) and, for its arrays,
``"sample": [offset, n]`` (n uint64 hashes at ``offset`` from the end of the header,
then n uint32 counts) and ``"bitmap": [offset, nbytes]`` (the linear-counting bitmap,
bit j of the map is bit ``j % 8`` of byte ``j // 8``). Hashes are XXH3-64 (seed 0) of
the 4096-byte page. A reader refuses another magic or a newer version.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from .sketch import Sketch

MAGIC = b"KSMSKTCH"
VERSION = 1
SCALARS = ("name", "source", "kind", "pages", "zero_pages", "distinct", "chain_corr",
           "max_page_sharing", "sample_shift", "bits_log2", "members")


class SketchFileError(ValueError):
    """A file that is not a sketch file this version can read."""


def dumps(sketches: Sequence[Sketch]) -> bytes:
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    at = 0
    for s in sketches:
        e: dict[str, Any] = {k: getattr(s, k) for k in SCALARS}
        h = s.sample_hashes.astype("<u8").tobytes() + s.sample_counts.astype("<u4").tobytes()
        e["sample"] = [at, len(s.sample_hashes)]
        blobs.append(h)
        at += len(h)
        b = s.bitmap.astype(np.uint8).tobytes()
        e["bitmap"] = [at, len(b)]
        blobs.append(b)
        at += len(b)
        entries.append(e)
    header = json.dumps({"version": VERSION, "sketches": entries},
                        separators=(",", ":")).encode()
    return MAGIC + struct.pack("<II", VERSION, len(header)) + header + b"".join(blobs)


def loads(data: bytes, what: str = "sketch file") -> list[Sketch]:
    if len(data) < 16 or data[:8] != MAGIC:
        raise SketchFileError(f"{what}: not a ksmcore sketch file (no KSMSKTCH magic)")
    version, hlen = struct.unpack_from("<II", data, 8)
    if version > VERSION:
        raise SketchFileError(f"{what}: sketch format version {version}, this ksmcore "
                              f"reads up to {VERSION}")
    try:
        header = json.loads(data[16 : 16 + hlen])
        base = 16 + hlen
        out = []
        for e in header["sketches"]:
            off, n = e["sample"]
            if base + off + 12 * n > len(data):
                raise SketchFileError(f"{what}: truncated")
            hashes = np.frombuffer(data, "<u8", n, base + off).astype(np.uint64)
            counts = np.frombuffer(data, "<u4", n, base + off + 8 * n).astype(np.uint32)
            boff, nb = e["bitmap"]
            if base + boff + nb > len(data) or (e["bits_log2"] and nb * 8 != 1 << e["bits_log2"]):
                raise SketchFileError(f"{what}: truncated or inconsistent bitmap")
            bitmap = np.frombuffer(data, np.uint8, nb, base + boff).copy()
            out.append(Sketch(**{k: e[k] for k in SCALARS}, sample_hashes=hashes,
                              sample_counts=counts, bitmap=bitmap))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        if isinstance(err, SketchFileError):
            raise
        raise SketchFileError(f"{what}: corrupt header ({err})") from None
    return out


def is_sketch_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == MAGIC
    except OSError:
        return False


def save(path: str | os.PathLike[str], sketches: Sequence[Sketch]) -> int:
    data = dumps(sketches)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def load(path: str | os.PathLike[str]) -> list[Sketch]:
    with open(path, "rb") as f:
        return loads(f.read(), os.fspath(path))
