"""A process of the engine's machine: a pid, a home node and its mm (mm.py). The
calls of the API are checked here; the mm does the work."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._native import ffi, lib
from ..checks import as_int, as_opt_node, as_user_addr, check_move_pages
from ..constants import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    MPOL_INTERLEAVE,
    MPOL_MF_MOVE,
    MPOL_MF_MOVE_ALL,
    MPOL_WEIGHTED_INTERLEAVE,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from ..errors import ksm_error
from ..guard import serialized
from ..numa import check_policy
from ..thp import HPAGE_PMD_SIZE, VM_HUGEPAGE, VM_NOHUGEPAGE
from .hooks import (
    ksm_disable_merge_any,
    ksm_enable_merge_any,
    ksm_enter,
    ksm_execve,
    ksm_fork,
)
from .mm import Mm
from .vma import Region

if TYPE_CHECKING:
    from .machine import Machine


def _page_range(addr: object, length: object) -> tuple[int, int]:
    """[start, end) of a page-aligned range given to munmap or madvise: EINVAL when
    unaligned, outside the user address space, or empty."""
    start = as_user_addr(addr)
    length = as_int(length, "length")
    if start % PAGE_SIZE:
        raise ksm_error(errno.EINVAL, f"address {start:#x} is not page aligned")
    if length <= 0:
        raise ksm_error(errno.EINVAL, f"length {length} must be positive")
    end = start + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
    as_user_addr(end - 1, "end of range")
    return start, end


@serialized
class Process:
    """One process of a :class:`Machine`: a pid, a home node and its ``mm``."""

    def __init__(self, machine: Machine, pid: int, node: int = 0) -> None:
        self._guard = machine._guard
        self.machine = machine
        self.pid = pid
        self.mm = Mm(machine, pid, node)
        self.exited = False

    def __repr__(self) -> str:
        return f"<ksmcore.Process pid={self.pid}{' exited' if self.exited else ''}>"

    @property
    def node(self) -> int:
        """The home node: where the process runs, and where MPOL_DEFAULT allocates."""
        return self.mm.node

    # ---- helpers

    def _live(self) -> Mm:
        if self.exited:
            raise ksm_error(errno.ESRCH, f"process {self.pid} has exited")
        return self.mm

    # ---- the API

    def mmap(self, npages: int, node: int | None = None) -> int:
        """Map ``npages`` of private anonymous memory; returns its address."""
        mm = self._live()
        npages = as_int(npages, "npages")
        node = as_opt_node(node, self.machine.nodes)
        mm.check_mmap(npages)
        return mm.mmap_region(npages, node)

    def mmap_image(self, source: Any, node: int | None = None, hugepage: bool = False) -> int:
        """Map a memory image (a path, or a uint8 numpy array such as np.memmap) as
        private anonymous memory, without copying it: frames read the image until a
        write copies them, and the image itself is never modified. ``hugepage``: map
        it as QEMU maps guest RAM: PMD-aligned, MADV_HUGEPAGE, and every 2 MiB range
        that THP allows backed by a huge page."""
        mm = self._live()
        node = as_opt_node(node, self.machine.nodes)
        return mm.mmap_image(source, node, hugepage)

    def write(self, addr: int, data: Any) -> None:
        """Write bytes at ``addr``; faults (and COW) every page touched."""
        mm = self._live()
        addr = as_int(addr, "address")
        buf = memoryview(data).cast("B")
        n = len(buf)
        if n == 0:
            return
        pieces = mm.cover(addr, addr + n, errno.EFAULT)
        src = ffi.from_buffer("uint8_t[]", buf)
        done = 0
        for v, lo, hi in pieces:
            first = v.slot(lo & ~(PAGE_SIZE - 1))
            last = v.slot(hi - 1) + 1
            # pages written whole need neither zeroing nor a COW copy
            full_lo = v.slot((lo + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
            full_hi = v.slot(hi & ~(PAGE_SIZE - 1))
            mm.thp_fault(lo, hi, write=True)
            mm.write_fault(v, first, last, full_lo, full_hi)
            lib.ksm_copy_in(self.machine.ctx, first, lo % PAGE_SIZE, src + done, hi - lo)
            done += hi - lo

    def fill(self, addr: int, pages: np.ndarray) -> None:
        """Write whole pages from a (n, 4096) uint8 array, page-aligned, in one pass."""
        if not isinstance(pages, np.ndarray) or pages.dtype != np.uint8:
            raise ValueError("pages must be a numpy uint8 array of shape (n, 4096)")
        if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
            raise ValueError(f"pages must have shape (n, 4096), not {pages.shape}")
        addr = as_int(addr, "address")
        if addr % PAGE_SIZE:
            raise ksm_error(errno.EINVAL, f"address {addr:#x} is not page aligned")
        if not len(pages):
            self._live()
            return
        self.write(addr, np.ascontiguousarray(pages))

    def fill_pages(self, addrs: Any, pages: np.ndarray) -> None:
        """Write whole pages at scattered page-aligned addresses: ``pages[i]`` at
        ``addrs[i]``, in that order, each as ``fill`` writes one page. Every address is
        checked first (nothing changes if one is unmapped or unaligned)."""
        mm = self._live()
        if not isinstance(pages, np.ndarray) or pages.dtype != np.uint8:
            raise ValueError("pages must be a numpy uint8 array of shape (n, 4096)")
        a = np.asarray(addrs, dtype=np.int64).reshape(-1)
        if pages.ndim != 2 or pages.shape != (len(a), PAGE_SIZE):
            raise ValueError(f"pages must have shape ({len(a)}, 4096), not {pages.shape}")
        if not len(a):
            return
        if (a % PAGE_SIZE).any():
            raise ksm_error(errno.EINVAL, "an address is not page aligned")
        starts = np.array([v.start for v in mm.vmas], np.int64)
        ends = np.array([v.end for v in mm.vmas], np.int64)
        i = np.searchsorted(starts, a, side="right") - 1
        bad = (i < 0) | (a >= ends[np.maximum(i, 0)]) if len(starts) else np.ones(len(a), bool)
        if bad.any():
            raise ksm_error(errno.EFAULT, f"{int(a[np.argmax(bad)]):#x} is not mapped in "
                                          f"process {self.pid}")
        if mm.mempolicy[0] in (MPOL_INTERLEAVE, MPOL_WEIGHTED_INTERLEAVE):
            for k in range(len(a)):  # interleaved nodes: page by page
                self.fill(int(a[k]), pages[k : k + 1])
            return
        bases = np.array([v.slot_base for v in mm.vmas], np.int64)
        slots = np.ascontiguousarray(bases[i] + ((a - starts[i]) >> PAGE_SHIFT))
        vnid = np.array([mm.fault_nid(v) for v in mm.vmas], np.int16)
        nids = np.ascontiguousarray(vnid[i])
        m = self.machine
        for n, count in zip(*np.unique(nids, return_counts=True), strict=True):
            m.mem.ensure_free(int(n), int(count))
        src = np.ascontiguousarray(pages)
        lib.ksm_fill_slots(m.ctx, ffi.cast("int64_t *", ffi.from_buffer(slots)),
                           ffi.cast("int16_t *", ffi.from_buffer(nids)), len(a),
                           ffi.cast("uint8_t *", ffi.from_buffer(src)))

    def read(self, addr: int, n: int) -> bytes:
        mm = self._live()
        addr = as_int(addr, "address")
        n = as_int(n, "length")
        if n < 0:
            raise ksm_error(errno.EINVAL, "negative length")
        if n == 0:
            return b""
        pieces = mm.cover(addr, addr + n, errno.EFAULT)  # before allocating the buffer
        out = bytearray(n)
        dst = ffi.from_buffer("uint8_t[]", out)
        done = 0
        for v, lo, hi in pieces:
            first = v.slot(lo & ~(PAGE_SIZE - 1))
            lib.ksm_copy_out(self.machine.ctx, first, lo % PAGE_SIZE, dst + done, hi - lo)
            done += hi - lo
        return bytes(out)

    def read_fault(self, addr: int, length: int) -> None:
        """Touch [addr, addr + length) for reading, as loads by the process would: the
        faults that reads take (``read`` only inspects and faults nothing). Only THP
        makes them visible: a read fault in an empty PMD range maps the huge zero page
        (or, with use_zero_page 0, a huge page) where THP is allowed, else the small
        zero page, which leaves a page table behind."""
        mm = self._live()
        start, end = _page_range(addr, length)
        mm.cover(start, end, errno.EFAULT)
        mm.thp_fault(start, end, write=False)

    def pfn(self, addr: int) -> int | None:
        """The frame backing the page at ``addr`` (0 for the zero page), or None."""
        mm = self._live()
        addr = as_int(addr, "address")
        (v, _, _), = mm.cover(addr & ~(PAGE_SIZE - 1), (addr & ~(PAGE_SIZE - 1)) + 1,
                              errno.EFAULT)
        p = int(self.machine.mem.slots["pte"][v.slot(addr & ~(PAGE_SIZE - 1))])
        if p == lib.KSM_PTE_NONE:
            return 0 if (addr & ~(HPAGE_PMD_SIZE - 1)) in mm.pmd_hzero else None
        return 0 if p in (lib.KSM_PTE_ZERO, lib.KSM_PTE_SPLIT_ZERO) else p

    def maps(self) -> list[tuple[int, int, bool]]:
        mm = self._live()
        return [(v.start, v.end, v.mergeable) for v in mm.vmas]

    def madvise(self, addr: int, length: int, advice: int) -> None:
        mm = self._live()
        start, end = _page_range(addr, length)
        advice = as_int(advice, "advice")
        if advice not in (MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_DONTNEED, MADV_HUGEPAGE,
                          MADV_NOHUGEPAGE):
            raise ksm_error(errno.EINVAL, f"unknown advice {advice}")
        pieces = mm.cover(start, end, errno.ENOMEM)  # checked before anything changes
        if advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
            mm.thp_madvise(start, end, VM_HUGEPAGE if advice == MADV_HUGEPAGE
                           else VM_NOHUGEPAGE)
            return
        if advice == MADV_DONTNEED:
            mm.zap_page_range(start, end, pieces)
            return
        self._ksm_madvise(mm, start, end, advice == MADV_MERGEABLE, pieces)

    def _ksm_madvise(self, mm: Mm, start: int, end: int, want: bool,
                     pieces: list[tuple[Region, int, int]]) -> None:
        """ksm_madvise(): VM_MERGEABLE on (and ksm_enter()) or off (unmerge_ksm_pages())."""
        if all(v.mergeable == want for v, _, _ in pieces):
            return  # ksm_madvise() leaves the flags as they are: no VMA is split
        mem = self.machine.mem
        mm.split_vma(start)
        mm.split_vma(end)
        for v, lo, hi in mm.cover(start, end, errno.ENOMEM):
            if v.mergeable == want:
                continue
            if want:
                ksm_enter(mm)
                v.mergeable = True
            else:
                mm.unmerge_ksm_pages(v, lo, hi)
                v.mergeable = False
            mem.set_mergeable(v.slot(lo), v.slot(hi), want)

    def munmap(self, addr: int, length: int) -> None:
        mm = self._live()
        start, end = _page_range(addr, length)
        mm.do_munmap(start, end)

    def fork(self) -> Process:
        mm = self._live()
        child = self.machine.spawn(mm.node)  # copy_process(): a new task with its own mm
        mm.dup_mmap(child.mm)
        ksm_fork(child.mm, mm)
        return child

    def exit(self) -> None:
        mm = self._live()
        mm.mmput()  # exit_mm()
        self.exited = True

    def exec(self) -> None:
        """execve(2): the process (pid, policy, home node) gets a new, empty mm; the
        old one goes as at exit. MMF_VM_MERGE_ANY is in MMF_INIT_MASK, so the new mm
        keeps it, and ksm_execve() enters it with KSM before the old mm goes."""
        old = self._live()
        mm = Mm(self.machine, self.pid, old.node)  # bprm_mm_init()
        mm.mempolicy = old.mempolicy  # a task attribute: exec keeps it
        mm.merge_any = old.merge_any
        ksm_execve(mm)  # MERGE_ANY survives exec from 6.7, entered from 6.10
        self.mm = mm  # exec_mmap()
        old.mmput()

    # ---- prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE)

    def prctl_set_memory_merge(self, value: int, arg3: int = 0, arg4: int = 0,
                               arg5: int = 0) -> None:
        """PR_SET_MEMORY_MERGE: non-zero makes every compatible VMA, present and
        future, VM_MERGEABLE (ksm_enable_merge_any); 0 unmerges and clears every
        VM_MERGEABLE VMA, madvised ones too (ksm_disable_merge_any)."""
        mm = self._live()
        value, arg3, arg4, arg5 = (as_int(a, "a prctl argument") for a in (value, arg3, arg4, arg5))
        self._check_prctl()
        if arg3 or arg4 or arg5:
            raise ksm_error(errno.EINVAL, "PR_SET_MEMORY_MERGE takes no arg3..arg5")
        if value:
            ksm_enable_merge_any(mm)
        else:
            ksm_disable_merge_any(mm)

    def prctl_get_memory_merge(self, arg2: int = 0, arg3: int = 0, arg4: int = 0,
                               arg5: int = 0) -> int:
        """PR_GET_MEMORY_MERGE: 1 while MMF_VM_MERGE_ANY is set, else 0."""
        mm = self._live()
        args = [as_int(a, "a prctl argument") for a in (arg2, arg3, arg4, arg5)]
        self._check_prctl()
        if any(args):
            raise ksm_error(errno.EINVAL, "PR_GET_MEMORY_MERGE takes no arguments")
        return int(mm.merge_any)

    def _check_prctl(self) -> None:
        if not self.machine.profile.has("prctl_memory_merge"):
            raise ksm_error(errno.EINVAL, f"{self.machine.profile} has no PR_SET_MEMORY_MERGE")

    # ---- NUMA

    def set_mempolicy(self, mode: int, nodes: Sequence[int] = ()) -> None:
        """set_mempolicy(2): where later faults outside node-bound VMAs allocate."""
        mm = self._live()
        mm.mempolicy = check_policy(self.machine.nodes, mode, nodes)

    def get_mempolicy(self) -> tuple[int, tuple[int, ...]]:
        return self._live().mempolicy

    def move_pages(self, addr: int, npages: int, node: int,
                   flags: int = MPOL_MF_MOVE) -> list[int]:
        """move_pages(2) of npages pages from addr to node: the per-page status."""
        mm = self._live()
        m = self.machine
        addr, npages, node, flags = check_move_pages(addr, npages, node, flags, m.nodes)
        pte = m.mem.slots["pte"]
        frames = m.mem.frames
        # do_pages_move(): pages are queued (isolated) one by one; any page that is not
        # queued stores its status and migrates the queue so far. A second address of a
        # page already queued finds it isolated: -EBUSY.
        status = [0] * npages
        enoent = m.profile.has("move_pages_enoent")
        queue: dict[int, int] = {}  # old pfn -> its index in status

        def flush() -> None:
            m.mem.migrate_pages(list(queue), node)
            for j in queue.values():
                status[j] = node
            queue.clear()

        for i in range(npages):
            a = addr + i * PAGE_SIZE
            v = next((v for v in mm.vmas if v.start <= a < v.end), None)
            if v is None:
                err = -errno.EFAULT
            else:
                p = int(pte[v.slot(a)])
                if p > 0 and frames["frame_folio"][p]:  # in a huge page
                    lib.ksm_split_folio(m.ctx, p)  # the model splits a huge page to move it
                    p = int(pte[v.slot(a)])
                if p == lib.KSM_PTE_NONE:
                    # follow_page(FOLL_DUMP) before 6.12 made a non-present page -EFAULT
                    err = -errno.ENOENT if enoent else -errno.EFAULT
                elif p in (lib.KSM_PTE_ZERO, lib.KSM_PTE_SPLIT_ZERO):
                    err = -errno.EFAULT  # the zero page does not move
                elif m.mem.frame_nid(p) == node:
                    err = node
                elif frames["frame_mapcount"][p] > 1 and not flags & MPOL_MF_MOVE_ALL:
                    err = -errno.EACCES  # mapped by others: needs MOVE_ALL
                elif p in queue:
                    err = -errno.EBUSY  # isolated already, by an earlier address
                else:
                    queue[p] = i
                    continue
            status[i] = err
            flush()
        flush()
        return status

    # ---- transparent huge pages (ksmcore.thp, docs/MODEL.md)

    @property
    def thp_split_zero_pages(self) -> int:
        """PTEs of this process mapping the shared zero page because a huge page split
        found their subpage zero-filled (pages freed by splitting; not a KSM counter)."""
        return self.mm.thp_split_zero_pages

    def ksm_stat(self, every: bool = False) -> dict[str, int | bool]:
        """/proc/PID/ksm_stat as this kernel prints it; ``every``: every field the
        model keeps, whatever the kernel profile prints."""
        stat = self._live().ksm_stat()
        if every:
            return stat
        return {name: stat[name] for name in self.machine.profile.ksm_stat_fields}
