"""ksmd's scan: the cursor walk over mm_slots, smart scan, batches, registration,
and ksmd's thread loop on the simulated clock.

Ported from mm/ksm.c: scan_get_next_rmap_item, should_skip_rmap_item (smart scan),
ksm_do_scan, ksm_scan_thread, __ksm_enter and __ksm_exit.
"""

from __future__ import annotations

import bisect

from ..constants import KSM_RUN_UNMERGE, PAGE_SIZE, SKIP_MIN_AGE, ZERO_PFN
from ..scan_thread import ksm_scan_thread
from ..tracing import scan_event
from .advisor import AdvisorOps
from .ksm_structs import MmSlot, RmapItem
from .mm import PAGE_MASK, Frame, Mm


def skip_age(age: int) -> int:
    """How many scans a page of this age may be skipped."""
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


class ScanOps(AdvisorOps):
    """scan_get_next_rmap_item, ksm_do_scan and the mm_slot list."""

    # ---- smart scan ---------------------------------------------------------------

    def should_skip_rmap_item(self, folio: Frame, rmap_item: RmapItem) -> bool:
        if not self.knobs["smart_scan"]:
            return False
        if folio.ksm:
            return False  # KSM pages are never skipped; age untouched
        age = rmap_item.age
        if age != 0xFF:
            rmap_item.age += 1  # saturating u8, never reset
        if age < SKIP_MIN_AGE:
            return False
        if rmap_item.remaining_skips == 0:
            rmap_item.remaining_skips = skip_age(age)
            return False
        self.ksm_pages_skipped += 1
        rmap_item.remaining_skips -= 1
        self.remove_rmap_item_from_tree(rmap_item)
        return True

    # ---- rmap_list ----------------------------------------------------------------

    def get_next_rmap_item(
        self, mm_slot: MmSlot, link: MmSlot | RmapItem, addr: int
    ) -> RmapItem:
        """The item for addr at ``*link``, freeing items of pages that disappeared
        before it; a new zeroed item linked at ``*link`` if none matches."""
        while link.rmap_list is not None:
            rmap_item = link.rmap_list
            if rmap_item.address & PAGE_MASK == addr:
                return rmap_item
            if rmap_item.address > addr:
                break
            link.rmap_list = rmap_item.rmap_list
            self.remove_rmap_item_from_tree(rmap_item)
            self.free_rmap_item(rmap_item)
        rmap_item = self.alloc_rmap_item()
        mm = mm_slot.mm
        assert mm is not None
        rmap_item.mm = mm
        mm.ksm_rmap_items += 1
        rmap_item.address = addr
        rmap_item.rmap_list = link.rmap_list
        link.rmap_list = rmap_item
        return rmap_item

    # ---- the scan -----------------------------------------------------------------

    def _remove_mm_slot(self, mm_slot: MmSlot) -> None:
        """hash_del + list_del + free, and clear MMF_VM_MERGEABLE (6.18 keeps
        MMF_VM_MERGE_ANY when ksmd drops a slot)."""
        mm = mm_slot.mm
        assert mm is not None
        mm_slot.list_del()
        mm.ksm_slot = None
        mm.mmf_vm_mergeable = False
        if not self.mem.profile.has("merge_any_kept"):
            mm.mmf_vm_merge_any = False

    def _scan_mm(self, mm_slot: MmSlot, mm: Mm) -> tuple[RmapItem, Frame] | None:
        """Resume the walk of mm's mergeable VMAs at ksm_scan.address; return the
        next present anonymous page's item unless smart scan skips it."""
        scan = self.ksm_scan
        vi = mm.find_vma_index(scan.address)
        while vi < len(mm.vmas):
            vma = mm.vmas[vi]
            vi += 1
            if not vma.mergeable:
                continue
            if scan.address < vma.start:
                scan.address = vma.start
            # Jump from present PTE to present PTE (walk_page_range_vma in 6.18).
            addrs = mm.pte_addrs
            i = bisect.bisect_left(addrs, scan.address)
            while i < len(addrs) and addrs[i] < vma.end:
                addr = addrs[i]
                i += 1
                pfn = mm.pte[addr]
                if pfn <= ZERO_PFN:
                    continue  # the zero page (KSM's, or a split's) is not returned by the walk
                page = self.mem.frames[pfn]
                scan.address = addr
                rmap_item = self.get_next_rmap_item(mm_slot, scan.rmap_list, addr)
                scan.rmap_list = rmap_item
                scan.address = addr + PAGE_SIZE
                if self.should_skip_rmap_item(page, rmap_item):
                    continue
                return rmap_item, page
            scan.address = vma.end
        return None

    def scan_get_next_rmap_item(self) -> tuple[RmapItem, Frame] | None:
        """The next (rmap_item, page) for ksmd, or None at the end of a full scan."""
        if self.mm_list_empty():
            return None
        scan = self.ksm_scan
        mm_slot = scan.mm_slot
        if mm_slot is self.ksm_mm_head:
            # ---- start of a new full scan ----
            self.advisor_start_scan()
            if self.tracer.active:
                self.tracer.emit(scan_event("ksm_start_scan", scan.seqnr, self.ksm_rmap_items))
            if not self.ksm_merge_across_nodes:
                for stable_node in list(self.migrate_nodes):
                    self.ksm_get_folio(stable_node)  # prunes stale nodes
            # The kernel resets nid < ksm_nr_node_ids only; a root left over from an
            # earlier merge_across_nodes=0 period then dangles, and a later switch
            # back to 0 would walk freed items. Resetting every root is the same on
            # every path that does not read freed memory.
            for nid in range(self.nr_node_ids):
                self.root_unstable_tree[nid].rb_node = None
            mm_slot = mm_slot.next
            scan.mm_slot = mm_slot
            if mm_slot is self.ksm_mm_head:
                return None
            scan.address = 0
            scan.rmap_list = mm_slot

        while True:  # next_mm:
            mm = mm_slot.mm
            assert mm is not None
            if not mm.exiting:
                found = self._scan_mm(mm_slot, mm)
                if found is not None:
                    return found
            if mm.exiting:  # no_vmas:
                scan.address = 0
                scan.rmap_list = mm_slot
            # Nuke the items above the cursor: no mergeable VMA holds them.
            self.remove_trailing_rmap_items(scan.rmap_list)
            scan.mm_slot = mm_slot.next
            if scan.address == 0:
                # A whole pass found no VM_MERGEABLE VMA (or the mm is exiting).
                self._remove_mm_slot(mm_slot)
            mm_slot = scan.mm_slot
            if mm_slot is not self.ksm_mm_head:
                scan.address = 0
                scan.rmap_list = mm_slot
                continue
            break
        self.advisor_stop_scan()
        if self.tracer.active:
            self.tracer.emit(scan_event("ksm_stop_scan", scan.seqnr, self.ksm_rmap_items))
        scan.seqnr += 1
        return None

    def ksm_do_scan(self, scan_npages: int) -> int:
        """One ksmd batch; returns how many items went through cmp_and_merge_page.

        The batch's overhead is charged to the clock and to ksmd's CPU time first;
        each processed page then costs cost.page_ns, which ktime_get() sees at once
        and the clock takes at the end (so jiffies stay put within a batch)."""
        self.charge_ksmd(self.cost.batch_ns)
        self.batch_pages = 0
        while scan_npages > 0:
            scan_npages -= 1
            found = self.scan_get_next_rmap_item()
            if found is None:
                break
            rmap_item, page = found
            self.cmp_and_merge_page(page, rmap_item)
            self.ksm_pages_scanned += 1
            self.batch_pages += 1
        done = self.batch_pages
        self.batch_pages = 0
        self.charge_ksmd(done * self.cost.page_ns)
        return done

    def charge_ksmd(self, ns: int) -> None:
        """ksmd worked for ns: the clock and its CPU time move on together."""
        self.clock_ns += ns
        self.ksmd_cpu_ns += ns

    def ksm_scan_thread(self, duration_ns: int) -> None:
        """ksm_scan_thread() for duration_ns of simulated time (ksmcore.scan_thread)."""
        ksm_scan_thread(self, duration_ns)

    # ---- registration -------------------------------------------------------------

    def __ksm_enter(self, mm: Mm) -> None:
        mm_slot = MmSlot(mm)
        mm.ksm_slot = mm_slot
        if self.ksm_run & KSM_RUN_UNMERGE:
            mm_slot.list_add_tail(self.ksm_mm_head)  # at the end of the list
        else:
            mm_slot.list_add_tail(self.ksm_scan.mm_slot)  # just behind the cursor
        mm.mmf_vm_mergeable = True
        if self.tracer.active:
            self.tracer.emit({"event": "ksm_enter", "mm": mm.pid})

    def ksm_enter(self, mm: Mm) -> None:
        """__ksm_enter, for a not yet registered mm."""
        assert not mm.mmf_vm_mergeable
        self.__ksm_enter(mm)

    def ksm_exit(self, mm: Mm) -> None:
        """``ksm_exit`` (only for a registered mm) then ``__ksm_exit``."""
        if not mm.mmf_vm_mergeable:
            return
        mm_slot = mm.ksm_slot
        if mm_slot is not None and self.ksm_scan.mm_slot is not mm_slot:
            if mm_slot.rmap_list is None:
                mm_slot.list_del()
                mm.ksm_slot = None
                mm.mmf_vm_merge_any = False
                mm.mmf_vm_mergeable = False
            else:
                # Let ksmd free the items next.
                mm_slot.list_del()
                mm_slot.list_add(self.ksm_scan.mm_slot)
        if self.tracer.active:
            self.tracer.emit({"event": "ksm_exit", "mm": mm.pid})

    def ksm_fork(self, mm: Mm, oldmm: Mm) -> None:
        """``ksm_fork``: a registered parent's child is registered too."""
        if oldmm.mmf_vm_mergeable:
            self.__ksm_enter(mm)

    def ksm_execve(self, mm: Mm) -> None:
        """``ksm_execve``: the new mm of an exec keeps MMF_VM_MERGE_ANY (it is in
        MMF_INIT_MASK) and is entered with KSM. Before 6.7 the flag does not survive
        exec; 6.7-6.9 keep it without entering the mm."""
        profile = self.mem.profile
        if not profile.has("merge_any_exec"):
            mm.mmf_vm_merge_any = False
        elif mm.mmf_vm_merge_any and profile.has("ksm_execve"):
            self.__ksm_enter(mm)

    def ksm_vma_flags(self, mm: Mm) -> bool:
        """``ksm_vma_flags`` (6.17+): whether a new VMA of mm is VM_MERGEABLE from
        its creation; 6.18 re-enters an mm whose slot ksmd dropped meanwhile."""
        if not mm.mmf_vm_merge_any:
            return False
        if not mm.mmf_vm_mergeable and self.mem.profile.has("merge_any_kept"):
            self.__ksm_enter(mm)
        return True

    # ---- prctl(PR_SET_MEMORY_MERGE) ------------------------------------------------

    def ksm_enable_merge_any(self, mm: Mm) -> None:
        if mm.mmf_vm_merge_any:
            return
        if not mm.mmf_vm_mergeable:
            self.__ksm_enter(mm)
        mm.mmf_vm_merge_any = True
        self.ksm_add_vmas(mm)

    @staticmethod
    def ksm_add_vmas(mm: Mm) -> None:
        """Every compatible VMA becomes VM_MERGEABLE (all of the model's are)."""
        for vma in mm.vmas:
            vma.mergeable = True

    def ksm_del_vmas(self, mm: Mm) -> None:
        for vma in mm.vmas:
            if not vma.mergeable:
                continue
            self.unmerge_ksm_pages(mm, vma, vma.start, vma.end)
            vma.mergeable = False

    def ksm_disable_merge_any(self, mm: Mm) -> None:
        """Unmerge and clear every VM_MERGEABLE VMA (madvised ones too); the mm stays
        registered. Unmerging cannot fail in the model (no signals, no OOM)."""
        if not mm.mmf_vm_merge_any:
            return
        self.ksm_del_vmas(mm)
        mm.mmf_vm_merge_any = False

    # ---- run = 2 ------------------------------------------------------------------

    def unmerge_and_remove_all_rmap_items(self) -> None:
        """Unshare every KSM page of every mergeable VMA, free every rmap_item,
        free exiting mms' slots, remove the stable nodes, and reset full_scans."""
        scan = self.ksm_scan
        scan.mm_slot = self.ksm_mm_head.next
        while scan.mm_slot is not self.ksm_mm_head:
            mm_slot = scan.mm_slot
            mm = mm_slot.mm
            assert mm is not None
            if not mm.exiting:
                for vma in list(mm.vmas):
                    if vma.mergeable:
                        self.unmerge_ksm_pages(mm, vma, vma.start, vma.end)
            self.remove_trailing_rmap_items(mm_slot)
            scan.mm_slot = mm_slot.next
            if mm.exiting:
                mm_slot.list_del()
                mm.ksm_slot = None
                mm.mmf_vm_mergeable = False
                mm.mmf_vm_merge_any = False
        self.remove_all_stable_nodes()  # busy pages are ignored here
        scan.seqnr = 0
