"""The built-in sample: memory images of a few VMs booted from one OS image.

Each is what ``ksmcore.demo.vm_like_images`` makes: 40% pages common to every guest
(the shared OS), 20% zero pages, 10% repeated inside one guest, 30% unique. They are
numpy arrays mapped in place, as files would be.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..demo import vm_like_images
from .sources import Source

SAMPLE_VMS = 4
SAMPLE_PAGES = 16384  # 64 MiB per VM


def sample_sources(vms: int = SAMPLE_VMS, pages: int = SAMPLE_PAGES,
                   seed: int = 2013) -> list[Source]:
    return [
        Source(f"sample:vm{i}", "sample", [image])
        for i, image in enumerate(vm_like_images(vms, pages, seed))
    ]


def describe(vms: int = SAMPLE_VMS, pages: int = SAMPLE_PAGES) -> str:
    return (f"sample: {vms} generated VM-like images of {pages * 4096 >> 20} MiB (40% pages "
            "common to all, 20% zero, 10% repeated within one, 30% unique)")


def write_images(directory: str | os.PathLike[str], vms: int = SAMPLE_VMS,
                 pages: int = SAMPLE_PAGES, seed: int = 2013) -> list[Path]:
    """The sample as raw image files ``vm0.img``, ... in ``directory``."""
    out = []
    for i, image in enumerate(vm_like_images(vms, pages, seed)):
        path = Path(directory) / f"vm{i}.img"
        image.tofile(path)
        out.append(path)
    return out
