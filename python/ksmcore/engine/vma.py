"""VMAs and the regions of an mm's address space that can hold rmap_items."""

from __future__ import annotations

from dataclasses import dataclass

from ..constants import PAGE_SHIFT


@dataclass
class Region:
    """A run of pages [start, end) whose page-table slots start at ``slot_base``.

    A live region is a VMA (``mergeable`` is VM_MERGEABLE); a dead one is a range that
    was unmapped while rmap_items may still sit on its slots, kept until ksmd has
    freed them (the kernel frees such items lazily too).
    """

    start: int
    end: int
    slot_base: int
    mergeable: bool = False
    live: bool = True
    node: int | None = None  # faults in this VMA allocate on this node
    thp: int = 0  # VM_HUGEPAGE / VM_NOHUGEPAGE (ksmcore.thp), 0 for neither

    def slot(self, addr: int) -> int:
        return self.slot_base + ((addr - self.start) >> PAGE_SHIFT)

    def split(self, addr: int) -> Region:
        """Cut at ``addr``: self keeps [start, addr), the returned region [addr, end)."""
        tail = Region(addr, self.end, self.slot(addr), self.mergeable, self.live, self.node,
                      self.thp)
        self.end = addr
        return tail
