"""The public API of the reference: ``Machine``, ``Process`` and ``m.ksm``.

Every call validates the whole request before it changes anything (docs/MODEL.md).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from typing import Any, cast

import numpy as np

from ..api import BATCH_COLUMNS
from ..checks import (
    MAX_BATCHES,
    MAX_PAGES,
    TASK_SIZE,
    U32_MAX,
    as_count,
    as_int,
    as_node,
    as_opt_node,
    as_user_addr,
    check_clock,
    check_move_pages,
)
from ..constants import (
    FIRST_PID,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    MMAP_BASE,
    MPOL_MF_MOVE,
    MPOL_MF_MOVE_ALL,
    PAGE_SIZE,
    SIZEOF_RMAP_ITEM,
    SYSFS_FILES,
    ZERO_PFN,
)
from ..errors import KsmdNotRunning, ksm_error
from ..guard import Guard, serialized
from ..images import read_image
from ..knobs import check_file, format_sysfs, knob_text
from ..numa import check_distances, check_policy
from ..profiles import Profile
from ..profiles import resolve as resolve_profile
from ..simclock import SimulatedTime
from ..thp import (
    HPAGE_PMD_NR,
    HPAGE_PMD_SIZE,
    THP_ENABLED_DEFAULT,
    THP_USE_ZERO_PAGE_DEFAULT,
    VM_HUGEPAGE,
    VM_NOHUGEPAGE,
    ThpKnobs,
    mmap_address,
    pmd_ranges,
    vma_thp_allowed,
)
from ..timing import CostModel
from ..tracing import Tracer
from .invariants import check_invariants
from .ksm import Ksm
from .ksm_structs import StableNode
from .mm import PAGE_MASK, SPLIT_ZERO_PFN, Mm, PhysMem, Vma


@serialized
class Process:
    """A process with a private address space (its ``mm``)."""

    def __init__(self, machine: Machine, pid: int, mm: Mm) -> None:
        self._guard = machine._guard
        self._machine = machine
        self.pid = pid
        self.mm = mm
        self.exited = False

    def __repr__(self) -> str:
        state = "exited" if self.exited else "live"
        return f"<reference.Process pid={self.pid} {state}>"

    # ---- helpers ------------------------------------------------------------------

    def _live(self) -> Mm:
        if self.exited:
            raise ksm_error(errno.ESRCH, f"process {self.pid} has exited")
        return self.mm

    def _check_range(self, mm: Mm, addr: int, length: int) -> None:
        """addr/length of a read or write: any offset, must lie in VMAs."""
        if addr < 0 or not mm.range_mapped(addr, addr + length):
            raise ksm_error(errno.EFAULT, f"{addr:#x}+{length:#x} is not mapped")

    @staticmethod
    def _page_range(addr: object, length: object) -> tuple[int, int]:
        """Aligned addr and length rounded up to whole pages; EINVAL if unaligned, empty,
        or outside the user address space."""
        start = as_user_addr(addr)
        n = as_int(length, "length")
        if start & (PAGE_SIZE - 1):
            raise ksm_error(errno.EINVAL, f"address {start:#x} is not page aligned")
        if n <= 0:
            raise ksm_error(errno.EINVAL, "zero length")
        end = start + ((n + PAGE_SIZE - 1) & PAGE_MASK)
        as_user_addr(end - 1, "end of range")
        return start, end

    # ---- address space ------------------------------------------------------------

    def mmap(self, npages: int, node: int | None = None) -> int:
        """A private anonymous VMA of npages pages; faults in it allocate on node."""
        mm = self._live()
        npages = as_int(npages, "npages")
        node = as_opt_node(node, self._machine.nodes)
        self._check_mmap(mm, npages)
        return self._mmap(mm, npages, node)

    def _check_mmap(self, mm: Mm, npages: int, align: bool = False) -> None:
        if npages <= 0:
            raise ksm_error(errno.EINVAL, "mmap of zero pages")
        machine = self._machine
        mapped = sum(v.end - v.start for p in machine.processes for v in p.mm.vmas) // PAGE_SIZE
        if mapped + npages > machine.max_pages:
            raise ksm_error(errno.ENOMEM, f"mmap of {npages} pages: the machine maps {mapped} "
                            f"and allows {machine.max_pages} in all (Machine(max_pages=...))")
        if self._mmap_address(mm, npages, align) + (npages + 1) * PAGE_SIZE > TASK_SIZE:
            raise ksm_error(errno.ENOMEM, f"mmap of {npages} pages: no room left in the "
                            "address space")

    @staticmethod
    def _mmap_address(mm: Mm, npages: int, align: bool = False) -> int:
        """2 MiB multiples (or guest RAM: ``align``) are PMD-aligned (ksmcore.thp)."""
        if align:
            return (mm.next_addr + HPAGE_PMD_SIZE - 1) & ~(HPAGE_PMD_SIZE - 1)
        return mmap_address(mm.next_addr, npages)

    def _mmap(self, mm: Mm, npages: int, node: int | None, align: bool = False) -> int:
        addr = self._mmap_address(mm, npages, align)
        mm.next_addr = addr + (npages + 1) * PAGE_SIZE  # one guard page: VMAs never touch
        mergeable = self._machine._ksm.ksm_vma_flags(mm)  # MERGE_ANY: mergeable at birth
        mm.vmas.append(Vma(addr, addr + npages * PAGE_SIZE, mergeable, node))
        return addr

    def mmap_image(self, source: Any, node: int | None = None, hugepage: bool = False) -> int:
        """Map a memory image (a path or a uint8 numpy array) as private anonymous memory.
        The reference copies it into its frames; the engine reads it in place. Either way
        each page is present with the image's contents, and the image is never written.
        ``hugepage``: as QEMU maps guest RAM (PMD-aligned, MADV_HUGEPAGE), every 2 MiB
        range that THP allows is backed by a huge page."""
        mm = self._live()
        node = as_opt_node(node, self._machine.nodes)
        image = read_image(source)  # a snapshot: a later change of the file cannot reach it
        self._check_mmap(mm, len(image), align=hugepage)
        addr = self._mmap(mm, len(image), node, align=hugepage)
        vma = self.mm.vmas[-1]
        nid = self.mm.fault_nid(vma, addr)  # the whole image lies on one node
        n = len(image)
        huge = 0
        if hugepage:
            vma.thp = VM_HUGEPAGE
            if vma_thp_allowed(self._machine._thp_enabled, vma.thp):
                huge = n - n % HPAGE_PMD_NR
        for k in range(0, huge, HPAGE_PMD_NR):
            self._map_thp(mm, addr + k * PAGE_SIZE, nid)
        for i in range(n):
            frame = self.mm.write_fault(addr + i * PAGE_SIZE, vma, nid)
            frame.data[:] = image[i].data
        for k in range(0, huge, HPAGE_PMD_NR):
            folio = self._machine._mem.frames[mm.pte[addr + k * PAGE_SIZE]].folio
            assert folio is not None
            folio.image = True
        return addr

    def munmap(self, addr: int, length: int) -> None:
        mm = self._live()
        start, end = self._page_range(addr, length)
        self._thp_zap(mm, start, end)
        mm.zap_range(start, end)
        for vma in mm.isolate(start, end):
            mm.vmas.remove(vma)

    def write(self, addr: int, data: Any) -> None:
        """Write bytes at any offset: a write fault per page, in address order."""
        mm = self._live()
        addr = as_int(addr, "address")
        buf = memoryview(data).cast("B")
        if len(buf) == 0:
            return  # nothing to write: no fault, no check
        self._check_range(mm, addr, len(buf))
        self._thp_fault(mm, addr, addr + len(buf), write=True)
        pos = 0
        while pos < len(buf):
            a = addr + pos
            page = a & PAGE_MASK
            off = a - page
            n = min(PAGE_SIZE - off, len(buf) - pos)
            vma = mm.vma_lookup(page)
            assert vma is not None
            frame = mm.write_fault(page, vma)
            frame.data[off:off + n] = buf[pos:pos + n]
            pos += n

    def fill_pages(self, addrs: Any, pages: np.ndarray) -> None:
        """Write whole pages at scattered page-aligned addresses, ``pages[i]`` at
        ``addrs[i]`` in order, each as ``fill`` writes one page; every address is checked
        first."""
        mm = self._live()
        if not isinstance(pages, np.ndarray) or pages.dtype != np.uint8:
            raise ValueError("fill_pages takes a numpy uint8 array of shape (n, 4096)")
        a = [int(x) for x in np.asarray(addrs, dtype=np.int64).reshape(-1)]
        if pages.ndim != 2 or pages.shape != (len(a), PAGE_SIZE):
            raise ValueError(f"fill_pages takes an array of shape ({len(a)}, 4096)")
        for addr in a:
            if addr % PAGE_SIZE:
                raise ksm_error(errno.EINVAL, f"address {addr:#x} is not page aligned")
            if addr < 0 or not mm.range_mapped(addr, addr + PAGE_SIZE):
                raise ksm_error(errno.EFAULT, f"{addr:#x} is not mapped")
        for k, addr in enumerate(a):
            self.fill(addr, pages[k : k + 1])

    def fill(self, addr: int, pages: np.ndarray) -> None:
        """Write n whole pages from a page-aligned addr, given as a uint8 array (n, 4096)."""
        if not isinstance(pages, np.ndarray) or pages.dtype != np.uint8:
            raise ValueError("fill takes a numpy uint8 array of shape (n, 4096)")
        if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
            raise ValueError(f"fill takes an array of shape (n, 4096), not {pages.shape}")
        addr = as_int(addr, "address")
        if addr % PAGE_SIZE:
            raise ksm_error(errno.EINVAL, f"address {addr:#x} is not page aligned")
        mm = self._live()
        if pages.shape[0] == 0:
            return  # like an empty write
        pages = np.ascontiguousarray(pages)
        start, end = addr, addr + pages.shape[0] * PAGE_SIZE
        if addr < 0 or not mm.range_mapped(start, end):
            raise ksm_error(errno.EFAULT, f"{start:#x}-{end:#x} is not mapped")
        self._thp_fault(mm, start, end, write=True)
        vma = None
        for i in range(pages.shape[0]):
            page = start + i * PAGE_SIZE
            if vma is None or page >= vma.end:
                vma = mm.vma_lookup(page)
                assert vma is not None
            frame = mm.write_fault(page, vma)
            frame.data[:] = pages[i].data

    def read(self, addr: int, n: int) -> bytes:
        """Read n bytes; non-present pages (and KSM zero pages) read as zeros."""
        mm = self._live()
        addr = as_int(addr, "address")
        n = as_int(n, "length")
        if n < 0:
            raise ksm_error(errno.EINVAL, "negative length")
        if n == 0:
            return b""
        self._check_range(mm, addr, n)
        out = bytearray(n)
        pos = 0
        while pos < n:
            a = addr + pos
            page = a & PAGE_MASK
            off = a - page
            k = min(PAGE_SIZE - off, n - pos)
            frame = mm.frame_at(page)
            if frame is not None:
                out[pos:pos + k] = frame.data[off:off + k]
            pos += k
        return bytes(out)

    def read_fault(self, addr: int, length: int) -> None:
        """Touch [addr, addr + length) for reading: the faults that loads take (``read``
        faults nothing). A read fault in an empty PMD range maps the huge zero page (a
        huge page with use_zero_page 0) where THP is allowed, else the small zero page,
        which leaves a page table behind."""
        mm = self._live()
        start, end = self._page_range(addr, length)
        if not mm.range_mapped(start, end):
            raise ksm_error(errno.EFAULT, f"{start:#x}-{end:#x} is not mapped")
        self._thp_fault(mm, start, end, write=False)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        mm = self._live()
        start, end = self._page_range(addr, length)
        advice = as_int(advice, "advice")
        if advice not in (MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_DONTNEED, MADV_HUGEPAGE,
                          MADV_NOHUGEPAGE):
            raise ksm_error(errno.EINVAL, f"unsupported advice {advice!r}")
        if not mm.range_mapped(start, end):
            raise ksm_error(errno.ENOMEM, f"{start:#x}-{end:#x} is not all mapped")
        if advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
            # hugepage_madvise(): the VMA flag only (khugepaged is not modelled)
            flag = VM_HUGEPAGE if advice == MADV_HUGEPAGE else VM_NOHUGEPAGE
            for vma in mm.isolate(start, end):
                vma.thp = flag
            return
        if advice == MADV_DONTNEED:
            self._thp_zap(mm, start, end)
            # zap_page_range_single(): the PTEs go (a KSM zero PTE leaves
            # ksm_zero_pages), the VMAs stay; ksmd frees the rmap_items as it passes
            mm.zap_range(start, end)
            return
        ksm = self._machine._ksm
        mergeable = advice == MADV_MERGEABLE
        for vma in mm.vmas_in(start, end):
            if vma.mergeable == mergeable:
                continue  # ksm_madvise returns 0 and the flags do not change: no split
            lo, hi = max(start, vma.start), min(end, vma.end)
            if mergeable:
                if not mm.mmf_vm_mergeable:
                    ksm.ksm_enter(mm)
            else:
                ksm.unmerge_ksm_pages(mm, vma, lo, hi)
            if vma.start < lo:
                mm.split_vma(vma, lo)
                vma = mm.vmas[mm.find_vma_index(lo)]
            if hi < vma.end:
                mm.split_vma(vma, hi)
            vma.mergeable = mergeable

    def fork(self) -> Process:
        """A child sharing every page (COW) and KSM zero PTE; registered with KSM if
        the parent is. The child starts with no rmap_items."""
        mm = self._live()
        machine = self._machine
        child_mm = Mm(machine._mem, mm.next_addr)
        child_mm.vmas = [vma.copy() for vma in mm.vmas]
        child_mm.pte = dict(mm.pte)
        child_mm.pte_addrs = list(mm.pte_addrs)
        zero = split_zero = 0
        for addr, pfn in mm.pte.items():
            if pfn == ZERO_PFN:
                zero += 1
            elif pfn == SPLIT_ZERO_PFN:
                split_zero += 1
            else:
                frame = machine._mem.frames[pfn]
                frame.mapcount += 1
                if frame.folio is not None:  # copy_huge_pmd(): the child maps it too
                    frame.folio.add_map(child_mm, addr - frame.subpage * PAGE_SIZE)
        child_mm.ksm_zero_pages = zero
        machine._mem.ksm_zero_pages += zero
        child_mm.thp_split_zero_pages = split_zero
        machine._mem.thp_split_zero_pages += split_zero
        child_mm.pmd_table = set(mm.pmd_table)
        child_mm.pmd_hzero = set(mm.pmd_hzero)
        child_mm.mmf_vm_merge_any = mm.mmf_vm_merge_any
        if not machine.profile.has("fork_resets_ksm_counters"):
            parent = self.ksm_stat(every=True)
            child_mm.ksm_stat_base = (int(parent["ksm_rmap_items"]),
                                      int(parent["ksm_merging_pages"]))
        child_mm.node = mm.node
        child_mm.mempolicy = mm.mempolicy
        child = machine._new_process(child_mm)
        machine._ksm.ksm_fork(child_mm, mm)
        return child

    def exit(self) -> None:
        """ksm_exit, then drop every mapping; the process is gone for the API."""
        mm = self._live()
        self._exit_mm(mm)
        self.exited = True
        self._machine.processes.remove(self)

    def _exit_mm(self, mm: Mm) -> None:
        """mmput() of the last user: ksm_exit, then every mapping goes."""
        self._machine._ksm.ksm_exit(mm)
        mm.zap_range(0, 1 << 64)
        mm.vmas.clear()
        mm.exiting = True

    def exec(self) -> None:
        """execve(2): a new, empty mm for the same process (pid, memory policy and
        home node stay). bprm_mm_init() copies MMF_VM_MERGE_ANY into it (MMF_INIT_MASK)
        and ksm_execve() enters it with KSM; then exec_mmap() drops the old mm as an
        exit does."""
        old = self._live()
        machine = self._machine
        mm = Mm(machine._mem, MMAP_BASE)
        mm.pid = self.pid
        mm.node = old.node
        mm.mempolicy = old.mempolicy  # a task attribute: exec keeps it
        mm.mmf_vm_merge_any = old.mmf_vm_merge_any
        machine._all_mms.append(mm)
        machine._ksm.ksm_execve(mm)  # by the profile: keeps MERGE_ANY, enters the mm
        self.mm = mm
        self._exit_mm(old)

    def prctl_set_memory_merge(self, value: int, arg3: int = 0, arg4: int = 0,
                               arg5: int = 0) -> None:
        """prctl(PR_SET_MEMORY_MERGE, value, arg3, arg4, arg5) (kernel/sys.c)."""
        mm = self._live()
        value, arg3, arg4, arg5 = (as_int(a, "a prctl argument") for a in (value, arg3, arg4, arg5))
        self._check_prctl()
        if arg3 or arg4 or arg5:
            raise ksm_error(errno.EINVAL, "PR_SET_MEMORY_MERGE: arg3..arg5 must be 0")
        if value:
            self._machine._ksm.ksm_enable_merge_any(mm)
        else:
            self._machine._ksm.ksm_disable_merge_any(mm)

    def prctl_get_memory_merge(self, arg2: int = 0, arg3: int = 0, arg4: int = 0,
                               arg5: int = 0) -> int:
        """prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0): 1 if MMF_VM_MERGE_ANY is set."""
        mm = self._live()
        args = [as_int(a, "a prctl argument") for a in (arg2, arg3, arg4, arg5)]
        self._check_prctl()
        if any(args):
            raise ksm_error(errno.EINVAL, "PR_GET_MEMORY_MERGE: arg2..arg5 must be 0")
        return int(mm.mmf_vm_merge_any)

    def _check_prctl(self) -> None:
        if not self._machine.profile.has("prctl_memory_merge"):
            raise ksm_error(errno.EINVAL, f"{self._machine.profile} has no PR_SET_MEMORY_MERGE")

    # ---- inspection ---------------------------------------------------------------

    def pfn(self, addr: int) -> int | None:
        """The frame mapping the page holding addr (ZERO_PFN for a KSM zero PTE),
        None if nothing is mapped there. EFAULT outside every VMA."""
        mm = self._live()
        addr = as_int(addr, "address")
        if addr < 0 or mm.vma_lookup(addr) is None:
            raise ksm_error(errno.EFAULT, f"{addr:#x} is not mapped")
        pfn = mm.pte.get(addr & PAGE_MASK)
        if pfn is None:
            return ZERO_PFN if (addr & ~(HPAGE_PMD_SIZE - 1)) in mm.pmd_hzero else None
        return ZERO_PFN if pfn == SPLIT_ZERO_PFN else pfn

    def maps(self) -> list[tuple[int, int, bool]]:
        mm = self._live()
        return [(vma.start, vma.end, vma.mergeable) for vma in mm.vmas]

    # ---- NUMA -------------------------------------------------------------------

    @property
    def node(self) -> int:
        """The home node: where the process runs, and where MPOL_DEFAULT allocates."""
        return self.mm.node

    def set_mempolicy(self, mode: int, nodes: Sequence[int] = ()) -> None:
        mm = self._live()
        mm.mempolicy = check_policy(self._machine.nodes, mode, nodes)

    def get_mempolicy(self) -> tuple[int, tuple[int, ...]]:
        return self._live().mempolicy

    def move_pages(self, addr: int, npages: int, node: int,
                   flags: int = MPOL_MF_MOVE) -> list[int]:
        """move_pages(2): move npages pages from addr to node; the per-page status."""
        mm = self._live()
        machine = self._machine
        addr, npages, node, flags = check_move_pages(addr, npages, node, flags, machine.nodes)
        # do_pages_move(): add_page_for_migration() isolates the pages one by one onto
        # a list; a page that is not queued stores its status, then the list so far
        # migrates (move_pages_and_store_status). An address whose page an earlier
        # address queued finds it isolated already: -EBUSY.
        status = [0] * npages
        enoent = machine.profile.has("move_pages_enoent")
        queued: list[int] = []  # pfns on the list, in order
        queued_at: list[int] = []  # their indices in status

        def flush() -> None:
            for pfn in queued:
                machine._migrate(pfn, node)
            for j in queued_at:
                status[j] = node
            queued.clear()
            queued_at.clear()

        for i in range(npages):
            a = addr + i * PAGE_SIZE
            pfn = mm.pte.get(a)
            if pfn is not None and pfn > 0 and machine._mem.frames[pfn].folio is not None:
                folio = machine._mem.frames[pfn].folio
                assert folio is not None
                machine._mem.split_huge_page(folio)  # the model splits a huge page to move it
                pfn = mm.pte.get(a)
            if mm.vma_lookup(a) is None:
                err = -errno.EFAULT
            elif pfn is None:
                # follow_page(FOLL_DUMP) before 6.12 made a non-present page -EFAULT
                err = -errno.ENOENT if enoent else -errno.EFAULT
            elif pfn <= ZERO_PFN:
                err = -errno.EFAULT  # the zero page (or a split's zero PTE) does not move
            else:
                frame = machine._mem.frames[pfn]
                if frame.nid == node:
                    err = node
                elif frame.mapcount > 1 and not flags & MPOL_MF_MOVE_ALL:
                    err = -errno.EACCES  # mapped by others: needs MOVE_ALL
                elif pfn in queued:
                    err = -errno.EBUSY  # isolate_lru_page() fails: on the list already
                else:
                    queued.append(pfn)
                    queued_at.append(i)
                    continue
            status[i] = err
            flush()
        flush()
        return status

    # ---- transparent huge pages (ksmcore.thp, docs/MODEL.md) ------------------------

    @property
    def thp_split_zero_pages(self) -> int:
        """PTEs of this process mapping the shared zero page because a huge page split
        found their subpage zero-filled (pages freed by splitting; not a KSM counter)."""
        return self._live().thp_split_zero_pages

    def _map_thp(self, mm: Mm, haddr: int, nid: int) -> None:
        """Map a new zeroed huge page at haddr."""
        folio = self._machine._mem.alloc_thp(nid)
        for k, frame in enumerate(folio.frames):
            frame.mapcount = 1
            mm.set_pte(haddr + k * PAGE_SIZE, frame.pfn)
        folio.add_map(mm, haddr)

    @staticmethod
    def _pmd_vma(mm: Mm, haddr: int) -> Vma | None:
        """The VMA of the PMD range at haddr if the range lies in VMAs that the
        kernel would have merged into one (equal flags, no hole)."""
        end = haddr + HPAGE_PMD_SIZE
        if not mm.range_mapped(haddr, end):
            return None
        vmas = mm.vmas_in(haddr, end)
        v = vmas[0]
        if any((w.mergeable, w.thp, w.nid) != (v.mergeable, v.thp, v.nid) for w in vmas):
            return None
        return v

    @staticmethod
    def _pmd_none(mm: Mm, haddr: int) -> bool:
        return (haddr not in mm.pmd_table and haddr not in mm.pmd_hzero
                and not mm.present_in(haddr, haddr + HPAGE_PMD_SIZE))

    def _thp_fault(self, mm: Mm, lo: int, hi: int, write: bool) -> None:
        """Faults on [lo, hi), their huge-page part, in address order: a fault in a
        PMD range with nothing mapped, inside one THP-eligible VMA, maps a new 2 MiB
        folio (do_huge_pmd_anonymous_page(); a read fault maps the huge zero page
        instead while use_zero_page is 1). A write to the huge zero page splits it
        into a page table (do_huge_pmd_wp_page(): 4 KiB pages from then on)."""
        machine = self._machine
        for haddr in pmd_ranges(lo, hi):
            if haddr in mm.pmd_hzero:
                if write:
                    mm.pmd_hzero.discard(haddr)
                    mm.pmd_table.add(haddr)
                continue
            if not self._pmd_none(mm, haddr):
                continue
            vma = self._pmd_vma(mm, haddr)
            if vma is None or not vma_thp_allowed(machine._thp_enabled, vma.thp):
                if not write:
                    mm.pmd_table.add(haddr)  # the read maps the small zero page
                continue
            if not write and machine._thp_use_zero_page:
                mm.pmd_hzero.add(haddr)
                continue
            self._map_thp(mm, haddr, mm.fault_nid(vma, haddr))

    def _thp_zap(self, mm: Mm, start: int, end: int) -> None:
        """A zap of [start, end): a PMD range it covers whole is left with nothing
        (zap_huge_pmd(), or the empty page table freed: CONFIG_PT_RECLAIM); one it
        covers in part keeps a page table (a huge PMD is split)."""
        for haddr in pmd_ranges(start, end):
            if start <= haddr and haddr + HPAGE_PMD_SIZE <= end:
                mm.pmd_table.discard(haddr)
                mm.pmd_hzero.discard(haddr)
            elif haddr in mm.pmd_hzero or mm.present_in(haddr, haddr + HPAGE_PMD_SIZE):
                mm.pmd_hzero.discard(haddr)
                mm.pmd_table.add(haddr)

    def ksm_stat(self, every: bool = False) -> dict[str, int | bool]:
        """/proc/PID/ksm_stat as this kernel prints it; ``every``: every field the
        model keeps, whatever the kernel profile prints."""
        mm = self._live()
        rmap_items = mm.ksm_rmap_items + mm.ksm_stat_base[0]
        merging = mm.ksm_merging_pages + mm.ksm_stat_base[1]
        profit = (merging + mm.ksm_zero_pages) * PAGE_SIZE - rmap_items * SIZEOF_RMAP_ITEM
        stat: dict[str, int | bool] = {
            "ksm_rmap_items": rmap_items,
            "ksm_zero_pages": mm.ksm_zero_pages,
            "ksm_merging_pages": merging,
            "ksm_process_profit": profit,
            "ksm_merge_any": mm.mmf_vm_merge_any,
            "ksm_mergeable": any(vma.mergeable for vma in mm.vmas),
        }
        if every:
            return stat
        return {name: stat[name] for name in self._machine.profile.ksm_stat_fields}


@serialized
class KsmSysfs:
    """``m.ksm``: every sysfs file of /sys/kernel/mm/ksm/ as an attribute, plus ksmd."""

    __slots__ = ("_ksm", "_guard")
    _ksm: Ksm
    _guard: Guard

    def __init__(self, ksm: Ksm, guard: Guard) -> None:
        object.__setattr__(self, "_ksm", ksm)
        object.__setattr__(self, "_guard", guard)

    def __getattr__(self, name: str) -> int | str:
        if not name.startswith("_") and name in self._ksm.mem.profile.sysfs_files:
            return self._ksm.value(name)
        raise AttributeError(f"/sys/kernel/mm/ksm has no file {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self._ksm.mem.profile.sysfs_files:
            raise AttributeError(f"/sys/kernel/mm/ksm has no file {name!r}")
        self.sysfs_write(name, knob_text(value))

    def __dir__(self) -> list[str]:
        return [*self._ksm.mem.profile.sysfs_files, "sysfs_write", "sysfs_read", "do_scan",
                "do_scans", "scan", "stats"]

    def sysfs_write(self, name: str, text: str | bytes) -> None:
        self._ksm.store(name, text)

    def sysfs_read(self, name: str) -> str:
        """The file's contents as the kernel prints them (with the newline)."""
        check_file(name, write=False, files=self._ksm.mem.profile.sysfs_files)
        return format_sysfs(name, self._ksm.value(name))

    def do_scan(self, n: int) -> int:
        """One ksm_do_scan(n) if ksmd would run; the number of pages it processed."""
        ksm = self._ksm
        n = as_count(n, "do_scan's page count", U32_MAX)  # scan_npages is unsigned int
        check_clock(ksm.clock_ns + ksm.cost.batch(n), "the clock after this batch")
        if not ksm.ksmd_should_run():
            return 0
        return ksm.ksm_do_scan(n)

    def do_scans(self, n: int, count: int) -> np.ndarray:
        """``count`` ksm_do_scan(n) batches back to back (no sleeps between them), up to
        the one that ends a full scan; per batch: pages processed, pages_sharing,
        ksm_zero_pages and general_profit after it (ksmcore.api.BATCH_COLUMNS)."""
        ksm = self._ksm
        n = as_count(n, "do_scans' page count", U32_MAX)
        count = as_count(count, "do_scans' batch count", MAX_BATCHES)
        check_clock(ksm.clock_ns + count * ksm.cost.batch(n), "the clock after these batches")
        rows: list[list[int]] = []
        while len(rows) < count and ksm.ksmd_should_run():
            seqnr = ksm.ksm_scan.seqnr
            row = [ksm.ksm_do_scan(n)]
            row += [int(ksm.value(name, every=True)) for name in BATCH_COLUMNS[1:]]
            rows.append(row)
            if ksm.ksm_scan.seqnr != seqnr:
                break
        return np.array(rows, np.int64).reshape(len(rows), len(BATCH_COLUMNS))

    def scan(self, full_scans: int = 1) -> None:
        """Run ksmd batches of pages_to_scan until full_scans more full scans ended."""
        ksm = self._ksm
        full_scans = as_int(full_scans, "full_scans")
        if full_scans < 0:
            raise ValueError(f"full_scans must not be negative, not {full_scans}")
        # a full scan takes at least one batch: so many would pass ktime_t's range
        check_clock(ksm.clock_ns + full_scans * ksm.cost.batch_ns, "the clock after them")
        target = ksm.ksm_scan.seqnr + full_scans
        self._check_ksmd()
        while ksm.ksm_scan.seqnr < target:
            self._check_ksmd()  # a batch may have dropped the last mm_slot
            ksm.ksm_do_scan(int(ksm.knobs["pages_to_scan"]))

    def _check_ksmd(self) -> None:
        ksm = self._ksm
        if ksm.ksm_run != 1:
            raise KsmdNotRunning(f"run is {ksm.ksm_run}, not 1")
        if ksm.mm_list_empty():
            raise KsmdNotRunning("no mm is registered with KSM")
        if int(ksm.knobs["pages_to_scan"]) == 0:
            raise KsmdNotRunning("pages_to_scan is 0")

    def stats(self, every: bool = False) -> dict[str, int | str]:
        """Every file of this kernel's /sys/kernel/mm/ksm; ``every``: also the values
        the model keeps for files the kernel profile does not have."""
        if every:
            return {name: self._ksm.value(name, every=True) for name in SYSFS_FILES}
        return {name: self._ksm.value(name) for name in self._ksm.mem.profile.sysfs_files}

    def stable_nodes(self) -> list[dict[str, Any]]:
        """Every stable node naming a live KSM page: the trees by nid, in order (a
        chain's live dups in hlist order), then migrate_nodes in list order."""
        ksm = self._ksm
        frames = ksm.mem.frames

        def live(node: Any) -> bool:
            frame = frames[node.kpfn]
            return frame.allocated and frame.ksm and frame.stable_node is node

        def entry(node: Any, where: str) -> dict[str, Any]:
            return {"kpfn": node.kpfn, "nid": node.nid, "where": where,
                    "rmap_hlist_len": node.rmap_hlist_len}

        out: list[dict[str, Any]] = []
        for nid in range(ksm.mem.nodes):
            for node in cast(Iterable[StableNode], ksm.root_stable_tree[nid]):
                if node.is_chain():
                    dups = [d for d in node.dups if live(d)]
                    kpfns = [d.kpfn for d in dups]
                    out += [dict(entry(d, "dup"), chain=kpfns) for d in dups]
                elif live(node):
                    out.append(entry(node, "tree"))
        out += [entry(n, "migrate") for n in ksm.migrate_nodes if live(n)]
        return out

    def node_stats(self) -> dict[int, dict[str, int]]:
        """pages_shared and pages_sharing by the node each KSM page is on, counting
        every stable node with rmap_items as the global counters do (numastat)."""
        ksm = self._ksm
        out = {n: {"pages_shared": 0, "pages_sharing": 0} for n in range(ksm.mem.nodes)}
        nodes = [d for nid in range(ksm.mem.nodes)
                 for n in cast(Iterable[StableNode], ksm.root_stable_tree[nid])
                 for d in (n.dups if n.is_chain() else [n])] + list(ksm.migrate_nodes)
        for node in nodes:
            if node.rmap_hlist_len == 0:
                continue
            stats = out[ksm.mem.frames[node.kpfn].nid]
            stats["pages_shared"] += 1
            stats["pages_sharing"] += node.rmap_hlist_len - 1
        return out


@serialized
class Machine(SimulatedTime, ThpKnobs):
    """A machine: NUMA nodes of frames, processes, and KSM.

    Thread-safe: calls on one machine are serialized by its lock (ksmcore/guard.py)."""

    def __init__(self, nodes: int = 1, distances: Sequence[Sequence[int]] | None = None,
                 max_pages: int = MAX_PAGES, kernel: str | Profile | None = None) -> None:
        nodes = as_int(nodes, "nodes")
        if not 1 <= nodes <= 64:
            raise ksm_error(errno.EINVAL, f"nodes must be 1..64, not {nodes!r}")
        max_pages = as_int(max_pages, "max_pages")
        if max_pages < 1:
            raise ValueError(f"max_pages must be positive, not {max_pages}")
        self._guard = Guard()
        self.nodes = nodes
        self.max_pages = max_pages  # mmap beyond this many pages in all: ENOMEM
        self.distances = check_distances(nodes, distances)
        # the kernel whose KSM this is (ksmcore.profiles): the running one by default
        self.profile = resolve_profile(kernel)
        self._mem = PhysMem(nodes, self.distances, self.profile)
        self._ksm = Ksm(self._mem)
        self.ksm = KsmSysfs(self._ksm, self._guard)
        self.processes: list[Process] = []
        self._all_mms: list[Mm] = []
        self._next_pid = FIRST_PID
        self._thp_enabled = THP_ENABLED_DEFAULT
        self._thp_use_zero_page = THP_USE_ZERO_PAGE_DEFAULT

    # ---- simulated time: the API is ksmcore.simclock.SimulatedTime's -----------------

    def _clock_now(self) -> int:
        return self._ksm.clock_ns

    def _clock_move(self, ns: int) -> None:
        self._ksm.clock_ns = ns

    def _cost(self) -> CostModel:
        return self._ksm.cost

    def _set_cost(self, value: CostModel) -> None:
        self._ksm.cost = value

    def _cpu_ns(self) -> int:
        return self._ksm.ksmd_cpu_ns

    def _tracer(self) -> Tracer:
        return self._ksm.tracer

    def _scan_thread(self, ns: int) -> None:
        self._ksm.ksm_scan_thread(ns)

    def _new_process(self, mm: Mm) -> Process:
        mm.pid = self._next_pid
        p = Process(self, self._next_pid, mm)
        self._next_pid += 1
        self.processes.append(p)
        self._all_mms.append(mm)
        return p

    def spawn(self, node: int = 0) -> Process:
        """A new process with an empty address space, running on ``node``."""
        mm = Mm(self._mem, MMAP_BASE)
        mm.node = as_node(node, self.nodes)
        return self._new_process(mm)

    def pfn_to_nid(self, pfn: int) -> int:
        """The node of frame ``pfn``: the zero page (ZERO_PFN) or a frame in use; EINVAL
        for a free frame, whose node is an artefact of how each model grows memory."""
        pfn = as_int(pfn, "pfn")
        if pfn == ZERO_PFN:
            return 0
        frames = self._mem.frames
        if not 0 < pfn < len(frames) or not frames[pfn].allocated or frames[pfn].mapcount == 0:
            raise ksm_error(errno.EINVAL, f"page frame {pfn} is not in use")
        return frames[pfn].nid

    def migrate_page(self, pfn: int, node: int) -> int:
        """Move frame pfn to a new frame on node, as the migration core does (NUMA
        balancing, compaction): every mapping follows; returns the new pfn."""
        frames = self._mem.frames
        pfn = as_int(pfn, "pfn")
        if not 0 < pfn < len(frames) or not frames[pfn].allocated or frames[pfn].mapcount == 0:
            raise ksm_error(errno.EINVAL, f"page frame {pfn} is not in use")
        node = as_node(node, self.nodes)
        folio = frames[pfn].folio
        if folio is not None:
            self._mem.split_huge_page(folio)  # the model splits a huge page to move it
            if frames[pfn].mapcount == 0:
                raise ksm_error(errno.EINVAL, f"page frame {pfn} was zero-filled: the "
                                              "split mapped the zero page instead")
        return self._migrate(pfn, node)

    def _migrate(self, pfn: int, node: int) -> int:
        mem = self._mem
        old = mem.frames[pfn]
        new = mem.alloc(node)
        new.data[:] = old.data
        new.mapcount = old.mapcount
        for p in self.processes:  # remove_migration_ptes: every mapping follows
            for addr, mapped in p.mm.pte.items():
                if mapped == pfn:
                    p.mm.pte[addr] = new.pfn
        # folio_migrate_ksm(): the stable node follows the page; its nid does not
        new.ksm, new.stable_node = old.ksm, old.stable_node
        if new.stable_node is not None:
            new.stable_node.kpfn = new.pfn
            new.stable_node.migrated = True
        old.ksm, old.stable_node = False, None
        old.mapcount = 0
        mem.free(old)
        return new.pfn

    # ---- transparent huge pages (ksmcore.thp) -------------------------------------

    @property
    def thp_split_zero_pages(self) -> int:
        """Pages freed by splitting huge pages: PTEs that map the shared zero page
        because a split found their subpage zero-filled. Not a KSM counter (and not in
        ksm_zero_pages): ksmd never visits them again."""
        return self._mem.thp_split_zero_pages

    @property
    def thp_splits(self) -> int:
        """Huge pages split so far (by ksmd's merges, or to migrate a page of one)."""
        return self._mem.thp_splits

    @property
    def broken(self) -> BaseException | None:
        """Why this machine refuses every call (an earlier call failed half way), or None."""
        return self._guard.broken

    def check_invariants(self) -> None:
        """Raise AssertionError if the model's state is inconsistent."""
        self._all_mms = [mm for mm in self._all_mms
                         if not mm.exiting or mm.ksm_slot is not None]
        check_invariants(self._ksm, self._mem, self._all_mms)
