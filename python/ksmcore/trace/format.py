"""The trace file: memory that moves, as ``ksmcore record`` writes it (docs/trace-format.md).

A trace is a 16-byte header (magic ``KSMTRACE``, version) followed by records. Every
record is framed as ``type u8, 3 zero bytes, length u32, crc32 u32`` and a payload of
``length`` bytes, the zlib-compressed body. Page contents are stored once each
(deduplicated by a 128-bit xxh3 of the page) in CONTENT records and numbered in order
of first appearance; CHANGES records refer to pages by that number. A changed page
whose XOR with the page it replaces has more zero bytes than the page itself is stored
as that XOR (writes that touch a few bytes of a page cost a few bytes).

Times are integer nanoseconds since the start of the recording. An interval's changes
end with a TICK record; a reader keeps only whole intervals, so a trace cut short (the
recorder was killed, the disk filled up) is read up to its last whole interval and
says so (``Trace.complete`` False and ``Trace.damage``).
"""

from __future__ import annotations

import io
import json
import lzma
import os
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import xxhash

from ..constants import PAGE_SIZE

MAGIC = b"KSMTRACE"
VERSION = 1
_HEADER = struct.Struct("<8sHHI")  # magic, version, header size, reserved
_FRAME = struct.Struct("<B3xII")  # type, length, crc32 of the payload

META, PROCESS, CONTENT, CHANGES, TICK, END = 1, 2, 3, 4, 5, 6
RECORD_NAMES = {META: "META", PROCESS: "PROCESS", CONTENT: "CONTENT", CHANGES: "CHANGES",
                TICK: "TICK", END: "END"}
ABSENT = 0xFFFFFFFF  # a content id meaning "the page is no longer present"
NO_BASE = 0xFFFFFFFF  # a CONTENT page stored as itself, not as a XOR
_CONTENT_HEAD = struct.Struct("<II")  # first id, count
_CHANGES_HEAD = struct.Struct("<QIIII")  # t_ns, process, flags, nmaps, npages
_TICK = struct.Struct("<Q")
F_MAPS = 1  # the record carries the process's whole list of mappings
F_EXITED = 2  # the process exited (at t_ns; nothing of it follows)
MAX_RECORD = 1 << 31  # a length past this is damage, not a record
LZMA_BIT = 0x80  # in the type byte: the body is lzma- (xz-) compressed, not zlib
STORED_BIT = 0x40  # in the type byte: the body is stored as it is (incompressible)
CODECS = ("auto", "zlib", "lzma")
DEFAULT_INTERVAL_MS = 100  # ksmcore record's sampling interval
# lzma for memory: LZMA2 at preset 0 (fast), its literal and match positions in
# 8-byte words (pb=lp=3, lc=0), as heaps hold 64-bit pointers and counters: 5-10%
# smaller than plain preset 0 on the live heaps of node, java and python here. A
# reader needs nothing new: the xz stream carries its filter's settings.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 0, "pb": 3, "lp": 3, "lc": 0}]
CONTENT_CHUNK = 4096  # pages per CONTENT record of a large batch (compressed in parallel)


class TraceError(ValueError):
    """A file that is no trace, or a trace this version of ksmcore cannot read."""


def is_trace(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts with the trace magic (regular files only)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def page_key(page: np.ndarray) -> bytes:
    return xxhash.xxh3_128_digest(page.data)


# --------------------------------------------------------------------------------
# writing


class TraceWriter:
    """Writes a trace to a path or a binary stream, record by record.

    ``process()`` declares a process, ``changes()`` adds what one process changed at a
    time, ``tick()`` closes the interval, ``close()`` writes the END record. Contents
    are interned here: pass the pages themselves.

    ``codec``: how CONTENT records are compressed. ``zlib`` (level 1) is fast;
    ``lzma`` about half the size on process memory and 10-20x slower; ``auto`` (what
    ``ksmcore record`` uses) lzma for the initial pages, written once, where most of a
    trace's bytes go, and zlib for the changes of each interval, which must keep up
    with the sampling. Every record of every codec is version 1."""

    def __init__(self, out: str | os.PathLike[str] | IO[bytes], meta: dict[str, Any] | None = None,
                 level: int = 1, codec: str = "zlib") -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}")
        self._codec = codec
        if isinstance(out, (str, os.PathLike)):
            self._f: IO[bytes] = open(out, "wb")  # noqa: SIM115 (closed by close())
            self._own = True
        else:
            self._f = out
            self._own = False
        self._level = level
        self._ids: dict[bytes, int] = {}
        self._current: list[dict[int, int]] = []  # per process: vpn -> content id
        # content id -> its page, for XOR bases, while some process's page holds it
        # (refs counts them): the writer keeps what the processes hold now, not every
        # content it ever wrote
        self._pages_of_id: dict[int, np.ndarray] = {}
        self._refs: dict[int, int] = {}
        self._nprocs = 0
        self._last_t = 0
        self._ticked = False  # a TICK was written: the initial state is out
        self.bytes_written = 0
        self.closed = False
        self._f.write(_HEADER.pack(MAGIC, VERSION, _HEADER.size, 0))
        self.bytes_written += _HEADER.size
        body = dict(meta or {})
        body.setdefault("page_size", PAGE_SIZE)
        self._record(META, json.dumps(body).encode())

    def _lzma(self, kind: int) -> bool:
        return kind == CONTENT and (self._codec == "lzma"
                                    or (self._codec == "auto" and not self._ticked))

    def _pack(self, kind: int, body: bytes,
              sample: tuple[int, int] | None = None) -> tuple[int, bytes]:
        """The record's type byte and payload."""
        if sample is not None and len(body) > 4 * PAGE_SIZE and \
                len(zlib.compress(body[sample[0] : sample[1]], 1)) > 0.97 * (sample[1] - sample[0]):
            # random bytes: compressing them would cost time and save nothing
            return kind | STORED_BIT, body
        if self._lzma(kind):
            return kind | LZMA_BIT, lzma.compress(body, lzma.FORMAT_XZ, filters=LZMA_FILTERS)
        return kind, zlib.compress(body, self._level)

    def _put(self, kind: int, payload: bytes) -> None:
        self._f.write(_FRAME.pack(kind, len(payload), zlib.crc32(payload)))
        self._f.write(payload)
        self.bytes_written += _FRAME.size + len(payload)

    def _record(self, kind: int, body: bytes, sample: tuple[int, int] | None = None) -> None:
        self._put(*self._pack(kind, body, sample))

    @property
    def unique_pages(self) -> int:
        return len(self._ids)

    def process(self, pid: int | None, name: str, node: int | None = None, t_ns: int = 0) -> int:
        """Declare a process; returns its index in the trace."""
        idx = self._nprocs
        self._nprocs += 1
        self._current.append({})
        self._record(PROCESS, json.dumps({"index": idx, "pid": pid, "name": name,
                                          "node": node, "t_ns": t_ns}).encode())
        return idx

    def _intern(self, proc: int, vpns: np.ndarray, pages: np.ndarray) -> np.ndarray:
        """Content ids of ``pages``; new contents go out in one CONTENT record."""
        ids = np.empty(len(vpns), np.uint32)
        new_pages: list[np.ndarray] = []
        bases: list[int] = []
        cur = self._current[proc]
        for i in range(len(vpns)):
            page = pages[i]
            key = page_key(page)
            cid = self._ids.get(key)
            if cid is not None and cid not in self._pages_of_id:
                self._pages_of_id[cid] = np.array(page, copy=True)  # held again
            if cid is None:
                cid = len(self._ids)
                self._ids[key] = cid
                page = np.array(page, copy=True)
                self._pages_of_id[cid] = page
                base = cur.get(int(vpns[i]), ABSENT)
                stored, b = page, NO_BASE
                if base != ABSENT:
                    x = np.bitwise_xor(page, self._pages_of_id[base])
                    if np.count_nonzero(x) < np.count_nonzero(page):
                        stored, b = x, base
                new_pages.append(stored)
                bases.append(b)
            ids[i] = cid
        if new_pages:
            first = len(self._ids) - len(new_pages)
            bodies = []
            for at in range(0, len(new_pages), CONTENT_CHUNK):
                part = new_pages[at : at + CONTENT_CHUNK]
                body = (_CONTENT_HEAD.pack(first + at, len(part))
                        + np.asarray(bases[at : at + CONTENT_CHUNK], np.uint32).tobytes()
                        + np.stack(part).tobytes())
                # a sample of the pages (their first and last pages) tells
                # incompressible ones
                head = _CONTENT_HEAD.size + 4 * len(part)
                bodies.append((body, (head, head + PAGE_SIZE) if len(part) < 3
                               else (len(body) - 2 * PAGE_SIZE, len(body))))
            if len(bodies) > 1 and self._lzma(CONTENT):
                # lzma lets go of the GIL: a large batch (the initial pages) is
                # compressed on every CPU, and written in order
                with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                    packed = list(pool.map(lambda b: self._pack(CONTENT, *b), bodies))
            else:
                packed = [self._pack(CONTENT, *b) for b in bodies]
            for kind, payload in packed:
                self._put(kind, payload)
        return ids

    def changes(self, t_ns: int, proc: int, vpns: Any = (), pages: np.ndarray | None = None,
                absent: Any = (), maps: list[tuple[int, int]] | None = None,
                exited: bool = False) -> None:
        """What process ``proc`` changed by ``t_ns``: the pages at page numbers ``vpns``
        now hold ``pages`` (an (n, 4096) uint8 array), those at ``absent`` are no longer
        present, ``maps`` (when given) is its whole new list of mappings [start, end)
        in bytes, ``exited`` ends it."""
        if not 0 <= proc < self._nprocs:
            raise ValueError(f"no process {proc} in this trace")
        if t_ns < self._last_t:
            raise ValueError("trace times never go back")
        vp = np.asarray(vpns, np.uint64).reshape(-1)
        gone = np.asarray(absent, np.uint64).reshape(-1)
        if pages is None:
            pages = np.zeros((0, PAGE_SIZE), np.uint8)
        if pages.shape != (len(vp), PAGE_SIZE) or pages.dtype != np.uint8:
            raise ValueError("pages must be a (len(vpns), 4096) uint8 array")
        ids = self._intern(proc, vp, pages)
        cur = self._current[proc]
        for v, cid in zip(vp.tolist(), ids.tolist(), strict=True):
            old = cur.get(v)
            if old != cid:
                cur[v] = cid
                self._refs[cid] = self._refs.get(cid, 0) + 1
                if old is not None:
                    self._unref(old)
        for v in gone.tolist():
            old = cur.pop(v, None)
            if old is not None:
                self._unref(old)
        if exited:
            for old in cur.values():
                self._unref(old)
            cur.clear()
        for cid in ids.tolist():
            if cid not in self._refs:  # superseded within this call
                self._pages_of_id.pop(cid, None)
        all_vpns = np.concatenate([vp, gone])
        all_ids = np.concatenate([ids, np.full(len(gone), ABSENT, np.uint32)])
        flags = (F_MAPS if maps is not None else 0) | (F_EXITED if exited else 0)
        m = np.asarray(maps or [], np.uint64).reshape(-1, 2)
        body = (_CHANGES_HEAD.pack(t_ns, proc, flags, len(m), len(all_vpns))
                + m.tobytes() + all_vpns.tobytes() + all_ids.tobytes())
        self._record(CHANGES, body)
        self._last_t = t_ns

    def _unref(self, cid: int) -> None:
        left = self._refs[cid] - 1
        if left:
            self._refs[cid] = left
        else:
            del self._refs[cid]
            self._pages_of_id.pop(cid, None)

    def held_pages(self) -> int:
        """Pages the writer holds as XOR bases: those the processes hold now."""
        return len(self._pages_of_id)

    def tick(self, t_ns: int) -> None:
        """Every change up to ``t_ns`` is written: the interval is whole."""
        if t_ns < self._last_t:
            raise ValueError("trace times never go back")
        self._last_t = t_ns
        self._ticked = True
        self._record(TICK, _TICK.pack(t_ns))
        self._f.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self.closed:
            return
        body = dict(summary or {})
        body.setdefault("t_ns", self._last_t)
        body.setdefault("unique_pages", len(self._ids))
        self._record(END, json.dumps(body).encode())
        self._f.flush()
        if self._own:
            self._f.close()
        self.closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------
# reading


@dataclass
class TraceProcess:
    index: int
    pid: int | None
    name: str
    node: int | None
    start_ns: int = 0
    exited_ns: int | None = None  # when it exited during the recording


@dataclass
class Change:
    """What one process changed by ``t_ns``."""

    t_ns: int
    proc: int
    vpns: np.ndarray  # uint64 page numbers (address >> 12)
    ids: np.ndarray  # uint32 content ids, ABSENT for a page no longer present
    maps: list[tuple[int, int]] | None = None  # the new list of mappings, when it changed
    exited: bool = False


@dataclass
class Trace:
    """A whole trace in memory: the pages (each distinct content once) and the changes
    in time order, the first of each process being its initial state."""

    meta: dict[str, Any]
    processes: list[TraceProcess]
    contents: np.ndarray  # (n, 4096) uint8: content id -> page
    changes: list[Change]
    end_ns: int  # the time of the last whole interval
    complete: bool = True  # False: the file was cut short or damaged, read up to end_ns
    damage: str | None = None  # what was wrong, when not complete
    summary: dict[str, Any] = field(default_factory=dict)  # the END record
    intervals: int = 0  # whole intervals read (TICK records; the initial state is one)

    @property
    def duration(self) -> float:
        return self.end_ns / 1e9

    def status(self) -> str:
        """One line saying whether the trace was read whole."""
        if self.complete:
            return f"trace complete: {self.duration:.1f} s, {len(self.changes)} change records"
        return (f"trace incomplete ({self.damage}): read up to its last whole interval, "
                f"{self.duration:.1f} s")

    def initial_pages(self) -> int:
        seen: set[int] = set()
        n = 0
        for c in self.changes:
            if c.proc not in seen:
                seen.add(c.proc)
                n += int((c.ids != ABSENT).sum())
        return n


def _frames(f: IO[bytes]) -> Iterator[tuple[int, bytes] | str]:
    """(type, body) for each whole record; a string saying what is wrong ends it."""
    n = 0
    while True:
        head = f.read(_FRAME.size)
        if not head:
            return
        if len(head) < _FRAME.size:
            yield f"cut short in the header of record {n + 1}"
            return
        kind, length, crc = _FRAME.unpack(head)
        packed = bool(kind & LZMA_BIT)
        stored = bool(kind & STORED_BIT)
        kind &= ~(LZMA_BIT | STORED_BIT)
        if kind not in RECORD_NAMES or length > MAX_RECORD:
            yield f"damaged: record {n + 1} has an unknown type {kind}"
            return
        payload = f.read(length)
        if len(payload) < length:
            yield f"cut short in record {n + 1} ({RECORD_NAMES[kind]})"
            return
        if zlib.crc32(payload) != crc:
            yield f"damaged: record {n + 1} ({RECORD_NAMES[kind]}) fails its checksum"
            return
        try:
            body = payload if stored else lzma.decompress(payload) if packed \
                else zlib.decompress(payload)
        except (zlib.error, lzma.LZMAError):
            yield f"damaged: record {n + 1} ({RECORD_NAMES[kind]}) does not decompress"
            return
        n += 1
        yield kind, body


def _header(f: IO[bytes], name: str) -> None:
    head = f.read(_HEADER.size)
    if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
        raise TraceError(f"{name}: not a ksmcore trace (no KSMTRACE magic)")
    if len(head) < _HEADER.size:
        raise TraceError(f"{name}: a ksmcore trace cut short in its header")
    _, version, size, _ = _HEADER.unpack(head)
    if version != VERSION:
        raise TraceError(f"{name}: trace format version {version}; this ksmcore reads "
                         f"version {VERSION} only")
    if size < _HEADER.size:
        raise TraceError(f"{name}: damaged trace header")
    f.read(size - _HEADER.size)


class _Damage(Exception):
    pass


class _Store:
    """The decoded contents, in a buffer that doubles when full."""

    def __init__(self) -> None:
        self.buf = np.empty((64, PAGE_SIZE), np.uint8)
        self.n = 0

    @property
    def pages(self) -> np.ndarray:
        return self.buf[: self.n]

    def append(self, block: np.ndarray) -> np.ndarray:
        need = self.n + len(block)
        if need > len(self.buf):
            bigger = np.empty((max(need, 2 * len(self.buf)), PAGE_SIZE), np.uint8)
            bigger[: self.n] = self.buf[: self.n]
            self.buf = bigger
        rows = self.buf[self.n : need]
        rows[:] = block
        self.n = need
        return rows


def read_trace(source: str | os.PathLike[str] | IO[bytes] | bytes, strict: bool = False) -> Trace:
    """Read a whole trace. A file that is no trace, of another version, or without its
    META record raises :class:`TraceError`. A trace cut short or damaged after that is
    read up to its last whole interval (``complete`` False, ``damage`` says what), or
    with ``strict`` refused."""
    if isinstance(source, bytes):
        f: IO[bytes] = io.BytesIO(source)
        name = "trace"
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        try:
            f = open(source, "rb")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise TraceError(f"{name}: {e.strerror}") from None
    else:
        f, name = source, getattr(source, "name", "trace")
    try:
        return _read(f, name, strict)
    finally:
        if isinstance(source, (str, os.PathLike)):
            f.close()


def _read(f: IO[bytes], name: str, strict: bool) -> Trace:
    _header(f, name)
    meta: dict[str, Any] | None = None
    procs: list[TraceProcess] = []
    store = _Store()  # every content decoded, by id
    pending: list[Change] = []  # changes of the interval not yet closed by a TICK
    done: list[Change] = []
    kept_pages = 0  # contents referenced by whole intervals
    kept_procs = 0
    end_ns = 0
    summary: dict[str, Any] = {}
    damage: str | None = None
    complete = False
    intervals = 0

    for item in _frames(f):
        if isinstance(item, str):
            damage = item
            break
        kind, body = item
        try:
            if meta is None:
                if kind != META:
                    raise TraceError(f"{name}: damaged trace (no META record first)")
                meta = json.loads(body)
                continue
            if kind == PROCESS:
                d = json.loads(body)
                if d.get("index") != len(procs):
                    raise _Damage(f"damaged: process record {d.get('index')} out of order")
                procs.append(TraceProcess(len(procs), d.get("pid"), str(d.get("name")),
                                          d.get("node"), int(d.get("t_ns", 0))))
            elif kind == CONTENT:
                first, count = _CONTENT_HEAD.unpack_from(body)
                need = _CONTENT_HEAD.size + count * 4 + count * PAGE_SIZE
                if first != store.n or len(body) != need:
                    raise _Damage("damaged: a CONTENT record out of order or of the wrong size")
                bases = np.frombuffer(body, np.uint32, count, _CONTENT_HEAD.size)
                block = np.frombuffer(body, np.uint8, count * PAGE_SIZE,
                                      _CONTENT_HEAD.size + count * 4).reshape(count, PAGE_SIZE)
                rows = store.append(block)
                for i in np.flatnonzero(bases != NO_BASE).tolist():
                    b = int(bases[i])
                    if b >= first + i:
                        raise _Damage("damaged: a page based on a later page")
                    np.bitwise_xor(rows[i], store.pages[b], out=rows[i])
            elif kind == CHANGES:
                t, proc, flags, nmaps, n = _CHANGES_HEAD.unpack_from(body)
                off = _CHANGES_HEAD.size
                if len(body) != off + nmaps * 16 + n * 12 or proc >= len(procs):
                    raise _Damage("damaged: a CHANGES record of the wrong size or process")
                maps = np.frombuffer(body, np.uint64, nmaps * 2, off).reshape(-1, 2)
                vpns = np.frombuffer(body, np.uint64, n, off + nmaps * 16)
                ids = np.frombuffer(body, np.uint32, n, off + nmaps * 16 + n * 8)
                if ((ids >= store.n) & (ids != ABSENT)).any():
                    raise _Damage("damaged: a change refers to a page not stored before it")
                if t < end_ns:
                    raise _Damage("damaged: times go back")
                pending.append(Change(
                    int(t), int(proc), vpns, ids,
                    [(int(a), int(b)) for a, b in maps.tolist()] if flags & F_MAPS else None,
                    bool(flags & F_EXITED)))
            elif kind == TICK:
                (t,) = _TICK.unpack(body)
                if t < end_ns:
                    raise _Damage("damaged: times go back")
                done += pending
                pending = []
                end_ns = int(t)
                intervals += 1
                kept_pages, kept_procs = store.n, len(procs)
            elif kind == END:
                summary = json.loads(body)
                done += pending
                pending = []
                end_ns = max(end_ns, int(summary.get("t_ns", end_ns)))
                kept_pages, kept_procs = store.n, len(procs)
                complete = True
                break
            elif kind == META:
                raise _Damage("damaged: a second META record")
        except (_Damage, ValueError, KeyError, struct.error) as e:
            if isinstance(e, TraceError):
                raise
            damage = str(e) if isinstance(e, _Damage) else f"damaged: {e}"
            break
    if meta is None:
        raise TraceError(f"{name}: damaged trace (no META record)")
    if not complete and damage is None:
        damage = "cut short (no END record)"
    if not complete and strict:
        raise TraceError(f"{name}: trace {damage}")
    contents = store.pages[:kept_pages]
    procs = procs[:kept_procs]
    for c in done:
        if c.exited:
            procs[c.proc].exited_ns = c.t_ns
    return Trace(meta, procs, contents, done, end_ns, complete, None if complete else damage,
                 summary, intervals)


def write_trace(trace: Trace, out: str | os.PathLike[str] | IO[bytes]) -> None:
    """Write a Trace read before (or built in memory) back as a file."""
    with TraceWriter(out, trace.meta) as w:
        for p in trace.processes:
            w.process(p.pid, p.name, p.node, p.start_ns)
        last = None
        for c in trace.changes:
            if last is not None and c.t_ns != last:
                w.tick(last)
            keep = c.ids != ABSENT
            w.changes(c.t_ns, c.proc, c.vpns[keep], trace.contents[c.ids[keep]],
                      c.vpns[~keep], c.maps, c.exited)
            last = c.t_ns
        w.tick(trace.end_ns)
        w.close(dict(trace.summary))


def trace_size(path: str | os.PathLike[str]) -> int:
    return Path(path).stat().st_size
