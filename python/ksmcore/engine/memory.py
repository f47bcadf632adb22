"""The engine's physical memory and page-table slots: numpy arrays the C core works on.

Frames hold page contents in chunks of 4096 pages, so growing memory never copies
contents; their metadata (node, mapcount, KSM mark, free-list link) and the per-slot
arrays (PTE, VMA flags, owning mm, and the rmap_item fields) grow by doubling. After
any growth the pointers in the C context are refreshed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._native import ffi, lib, ptr

CHUNK_SHIFT = 12
CHUNK_PAGES = 1 << CHUNK_SHIFT

# name, dtype, initial value of the per-slot arrays (rmap_items live beside PTEs)
_SLOT_FIELDS = (
    ("pte", np.int32, lib.KSM_PTE_NONE),
    ("vflags", np.uint8, 0),
    ("slot_mm", np.int32, -1),
    ("ri_flags", np.uint16, 0),
    ("ri_oldchecksum", np.uint32, 0),
    ("ri_age", np.uint8, 0),
    ("ri_remaining_skips", np.uint8, 0),
    ("ri_nid", np.int16, 0),
    ("ri_head", np.int32, -1),
    ("ri_hnext", np.int32, -1),
    ("ri_hprev", np.int32, -1),
    ("ri_tnode", np.int32, -1),
)
_FRAME_FIELDS = (
    ("frame_nid", np.int16),
    ("frame_mapcount", np.int32),
    ("frame_stable", np.int32),
    ("frame_next_free", np.int32),
    ("frame_flags", np.uint8),
    ("frame_csum", np.uint32),
    ("frame_csum_valid", np.uint8),
)
_MM_FIELDS = ("mm_rmap_items", "mm_merging_pages", "mm_zero_pages")


class Memory:
    """Frames, slots and per-mm counters, shared with C through one ``struct ksm_ctx``."""

    def __init__(self, nodes: int) -> None:
        self.ctx: Any = ffi.new("struct ksm_ctx *")
        if lib.ksm_ctx_init(self.ctx) != 0:
            raise MemoryError("ksm_ctx_init")
        self.ctx.chunk_shift = CHUNK_SHIFT
        self.nodes = nodes
        self.chunks: list[np.ndarray] = []
        self._chunk_ptrs: Any = ffi.new("uint8_t *[]", 16)
        self.ctx.chunks = self._chunk_ptrs
        self.frames: dict[str, np.ndarray] = {
            name: np.zeros(0, dtype=dt) for name, dt in _FRAME_FIELDS
        }
        self.slots: dict[str, np.ndarray] = {
            name: np.full(1024, init, dtype=dt) for name, dt, init in _SLOT_FIELDS
        }
        self.nr_slots = 0
        self.mm: dict[str, np.ndarray] = {name: np.zeros(16, dtype=np.int64) for name in _MM_FIELDS}
        self.nr_mm = 0
        self._refresh()
        # pfn 0 is the zero page: the first frame of node 0's first chunk, never free
        self._add_chunk(0, reserve_zero=True)

    def __del__(self) -> None:
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            lib.ksm_ctx_release(ctx)

    def _refresh(self) -> None:
        c = self.ctx
        for name, arr in self.frames.items():
            setattr(c, name, ptr(arr))
        for name, arr in self.slots.items():
            setattr(c, name, ptr(arr))
        for name, arr in self.mm.items():
            setattr(c, name, ptr(arr))
        c.nr_frames = len(self.chunks) * CHUNK_PAGES
        c.nr_slots = self.nr_slots

    # ---- frames

    def _add_chunk(self, nid: int, reserve_zero: bool = False) -> None:
        self._append_chunk(np.empty((CHUNK_PAGES, 4096), dtype=np.uint8))
        first = (len(self.chunks) - 1) * CHUNK_PAGES
        if reserve_zero:
            self.chunks[0][0] = 0
            self.frames["frame_nid"][0] = 0
            self.frames["frame_stable"][0] = lib.KSM_FRAME_NOT_KSM
            lib.ksm_add_frames(self.ctx, first + 1, CHUNK_PAGES - 1, nid)
        else:
            lib.ksm_add_frames(self.ctx, first, CHUNK_PAGES, nid)

    def add_image(self, image: np.ndarray) -> int:
        """Frames that read a (n, 4096) uint8 image in place; returns the first pfn.

        The image is never written: the C core copies an image frame on write and
        never puts one on a free list.
        """
        base = ffi.cast("uint8_t *", ffi.from_buffer(image, require_writable=False))
        first = len(self.chunks) * CHUNK_PAGES
        for k in range(0, len(image), CHUNK_PAGES):
            self._append_chunk(image[k : k + CHUNK_PAGES], base + k * 4096)
        return first

    def _append_chunk(self, chunk: np.ndarray, address: Any = None) -> None:
        index = len(self.chunks)
        self.chunks.append(chunk)
        if len(self.chunks) > len(self._chunk_ptrs):
            ptrs = ffi.new("uint8_t *[]", 2 * len(self._chunk_ptrs))
            for i in range(len(self._chunk_ptrs)):
                ptrs[i] = self._chunk_ptrs[i]
            self._chunk_ptrs = ptrs
            self.ctx.chunks = ptrs
        if address is None:
            address = ffi.cast("uint8_t *", ffi.from_buffer(chunk))
        self._chunk_ptrs[index] = address
        need = len(self.chunks) * CHUNK_PAGES
        if need > len(self.frames["frame_nid"]):
            cap = max(need, 2 * len(self.frames["frame_nid"]))
            for name, arr in self.frames.items():
                # frames not (yet) in use: not KSM, on no free list
                grown = np.full(cap, -1 if name in ("frame_stable", "frame_next_free") else 0,
                                dtype=arr.dtype)
                grown[: len(arr)] = arr
                self.frames[name] = grown
        self._refresh()

    def ensure_free(self, nid: int, count: int) -> None:
        """Make sure node ``nid`` has ``count`` free frames (memory grows, never fails)."""
        while self.ctx.nr_free[nid] < count:
            self._add_chunk(nid)

    def page(self, pfn: int) -> np.ndarray:
        return self.chunks[pfn >> CHUNK_SHIFT][pfn & (CHUNK_PAGES - 1)]

    # ---- slots

    def alloc_slots(self, n: int, mm_id: int) -> int:
        base = self.nr_slots
        need = base + n
        cap = len(self.slots["pte"])
        if need > cap:
            while cap < need:
                cap *= 2
            for name, dt, init in _SLOT_FIELDS:
                arr = self.slots[name]
                grown = np.full(cap, init, dtype=dt)
                grown[: len(arr)] = arr
                self.slots[name] = grown
        self.nr_slots = need
        self.slots["slot_mm"][base:need] = mm_id
        self._refresh()
        return base

    def new_mm(self) -> int:
        mm_id = self.nr_mm
        self.nr_mm += 1
        if self.nr_mm > len(self.mm["mm_rmap_items"]):
            for name, arr in self.mm.items():
                grown = np.zeros(2 * len(arr), dtype=arr.dtype)
                grown[: len(arr)] = arr
                self.mm[name] = grown
            self._refresh()
        return mm_id
