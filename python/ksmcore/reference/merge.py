"""Merging: rmap_item removal, the unstable tree, and cmp_and_merge_page.

Ported from mm/ksm.c: remove_rmap_item_from_tree, unstable_tree_search_insert,
try_to_merge_one_page, try_to_merge_with_ksm_page, try_to_merge_two_pages and
cmp_and_merge_page.
"""

from __future__ import annotations

from ..constants import SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG, ZERO_CHECKSUM
from .ksm_structs import HEAD_MIGRATE, MmSlot, RmapItem
from .mm import PAGE_MASK, Frame, Mm, Vma
from .rbtree import RbNode, rb_erase, rb_insert_color, rb_link_node
from .stable_tree import StableTreeOps
from .state import calc_checksum, memcmp_pages

EFAULT = -14


class MergeOps(StableTreeOps):
    """cmp_and_merge_page and everything it calls outside the stable tree."""

    # ---- leaving the trees --------------------------------------------------------

    def remove_rmap_item_from_tree(self, rmap_item: RmapItem) -> None:
        """Take an item out of the stable or unstable tree it is in (if any)."""
        if rmap_item.address & STABLE_FLAG:
            stable_node = rmap_item.head
            assert stable_node is not None
            if self.ksm_get_folio(stable_node) is None:
                return  # the stale node was removed together with this item
            self.hlist_del(rmap_item)
            if stable_node.hlist_first is not None:
                self.ksm_pages_sharing -= 1
            else:
                self.ksm_pages_shared -= 1
            assert rmap_item.mm is not None
            rmap_item.mm.ksm_merging_pages -= 1
            assert stable_node.rmap_hlist_len > 0
            stable_node.rmap_hlist_len -= 1
            rmap_item.head = None
            rmap_item.address &= PAGE_MASK
        elif rmap_item.address & UNSTABLE_FLAG:
            # Only an item inserted during this scan is still in the (reset) tree.
            age = (self.ksm_scan.seqnr - rmap_item.address) & 0xFF
            assert age <= 1, "unstable rmap_item older than one scan"
            if age == 0:
                rb_erase(rmap_item, self.root_unstable_tree[rmap_item.nid])
            self.ksm_pages_unshared -= 1
            rmap_item.address &= PAGE_MASK

    def remove_trailing_rmap_items(self, link: MmSlot | RmapItem) -> None:
        """Free every item from ``*link`` to the end of the mm's list."""
        while link.rmap_list is not None:
            rmap_item = link.rmap_list
            link.rmap_list = rmap_item.rmap_list
            self.remove_rmap_item_from_tree(rmap_item)
            self.free_rmap_item(rmap_item)

    # ---- merging one page ---------------------------------------------------------

    def write_protect_page(self, mm: Mm, addr: int, page: Frame) -> bool:
        """``write_protect_page``: fails for a KSM folio (page_address_in_vma finds no
        anon_vma for it) or a page not mapped at addr; the model has no extra
        references, so the refcount check always passes."""
        if page.ksm:
            return False
        return mm.pte.get(addr) == page.pfn

    def replace_page(self, mm: Mm, addr: int, page: Frame, kpage: Frame) -> None:
        """``replace_page``: point the PTE at kpage (or a KSM zero PTE), drop page."""
        if kpage.pfn != 0:
            kpage.mapcount += 1
            mm.pte[addr] = kpage.pfn
        else:
            mm.pte[addr] = 0  # pte_mkdirty(pte_mkspecial(zero pfn))
            mm.ksm_zero_pages += 1  # ksm_map_zero_page
            self.mem.ksm_zero_pages += 1
        self.mem.put_mapping(page)

    def try_to_merge_one_page(
        self, vma: Vma, mm: Mm, addr: int, page: Frame, kpage: Frame | None,
        pinned_twice: bool = False,
    ) -> int:
        """Merge page (mapped at mm/addr) into kpage, or make page a KSM page if kpage
        is None. 0 on success, -EFAULT otherwise."""
        if page is kpage:  # ksm page forked
            return 0
        # Not anonymous, folio trylock: cannot fail in the model.
        if page.folio is not None:
            # split_huge_page() fails while ksmd holds two references to the folio
            # (the scanned page and the tree page are subpages of one THP)
            if pinned_twice:
                return EFAULT
            self.mem.split_huge_page(page.folio)
        if not self.write_protect_page(mm, addr, page):
            return EFAULT
        if kpage is None:
            page.ksm = True
            page.stable_node = None  # folio_set_stable_node(folio, NULL)
            return 0
        if page.data == kpage.data:  # pages_identical
            self.replace_page(mm, addr, page, kpage)
            return 0
        return EFAULT

    def try_to_merge_with_zero_page(self, rmap_item: RmapItem, page: Frame) -> int:
        """0 if merged with the zero page (or the VMA went), -EFAULT to go on."""
        if self.knobs["use_zero_pages"] and rmap_item.oldchecksum == ZERO_CHECKSUM:
            mm = rmap_item.mm
            assert mm is not None
            addr = rmap_item.address & PAGE_MASK
            vma = self.find_mergeable_vma(mm, addr)
            if vma is not None:
                zero = self.mem.zero_frame
                err = self.try_to_merge_one_page(vma, mm, addr, page, zero)
                if self.tracer.active:
                    self.tracer.emit({"event": "ksm_merge_one_page", "pfn": zero.pfn,
                                      "rmap_item": self.rmap_item_id(rmap_item),
                                      "mm": mm.pid, "err": err})
                return err
            return 0  # the VMA is out of date: nothing more to do
        return EFAULT

    def try_to_merge_with_ksm_page(
        self, rmap_item: RmapItem, page: Frame, kpage: Frame | None,
        pinned_twice: bool = False,
    ) -> int:
        mm = rmap_item.mm
        assert mm is not None
        addr = rmap_item.address & PAGE_MASK
        err = EFAULT
        vma = self.find_mergeable_vma(mm, addr)
        if vma is not None:
            err = self.try_to_merge_one_page(vma, mm, addr, page, kpage, pinned_twice)
            if not err:
                # Unstable nid is in union with stable anon_vma: remove first.
                self.remove_rmap_item_from_tree(rmap_item)
        if self.tracer.active:  # traced on every outcome, after the removal
            self.tracer.emit({"event": "ksm_merge_with_ksm_page",
                              "ksm_page": None if kpage is None else kpage.pfn,
                              "pfn": (page if kpage is None else kpage).pfn,
                              "rmap_item": self.rmap_item_id(rmap_item),
                              "mm": mm.pid, "err": err})
        return err

    def try_to_merge_two_pages(
        self, rmap_item: RmapItem, page: Frame, tree_rmap_item: RmapItem, tree_page: Frame
    ) -> Frame | None:
        """The *scanned* page becomes the KSM page; the tree item's PTE is moved to it."""
        same = page.folio is not None and page.folio is tree_page.folio
        err = self.try_to_merge_with_ksm_page(rmap_item, page, None, same)
        if not err:
            err = self.try_to_merge_with_ksm_page(tree_rmap_item, tree_page, page)
            if err:
                # A KSM page with only one PTE pointing to it: break it.
                self.break_cow(rmap_item)
        return None if err else page

    # ---- the unstable tree --------------------------------------------------------

    def unstable_tree_search_insert(
        self, rmap_item: RmapItem, page: Frame
    ) -> tuple[RmapItem, Frame] | None:
        """Find an identical page in the unstable tree, else insert rmap_item."""
        nid = self.get_kpfn_nid(page.pfn)
        root = self.root_unstable_tree[nid]
        parent: RmapItem | None = None
        left = False
        cur: RbNode | None = root.rb_node
        while cur is not None:
            assert isinstance(cur, RmapItem)
            tree_rmap_item = cur
            tree_page = self.get_mergeable_page(tree_rmap_item)
            if tree_page is None:
                return None  # stale tree entry: give up, not inserted
            if tree_page is page:
                return None  # don't substitute a ksm page for a forked page
            ret = memcmp_pages(page, tree_page)
            parent = tree_rmap_item
            if ret < 0:
                cur, left = parent.rb_left, True
            elif ret > 0:
                cur, left = parent.rb_right, False
            elif not self.ksm_merge_across_nodes and tree_page.nid != nid:
                # Migrated to another node: compare with it, never merge with it.
                return None
            else:
                return tree_rmap_item, tree_page

        rmap_item.address |= UNSTABLE_FLAG
        rmap_item.address |= self.ksm_scan.seqnr & SEQNR_MASK
        rmap_item.nid = nid
        rb_link_node(rmap_item, parent, left, root)
        rb_insert_color(rmap_item, root)
        self.ksm_pages_unshared += 1
        return None

    # ---- the heart of ksmd --------------------------------------------------------

    def volatile_or_zero(self, rmap_item: RmapItem, page: Frame) -> bool:
        """The checksum test: True when there is nothing more to do, because the page
        changed since its last visit (volatile) or was merged with the zero page."""
        checksum = calc_checksum(page)
        if rmap_item.oldchecksum != checksum:
            rmap_item.oldchecksum = checksum
            return True
        return not self.try_to_merge_with_zero_page(rmap_item, page)

    def cmp_and_merge_page(self, page: Frame, rmap_item: RmapItem) -> None:
        """First try the stable tree; else, if the checksum held since last time,
        the unstable tree, merging with an identical page found there."""
        max_page_sharing_bypass = False
        stable_node = page.folio_stable_node()
        if stable_node is not None:
            if (stable_node.head != HEAD_MIGRATE
                    and self.get_kpfn_nid(stable_node.kpfn) != stable_node.nid):
                self.stable_node_dup_del(stable_node)
                self.migrate_list_add(stable_node)
            if stable_node.head != HEAD_MIGRATE and rmap_item.head is stable_node:
                return
            # A KSM fork may go over the sharing limit.
            if not self.is_page_sharing_candidate(stable_node):
                max_page_sharing_bypass = True
        elif self.mem.profile.has("checksum_first"):
            # 6.11+: a page that is not a KSM page meets the checksum first
            self.remove_rmap_item_from_tree(rmap_item)
            if self.volatile_or_zero(rmap_item, page):
                return

        kfolio = self.stable_tree_search(page)
        if kfolio is page and rmap_item.head is stable_node:
            return

        self.remove_rmap_item_from_tree(rmap_item)

        if kfolio is not None:
            err = self.try_to_merge_with_ksm_page(rmap_item, page, kfolio)
            if not err:
                knode = kfolio.folio_stable_node()
                assert knode is not None
                self.stable_tree_append(rmap_item, knode, max_page_sharing_bypass)
            return

        # before 6.11 every page searched the stable tree first, then the checksum
        if not self.mem.profile.has("checksum_first") and self.volatile_or_zero(rmap_item, page):
            return

        found = self.unstable_tree_search_insert(rmap_item, page)
        if found is not None:
            tree_rmap_item, tree_page = found
            # both subpages of one THP: split_huge_page() failed, it is split now
            split = page.folio is not None and page.folio is tree_page.folio
            merged = self.try_to_merge_two_pages(rmap_item, page, tree_rmap_item, tree_page)
            if merged is not None:
                # Insert a node for the new KSM page and add both rmap_items.
                new_node = self.stable_tree_insert(merged)
                self.stable_tree_append(tree_rmap_item, new_node, False)
                self.stable_tree_append(rmap_item, new_node, False)
            elif split and page.folio is not None:
                self.mem.split_huge_page(page.folio)
