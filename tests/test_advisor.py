"""The scan-time advisor on the simulated clock, on both implementations: every
ksm_advisor event is checked against an independent transcription of
scan_time_advisor() (mm/ksm.c), fed with times and CPU times worked out here from the
cost model; then the quirks of section 10 one by one; then the same arithmetic against
the real ksmd's ksm_advisor tracepoints; and the clock and ksmd's loop (run_for)."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE
from ksmcore.errors import KsmdNotRunning
from ksmcore.timing import CostModel
from ksmcore.workloads import Workload

ULONG, UINT = (1 << 64) - 1, (1 << 32) - 1


@dataclass
class Ctx:
    start_scan: int = 0
    scan_time: int = 0
    change: int = 0
    cpu_time: int = 0


def advisor_pages(ctx: Ctx, pts: int, scan_time: int, cpu_percent: int,
                  knobs: dict[str, int]) -> int:
    """The pages_to_scan that scan_time_advisor() computes from a scan's (whole second)
    scan_time and cpu_percent; updates ctx (but its cpu_time)."""
    last = ctx.scan_time or scan_time
    factor = max(1, (knobs["advisor_target_scan_time"] * 100 & ULONG) // scan_time)
    change = max(1, scan_time * 100 // last)
    change = ((70 * ctx.change + 30 * change) & ULONG) // 100
    pages = ((pts * 100) & UINT) // factor
    pages = (pages * change & ULONG) // 100
    ppc = max(1, pts // cpu_percent)
    pages = min(pages, ppc * knobs["advisor_max_cpu"] & ULONG)
    pages = max(pages, ppc * 10)
    pages = min(pages, knobs["advisor_max_pages_to_scan"])
    ctx.change, ctx.scan_time = change, scan_time
    return pages


def expected_advisor(ctx: Ctx, now_ns: int, cpu_ns: int, pts: int,
                     knobs: dict[str, int]) -> tuple[int, int, int]:
    """scan_time_advisor(), written out again: (scan_time, pages, cpu_percent); updates ctx."""
    scan_time = max(1, (now_ns - ctx.start_scan) // 1_000_000 // 1000)
    diff_ms = ((cpu_ns - ctx.cpu_time) & ULONG) // 1_000_000
    cpu_percent = max(1, ((diff_ms * 100 & ULONG) // (scan_time * 1000)) & UINT)
    pages = advisor_pages(ctx, pts, scan_time, cpu_percent, knobs)
    ctx.cpu_time = cpu_ns
    return scan_time, pages, cpu_percent


def unique_pages(m: Any, n: int, seed: int = 0) -> Any:
    p = m.spawn()
    a = p.mmap(n)
    p.fill(a, np.random.default_rng(seed).integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8))
    p.madvise(a, n * PAGE_SIZE, MADV_MERGEABLE)
    return p


def drive(m: Any, rounds: int, sleep_ns: int, ctx: Ctx) -> list[tuple[dict, tuple]]:
    """ksmd by hand: batches of pages_to_scan with sleep_ns between them, for `rounds`
    full scans; for each ksm_advisor event the event and what the formula expects."""
    cost = m.cost_model
    out = []
    knobs = {k: getattr(m.ksm, k) for k in ("advisor_target_scan_time", "advisor_max_cpu",
                                             "advisor_max_pages_to_scan")}
    target = m.ksm.full_scans + rounds
    while m.ksm.full_scans < target:
        t, cpu, pts = m.clock_ns, m.ksmd_cpu_ns, m.ksm.pages_to_scan
        with m.tracing() as events:
            n = m.ksm.do_scan(pts)
        kinds = [e["event"] for e in events]
        if "ksm_start_scan" in kinds:
            ctx.start_scan = t + cost.batch_ns
        if "ksm_advisor" in kinds:
            spent = cost.batch_ns + n * cost.page_ns
            want = expected_advisor(ctx, t + spent, cpu + spent, pts, knobs)
            out.append((events[kinds.index("ksm_advisor")], want))
        m.clock_ns += sleep_ns
    return out


def test_every_adjustment_follows_the_formula(Machine: type) -> None:
    """A scan that takes ~3 s of which ksmd is busy ~20%, target 10 s: pages_to_scan
    goes down round after round; each event equals the formula's result."""
    m = Machine()
    m.cost_model = CostModel(page_ns=2_000_000, batch_ns=1_000)
    unique_pages(m, 300)
    m.ksm.advisor_min_pages_to_scan = 50
    m.ksm.advisor_target_scan_time = 10
    m.ksm.advisor_mode = "scan-time"
    m.ksm.run = 1
    results = drive(m, 6, 400_000_000, Ctx())
    assert len(results) == 6
    for event, (scan_time, pages, cpu_percent) in results:
        assert (event["scan_time"], event["pages_to_scan"], event["cpu_percent"]) == (
            scan_time, pages, cpu_percent)
    assert results[-1][0]["pages_to_scan"] == m.ksm.pages_to_scan
    assert len({e["pages_to_scan"] for e, _ in results}) > 2  # it really adjusts


def test_the_first_round_quirks(Machine: type) -> None:
    """set_advisor_defaults() zeroes the context: the first CPU sample is ksmd's whole
    CPU time; the EWMA starts at 0 (first change x0.3); advisor_min_pages_to_scan is
    only the start, the floor is per_page_cost * 10."""
    m = Machine()
    m.cost_model = CostModel(page_ns=1_000_000, batch_ns=1)
    unique_pages(m, 40)
    m.ksm.run = 1
    m.ksm.scan(full_scans=3)  # CPU time before the advisor: 120 ms
    m.ksm.advisor_min_pages_to_scan = 1000
    m.ksm.advisor_mode = "scan-time"
    assert m.ksm.pages_to_scan == 1000
    m.clock_ns += 5_000_000_000  # so the first scan_time is not clamped to 1
    with m.tracing() as events:
        m.ksm.scan(full_scans=1)
    (adv,) = [e for e in events if e["event"] == "ksm_advisor"]
    # scan_time: 40 ms, clamped to 1 s. cpu: everything since boot, ~160 ms -> 16%.
    assert adv["scan_time"] == 1
    assert adv["cpu_percent"] == (m.ksmd_cpu_ns // 1_000_000 * 100) // 1000
    # change = ewma(0, 100) = 30; pages = 1000*100/20000 * 30/100 = 1; the floor
    # per_page_cost * 10 = (1000 / cpu%) * 10 wins
    assert adv["pages_to_scan"] == (1000 // adv["cpu_percent"]) * 10
    assert m.ksm.pages_to_scan == adv["pages_to_scan"] < 1000


def test_switched_on_mid_scan_measures_from_boot(Machine: type) -> None:
    """Switched on within a full scan, start_scan is still 0: the scan's time is the
    time since boot."""
    m = Machine()
    unique_pages(m, 10)
    m.ksm.run = 1
    m.ksm.pages_to_scan = 5
    m.ksm.do_scan(5)  # a round is under way
    m.clock_ns += 7_500_000_000
    m.ksm.advisor_mode = "scan-time"
    with m.tracing() as events:
        m.ksm.do_scan(m.ksm.pages_to_scan)
    (adv,) = [e for e in events if e["event"] == "ksm_advisor"]
    assert adv["scan_time"] == 7


def test_32_bit_wraps_and_truncation(Machine: type) -> None:
    """pages_to_scan * 100 is unsigned int arithmetic (wraps at 2^32), and the result
    is cut to 32 bits when stored, while the event shows the unsigned long."""
    m = Machine()
    unique_pages(m, 8)
    m.ksm.advisor_max_cpu = 4294967295
    m.ksm.advisor_max_pages_to_scan = (1 << 64) - 1
    m.ksm.advisor_target_scan_time = 1
    m.ksm.advisor_min_pages_to_scan = 50_000_000  # * 100 wraps: 705032704
    m.ksm.advisor_mode = "scan-time"
    assert m.ksm.pages_to_scan == 50_000_000
    m.ksm.run = 1
    ctx = Ctx()
    knobs = {"advisor_target_scan_time": 1, "advisor_max_cpu": 4294967295,
             "advisor_max_pages_to_scan": (1 << 64) - 1}
    got = []
    for jump in (0, 3_000_000_000_000):  # then a scan 3000 s long: change x 3000
        t, cpu, pts = m.clock_ns, m.ksmd_cpu_ns, m.ksm.pages_to_scan
        m.clock_ns += jump
        ctx_start = t + m.cost_model.batch_ns
        with m.tracing() as events:
            # the round starts in one batch, the clock jumps, it ends in the next
            n1 = m.ksm.do_scan(4)
            m.clock_ns += jump
            n2 = m.ksm.do_scan(pts)
        ctx.start_scan = ctx_start + jump
        cost = m.cost_model
        spent_cpu = 2 * cost.batch_ns + (n1 + n2) * cost.page_ns
        now = ctx.start_scan + n1 * cost.page_ns + jump + cost.batch_ns + n2 * cost.page_ns
        want = expected_advisor(ctx, now, cpu + spent_cpu, pts, knobs)
        (adv,) = [e for e in events if e["event"] == "ksm_advisor"]
        got.append(adv)
        assert (adv["scan_time"], adv["pages_to_scan"], adv["cpu_percent"]) == want
        assert m.ksm.pages_to_scan == want[1] & UINT
    assert got[1]["pages_to_scan"] > UINT  # the event shows what the int could not hold


def test_pages_to_scan_belongs_to_the_advisor(Machine: type) -> None:
    m = Machine()
    m.ksm.pages_to_scan = 42
    m.ksm.advisor_mode = "scan-time"
    assert m.ksm.pages_to_scan == 500
    for text in ("100", "x", "0"):
        with pytest.raises(OSError) as e:
            m.ksm.sysfs_write("pages_to_scan", text)
        assert e.value.errno == errno.EINVAL
    m.ksm.advisor_mode = "scan-time"  # no change: no defaults
    assert m.ksm.pages_to_scan == 500
    m.ksm.advisor_mode = "none"
    assert m.ksm.pages_to_scan == 100  # DEFAULT_PAGES_TO_SCAN, not the old 42


def test_run_for_settles_on_the_target(Machine: type) -> None:
    """With the real ksmd loop (run_for), a first scan at min pages takes 60 s; the
    advisor raises pages_to_scan until a full scan takes advisor_target_scan_time
    (while ksmd stays at or above KSM_ADVISOR_MIN_CPU, 10%)."""
    m = Machine()
    m.cost_model = CostModel(page_ns=1_000_000, batch_ns=1_000)
    unique_pages(m, 300)
    m.ksm.smart_scan = 0
    m.ksm.advisor_min_pages_to_scan = 1
    m.ksm.advisor_target_scan_time = 3
    m.ksm.sleep_millisecs = 200
    m.ksm.advisor_mode = "scan-time"
    m.ksm.run = 1
    with m.tracing() as events:
        m.run_for(90)
    adv = [(e["scan_time"], e["pages_to_scan"], e["cpu_percent"]) for e in events
           if e["event"] == "ksm_advisor"]
    assert adv[0] == (60, 10, 1)  # 300 batches of 1 page; the 10 x per-page-cost floor
    assert adv[-4:] == [(3, 20, 10)] * 4


# ---- the simulated clock and ksmd's loop (run_for), which the advisor reads


def test_the_clock_views_and_their_limits(Machine: type) -> None:
    m = Machine()
    assert (m.clock_ns, m.clock, m.clock_ms) == (0, 0.0, 0)
    m.clock = 1.5
    assert (m.clock_ns, m.clock_ms) == (1_500_000_000, 1500)
    m.clock_ms = 1500  # the same jiffy: nothing changes
    assert m.clock_ns == 1_500_000_000
    m.clock_ms = 1501
    assert m.clock_ns == 1_501_000_000
    for attr, value in (("clock", 1.0), ("clock_ms", 1500), ("clock_ns", 5)):
        with pytest.raises(ValueError):
            setattr(m, attr, value)
    with pytest.raises(TypeError):
        m.clock_ns = 2.0e9
    with pytest.raises(ValueError):
        m.run_for(-1)
    with pytest.raises(ValueError):
        CostModel(page_ns=-1)
    with pytest.raises(ValueError):
        CostModel(batch_ns=0)
    with pytest.raises(TypeError):
        m.cost_model = 3


def expected_loop(npages: int, pts: int, sleep_ms: int, seconds: float,
                  cost: CostModel) -> tuple[int, int, int]:
    """ksm_scan_thread() by hand for one mm of npages pages that all get processed:
    (batches, clock_ns, cpu_ns) after run_for(seconds) from 0."""
    end = round(seconds * 1e9)
    t = cpu = batches = 0
    left = npages  # pages left in the current round
    while t < end:
        n = min(pts, left)
        t += cost.batch(n)
        cpu += cost.batch(n)
        batches += 1
        left = npages if n == left else left - n
        t += sleep_ms * 1_000_000
    return batches, max(t - sleep_ms * 1_000_000, end), cpu


def test_run_for_is_a_batch_then_a_sleep(Machine: type) -> None:
    m = Machine()
    unique_pages(m, 250)
    m.ksm.smart_scan = 0
    m.ksm.run = 1
    calls = []
    m.trace.subscribe(lambda e: calls.append(e["event"]))
    m.run_for(1.0)
    batches, clock, cpu = expected_loop(250, 100, 20, 1.0, m.cost_model)
    assert (m.clock_ns, m.ksmd_cpu_ns) == (clock, cpu)
    assert m.ksm.full_scans == batches // 3 and m.ksm.pages_scanned == (batches // 3) * 250 + \
        [0, 100, 200][batches % 3]
    assert calls.count("ksm_start_scan") == (batches + 2) // 3


def test_ksmd_sleeps_across_calls_and_waits_for_work(Machine: type) -> None:
    a, b = Machine(), Machine()
    for m in (a, b):
        unique_pages(m, 30)
        m.ksm.run = 1
    a.run_for(0.5)
    for _ in range(50):
        b.run_for(0.01)  # the same time in pieces: the sleeps carry over
    assert (a.clock_ns, a.ksm.full_scans, a.ksmd_cpu_ns) == (
        b.clock_ns, b.ksm.full_scans, b.ksmd_cpu_ns)
    m = Machine()
    m.run_for(2)  # nothing registered: ksmd waits; only time passes
    assert (m.clock_ns, m.ksmd_cpu_ns) == (2_000_000_000, 0)
    unique_pages(m, 5)
    m.run_for(0.001)  # run is 0
    assert m.ksm.full_scans == 0
    m.ksm.run = 1  # work: ksmd runs at the start of the next run_for
    m.run_for(0.001)
    assert m.ksm.full_scans == 1 and m.ksmd_cpu_ns == m.cost_model.batch(5)


# ---- the advisor's arithmetic against this machine's kernel

KERNEL_OK, KERNEL_WHY = kernel.kernel_available()
TRACE_OK, TRACE_WHY = kernel.trace_available()


@pytest.mark.skipif(not (KERNEL_OK and TRACE_OK),
                    reason=f"needs the kernel harness and tracefs: {KERNEL_WHY}; {TRACE_WHY}")
def test_the_kernels_advisor_computes_the_same() -> None:
    """The real ksmd with the advisor on: every ksm_advisor event's pages_to_scan is
    what the model's arithmetic gives for that event's scan_time and cpu_percent (the
    first event's CPU share is ksmd's whole run time since boot: the zeroed context)."""
    knobs = {"advisor_min_pages_to_scan": 200, "advisor_target_scan_time": 2,
             "advisor_max_cpu": 70, "advisor_max_pages_to_scan": 30000}
    pages = np.random.default_rng(5).integers(0, 256, (2000, PAGE_SIZE), dtype=np.uint8)
    w = Workload("advisor", [pages], {"smart_scan": 0}, full_scans=4)
    events = [e for e in kernel.run_kernel_advisor(w, knobs, sleep_millisecs=20)
              if e["event"] == "ksm_advisor"]
    assert len(events) >= 4
    ctx, pts = Ctx(), knobs["advisor_min_pages_to_scan"]
    for e in events:
        pts_next = advisor_pages(ctx, pts, e["scan_time"], e["cpu_percent"], knobs)
        assert e["pages_to_scan"] == pts_next, (e, ctx)
        pts = pts_next & UINT


def test_advisor_max_pages_to_scan_zero_stalls_ksmd(Machine: type) -> None:
    """Nothing validates the advisor's knobs: advisor_max_pages_to_scan = 0 sets
    pages_to_scan to 0 at the end of the next full scan, and ksmd scans no more."""
    m = Machine()
    unique_pages(m, 4)
    m.ksm.advisor_max_pages_to_scan = 0
    m.ksm.advisor_mode = "scan-time"
    m.ksm.run = 1
    m.ksm.scan(full_scans=1)
    assert m.ksm.pages_to_scan == 0
    with pytest.raises(KsmdNotRunning):
        m.ksm.scan(full_scans=1)
    m.run_for(1)
    assert m.ksm.full_scans == 1


def test_run_for_with_pages_to_scan_zero(Machine: type) -> None:
    """ksmd with nothing to do per batch still wakes every sleep_millisecs (each wake
    costs batch_ns), even with sleep_millisecs 0: run_for counts them, not loops them."""
    cost = CostModel(page_ns=2600, batch_ns=1000)
    for sleep_ms, wakeups in ((0, 2_000_000), (20, 100)):
        m = Machine()
        m.cost_model = cost
        unique_pages(m, 3)
        m.ksm.pages_to_scan = 0
        m.ksm.sleep_millisecs = sleep_ms
        m.ksm.run = 1
        m.run_for(2)
        assert (m.ksm.full_scans, m.ksmd_cpu_ns) == (0, wakeups * cost.batch_ns)
        assert m.clock_ns == 2_000_000_000
        m.ksm.pages_to_scan = 100  # the next wake-up scans again
        m.run_for(0.05)
        assert m.ksm.full_scans >= 1


def test_a_wake_up_due_in_the_past_runs_at_once(Machine: type) -> None:
    """The clock moved past ksmd's wake-up time (set by hand): the overdue batch runs at
    the start of the next run_for, even run_for(0); with pages_to_scan 0 it costs one
    batch_ns."""
    m = Machine()
    unique_pages(m, 3)
    m.ksm.run = 1
    m.run_for(0.001)  # one batch, then a sleep of 20 ms
    assert m.ksm.full_scans == 1
    m.clock_ns += 1_000_000_000
    m.run_for(0)
    assert m.ksm.full_scans == 2
    m.clock_ns += 1_000_000_000
    m.ksm.pages_to_scan = 0
    cpu = m.ksmd_cpu_ns
    m.run_for(0)
    assert m.ksmd_cpu_ns == cpu + m.cost_model.batch_ns and m.ksm.full_scans == 2
