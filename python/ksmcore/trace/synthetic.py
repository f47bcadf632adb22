"""Traces made up in memory: the workloads of the tests and benchmarks, without
recording live processes.

:func:`moving_trace` follows :mod:`.moving`'s groups: every process has the same
groups; ``fresh`` pages get new random bytes, ``same`` pages are rewritten with their
own bytes (recorded as a write of the same content, as ``record`` sees it when it can:
as root under a running KSM, or with soft-dirty bits), ``converge`` pages take a page
common to every process, one after another.
"""

from __future__ import annotations

import io

import numpy as np

from ..constants import PAGE_SIZE
from .format import Trace, TraceWriter, read_trace
from .moving import Group, _common

BASE_VPN = 0x10000


def moving_trace(groups: list[Group], processes: int = 3, seconds: float = 10.0,
                 interval_ms: int = 100, seed: int = 1, common_seed: int = 7) -> Trace:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    w = TraceWriter(buf, {"interval_ms": interval_ms, "method": "synthetic"})
    npages = sum(g.count for g in groups)
    mems = []
    starts = []
    first = 0
    for g in groups:
        starts.append(first)
        first += g.count
    target = _common(common_seed, 10_000, 1)[0]
    for i in range(processes):
        mem = np.empty((npages, PAGE_SIZE), np.uint8)
        for gi, g in enumerate(groups):
            part = mem[starts[gi] : starts[gi] + g.count]
            if g.init == "common":
                part[:] = _common(common_seed, gi, g.count)
            elif g.init == "private":
                part[:] = rng.integers(0, 256, part.shape, np.uint8)
            else:
                part[:] = 0
        mems.append(mem)
        idx = w.process(1000 + i, f"synthetic {i}")
        w.changes(0, idx, BASE_VPN + np.arange(npages), mem,
                  maps=[(BASE_VPN << 12, (BASE_VPN + npages) << 12)])
    w.tick(0)
    step = interval_ms * 1_000_000
    nxt = [[0] * len(groups) for _ in range(processes)]
    k = 1
    while k * step <= seconds * 1e9 + 1:
        t = k * step
        for i, mem in enumerate(mems):
            written: set[int] = set()
            for gi, g in enumerate(groups):
                if not g.mode or g.rate <= 0:
                    continue
                n = int(k * interval_ms * g.rate / 1000) - int((k - 1) * interval_ms * g.rate
                                                                / 1000)
                if n <= 0:
                    continue
                if g.mode == "converge":
                    j = starts[gi] + np.arange(nxt[i][gi], min(g.count, nxt[i][gi] + n))
                    nxt[i][gi] += len(j)
                    mem[j] = target
                else:
                    j = starts[gi] + rng.integers(0, g.count, n)
                    if g.mode == "fresh":
                        mem[j] = rng.integers(0, 256, (n, PAGE_SIZE), np.uint8)
                written.update(j.tolist())
            if written:
                rows = np.array(sorted(written))
                w.changes(t, i, BASE_VPN + rows, mem[rows])
        w.tick(t)
        k += 1
    w.close()
    return read_trace(buf.getvalue())


def issue_workload(seconds: float = 60.0, interval_ms: int = 100) -> Trace:
    """The workload of the issue: three processes of 3,000 pages each: a third common
    to all (rewritten with their own bytes at 1,500 pages/s), a third private, a third
    rewritten with fresh random bytes at 200 pages/s."""
    groups = [Group(1000, "common", "same", 1500.0), Group(1000, "private"),
              Group(1000, "private", "fresh", 200.0)]
    return moving_trace(groups, 3, seconds, interval_ms)


def _word_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pages of 64-bit words with 16 random low bits: pointers, counters, small ints
    (about 4x compressible, like the live memory of this machine's processes)."""
    return (rng.integers(0, 1 << 16, (n, PAGE_SIZE // 8), np.uint64)).view(np.uint8)


def budget_trace(npages: int, seconds: int, rate: float, span: int = 256, seed: int = 3,
                 codec: str = "zlib") -> tuple[int, int, int]:
    """A trace of one process of ``npages`` pages (20% zero, 10% repeated, 70% word
    pages), ``rate`` of its pages written each second (``span`` bytes of new words
    each), recorded for ``seconds`` at 1 s intervals: its bytes, the page writes, and
    the entropy of what it holds (no lossless trace can be smaller)."""
    rng = np.random.default_rng(seed)
    pages = _word_pages(rng, npages)
    nzero, rep = npages // 5, npages // 10
    pages[:nzero] = 0
    pages[nzero : nzero + rep] = pages[nzero + rep]
    buf = io.BytesIO()
    w = TraceWriter(buf, codec=codec)
    p = w.process(1, "synthetic")
    w.changes(0, p, np.arange(npages), pages)
    w.tick(0)
    writes = 0
    per_s = int(npages * rate)
    for s in range(1, seconds + 1):
        idx = np.unique(rng.integers(0, npages, per_s))
        off = int(rng.integers(0, (PAGE_SIZE - span) // 8 + 1)) * 8
        pages[idx, off : off + span] = _word_pages(rng, len(idx))[:, :span]
        w.changes(s * 10**9, p, idx, pages[idx])
        w.tick(s * 10**9)
        writes += len(idx)
    w.close()
    entropy = (npages - nzero - rep + 1) * PAGE_SIZE // 4 + writes * span // 4
    return w.bytes_written, writes, entropy
