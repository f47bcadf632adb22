"""A built-in workload: memory images of a few similar virtual machines.

Each image mixes what KSM meets on a host of VMs booted from one image: pages
common to every guest (the shared OS), zero pages, pages repeated inside one guest,
and pages unique to it.
"""

from __future__ import annotations

import numpy as np

from .constants import PAGE_SIZE


def vm_like_images(nproc: int = 3, npages: int = 4096, seed: int = 2013) -> list[np.ndarray]:
    """``nproc`` (npages, 4096) uint8 arrays: 40% common, 20% zero, 10% repeated, 30% unique."""
    rng = np.random.default_rng(seed)
    n_common = npages * 4 // 10
    n_zero = npages * 2 // 10
    n_repeat = npages // 10
    n_unique = npages - n_common - n_zero - n_repeat
    common = rng.integers(0, 256, size=(n_common, PAGE_SIZE), dtype=np.uint8)
    images = []
    for _ in range(nproc):
        repeated = rng.integers(0, 256, size=(max(1, n_repeat // 8), PAGE_SIZE), dtype=np.uint8)
        parts = [
            common,
            np.zeros((n_zero, PAGE_SIZE), np.uint8),
            repeated[rng.integers(0, len(repeated), size=n_repeat)],
            rng.integers(0, 256, size=(n_unique, PAGE_SIZE), dtype=np.uint8),
        ]
        image = np.concatenate(parts)
        images.append(np.ascontiguousarray(image[rng.permutation(npages)]))
    return images
