"""Workloads shared by the model tests and the kernel parity harness.

A :class:`Workload` is what one parity check runs: the contents of one mergeable
anonymous mapping per process, the ksm knobs, and how many full scans to wait for.
:func:`run_model` runs it through a model ``Machine`` (``ksmcore.Machine`` or
``ksmcore.reference.Machine``); :func:`ksmcore.kernel.run_kernel` runs it through the
real ksmd. Both return a :class:`Result` of the same shape, so ``==`` compares them.

:func:`parity_workloads` is the library of generated workloads (seeded, deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constants import (
    COUNTERS,
    KNOB_DEFAULTS,
    KSM_STAT_FIELDS,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    PAGE_SIZE,
)
from .thp import HPAGE_PMD_NR

# The knobs a workload may set; the harness sets the others (sleep_millisecs, run,
# advisor_*) itself. Every one of these is written on every run, to the workload's
# value or to its default, so results never depend on what ran before.
WORKLOAD_KNOBS = (
    "merge_across_nodes",
    "max_page_sharing",
    "pages_to_scan",
    "smart_scan",
    "use_zero_pages",
    "stable_node_chains_prune_millisecs",
)

# Counters that are cumulative since boot on the kernel: a Result holds their growth.
CUMULATIVE = ("pages_scanned", "pages_skipped")


@dataclass
class Workload:
    """One process per entry of ``processes``: the rows of the array are the pages of
    that process's single MADV_MERGEABLE private anonymous mapping."""

    name: str
    processes: list[np.ndarray]
    knobs: dict[str, int] = field(default_factory=dict)
    full_scans: int = 2
    description: str = ""
    # THP-backed: each mapping (a whole number of 2 MiB) is PMD-aligned and
    # MADV_HUGEPAGE before its first fault, instead of MADV_NOHUGEPAGE
    thp: bool = False

    def __post_init__(self) -> None:
        if not self.processes:
            raise ValueError(f"{self.name}: a workload needs at least one process")
        for i, arr in enumerate(self.processes):
            if (
                arr.dtype != np.uint8
                or arr.ndim != 2
                or arr.shape[0] < 1
                or arr.shape[1] != PAGE_SIZE
                or not arr.flags.c_contiguous
            ):
                raise ValueError(
                    f"{self.name}: process {i} must be a C-contiguous uint8 array of shape "
                    f"(npages >= 1, {PAGE_SIZE}), not {arr.dtype} {arr.shape}"
                )
        unknown = set(self.knobs) - set(WORKLOAD_KNOBS)
        if unknown:
            raise ValueError(f"{self.name}: knobs {sorted(unknown)} are not workload knobs")
        if self.full_scans < 1:
            raise ValueError(f"{self.name}: full_scans must be >= 1")
        if self.thp and any(arr.shape[0] % HPAGE_PMD_NR for arr in self.processes):
            raise ValueError(f"{self.name}: THP workloads map whole 2 MiB huge pages")

    @property
    def npages(self) -> int:
        return sum(arr.shape[0] for arr in self.processes)

    def effective_knobs(self) -> dict[str, int]:
        """Every workload knob: the workload's value, else the kernel default."""
        return {k: int(self.knobs.get(k, KNOB_DEFAULTS[k])) for k in WORKLOAD_KNOBS}


@dataclass
class Result:
    """What a run observed: ``counters`` holds every name of ``constants.COUNTERS``
    (pages_scanned and pages_skipped as their growth during the run); ``ksm_stat``
    holds the ``KSM_STAT_FIELDS`` of each process, in workload order. ``sysfs`` (every
    file at the end), ``elapsed`` (seconds from run=1 to the end of the last scan) and
    ``info`` (how the run went) are informative and not compared."""

    counters: dict[str, int]
    ksm_stat: list[dict[str, int | bool]]
    # THP workloads: per process, the PTEs that map the shared zero page because a
    # huge page split found their subpage zero-filled (empty for other workloads)
    thp_split_zero_pages: list[int] = field(default_factory=list)
    sysfs: dict[str, int | str] = field(default_factory=dict, compare=False)
    elapsed: float = field(default=0.0, compare=False)
    info: dict[str, Any] = field(default_factory=dict, compare=False)


def make_result(
    before: dict[str, Any],
    after: dict[str, Any],
    ksm_stats: list[dict[str, Any]],
    elapsed: float = 0.0,
) -> Result:
    """Build a Result from the sysfs values before run=1 and after the last full scan."""
    counters = {
        name: int(after[name]) - (int(before[name]) if name in CUMULATIVE else 0)
        for name in COUNTERS
    }
    stat = [{k: s[k] for k in KSM_STAT_FIELDS} for s in ksm_stats]
    return Result(counters=counters, ksm_stat=stat, sysfs=dict(after), elapsed=elapsed)


def run_model(machine_cls: Any, workload: Workload, trace: bool = False) -> Result:
    """Run ``workload`` through a model machine, in the order the kernel harness uses:
    the processes madvise one after another, then the knobs are set, then run=1 and
    ``full_scans`` full scans. Usage: ``run_model(ksmcore.reference.Machine, w)``.
    With ``trace``, ``result.info["trace"]`` holds the tracepoint events of the run
    (as ``run_kernel(w, trace=True)`` records them)."""
    m = machine_cls()
    events: list[dict[str, Any]] = []
    if trace:
        m.trace.subscribe(events.append)
    procs = []
    for arr in workload.processes:
        p = m.spawn()
        n = arr.shape[0]
        addr = p.mmap(n)
        if workload.thp:
            p.madvise(addr, n * PAGE_SIZE, MADV_HUGEPAGE)
        p.fill(addr, arr)
        p.madvise(addr, n * PAGE_SIZE, MADV_MERGEABLE)
        procs.append(p)
    knobs = workload.effective_knobs()
    # merge_across_nodes and max_page_sharing first: the kernel takes them only while
    # no KSM page exists (true here: nothing has been scanned yet).
    for name, value in knobs.items():
        setattr(m.ksm, name, value)
    before = m.ksm.stats()
    m.ksm.run = 1
    m.ksm.scan(full_scans=workload.full_scans)
    result = make_result(before, m.ksm.stats(), [p.ksm_stat() for p in procs])
    if workload.thp:
        result.thp_split_zero_pages = [p.thp_split_zero_pages for p in procs]
    if trace:
        result.info["trace"] = events
    return result


# ---------------------------------------------------------------------------------
# The workload library


def _fill(n: int, byte: int) -> np.ndarray:
    return np.full((n, PAGE_SIZE), byte, dtype=np.uint8)


def _random(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)


def _copies(contents: np.ndarray, counts: list[int], rng: np.random.Generator | None) -> np.ndarray:
    """``counts[i]`` copies of ``contents[i]``, shuffled if ``rng`` is given."""
    picks = np.repeat(np.arange(len(counts)), counts)
    if rng is not None:
        rng.shuffle(picks)
    return np.ascontiguousarray(contents[picks])


def _mix(rng: np.random.Generator, ndistinct: int, nunique: int, max_copies: int) -> np.ndarray:
    """Duplicates (``ndistinct`` contents, 2..max_copies copies each) and ``nunique``
    unique random pages, shuffled."""
    counts = [int(c) for c in rng.integers(2, max_copies + 1, size=ndistinct)]
    dups = _copies(_random(rng, ndistinct), counts, None)
    pages = np.concatenate([dups, _random(rng, nunique)])
    rng.shuffle(pages)
    return np.ascontiguousarray(pages)


def _shared(rng: np.random.Generator, nproc: int, ncommon: int, nown: int) -> list[np.ndarray]:
    """``nproc`` processes that each hold the same ``ncommon`` contents (in their own
    order) plus ``nown`` pages of their own."""
    common = _random(rng, ncommon)
    procs = []
    for _ in range(nproc):
        pages = np.concatenate([common[rng.permutation(ncommon)], _random(rng, nown)])
        rng.shuffle(pages)
        procs.append(np.ascontiguousarray(pages))
    return procs


def _near_identical() -> np.ndarray:
    # 40 pages of '*' whose last byte is 0..39 (all different), then 24 more whose
    # last byte is 0..7 again (3 more copies of each of the first 8).
    pages = _fill(64, ord("*"))
    pages[:40, -1] = np.arange(40)
    pages[40:, -1] = np.arange(24) % 8
    return pages


def parity_workloads() -> list[Workload]:
    """The generated workloads (deterministic; each at most 2,000 pages)."""  # noqa: D401
    star = ord("*")
    w: list[Workload] = []

    def add(name: str, procs: list[np.ndarray], full_scans: int, desc: str, **knobs: int) -> None:
        w.append(Workload(name, procs, dict(knobs), full_scans, desc))

    def rng(seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)

    add("dup10", [_fill(10, star)], 2, "10 pages of '*'")
    add("kselftest_M_p10", [_fill(10, star)], 2, "ksm_tests -M -p 10", pages_to_scan=10)
    add(
        "kselftest_Z_p10_z0",
        [_fill(10, 0)],
        2,
        "ksm_tests -Z -p 10 -z 0",
        pages_to_scan=10,
        use_zero_pages=0,
    )
    add(
        "kselftest_Z_p10_z1",
        [_fill(10, 0)],
        2,
        "ksm_tests -Z -p 10 -z 1",
        pages_to_scan=10,
        use_zero_pages=1,
    )
    add("dup50_1scan", [_fill(50, star)], 1, "50 pages of '*', one full scan only")
    add("unique200", [_random(rng(1), 200)], 3, "200 unique random pages")
    add("zero100_z0", [_fill(100, 0)], 3, "100 zero pages", use_zero_pages=0)
    add("zero100_z1", [_fill(100, 0)], 3, "100 zero pages", use_zero_pages=1)
    add("near_identical64", [_near_identical()], 3, "'*' pages differing in the last byte")
    add("mix_dups_uniques", [_mix(rng(2), 12, 100, 20)], 3, "12 duplicated contents + 100 unique")
    zmix = np.concatenate([_fill(40, 0), _mix(rng(3), 6, 30, 8)])
    rng(4).shuffle(zmix)
    add("mix_zero_z1", [zmix], 4, "40 zero pages among dups and uniques", use_zero_pages=1)
    add("share2", _shared(rng(5), 2, 60, 40), 3, "2 processes, 60 common contents each")
    add("share3", _shared(rng(6), 3, 50, 20), 3, "3 processes, 50 common contents each")
    add("share5", _shared(rng(7), 5, 30, 10), 3, "5 processes, 30 common contents each")
    add(
        "pts7",
        [_mix(rng(8), 5, 20, 6)],
        3,
        "pages_to_scan 7, batches end mid-round",
        pages_to_scan=7,
    )
    add(
        "pts33",
        [_mix(rng(9), 10, 60, 10), _mix(rng(10), 8, 50, 10)],
        3,
        "2 processes, pages_to_scan 33",
        pages_to_scan=33,
    )
    smart = _mix(rng(11), 5, 100, 12)
    add("smart0", [smart], 10, "unique pages seen 10 times, smart_scan off", smart_scan=0)
    add("smart1", [smart.copy()], 10, "unique pages seen 10 times, smart_scan on", smart_scan=1)
    add(
        "mps2",
        [_copies(_random(rng(12), 12), list(range(1, 13)), rng(13))],
        3,
        "1..12 copies of 12 contents",
        max_page_sharing=2,
    )
    add(
        "mps3_prune0",
        [_copies(_random(rng(14), 20), list(range(1, 21)), rng(15))],
        4,
        "1..20 copies, chains pruned on every search",
        max_page_sharing=3,
        stable_node_chains_prune_millisecs=0,
    )
    add(
        "mps16",
        [_copies(_random(rng(16), 40), list(range(1, 41)), rng(17))],
        3,
        "1..40 copies of 40 contents",
        max_page_sharing=16,
    )
    around = [15, 16, 17, 31, 32, 33, 47, 48, 49]
    contents = _random(rng(18), len(around))
    add(
        "mps16_multiples",
        [
            _copies(contents, [c // 2 for c in around], rng(19)),
            _copies(contents, [c - c // 2 for c in around], rng(20)),
        ],
        3,
        "2 processes, copies around multiples of 16",
        max_page_sharing=16,
    )
    add(
        "mps4_5proc",
        [_fill(9, star) for _ in range(5)],
        3,
        "5 processes x 9 pages of '*'",
        max_page_sharing=4,
    )
    ltp = [_fill(128, ord("c")), _fill(128, ord("a")), _fill(128, ord("a"))]
    add(
        "ltp_ksm01_phase1",
        ltp,
        3,
        "LTP ksm01 phase 1 (c/a/a), 128 pages each",
        max_page_sharing=384,
        pages_to_scan=384,
    )
    # issue 4: max_page_sharing at the default and small limits, zero pages among
    # duplicates, smart scan over many rounds
    add("dup1000", [_fill(1000, star)], 2, "1000 pages of '*': 4 dups in 1 chain")
    add(
        "dup1000_mps16_prune0",
        [_fill(1000, star)],
        3,
        "1000 pages of '*' at limit 16, chains pruned on every search",
        max_page_sharing=16,
        stable_node_chains_prune_millisecs=0,
    )
    add(
        "mps3_multiples",
        [_copies(_random(rng(23), 9), [2, 3, 4, 5, 6, 7, 8, 9, 10], rng(24))],
        3,
        "2..10 copies of 9 contents at limit 3",
        max_page_sharing=3,
    )
    add(
        "mps2_multiples_2proc",
        [_copies(_random(rng(25), 6), [1, 2, 2, 3, 3, 4], rng(26)),
         _copies(_random(rng(25), 6), [1, 1, 2, 2, 3, 4], rng(27))],
        3,
        "2 processes, 2..8 copies around multiples of 2",
        max_page_sharing=2,
    )
    for z in (0, 1):
        zd = [np.concatenate([_fill(30, 0), _fill(20, ord("x")), _random(rng(28 + i), 10)])
              for i in range(2)]
        for i, arr in enumerate(zd):
            rng(30 + i).shuffle(arr)
        add(f"zero_dups_2proc_z{z}", zd, 3,
            "2 processes: 30 zero pages, 20 of 'x', 10 unique each", use_zero_pages=z)
    add(
        "smart_pattern30",
        [np.concatenate([_random(rng(32), 3), _fill(2, star)])],
        30,
        "3 unique pages and 2 duplicates over 30 full scans (smart scan on)",
    )
    add(
        "large_2proc",
        [_mix(rng(21), 30, 450, 25), _mix(rng(22), 30, 450, 25)],
        3,
        "2 processes, mixed, about 1,800 pages",
    )
    return w


def w1_workload(npages: int = 262_144, copies: int = 64, seed: int = 1) -> Workload:
    """W1 of the benchmarks: one process, ``npages // copies`` distinct random pages with
    ``copies`` copies each in random order, two full scans from cold, with
    pages_to_scan=100000 and smart_scan=0 (the kernel runs it with sleep_millisecs=0)."""
    rng = np.random.default_rng(seed)
    distinct = rng.integers(0, 256, size=(npages // copies, PAGE_SIZE), dtype=np.uint8)
    order = rng.permutation(np.repeat(np.arange(len(distinct)), copies))
    return Workload(
        "W1",
        [np.ascontiguousarray(distinct[order])],
        knobs={"pages_to_scan": 100_000, "smart_scan": 0},
        full_scans=2,
        description=f"{npages} pages, {len(distinct)} distinct x {copies} copies",
    )


def thp_workloads() -> list[Workload]:
    """THP-backed workloads (deterministic): PMD-aligned MADV_HUGEPAGE mappings of whole
    huge pages, mixing zero-filled subpages, duplicates within one huge page and across
    huge pages and processes, and unique pages."""
    star = ord("*")

    def rng(seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)

    def vm_like(seed: int, n: int, shared: np.ndarray) -> np.ndarray:
        """A guest-like mix: 30% zero, 30% from ``shared`` (common to the processes),
        10% repeated within this process, 30% unique."""
        r = rng(seed)
        kind = r.choice(4, n, p=[0.3, 0.3, 0.1, 0.3])
        out = r.integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)
        out[kind == 0] = 0
        picks = r.integers(0, len(shared), n)
        out[kind == 1] = shared[picks[kind == 1]]
        out[kind == 2] = 7
        return np.ascontiguousarray(out)

    shared = rng(99).integers(0, 256, size=(64, PAGE_SIZE), dtype=np.uint8)
    half_zero = _fill(HPAGE_PMD_NR, star)
    half_zero[::2] = 0
    within = _fill(HPAGE_PMD_NR, 0)
    within[100:140] = star
    w = [
        Workload("thp_within", [within], {}, 3,
                 "one huge page: 40 equal subpages, the rest zero-filled", thp=True),
        Workload("thp_half_zero_2p", [half_zero, half_zero.copy()], {}, 3,
                 "two processes, each one huge page: every other subpage zero", thp=True),
        Workload("thp_vm_like_3p", [vm_like(s, 2 * HPAGE_PMD_NR, shared) for s in (1, 2, 3)],
                 {"pages_to_scan": 500}, 3,
                 "three VM-like processes of two huge pages each", thp=True),
        Workload("thp_use_zero_pages", [half_zero.copy()], {"use_zero_pages": 1}, 3,
                 "use_zero_pages=1 meets zero-filled subpages", thp=True),
        Workload("thp_all_zero_and_dup", [np.concatenate([_fill(HPAGE_PMD_NR, 0),
                                                          _fill(HPAGE_PMD_NR, star)])],
                 {"smart_scan": 0}, 3, "a zero huge page and a huge page of one content",
                 thp=True),
        Workload("thp_ksm_tests_H", [_fill(5 * HPAGE_PMD_NR, star)], {}, 2,
                 "ksm_tests -H on 10 MiB: huge pages of '*', two full scans", thp=True),
    ]
    return w
