"""``Ksm``: the whole of mm/ksm.c's state and algorithm, plus its sysfs stores.

The algorithm is layered over several modules (state -> stable_tree -> merge ->
scan); this class adds the /sys/kernel/mm/ksm/ store functions and counters.
"""

from __future__ import annotations

import errno

from ..constants import COUNTERS, KSM_RUN_UNMERGE, PAGE_SIZE, SIZEOF_RMAP_ITEM
from ..errors import ksm_error
from ..knobs import check_file, parse_knob, sysfs_buffer
from .scan import ScanOps


class Ksm(ScanOps):
    """KSM with its sysfs interface."""

    # ---- sysfs stores -------------------------------------------------------------

    def store(self, name: str, text: str | bytes) -> None:
        """write(2) of ``text`` to /sys/kernel/mm/ksm/``name``: open (ENOENT, EACCES),
        the bytes the store sees (none for an empty write), then the store's own
        checks in the kernel's order. Raises OSError; a rejected write changes
        nothing, except that an EBUSY from remove_all_stable_nodes() keeps the
        removals it managed (as in the kernel)."""
        check_file(name, write=True, files=self.mem.profile.sysfs_files)
        buf = sysfs_buffer(text)
        if buf is None:
            return
        if name == "pages_to_scan" and self.knobs["advisor_mode"] != "none":
            raise ksm_error(errno.EINVAL, "pages_to_scan is set by the advisor")
        value = parse_knob(name, buf)
        if name == "run":
            if value != self.knobs["run"]:
                self.knobs["run"] = value
                if int(value) & KSM_RUN_UNMERGE:
                    self.unmerge_and_remove_all_rmap_items()
        elif name == "merge_across_nodes":
            if value != self.knobs["merge_across_nodes"]:
                if self.ksm_pages_shared or self.remove_all_stable_nodes():
                    raise ksm_error(errno.EBUSY, "KSM pages exist")
                self.knobs["merge_across_nodes"] = value
                self.ksm_nr_node_ids = 1 if value else self.nr_node_ids
        elif name == "max_page_sharing":
            if value == self.knobs["max_page_sharing"]:
                return
            if self.ksm_pages_shared or self.remove_all_stable_nodes():
                raise ksm_error(errno.EBUSY, "KSM pages exist")
            self.knobs["max_page_sharing"] = value
        elif name == "advisor_mode":
            if value != self.knobs["advisor_mode"]:
                self.knobs["advisor_mode"] = value
                self.set_advisor_defaults()
        elif name == "sleep_millisecs":
            # wake_up_interruptible(&ksm_iter_wait): a sleeping ksmd wakes at once if
            # the value it sleeps on changed
            if self.ksmd_wake is not None and value != self.knobs[name]:
                self.ksmd_wake = self.clock_ns
            self.knobs[name] = value
        else:
            self.knobs[name] = value

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
