"""ksmd of the engine: the knobs of /sys/kernel/mm/ksm, the mm_slot list and the scan.

Python walks the mm_slot list and each mm's VMAs as scan_get_next_rmap_item() does;
one C call (ksm_scan_range) then handles every page of a VMA up to the batch's
budget: rmap_items, smart scan and cmp_and_merge_page() with both trees. Around it
Python keeps the simulated clock, ksmd's sleeps (run_for), the scan-time advisor and
the tracepoints (the C core buffers its own; they are drained after each C call).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import numpy as np

from .._native import ffi, lib
from ..advisor import UINT, AdvisorCtx, scan_time_advisor
from ..checks import MAX_BATCHES, U32_MAX, as_count, as_int, check_clock
from ..constants import (
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
from ..guard import serialized
from ..knobs import check_file, format_sysfs, knob_text, parse_knob, sysfs_buffer
from ..timing import NSEC_PER_MSEC, CostModel
from ..tracing import Event, Tracer, scan_event

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


def _batch_rows(rows: np.ndarray) -> np.ndarray:
    """The C core's rows (processed, pages_sharing, ksm_zero_pages, rmap_items) with
    general_profit in place of rmap_items."""
    out = rows.copy()
    out[:, 3] = (rows[:, 1] + rows[:, 2]) * PAGE_SIZE - rows[:, 3] * SIZEOF_RMAP_ITEM
    return out


U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


class _MmSlot:
    __slots__ = ("mm",)

    def __init__(self, mm: Process) -> None:
        self.mm = mm


@serialized
class Ksm:
    """``m.ksm``: every file of /sys/kernel/mm/ksm/ as an attribute, and ksmd itself."""

    # set through object.__setattr__ (attribute writes of other names are sysfs writes)
    _m: Machine
    _guard: Any
    _knobs: dict[str, Any]  # ints, and advisor_mode's name
    _files: Any
    _slots: list[_MmSlot]
    _cursor: _MmSlot | None
    _address: int
    _clock_ns: int
    _cpu_ns: int
    _batch_pages: int
    _cost: CostModel
    _wake: int | None
    _advisor: AdvisorCtx
    _trace: Tracer

    def __init__(self, machine: Machine) -> None:
        object.__setattr__(self, "_m", machine)
        object.__setattr__(self, "_guard", machine._guard)
        object.__setattr__(self, "_knobs", dict(KNOB_DEFAULTS))
        profile = machine.profile
        object.__setattr__(self, "_files", profile.sysfs_files)
        c = machine.ctx
        c.max_page_sharing = 256
        c.merge_across_nodes = 1
        c.use_zero_pages = 0
        if not profile.has("smart_scan"):
            self._knobs["smart_scan"] = 0  # a ksmd without smart scan never skips
        c.smart_scan = int(self._knobs["smart_scan"])
        c.checksum_first = int(profile.has("checksum_first"))
        c.unshare_zero_pages = int(profile.has("unshare_zero_pages"))
        c.ksm_nr_node_ids = 1
        c.stable_node_chains_prune_millisecs = 2000
        c.zero_checksum = ZERO_CHECKSUM
        # the mm_slot list: ksm_mm_head is the None cursor value
        object.__setattr__(self, "_slots", [])
        object.__setattr__(self, "_cursor", None)
        object.__setattr__(self, "_address", 0)
        # simulated time (timing.py): the clock, ksmd's CPU time, and within a batch
        # the pages processed so far (the clock moves at the end of the batch)
        object.__setattr__(self, "_clock_ns", 0)
        object.__setattr__(self, "_cpu_ns", 0)
        object.__setattr__(self, "_batch_pages", 0)
        object.__setattr__(self, "_cost", CostModel())
        # when ksmd next wakes from its sleep, or None while it waits for work
        object.__setattr__(self, "_wake", None)
        object.__setattr__(self, "_advisor", AdvisorCtx())
        object.__setattr__(self, "_trace", Tracer(self._trace_switch))

    # ---- sysfs

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._files:
            raise AttributeError(f"/sys/kernel/mm/ksm has no file {name!r}")
        if name in KNOB_DEFAULTS:
            return self._knobs[name]
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
        checks in the kernel's order; a rejected write raises OSError and changes
        nothing (an EBUSY keeps the stale-node removals the kernel makes too)."""
        check_file(name, write=True, files=self._files)
        buf = sysfs_buffer(text)
        if buf is None:
            return  # an empty write never reaches the store
        c = self._m.ctx
        knobs = self._knobs
        if name == "pages_to_scan" and knobs["advisor_mode"] != "none":
            raise ksm_error(errno.EINVAL, "pages_to_scan is set by the advisor")
        value = parse_knob(name, buf)
        if name == "run":
            if value != knobs["run"]:
                knobs["run"] = value
                if int(value) & KSM_RUN_UNMERGE:
                    self._unmerge_and_remove_all_rmap_items()
            return
        if name in ("merge_across_nodes", "max_page_sharing"):
            if value == knobs[name]:
                return
            busy = c.pages_shared or lib.ksm_remove_all_stable_nodes(c)
            self._drain()
            if busy:
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
                self._set_advisor_defaults()
            return
        if name == "sleep_millisecs" and value != knobs[name] and self._wake is not None:
            # wake_up_interruptible(&ksm_iter_wait): a sleeping ksmd wakes at once
            self._wake = self._clock_ns
        knobs[name] = value
        if name in _CTX_KNOBS:
            setattr(c, _CTX_KNOBS[name], int(value))

    def stats(self, every: bool = False) -> dict[str, int | str]:
        """Every file of this kernel's /sys/kernel/mm/ksm; ``every``: also the values
        the model keeps for files the kernel profile does not have."""
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

    # ---- the mm_slot list (__ksm_enter, __ksm_exit)

    def _index(self, slot: _MmSlot) -> int:
        return next(i for i, s in enumerate(self._slots) if s is slot)

    def _slot_of(self, mm: Process) -> _MmSlot | None:
        return next((s for s in self._slots if s.mm is mm), None)

    def _ksm_enter(self, mm: Process) -> None:
        """__ksm_enter(): a slot just before the cursor (scanned last), or at the tail
        during run=2."""
        slot = _MmSlot(mm)
        if self._knobs["run"] & KSM_RUN_UNMERGE or self._cursor is None:
            self._slots.append(slot)  # at the tail (before the head when the cursor is there)
        else:
            self._slots.insert(self._index(self._cursor), slot)  # just before the cursor
        mm.ksm_registered = True
        if self._trace.active:
            self._trace.emit({"event": "ksm_enter", "mm": mm.pid})

    def _ksm_exit(self, mm: Process) -> None:
        """__ksm_exit(), for a registered mm: free the slot now if it has no
        rmap_items, else leave it to ksmd just after the cursor."""
        slot = self._slot_of(mm)
        if slot is not None and slot is not self._cursor:
            self._slots.remove(slot)
            if not self._m.mem.mm["mm_rmap_items"][mm.mm_id]:
                mm.ksm_registered = False
                mm.merge_any = False
            else:
                # ksmd frees its rmap_items next: move the slot just after the cursor
                at = 0 if self._cursor is None else self._index(self._cursor) + 1
                self._slots.insert(at, slot)
        if self._trace.active:
            self._trace.emit({"event": "ksm_exit", "mm": mm.pid})

    def _next(self, slot: _MmSlot | None) -> _MmSlot | None:
        if slot is None:
            return self._slots[0] if self._slots else None
        i = self._index(slot) + 1
        return self._slots[i] if i < len(self._slots) else None

    # ---- ksmd

    def _reserve(self, budget: int) -> None:
        if lib.ksm_reserve_batch(self._m.ctx, budget) != 0:
            raise MemoryError("cannot reserve KSM nodes")

    def _ksmd_should_run(self) -> bool:
        return bool(self._knobs["run"] & KSM_RUN_MERGE) and bool(self._slots)

    def do_scan(self, n: int) -> int:
        """One ksm_do_scan(n) if ksmd would run: returns the number of pages passed to
        cmp_and_merge_page. The batch costs simulated time and ksmd CPU time
        (cost_model): the clock stands at the batch's start (after its overhead)
        while it runs, and moves on by the pages' cost at its end."""
        n = as_count(n, "do_scan's page count", U32_MAX)  # scan_npages is unsigned int
        cost = self._cost
        check_clock(self._clock_ns + cost.batch(n), "the clock after this batch")
        if not self._ksmd_should_run():
            return 0
        self._charge(cost.batch_ns)
        self._batch_pages = 0
        processed = 0
        if n > 0:
            self._reserve(n)
            processed = self._scan_batch(n)
        self._batch_pages = 0
        self._charge(processed * cost.page_ns)
        return processed

    def do_scans(self, n: int, count: int) -> np.ndarray:
        """``count`` ksm_do_scan(n) batches back to back, as :meth:`do_scan` runs them
        one by one (each costs its time; no sleeps between them), stopping after the
        batch that ends a full scan. One row per batch (:data:`ksmcore.api.BATCH_COLUMNS`):
        pages processed, pages_sharing, ksm_zero_pages and general_profit after it.

        The C core counts the batches inside its page loop, so a whole run of
        batches costs one pass through Python rather than one per batch."""
        n = as_count(n, "do_scans' page count", U32_MAX)
        count = as_count(count, "do_scans' batch count", MAX_BATCHES)
        cost = self._cost
        check_clock(self._clock_ns + count * cost.batch(n), "the clock after these batches")
        rows = np.zeros((count + 1, lib.KSM_BATCH_LOG_COLS), np.int64)
        if count == 0 or not self._ksmd_should_run():
            return _batch_rows(rows[:0])
        if n == 0:
            # nothing counts into a batch: each runs alone (it processes no page)
            for i in range(count):
                if not self._ksmd_should_run():
                    return _batch_rows(rows[:i])
                seqnr = self._m.ctx.seqnr
                self.do_scan(0)
                rows[i] = self._batch_row(0)
                if self._m.ctx.seqnr != seqnr:
                    return _batch_rows(rows[: i + 1])
            return _batch_rows(rows[:count])
        c = self._m.ctx
        start, cpu = self._clock_ns, self._cpu_ns
        seqnr = c.seqnr
        self._charge(cost.batch_ns)  # the first batch's overhead
        c.batch_pages, c.batch_done = n, 0
        c.page_ns, c.batch_ns = cost.page_ns, cost.batch_ns
        c.batch_clock_ns = self._clock_ns
        c.batch_log, c.nr_batch_log, c.batch_log_cap = ffi.from_buffer("int64_t[]", rows), 0, count
        self._batch_pages = 0
        try:
            self._reserve(n * count)
            processed = self._scan_batch(n * count)
        finally:
            k = int(c.nr_batch_log)
            partial = c.seqnr != seqnr  # a full scan ended the last batch early
            if partial:
                rows[k] = self._batch_row(int(c.batch_done))
            c.batch_pages, c.batch_log, c.batch_log_cap = 0, ffi.NULL, 0
            self._batch_pages = 0
        batches = k + int(partial)
        total = batches * cost.batch_ns + processed * cost.page_ns
        self._cpu_ns = cpu + total
        self._set_clock(start + total)
        return _batch_rows(rows[:batches])

    def _batch_row(self, processed: int) -> list[int]:
        c = self._m.ctx
        return [processed, c.pages_sharing, c.ksm_zero_pages, c.rmap_items]

    def scan(self, full_scans: int = 1) -> None:
        """Run ksmd, a batch of pages_to_scan at a time, until full_scans grew by that
        many. The batches follow each other without ksmd's sleeps (run_for sleeps)."""
        full_scans = as_int(full_scans, "full_scans")
        if full_scans < 0:
            raise ValueError(f"full_scans must not be negative, not {full_scans}")
        # a full scan takes at least one batch: so many would pass ktime_t's range
        check_clock(self._clock_ns + full_scans * self._cost.batch_ns, "the clock after them")
        if self._knobs["run"] != KSM_RUN_MERGE:
            raise KsmdNotRunning(f"ksmd is not running (run = {self._knobs['run']}); set run = 1")
        c = self._m.ctx
        target = c.seqnr + full_scans
        while c.seqnr < target:
            # checked every batch: the advisor may set pages_to_scan to 0
            # (advisor_max_pages_to_scan = 0), and a batch may drop the last mm_slot
            if self._knobs["pages_to_scan"] == 0:
                raise KsmdNotRunning("pages_to_scan is 0: ksmd would never finish a scan")
            if not self._slots:
                raise KsmdNotRunning("no process has mergeable memory: ksmd sleeps")
            self.do_scan(self._knobs["pages_to_scan"])

    def _start_round(self) -> None:
        """The start of a full scan in scan_get_next_rmap_item()."""
        c = self._m.ctx
        self._advisor_start_scan()
        if self._trace.active:
            self._trace.emit(scan_event("ksm_start_scan", c.seqnr, c.rmap_items))
        lib.ksm_start_round(c)  # migrate_nodes pruning, unstable roots reset
        self._drain()

    def _stop_round(self, processed: int) -> None:
        """The end of a full scan: the advisor, the tracepoint, then full_scans++."""
        c = self._m.ctx
        if c.batch_pages:
            # in do_scans(): the clock of the batch the C core counted last
            self._clock_ns = int(c.batch_clock_ns)
            processed = int(c.batch_done)
        self._batch_pages = processed
        self._advisor_stop_scan()
        if self._trace.active:
            self._trace.emit(scan_event("ksm_stop_scan", c.seqnr, c.rmap_items))
        c.seqnr += 1

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
                for r in mm._regions():
                    lib.ksm_remove_rmap_items(c, r.slot_base, r.slot(r.end))
                    self._drain()
                mm.dead = []
                self._address = 0
            else:
                for r in mm._regions():
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
                            self._drain()
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
                        self._drain()
                        if not r.live and lo == r.start:
                            mm.dead.remove(r)
            slot = self._cursor
            self._cursor = self._next(slot)
            if self._address == 0:
                # a whole pass found no VM_MERGEABLE VMA: drop the mm, as __ksm_exit would
                self._slots.remove(slot)
                mm.ksm_registered = False
                if not self._m.profile.has("merge_any_kept"):
                    mm.merge_any = False
            if self._cursor is None:
                self._stop_round(processed)
                return processed
            self._address = 0

    def _unmerge_and_remove_all_rmap_items(self) -> None:
        c = self._m.ctx
        self._cursor = self._next(None)
        while self._cursor is not None:
            slot = self._cursor
            mm = slot.mm
            if not mm.exited:
                mm._unmerge_all()
            for r in mm._regions():
                lib.ksm_remove_rmap_items(c, r.slot_base, r.slot(r.end))
                self._drain()
            mm.dead = []
            self._cursor = self._next(slot)
            if mm.exited:
                self._slots.remove(slot)
                mm.ksm_registered = False
        lib.ksm_remove_all_stable_nodes(c)
        self._drain()
        c.seqnr = 0

    # ---- simulated time (timing.py)

    def _charge(self, ns: int) -> None:
        """ksmd worked for ns: the clock and its CPU time move on together."""
        self._cpu_ns += ns
        self._set_clock(self._clock_ns + ns)

    def _set_clock(self, ns: int) -> None:
        self._clock_ns = ns
        self._m.ctx.jiffies = ns // NSEC_PER_MSEC  # HZ=1000: a jiffy is a millisecond

    def _now(self) -> int:
        """ktime_get() within a batch: its start plus the pages processed so far."""
        return self._clock_ns + self._batch_pages * self._cost.page_ns

    def _cpu_now(self) -> int:
        """task_sched_runtime(ksmd), with the running batch's pages so far."""
        return self._cpu_ns + self._batch_pages * self._cost.page_ns

    def _run_for(self, ns: int) -> None:
        """ksm_scan_thread() for ``ns`` of simulated time: while ksmd should run, a
        batch of pages_to_scan, then a sleep of sleep_millisecs; otherwise it waits
        for work. A batch that starts before the end runs to its end."""
        end = check_clock(self._clock_ns + ns, "run_for's end")
        while True:
            if self._wake is None:  # waiting on ksm_thread_wait
                if not self._ksmd_should_run():
                    break
                self._wake = self._clock_ns  # woken when there was work
            if self._wake >= end:
                break
            self._set_clock(max(self._clock_ns, self._wake))
            if self._knobs["pages_to_scan"] == 0 and self._ksmd_should_run():
                # ksm_do_scan(0) changes nothing but time: all the wake-ups until the
                # end at once (with sleep_millisecs 0 they would be countless)
                period = round(self._cost.period(0, self._knobs["sleep_millisecs"]))
                k = max(1, -(-(end - self._clock_ns) // period))  # one is due now
                self._cpu_ns += k * self._cost.batch_ns
                self._set_clock(self._clock_ns + (k - 1) * period + self._cost.batch_ns)
                self._wake = self._clock_ns - self._cost.batch_ns + period
                continue
            start = self._clock_ns
            if self._ksmd_should_run():
                self.do_scan(self._knobs["pages_to_scan"])
            if self._ksmd_should_run():
                # msecs_to_jiffies() and schedule_timeout() (CostModel.wake)
                self._wake = self._cost.wake(start, self._clock_ns,
                                             self._knobs["sleep_millisecs"])
            else:
                self._wake = None
        self._set_clock(max(self._clock_ns, end))

    # ---- the scan-time advisor

    def _set_advisor_defaults(self) -> None:
        knobs = self._knobs
        if knobs["advisor_mode"] == "none":
            knobs["pages_to_scan"] = KNOB_DEFAULTS["pages_to_scan"]
        else:
            self._advisor = AdvisorCtx()
            knobs["pages_to_scan"] = int(knobs["advisor_min_pages_to_scan"]) & U32

    def _advisor_start_scan(self) -> None:
        if self._knobs["advisor_mode"] == "scan-time":
            self._advisor.start_scan = self._now()

    def _advisor_stop_scan(self) -> None:
        if self._knobs["advisor_mode"] == "scan-time":
            self._scan_time_advisor()

    def _scan_time_advisor(self) -> None:
        """scan_time_advisor() (ksmcore.advisor): pages_to_scan for the next scan."""
        pages, scan_time, cpu_percent = scan_time_advisor(
            self._advisor, self._knobs, self._now(), self._cpu_now())
        self._knobs["pages_to_scan"] = pages & UINT  # into an unsigned int
        if self._trace.active:
            self._trace.emit({"event": "ksm_advisor", "scan_time": scan_time,
                              "pages_to_scan": pages, "cpu_percent": cpu_percent})

    # ---- tracepoints

    def _trace_switch(self, active: bool) -> None:
        """The C core buffers its events only while someone subscribes."""
        c = self._m.ctx
        c.trace_enabled = 1 if active else 0
        if not active:
            c.nr_trace = 0

    def _drain(self) -> None:
        """Raise the events the C core buffered during the last call, in order."""
        c = self._m.ctx
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
            self._trace.emit(event)

    def _rmap_item_id(self, s: int) -> tuple[int, int]:
        """An rmap_item (a page-table slot) as (pid, address)."""
        mm = self._m._mms[self._m.mem.mm_of_slot(s)]
        for r in mm._regions():
            if r.slot_base <= s < r.slot(r.end):
                return mm.pid, r.start + ((s - r.slot_base) << PAGE_SHIFT)
        raise AssertionError(f"slot {s} is in no region of process {mm.pid}")
