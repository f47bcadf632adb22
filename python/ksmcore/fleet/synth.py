"""Synthetic fleets with a known structure, generated page by page from a seed.

``synth:FxNxSIZE[@SEED]`` names a fleet of ``F`` families of ``N`` VM-like images of
``SIZE`` each (``4MiB``, ``64MiB``, ``1GiB``, or a number of pages); its members are
``synth:FxNxSIZE@SEED/I`` for ``I`` in ``0..F*N-1``, member ``I`` of family ``I % F``
(so the given order interleaves the families). Every image is built as the built-in
sample builds its VMs (:func:`ksmcore.demo.vm_like_images`), with the shared part
per family: 40% pages common to the family (its OS), 20% zero pages, 10% pages
repeated within the image (from a pool an eighth that size), 30% unique, in a random
order. Each member is generated alone from ``(SEED, I)`` and its family's
``(SEED, family)``, so a worker can build any member without the others and nothing
need be written to disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..constants import PAGE_SIZE

PREFIX = "synth:"
_SPEC = re.compile(r"synth:(\d+)x(\d+)x(\d+)(KiB|MiB|GiB|k|K|M|G)?(?:@(\d+))?(?:/(\d+))?")
_UNIT = {None: PAGE_SIZE, "KiB": 1 << 10, "k": 1 << 10, "K": 1 << 10, "MiB": 1 << 20,
         "M": 1 << 20, "GiB": 1 << 30, "G": 1 << 30}
DEFAULT_SEED = 2013


@dataclass(frozen=True)
class Fleet:
    families: int
    per_family: int
    pages: int
    seed: int = DEFAULT_SEED

    @property
    def size(self) -> int:
        return self.families * self.per_family

    @property
    def spec(self) -> str:
        return f"{PREFIX}{self.families}x{self.per_family}x{self.pages}@{self.seed}"

    def member(self, i: int) -> str:
        return f"{self.spec}/{i}"

    def members(self) -> list[str]:
        return [self.member(i) for i in range(self.size)]

    def family(self, i: int) -> int:
        return i % self.families

    def image(self, i: int) -> np.ndarray:
        return member_image(self, i)


def parse(spec: str) -> tuple[Fleet, int | None]:
    """(the fleet, the member index or None for the whole fleet); ValueError if bad."""
    m = _SPEC.fullmatch(spec)
    if not m:
        raise ValueError(f"{spec!r}: expected synth:FAMILIESxPER_FAMILYxSIZE[@SEED][/MEMBER] "
                         "(SIZE: pages, or with KiB/MiB/GiB)")
    f, n, size = int(m.group(1)), int(m.group(2)), int(m.group(3))
    nbytes = size * _UNIT[m.group(4)]
    if nbytes % PAGE_SIZE or nbytes == 0:
        raise ValueError(f"{spec!r}: the size is not a whole, non-zero number of pages")
    if f < 1 or n < 1:
        raise ValueError(f"{spec!r}: at least one family of one image")
    fleet = Fleet(f, n, nbytes // PAGE_SIZE, int(m.group(5)) if m.group(5) else DEFAULT_SEED)
    idx = int(m.group(6)) if m.group(6) is not None else None
    if idx is not None and idx >= fleet.size:
        raise ValueError(f"{spec!r}: the fleet has members 0..{fleet.size - 1}")
    return fleet, idx


def expand(spec: str) -> list[str]:
    """A fleet spec as its members' specs; a member spec as itself."""
    fleet, idx = parse(spec)
    return fleet.members() if idx is None else [fleet.member(idx)]


def _random_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)


def member_image(fleet: Fleet, i: int) -> np.ndarray:
    """Member ``i`` as an (pages, 4096) uint8 array (the proportions of vm_like_images)."""
    npages = fleet.pages
    n_common = npages * 4 // 10
    n_zero = npages * 2 // 10
    n_repeat = npages // 10
    n_unique = npages - n_common - n_zero - n_repeat
    common = _random_pages(np.random.default_rng([fleet.seed, 1, fleet.family(i)]), n_common)
    rng = np.random.default_rng([fleet.seed, 2, i])
    repeated = _random_pages(rng, max(1, n_repeat // 8))
    image = np.empty((npages, PAGE_SIZE), np.uint8)
    order = rng.permutation(npages)
    at = np.cumsum([0, n_common, n_zero, n_repeat, n_unique])
    image[order[at[0] : at[1]]] = common
    image[order[at[1] : at[2]]] = 0
    image[order[at[2] : at[3]]] = repeated[rng.integers(0, len(repeated), size=n_repeat)]
    image[order[at[3] : at[4]]] = _random_pages(rng, n_unique)
    return image
