"""The parts of the mm that KSM leans on: frames, VMAs, page tables and faults.

This follows docs/MODEL.md. A page-table entry is either the pfn of a frame,
``ZERO_PFN`` (0), a *KSM-placed* zero page, or ``SPLIT_ZERO_PFN``, the shared zero
page mapped by a huge page split to a zero-filled subpage (a read fault's small zero
page is not recorded: it is nothing KSM or a fault can tell from an empty PTE).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from ..constants import MPOL_DEFAULT, PAGE_SIZE, ZERO_PFN
from ..numa import policy_node
from ..thp import HPAGE_PMD_NR

if TYPE_CHECKING:
    from ..profiles import Profile
    from .ksm_structs import MmSlot, StableNode

PAGE_MASK = ~(PAGE_SIZE - 1)
_ZERO_BYTES = bytes(PAGE_SIZE)
SPLIT_ZERO_PFN = -1  # a PTE value: the zero page, mapped by a huge page split


class Folio:
    """A PMD-sized anonymous folio (THP): ``frames[k]`` is subpage k. ``maps`` holds
    (mm, address of subpage 0) for every mm that mapped it (stale entries are harmless:
    a subpage counts as mapped there only while the PTE still names it)."""

    __slots__ = ("frames", "maps", "image")

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self.maps: list[tuple[Mm, int]] = []
        # the engine maps an image's pages in place and copies one on write: a
        # written page leaves the huge page (a small copy replaces it)
        self.image = False

    def add_map(self, mm: Mm, haddr: int) -> None:
        if not any(m is mm and a == haddr for m, a in self.maps):
            self.maps.append((mm, haddr))

    def shared(self) -> bool:
        """Mapped by another mm too: a subpage with more than one mapping."""
        return any(f.mapcount > 1 for f in self.frames)


class Frame:
    """A page frame (``struct page``/small folio).

    ``ksm`` is folio_test_ksm(); ``stable_node`` is the node its mapping points to,
    which may be None on a KSM frame (folio_set_stable_node(folio, NULL) while a
    merge is in progress, or after a failed second half of try_to_merge_two_pages).
    ``nid`` is fixed per pfn, like pfn_to_nid(), and survives freeing.
    """

    __slots__ = ("pfn", "nid", "data", "mapcount", "allocated", "ksm", "stable_node",
                 "folio", "subpage")

    def __init__(self, pfn: int, nid: int) -> None:
        self.pfn = pfn
        self.nid = nid
        self.data: bytearray = bytearray(PAGE_SIZE) if pfn == ZERO_PFN else bytearray()
        self.mapcount = 0
        self.allocated = pfn == ZERO_PFN
        self.ksm = False
        self.stable_node: StableNode | None = None
        self.folio: Folio | None = None  # the large folio it is a subpage of
        self.subpage = 0

    def folio_stable_node(self) -> StableNode | None:
        """``folio_stable_node``: the KSM node, or None if not KSM (or KSM with no node)."""
        return self.stable_node if self.ksm else None


class PhysMem:
    """All frames, with one LIFO free list per NUMA node, and the global
    ``ksm_zero_pages`` atomic (the zap and COW paths of the mm update it)."""

    def __init__(self, nodes: int, distances: list[list[int]], profile: Profile) -> None:
        self.nodes = nodes
        self.distances = distances
        self.profile = profile  # the kernel version whose KSM this is
        self.frames: list[Frame] = [Frame(ZERO_PFN, 0)]
        self.free_lists: list[list[int]] = [[] for _ in range(nodes)]
        self.ksm_zero_pages = 0
        self.thp_split_zero_pages = 0  # SPLIT_ZERO_PFN entries of every mm
        self.thp_splits = 0

    @property
    def zero_frame(self) -> Frame:
        return self.frames[ZERO_PFN]

    def alloc(self, nid: int) -> Frame:
        """A zeroed frame on node nid (mapcount 0: the caller maps it)."""
        free = self.free_lists[nid]
        if free:
            frame = self.frames[free.pop()]
        else:
            frame = Frame(len(self.frames), nid)
            self.frames.append(frame)
        frame.data = bytearray(PAGE_SIZE)
        frame.allocated = True
        frame.mapcount = 0
        frame.ksm = False
        frame.stable_node = None
        return frame

    def free(self, frame: Frame) -> None:
        """Free a frame whose last mapping went: its KSM mark goes with it, so its
        stable node (if any) becomes stale."""
        assert frame.pfn != ZERO_PFN and frame.allocated and frame.mapcount == 0
        frame.allocated = False
        frame.ksm = False
        frame.stable_node = None
        frame.data = bytearray()
        self.free_lists[frame.nid].append(frame.pfn)

    def put_mapping(self, frame: Frame) -> None:
        """Drop one PTE's mapping of frame, freeing it when none remain. A subpage of
        a large folio stays until no subpage of the folio is mapped."""
        frame.mapcount -= 1
        folio = frame.folio
        if folio is not None:
            if frame.mapcount == 0 and not any(f.mapcount for f in folio.frames):
                for f in folio.frames:
                    f.folio = None
                    self.free(f)
            return
        if frame.mapcount == 0:
            self.free(frame)

    def alloc_thp(self, nid: int) -> Folio:
        """A zeroed PMD-sized folio on node nid (its frames unmapped)."""
        frames = [self.alloc(nid) for _ in range(HPAGE_PMD_NR)]
        folio = Folio(frames)
        for k, f in enumerate(frames):
            f.folio = folio
            f.subpage = k
        return folio

    def split_huge_page(self, folio: Folio) -> None:
        """split_huge_page() with RMP_USE_SHARED_ZEROPAGE: every mapping of a
        zero-filled subpage becomes the shared zero page; the other subpages stay
        mapped as small pages; subpages mapped nowhere are freed."""
        self.thp_splits += 1
        zero = [f.mapcount > 0 and f.data == _ZERO_BYTES for f in folio.frames]
        for mm, haddr in folio.maps:
            for k, f in enumerate(folio.frames):
                addr = haddr + k * PAGE_SIZE
                if zero[k] and mm.pte.get(addr) == f.pfn:
                    mm.pte[addr] = SPLIT_ZERO_PFN
                    mm.thp_split_zero_pages += 1
                    self.thp_split_zero_pages += 1
                    f.mapcount -= 1
        for f in folio.frames:
            f.folio = None
            if f.mapcount == 0:
                data = f.data
                self.free(f)
                f.data = data  # ksmd still holds the page it scans: its contents stay


class Vma:
    """A private anonymous VMA. ``nid``: the node it is bound to (mmap(node=k)), or None
    when the process's memory policy decides."""

    __slots__ = ("start", "end", "mergeable", "nid", "thp")

    def __init__(self, start: int, end: int, mergeable: bool, nid: int | None,
                 thp: int = 0) -> None:
        self.start = start
        self.end = end
        self.mergeable = mergeable
        self.nid = nid
        self.thp = thp  # VM_HUGEPAGE / VM_NOHUGEPAGE (ksmcore.thp), 0 for neither

    def copy(self, start: int | None = None, end: int | None = None) -> Vma:
        return Vma(self.start if start is None else start,
                   self.end if end is None else end, self.mergeable, self.nid, self.thp)


class Mm:
    """``struct mm_struct``: VMAs, the page table and the per-mm KSM counters.

    ``pte`` maps a page address to a pfn (ZERO_PFN = KSM zero PTE); ``pte_addrs`` is
    the same key set kept sorted, so ksmd can jump over holes (as 6.18's
    walk_page_range_vma does) without probing every address.
    """

    def __init__(self, mem: PhysMem, next_addr: int) -> None:
        self.mem = mem
        self.vmas: list[Vma] = []  # sorted by start, never overlapping
        self.pte: dict[int, int] = {}
        self.pte_addrs: list[int] = []
        self.next_addr = next_addr
        self.node = 0  # the home node of the process (where MPOL_DEFAULT allocates)
        self.mempolicy: tuple[int, tuple[int, ...]] = (MPOL_DEFAULT, ())
        self.exiting = False  # mm_users == 0 (ksm_test_exit)
        self.pid = 0  # the owning process (tracepoints name an mm by it)
        # KSM state of the mm
        self.mmf_vm_mergeable = False
        self.mmf_vm_merge_any = False
        self.ksm_slot: MmSlot | None = None  # mm_slots_hash lookup
        self.ksm_rmap_items = 0
        self.ksm_merging_pages = 0
        # what ksm_stat adds to them: before 6.6 (profiles) a forked mm starts from
        # its parent's counts (dup_mm() copies them)
        self.ksm_stat_base = (0, 0)
        self.ksm_zero_pages = 0
        # transparent huge pages: PMD ranges (by address) with a page table but no
        # page KSM could see, those mapping the huge zero page, and the pages freed by
        # splitting (SPLIT_ZERO_PFN entries)
        self.pmd_table: set[int] = set()
        self.pmd_hzero: set[int] = set()
        self.thp_split_zero_pages = 0

    # ---- VMAs -------------------------------------------------------------------

    def find_vma_index(self, addr: int) -> int:
        """Index of the first VMA whose end is above addr (vma_iter_init / find_vma)."""
        lo, hi = 0, len(self.vmas)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.vmas[mid].end <= addr:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def vma_lookup(self, addr: int) -> Vma | None:
        i = self.find_vma_index(addr)
        if i < len(self.vmas) and self.vmas[i].start <= addr:
            return self.vmas[i]
        return None

    def range_mapped(self, start: int, end: int) -> bool:
        """True if every byte of [start, end) lies in some VMA."""
        addr = start
        i = self.find_vma_index(addr)
        while addr < end:
            if i >= len(self.vmas) or self.vmas[i].start > addr:
                return False
            addr = self.vmas[i].end
            i += 1
        return True

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        """The VMAs overlapping [start, end), in address order."""
        out = []
        i = self.find_vma_index(start)
        while i < len(self.vmas) and self.vmas[i].start < end:
            out.append(self.vmas[i])
            i += 1
        return out

    def split_vma(self, vma: Vma, addr: int) -> None:
        """Split vma at addr (start < addr < end) into two VMAs sharing its flags."""
        assert vma.start < addr < vma.end
        i = self.vmas.index(vma)
        tail = vma.copy(start=addr)
        vma.end = addr
        self.vmas.insert(i + 1, tail)

    def isolate(self, start: int, end: int) -> list[Vma]:
        """Split VMAs at start and end; return the VMAs now exactly covering the
        mapped parts of [start, end)."""
        for vma in self.vmas_in(start, end):
            if vma.start < start < vma.end:
                self.split_vma(vma, start)
        for vma in self.vmas_in(start, end):
            if vma.start < end < vma.end:
                self.split_vma(vma, end)
        return self.vmas_in(start, end)

    # ---- page table -------------------------------------------------------------

    def present_in(self, start: int, end: int) -> list[int]:
        """Addresses in [start, end) with a PTE (frames and KSM zero PTEs), sorted."""
        lo = bisect.bisect_left(self.pte_addrs, start)
        hi = bisect.bisect_left(self.pte_addrs, end)
        return self.pte_addrs[lo:hi]

    def set_pte(self, addr: int, pfn: int) -> None:
        if addr not in self.pte:
            bisect.insort(self.pte_addrs, addr)
        self.pte[addr] = pfn

    def zap_pte(self, addr: int) -> None:
        """Drop the mapping at addr (ksm_might_unmap_zero_page for a KSM zero PTE)."""
        pfn = self.pte.pop(addr)
        i = bisect.bisect_left(self.pte_addrs, addr)
        del self.pte_addrs[i]
        self._unmap_pfn(pfn)

    def _unmap_pfn(self, pfn: int) -> None:
        if pfn == ZERO_PFN:
            self.ksm_zero_pages -= 1
            self.mem.ksm_zero_pages -= 1
        elif pfn == SPLIT_ZERO_PFN:
            self.thp_split_zero_pages -= 1
            self.mem.thp_split_zero_pages -= 1
        else:
            self.mem.put_mapping(self.mem.frames[pfn])

    def zap_range(self, start: int, end: int) -> None:
        lo = bisect.bisect_left(self.pte_addrs, start)
        hi = bisect.bisect_left(self.pte_addrs, end)
        for addr in self.pte_addrs[lo:hi]:
            self._unmap_pfn(self.pte.pop(addr))
        del self.pte_addrs[lo:hi]

    def frame_at(self, addr: int) -> Frame | None:
        """The frame mapped at addr, or None (not present, or a KSM zero PTE)."""
        pfn = self.pte.get(addr)
        if pfn is None or pfn <= ZERO_PFN:
            return None
        return self.mem.frames[pfn]

    # ---- faults -----------------------------------------------------------------

    def fault_nid(self, vma: Vma, addr: int) -> int:
        """The node a fault at addr allocates on: the VMA's binding, else the policy."""
        if vma.nid is not None:
            return vma.nid
        mode, nodes = self.mempolicy
        return policy_node(mode, nodes, self.node, self.mem.distances, addr)

    def _replace_with_new_frame(self, addr: int, vma: Vma, copy_from: Frame | None) -> Frame:
        """wp_page_copy: map a new frame (a copy, or zeroed) at addr instead of what was there."""
        new = self.mem.alloc(self.fault_nid(vma, addr))
        if copy_from is not None:
            new.data[:] = copy_from.data
        new.mapcount = 1
        old = self.pte[addr]
        self.pte[addr] = new.pfn
        self._unmap_pfn(old)
        return new

    def write_fault(self, addr: int, vma: Vma, nid: int | None = None) -> Frame:
        """Make the page at addr privately writable (MODEL.md's write fault); return it.
        ``nid`` overrides where a new page goes (mmap_image puts a whole image on one node)."""
        pfn = self.pte.get(addr)
        if pfn is None:
            frame = self.mem.alloc(self.fault_nid(vma, addr) if nid is None else nid)
            frame.mapcount = 1
            self.set_pte(addr, frame.pfn)
            return frame
        if pfn <= ZERO_PFN:
            return self._replace_with_new_frame(addr, vma, None)
        frame = self.mem.frames[pfn]
        folio = frame.folio
        huge_cow = folio is not None and (folio.shared() or folio.image)
        if frame.ksm or frame.mapcount > 1 or huge_cow:
            # KSM frames are never reused in place; COW-shared ones are copied (a
            # subpage of a huge page mapped by another mm too: 4 KiB, after
            # do_huge_pmd_wp_page() split the PMD).
            return self._replace_with_new_frame(addr, vma, frame)
        return frame

    def break_ksm(self, vma: Vma, addr: int) -> None:
        """``break_ksm``: an unshare fault on a KSM frame or KSM zero PTE at addr."""
        pfn = self.pte.get(addr)
        if pfn is None or pfn == SPLIT_ZERO_PFN:
            return
        if pfn == ZERO_PFN:
            if self.mem.profile.has("unshare_zero_pages"):  # before 6.6 it stays mapped
                self._replace_with_new_frame(addr, vma, None)
            return
        frame = self.mem.frames[pfn]
        if frame.ksm:
            self._replace_with_new_frame(addr, vma, frame)
