"""The trace file format: round trips, deduplication, damage, the size budget."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from ksmcore.trace import ABSENT, TraceError, TraceWriter, read_trace, write_trace
from ksmcore.trace.format import page_key
from ksmcore.trace.synthetic import budget_trace

PAGE = 4096


def _pages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, PAGE), np.uint8)


def _small_trace(codec: str = "zlib") -> tuple[bytes, dict[str, object]]:
    rng = np.random.default_rng(5)
    common = _pages(rng, 4)
    a0 = np.concatenate([common, _pages(rng, 4)])
    b0 = np.concatenate([common, np.zeros((2, PAGE), np.uint8)])
    buf = io.BytesIO()
    w = TraceWriter(buf, {"who": "test"}, codec=codec)
    pa = w.process(100, "a", None, 0)
    pb = w.process(200, "b", 1, 0)
    w.changes(0, pa, np.arange(16, 24), a0, maps=[(16 << 12, 40 << 12)])
    w.changes(0, pb, np.arange(16, 22), b0, maps=[(16 << 12, 22 << 12)])
    w.tick(0)
    a1 = a0[:2].copy()
    a1[:, 100] ^= 0xFF  # two pages with one byte changed
    w.changes(100_000_000, pa, [16, 17], a1, absent=[23])
    w.changes(100_000_000, pb, [30], common[:1], maps=[(16 << 12, 22 << 12), (30 << 12, 31 << 12)])
    w.tick(100_000_000)
    w.changes(250_000_000, pb, exited=True)
    w.tick(250_000_000)
    w.close()
    return buf.getvalue(), {"a0": a0, "b0": b0, "a1": a1, "common": common, "writer": w}


@pytest.mark.parametrize("codec", ["zlib", "lzma", "auto"])
def test_round_trip(codec: str) -> None:
    data, d = _small_trace(codec)
    t = read_trace(data)
    assert t.complete and t.damage is None
    assert t.meta["who"] == "test" and t.meta["page_size"] == PAGE
    assert [(p.pid, p.name, p.node) for p in t.processes] == [(100, "a", None), (200, "b", 1)]
    assert t.processes[1].exited_ns == 250_000_000 and t.processes[0].exited_ns is None
    assert t.end_ns == 250_000_000
    c = t.changes
    assert [(x.t_ns, x.proc) for x in c] == [(0, 0), (0, 1), (10**8, 0), (10**8, 1),
                                              (250_000_000, 1)]
    assert (t.contents[c[0].ids] == d["a0"]).all()
    assert (t.contents[c[1].ids] == d["b0"]).all()
    assert c[0].maps == [(16 << 12, 40 << 12)]
    assert c[2].maps is None and c[2].vpns.tolist() == [16, 17, 23]
    assert (t.contents[c[2].ids[:2]] == d["a1"]).all() and c[2].ids[2] == ABSENT
    assert c[3].maps == [(16 << 12, 22 << 12), (30 << 12, 31 << 12)]
    assert c[4].exited and not len(c[4].vpns)
    # deduplicated: the common pages once, the zero page once, the page written into
    # b at 30 is the first common page again
    keys = {page_key(p) for p in np.concatenate([d["a0"], d["b0"], d["a1"]])}
    assert len(t.contents) == len(keys) == 4 + 4 + 1 + 2
    assert c[3].ids[0] == c[0].ids[0]
    assert t.initial_pages() == 14


def test_rewritten_trace_reads_the_same() -> None:
    data, _ = _small_trace()
    t = read_trace(data)
    out = io.BytesIO()
    write_trace(t, out)
    t2 = read_trace(out.getvalue())
    assert t2.complete and len(t2.changes) == len(t.changes)
    for a, b in zip(t.changes, t2.changes, strict=True):
        assert (a.t_ns, a.proc, a.maps, a.exited) == (b.t_ns, b.proc, b.maps, b.exited)
        assert a.vpns.tolist() == b.vpns.tolist()
        keep = a.ids != ABSENT
        assert ((b.ids != ABSENT) == keep).all()
        assert (t.contents[a.ids[keep]] == t2.contents[b.ids[keep]]).all()


def test_a_sparse_write_is_stored_as_a_small_xor() -> None:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    w = TraceWriter(buf)
    p = w.process(1, "p")
    pages = _pages(rng, 64)
    w.changes(0, p, np.arange(64), pages)
    w.tick(0)
    before = w.bytes_written
    new = pages.copy()
    new[:, 1000:1064] = rng.integers(0, 256, (64, 64), np.uint8)  # 64 bytes of each page
    w.changes(1, p, np.arange(64), new)
    w.tick(1)
    # 64 random bytes per page, plus 12 bytes of bookkeeping: nowhere near 4 KiB a page
    assert w.bytes_written - before < 64 * (64 + 12 + 40)
    w.close()
    t = read_trace(buf.getvalue())
    assert (t.contents[t.changes[1].ids] == new).all()


def test_the_writer_holds_only_the_pages_processes_hold_now() -> None:
    """XOR bases are the pages at those addresses now: after 50 intervals of rewrites
    (and contents that come back, and pages that go) the writer holds what the
    processes hold, and every change still reads back exactly."""
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    w = TraceWriter(buf)
    a, b = w.process(1, "a"), w.process(2, "b")
    first = _pages(rng, 32)
    w.changes(0, a, np.arange(32), first)
    w.changes(0, b, np.arange(16), first[:16])
    w.tick(0)
    expect = {}
    for t in range(1, 51):
        new = first[:8].copy()
        new[:, t % 4096] ^= 0xFF  # near the old: stored as XORs
        vp = np.arange(8) + (t % 3) * 8
        if t % 10 == 0:
            new[0] = first[31]  # a content that was seen before comes back
        w.changes(t, a, vp, new, absent=[30] if t == 25 else ())
        expect[t] = new
        w.tick(t)
        assert w.held_pages() <= 32 + 16
    w.changes(51, b, (), exited=True)
    w.tick(51)
    assert w.held_pages() <= 32
    w.close()
    tr = read_trace(buf.getvalue())
    for ch in tr.changes:
        if ch.proc == a and ch.t_ns in expect and len(ch.ids):
            assert (tr.contents[ch.ids[:8]] == expect[ch.t_ns]).all()  # (then the gone)


def test_cut_short_anywhere_reads_whole_intervals_only() -> None:
    data, d = _small_trace()
    full = read_trace(data)
    meta_len = struct.unpack_from("<I", data, 16 + 4)[0]
    for cut in range(16 + 12 + meta_len, len(data)):
        t = read_trace(data[:cut])
        assert not t.complete and t.damage
        assert t.damage.startswith("cut short") or t.damage.startswith("damaged")
        # only whole intervals: a prefix of the full trace's changes, ending at a tick
        assert t.end_ns in (0, 100_000_000, 250_000_000)
        got = [(c.t_ns, c.proc) for c in t.changes]
        want = [(c.t_ns, c.proc) for c in full.changes if c.t_ns <= t.end_ns] \
            if t.intervals else []
        assert got == want
        assert "incomplete" in t.status()
        with pytest.raises(TraceError, match="cut short|damaged"):
            read_trace(data[:cut], strict=True)
    # cut inside the META record: refused, nothing to read
    with pytest.raises(TraceError, match="no META"):
        read_trace(data[: 16 + 12 + meta_len - 1])


def test_damage_stops_at_the_damaged_record() -> None:
    data, _ = _small_trace()
    bad = bytearray(data)
    bad[len(data) // 2] ^= 0x55
    t = read_trace(bytes(bad))
    assert not t.complete and t.damage and t.damage.startswith("damaged")


def test_not_a_trace_or_another_version_is_refused_in_one_line(tmp_path) -> None:
    data, _ = _small_trace()
    for blob, what in [(b"hello world, not a trace", "not a ksmcore trace"),
                       (data[:10], "cut short in its header"),
                       (data[:8] + b"\x07\x00" + data[10:], "version 7")]:
        with pytest.raises(TraceError, match=what) as e:
            read_trace(blob)
        assert "\n" not in str(e.value)
    with pytest.raises(TraceError, match="No such file"):
        read_trace(tmp_path / "missing.trace")


def test_writer_refuses_bad_input() -> None:
    w = TraceWriter(io.BytesIO())
    p = w.process(1, "p")
    with pytest.raises(ValueError, match="no process"):
        w.changes(0, p + 1)
    with pytest.raises(ValueError, match="4096"):
        w.changes(0, p, [1, 2], np.zeros((1, PAGE), np.uint8))
    w.changes(10, p)
    with pytest.raises(ValueError, match="never go back"):
        w.changes(5, p)
    with pytest.raises(ValueError, match="codec"):
        TraceWriter(io.BytesIO(), codec="zip")


def _record_kinds(data: bytes) -> list[tuple[int, int]]:
    """(type, count of pages for CONTENT else 0) of each record, the codec bits kept."""
    from ksmcore.trace import format as F

    out, off = [], 16
    while off < len(data):
        kind, length, _ = F._FRAME.unpack_from(data, off)
        off += F._FRAME.size + length
        out.append(kind)
    return out


def test_auto_codec_lzma_for_the_initial_pages_zlib_for_the_changes(monkeypatch) -> None:
    """``auto`` (what ``ksmcore record`` writes): the initial pages' CONTENT records in
    lzma, in chunks compressed in parallel and written in order; the changes' in
    zlib. Still format version 1: a reader needs nothing new (the type byte's lzma
    bit was there from the start), and the trace reads back whole."""
    from ksmcore.trace import format as F

    monkeypatch.setattr(F, "CONTENT_CHUNK", 3)
    rng = np.random.default_rng(8)
    words = rng.integers(0, 1 << 12, (10, PAGE // 8), np.uint64).view(np.uint8)
    buf = io.BytesIO()
    w = TraceWriter(buf, codec="auto")
    p = w.process(1, "p")
    w.changes(0, p, np.arange(10), words)
    w.tick(0)
    later = words[:4].copy()
    later[:, :64] = 7
    w.changes(10**8, p, np.arange(4), later)
    w.tick(10**8)
    w.close()
    data = buf.getvalue()
    assert struct.unpack_from("<H", data, 8)[0] == 1  # version 1
    kinds = _record_kinds(data)
    content = [k for k in kinds if k & 0x3F == F.CONTENT]
    # 10 initial pages in chunks of 3: 4 records, lzma; then 4 changed pages in zlib
    assert content == [F.CONTENT | F.LZMA_BIT] * 4 + [F.CONTENT] * 2
    t = read_trace(data)
    assert t.complete and (t.contents[t.changes[0].ids] == words).all()
    assert (t.contents[t.changes[1].ids] == later).all()
    # and the same trace in zlib alone reads the same
    buf2 = io.BytesIO()
    write_trace(t, buf2)
    t2 = read_trace(buf2.getvalue())
    assert all(F.LZMA_BIT & k == 0 for k in _record_kinds(buf2.getvalue()))
    assert (t2.contents[t2.changes[0].ids] == words).all()


def test_size_budget_arithmetic() -> None:
    """The issue's budget: a 1 GiB process, 1% of its pages written each second, 60 s.
    The trace costs the entropy of its contents and a little more: here at 1/128 of the
    size, with pages as compressible as this machine's live process memory (zlib level
    1: 3.8x, lzma: 5.3x). benchmarks/test_trace.py measures the full size."""
    scale = 128
    size, writes, entropy = budget_trace((1 << 30) // PAGE // scale, 60, 0.01, codec="lzma")
    assert writes > 0.009 * (1 << 18) // scale * 60
    assert entropy <= size < 1.15 * entropy
    # the bookkeeping (12 bytes per page entry before compression) is a few percent
    assert ((1 << 18) // scale + writes) * 12 < 0.03 * size
