"""ksmd's scan: the cursor walk over mm_slots, smart scan, batches, registration.

Sections 3, 4, 9.3 and 9.6 of the algorithm reference, ported from mm/ksm.c.
"""

from __future__ import annotations

import bisect

from ..constants import KSM_RUN_UNMERGE, PAGE_SIZE, SKIP_MIN_AGE, ZERO_PFN
from .ksm_structs import MmSlot, RmapItem
from .merge import MergeOps
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


class ScanOps(MergeOps):
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
                if pfn == ZERO_PFN:
                    continue  # the zero page is not returned by the walk
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
        scan.seqnr += 1
        return None

    def ksm_do_scan(self, scan_npages: int) -> int:
        """One ksmd batch; returns how many items went through cmp_and_merge_page."""
        done = 0
        while scan_npages > 0:
            scan_npages -= 1
            found = self.scan_get_next_rmap_item()
            if found is None:
                break
            rmap_item, page = found
            self.cmp_and_merge_page(page, rmap_item)
            self.ksm_pages_scanned += 1
            done += 1
        return done

    # ---- registration -------------------------------------------------------------

    def __ksm_enter(self, mm: Mm) -> None:
        mm_slot = MmSlot(mm)
        mm.ksm_slot = mm_slot
        if self.ksm_run & KSM_RUN_UNMERGE:
            mm_slot.list_add_tail(self.ksm_mm_head)  # at the end of the list
        else:
            mm_slot.list_add_tail(self.ksm_scan.mm_slot)  # just behind the cursor
        mm.mmf_vm_mergeable = True

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

    def ksm_fork(self, mm: Mm, oldmm: Mm) -> None:
        """``ksm_fork``: a registered parent's child is registered too."""
        if oldmm.mmf_vm_mergeable:
            self.__ksm_enter(mm)

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
