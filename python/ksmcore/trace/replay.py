"""Replaying a trace onto a machine: the recorded changes, at their times, while ksmd
runs on the simulated clock (``Machine.run_for``).

Each trace process becomes one process of the machine, in trace order (the order of
the mm_slot list). Its mappings become private anonymous mappings, madvised
MADV_MERGEABLE (the recording chose the ranges KSM would scan); a page that is
present in the trace is written there with ``Process.fill_pages`` (one call per
process and change time), a page that is no longer present is dropped with MADV_DONTNEED, a
mapping that is gone is unmapped, and an exited process exits. The machine's own
addresses differ from the recorded ones: a mapping that grows gets a new mapping for
its new part (scanned after the older mappings of its process, where the kernel would
scan it in address order).

Between two changes ksmd runs (``m.run_for``) with the machine's knobs and cost
model; the timeline samples every sysfs counter at every change time and at least
every ``sample_ms``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..constants import MADV_MERGEABLE, PAGE_SHIFT, PAGE_SIZE
from .format import ABSENT, Change, Trace

MADV_DONTNEED = 4
SAMPLE_MS = 1000


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the sorted disjoint intervals ``a`` outside those of ``b``."""
    out = []
    for s, e in a:
        cur = s
        for bs, be in b:
            if be <= cur or bs >= e:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
            if cur >= e:
                break
        if cur < e:
            out.append((cur, e))
    return out


def _merge(maps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(maps):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > s:
            out.append((s, e))
    return out


def runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of values that grow by PAGE_SIZE."""
    if not len(values):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cut = np.flatnonzero(np.diff(values) != PAGE_SIZE) + 1
    starts = np.concatenate([[0], cut])
    return starts, np.diff(np.concatenate([starts, [len(values)]]))


class _Space:
    """One trace process on the machine: its mappings, as segments of trace pages
    [first, end) mapped at a machine address."""

    def __init__(self, proc: Any) -> None:
        self.p = proc
        self.maps: list[tuple[int, int]] = []  # trace page intervals, merged
        self.first = np.zeros(0, np.int64)
        self.end = np.zeros(0, np.int64)
        self.addr = np.zeros(0, np.int64)

    def set_maps(self, maps: list[tuple[int, int]]) -> None:
        new = _merge([(s >> PAGE_SHIFT, e >> PAGE_SHIFT) for s, e in maps])
        gone = _subtract(self.maps, new)
        added = _subtract(new, self.maps)
        segs = list(zip(self.first.tolist(), self.end.tolist(), self.addr.tolist(), strict=True))
        for gs, ge in gone:
            kept = []
            for s, e, a in segs:
                lo, hi = max(s, gs), min(e, ge)
                if lo >= hi:
                    kept.append((s, e, a))
                    continue
                self.p.munmap(a + (lo - s) * PAGE_SIZE, (hi - lo) * PAGE_SIZE)
                if s < lo:
                    kept.append((s, lo, a))
                if hi < e:
                    kept.append((hi, e, a + (hi - s) * PAGE_SIZE))
            segs = kept
        for s, e in added:
            a = self.p.mmap(e - s)
            self.p.madvise(a, (e - s) * PAGE_SIZE, MADV_MERGEABLE)
            segs.append((s, e, a))
        segs.sort()
        self.maps = new
        self.first = np.array([s for s, _, _ in segs], np.int64)
        self.end = np.array([e for _, e, _ in segs], np.int64)
        self.addr = np.array([a for _, _, a in segs], np.int64)

    def addresses(self, vpns: np.ndarray) -> np.ndarray:
        """Machine addresses of trace pages (-1 where no mapping holds them)."""
        v = vpns.astype(np.int64)
        i = np.searchsorted(self.first, v, side="right") - 1
        ok = (i >= 0) & (v < self.end[np.maximum(i, 0)]) if len(self.first) \
            else np.zeros(len(v), bool)
        out = np.full(len(v), -1, np.int64)
        j = i[ok]
        out[ok] = self.addr[j] + (v[ok] - self.first[j]) * PAGE_SIZE
        return out


@dataclass
class Replay:
    """What a replay did: the timeline and the machine's processes."""

    timeline: list[dict[str, Any]] = field(default_factory=list)
    processes: list[Any] = field(default_factory=list)  # None for one never started
    pages_written: int = 0
    pages_dropped: int = 0
    pages_outside: int = 0  # changes outside every recorded mapping (left out)
    duration: float = 0.0


def _row(m: Any, t0: int) -> dict[str, Any]:
    row: dict[str, Any] = {"t": round((m.clock_ns - t0) / 1e9, 6)}
    row.update(m.ksm.stats())
    row["ksmd_cpu_ns"] = int(m.ksmd_cpu_ns)
    ctx = getattr(m, "ctx", None)
    cow = getattr(ctx, "cow_ksm", None)
    if cow is not None:
        row["cow_ksm"] = int(cow)
    return row


class Replayer:
    """Applies a trace's changes onto a machine, change time by change time."""

    def __init__(self, trace: Trace, m: Any) -> None:
        self.trace = trace
        self.m = m
        self.spaces: list[_Space | None] = [None] * len(trace.processes)
        self.result = Replay(processes=[None] * len(trace.processes))

    def _space(self, c: Change) -> _Space:
        sp = self.spaces[c.proc]
        if sp is None:
            node = self.trace.processes[c.proc].node
            p = self.m.spawn() if node is None else self.m.spawn(node=node)
            sp = self.spaces[c.proc] = _Space(p)
            self.result.processes[c.proc] = p
        return sp

    def apply(self, c: Change) -> None:
        sp = self._space(c)
        if sp.p is None:
            return
        if c.maps is not None:
            sp.set_maps(c.maps)
        if len(c.vpns):
            addrs = sp.addresses(c.vpns)
            inside = addrs >= 0
            self.result.pages_outside += int((~inside).sum())
            present = inside & (c.ids != ABSENT)
            gone = inside & (c.ids == ABSENT)
            self._write(sp.p, addrs[present], c.ids[present])
            self._drop(sp.p, addrs[gone])
        if c.exited:
            sp.p.exit()
            sp.p = None

    def _write(self, p: Any, addrs: np.ndarray, ids: np.ndarray) -> None:
        """One fill_pages call per process and change time (the pages in address
        order, as the recorder found them)."""
        if not len(addrs):
            return
        order = np.argsort(addrs, kind="stable")
        p.fill_pages(addrs[order], self.trace.contents[ids[order]])
        self.result.pages_written += len(addrs)

    def _drop(self, p: Any, addrs: np.ndarray) -> None:
        if not len(addrs):
            return
        addrs = np.sort(addrs)
        starts, lengths = runs(addrs)
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            p.madvise(int(addrs[s]), n * PAGE_SIZE, MADV_DONTNEED)
        self.result.pages_dropped += len(addrs)


def replay(trace: Trace, m: Any, sample_ms: int = SAMPLE_MS, start_ksmd: bool = True,
           on_row: Callable[[dict[str, Any]], None] | None = None) -> Replay:
    """Replay ``trace`` onto machine ``m`` (its knobs and cost model already set):
    the initial pages, then ``run=1`` (``start_ksmd``), then every change at its time
    while ksmd runs. Returns the timeline: a row (``t`` in seconds since the trace's
    start, every sysfs file by name, ``ksmd_cpu_ns``, and ``cow_ksm``, copies of KSM
    pages on write, where the machine counts them) at every change time and at least
    every ``sample_ms``."""
    if sample_ms <= 0:
        raise ValueError("sample_ms must be positive")
    r = Replayer(trace, m)
    t0 = m.clock_ns
    step = sample_ms * 1_000_000
    groups: list[tuple[int, list[Change]]] = []
    for c in trace.changes:
        if groups and groups[-1][0] == c.t_ns:
            groups[-1][1].append(c)
        else:
            groups.append((c.t_ns, [c]))
    end = trace.end_ns
    gi = 0
    k = 0
    started = False

    def sample() -> None:
        row = _row(m, t0)
        r.result.timeline.append(row)
        if on_row is not None:
            on_row(row)

    while True:
        t_change = groups[gi][0] if gi < len(groups) else None
        t_sample = k * step if k * step <= end else None
        if t_change is None and t_sample is None:
            break
        due = min(t for t in (t_change, t_sample) if t is not None)
        now = m.clock_ns - t0
        if due > now:
            m.run_for((due - now) / 1e9)
        if t_change is not None and t_change <= due:
            for c in groups[gi][1]:
                r.apply(c)
            gi += 1
            if not started and start_ksmd:
                m.ksm.run = 1
                started = True
            sample()
            if t_sample == t_change:
                k += 1
        else:
            sample()
            k += 1
    r.result.duration = end / 1e9
    return r.result


STEADY_KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
               "ksm_zero_pages", "general_profit")


def steady_state(timeline: list[dict[str, Any]], duration: float,
                 since: float | None = None) -> dict[str, Any]:
    """Means from ``since`` (default: the second half of the trace) to the end,
    weighted by time (each row holds until the next one, the last until the end), and
    the rates over that span: memory saved (pages_sharing + ksm_zero_pages), pages
    copied on write per second (``cow_ksm``), ksmd's CPU (a fraction of one CPU), full
    scans and pages scanned per second."""
    start = duration / 2 if since is None else since
    rows = [r for r in timeline if r["t"] >= start - 1e-9]
    out: dict[str, Any] = {"from_s": start, "to_s": duration, "rows": len(rows)}
    if not rows:
        return out
    # Weighted by time: a replay has a row at every change time besides its regular
    # samples, so a plain mean of rows would weigh the spans with writes more than
    # the quiet ones (pages_volatile +26% on a workload whose last quarter is static).
    # The last row before the window holds at its start.
    before = [r for r in timeline if r["t"] < start - 1e-9]
    held = before[-1:] + rows
    times = np.array([float(r["t"]) for r in held])
    upto = np.append(times[1:], max(duration, float(times[-1])))
    weights = np.clip(upto, start, None) - np.clip(times, start, None)
    if weights.sum() <= 0:
        held, weights = rows, np.ones(len(rows))
    for k in STEADY_KEYS:
        out[k] = float(np.average([float(r[k]) for r in held], weights=weights))
    out["saved_pages"] = out["pages_sharing"] + out["ksm_zero_pages"]
    out["saved_mib"] = out["saved_pages"] * PAGE_SIZE / 2**20
    out["general_profit_mib"] = out["general_profit"] / 2**20
    first, last = rows[0], rows[-1]
    span = last["t"] - first["t"]
    if span > 0:
        out["cpu_fraction"] = (last["ksmd_cpu_ns"] - first["ksmd_cpu_ns"]) / 1e9 / span
        out["full_scans_per_s"] = (last["full_scans"] - first["full_scans"]) / span
        out["pages_scanned_per_s"] = (last["pages_scanned"] - first["pages_scanned"]) / span
        if "cow_ksm" in last:
            out["cow_per_s"] = (last["cow_ksm"] - first["cow_ksm"]) / span
    return out
