"""The benchmark workloads of issue 5 and the runners that time them on the engine,
the reference and the kernel's ksmd with the same contents; ``ksmcore bench`` and the
pytest-benchmark suite in ``benchmarks/`` both use them.

- W1: one process, distinct random pages with 64 copies each, two full scans from cold.
- W2: as W1, with half of the pages unique.
- W3: a parent forks 15 children (16 processes); each then writes 10% of its pages.
- W4: 4 NUMA nodes, merge_across_nodes=0, pages migrated between full scans (three
  full scans, against two in the others).
Only the scans are timed: building the processes is set-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import MADV_MERGEABLE, PAGE_SIZE
from .workloads import Workload, w1_workload

MERGE_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
KNOBS = {"pages_to_scan": 100_000, "smart_scan": 0}


def w2_workload(npages: int = 262_144, copies: int = 64, seed: int = 2) -> Workload:
    """W2: as W1 with half the pages unique."""
    rng = np.random.default_rng(seed)
    half = npages // 2
    distinct = rng.integers(0, 256, size=(half // copies, PAGE_SIZE), dtype=np.uint8)
    dups = distinct[np.repeat(np.arange(len(distinct)), copies)]
    unique = rng.integers(0, 256, size=(npages - len(dups), PAGE_SIZE), dtype=np.uint8)
    pages = np.concatenate([dups, unique])[rng.permutation(npages)]
    return Workload("W2", [np.ascontiguousarray(pages)], knobs=dict(KNOBS), full_scans=2,
                    description=f"{npages} pages, half unique, half {len(distinct)} x {copies}")


@dataclass
class ForkTree:
    """W3: the parent's pages, then ``children`` forks that each overwrite ``writes``
    of their pages (the same indices in every process would be too kind: each child
    draws its own) with new unique contents."""

    parent: np.ndarray
    children: int
    writes: list[tuple[np.ndarray, np.ndarray]]  # per child: page indices, contents

    @property
    def npages(self) -> int:
        return len(self.parent) * (self.children + 1)


def w3_fork_tree(npages: int = 16_384, children: int = 15, fraction: float = 0.1,
                 seed: int = 3) -> ForkTree:
    rng = np.random.default_rng(seed)
    parent = w1_workload(npages=npages, copies=64, seed=seed).processes[0]
    k = int(npages * fraction)
    writes = [
        (np.sort(rng.choice(npages, k, replace=False)),
         rng.integers(0, 256, size=(k, PAGE_SIZE), dtype=np.uint8))
        for _ in range(children)
    ]
    return ForkTree(parent, children, writes)


def build_fork_tree(machine: Any, tree: ForkTree) -> list[Any]:
    """The W3 processes on a model machine: the parent madvises, then forks."""
    parent = machine.spawn()
    addr = parent.mmap(len(tree.parent))
    parent.fill(addr, tree.parent)
    parent.madvise(addr, len(tree.parent) * PAGE_SIZE, MADV_MERGEABLE)
    procs = [parent]
    for idx, contents in tree.writes:
        child = parent.fork()
        for i, page in zip(idx.tolist(), contents, strict=True):
            child.fill(addr + i * PAGE_SIZE, page[None, :])
        procs.append(child)
    return procs


@dataclass
class Timed:
    seconds: float
    npages: int
    stats: dict[str, Any]


def _timed_scans(m: Any, full_scans: int, between: Callable[[int], None] | None = None) -> float:
    m.ksm.run = 1
    t = 0.0
    for i in range(full_scans):
        t0 = time.perf_counter()
        m.ksm.scan(full_scans=1)
        t += time.perf_counter() - t0
        if between is not None and i + 1 < full_scans:
            between(i)
    return t


def time_workload(machine_cls: Any, w: Workload) -> Timed:
    """Set up ``w`` (untimed), then time its full scans from cold."""
    m = machine_cls()
    for pages in w.processes:
        p = m.spawn()
        addr = p.mmap(len(pages))
        p.fill(addr, pages)
        p.madvise(addr, len(pages) * PAGE_SIZE, MADV_MERGEABLE)
    for name, value in w.knobs.items():
        setattr(m.ksm, name, value)
    seconds = _timed_scans(m, w.full_scans)
    return Timed(seconds, w.npages, m.ksm.stats())


def time_fork_tree(machine_cls: Any, tree: ForkTree) -> Timed:
    m = machine_cls()
    build_fork_tree(m, tree)
    for name, value in KNOBS.items():
        setattr(m.ksm, name, value)
    seconds = _timed_scans(m, 2)
    return Timed(seconds, tree.npages, m.ksm.stats())


def time_numa_migrations(machine_cls: Any, npages: int = 65_536, nodes: int = 4,
                         migrate: float = 0.02, seed: int = 4) -> Timed:
    """W4: W1-like contents in one process per node, merge_across_nodes=0; between
    three full scans, ``migrate`` of the pages move to another node."""
    rng = np.random.default_rng(seed)
    m = machine_cls(nodes=nodes)
    m.ksm.merge_across_nodes = 0
    per = npages // nodes
    procs = []
    for nid in range(nodes):
        pages = w1_workload(npages=per, copies=64, seed=seed).processes[0]
        p = m.spawn(node=nid)
        addr = p.mmap(per)
        p.fill(addr, pages)
        p.madvise(addr, per * PAGE_SIZE, MADV_MERGEABLE)
        procs.append((p, addr))
    for name, value in KNOBS.items():
        setattr(m.ksm, name, value)

    def migrate_some(_: int) -> None:
        for p, addr in procs:
            for i in rng.choice(per, int(per * migrate), replace=False).tolist():
                pfn = p.pfn(addr + i * PAGE_SIZE)
                if pfn:
                    m.migrate_page(pfn, int(rng.integers(0, nodes)))

    seconds = _timed_scans(m, 3, migrate_some)
    return Timed(seconds, npages, m.ksm.stats())


def merge_counters(stats: dict[str, Any]) -> dict[str, int]:
    return {k: int(stats[k]) for k in MERGE_COUNTERS}


# ---------------------------------------------------------------------------------
# ksmcore bench: the table


@dataclass
class Row:
    workload: str
    impl: str
    seconds: float
    npages: int

    @property
    def pages_per_s(self) -> float:
        return self.npages / self.seconds

    @property
    def mib_per_s(self) -> float:
        return self.npages * PAGE_SIZE / 2**20 / self.seconds


def bench_rows(scale: float = 1.0, kernel: bool = True, reference: bool = True,
               log: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Time W1-W4 on the engine, the kernel (where it can run them) and the reference
    (on slices), checking that the engine and the kernel merge the same way."""
    import ksmcore
    import ksmcore.reference

    from .kernel import kernel_available, time_kernel

    use_kernel = kernel and kernel_available()[0]
    n = max(4096, int(262_144 * scale))
    rows: list[Row] = []

    def add(workload: str, impl: str, t: Timed) -> None:
        rows.append(Row(workload, impl, t.seconds, t.npages))
        log(f"{workload} {impl}: {t.npages} pages in {t.seconds:.3f} s")

    for name, make in (("W1", w1_workload), ("W2", w2_workload)):
        w = make(npages=n)
        engine = time_workload(ksmcore.Machine, w)
        add(name, "engine", engine)
        if use_kernel:
            seconds, result = time_kernel(w)
            got = {k: result.counters[k] for k in MERGE_COUNTERS}
            if got != merge_counters(engine.stats):
                raise RuntimeError(f"{name}: the kernel merged {got}, the engine "
                                   f"{merge_counters(engine.stats)}")
            add(name, "kernel", Timed(seconds, w.npages, result.sysfs))
        if reference:
            add(name, "reference", time_workload(ksmcore.reference.Machine, make(npages=4096)))
    tree = w3_fork_tree(npages=max(1024, n // 16))
    engine = time_fork_tree(ksmcore.Machine, tree)
    add("W3", "engine", engine)
    if use_kernel:
        w = Workload("W3", [tree.parent], knobs=dict(KNOBS), full_scans=2)
        seconds, result = time_kernel(w, writes=tree.writes)
        if {k: result.counters[k] for k in MERGE_COUNTERS} != merge_counters(engine.stats):
            raise RuntimeError("W3: the kernel and the engine merged differently")
        add("W3", "kernel", Timed(seconds, tree.npages, result.sysfs))
    if reference:
        add("W3", "reference", time_fork_tree(ksmcore.reference.Machine, w3_fork_tree(1024)))
    add("W4", "engine", time_numa_migrations(ksmcore.Machine, npages=n))
    if reference:
        add("W4", "reference", time_numa_migrations(ksmcore.reference.Machine, npages=8192))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'workload':<9}{'impl':<11}{'pages':>9}{'seconds':>10}{'pages/s':>12}"
             f"{'MiB/s':>9}  engine is"]
    per_page = {(r.workload, r.impl): r.seconds / r.npages for r in rows}
    for r in rows:
        ratio = ""
        e = per_page.get((r.workload, "engine"))
        if e is not None and r.impl != "engine":
            ratio = f"{per_page[(r.workload, r.impl)] / e:.1f}x faster than {r.impl}"
        lines.append(f"{r.workload:<9}{r.impl:<11}{r.npages:>9}{r.seconds:>10.3f}"
                     f"{r.pages_per_s:>12,.0f}{r.mib_per_s:>9,.0f}  {ratio}")
    return "\n".join(lines)
