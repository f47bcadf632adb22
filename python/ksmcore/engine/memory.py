"""The engine's physical memory and page-table slots: numpy arrays the C core works on.

Frames hold page contents in chunks of 4096 pages, so growing memory never copies
contents; their metadata (node, mapcount, KSM mark, free-list link) and the per-slot
arrays (PTE, VMA flags, owning mm, and the rmap_item fields) grow by doubling. After
any growth the pointers in the C context are refreshed.
"""

from __future__ import annotations

import errno
from typing import Any

import numpy as np

from .._native import ffi, lib, ptr
from ..images import file_watch

CHUNK_SHIFT = 12
CHUNK_PAGES = 1 << CHUNK_SHIFT

# name, dtype, initial value of the per-slot arrays: 20 bytes a page
_SLOT_FIELDS = (
    ("pte", np.int32, lib.KSM_PTE_NONE),
    ("ri_flags", np.uint16, 0),
    ("ri_oldchecksum", np.uint32, 0),
    ("ri_age", np.uint8, 0),
    ("ri_remaining_skips", np.uint8, 0),
    ("ri_head", np.int32, -1),
    ("ri_hnext", np.int32, -1),
)
# and of the per-frame arrays: 8 bytes a frame (the node and kind are per chunk), and
# 4 more for frame_folio, which stays untouched zero pages (no memory) where no frame
# is in a huge page: it holds the folio's index + 1, 0 for none (see folio_of)
_FRAME_FIELDS = (
    ("frame_mapcount", np.int32, 0),
    ("frame_stable", np.int32, lib.KSM_FRAME_NOT_KSM),
    ("frame_folio", np.int32, 0),
)
_MM_FIELDS = ("mm_rmap_items", "mm_merging_pages", "mm_zero_pages", "mm_thp_split_zero_pages")
HPAGE_PMD_NR = lib.KSM_HPAGE_PMD_NR
SLOT_BLOCK = 1 << lib.KSM_SLOT_BLOCK_SHIFT


def _grown(arr: np.ndarray, need: int, init: int) -> np.ndarray:
    """``arr`` with room for ``need`` entries: a quarter more than asked, so that one
    large mapping costs little more than its size and many small ones amortize."""
    if need <= len(arr):
        return arr
    size = max(need, len(arr) + len(arr) // 4)
    if init == 0:
        # calloc'd: pages never written cost nothing, so copy only what is not zero
        out = np.zeros(size, dtype=arr.dtype)
        nonzero = np.flatnonzero(arr)
        out[nonzero] = arr[nonzero]
        return out
    out = np.full(size, init, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


def folio_of(frame_folio: np.ndarray) -> np.ndarray:
    """The large folio of each frame of ``frame_folio`` values, -1 for none."""
    return frame_folio.astype(np.int64) - 1


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
            name: np.full(0, init, dtype=dt) for name, dt, init in _FRAME_FIELDS
        }
        self.chunk_nid = np.zeros(16, dtype=np.int16)
        self.chunk_flags = np.zeros(16, dtype=np.uint8)
        self.slots: dict[str, np.ndarray] = {
            name: np.full(1024, init, dtype=dt) for name, dt, init in _SLOT_FIELDS
        }
        self.slot_mm = np.full(1024 // SLOT_BLOCK, -1, dtype=np.int32)
        self.nr_slots = 0
        self.mm: dict[str, np.ndarray] = {name: np.zeros(16, dtype=np.int64) for name in _MM_FIELDS}
        # free PMD-sized blocks of frames for huge pages, per node: whole chunks kept
        # off the small free lists (a huge page that is freed whole or split returns
        # its frames to the small free lists)
        self.thp_pool: list[list[int]] = [[] for _ in range(nodes)]
        self.nr_mm = 0
        # images read in place: their start addresses (image_guard.c), and a watch of
        # each file behind them, once per file (images.py)
        self.images: list[Any] = []
        self.watches: dict[object, Any] = {}
        self._refresh()
        # pfn 0 is the zero page: the first frame of node 0's first chunk, never free
        self._add_chunks(0, 1, reserve_zero=True)

    def __del__(self) -> None:
        for start in getattr(self, "images", ()):
            lib.ksm_image_guard_remove(start)
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            lib.ksm_ctx_release(ctx)

    def _refresh(self) -> None:
        c = self.ctx
        for name, arr in self.frames.items():
            setattr(c, name, ptr(arr))
        for name, arr in self.slots.items():
            setattr(c, name, ptr(arr))
        c.chunk_nid = ptr(self.chunk_nid)
        c.chunk_flags = ptr(self.chunk_flags)
        c.slot_mm = ptr(self.slot_mm)
        for name, arr in self.mm.items():
            setattr(c, name, ptr(arr))
        c.nr_frames = len(self.chunks) * CHUNK_PAGES
        c.nr_slots = self.nr_slots

    # ---- frames

    def _add_chunks(self, nid: int, count: int, reserve_zero: bool = False) -> None:
        first = len(self.chunks) * CHUNK_PAGES
        for _ in range(count):
            self._append_chunk(np.empty((CHUNK_PAGES, 4096), dtype=np.uint8), nid)
        self._refresh()
        if reserve_zero:
            self.chunks[0][0] = 0
            lib.ksm_add_frames(self.ctx, first + 1, count * CHUNK_PAGES - 1)
        else:
            lib.ksm_add_frames(self.ctx, first, count * CHUNK_PAGES)

    def add_image(self, image: np.ndarray, nid: int) -> int:
        """Frames on node ``nid`` that read a (n, 4096) uint8 image in place; returns
        the first pfn. The image is never written: the C core copies an image frame
        on write and never puts one on a free list."""
        base = ffi.cast("uint8_t *", ffi.from_buffer(image, require_writable=False))
        if lib.ksm_image_guard_add(base, image.nbytes) != 0:
            raise OSError(errno.ENOMEM, "cannot guard the image against truncation (too many)")
        self.images.append(base)
        watch = file_watch(image)
        if watch is not None:
            self.watches.setdefault(*watch)
        first = len(self.chunks) * CHUNK_PAGES
        self._reserve_chunks(len(self.chunks) + -(-len(image) // CHUNK_PAGES))
        for k in range(0, len(image), CHUNK_PAGES):
            self._append_chunk(image[k : k + CHUNK_PAGES], nid, lib.KSM_CHUNK_IMAGE,
                               base + k * 4096)
        self._refresh()
        return first

    def check_images(self) -> None:
        """OSError(ESTALE) if an image file changed, or shrank under a read, since it
        was mapped (images.py)."""
        why = None
        for watch in self.watches.values():
            why = watch()
            if why:
                break
        else:
            for start in self.images:
                if lib.ksm_image_guard_faults(start) > 0:
                    why = "a page of the image vanished while it was read (the file shrank)"
                    break
        if why:
            raise OSError(errno.ESTALE, f"memory image changed underneath: {why}; the "
                          "model no longer describes it (map it again on a new Machine)")

    def _reserve_chunks(self, nchunks: int) -> None:
        """Room for ``nchunks`` chunks in the chunk and frame arrays: one growth for a
        whole image, not one per chunk."""
        if nchunks > len(self._chunk_ptrs):
            size = len(self._chunk_ptrs)
            while size < nchunks:
                size *= 2
            ptrs = ffi.new("uint8_t *[]", size)
            for i in range(len(self._chunk_ptrs)):
                ptrs[i] = self._chunk_ptrs[i]
            self._chunk_ptrs = ptrs
            self.ctx.chunks = ptrs
        self.chunk_nid = _grown(self.chunk_nid, nchunks, 0)
        self.chunk_flags = _grown(self.chunk_flags, nchunks, 0)
        for name, _, init in _FRAME_FIELDS:
            self.frames[name] = _grown(self.frames[name], nchunks * CHUNK_PAGES, init)

    def _append_chunk(self, chunk: np.ndarray, nid: int, flags: int = 0,
                      address: Any = None) -> None:
        index = len(self.chunks)
        self._reserve_chunks(index + 1)
        self.chunks.append(chunk)
        if address is None:
            address = ffi.cast("uint8_t *", ffi.from_buffer(chunk))
        self._chunk_ptrs[index] = address
        self.chunk_nid[index] = nid
        self.chunk_flags[index] = flags

    def alloc_thp(self, nid: int) -> int:
        """The first pfn of HPAGE_PMD_NR free, contiguous, zeroed frames on ``nid``."""
        pool = self.thp_pool[nid]
        if not pool:
            first = len(self.chunks) * CHUNK_PAGES
            self._append_chunk(np.empty((CHUNK_PAGES, 4096), dtype=np.uint8), nid)
            self._refresh()
            pool.extend(range(first + CHUNK_PAGES - HPAGE_PMD_NR, first - 1, -HPAGE_PMD_NR))
        head = pool.pop()
        off = head & (CHUNK_PAGES - 1)
        self.chunks[head >> CHUNK_SHIFT][off : off + HPAGE_PMD_NR] = 0
        return head

    def ensure_free(self, nid: int, count: int) -> None:
        """Make sure node ``nid`` has ``count`` free frames (memory grows, never fails)."""
        short = count - self.ctx.nr_free[nid]
        if short > 0:
            self._add_chunks(nid, -(-short // CHUNK_PAGES))

    def frame_nid(self, pfn: int) -> int:
        return int(self.chunk_nid[pfn >> CHUNK_SHIFT])

    def frame_nids(self, pfns: np.ndarray) -> np.ndarray:
        return self.chunk_nid[np.asarray(pfns) >> CHUNK_SHIFT]

    def mm_of_slot(self, slot: int) -> int:
        return int(self.slot_mm[slot // SLOT_BLOCK])

    def set_mergeable(self, lo: int, hi: int, on: bool) -> None:
        """VM_MERGEABLE on or off for the pages of slots [lo, hi) (ksm_set_mergeable)."""
        lib.ksm_set_mergeable(self.ctx, lo, hi, 1 if on else 0)

    def page(self, pfn: int) -> np.ndarray:
        return self.chunks[pfn >> CHUNK_SHIFT][pfn & (CHUNK_PAGES - 1)]

    # ---- slots

    def alloc_slots(self, n: int, mm_id: int) -> int:
        """Slots for a new VMA of ``n`` pages: from a block boundary, so that the one
        slot_mm entry of each block names this mm."""
        base = -(-self.nr_slots // SLOT_BLOCK) * SLOT_BLOCK
        need = base + n
        for name, _, init in _SLOT_FIELDS:
            self.slots[name] = _grown(self.slots[name], need, init)
        blocks = -(-need // SLOT_BLOCK)
        self.slot_mm = _grown(self.slot_mm, blocks, -1)
        self.slot_mm[base // SLOT_BLOCK : blocks] = mm_id
        self.nr_slots = need
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

    # ---- migration

    def migrate_pages(self, pfns: list[int], node: int) -> list[int]:
        """migrate_pages(): move each frame of ``pfns`` to a new frame on ``node``;
        every mapping follows. Returns the new pfns."""
        if not pfns:
            return []
        self.ensure_free(node, len(pfns))
        new = np.array([lib.ksm_frame_alloc(self.ctx, node) for _ in pfns], dtype=np.int32)
        old = np.asarray(pfns, dtype=np.int32)
        remap = np.full(len(self.chunks) * CHUNK_PAGES, -1, dtype=np.int32)
        lib.ksm_migrate_frames(self.ctx, ptr(old), ptr(new), len(old), ptr(remap))
        return list(new.tolist())
