"""``Ksm``: the whole of mm/ksm.c's state and algorithm, plus its sysfs stores.

The algorithm is layered over several modules (state -> stable_tree -> merge ->
scan); this class adds the /sys/kernel/mm/ksm/ store functions and counters.
"""

from __future__ import annotations

import errno

from ..constants import COUNTERS, PAGE_SIZE, SIZEOF_RMAP_ITEM
from ..errors import ksm_error
from ..sysfs_store import ksm_sysfs_store
from .scan import ScanOps


class Ksm(ScanOps):
    """KSM with its sysfs interface."""

    # ---- sysfs stores (ksmcore.sysfs_store) -----------------------------------------

    def store(self, name: str, text: str | bytes) -> None:
        """write(2) of ``text`` to /sys/kernel/mm/ksm/``name`` (ksm_sysfs_store)."""
        ksm_sysfs_store(self, self.mem.profile.sysfs_files, name, text)

    def stable_nodes_busy(self) -> bool:
        """ksm_pages_shared || remove_all_stable_nodes(): whether merge_across_nodes
        or max_page_sharing must refuse to change (EBUSY)."""
        return bool(self.ksm_pages_shared or self.remove_all_stable_nodes())

    def knob_stored(self, name: str, value: int | str) -> None:
        """A knob just changed: merge_across_nodes sets how many trees there are."""
        if name == "merge_across_nodes":
            self.ksm_nr_node_ids = 1 if value else self.nr_node_ids

    # ---- counters -----------------------------------------------------------------

    def counter(self, name: str) -> int:
        if name == "pages_scanned":
            return self.ksm_pages_scanned
        if name == "pages_shared":
            return self.ksm_pages_shared
        if name == "pages_sharing":
            return self.ksm_pages_sharing
        if name == "pages_unshared":
            return self.ksm_pages_unshared
        if name == "pages_volatile":
            volatile = (self.ksm_rmap_items - self.ksm_pages_shared
                        - self.ksm_pages_sharing - self.ksm_pages_unshared)
            return max(0, volatile)
        if name == "pages_skipped":
            return self.ksm_pages_skipped
        if name == "ksm_zero_pages":
            return self.mem.ksm_zero_pages
        if name == "full_scans":
            return self.ksm_scan.seqnr
        if name == "stable_node_chains":
            return self.ksm_stable_node_chains
        if name == "stable_node_dups":
            return self.ksm_stable_node_dups
        if name == "general_profit":
            return ((self.ksm_pages_sharing + self.mem.ksm_zero_pages) * PAGE_SIZE
                    - self.ksm_rmap_items * SIZEOF_RMAP_ITEM)
        raise ksm_error(errno.ENOENT, f"no such file /sys/kernel/mm/ksm/{name}")

    def value(self, name: str, every: bool = False) -> int | str:
        """The value of any sysfs file (knob or counter); ``every``: files the kernel
        profile does not have too (the model keeps them all)."""
        if not every and name not in self.mem.profile.sysfs_files:
            raise ksm_error(errno.ENOENT, f"no such file /sys/kernel/mm/ksm/{name}")
        if name in COUNTERS:
            return self.counter(name)
        if name in self.knobs:
            return self.knobs[name]
        raise ksm_error(errno.ENOENT, f"no such file /sys/kernel/mm/ksm/{name}")
