"""ksmd of the engine: the knobs of /sys/kernel/mm/ksm, the mm_slot list and the scan.

Python walks the mm_slot list and each mm's VMAs as scan_get_next_rmap_item() does;
one C call (ksm_scan_range) then handles every page of a VMA up to the batch's
budget: rmap_items, smart scan and cmp_and_merge_page() with both trees.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from .._native import ffi, lib
from ..constants import (
    COUNTERS,
    KNOB_DEFAULTS,
    KSM_RUN_MERGE,
    KSM_RUN_UNMERGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    SIZEOF_RMAP_ITEM,
    SYSFS_FILES,
    ZERO_CHECKSUM,
)
from ..errors import KsmdNotRunning, ksm_error
from ..knobs import format_sysfs, knob_text, parse_knob

if TYPE_CHECKING:
    from .machine import Machine
    from .process import Process

# knobs mirrored into struct ksm_ctx for the C core
_CTX_KNOBS = {
    "max_page_sharing": "max_page_sharing",
    "use_zero_pages": "use_zero_pages",
    "smart_scan": "smart_scan",
    "stable_node_chains_prune_millisecs": "stable_node_chains_prune_millisecs",
}


class _MmSlot:
    __slots__ = ("mm",)

    def __init__(self, mm: Process) -> None:
        self.mm = mm


class Ksm:
    """``m.ksm``: every file of /sys/kernel/mm/ksm/ as an attribute, and ksmd itself."""

    def __init__(self, machine: Machine) -> None:
        object.__setattr__(self, "_m", machine)
        object.__setattr__(self, "_knobs", dict(KNOB_DEFAULTS))
        c = machine.ctx
        c.max_page_sharing = 256
        c.merge_across_nodes = 1
        c.use_zero_pages = 0
        c.smart_scan = 1
        c.ksm_nr_node_ids = 1
        c.stable_node_chains_prune_millisecs = 2000
        c.zero_checksum = ZERO_CHECKSUM
        # the mm_slot list: ksm_mm_head is the None cursor value
        object.__setattr__(self, "_slots", [])
        object.__setattr__(self, "_cursor", None)
        object.__setattr__(self, "_address", 0)

    # ---- sysfs

    def __getattr__(self, name: str) -> Any:
        if name in KNOB_DEFAULTS:
            return self._knobs[name]
        if name in COUNTERS:
            return self.stats()[name]
        raise AttributeError(f"/sys/kernel/mm/ksm has no file {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in KNOB_DEFAULTS or name in COUNTERS:
            self.sysfs_write(name, knob_text(value))
        else:
            raise AttributeError(f"/sys/kernel/mm/ksm has no file {name!r}")

    def sysfs_read(self, name: str) -> str:
        stats = self.stats()
        if name not in stats:
            raise ksm_error(errno.ENOENT, f"no such file /sys/kernel/mm/ksm/{name}")
        return format_sysfs(name, stats[name])

    def sysfs_write(self, name: str, text: str) -> None:
        value = parse_knob(name, text)
        c = self._m.ctx
        knobs = self._knobs
        if name == "pages_to_scan" and knobs["advisor_mode"] != "none":
            raise ksm_error(errno.EINVAL, "pages_to_scan is set by the advisor")
        if name == "run":
            if value != knobs["run"]:
                knobs["run"] = value
                if value & KSM_RUN_UNMERGE:
                    self._unmerge_and_remove_all_rmap_items()
            return
        if name in ("merge_across_nodes", "max_page_sharing"):
            if value == knobs[name]:
                return
            if c.pages_shared or lib.ksm_remove_all_stable_nodes(c):
                raise ksm_error(errno.EBUSY, f"{name} cannot change while KSM pages exist")
            knobs[name] = value
            if name == "merge_across_nodes":
                c.merge_across_nodes = value
                c.ksm_nr_node_ids = 1 if value else self._m.nodes
            else:
                c.max_page_sharing = value
            return
        if name == "advisor_mode":
            if value != knobs[name]:
                knobs[name] = value
                knobs["pages_to_scan"] = (
                    100 if value == "none" else knobs["advisor_min_pages_to_scan"]
                ) & 0xFFFFFFFF
            return
        knobs[name] = value
        if name in _CTX_KNOBS:
            setattr(c, _CTX_KNOBS[name], int(value))

    def stats(self) -> dict[str, int | str]:
        c = self._m.ctx
        k = self._knobs
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
        return {name: (k[name] if name in k else counters[name]) for name in SYSFS_FILES}

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

    # ---- the mm_slot list (__ksm_enter, __ksm_exit)

    def _index(self, slot: _MmSlot) -> int:
        return next(i for i, s in enumerate(self._slots) if s is slot)

    def _slot_of(self, mm: Process) -> _MmSlot | None:
        return next((s for s in self._slots if s.mm is mm), None)

    def _ksm_enter(self, mm: Process) -> None:
        slot = _MmSlot(mm)
        if self._knobs["run"] & KSM_RUN_UNMERGE or self._cursor is None:
            self._slots.append(slot)  # at the tail (before the head when the cursor is there)
        else:
            self._slots.insert(self._index(self._cursor), slot)  # just before the cursor
        mm.ksm_registered = True

    def _ksm_exit(self, mm: Process) -> None:
        slot = self._slot_of(mm)
        if slot is None or slot is self._cursor:
            return
        self._slots.remove(slot)
        if not self._m.mem.mm["mm_rmap_items"][mm.mm_id]:
            mm.ksm_registered = False
            mm.merge_any = False
            return
        # ksmd frees its rmap_items next: move the slot just after the cursor
        at = 0 if self._cursor is None else self._index(self._cursor) + 1
        self._slots.insert(at, slot)

    def _next(self, slot: _MmSlot | None) -> _MmSlot | None:
        if slot is None:
            return self._slots[0] if self._slots else None
        i = self._index(slot) + 1
        return self._slots[i] if i < len(self._slots) else None

    # ---- ksmd

    def _reserve(self, budget: int) -> None:
        n = min(budget, self._m.mem.nr_slots) + 1
        if lib.ksm_reserve(self._m.ctx, 2 * n, n) != 0:
            raise MemoryError("cannot reserve KSM nodes")

    def do_scan(self, n: int) -> int:
        """One ksm_do_scan(n): returns the number of pages passed to cmp_and_merge_page."""
        if not (self._knobs["run"] & KSM_RUN_MERGE) or not self._slots or n <= 0:
            return 0
        self._reserve(n)
        return self._scan_batch(n)

    def scan(self, full_scans: int = 1) -> None:
        """Run ksmd, a batch of pages_to_scan at a time, until full_scans grew by that many."""
        if self._knobs["run"] != KSM_RUN_MERGE:
            raise KsmdNotRunning(f"ksmd is not running (run = {self._knobs['run']}); set run = 1")
        if self._knobs["pages_to_scan"] == 0:
            raise KsmdNotRunning("pages_to_scan is 0: ksmd would never finish a scan")
        c = self._m.ctx
        target = c.seqnr + full_scans
        while c.seqnr < target:
            if not self._slots:
                raise KsmdNotRunning("no process has mergeable memory: ksmd sleeps")
            self.do_scan(self._knobs["pages_to_scan"])

    def _start_round(self) -> None:
        lib.ksm_start_round(self._m.ctx)

    def _scan_batch(self, budget: int) -> int:
        """ksm_do_scan(): scan_get_next_rmap_item() + cmp_and_merge_page() until the
        budget is used or a full scan ends (which ends the batch)."""
        c = self._m.ctx
        processed = 0
        nxt = ffi.new("int64_t *")
        if self._cursor is None:
            self._start_round()
            self._cursor = self._next(None)
            if self._cursor is None:
                return 0
            self._address = 0
        while True:
            mm = self._cursor.mm
            if mm.exited:
                for r in mm.regions():
                    lib.ksm_remove_rmap_items(c, r.slot_base, r.slot(r.end))
                mm.dead = []
                self._address = 0
            else:
                for r in mm.regions():
                    if r.end <= self._address:
                        continue
                    if r.live and r.mergeable:
                        if self._address < r.start:
                            self._address = r.start
                        hi = r.slot(r.end)
                        while self._address < r.end:
                            processed += lib.ksm_scan_range(
                                c, r.slot(self._address), hi, budget - processed, nxt
                            )
                            self._address = r.start + ((nxt[0] - r.slot_base) << PAGE_SHIFT)
                            if c.pending_break_cow != lib.KSM_NIL:
                                # break_cow(): unshare the page of a half-done merge
                                s = c.pending_break_cow
                                c.pending_break_cow = lib.KSM_NIL
                                mm._break_ksm(r, s, s + 1)
                            if processed == budget:
                                return processed
                    else:
                        # items of pages no longer in a mergeable VMA go as the scan passes
                        lo = max(self._address, r.start)
                        lib.ksm_remove_rmap_items(c, r.slot(lo), r.slot(r.end))
                        if not r.live and lo == r.start:
                            mm.dead.remove(r)
            slot = self._cursor
            self._cursor = self._next(slot)
            if self._address == 0:
                # a whole pass found no VM_MERGEABLE VMA: drop the mm, as __ksm_exit would
                self._slots.remove(slot)
                mm.ksm_registered = False
            if self._cursor is None:
                c.seqnr += 1
                return processed
            self._address = 0

    def _unmerge_and_remove_all_rmap_items(self) -> None:
        c = self._m.ctx
        self._cursor = self._next(None)
        while self._cursor is not None:
            slot = self._cursor
            mm = slot.mm
            if not mm.exited:
                mm.unmerge_all()
            for r in mm.regions():
                lib.ksm_remove_rmap_items(c, r.slot_base, r.slot(r.end))
            mm.dead = []
            self._cursor = self._next(slot)
            if mm.exited:
                self._slots.remove(slot)
                mm.ksm_registered = False
        lib.ksm_remove_all_stable_nodes(c)
        c.seqnr = 0
