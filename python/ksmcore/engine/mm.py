"""The engine's mm (struct mm_struct): VMAs, their page-table slots, the faults that
change PTEs, and what the mm does for KSM (break_ksm, unmerge_ksm_pages).

A ``Process`` (process.py) has an ``mm``; exec gives it a new one. Calls come checked
from process.py; KSM is reached only through the hooks of hooks.py.
"""

from __future__ import annotations

import bisect
import errno
from typing import TYPE_CHECKING, Any

import numpy as np

from .._native import ffi, lib
from ..checks import TASK_SIZE
from ..constants import (
    MMAP_BASE,
    MPOL_DEFAULT,
    MPOL_INTERLEAVE,
    MPOL_WEIGHTED_INTERLEAVE,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from ..errors import ksm_error
from ..images import open_image
from ..numa import policy_node
from ..thp import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    VM_HUGEPAGE,
    mmap_address,
    pmd_ranges,
    vma_thp_allowed,
)
from .hooks import ksm_exit, ksm_vma_flags
from .vma import Region

if TYPE_CHECKING:
    from .machine import Machine


class Mm:
    """``struct mm_struct`` of the engine: live VMAs and the dead ranges whose slots
    may still hold rmap_items, the MMF_VM_MERGEABLE / MMF_VM_MERGE_ANY flags, and the
    THP state of its PMD ranges. Its per-mm KSM counters live in the C core (by
    ``mm_id``)."""

    def __init__(self, machine: Machine, pid: int, node: int = 0) -> None:
        self.machine = machine
        self.pid = pid  # the owning process (tracepoints name an mm by it)
        self.node = node  # the home node, where MPOL_DEFAULT allocates
        self.mempolicy: tuple[int, tuple[int, ...]] = (MPOL_DEFAULT, ())
        self.mm_id = machine.mem.new_mm()
        self.vmas: list[Region] = []  # live VMAs, by address
        self.dead: list[Region] = []  # unmapped ranges that may still hold rmap_items
        self.next_addr = MMAP_BASE
        self.exiting = False  # mm_users == 0 (ksm_test_exit)
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
        return f"<ksmcore mm {self.mm_id} of pid {self.pid}{' exiting' if self.exiting else ''}>"

    # ---- VMAs

    def cover(self, start: int, end: int, err: int) -> list[tuple[Region, int, int]]:
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

    def cover_partial(self, start: int, end: int) -> list[tuple[Region, int, int]]:
        """The parts of [start, end) that VMAs map (holes left out)."""
        out = []
        for v in self.vmas:
            lo, hi = max(start, v.start), min(end, v.end)
            if lo < hi:
                out.append((v, lo, hi))
        return out

    def split_vma(self, addr: int) -> None:
        """Cut the VMA that holds ``addr`` inside it in two at ``addr``."""
        for i, v in enumerate(self.vmas):
            if v.start < addr < v.end:
                self.vmas.insert(i + 1, v.split(addr))
                return

    def regions(self) -> list[Region]:
        """Live and dead regions by address: the places where rmap_items can be."""
        return sorted(self.vmas + self.dead, key=lambda r: r.start)

    def mapped_pages(self) -> int:
        return sum(v.end - v.start for v in self.vmas) >> PAGE_SHIFT

    # ---- faults

    def fault_nid(self, v: Region, addr: int | None = None) -> int:
        """The node a fault at addr in v allocates on: the VMA's binding, else the policy."""
        if v.node is not None:
            return v.node
        mode, nodes = self.mempolicy
        return policy_node(mode, nodes, self.node, self.machine.distances,
                           v.start if addr is None else addr)

    def _nids(self, v: Region, lo: int, hi: int) -> tuple[int, Any, set[int]]:
        """The node for slots [lo, hi): one nid, or (interleave) an int16 array of them."""
        if v.node is None and self.mempolicy[0] in (MPOL_INTERLEAVE, MPOL_WEIGHTED_INTERLEAVE):
            nodes = self.mempolicy[1]
            vpn = (v.start >> PAGE_SHIFT) + np.arange(lo - v.slot_base, hi - v.slot_base)
            arr = np.asarray(nodes, dtype=np.int16)[vpn % len(nodes)]
            return 0, arr, set(nodes)
        nid = self.fault_nid(v)
        return nid, None, {nid}

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

    def write_fault(self, v: Region, lo: int, hi: int, full_lo: int, full_hi: int) -> None:
        """Write faults on slots [lo, hi); [full_lo, full_hi) are written whole."""
        self._allocating(lib.ksm_write_fault, v, lo, hi, full_lo, full_hi)

    # ---- mmap, munmap, madvise

    def check_mmap(self, npages: int, align: bool = False) -> None:
        """mmap's checks: EINVAL for no pages, ENOMEM past the machine's max_pages or
        the address space."""
        if npages <= 0:
            raise ksm_error(errno.EINVAL, f"npages must be positive, not {npages}")
        m = self.machine
        mapped = sum(p.mm.mapped_pages() for p in m.processes)
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

    def mmap_region(self, npages: int, node: int | None, align: bool = False) -> int:
        """A new private anonymous VMA (checked by check_mmap); returns its address."""
        addr = self._mmap_address(npages, align)
        base = self.machine.mem.alloc_slots(npages, self.mm_id)
        self.vmas.append(Region(addr, addr + npages * PAGE_SIZE, base, node=node))
        self.next_addr = addr + (npages + 1) * PAGE_SIZE  # a guard page keeps VMAs apart
        if ksm_vma_flags(self):  # a new VMA of a MERGE_ANY mm is VM_MERGEABLE at once
            self.vmas[-1].mergeable = True
            self.machine.mem.set_mergeable(base, base + npages, True)
        return addr

    def mmap_image(self, source: Any, node: int | None, hugepage: bool) -> int:
        """A VMA whose frames read the image in place until a write copies them."""
        image = open_image(source)
        n = len(image)
        m = self.machine
        self.check_mmap(n, align=hugepage)
        addr = self.mmap_region(n, node, align=hugepage)
        v = self.vmas[-1]
        if hugepage:
            v.thp = VM_HUGEPAGE
        first = m.mem.add_image(image, self.fault_nid(v))
        lib.ksm_map_image(m.ctx, v.slot_base, first, n)
        if hugepage and vma_thp_allowed(m.thp_enabled, v.thp):
            for k in range(0, n - HPAGE_PMD_NR + 1, HPAGE_PMD_NR):
                if lib.ksm_make_folio(m.ctx, v.slot_base + k, first + k) < 0:
                    raise MemoryError("ksm_make_folio")
        return addr

    def zap_page_range(self, start: int, end: int,
                       pieces: list[tuple[Region, int, int]]) -> None:
        """MADV_DONTNEED: zap the PTEs, keep the VMAs; the rmap_items go when ksmd
        passes."""
        m = self.machine
        self.thp_zap(start, end)
        for v, lo, hi in pieces:
            s_lo, s_hi = v.slot(lo), v.slot(hi)
            lib.ksm_zap_range(m.ctx, s_lo, s_hi)
            m.mem.set_mergeable(s_lo, s_hi, v.mergeable)  # the zap unmapped the VMA too

    def do_munmap(self, start: int, end: int) -> None:
        """Unmap [start, end): its VMAs go; ranges whose slots hold rmap_items stay as
        dead regions until ksmd frees the items."""
        self.thp_zap(start, end)
        self.split_vma(start)
        self.split_vma(end)
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

    # ---- KSM's side of the mm

    def break_ksm(self, v: Region, lo: int, hi: int) -> None:
        """break_ksm() over slots [lo, hi) of v: every KSM page (or KSM zero page)
        there is unshared by a write fault."""
        self._allocating(lib.ksm_break_ksm, v, lo, hi)

    def unmerge_ksm_pages(self, v: Region, start: int, end: int) -> None:
        """unmerge_ksm_pages(vma, start, end): break_ksm() on [start, end) of v."""
        self.break_ksm(v, v.slot(start), v.slot(end))

    # ---- fork, exit

    def dup_mmap(self, child: Mm) -> None:
        """dup_mmap(): the child maps every page of this mm (COW), VMA by VMA."""
        m = self.machine
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
        child.mempolicy = self.mempolicy
        if not m.profile.has("fork_resets_ksm_counters"):
            parent = self.ksm_stat()
            child.ksm_stat_base = (int(parent["ksm_rmap_items"]),
                                   int(parent["ksm_merging_pages"]))

    def mmput(self) -> None:
        """mmput() of the last user (exit_mm(), or exec_mmap() of the old mm):
        ksm_exit(), then every mapping goes; ksmd frees the rmap_items."""
        m = self.machine
        ksm_exit(self)
        for v in self.vmas:
            lib.ksm_zap_range(m.ctx, v.slot_base, v.slot(v.end))
            v.live = False
            v.mergeable = False
            self.dead.append(v)
        self.vmas = []
        self.exiting = True

    # ---- transparent huge pages (ksmcore.thp, docs/MODEL.md)

    def _pmd_slots(self, haddr: int) -> tuple[Region, int] | None:
        """The VMA holding the PMD range at haddr and the range's first slot, if the
        range lies in VMAs that the kernel would have merged into one."""
        try:
            pieces = self.cover(haddr, haddr + HPAGE_PMD_SIZE, errno.EFAULT)
        except OSError:
            return None
        v = pieces[0][0]
        if any((w.mergeable, w.thp, w.node) != (v.mergeable, v.thp, v.node) for w, _, _ in pieces):
            return None
        return v, v.slot(haddr)

    def _pmd_present(self, haddr: int) -> bool:
        """Any page mapped in the PMD range (it has a page table or a huge PMD)."""
        for v, lo, hi in self.cover_partial(haddr, haddr + HPAGE_PMD_SIZE):
            pte = self.machine.mem.slots["pte"][v.slot(lo):v.slot(hi)]
            if (pte != lib.KSM_PTE_NONE).any():
                return True
        return False

    def _pmd_none(self, haddr: int) -> bool:
        return (haddr not in self.pmd_table and haddr not in self.pmd_hzero
                and not self._pmd_present(haddr))

    def thp_madvise(self, start: int, end: int, advice: int) -> None:
        """MADV_HUGEPAGE / MADV_NOHUGEPAGE (hugepage_madvise()): the VMA flag only."""
        self.split_vma(start)
        self.split_vma(end)
        for v, _, _ in self.cover(start, end, errno.ENOMEM):
            v.thp = advice

    def thp_fault(self, lo: int, hi: int, write: bool) -> None:
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
            head = m.mem.alloc_thp(self.fault_nid(v, haddr))
            lib.ksm_map_image(m.ctx, slot, head, HPAGE_PMD_NR)
            if lib.ksm_make_folio(m.ctx, slot, head) < 0:
                raise MemoryError("ksm_make_folio")

    def thp_zap(self, start: int, end: int) -> None:
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

    @property
    def thp_split_zero_pages(self) -> int:
        return int(self.machine.mem.mm["mm_thp_split_zero_pages"][self.mm_id])

    # ---- /proc/PID/ksm_stat

    def ksm_stat(self) -> dict[str, int | bool]:
        """Every field of ksm_stat the model keeps (proc_pid_ksm_stat())."""
        mm = self.machine.mem.mm
        rmap_items = int(mm["mm_rmap_items"][self.mm_id]) + self.ksm_stat_base[0]
        zero = int(mm["mm_zero_pages"][self.mm_id])
        merging = int(mm["mm_merging_pages"][self.mm_id]) + self.ksm_stat_base[1]
        return {
            "ksm_rmap_items": rmap_items,
            "ksm_zero_pages": zero,
            "ksm_merging_pages": merging,
            "ksm_process_profit": (merging + zero) * PAGE_SIZE - rmap_items * 64,
            "ksm_merge_any": self.merge_any,
            "ksm_mergeable": any(v.mergeable for v in self.vmas),
        }
