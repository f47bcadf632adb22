"""``m.ksm`` of the engine: the files of /sys/kernel/mm/ksm as attributes, their reads
and writes, the counters, and the calls that run ksmd (do_scan, scan). ksmd's own
state and the scan are ``self.ksmd`` (ksmd.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._native import lib
from ..checks import MAX_BATCHES, U32_MAX, as_count, as_int, check_clock
from ..constants import (
    KNOB_DEFAULTS,
    KSM_RUN_MERGE,
    PAGE_SIZE,
    SIZEOF_RMAP_ITEM,
    SYSFS_FILES,
)
from ..errors import KsmdNotRunning
from ..guard import serialized
from ..knobs import check_file, format_sysfs, knob_text
from ..sysfs_store import ksm_sysfs_store
from .ksmd import Ksmd

if TYPE_CHECKING:
    from .machine import Machine


@serialized
class Ksm:
    """``m.ksm``: every file of /sys/kernel/mm/ksm/ as an attribute, and ksmd
    (``ksmd``)."""

    # set through object.__setattr__ (attribute writes of other names are sysfs writes)
    _m: Machine
    _guard: Any
    _files: Any
    ksmd: Ksmd

    def __init__(self, machine: Machine) -> None:
        object.__setattr__(self, "_m", machine)
        object.__setattr__(self, "_guard", machine._guard)
        object.__setattr__(self, "_files", machine.profile.sysfs_files)
        object.__setattr__(self, "ksmd", Ksmd(machine))

    # ---- sysfs

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._files:
            raise AttributeError(f"/sys/kernel/mm/ksm has no file {name!r}")
        if name in KNOB_DEFAULTS:
            return self.ksmd.knobs[name]
        return self.stats()[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in self._files:
            self.sysfs_write(name, knob_text(value))
        else:
            raise AttributeError(f"/sys/kernel/mm/ksm has no file {name!r}")

    def sysfs_read(self, name: str) -> str:
        """The file's contents as the kernel prints them (with the newline)."""
        check_file(name, write=False, files=self._files)
        return format_sysfs(name, self.stats()[name])

    def sysfs_write(self, name: str, text: str | bytes) -> None:
        """write(2) of ``text`` to /sys/kernel/mm/ksm/``name``: the store's parsing and
        checks in the kernel's order (ksmcore.sysfs_store); a rejected write raises
        OSError and changes nothing (an EBUSY keeps the stale-node removals the kernel
        makes too)."""
        ksm_sysfs_store(self.ksmd, self._files, name, text)

    def stats(self, every: bool = False) -> dict[str, int | str]:
        """Every file of this kernel's /sys/kernel/mm/ksm; ``every``: also the values
        the model keeps for files the kernel profile does not have."""
        c = self._m.ctx
        k = self.ksmd.knobs
        counters: dict[str, int | str] = {
            "pages_scanned": c.pages_scanned,
            "pages_shared": c.pages_shared,
            "pages_sharing": c.pages_sharing,
            "pages_unshared": c.pages_unshared,
            "pages_volatile": max(
                0, c.rmap_items - c.pages_shared - c.pages_sharing - c.pages_unshared
            ),
            "pages_skipped": c.pages_skipped,
            "ksm_zero_pages": c.ksm_zero_pages,
            "full_scans": c.seqnr,
            "stable_node_chains": c.stable_node_chains,
            "stable_node_dups": c.stable_node_dups,
            "general_profit": (c.pages_sharing + c.ksm_zero_pages) * PAGE_SIZE
            - c.rmap_items * SIZEOF_RMAP_ITEM,
        }
        files = SYSFS_FILES if every else self._files
        return {name: (k[name] if name in k else counters[name]) for name in files}

    # ---- introspection

    def stable_nodes(self) -> list[dict[str, Any]]:
        """Every stable node naming a live KSM page: trees by nid in order, then
        migrate_nodes; dups carry the kpfns of their chain's live dups."""
        c = self._m.ctx
        st = c.stable
        fs = self._m.mem.frames["frame_stable"]

        def live(i: int) -> bool:
            return bool(fs[st[i].kpfn] == i)

        def entry(i: int, where: str) -> dict[str, Any]:
            return {"kpfn": int(st[i].kpfn), "nid": int(st[i].nid), "where": where,
                    "rmap_hlist_len": int(st[i].rmap_hlist_len)}

        out: list[dict[str, Any]] = []
        for nid in range(self._m.nodes):
            node = lib.ksm_rb_first(c.stable_rb, c.root_stable_tree[nid])
            while node != lib.KSM_NIL:
                if st[node].rmap_hlist_len == lib.KSM_STABLE_NODE_CHAIN:
                    dups = []
                    d = st[node].hlist
                    while d != lib.KSM_NIL:
                        if live(d):
                            dups.append(d)
                        d = st[d].next
                    kpfns = [int(st[d].kpfn) for d in dups]
                    out += [dict(entry(d, "dup"), chain=kpfns) for d in dups]
                elif live(node):
                    out.append(entry(node, "tree"))
                node = lib.ksm_rb_next(c.stable_rb, node)
        node = c.migrate_nodes
        while node != lib.KSM_NIL:
            if live(node):
                out.append(entry(node, "migrate"))
            node = st[node].next
        return out

    def node_stats(self) -> dict[int, dict[str, int]]:
        """pages_shared and pages_sharing by the node the KSM page is on (numastat)."""
        c = self._m.ctx
        out = {n: {"pages_shared": 0, "pages_sharing": 0} for n in range(self._m.nodes)}
        for i in range(c.stable_used):
            sn = c.stable[i]
            if sn.head == lib.KSM_HEAD_FREE or sn.rmap_hlist_len <= 0:
                continue  # free, a chain head, or no rmap_items: not counted
            n = out[self._m.mem.frame_nid(sn.kpfn)]
            n["pages_shared"] += 1
            n["pages_sharing"] += sn.rmap_hlist_len - 1
        return out

    # ---- ksmd

    def do_scan(self, n: int) -> int:
        """One ksm_do_scan(n) if ksmd would run: returns the number of pages passed to
        cmp_and_merge_page. The batch costs simulated time and ksmd CPU time
        (cost_model): the clock stands at the batch's start (after its overhead)
        while it runs, and moves on by the pages' cost at its end."""
        n = as_count(n, "do_scan's page count", U32_MAX)  # scan_npages is unsigned int
        return self.ksmd.ksm_do_scan(n)

    def do_scans(self, n: int, count: int) -> np.ndarray:
        """``count`` ksm_do_scan(n) batches back to back, as :meth:`do_scan` runs them
        one by one (each costs its time; no sleeps between them), stopping after the
        batch that ends a full scan. One row per batch (:data:`ksmcore.api.BATCH_COLUMNS`):
        pages processed, pages_sharing, ksm_zero_pages and general_profit after it."""
        n = as_count(n, "do_scans' page count", U32_MAX)
        count = as_count(count, "do_scans' batch count", MAX_BATCHES)
        return self.ksmd.ksm_do_scans(n, count)

    def scan(self, full_scans: int = 1) -> None:
        """Run ksmd, a batch of pages_to_scan at a time, until full_scans grew by that
        many. The batches follow each other without ksmd's sleeps (run_for sleeps)."""
        full_scans = as_int(full_scans, "full_scans")
        if full_scans < 0:
            raise ValueError(f"full_scans must not be negative, not {full_scans}")
        ksmd = self.ksmd
        knobs = ksmd.knobs
        # a full scan takes at least one batch: so many would pass ktime_t's range
        check_clock(ksmd.clock_ns + full_scans * ksmd.cost.batch_ns, "the clock after them")
        if knobs["run"] != KSM_RUN_MERGE:
            raise KsmdNotRunning(f"ksmd is not running (run = {knobs['run']}); set run = 1")
        c = self._m.ctx
        target = c.seqnr + full_scans
        while c.seqnr < target:
            # checked every batch: the advisor may set pages_to_scan to 0
            # (advisor_max_pages_to_scan = 0), and a batch may drop the last mm_slot
            if knobs["pages_to_scan"] == 0:
                raise KsmdNotRunning("pages_to_scan is 0: ksmd would never finish a scan")
            if not ksmd.mm_slots:
                raise KsmdNotRunning("no process has mergeable memory: ksmd sleeps")
            ksmd.ksm_do_scan(knobs["pages_to_scan"])
