"""KSM's structures: ``ksm_rmap_item``, ``ksm_stable_node``, ``ksm_mm_slot``, ``ksm_scan``.

Unions of the kernel are kept as separate fields; which of them is meaningful
follows the flags exactly as in mm/ksm.c.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..constants import STABLE_NODE_CHAIN
from .rbtree import RbNode

if TYPE_CHECKING:
    from .mm import Mm

# Where a stable node lives: the kernel overlays ``head`` on the rb_node's parent
# word, using &migrate_nodes and STABLE_NODE_DUP_HEAD as sentinels.
HEAD_TREE = 0  # linked in root_stable_tree[nid] (head overlays the rb parent)
HEAD_MIGRATE = 1  # head == &migrate_nodes
HEAD_DUP = 2  # head == STABLE_NODE_DUP_HEAD: a dup in a chain's hlist


class StableNode(RbNode):
    """``struct ksm_stable_node``: a KSM page, a dup of a chain, or a chain head.

    ``hlist_first`` heads the rmap_items of a regular node or dup (linked through
    ``RmapItem.hlist_next/hlist_prev``); ``dups`` is a chain's hlist of dups, first
    element = hlist head. ``chain`` is the chain a dup hangs on (its hlist_dup link).
    """

    __slots__ = (
        "head", "hlist_first", "dups", "chain", "kpfn", "chain_prune_time",
        "rmap_hlist_len", "nid", "migrated",
    )

    def __init__(self) -> None:
        super().__init__()
        self.head = HEAD_TREE
        self.hlist_first: RmapItem | None = None
        self.dups: list[StableNode] = []
        self.chain: StableNode | None = None
        self.kpfn = 0
        self.chain_prune_time = 0
        self.rmap_hlist_len = 0
        self.nid = 0
        # for check_invariants only: the page migrated since ksmd last placed the node
        self.migrated = False

    def is_chain(self) -> bool:
        """is_stable_node_chain()."""
        return self.rmap_hlist_len == STABLE_NODE_CHAIN

    def is_dup(self) -> bool:
        """is_stable_node_dup()."""
        return self.head == HEAD_DUP

    def hlist_items(self) -> list[RmapItem]:
        items = []
        item = self.hlist_first
        while item is not None:
            items.append(item)
            item = item.hlist_next
        return items


class RmapItem(RbNode):
    """``struct ksm_rmap_item``: one scanned (mm, page address).

    ``address`` carries SEQNR_MASK / UNSTABLE_FLAG / STABLE_FLAG in its low bits.
    ``rmap_list`` is the next item of the mm_slot's sorted singly linked list.
    As an unstable-tree node it uses the RbNode fields and ``nid``; on a stable
    node it uses ``head`` and the ``hlist_*`` links.
    """

    __slots__ = (
        "rmap_list", "nid", "mm", "address", "oldchecksum", "age", "remaining_skips",
        "head", "hlist_next", "hlist_prev",
    )

    def __init__(self) -> None:
        super().__init__()
        self.rmap_list: RmapItem | None = None
        self.nid = 0
        self.mm: Mm | None = None
        self.address = 0
        self.oldchecksum = 0
        self.age = 0
        self.remaining_skips = 0
        self.head: StableNode | None = None
        self.hlist_next: RmapItem | None = None
        self.hlist_prev: RmapItem | None = None


class MmSlot:
    """``struct ksm_mm_slot``: an mm on the circular list headed by ``ksm_mm_head``.

    ``rmap_list`` is the head of the mm's rmap_items; an item's ``rmap_list`` field
    has the same name so that ``ksm_scan.rmap_list`` (a pointer to a link in the
    kernel) can be modelled as "the object whose .rmap_list is the link".
    """

    __slots__ = ("mm", "rmap_list", "prev", "next")

    def __init__(self, mm: Mm | None) -> None:
        self.mm = mm
        self.rmap_list: RmapItem | None = None
        self.prev: MmSlot = self
        self.next: MmSlot = self

    def list_add_tail(self, where: MmSlot) -> None:
        """Insert self just before ``where`` (list_add_tail(&self, &where))."""
        prev = where.prev
        self.prev, self.next = prev, where
        prev.next = self
        where.prev = self

    def list_add(self, where: MmSlot) -> None:
        """Insert self just after ``where`` (list_add(&self, &where))."""
        nxt = where.next
        self.prev, self.next = where, nxt
        where.next = self
        nxt.prev = self

    def list_del(self) -> None:
        self.prev.next = self.next
        self.next.prev = self.prev
        self.prev = self.next = self


class KsmScan:
    """``struct ksm_scan``: the single scan cursor.

    ``rmap_list`` is the MmSlot or RmapItem whose ``.rmap_list`` attribute is the
    link where the next rmap_item is expected.
    """

    def __init__(self, head: MmSlot) -> None:
        self.mm_slot: MmSlot = head
        self.address = 0
        self.rmap_list: MmSlot | RmapItem = head
        self.seqnr = 0
