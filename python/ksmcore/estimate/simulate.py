"""Running ksmd on the sources until its counters converge, on a simulated clock.

**Convergence.** After each full scan the savings counters ``pages_shared``,
``pages_sharing`` and ``ksm_zero_pages`` are noted. ksmd has converged when two
consecutive full scans changed none of them, counting from full scan 2 (the first
scan only records checksums, so nothing can merge before the second). The counters
were final from the first full scan of that unchanged run on (``converged_at``,
at least 2); the time ksmd needs is the time at the end of that scan. With static
memory the usual answer is: final at scan 2, confirmed by scans 3 and 4. The split
between ``pages_unshared`` and ``pages_volatile`` is left out on purpose: with
smart_scan, skipped pages move between them from scan to scan without anything
merging.

**Time.** ksmd runs ``ksm_do_scan(pages_to_scan)`` and then sleeps
``sleep_millisecs``; a batch costs ``cost_per_page`` for every page it passes to
``cmp_and_merge_page()`` (the batch's return value; smart-scan skips are free).
The run records the pages processed per batch and :func:`ksmd_times` turns them into
times afterwards, with the machine's own cost per page (``ksmcore.timing.CostModel``,
what ``m.run_for`` charges), so that ``tune`` can reuse one run for every
``sleep_millisecs``. That is exact because only chain pruning reads the clock, and it
is gated by ``stable_node_chains_prune_millisecs`` alone: the run keeps the machine's
clock still, so chains are pruned as in a kernel that scans faster than that gate.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..api import MachineAPI, ProcessAPI
from ..constants import MADV_MERGEABLE, PAGE_SIZE
from ..images import populate
from ..profiles import resolve as resolve_profile
from ..thp import THP_ENABLED_DEFAULT
from ..timing import CostModel
from .errors import EXIT_USAGE, EstimateError
from .sources import Source, check_node

# The machine's default cost model, measured on this project's kernel (about 2.6 us
# per page ksmd scans).
DEFAULT_COST_PER_PAGE_US = CostModel().page_ns / 1000
SAVINGS = ("pages_shared", "pages_sharing", "ksm_zero_pages")
MIN_FULL_SCANS = 2  # nothing can merge before the second full scan
STILL_SCANS = 2  # full scans that must change nothing
PAGES_PER_CALL = 1 << 16  # ksmd's batches run this many pages per do_scans() call


@dataclass(frozen=True)
class Knobs:
    """The /sys/kernel/mm/ksm knobs an estimate sets, with the kernel's defaults."""

    merge_across_nodes: int = 1
    max_page_sharing: int = 256
    pages_to_scan: int = 100
    sleep_millisecs: int = 20
    smart_scan: int = 1
    use_zero_pages: int = 0
    kernel: str | None = None  # the kernel profile (ksmcore.profiles); None: the running one

    def as_dict(self) -> dict[str, int]:
        # merge_across_nodes and max_page_sharing first: the kernel takes them only
        # while no KSM page exists.
        return {
            "merge_across_nodes": self.merge_across_nodes,
            "max_page_sharing": self.max_page_sharing,
            "pages_to_scan": self.pages_to_scan,
            "sleep_millisecs": self.sleep_millisecs,
            "smart_scan": self.smart_scan,
            "use_zero_pages": self.use_zero_pages,
        }


def ksmd_times(processed: np.ndarray, sleep_millisecs: int, cost_per_page_s: float) -> np.ndarray:
    """Seconds from ``run=1`` to the end of each batch's work (before its sleep): every
    batch costs its pages times ``cost_per_page_s`` and is followed by a sleep."""
    busy = np.cumsum(np.asarray(processed, dtype=np.float64)) * cost_per_page_s
    return busy + np.arange(len(processed)) * (sleep_millisecs / 1000.0)


def pages_per_second(pages_to_scan: int, sleep_millisecs: int, cost_per_page_s: float) -> float:
    """ksmd's steady scan rate: a full batch, then a sleep (the CPU cost proxy)."""
    period = pages_to_scan * cost_per_page_s + sleep_millisecs / 1000.0
    return pages_to_scan / period if period > 0 else float("inf")


def cpu_fraction(pages_to_scan: int, sleep_millisecs: int, cost_per_page_s: float) -> float:
    """The share of one CPU ksmd uses while it scans."""
    busy = pages_to_scan * cost_per_page_s
    period = busy + sleep_millisecs / 1000.0
    return busy / period if period > 0 else 1.0


def knob_option(name: str) -> str:
    return "--" + name.replace("_", "-")


def new_machine(nodes: int, knobs: Knobs, machine_cls: Callable[..., MachineAPI] | None = None,
                thp: str = THP_ENABLED_DEFAULT) -> MachineAPI:
    """A machine with ``nodes`` nodes and the knobs set (invalid values are refused
    with the kernel's errno, reported as the option that set them); ``thp`` is its
    transparent_hugepage/enabled."""
    if machine_cls is None:
        from .. import Machine

        machine_cls = Machine
    try:
        profile = resolve_profile(knobs.kernel)
    except OSError as e:
        raise EstimateError(f"--kernel {knobs.kernel}: {e.strerror}", EXIT_USAGE) from None
    try:
        m = machine_cls(nodes=nodes, kernel=profile)
    except OSError:
        raise EstimateError(f"--nodes {nodes}: expected 1..64", EXIT_USAGE) from None
    try:
        m.thp_enabled = thp
    except OSError:
        raise EstimateError(f"--thp {thp}: expected always, madvise or never",
                            EXIT_USAGE) from None
    if knobs.pages_to_scan == 0:
        raise EstimateError("--pages-to-scan 0: ksmd would never scan a page", EXIT_USAGE)
    for name, value in knobs.as_dict().items():
        if name not in profile.sysfs_files:
            continue  # a knob this kernel does not have (smart_scan before 6.7)
        try:
            setattr(m.ksm, name, value)
        except OSError as e:
            raise EstimateError(f"{knob_option(name)} {value}: refused ({refusal(e)})",
                                EXIT_USAGE) from None
    return m


def refusal(e: OSError) -> str:
    """The errno's name once, then what was wrong (a re-raised error may carry the
    errno's text twice: "Invalid argument: Invalid argument: ...")."""
    why = e.strerror or ""
    prefix = os.strerror(e.errno) + ": " if e.errno else ""
    while prefix and why.startswith(prefix + prefix):
        why = why[len(prefix):]
    return why or errno.errorcode.get(e.errno or 0, "invalid")


def load(m: MachineAPI, sources: Sequence[Source]) -> list[ProcessAPI]:
    """One process per source, one MADV_MERGEABLE mapping per segment, in order (the
    order of the mm_slot list, i.e. the order ksmd scans them in). A segment marked
    ``hugepage`` is mapped as guest RAM is (huge pages where ``m.thp_enabled`` allows);
    a live process's segments that huge pages back now are huge whatever it says."""
    procs = []
    # the run's memory was checked against --max-memory (commands.check_memory)
    m.max_pages = max(m.max_pages, sum(src.npages for src in sources))
    for src in sources:
        check_node(src.node, m.nodes, src.name)
        # the process runs on its memory's node (its home node, for later COW copies)
        p = m.spawn() if src.node is None else m.spawn(node=src.node)
        enabled = m.thp_enabled
        if src.kind == "process":
            m.thp_enabled = "madvise"  # what the process has: huge pages where it has them
        for i, seg in enumerate(src.segments):
            huge = bool(src.hugepage[i]) if i < len(src.hugepage) else False
            populate(seg)  # the first scan reads every page of it
            addr = p.mmap_image(seg, node=src.node, hugepage=huge)
            p.madvise(addr, len(seg) * PAGE_SIZE, MADV_MERGEABLE)
        m.thp_enabled = enabled
        procs.append(p)
    return procs


@dataclass
class Run:
    """What ksmd did, batch by batch, until convergence (or ``max_scans``)."""

    processed: np.ndarray  # pages passed to cmp_and_merge_page, per batch
    saved: np.ndarray  # pages_sharing + ksm_zero_pages after each batch
    profit: np.ndarray  # general_profit after each batch
    scan_ends: np.ndarray  # index of the batch that ended each full scan
    scans: list[dict[str, Any]] = field(default_factory=list)  # stats() after each full scan
    converged: bool = False
    converged_at: int = 0  # the full scan from which the savings were final

    @property
    def full_scans(self) -> int:
        return len(self.scans)


def converged_at_scan(scans: list[dict[str, Any]]) -> int | None:
    """The first full scan of the final unchanged run, once STILL_SCANS scans after it
    changed nothing; else None."""
    k = len(scans)
    if k < MIN_FULL_SCANS + STILL_SCANS:
        return None
    final = tuple(scans[-1][n] for n in SAVINGS)
    if any(tuple(s[n] for n in SAVINGS) != final for s in scans[k - 1 - STILL_SCANS :]):
        return None
    j = k - STILL_SCANS
    while j - 1 >= MIN_FULL_SCANS and tuple(scans[j - 2][n] for n in SAVINGS) == final:
        j -= 1
    return j


BatchHook = Callable[[int, dict[str, Any]], None]


def run_ksmd(m: MachineAPI, max_scans: int = 50, on_batch: BatchHook | None = None) -> Run:
    """ksmd from ``run=1`` until convergence or ``max_scans`` full scans."""
    processed: list[int] = []
    saved: list[int] = []
    profit: list[int] = []
    ends: list[int] = []
    scans: list[dict[str, Any]] = []
    run = Run(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
              np.zeros(0, np.int64))
    if not any(p.maps() for p in m.processes):
        run.converged = True  # nothing to scan: ksmd would sleep
        return run
    m.ksm.run = 1
    while len(scans) < max_scans:
        # many batches a call (do_scans returns each batch's counters), up to the end
        # of the full scan; pages_to_scan is read again after it (the advisor sets it)
        pts = int(m.ksm.pages_to_scan)
        rows = m.ksm.do_scans(pts, max(1, PAGES_PER_CALL // max(pts, 1)))
        if not len(rows):
            break  # ksmd would not run: nothing is registered any more
        processed.extend(rows[:, 0].tolist())
        saved.extend((rows[:, 1] + rows[:, 2]).tolist())
        profit.extend(rows[:, 3].tolist())
        s = m.ksm.stats(every=True)  # with what the model keeps beyond this kernel's files
        if on_batch is not None:
            on_batch(int(rows[:, 0].sum()), s)
        if int(s["full_scans"]) > len(scans):
            ends.append(len(processed) - 1)
            scans.append(s)
            at = converged_at_scan(scans)
            if at is not None:
                run.converged, run.converged_at = True, at
                break
    run.processed = np.array(processed, np.int64)
    run.saved = np.array(saved, np.int64)
    run.profit = np.array(profit, np.int64)
    run.scan_ends = np.array(ends, np.int64)
    run.scans = scans
    if not run.converged:
        run.converged_at = len(scans)
    return run


def milestone_times(saved: np.ndarray, times: np.ndarray, target: int,
                    fractions: Sequence[float] = (0.5, 0.9, 1.0)) -> dict[str, float | None]:
    """The first time the savings reached each fraction of ``target`` pages (None: never,
    or nothing to save)."""
    out: dict[str, float | None] = {}
    for f in fractions:
        key = f"{round(f * 100)}%"
        if target <= 0 or not len(saved):
            out[key] = None
            continue
        reached = np.flatnonzero(saved >= f * target - 1e-9)
        out[key] = float(times[reached[0]]) if len(reached) else None
    return out
