"""KSM's tracepoints (include/trace/events/ksm.h) on both implementations: which events,
with which fields, in which order; the subscriber API and the JSON-lines recorder; and
the same events as this machine's kernel records in tracefs for parity workloads."""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE
from ksmcore.tracing import EVENT_FIELDS, canonical_ids, format_event, read_json_lines
from ksmcore.workloads import parity_workloads, run_model

from conftest import IMPLEMENTATIONS, machine_class

P = PAGE_SIZE


def area(m: Any, p: Any, bytes_: list[int]) -> int:
    a = p.mmap(len(bytes_))
    p.fill(a, np.array([np.full(P, b, np.uint8) for b in bytes_]))
    p.madvise(a, len(bytes_) * P, MADV_MERGEABLE)
    return a


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def test_every_event_has_the_kernels_fields(Machine: type) -> None:
    m = Machine()
    m.ksm.max_page_sharing = 2
    m.ksm.use_zero_pages = 1
    m.ksm.advisor_mode = "scan-time"
    seen: dict[str, dict[str, Any]] = {}
    with m.tracing() as events:
        p = m.spawn()
        a = area(m, p, [5, 5, 5, 0])
        m.ksm.run = 1
        m.ksm.scan(full_scans=2)
        p.write(a, b"x")
        p.write(a + P, b"x")
        p.write(a + 2 * P, b"x")
        m.ksm.scan(full_scans=1)
        p.exit()
    for e in events:
        seen.setdefault(e["event"], e)
    assert set(seen) == set(EVENT_FIELDS)
    for name, e in seen.items():
        assert list(e) == ["event", *EVENT_FIELDS[name]], name
        format_event(e)  # every event prints


def test_a_two_page_merge(Machine: type) -> None:
    """First round: checksums only. Second: the first page goes into the unstable
    tree, the second finds it: the scanned page becomes the KSM page (kpage NULL),
    then the tree item's PTE moves onto it."""
    m = Machine()
    p = m.spawn()
    with m.tracing() as events:
        a = area(m, p, [7, 7])
        m.ksm.run = 1
        m.ksm.scan(full_scans=2)
    k = p.pfn(a)
    assert events == [
        {"event": "ksm_enter", "mm": p.pid},
        {"event": "ksm_start_scan", "seq": 0, "rmap_entries": 0},
        {"event": "ksm_stop_scan", "seq": 0, "rmap_entries": 2},
        {"event": "ksm_start_scan", "seq": 1, "rmap_entries": 2},
        {"event": "ksm_merge_with_ksm_page", "ksm_page": None, "pfn": k,
         "rmap_item": (p.pid, a + P), "mm": p.pid, "err": 0},
        {"event": "ksm_merge_with_ksm_page", "ksm_page": k, "pfn": k,
         "rmap_item": (p.pid, a), "mm": p.pid, "err": 0},
        {"event": "ksm_stop_scan", "seq": 1, "rmap_entries": 2},
    ]


def test_a_stale_node_is_removed_with_its_items(Machine: type) -> None:
    """remove_node_from_stable_tree(): ksm_remove_rmap_item for every item but the
    last of the hlist (newest first: q's, then p's second page, which made the KSM
    page; p's first page, the tree item, was appended first), then
    ksm_remove_ksm_page."""
    m = Machine()
    p, q = m.spawn(), m.spawn()
    a = area(m, p, [7, 7])
    b = area(m, q, [7])
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    k = p.pfn(a)
    assert q.pfn(b) == k
    for addr, proc in ((a, p), (a + P, p), (b, q)):
        proc.write(addr, b"z")  # the KSM page is freed: its node is stale
    with m.tracing() as events:
        m.ksm.do_scan(1)  # p's first page meets the stale node
    assert events == [
        {"event": "ksm_start_scan", "seq": 2, "rmap_entries": 3},
        {"event": "ksm_remove_rmap_item", "pfn": k, "rmap_item": (q.pid, b), "mm": q.pid},
        {"event": "ksm_remove_rmap_item", "pfn": k, "rmap_item": (p.pid, a + P),
         "mm": p.pid},
        {"event": "ksm_remove_ksm_page", "pfn": k},
    ]


def test_zero_pages_are_traced_as_merge_one_page(Machine: type) -> None:
    m = Machine()
    m.ksm.use_zero_pages = 1
    p = m.spawn()
    a = area(m, p, [0, 0, 9])
    m.ksm.run = 1
    m.ksm.scan(full_scans=1)
    with m.tracing() as events:
        m.ksm.scan(full_scans=1)
    assert [e for e in events if e["event"] == "ksm_merge_one_page"] == [
        {"event": "ksm_merge_one_page", "pfn": 0, "rmap_item": (p.pid, a + i * P),
         "mm": p.pid, "err": 0} for i in range(2)]


def test_enter_and_exit(Machine: type) -> None:
    """ksm_enter at __ksm_enter (madvise, fork of a registered mm, prctl, exec under
    MERGE_ANY), ksm_exit at __ksm_exit of a registered mm; an exec enters the new mm
    before the old one goes (both under the same pid)."""
    m = Machine()
    with m.tracing() as events:
        p = m.spawn()
        area(m, p, [1])
        c = p.fork()
        u = m.spawn()
        u.mmap(1)
        u.exit()  # never registered: no event
        q = m.spawn()
        q.prctl_set_memory_merge(1)
        q.exec()
        c.exit()
    assert events == [
        {"event": "ksm_enter", "mm": p.pid},
        {"event": "ksm_enter", "mm": c.pid},
        {"event": "ksm_enter", "mm": q.pid},
        {"event": "ksm_enter", "mm": q.pid},
        {"event": "ksm_exit", "mm": q.pid},
        {"event": "ksm_exit", "mm": c.pid},
    ]


def test_advisor_event_comes_before_stop_scan(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    area(m, p, [1, 2, 3])
    m.ksm.advisor_mode = "scan-time"
    m.ksm.run = 1
    with m.tracing() as events:
        m.ksm.scan(full_scans=1)
    assert names(events) == ["ksm_start_scan", "ksm_advisor", "ksm_stop_scan"]
    adv = events[1]
    assert adv["pages_to_scan"] == m.ksm.pages_to_scan
    assert adv["scan_time"] == 1 and adv["cpu_percent"] == 1


def test_subscribers_and_no_cost_without_them(Machine: type) -> None:
    m = Machine()
    assert not m.trace.active
    got: list[dict[str, Any]] = []
    fn = m.trace.subscribe(got.append)
    assert m.trace.active
    p = m.spawn()
    area(m, p, [4, 4])
    m.ksm.run = 1
    m.trace.unsubscribe(fn)
    assert not m.trace.active
    m.ksm.scan(full_scans=2)
    assert names(got) == ["ksm_enter"]
    if hasattr(m, "ctx"):  # the engine's C core buffers nothing either
        assert m.ctx.trace_enabled == 0 and m.ctx.nr_trace == 0
    with pytest.raises(ValueError):
        m.trace.unsubscribe(fn)
    with pytest.raises(TypeError):
        m.trace.subscribe(42)


def test_json_lines_recorder(Machine: type, tmp_path: Any) -> None:
    m = Machine()
    path = tmp_path / "ksm.jsonl"
    buf = io.StringIO()
    with m.tracing(record=path) as events, m.trace.record(buf):
        p = m.spawn()
        area(m, p, [4, 4])
        m.ksm.run = 1
        m.ksm.scan(full_scans=2)
    assert read_json_lines(path) == events
    assert buf.getvalue() == path.read_text()
    assert len(events) == 7 and not m.trace.active


def test_the_kernels_print_formats() -> None:
    assert format_event({"event": "ksm_start_scan", "seq": 3, "rmap_entries": 10}) == (
        "ksm_start_scan: seq 3 rmap size 10")
    assert format_event({"event": "ksm_merge_with_ksm_page", "ksm_page": None, "pfn": 7,
                         "rmap_item": (1000, 4096), "mm": 1000, "err": 0}) == (
        "ksm_merge_with_ksm_page: pfn 7 rmap_item (1000, 4096) mm 1000 error 0")
    assert format_event({"event": "ksm_merge_with_ksm_page", "ksm_page": 7, "pfn": 7,
                         "rmap_item": (1000, 4096), "mm": 1000, "err": -14}).startswith(
        "ksm_merge_with_ksm_page: ksm pfn 7")
    assert format_event({"event": "ksm_advisor", "scan_time": 2, "pages_to_scan": 500,
                         "cpu_percent": 9}) == (
        "ksm_advisor: ksm scan time 2 pages_to_scan 500 cpu percent 9")


# ---- against the kernel's own tracepoints (tracefs), where the harness can run

KERNEL_OK, KERNEL_WHY = kernel.kernel_available()
TRACE_OK, TRACE_WHY = kernel.trace_available()
TRACED = ("dup10", "mps2", "mix_zero_z1", "share3", "mps3_prune0")


@functools.cache
def kernel_trace(name: str) -> list[dict[str, Any]]:
    w = {x.name: x for x in parity_workloads()}[name]
    return canonical_ids(kernel.run_kernel(w, trace=True).info["trace"])


@pytest.mark.skipif(not (KERNEL_OK and TRACE_OK),
                    reason=f"needs the kernel harness and tracefs: {KERNEL_WHY}; {TRACE_WHY}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", TRACED)
def test_the_same_events_as_the_kernel(name: str, impl: str) -> None:
    """The ksm events of a parity workload, from the children's ksm_enter to the last
    ksm_stop_scan, as the kernel's tracefs records them: the same events, in the same
    order, with the same fields (identities compared by first appearance, since the
    kernel prints hashed pointers and its own pfns)."""
    w = {x.name: x for x in parity_workloads()}[name]
    model = canonical_ids(run_model(machine_class(impl), w, trace=True).info["trace"])
    assert model == kernel_trace(name)


def test_trace_lines_parse() -> None:
    line = ("            ksmd-37      [000] .....  3575.949162: ksm_merge_with_ksm_page: "
            "ksm pfn 2579639 rmap_item 000000002d9be266 mm 00000000fcab997f error 0")
    assert kernel.parse_trace_line(line) == {
        "event": "ksm_merge_with_ksm_page", "ksm_page": True, "pfn": 2579639,
        "rmap_item": "000000002d9be266", "mm": "00000000fcab997f", "err": 0}
    assert kernel.parse_trace_line("# tracer: nop") is None
    assert kernel.parse_trace_line(
        "  ksmd-37 [001] ..... 1.5: ksm_advisor: ksm scan time 3 pages_to_scan 20 "
        "cpu percent 10") == {"event": "ksm_advisor", "scan_time": 3, "pages_to_scan": 20,
                              "cpu_percent": 10}
