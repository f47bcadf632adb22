"""ksmd of the engine: the knobs it runs by, the mm_slot list, the scan, the simulated
clock, the scan-time advisor and the tracepoints (``m.ksm.ksmd``; the sysfs face is
ksm.py).

Python walks the mm_slot list and each mm's VMAs as scan_get_next_rmap_item() does;
one C call (ksm_scan_range) then handles every page of a VMA up to the batch's
budget: rmap_items, smart scan and cmp_and_merge_page() with both trees. Around it
Python keeps the simulated clock, ksmd's sleeps (ksm_scan_thread), the scan-time
advisor and the tracepoints (the C core buffers its own; they are drained after each
C call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._native import ffi, lib
from ..advisor import UINT, AdvisorCtx, scan_time_advisor
from ..checks import check_clock
from ..constants import (
    KNOB_DEFAULTS,
    KSM_RUN_MERGE,
    KSM_RUN_UNMERGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    SIZEOF_RMAP_ITEM,
    ZERO_CHECKSUM,
)
from ..scan_thread import ksm_scan_thread
from ..timing import NSEC_PER_MSEC, CostModel
from ..tracing import Event, Tracer, scan_event

if TYPE_CHECKING:
    from .machine import Machine
    from .mm import Mm

# knobs mirrored into struct ksm_ctx for the C core, under their own names
_CTX_KNOBS = ("max_page_sharing", "use_zero_pages", "smart_scan",
              "stable_node_chains_prune_millisecs")


def _batch_rows(rows: np.ndarray) -> np.ndarray:
    """The C core's rows (processed, pages_sharing, ksm_zero_pages, rmap_items) with
    general_profit in place of rmap_items."""
    out = rows.copy()
    out[:, 3] = (rows[:, 1] + rows[:, 2]) * PAGE_SIZE - rows[:, 3] * SIZEOF_RMAP_ITEM
    return out


class MmSlot:
    """struct ksm_mm_slot: an mm on ksmd's list."""

    __slots__ = ("mm",)

    def __init__(self, mm: Mm) -> None:
        self.mm = mm


class Ksmd:
    """ksmd's state: its knobs, the mm_slot list and ksm_scan's cursor (``cursor``,
    None at ksm_mm_head; ``address``), the clock and ksmd's CPU time, the advisor's
    context and the tracepoints."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.ctx: Any = machine.ctx
        self.knobs: dict[str, Any] = dict(KNOB_DEFAULTS)  # ints, and advisor_mode's name
        profile = machine.profile
        c = self.ctx
        c.max_page_sharing = 256
        c.merge_across_nodes = 1
        c.use_zero_pages = 0
        if not profile.has("smart_scan"):
            self.knobs["smart_scan"] = 0  # a ksmd without smart scan never skips
        c.smart_scan = int(self.knobs["smart_scan"])
        c.checksum_first = int(profile.has("checksum_first"))
        c.unshare_zero_pages = int(profile.has("unshare_zero_pages"))
        c.ksm_nr_node_ids = 1
        c.stable_node_chains_prune_millisecs = 2000
        c.zero_checksum = ZERO_CHECKSUM
        # the mm_slot list: ksm_mm_head is the None cursor value
        self.mm_slots: list[MmSlot] = []
        self.cursor: MmSlot | None = None
        self.address = 0
        # every mm ever entered, by mm_id: a tracepoint names an rmap_item's mm
        self._entered: dict[int, Mm] = {}
        # simulated time (timing.py): the clock, ksmd's CPU time, and within a batch
        # the pages processed so far (the clock moves at the end of the batch)
        self._clock_ns = 0
        self.ksmd_cpu_ns = 0
        self.batch_pages = 0
        self.cost = CostModel()
        # when ksmd next wakes from its sleep, or None while it waits for work
        self.ksmd_wake: int | None = None
        self.advisor_ctx = AdvisorCtx()
        self.tracer = Tracer(self._trace_switch)
        self._nxt = ffi.new("int64_t *")  # ksm_scan_range's resume slot

    # ---- sysfs stores (ksmcore.sysfs_store)

    def stable_nodes_busy(self) -> bool:
        """ksm_pages_shared || remove_all_stable_nodes(): whether merge_across_nodes
        or max_page_sharing must refuse to change (EBUSY)."""
        c = self.ctx
        busy = bool(c.pages_shared or lib.ksm_remove_all_stable_nodes(c))
        self.drain()
        return busy

    def knob_stored(self, name: str, value: Any) -> None:
        """A knob just changed: mirror it into struct ksm_ctx."""
        c = self.ctx
        if name == "merge_across_nodes":
            c.merge_across_nodes = value
            c.ksm_nr_node_ids = 1 if value else self.machine.nodes
        elif name in _CTX_KNOBS:
            setattr(c, name, int(value))

    # ---- the mm_slot list (__ksm_enter, __ksm_exit)

    def _index(self, slot: MmSlot) -> int:
        return next(i for i, s in enumerate(self.mm_slots) if s is slot)

    def _slot_of(self, mm: Mm) -> MmSlot | None:
        return next((s for s in self.mm_slots if s.mm is mm), None)

    def _next(self, slot: MmSlot | None) -> MmSlot | None:
        if slot is None:
            return self.mm_slots[0] if self.mm_slots else None
        i = self._index(slot) + 1
        return self.mm_slots[i] if i < len(self.mm_slots) else None

    def ksm_enter(self, mm: Mm) -> None:
        """__ksm_enter(): a slot just before the cursor (scanned last), or at the tail
        during run=2."""
        slot = MmSlot(mm)
        if self.knobs["run"] & KSM_RUN_UNMERGE or self.cursor is None:
            self.mm_slots.append(slot)  # at the tail (before the head when the cursor is there)
        else:
            self.mm_slots.insert(self._index(self.cursor), slot)  # just before the cursor
        self._entered[mm.mm_id] = mm
        mm.ksm_registered = True
        if self.tracer.active:
            self.tracer.emit({"event": "ksm_enter", "mm": mm.pid})

    def ksm_exit(self, mm: Mm) -> None:
        """__ksm_exit(), for a registered mm: free the slot now if it has no
        rmap_items, else leave it to ksmd just after the cursor."""
        slot = self._slot_of(mm)
        if slot is not None and slot is not self.cursor:
            self.mm_slots.remove(slot)
            if not self.machine.mem.mm["mm_rmap_items"][mm.mm_id]:
                mm.ksm_registered = False
                mm.merge_any = False
            else:
                # ksmd frees its rmap_items next: move the slot just after the cursor
                at = 0 if self.cursor is None else self._index(self.cursor) + 1
                self.mm_slots.insert(at, slot)
        if self.tracer.active:
            self.tracer.emit({"event": "ksm_exit", "mm": mm.pid})

    def _remove_mm_slot(self, slot: MmSlot) -> None:
        """A whole pass found no VM_MERGEABLE VMA: drop the mm, as __ksm_exit would
        (6.18 keeps MMF_VM_MERGE_ANY)."""
        mm = slot.mm
        self.mm_slots.remove(slot)
        mm.ksm_registered = False
        if not self.machine.profile.has("merge_any_kept"):
            mm.merge_any = False

    # ---- the scan

    def ksmd_should_run(self) -> bool:
        return bool(self.knobs["run"] & KSM_RUN_MERGE) and bool(self.mm_slots)

    def ksm_do_scan(self, scan_npages: int) -> int:
        """One ksm_do_scan(n) if ksmd would run: returns the number of pages passed to
        cmp_and_merge_page. The batch costs simulated time and ksmd CPU time
        (cost_model): the clock stands at the batch's start (after its overhead)
        while it runs, and moves on by the pages' cost at its end."""
        cost = self.cost
        check_clock(self._clock_ns + cost.batch(scan_npages), "the clock after this batch")
        if not self.ksmd_should_run():
            return 0
        self.charge_ksmd(cost.batch_ns)
        self.batch_pages = 0
        processed = 0
        if scan_npages > 0:
            processed = self._scan(scan_npages)
        self.batch_pages = 0
        self.charge_ksmd(processed * cost.page_ns)
        return processed

    def _scan(self, budget: int) -> int:
        """Up to ``budget`` pages through cmp_and_merge_page, with the tree nodes they
        can need reserved first (C knows how many a page can take)."""
        if lib.ksm_reserve_batch(self.ctx, budget) != 0:
            raise MemoryError("cannot reserve KSM nodes")
        return self.scan_get_next_rmap_item(budget)

    def ksm_do_scans(self, n: int, count: int) -> np.ndarray:
        """``count`` ksm_do_scan(n) batches back to back, as ksm_do_scan runs them
        one by one (each costs its time; no sleeps between them), stopping after the
        batch that ends a full scan. One row per batch (:data:`ksmcore.api.BATCH_COLUMNS`):
        pages processed, pages_sharing, ksm_zero_pages and general_profit after it.

        The C core counts the batches inside its page loop, so a whole run of
        batches costs one pass through Python rather than one per batch."""
        cost = self.cost
        check_clock(self._clock_ns + count * cost.batch(n), "the clock after these batches")
        rows = np.zeros((count + 1, lib.KSM_BATCH_LOG_COLS), np.int64)
        if count == 0 or not self.ksmd_should_run():
            return _batch_rows(rows[:0])
        c = self.ctx
        if n == 0:
            # nothing counts into a batch: each runs alone (it processes no page)
            for i in range(count):
                if not self.ksmd_should_run():
                    return _batch_rows(rows[:i])
                seqnr = c.seqnr
                self.ksm_do_scan(0)
                rows[i] = self._batch_row(0)
                if c.seqnr != seqnr:
                    return _batch_rows(rows[: i + 1])
            return _batch_rows(rows[:count])
        start, cpu = self._clock_ns, self.ksmd_cpu_ns
        seqnr = c.seqnr
        self.charge_ksmd(cost.batch_ns)  # the first batch's overhead
        c.batch_pages, c.batch_done = n, 0
        c.page_ns, c.batch_ns = cost.page_ns, cost.batch_ns
        c.batch_clock_ns = self._clock_ns
        c.batch_log, c.nr_batch_log, c.batch_log_cap = ffi.from_buffer("int64_t[]", rows), 0, count
        self.batch_pages = 0
        try:
            processed = self._scan(n * count)
        finally:
            k = int(c.nr_batch_log)
            partial = c.seqnr != seqnr  # a full scan ended the last batch early
            if partial:
                rows[k] = self._batch_row(int(c.batch_done))
            c.batch_pages, c.batch_log, c.batch_log_cap = 0, ffi.NULL, 0
            self.batch_pages = 0
        batches = k + int(partial)
        total = batches * cost.batch_ns + processed * cost.page_ns
        self.ksmd_cpu_ns = cpu + total
        self.clock_ns = start + total
        return _batch_rows(rows[:batches])

    def _batch_row(self, processed: int) -> list[int]:
        c = self.ctx
        return [processed, c.pages_sharing, c.ksm_zero_pages, c.rmap_items]

    def _start_round(self) -> None:
        """The start of a full scan in scan_get_next_rmap_item()."""
        c = self.ctx
        self.advisor_start_scan()
        if self.tracer.active:
            self.tracer.emit(scan_event("ksm_start_scan", c.seqnr, c.rmap_items))
        lib.ksm_start_round(c)  # migrate_nodes pruning, unstable roots reset
        self.drain()

    def _stop_round(self, processed: int) -> None:
        """The end of a full scan: the advisor, the tracepoint, then full_scans++."""
        c = self.ctx
        if c.batch_pages:
            # in ksm_do_scans(): the clock of the batch the C core counted last
            self._clock_ns = int(c.batch_clock_ns)
            processed = int(c.batch_done)
        self.batch_pages = processed
        self.advisor_stop_scan()
        if self.tracer.active:
            self.tracer.emit(scan_event("ksm_stop_scan", c.seqnr, c.rmap_items))
        c.seqnr += 1

    def scan_get_next_rmap_item(self, budget: int) -> int:
        """scan_get_next_rmap_item() for a whole batch: the walk of the mm_slot list
        from ksm_scan's cursor, a full scan's start and stop, and each mm's pages by
        _scan_mm (which hands them to cmp_and_merge_page() in C). Returns the pages
        processed: ``budget`` (the batch ends inside an mm), or fewer when the full
        scan ends (which ends the batch)."""
        processed = 0
        if self.cursor is None:
            self._start_round()
            self.cursor = self._next(None)
            if self.cursor is None:
                return 0
            self.address = 0
        while True:
            slot = self.cursor
            mm = slot.mm
            if mm.exiting:
                self._remove_rmap_items_of(mm)
                self.address = 0
            else:
                processed = self._scan_mm(mm, budget, processed)
                if processed == budget:
                    return processed
            self.cursor = self._next(slot)
            if self.address == 0:
                self._remove_mm_slot(slot)
            if self.cursor is None:
                self._stop_round(processed)
                return processed
            self.address = 0

    def _scan_mm(self, mm: Mm, budget: int, processed: int) -> int:
        """The walk of mm's regions from ksm_scan.address: each VM_MERGEABLE VMA's pages
        go to C (ksm_scan_range) until the budget is used; rmap_items of pages no
        longer in one (remove_trailing_rmap_items()) go as the walk passes. Returns
        the batch's processed pages: ``budget`` when the batch ends here."""
        c = self.ctx
        nxt = self._nxt
        for r in mm.regions():
            if r.end <= self.address:
                continue
            if r.live and r.mergeable:
                if self.address < r.start:
                    self.address = r.start
                hi = r.slot(r.end)
                while self.address < r.end:
                    processed += lib.ksm_scan_range(
                        c, r.slot(self.address), hi, budget - processed, nxt
                    )
                    self.drain()
                    self.address = r.start + ((nxt[0] - r.slot_base) << PAGE_SHIFT)
                    if c.pending_break_cow != lib.KSM_NIL:
                        # break_cow(): unshare the page of a half-done merge
                        s = c.pending_break_cow
                        c.pending_break_cow = lib.KSM_NIL
                        mm.break_ksm(r, s, s + 1)
                    if processed == budget:
                        return processed
            else:
                # items of pages no longer in a mergeable VMA go as the scan passes
                lo = max(self.address, r.start)
                lib.remove_trailing_rmap_items(c, r.slot(lo), r.slot(r.end))
                self.drain()
                if not r.live and lo == r.start:
                    mm.dead.remove(r)
        return processed

    def _remove_rmap_items_of(self, mm: Mm) -> None:
        """remove_trailing_rmap_items() from the mm's first item: all of them go."""
        c = self.ctx
        for r in mm.regions():
            lib.remove_trailing_rmap_items(c, r.slot_base, r.slot(r.end))
            self.drain()
        mm.dead = []

    def unmerge_and_remove_all_rmap_items(self) -> None:
        """run=2: unmerge_ksm_pages() over every VM_MERGEABLE VMA of every mm, free every
        rmap_item, free exiting mms' slots, remove the stable nodes, reset full_scans."""
        c = self.ctx
        self.cursor = self._next(None)
        while self.cursor is not None:
            slot = self.cursor
            mm = slot.mm
            if not mm.exiting:
                for v in mm.vmas:
                    if v.mergeable:
                        mm.unmerge_ksm_pages(v, v.start, v.end)
            self._remove_rmap_items_of(mm)
            self.cursor = self._next(slot)
            if mm.exiting:
                self.mm_slots.remove(slot)
                mm.ksm_registered = False
        lib.ksm_remove_all_stable_nodes(c)
        self.drain()
        c.seqnr = 0

    def ksm_scan_thread(self, ns: int) -> None:
        """ksm_scan_thread() for ``ns`` of simulated time (ksmcore.scan_thread)."""
        ksm_scan_thread(self, ns)

    # ---- simulated time (timing.py)

    @property
    def clock_ns(self) -> int:
        return self._clock_ns

    @clock_ns.setter
    def clock_ns(self, ns: int) -> None:
        self._clock_ns = ns
        self.ctx.jiffies = ns // NSEC_PER_MSEC  # HZ=1000: a jiffy is a millisecond

    def charge_ksmd(self, ns: int) -> None:
        """ksmd worked for ns: the clock and its CPU time move on together."""
        self.ksmd_cpu_ns += ns
        self.clock_ns = self._clock_ns + ns

    def ktime_get(self) -> int:
        """ktime_get() within a batch: its start plus the pages processed so far."""
        return self._clock_ns + self.batch_pages * self.cost.page_ns

    def task_sched_runtime(self) -> int:
        """task_sched_runtime(ksmd), with the running batch's pages so far."""
        return self.ksmd_cpu_ns + self.batch_pages * self.cost.page_ns

    # ---- the scan-time advisor

    def set_advisor_defaults(self) -> None:
        knobs = self.knobs
        if knobs["advisor_mode"] == "none":
            knobs["pages_to_scan"] = KNOB_DEFAULTS["pages_to_scan"]
        else:
            self.advisor_ctx = AdvisorCtx()
            knobs["pages_to_scan"] = int(knobs["advisor_min_pages_to_scan"]) & UINT

    def advisor_start_scan(self) -> None:
        if self.knobs["advisor_mode"] == "scan-time":
            self.advisor_ctx.start_scan = self.ktime_get()

    def advisor_stop_scan(self) -> None:
        if self.knobs["advisor_mode"] == "scan-time":
            self.scan_time_advisor()

    def scan_time_advisor(self) -> None:
        """scan_time_advisor() (ksmcore.advisor): pages_to_scan for the next scan."""
        pages, scan_time, cpu_percent = scan_time_advisor(
            self.advisor_ctx, self.knobs, self.ktime_get(), self.task_sched_runtime())
        self.knobs["pages_to_scan"] = pages & UINT  # into an unsigned int
        if self.tracer.active:
            self.tracer.emit({"event": "ksm_advisor", "scan_time": scan_time,
                              "pages_to_scan": pages, "cpu_percent": cpu_percent})

    # ---- tracepoints

    def _trace_switch(self, active: bool) -> None:
        """The C core buffers its events only while someone subscribes."""
        c = self.ctx
        c.trace_enabled = 1 if active else 0
        if not active:
            c.nr_trace = 0

    def drain(self) -> None:
        """Raise the events the C core buffered during the last call, in order."""
        c = self.ctx
        n = c.nr_trace
        if not n:
            return
        raw = [c.trace[i] for i in range(n)]
        events: list[Event] = []
        for e in raw:
            kind = e.event
            if kind == lib.KSM_TRACE_REMOVE_KSM_PAGE:
                events.append({"event": "ksm_remove_ksm_page", "pfn": int(e.pfn)})
                continue
            pid, addr = self._rmap_item_id(int(e.slot))
            item = (pid, addr)
            if kind == lib.KSM_TRACE_MERGE_ONE_PAGE:
                events.append({"event": "ksm_merge_one_page", "pfn": int(e.pfn),
                               "rmap_item": item, "mm": pid, "err": int(e.err)})
            elif kind == lib.KSM_TRACE_MERGE_WITH_KSM_PAGE:
                events.append({"event": "ksm_merge_with_ksm_page",
                               "ksm_page": None if e.kpfn < 0 else int(e.kpfn),
                               "pfn": int(e.pfn), "rmap_item": item, "mm": pid,
                               "err": int(e.err)})
            else:
                events.append({"event": "ksm_remove_rmap_item", "pfn": int(e.pfn),
                               "rmap_item": item, "mm": pid})
        c.nr_trace = 0
        for event in events:
            self.tracer.emit(event)

    def _rmap_item_id(self, s: int) -> tuple[int, int]:
        """An rmap_item (a page-table slot) as (pid, address)."""
        mm = self._entered[self.machine.mem.mm_of_slot(s)]
        for r in mm.regions():
            if r.slot_base <= s < r.slot(r.end):
                return mm.pid, r.start + ((s - r.slot_base) << PAGE_SHIFT)
        raise AssertionError(f"slot {s} is in no region of process {mm.pid}")
