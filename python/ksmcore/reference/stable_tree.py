"""The stable tree: nodes, chains and dups, staleness, search, insert, append.

Ported from mm/ksm.c: stable_tree_search, stable_tree_insert, stable_tree_append,
__stable_node_chain, stable_node_dup, chain_prune and get_ksm_page.
"""

from __future__ import annotations

from ..constants import STABLE_FLAG, STABLE_NODE_CHAIN
from .ksm_structs import HEAD_DUP, HEAD_MIGRATE, HEAD_TREE, RmapItem, StableNode
from .mm import PAGE_MASK, Frame
from .rbtree import RbNode, RbRoot, rb_erase, rb_insert_color, rb_link_node, rb_replace_node
from .state import KsmState, memcmp_pages

ChainResult = tuple[Frame | None, StableNode | None, StableNode]


class StableTreeOps(KsmState):
    """Stable tree operations on top of the global state."""

    # ---- chains and dups ----------------------------------------------------------

    def stable_node_chain_add_dup(self, dup: StableNode, chain: StableNode) -> None:
        assert not dup.is_dup() and chain.is_chain()
        dup.head = HEAD_DUP
        dup.chain = chain
        chain.dups.insert(0, dup)  # hlist_add_head
        self.ksm_stable_node_dups += 1

    def __stable_node_dup_del(self, dup: StableNode) -> None:
        assert dup.is_dup() and dup.chain is not None
        dup.chain.dups.remove(dup)
        dup.chain = None
        self.ksm_stable_node_dups -= 1

    def stable_node_dup_del(self, dup: StableNode) -> None:
        """Take a non-chain node out of its chain, or out of its rb tree."""
        assert not dup.is_chain()
        if dup.is_dup():
            self.__stable_node_dup_del(dup)
        else:
            rb_erase(dup, self.root_stable_tree[dup.nid])

    def alloc_stable_node_chain(self, dup: StableNode, root: RbRoot) -> StableNode:
        """Turn a regular tree node into the single dup of a new chain."""
        assert not dup.is_chain()
        chain = StableNode()
        chain.chain_prune_time = self.jiffies
        chain.rmap_hlist_len = STABLE_NODE_CHAIN
        chain.nid = -1  # NUMA_NO_NODE: a chain's nid is never used
        self.ksm_stable_node_chains += 1
        rb_replace_node(dup, chain, root)
        self.stable_node_chain_add_dup(dup, chain)
        return chain

    def free_stable_node_chain(self, chain: StableNode, root: RbRoot) -> None:
        rb_erase(chain, root)
        self.ksm_stable_node_chains -= 1

    # ---- the migrate_nodes list ---------------------------------------------------

    def migrate_list_add(self, node: StableNode) -> None:
        """``node.head = &migrate_nodes; list_add(&node.list, head)``: at the front."""
        node.head = HEAD_MIGRATE
        self.migrate_nodes.insert(0, node)

    def migrate_list_del(self, node: StableNode) -> None:
        self.migrate_nodes.remove(node)

    # ---- staleness ----------------------------------------------------------------

    def remove_node_from_stable_tree(self, stable_node: StableNode) -> None:
        """Detach every rmap_item of a node whose page went, then unlink the node."""
        assert stable_node.rmap_hlist_len >= 0
        tracer = self.tracer
        item = stable_node.hlist_first
        while item is not None:
            nxt = item.hlist_next
            if nxt is not None:
                self.ksm_pages_sharing -= 1
                if tracer.active:
                    item_id = self.rmap_item_id(item)
                    tracer.emit({"event": "ksm_remove_rmap_item", "pfn": stable_node.kpfn,
                                 "rmap_item": item_id, "mm": item_id[0]})
            else:
                self.ksm_pages_shared -= 1
            assert item.mm is not None
            item.mm.ksm_merging_pages -= 1
            stable_node.rmap_hlist_len -= 1
            item.address &= PAGE_MASK
            # The kernel leaves head and the hlist link dangling; a freed node is
            # never reused here, so clearing them changes no decision.
            item.head = None
            item.hlist_next = item.hlist_prev = None
            item = nxt
        stable_node.hlist_first = None
        if tracer.active:
            tracer.emit({"event": "ksm_remove_ksm_page", "pfn": stable_node.kpfn})
        if stable_node.head == HEAD_MIGRATE:
            self.migrate_list_del(stable_node)
        else:
            self.stable_node_dup_del(stable_node)

    def ksm_get_folio(self, stable_node: StableNode) -> Frame | None:
        """``ksm_get_folio`` (NOLOCK, LOCK and TRYLOCK alike: the model has no lock
        contention). The keyhole check: the node is valid iff its kpfn frame is
        allocated and KSM-marked with this very node; otherwise it is stale and is
        removed from the stable tree (kpfn never changes under us: no migration)."""
        frame = self.mem.frames[stable_node.kpfn]
        if frame.allocated and frame.ksm and frame.stable_node is stable_node:
            return frame
        self.remove_node_from_stable_tree(stable_node)
        return None

    # ---- candidates and dup selection ----------------------------------------------

    def __is_page_sharing_candidate(self, stable_node: StableNode, offset: int) -> bool:
        assert stable_node.rmap_hlist_len >= 0
        return (stable_node.rmap_hlist_len != 0
                and stable_node.rmap_hlist_len + offset < self.ksm_max_page_sharing)

    def is_page_sharing_candidate(self, stable_node: StableNode) -> bool:
        return self.__is_page_sharing_candidate(stable_node, 0)

    def stable_node_dup(
        self, stable_node: StableNode, root: RbRoot, prune_stale_stable_nodes: bool
    ) -> ChainResult:
        """Pick a dup of a chain; returns (tree_folio, dup, node), where node is the
        chain or, if the chain collapsed, the dup that replaced it in the tree."""
        prune_ms = int(self.knobs["stable_node_chains_prune_millisecs"])
        # time_before(jiffies, chain_prune_time + msecs) with HZ=1000
        if not prune_stale_stable_nodes or self.jiffies < stable_node.chain_prune_time + prune_ms:
            prune_stale_stable_nodes = False
        else:
            stable_node.chain_prune_time = self.jiffies

        found: StableNode | None = None
        found_rmap_hlist_len = 0
        tree_folio: Frame | None = None
        for dup in list(stable_node.dups):  # _safe walk: stale dups leave the list
            folio = self.ksm_get_folio(dup)
            if folio is None:
                continue
            if found is None or (
                self.is_page_sharing_candidate(dup)
                and (not self.is_page_sharing_candidate(found)
                     or dup.rmap_hlist_len > found_rmap_hlist_len)
            ):
                found = dup
                found_rmap_hlist_len = found.rmap_hlist_len
                tree_folio = folio
                if not prune_stale_stable_nodes and self.is_page_sharing_candidate(found):
                    break

        if found is not None:
            if len(stable_node.dups) == 1 and stable_node.dups[0] is found:
                # Only one dup left: collapse the chain into it.
                rb_replace_node(stable_node, found, root)
                found.head = HEAD_TREE
                found.chain = None
                stable_node.dups.clear()
                self.ksm_stable_node_chains -= 1
                self.ksm_stable_node_dups -= 1
                return tree_folio, found, found
            if stable_node.dups[0] is not found and self.__is_page_sharing_candidate(found, 1):
                # Move it to the head so the next non-pruning search finds it first.
                stable_node.dups.remove(found)
                stable_node.dups.insert(0, found)
        else:
            assert not stable_node.dups
            self.free_stable_node_chain(stable_node, root)
        return tree_folio, found, stable_node

    def __stable_node_chain(
        self, stable_node: StableNode, root: RbRoot, prune: bool
    ) -> ChainResult:
        if not stable_node.is_chain():
            return self.ksm_get_folio(stable_node), stable_node, stable_node
        return self.stable_node_dup(stable_node, root, prune)

    def chain_prune(self, stable_node: StableNode, root: RbRoot) -> ChainResult:
        return self.__stable_node_chain(stable_node, root, True)

    def chain(self, stable_node: StableNode, root: RbRoot) -> ChainResult:
        return self.__stable_node_chain(stable_node, root, False)

    # ---- search, insert, append -----------------------------------------------------

    def stable_tree_search(self, page: Frame) -> Frame | None:
        """Find a KSM page with page's content to merge with (or page itself when it
        is a KSM page already placed); re-place page's own node if it was migrated.
        -EBUSY (TRYLOCK contention) cannot happen in the model."""
        page_node = page.folio_stable_node()
        if page_node is not None and page_node.head != HEAD_MIGRATE:
            return page  # ksm page forked

        nid = self.get_kpfn_nid(page.pfn)
        root = self.root_stable_tree[nid]
        while True:  # again:
            parent: StableNode | None = None
            left = False
            cur: RbNode | None = root.rb_node
            restart = False
            while cur is not None:
                assert isinstance(cur, StableNode)
                tree_folio, stable_node_dup, stable_node = self.chain_prune(cur, root)
                if tree_folio is None:
                    # A stale node was removed and the tree may have rebalanced.
                    restart = True
                    break
                assert stable_node_dup is not None
                ret = memcmp_pages(page, tree_folio)
                parent = stable_node  # *new now holds the (possibly collapsed) node
                if ret < 0:
                    cur, left = parent.rb_left, True
                elif ret > 0:
                    cur, left = parent.rb_right, False
                else:
                    if page_node is not None:
                        assert page_node.head == HEAD_MIGRATE
                        # A migrated KSM page mapped more than once joins the chain.
                        if page.mapcount > 1:
                            return self._chain_append(
                                page, page_node, stable_node, stable_node_dup, nid, root)
                    if not self.is_page_sharing_candidate(stable_node_dup):
                        # All copies are full: let the unstable tree build a new one.
                        return None
                    tree_folio = self.ksm_get_folio(stable_node_dup)
                    if tree_folio is None:
                        restart = True
                        break
                    if self.get_kpfn_nid(stable_node_dup.kpfn) != stable_node_dup.nid:
                        return self._replace(
                            page, page_node, stable_node, stable_node_dup, nid, root)
                    return tree_folio
            if not restart:
                break

        if page_node is None:
            return None
        self.migrate_list_del(page_node)
        page_node.nid = nid
        page_node.migrated = False
        page_node.head = HEAD_TREE
        rb_link_node(page_node, parent, left, root)
        rb_insert_color(page_node, root)
        return page if self.is_page_sharing_candidate(page_node) else None

    def _replace(
        self, page: Frame, page_node: StableNode | None, stable_node: StableNode,
        stable_node_dup: StableNode, nid: int, root: RbRoot,
    ) -> Frame | None:
        """stable_tree_search's ``replace:``: the matching dup's page migrated away."""
        folio: Frame | None
        if stable_node_dup is stable_node:
            # No chain (or it just collapsed).
            assert not stable_node_dup.is_chain() and not stable_node_dup.is_dup()
            if page_node is not None:
                self.migrate_list_del(page_node)
                page_node.nid = nid
                page_node.migrated = False
                page_node.head = HEAD_TREE
                rb_replace_node(stable_node_dup, page_node, root)
                folio = page if self.is_page_sharing_candidate(page_node) else None
            else:
                rb_erase(stable_node_dup, root)
                folio = None
        else:
            assert stable_node.is_chain()
            self.__stable_node_dup_del(stable_node_dup)
            if page_node is not None:
                self.migrate_list_del(page_node)
                page_node.nid = nid
                page_node.migrated = False
                self.stable_node_chain_add_dup(page_node, stable_node)
                folio = page if self.is_page_sharing_candidate(page_node) else None
            else:
                folio = None
        self.migrate_list_add(stable_node_dup)
        return folio

    def _chain_append(
        self, page: Frame, page_node: StableNode, stable_node: StableNode,
        stable_node_dup: StableNode, nid: int, root: RbRoot,
    ) -> Frame | None:
        """stable_tree_search's ``chain_append:``: a migrated KSM page with more than
        one mapping becomes another dup of the content's chain."""
        if stable_node_dup is stable_node:
            assert not stable_node_dup.is_dup()
            stable_node = self.alloc_stable_node_chain(stable_node_dup, root)
        assert stable_node_dup.is_dup() and page_node.head == HEAD_MIGRATE
        self.migrate_list_del(page_node)
        page_node.nid = nid
        page_node.migrated = False
        self.stable_node_chain_add_dup(page_node, stable_node)
        return page if self.is_page_sharing_candidate(page_node) else None

    def stable_tree_insert(self, kfolio: Frame) -> StableNode:
        """Insert a node for a new KSM page; a dup of a chain if the content exists."""
        kpfn = kfolio.pfn
        nid = self.get_kpfn_nid(kpfn)
        root = self.root_stable_tree[nid]
        need_chain = False
        stable_node: StableNode | None = None
        while True:  # again:
            parent: StableNode | None = None
            left = False
            cur: RbNode | None = root.rb_node
            restart = False
            while cur is not None:
                assert isinstance(cur, StableNode)
                tree_folio, _dup, stable_node = self.chain(cur, root)
                if tree_folio is None:
                    restart = True
                    break
                ret = memcmp_pages(kfolio, tree_folio)
                parent = stable_node
                if ret < 0:
                    cur, left = parent.rb_left, True
                elif ret > 0:
                    cur, left = parent.rb_right, False
                else:
                    need_chain = True
                    break
            if not restart:
                break

        stable_node_dup = StableNode()
        stable_node_dup.kpfn = kpfn
        stable_node_dup.rmap_hlist_len = 0
        stable_node_dup.nid = nid
        if not need_chain:
            rb_link_node(stable_node_dup, parent, left, root)
            rb_insert_color(stable_node_dup, root)
        else:
            assert stable_node is not None
            if not stable_node.is_chain():
                stable_node = self.alloc_stable_node_chain(stable_node, root)
            self.stable_node_chain_add_dup(stable_node_dup, stable_node)
        kfolio.ksm = True
        kfolio.stable_node = stable_node_dup  # folio_set_stable_node
        return stable_node_dup

    def stable_tree_append(
        self, rmap_item: RmapItem, stable_node: StableNode, max_page_sharing_bypass: bool
    ) -> None:
        """Hang rmap_item at the head of the node's hlist and count it."""
        assert stable_node.rmap_hlist_len >= 0
        stable_node.rmap_hlist_len += 1
        # (the kernel only WARNs when the limit is passed without bypass)
        rmap_item.head = stable_node
        rmap_item.address |= STABLE_FLAG
        old_first = stable_node.hlist_first
        rmap_item.hlist_prev = None
        rmap_item.hlist_next = old_first
        if old_first is not None:
            old_first.hlist_prev = rmap_item
        stable_node.hlist_first = rmap_item
        if rmap_item.hlist_next is not None:
            self.ksm_pages_sharing += 1
        else:
            self.ksm_pages_shared += 1
        assert rmap_item.mm is not None
        rmap_item.mm.ksm_merging_pages += 1

    @staticmethod
    def hlist_del(rmap_item: RmapItem) -> None:
        node = rmap_item.head
        assert node is not None
        if rmap_item.hlist_prev is None:
            node.hlist_first = rmap_item.hlist_next
        else:
            rmap_item.hlist_prev.hlist_next = rmap_item.hlist_next
        if rmap_item.hlist_next is not None:
            rmap_item.hlist_next.hlist_prev = rmap_item.hlist_prev
        rmap_item.hlist_next = rmap_item.hlist_prev = None

    # ---- sysfs-only removal (run=2, merge_across_nodes, max_page_sharing) ----------

    def remove_stable_node(self, stable_node: StableNode) -> bool:
        """True (-EBUSY) if the node's page is still mapped; otherwise the node goes.
        In the model a live frame is always mapped, so a valid node is busy."""
        folio = self.ksm_get_folio(stable_node)
        if folio is None:
            return False  # ksm_get_folio removed it
        if folio.mapcount > 0:
            return True
        folio.stable_node = None  # folio_set_stable_node(folio, NULL)
        self.remove_node_from_stable_tree(stable_node)
        return False

    def remove_stable_node_chain(self, stable_node: StableNode, root: RbRoot) -> bool:
        if not stable_node.is_chain():
            assert not stable_node.is_dup()
            return self.remove_stable_node(stable_node)
        for dup in list(stable_node.dups):
            assert dup.is_dup()
            if self.remove_stable_node(dup):
                return True
        assert not stable_node.dups
        self.free_stable_node_chain(stable_node, root)
        return False

    def remove_all_stable_nodes(self) -> bool:
        """Remove every stable node it can; True (-EBUSY) if a KSM page is mapped."""
        busy = False
        for nid in range(self.ksm_nr_node_ids):
            root = self.root_stable_tree[nid]
            while root.rb_node is not None:
                node = root.rb_node
                assert isinstance(node, StableNode)
                if self.remove_stable_node_chain(node, root):
                    busy = True
                    break  # proceed to next nid
        for node in list(self.migrate_nodes):
            if self.remove_stable_node(node):
                busy = True
        return busy
