"""images.populate: the pages of a mapped image segment are mapped at once (what the
estimate does before its first scan), the rest of the file is left alone, and memory
that is no file mapping is not touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ksmcore.images import map_file, populate


def _rss_kib(addr: int) -> int:
    """Rss of the mapping that holds ``addr``, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= addr < hi
        elif inside and head[0] == "Rss:":
            return int(head[1])
    raise AssertionError("no mapping holds the image")


@pytest.mark.parametrize("mapper", ["map_file", "np.memmap"])
def test_populate_maps_the_segment_only(tmp_path: Path, mapper: str) -> None:
    path = tmp_path / "image.img"
    path.write_bytes(np.arange(256 * 4096, dtype=np.uint8).tobytes())
    # the estimate's sources are np.memmap's; mmap_image's files are map_file's
    image = map_file(path) if mapper == "map_file" else np.memmap(path, np.uint8, "r")
    assert _rss_kib(image.ctypes.data) == 0
    segment = image[64 * 4096 + 100: 128 * 4096]  # not page-aligned at its start
    populate(segment)
    rss = _rss_kib(image.ctypes.data)
    assert 64 * 4 <= rss < 256 * 4  # the segment's pages, not the file's
    assert segment[0] == (64 * 4096 + 100) % 256  # and they read as before


def test_populate_leaves_other_memory_alone() -> None:
    a = np.zeros(1 << 20, np.uint8)
    populate(a)
    populate(a[:0])
    assert not a.any()
