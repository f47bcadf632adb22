"""Replaying traces onto both implementations; ``estimate TRACE`` and ``tune TRACE``;
the jiffy-rounded sleeps of the cost model; ``Process.fill_pages``."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from ksmcore.cli import main
from ksmcore.constants import MADV_MERGEABLE
from ksmcore.timing import CostModel
from ksmcore.trace import ABSENT, TraceWriter, read_trace, write_trace
from ksmcore.trace.moving import Group
from ksmcore.trace.replay import _Space, replay, steady_state
from ksmcore.trace.synthetic import moving_trace

PAGE = 4096
SYSFS = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
         "ksm_zero_pages", "general_profit", "pages_scanned", "pages_skipped",
         "stable_node_chains", "stable_node_dups", "pages_to_scan", "sleep_millisecs",
         "smart_scan", "run")


def _busy_trace() -> bytes:
    """Two processes: common and private pages, sparse writes, a page dropped, a mapping
    that grows and one that goes, an exit."""
    rng = np.random.default_rng(3)
    common = rng.integers(0, 256, (6, PAGE), np.uint8)
    buf = io.BytesIO()
    w = TraceWriter(buf, {"interval_ms": 100})
    for i in range(2):
        w.process(10 + i, f"p{i}")
        pages = np.concatenate([common, rng.integers(0, 256, (4, PAGE), np.uint8)])
        w.changes(0, i, 100 + np.arange(10), pages, maps=[(100 << 12, 110 << 12),
                                                         (200 << 12, 204 << 12)])
        w.changes(0, i, 200 + np.arange(2), common[:2])
    w.tick(0)
    t = 0
    for k in range(1, 31):
        t = k * 100_000_000
        if k == 5:  # p0 rewrites a common page with its own bytes (COW if merged)
            w.changes(t, 0, [101], common[1:2])
        if k == 8:  # p1's first mapping grows by 3 pages; its second goes
            w.changes(t, 1, [110, 111], common[2:4], maps=[(100 << 12, 113 << 12)])
        if k == 10:  # p0 drops a page and writes new bytes into another
            w.changes(t, 0, [106], rng.integers(0, 256, (1, PAGE), np.uint8), absent=[105])
        if k == 20:
            w.changes(t, 1, exited=True)
        w.tick(t)
    w.close()
    return buf.getvalue()


def _machine(Machine, **knobs):
    m = Machine()
    m.ksm.pages_to_scan = knobs.get("pages_to_scan", 5)
    m.ksm.sleep_millisecs = knobs.get("sleep_millisecs", 20)
    m.ksm.smart_scan = knobs.get("smart_scan", 0)
    m.cost_model = knobs.get("cost", CostModel(hz=250, wake_ns=50_000, batch_ns=20_000))
    return m


def test_replay_applies_every_change(Machine) -> None:
    trace = read_trace(_busy_trace())
    m = _machine(Machine)
    rp = replay(trace, m, sample_ms=500)
    m.check_invariants()
    assert rp.pages_outside == 0
    p0, p1 = rp.processes
    assert p1.pid not in [p.pid for p in m.processes] and p0 in m.processes
    # p0's memory is the trace's last state of it, page by page
    state: dict[int, int] = {}
    for c in trace.changes:
        if c.proc == 0:
            for v, cid in zip(c.vpns.tolist(), c.ids.tolist(), strict=True):
                if cid == ABSENT:
                    state.pop(v, None)
                else:
                    state[v] = cid
    assert 105 not in state and len(state) == 11
    maps = p0.maps()
    assert sum((e - s) >> 12 for s, e, _ in maps) == 14 and all(mg for _, _, mg in maps)
    # the replay's own translation: the first mapping of p0 is its first mmap
    first = maps[0][0]
    for v, cid in state.items():
        if 100 <= v < 110:
            assert p0.read(first + (v - 100) * PAGE, PAGE) == trace.contents[cid].tobytes()
    assert p0.read(first + 5 * PAGE, PAGE) == bytes(PAGE)  # dropped: not present
    assert p0.pfn(first + 5 * PAGE) is None
    # the timeline: a row at least every 500 ms and at every change, every sysfs file
    ts = [r["t"] for r in rp.timeline]
    assert ts == sorted(ts) and ts[0] == 0 and ts[-1] >= 3.0
    assert max(np.diff(ts)) <= 0.5 + 0.01
    assert all(set(SYSFS) <= set(r) for r in rp.timeline)
    assert rp.timeline[-1]["full_scans"] >= 3 and rp.timeline[-1]["pages_sharing"] > 0


def test_a_mapping_that_grows_keeps_its_pages(Machine) -> None:
    m = Machine()
    p = m.spawn()
    sp = _Space(p)
    sp.set_maps([(100 << 12, 104 << 12)])
    a = sp.addresses(np.array([100, 103, 104]))
    assert a[2] == -1 and a[1] - a[0] == 3 * PAGE
    p.fill(int(a[0]), np.full((1, PAGE), 9, np.uint8))
    sp.set_maps([(100 << 12, 106 << 12)])
    b = sp.addresses(np.array([100, 104, 105]))
    assert b[0] == a[0] and (b >= 0).all()
    assert p.read(int(b[0]), 1) == b"\x09"
    sp.set_maps([(102 << 12, 106 << 12)])  # the front goes
    c = sp.addresses(np.array([100, 101, 102, 105]))
    assert (c[:2] == -1).all() and c[3] == b[2]
    assert not any(s <= a[0] < e for s, e, _ in p.maps())  # unmapped


def test_engine_and_reference_replay_alike() -> None:
    from conftest import machine_class

    trace = moving_trace([Group(24, "common", "same", 30.0), Group(16, "private", "fresh", 20.0),
                          Group(8, "zero", "converge", 5.0)], processes=2, seconds=2.0)
    rows = []
    for name in ("engine", "reference"):
        m = _machine(machine_class(name), pages_to_scan=7, smart_scan=1)
        rows.append(replay(trace, m, sample_ms=250).timeline)
        m.check_invariants()
    strip = [[{k: v for k, v in r.items() if k != "cow_ksm"} for r in t] for t in rows]
    assert strip[0] == strip[1]
    assert rows[0][-1]["cow_ksm"] > 0  # the "same" writes copied merged pages


def test_jiffy_sleeps() -> None:
    exact = CostModel()
    assert exact.wake(0, 1_234_567, 20) == 21_234_567
    assert exact.period(100, 20) == 100 + 100 * 2600 + 20_000_000
    hz = CostModel(hz=250, wake_ns=0)
    assert hz.jiffies(20) == 5 and hz.jiffies(21) == 6 and hz.jiffies(1) == 1
    assert hz.jiffies(0) == 0 and hz.wake(5, 7_000_000, 0) == 7_000_000
    # schedule_timeout(5): the timer wheel fires it at the 6th tick after the jiffy
    # the batch ended in
    assert hz.wake(0, 100, 20) == 24_000_000
    assert hz.wake(0, 3_999_999, 20) == 24_000_000
    assert hz.wake(0, 4_000_000, 20) == 28_000_000
    assert hz.wake(1_000, 4_000_999, 20) == 24_001_000
    assert hz.wake(1_000, 4_001_000, 20) == 28_001_000
    late = CostModel(hz=250, wake_ns=1_500_000)
    assert late.wake(0, 100, 20) == 25_500_000
    # the 200 pages a batch at 2.6 us: 24 ms a batch (+ the wake-up)
    assert CostModel(hz=250).period(200, 20) == 24_000_000
    assert CostModel(page_ns=25_000, hz=250).period(200, 20) == 28_000_000
    with pytest.raises(ValueError, match="hz"):
        CostModel(hz=-1)


def test_run_for_sleeps_in_jiffies(Machine) -> None:
    m = Machine()
    p = m.spawn()
    a = p.mmap(50)
    p.fill(a, np.random.default_rng(1).integers(0, 256, (50, PAGE), np.uint8))
    p.madvise(a, 50 * PAGE, MADV_MERGEABLE)
    m.ksm.pages_to_scan = 10
    m.ksm.sleep_millisecs = 10  # 3 jiffies of 4 ms at HZ=250, woken at the 4th tick
    m.ksm.smart_scan = 0
    m.cost_model = CostModel(page_ns=1000, batch_ns=1000, hz=250)
    m.ksm.run = 1
    m.run_for(1.2)
    # a batch at 0, 16, ..., 1184 ms: 75 batches; a full scan is 5 batches (50 pages)
    # and the empty batch that ends it
    assert m.ksm.pages_scanned == 10 * (75 - 75 // 6)
    assert m.ksmd_cpu_ns == 75 * 1000 + m.ksm.pages_scanned * 1000


def test_steady_state_of_a_static_trace_is_the_converged_estimate(tmp_path) -> None:
    trace = moving_trace([Group(60, "common"), Group(30, "private"), Group(10, "zero")],
                         processes=3, seconds=8.0, interval_ms=1000)
    path = tmp_path / "static.trace"
    write_trace(trace, path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["estimate", str(path), "--json", "--pages-to-scan", "100",
                     "--smart-scan", "0"]) == 0
    r = json.loads(out.getvalue())
    st = r["steady_state"]
    # 60 common pages in 3 processes and 10 zero pages in each: 60 + 1 KSM pages,
    # 2 * 60 + 29 sharing
    assert st["pages_shared"] == 61 and st["pages_sharing"] == 149
    assert st["pages_volatile"] == 0 and st["pages_unshared"] == 90
    assert st["cpu_fraction"] > 0
    assert r["trace"]["complete"] and r["trace"]["initial_pages"] == 300
    assert len(r["timeline"]) >= 9 and all(set(SYSFS) <= set(row) for row in r["timeline"])
    assert r["ksm"]["pages_sharing"] == 149


@pytest.fixture(scope="module")
def moving_path(tmp_path_factory) -> str:
    trace = moving_trace([Group(200, "common", "same", 100.0), Group(100, "private"),
                          Group(100, "private", "fresh", 50.0)], processes=3, seconds=6.0)
    path = tmp_path_factory.mktemp("t") / "moving.trace"
    write_trace(trace, path)
    return str(path)


def test_estimate_trace_text_and_plot(moving_path, tmp_path, capsys) -> None:
    png = tmp_path / "t.png"
    assert main(["estimate", moving_path, "--pages-to-scan", "200", "--smart-scan", "0",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for what in ("steady state over the second half (3.0-6.0 s", "memory saved",
                 "pages_volatile", "copied on write", "% of one CPU", "full scans/s",
                 "trace complete", f"plot: {png}", "HZ=250"):
        assert what in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_trace_cut_short_says_so(moving_path, tmp_path, capsys) -> None:
    data = open(moving_path, "rb").read()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert main(["estimate", str(cut), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert not r["trace"]["complete"] and r["trace"]["damage"].startswith("cut short")
    assert r["trace"]["duration_s"] < 6.0
    assert any("incomplete" in x for x in r["remarks"])


@pytest.mark.parametrize("extra, message", [
    (["--sample"], "replayed alone"),
    (["--pages-to-scan", "0"], "never scan"),
    (["--cost-model", "/nonexistent.json"], "No such file"),
])
def test_estimate_trace_refuses(moving_path, capsys, extra, message) -> None:
    assert main(["estimate", moving_path, *extra]) != 0
    out, err = capsys.readouterr()
    assert out == "" and message in err and err.count("\n") == 1


def test_cost_model_file(moving_path, tmp_path, capsys) -> None:
    f = tmp_path / "cm.json"
    f.write_text(json.dumps({"cost_model": {"page_ns": 9000, "batch_ns": 5000, "hz": 100,
                                            "wake_ns": 0}}))
    assert main(["estimate", moving_path, "--json", "--cost-model", str(f)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cost_model"] == {"page_ns": 9000, "batch_ns": 5000, "hz": 100, "wake_ns": 0}
    f.write_text("{}")
    assert main(["estimate", moving_path, "--cost-model", str(f)]) == 1
    assert "not a cost-model file" in capsys.readouterr().err


def test_tune_trace(moving_path, capsys) -> None:
    assert main(["tune", moving_path, "--json", "--pages-to-scan-values", "50,400",
                 "--sleep-millisecs-values", "20,100"]) == 0
    r = json.loads(capsys.readouterr().out)
    rows = r["rows"]
    assert len(rows) == 8 and {x["smart_scan"] for x in rows} == {0, 1}
    best = max(x["saved_mib"] for x in rows)
    c = r["cheapest"]
    assert c["saved_mib"] >= 0.9 * best
    assert all(x["cpu_fraction"] >= c["cpu_fraction"] for x in rows
               if x["saved_mib"] >= 0.9 * best)
    for x in rows:
        if x["saved_mib"] > 0:
            assert x["cpu_ms_per_s_per_saved_mib"] == pytest.approx(
                1000 * x["cpu_fraction"] / x["saved_mib"])
    assert main(["tune", moving_path, "--pages-to-scan-values", "50,400",
                 "--sleep-millisecs-values", "20"]) == 0
    out = capsys.readouterr().out
    assert "cheapest setting keeping 90% of the best steady-state savings" in out


def test_fill_pages_is_fill_page_by_page(Machine) -> None:
    rng = np.random.default_rng(2)
    pages = rng.integers(0, 256, (6, PAGE), np.uint8)
    machines = []
    for scattered in (True, False):
        m = Machine()
        p = m.spawn()
        a = p.mmap(8)
        b = p.mmap(4)
        p.fill(a, np.repeat(pages[:1], 8, axis=0))
        p.madvise(a, 8 * PAGE, MADV_MERGEABLE)
        m.ksm.run = 1
        m.ksm.scan(full_scans=2)
        addrs = [a + 3 * PAGE, b, a, a + 7 * PAGE, b + 3 * PAGE, a + 3 * PAGE]
        if scattered:
            p.fill_pages(addrs, pages)
        else:
            for k, x in enumerate(addrs):
                p.fill(x, pages[k : k + 1])
        m.check_invariants()
        machines.append((m, p, a, b))
    (m1, p1, a1, b1), (m2, p2, a2, b2) = machines
    assert p1.read(a1, 8 * PAGE) == p2.read(a2, 8 * PAGE)
    assert p1.read(b1, 4 * PAGE) == p2.read(b2, 4 * PAGE)
    assert m1.ksm.stats() == m2.ksm.stats() and p1.ksm_stat() == p2.ksm_stat()
    with pytest.raises(OSError) as e:
        p1.fill_pages([a1, b1 + 4 * PAGE], pages[:2])
    assert e.value.errno == 14
    with pytest.raises(OSError) as e:
        p1.fill_pages([a1 + 1], pages[:1])
    assert e.value.errno == 22
    with pytest.raises(ValueError):
        p1.fill_pages([a1], pages[:2])
    assert p1.read(a1, 8 * PAGE) == p2.read(a2, 8 * PAGE)  # nothing changed


def test_steady_state_means() -> None:
    rows = [{"t": float(t), "pages_shared": t, "pages_sharing": 2 * t, "pages_unshared": 0,
             "pages_volatile": 1, "ksm_zero_pages": 0, "general_profit": 4096 * t,
             "ksmd_cpu_ns": 10**8 * t, "full_scans": t, "pages_scanned": 100 * t,
             "cow_ksm": 3 * t} for t in range(11)]
    st = steady_state(rows, 10.0)
    # each row holds until the next: 2t over t = 5..9 (the row at 10 s holds 0 s)
    assert st["rows"] == 6 and st["pages_sharing"] == 14.0 and st["saved_pages"] == 14.0
    assert st["cpu_fraction"] == pytest.approx(0.1) and st["cow_per_s"] == pytest.approx(3)
    assert st["full_scans_per_s"] == pytest.approx(1) and st["pages_scanned_per_s"] == 100


def test_steady_state_weighs_rows_by_time() -> None:
    """Extra rows (a replay samples at every change time too) do not change the means:
    volatile 100 while writing (5-8 s, rows every 0.05 s), 0 after (8-10 s, every
    0.5 s) is 60 on average over 5-10 s; the row at 4.5 s holds until 5 s."""
    def row(t: float, vol: int) -> dict[str, float]:
        return {"t": t, "pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0,
                "pages_volatile": vol, "ksm_zero_pages": 0, "general_profit": 0,
                "ksmd_cpu_ns": 0, "full_scans": 0, "pages_scanned": 0}

    rows = [row(4.5, 100)] + [row(5.05 + 0.05 * i, 100) for i in range(59)]
    rows += [row(8.0 + 0.5 * i, 0) for i in range(5)]
    assert steady_state(rows, 10.0)["pages_volatile"] == pytest.approx(60.0)


def test_calibration_fit_recovers_a_known_model(monkeypatch) -> None:
    from ksmcore import calibrate

    monkeypatch.setattr(calibrate, "config_hz", lambda: None)  # fit HZ too
    true = CostModel(page_ns=2900, batch_ns=60_000, hz=250, wake_ns=1_500_000)
    rows = []
    for pts, sleep in calibrate.SETTINGS:
        rp = 6000
        b = calibrate._batches(rp, pts) * 3
        rows.append({"pages_to_scan": pts, "sleep_millisecs": sleep, "rounds": 3,
                     "round_pages": rp, "batches": b,
                     "cpu_ns": 3 * rp * true.page_ns + b * true.batch_ns,
                     "period_ns": true.period(pts, sleep)})
    got = calibrate.fit(rows)["cost_model"]
    assert got["hz"] == 250 and got["page_ns"] == 2900 and got["batch_ns"] == 60_000
    assert abs(got["wake_ns"] - 1_500_000) < 1000
    assert calibrate._batches(6000, 200) == 31 and calibrate._batches(6100, 200) == 31


def test_estimate_and_tune_trace_as_csv(moving_path, capsys) -> None:
    assert main(["estimate", moving_path, "--output-format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("t,") and "pages_volatile" in lines[0].split(",")
    assert len(lines) > 7  # a row a second at least, over 6 s
    assert main(["tune", moving_path, "--output-format", "csv", "--pages-to-scan-values",
                 "100", "--sleep-millisecs-values", "20"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("smart_scan,pages_to_scan") and len(rows) == 3
    assert main(["estimate", moving_path, "--output-format", "prometheus"]) == 2
    assert "a trace's replay is a timeline" in capsys.readouterr().err
