"""A process of the engine's machine: its mm, VMAs and the faults that change its PTEs."""

from __future__ import annotations

import bisect
import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._native import ffi, lib
from ..checks import TASK_SIZE, as_int, as_opt_node, as_user_addr, check_move_pages
from ..constants import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    MMAP_BASE,
    MPOL_DEFAULT,
    MPOL_INTERLEAVE,
    MPOL_MF_MOVE,
    MPOL_MF_MOVE_ALL,
    MPOL_WEIGHTED_INTERLEAVE,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from ..errors import ksm_error
from ..guard import serialized
from ..images import open_image
from ..numa import check_policy, policy_node
from ..thp import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    VM_HUGEPAGE,
    VM_NOHUGEPAGE,
    mmap_address,
    pmd_ranges,
    vma_thp_allowed,
)
from .hooks import (
    ksm_disable_merge_any,
    ksm_enable_merge_any,
    ksm_enter,
    ksm_execve,
    ksm_exit,
    ksm_fork,
    ksm_vma_flags,
)
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
    """One process (mm) of a :class:`Machine`."""

    def __init__(self, machine: Machine, pid: int, node: int = 0) -> None:
        self._guard = machine._guard
        self.machine = machine
        self.pid = pid
        self._node = node  # the home node, where MPOL_DEFAULT allocates
        self.mempolicy: tuple[int, tuple[int, ...]] = (MPOL_DEFAULT, ())
        self.mm_id = machine.mem.new_mm()
        self.vmas: list[Region] = []  # live VMAs, by address
        self.dead: list[Region] = []  # unmapped ranges that may still hold rmap_items
        self.next_addr = MMAP_BASE
        self.exited = False
        self.ksm_registered = False  # MMF_VM_MERGEABLE
        self.merge_any = False  # MMF_VM_MERGE_ANY
        # what ksm_stat adds to the mm's counts: before 6.6 (profiles) a forked mm
        # starts from its parent's counts (dup_mm() copies them)
        self.ksm_stat_base = (0, 0)
        # PMD ranges (by address) with a page table but no page KSM could see (read
        # faults map the small zero page there), and those mapping the huge zero page
        self.pmd_table: set[int] = set()
        self.pmd_hzero: set[int] = set()

    def __repr__(self) -> str:
        return f"<ksmcore.Process pid={self.pid}{' exited' if self.exited else ''}>"

    @property
    def node(self) -> int:
        """The home node: where the process runs, and where MPOL_DEFAULT allocates."""
        return self._node

    # ---- helpers

    def _alive(self) -> None:
        if self.exited:
            raise ksm_error(errno.ESRCH, f"process {self.pid} has exited")

    def _cover(self, start: int, end: int, err: int) -> list[tuple[Region, int, int]]:
        """The VMA pieces that map [start, end), or OSError(err) if any page is unmapped."""
        if start < 0:
            raise ksm_error(err, f"{start:#x} is not mapped in process {self.pid}")
        out = []
        i = bisect.bisect_right([v.start for v in self.vmas], start) - 1
        addr = start
        while addr < end:
            if i < 0 or i >= len(self.vmas) or not self.vmas[i].start <= addr < self.vmas[i].end:
                raise ksm_error(err, f"{addr:#x} is not mapped in process {self.pid}")
            v = self.vmas[i]
            hi = min(end, v.end)
            out.append((v, addr, hi))
            addr = hi
            i += 1
        return out

    def _split_at(self, addr: int) -> None:
        for i, v in enumerate(self.vmas):
            if v.start < addr < v.end:
                self.vmas.insert(i + 1, v.split(addr))
                return

    def _regions(self) -> list[Region]:
        """Live and dead regions by address: the places where rmap_items can be."""
        return sorted(self.vmas + self.dead, key=lambda r: r.start)

    def _nid(self, v: Region, addr: int | None = None) -> int:
        """The node a fault at addr in v allocates on: the VMA's binding, else the policy."""
        if v.node is not None:
            return v.node
        mode, nodes = self.mempolicy
        m = self.machine
        return policy_node(mode, nodes, self._node, m.distances, v.start if addr is None else addr)

    def _nids(self, v: Region, lo: int, hi: int) -> tuple[int, Any, set[int]]:
        """The node for slots [lo, hi): one nid, or (interleave) an int16 array of them."""
        if v.node is None and self.mempolicy[0] in (MPOL_INTERLEAVE, MPOL_WEIGHTED_INTERLEAVE):
            nodes = self.mempolicy[1]
            vpn = (v.start >> PAGE_SHIFT) + np.arange(lo - v.slot_base, hi - v.slot_base)
            arr = np.asarray(nodes, dtype=np.int16)[vpn % len(nodes)]
            return 0, arr, set(nodes)
        nid = self._nid(v)
        return nid, None, {nid}

    def _fault(self, v: Region, lo: int, hi: int, full_lo: int, full_hi: int) -> None:
        self._allocating(lib.ksm_write_fault, v, lo, hi, full_lo, full_hi)

    def _allocating(self, fn: Any, v: Region, lo: int, hi: int, *args: int) -> None:
        """Run a C fault over [lo, hi) that allocates: count, provide frames, then do it."""
        m = self.machine
        nid, arr, nodes = self._nids(v, lo, hi)
        nids = ffi.NULL if arr is None else ffi.cast("int16_t *", ffi.from_buffer(arr))
        need = fn(m.ctx, lo, hi, nid, nids, *args, 1)
        if need:
            for n in nodes:
                m.mem.ensure_free(n, need)
            fn(m.ctx, lo, hi, nid, nids, *args, 0)

    # ---- the API

    def mmap(self, npages: int, node: int | None = None) -> int:
        """Map ``npages`` of private anonymous memory; returns its address."""
        self._alive()
        npages = as_int(npages, "npages")
        node = as_opt_node(node, self.machine.nodes)
        self._check_mmap(npages)
        return self._mmap(npages, node)

    def _check_mmap(self, npages: int, align: bool = False) -> None:
        if npages <= 0:
            raise ksm_error(errno.EINVAL, f"npages must be positive, not {npages}")
        m = self.machine
        mapped = sum(v.end - v.start for p in m.processes for v in p.vmas) >> PAGE_SHIFT
        if mapped + npages > m.max_pages:
            raise ksm_error(errno.ENOMEM, f"mmap of {npages} pages: the machine maps {mapped} "
                            f"and allows {m.max_pages} in all (Machine(max_pages=...))")
        addr = self._mmap_address(npages, align)
        if addr + (npages + 1) * PAGE_SIZE > TASK_SIZE:
            raise ksm_error(errno.ENOMEM, f"mmap of {npages} pages: no room left in the "
                            "address space")

    def _mmap_address(self, npages: int, align: bool = False) -> int:
        """Where the next mapping goes: PMD-aligned for 2 MiB multiples (ksmcore.thp),
        or when ``align`` asks (guest RAM)."""
        if align:
            return (self.next_addr + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
        return mmap_address(self.next_addr, npages)

    def _mmap(self, npages: int, node: int | None, align: bool = False) -> int:
        addr = self._mmap_address(npages, align)
        base = self.machine.mem.alloc_slots(npages, self.mm_id)
        self.vmas.append(Region(addr, addr + npages * PAGE_SIZE, base, node=node))
        self.next_addr = addr + (npages + 1) * PAGE_SIZE  # a guard page keeps VMAs apart
        if ksm_vma_flags(self):  # a new VMA of a MERGE_ANY mm is VM_MERGEABLE at once
            self.vmas[-1].mergeable = True
            self.machine.mem.set_mergeable(base, base + npages, True)
        return addr

    def mmap_image(self, source: Any, node: int | None = None, hugepage: bool = False) -> int:
        """Map a memory image (a path, or a uint8 numpy array such as np.memmap) as
        private anonymous memory, without copying it: frames read the image until a
        write copies them, and the image itself is never modified. ``hugepage``: map
        it as QEMU maps guest RAM: PMD-aligned, MADV_HUGEPAGE, and every 2 MiB range
        that THP allows backed by a huge page."""
        self._alive()
        node = as_opt_node(node, self.machine.nodes)
        image = open_image(source)
        n = len(image)
        m = self.machine
        self._check_mmap(n, align=hugepage)
        addr = self._mmap(n, node, align=hugepage)
        v = self.vmas[-1]
        if hugepage:
            v.thp = VM_HUGEPAGE
        first = m.mem.add_image(image, self._nid(v))
        lib.ksm_map_image(m.ctx, v.slot_base, first, n)
        if hugepage and vma_thp_allowed(m.thp_enabled, v.thp):
            for k in range(0, n - HPAGE_PMD_NR + 1, HPAGE_PMD_NR):
                if lib.ksm_make_folio(m.ctx, v.slot_base + k, first + k) < 0:
                    raise MemoryError("ksm_make_folio")
        return addr

    def write(self, addr: int, data: Any) -> None:
        """Write bytes at ``addr``; faults (and COW) every page touched."""
        self._alive()
        addr = as_int(addr, "address")
        buf = memoryview(data).cast("B")
        n = len(buf)
        if n == 0:
            return
        pieces = self._cover(addr, addr + n, errno.EFAULT)
        src = ffi.from_buffer("uint8_t[]", buf)
        done = 0
        for v, lo, hi in pieces:
            first = v.slot(lo & ~(PAGE_SIZE - 1))
            last = v.slot(hi - 1) + 1
            # pages written whole need neither zeroing nor a COW copy
            full_lo = v.slot((lo + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
            full_hi = v.slot(hi & ~(PAGE_SIZE - 1))
            self._thp_fault(lo, hi, write=True)
            self._fault(v, first, last, full_lo, full_hi)
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
            self._alive()
            return
        self.write(addr, np.ascontiguousarray(pages))

    def fill_pages(self, addrs: Any, pages: np.ndarray) -> None:
        """Write whole pages at scattered page-aligned addresses: ``pages[i]`` at
        ``addrs[i]``, in that order, each as ``fill`` writes one page. Every address is
        checked first (nothing changes if one is unmapped or unaligned)."""
        self._alive()
        if not isinstance(pages, np.ndarray) or pages.dtype != np.uint8:
            raise ValueError("pages must be a numpy uint8 array of shape (n, 4096)")
        a = np.asarray(addrs, dtype=np.int64).reshape(-1)
        if pages.ndim != 2 or pages.shape != (len(a), PAGE_SIZE):
            raise ValueError(f"pages must have shape ({len(a)}, 4096), not {pages.shape}")
        if not len(a):
            return
        if (a % PAGE_SIZE).any():
            raise ksm_error(errno.EINVAL, "an address is not page aligned")
        starts = np.array([v.start for v in self.vmas], np.int64)
        ends = np.array([v.end for v in self.vmas], np.int64)
        i = np.searchsorted(starts, a, side="right") - 1
        bad = (i < 0) | (a >= ends[np.maximum(i, 0)]) if len(starts) else np.ones(len(a), bool)
        if bad.any():
            raise ksm_error(errno.EFAULT, f"{int(a[np.argmax(bad)]):#x} is not mapped in "
                                          f"process {self.pid}")
        if self.mempolicy[0] in (MPOL_INTERLEAVE, MPOL_WEIGHTED_INTERLEAVE):
            for k in range(len(a)):  # interleaved nodes: page by page
                self.fill(int(a[k]), pages[k : k + 1])
            return
        bases = np.array([v.slot_base for v in self.vmas], np.int64)
        slots = np.ascontiguousarray(bases[i] + ((a - starts[i]) >> PAGE_SHIFT))
        vnid = np.array([self._nid(v) for v in self.vmas], np.int16)
        nids = np.ascontiguousarray(vnid[i])
        m = self.machine
        for n, count in zip(*np.unique(nids, return_counts=True), strict=True):
            m.mem.ensure_free(int(n), int(count))
        src = np.ascontiguousarray(pages)
        lib.ksm_fill_slots(m.ctx, ffi.cast("int64_t *", ffi.from_buffer(slots)),
                           ffi.cast("int16_t *", ffi.from_buffer(nids)), len(a),
                           ffi.cast("uint8_t *", ffi.from_buffer(src)))

    def read(self, addr: int, n: int) -> bytes:
        self._alive()
        addr = as_int(addr, "address")
        n = as_int(n, "length")
        if n < 0:
            raise ksm_error(errno.EINVAL, "negative length")
        if n == 0:
            return b""
        pieces = self._cover(addr, addr + n, errno.EFAULT)  # before allocating the buffer
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
        self._alive()
        start, end = _page_range(addr, length)
        self._cover(start, end, errno.EFAULT)
        self._thp_fault(start, end, write=False)

    def pfn(self, addr: int) -> int | None:
        """The frame backing the page at ``addr`` (0 for the zero page), or None."""
        self._alive()
        addr = as_int(addr, "address")
        (v, _, _), = self._cover(addr & ~(PAGE_SIZE - 1), (addr & ~(PAGE_SIZE - 1)) + 1,
                                  errno.EFAULT)
        p = int(self.machine.mem.slots["pte"][v.slot(addr & ~(PAGE_SIZE - 1))])
        if p == lib.KSM_PTE_NONE:
            return 0 if (addr & ~(HPAGE_PMD_SIZE - 1)) in self.pmd_hzero else None
        return 0 if p in (lib.KSM_PTE_ZERO, lib.KSM_PTE_SPLIT_ZERO) else p

    def maps(self) -> list[tuple[int, int, bool]]:
        self._alive()
        return [(v.start, v.end, v.mergeable) for v in self.vmas]

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self._alive()
        start, end = _page_range(addr, length)
        advice = as_int(advice, "advice")
        if advice not in (MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_DONTNEED, MADV_HUGEPAGE,
                          MADV_NOHUGEPAGE):
            raise ksm_error(errno.EINVAL, f"unknown advice {advice}")
        pieces = self._cover(start, end, errno.ENOMEM)  # checked before anything changes
        m = self.machine
        if advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
            self._thp_madvise(start, end, VM_HUGEPAGE if advice == MADV_HUGEPAGE
                              else VM_NOHUGEPAGE)
            return
        if advice == MADV_DONTNEED:
            # zap the PTEs, keep the VMAs; the rmap_items go when ksmd passes
            self._thp_zap(start, end)
            for v, lo, hi in pieces:
                s_lo, s_hi = v.slot(lo), v.slot(hi)
                lib.ksm_zap_range(m.ctx, s_lo, s_hi)
                m.mem.set_mergeable(s_lo, s_hi, v.mergeable)  # the zap unmapped the VMA too
            return
        want = advice == MADV_MERGEABLE
        if all(v.mergeable == want for v, _, _ in pieces):
            return  # ksm_madvise() leaves the flags as they are: no VMA is split
        self._split_at(start)
        self._split_at(end)
        for v, lo, hi in self._cover(start, end, errno.ENOMEM):
            if v.mergeable == want:
                continue
            s_lo, s_hi = v.slot(lo), v.slot(hi)
            if want:
                ksm_enter(self)
                v.mergeable = True
                m.mem.set_mergeable(s_lo, s_hi, True)
            else:
                self._break_ksm(v, s_lo, s_hi)
                v.mergeable = False
                m.mem.set_mergeable(s_lo, s_hi, False)

    def _break_ksm(self, v: Region, lo: int, hi: int) -> None:
        self._allocating(lib.ksm_break_ksm, v, lo, hi)

    def _unmerge_all(self) -> None:
        """unmerge_ksm_pages() over every VM_MERGEABLE VMA (run=2)."""
        for v in self.vmas:
            if v.mergeable:
                self._break_ksm(v, v.slot_base, v.slot(v.end))

    def munmap(self, addr: int, length: int) -> None:
        self._alive()
        start, end = _page_range(addr, length)
        self._thp_zap(start, end)
        self._split_at(start)
        self._split_at(end)
        keep = []
        items = self.machine.mem.slots["ri_flags"]
        for v in self.vmas:
            if start <= v.start and v.end <= end:
                lo, hi = v.slot_base, v.slot(v.end)
                lib.ksm_zap_range(self.machine.ctx, lo, hi)
                if items[lo:hi].any():
                    self.dead.append(Region(v.start, v.end, v.slot_base, live=False))
            else:
                keep.append(v)
        self.vmas = keep

    def fork(self) -> Process:
        self._alive()
        m = self.machine
        child = m._new_process(self._node)
        group_start, group_base = 0, 0
        for i, v in enumerate(self.vmas):
            n = (v.end - v.start) >> PAGE_SHIFT
            if i == 0 or v.start - self.vmas[i - 1].end >= HPAGE_PMD_SIZE:
                # one slot range for VMAs that may share a PMD range, so that a huge
                # page's subpages keep consecutive slots in the child too
                j = i
                while j + 1 < len(self.vmas) and \
                        self.vmas[j + 1].start - self.vmas[j].end < HPAGE_PMD_SIZE:
                    j += 1
                group_start = v.start
                group_base = m.mem.alloc_slots((self.vmas[j].end - v.start) >> PAGE_SHIFT,
                                               child.mm_id)
            base = group_base + ((v.start - group_start) >> PAGE_SHIFT)
            lib.ksm_fork_range(m.ctx, v.slot_base, base, n, child.mm_id)
            child.vmas.append(Region(v.start, v.end, base, v.mergeable, True, v.node, v.thp))
        child.pmd_table = set(self.pmd_table)
        child.pmd_hzero = set(self.pmd_hzero)
        child.next_addr = self.next_addr
        child.merge_any = self.merge_any
        if not m.profile.has("fork_resets_ksm_counters"):
            parent = self.ksm_stat(every=True)
            child.ksm_stat_base = (int(parent["ksm_rmap_items"]),
                                   int(parent["ksm_merging_pages"]))
        child.mempolicy = self.mempolicy
        ksm_fork(child, self)
        return child

    def exit(self) -> None:
        self._alive()
        self._exit_mm()

    def _exit_mm(self) -> None:
        """exit_mm(): ksm_exit(), then every mapping goes; ksmd frees the rmap_items."""
        m = self.machine
        ksm_exit(self)
        for v in self.vmas:
            lib.ksm_zap_range(m.ctx, v.slot_base, v.slot(v.end))
            v.live = False
            v.mergeable = False
            self.dead.append(v)
        self.vmas = []
        self.exited = True

    def exec(self) -> None:
        """execve(2): the process (pid, policy, home node) gets a new, empty mm; the
        old one goes as at exit. MMF_VM_MERGE_ANY is in MMF_INIT_MASK, so the new mm
        keeps it, and ksm_execve() enters it with KSM before the old mm goes."""
        self._alive()
        m = self.machine
        old = Process.__new__(Process)
        old.__dict__.update(self.__dict__)  # the old mm, under the same pid
        m._mms[old.mm_id] = old
        slot = m.ksm._slot_of(self)
        if slot is not None:
            slot.mm = old
        self.mm_id = m.mem.new_mm()
        m._mms[self.mm_id] = self
        self.vmas = []
        self.dead = []
        self.pmd_table = set()
        self.pmd_hzero = set()
        self.next_addr = MMAP_BASE
        self.ksm_registered = False
        self.ksm_stat_base = (0, 0)
        self.merge_any = old.merge_any
        ksm_execve(self)  # MERGE_ANY survives exec from 6.7, entered from 6.10
        old._exit_mm()  # exec_mmap(): mmput() of the old mm

    # ---- prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE)

    def prctl_set_memory_merge(self, value: int, arg3: int = 0, arg4: int = 0,
                               arg5: int = 0) -> None:
        """PR_SET_MEMORY_MERGE: non-zero makes every compatible VMA, present and
        future, VM_MERGEABLE (ksm_enable_merge_any); 0 unmerges and clears every
        VM_MERGEABLE VMA, madvised ones too (ksm_disable_merge_any)."""
        self._alive()
        value, arg3, arg4, arg5 = (as_int(a, "a prctl argument") for a in (value, arg3, arg4, arg5))
        self._check_prctl()
        if arg3 or arg4 or arg5:
            raise ksm_error(errno.EINVAL, "PR_SET_MEMORY_MERGE takes no arg3..arg5")
        if value:
            ksm_enable_merge_any(self)
        else:
            ksm_disable_merge_any(self)

    def prctl_get_memory_merge(self, arg2: int = 0, arg3: int = 0, arg4: int = 0,
                               arg5: int = 0) -> int:
        """PR_GET_MEMORY_MERGE: 1 while MMF_VM_MERGE_ANY is set, else 0."""
        self._alive()
        args = [as_int(a, "a prctl argument") for a in (arg2, arg3, arg4, arg5)]
        self._check_prctl()
        if any(args):
            raise ksm_error(errno.EINVAL, "PR_GET_MEMORY_MERGE takes no arguments")
        return int(self.merge_any)

    def _check_prctl(self) -> None:
        if not self.machine.profile.has("prctl_memory_merge"):
            raise ksm_error(errno.EINVAL, f"{self.machine.profile} has no PR_SET_MEMORY_MERGE")

    # ---- NUMA

    def set_mempolicy(self, mode: int, nodes: Sequence[int] = ()) -> None:
        """set_mempolicy(2): where later faults outside node-bound VMAs allocate."""
        self._alive()
        self.mempolicy = check_policy(self.machine.nodes, mode, nodes)

    def get_mempolicy(self) -> tuple[int, tuple[int, ...]]:
        self._alive()
        return self.mempolicy

    def move_pages(self, addr: int, npages: int, node: int,
                   flags: int = MPOL_MF_MOVE) -> list[int]:
        """move_pages(2) of npages pages from addr to node: the per-page status."""
        self._alive()
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
            m._migrate(list(queue), node)
            for j in queue.values():
                status[j] = node
            queue.clear()

        for i in range(npages):
            a = addr + i * PAGE_SIZE
            v = next((v for v in self.vmas if v.start <= a < v.end), None)
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
        return int(self.machine.mem.mm["mm_thp_split_zero_pages"][self.mm_id])

    def _thp_madvise(self, start: int, end: int, advice: int) -> None:
        """MADV_HUGEPAGE / MADV_NOHUGEPAGE (hugepage_madvise()): the VMA flag only."""
        self._split_at(start)
        self._split_at(end)
        for v, _, _ in self._cover(start, end, errno.ENOMEM):
            v.thp = advice

    def _pmd_slots(self, haddr: int) -> tuple[Region, int] | None:
        """The VMA holding the PMD range at haddr and the range's first slot, if the
        range lies in VMAs that the kernel would have merged into one."""
        try:
            pieces = self._cover(haddr, haddr + HPAGE_PMD_SIZE, errno.EFAULT)
        except OSError:
            return None
        v = pieces[0][0]
        if any((w.mergeable, w.thp, w.node) != (v.mergeable, v.thp, v.node) for w, _, _ in pieces):
            return None
        return v, v.slot(haddr)

    def _pmd_present(self, haddr: int) -> bool:
        """Any page mapped in the PMD range (it has a page table or a huge PMD)."""
        for v, lo, hi in self._cover_partial(haddr, haddr + HPAGE_PMD_SIZE):
            pte = self.machine.mem.slots["pte"][v.slot(lo):v.slot(hi)]
            if (pte != lib.KSM_PTE_NONE).any():
                return True
        return False

    def _cover_partial(self, start: int, end: int) -> list[tuple[Region, int, int]]:
        out = []
        for v in self.vmas:
            lo, hi = max(start, v.start), min(end, v.end)
            if lo < hi:
                out.append((v, lo, hi))
        return out

    def _pmd_none(self, haddr: int) -> bool:
        return (haddr not in self.pmd_table and haddr not in self.pmd_hzero
                and not self._pmd_present(haddr))

    def _thp_fault(self, lo: int, hi: int, write: bool) -> None:
        """The huge-page part of faults on [lo, hi), in address order: a fault in a
        PMD range with nothing mapped, inside one THP-eligible VMA, maps a new 2 MiB
        folio (do_huge_pmd_anonymous_page(); a read fault maps the huge zero page
        instead while use_zero_page is 1). A write to the huge zero page splits it
        into a page table (do_huge_pmd_wp_page(): 4 KiB pages from then on)."""
        m = self.machine
        for haddr in pmd_ranges(lo, hi):
            if haddr in self.pmd_hzero:
                if write:
                    self.pmd_hzero.discard(haddr)
                    self.pmd_table.add(haddr)
                continue
            if not self._pmd_none(haddr):
                continue
            where = self._pmd_slots(haddr)
            if where is None or not vma_thp_allowed(m.thp_enabled, where[0].thp):
                if not write:
                    self.pmd_table.add(haddr)  # the read maps the small zero page
                continue
            if not write and m.thp_use_zero_page:
                self.pmd_hzero.add(haddr)
                continue
            v, slot = where
            head = m.mem.alloc_thp(self._nid(v, haddr))
            lib.ksm_map_image(m.ctx, slot, head, HPAGE_PMD_NR)
            if lib.ksm_make_folio(m.ctx, slot, head) < 0:
                raise MemoryError("ksm_make_folio")

    def _thp_zap(self, start: int, end: int) -> None:
        """What a zap of [start, end) does to the PMD ranges it touches: one it covers
        whole is left with nothing (zap_huge_pmd(), or the empty page table freed:
        CONFIG_PT_RECLAIM); one it covers in part keeps a page table (a huge PMD is
        split, __split_huge_pmd())."""
        for haddr in pmd_ranges(start, end):
            if start <= haddr and haddr + HPAGE_PMD_SIZE <= end:
                self.pmd_table.discard(haddr)
                self.pmd_hzero.discard(haddr)
            elif haddr in self.pmd_hzero or self._pmd_present(haddr):
                self.pmd_hzero.discard(haddr)
                self.pmd_table.add(haddr)

    def ksm_stat(self, every: bool = False) -> dict[str, int | bool]:
        """/proc/PID/ksm_stat as this kernel prints it; ``every``: every field the
        model keeps, whatever the kernel profile prints."""
        self._alive()
        mm = self.machine.mem.mm
        rmap_items = int(mm["mm_rmap_items"][self.mm_id]) + self.ksm_stat_base[0]
        zero = int(mm["mm_zero_pages"][self.mm_id])
        merging = int(mm["mm_merging_pages"][self.mm_id]) + self.ksm_stat_base[1]
        stat: dict[str, int | bool] = {
            "ksm_rmap_items": rmap_items,
            "ksm_zero_pages": zero,
            "ksm_merging_pages": merging,
            "ksm_process_profit": (merging + zero) * PAGE_SIZE - rmap_items * 64,
            "ksm_merge_any": self.merge_any,
            "ksm_mergeable": any(v.mergeable for v in self.vmas),
        }
        if every:
            return stat
        return {name: stat[name] for name in self.machine.profile.ksm_stat_fields}
