"""KSM's tracepoints (include/trace/events/ksm.h): subscribers, collection, recording.

Shared by the engine and the reference. Each implementation raises the kernel's
events at the kernel's places, as dicts ``{"event": name, field: value, ...}`` with
the fields of the tracepoint (:data:`EVENT_FIELDS`). Pointers become identities that
mean the same in both implementations and across runs:

- ``mm``: the pid of the process that owns the mm;
- ``rmap_item``: ``(pid, address)`` of the page the rmap_item stands for;
- ``ksm_page`` (a ``struct page *``): its pfn, or ``None`` for NULL.

pfns are each implementation's own (docs/MODEL.md): compare *which* pages, not
pfn values, across implementations.

Nothing is built while nobody subscribes: ``Tracer.active`` is False and the raising
code tests it first (the engine's C core buffers nothing either).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

Event = dict[str, Any]
Subscriber = Callable[[Event], None]

# Every event with its fields, in the order of the kernel's TP_STRUCT__entry.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "ksm_start_scan": ("seq", "rmap_entries"),
    "ksm_stop_scan": ("seq", "rmap_entries"),
    "ksm_enter": ("mm",),
    "ksm_exit": ("mm",),
    "ksm_merge_one_page": ("pfn", "rmap_item", "mm", "err"),
    "ksm_merge_with_ksm_page": ("ksm_page", "pfn", "rmap_item", "mm", "err"),
    "ksm_remove_ksm_page": ("pfn",),
    "ksm_remove_rmap_item": ("pfn", "rmap_item", "mm"),
    "ksm_advisor": ("scan_time", "pages_to_scan", "cpu_percent"),
}


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def scan_event(name: str, seqnr: int, rmap_items: int) -> Event:
    """ksm_start_scan / ksm_stop_scan: ``int seq`` and ``u32 rmap_entries``."""
    return {"event": name, "seq": _s32(seqnr), "rmap_entries": rmap_items & 0xFFFFFFFF}


def format_event(e: Event) -> str:
    """The event as the kernel's TP_printk prints it (pointers as the model's ids)."""
    name = e["event"]
    if name in ("ksm_start_scan", "ksm_stop_scan"):
        text = f"seq {e['seq']} rmap size {e['rmap_entries']}"
    elif name in ("ksm_enter", "ksm_exit"):
        text = f"mm {e['mm']}"
    elif name == "ksm_merge_one_page":
        text = f"ksm pfn {e['pfn']} rmap_item {e['rmap_item']} mm {e['mm']} error {e['err']}"
    elif name == "ksm_merge_with_ksm_page":
        prefix = "ksm " if e["ksm_page"] is not None else ""
        text = (f"{prefix}pfn {e['pfn']} rmap_item {e['rmap_item']} mm {e['mm']} "
                f"error {e['err']}")
    elif name == "ksm_remove_ksm_page":
        text = f"pfn {e['pfn']}"
    elif name == "ksm_remove_rmap_item":
        text = f"pfn {e['pfn']} rmap_item {e['rmap_item']} mm {e['mm']}"
    elif name == "ksm_advisor":
        text = (f"ksm scan time {e['scan_time']} pages_to_scan {e['pages_to_scan']} "
                f"cpu percent {e['cpu_percent']}")
    else:
        raise ValueError(f"unknown KSM event {name!r}")
    return f"{name}: {text}"


def canonical_ids(events: list[Event]) -> list[Event]:
    """Events with every identity replaced by its order of first appearance (mms,
    rmap_items and pfns each counted apart) and ``ksm_page`` reduced to "not NULL", so
    that streams of two machines (or of a model and the kernel's tracefs, whose
    pointers are hashed) compare equal when they tell the same story. Meant for runs
    that free no rmap_item and allocate no page while traced (static workloads):
    otherwise the kernel may reuse an address for another object."""
    ids: dict[str, dict[Any, int]] = {"mm": {}, "rmap_item": {}, "pfn": {}}
    out = []
    for e in events:
        e = dict(e)
        for key, kind in (("mm", "mm"), ("rmap_item", "rmap_item"), ("pfn", "pfn")):
            if key in e:
                e[key] = ids[kind].setdefault(e[key], len(ids[kind]))
        if "ksm_page" in e:
            e["ksm_page"] = e["ksm_page"] is not None
        out.append(e)
    return out


class JsonLinesRecorder:
    """A subscriber that writes each event as one JSON object per line
    (``rmap_item`` becomes a two-element list)."""

    def __init__(self, target: str | os.PathLike[str] | IO[str]) -> None:
        if isinstance(target, (str, os.PathLike)):
            self._file: IO[str] = open(Path(target), "w", encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self._file = target
            self._owned = False

    def __call__(self, event: Event) -> None:
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._owned:
            self._file.close()
        else:
            self._file.flush()


def read_json_lines(path: str | os.PathLike[str]) -> list[Event]:
    """The events a :class:`JsonLinesRecorder` wrote, with ``rmap_item`` as a tuple."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            e = json.loads(line)
            if isinstance(e.get("rmap_item"), list):
                e["rmap_item"] = tuple(e["rmap_item"])
            out.append(e)
    return out


class Tracer:
    """The tracepoints of one machine (``m.trace``).

    ``subscribe(fn)`` calls ``fn(event)`` for every event until ``unsubscribe(fn)``;
    ``collect()`` and ``record(path)`` are context managers over that. Subscribers are
    called synchronously, in subscription order, and must not change the machine.
    """

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self._subscribers: list[Subscriber] = []
        self._on_change = on_change
        self.active = False

    def _changed(self) -> None:
        active = bool(self._subscribers)
        if active != self.active:
            self.active = active
            if self._on_change is not None:
                self._on_change(active)

    def subscribe(self, fn: Subscriber) -> Subscriber:
        """Call ``fn(event)`` for every later event; returns ``fn``."""
        if not callable(fn):
            raise TypeError("a subscriber is a callable taking one event dict")
        self._subscribers.append(fn)
        self._changed()
        return fn

    def unsubscribe(self, fn: Subscriber) -> None:
        """Stop calling ``fn`` (ValueError if it was not subscribed)."""
        self._subscribers.remove(fn)
        self._changed()

    def emit(self, event: Event) -> None:
        for fn in list(self._subscribers):
            fn(event)

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[Event]]:
        """``with tracer.collect() as events:`` appends every event to ``events``."""
        events: list[Event] = []
        self.subscribe(events.append)
        try:
            yield events
        finally:
            self.unsubscribe(events.append)

    @contextlib.contextmanager
    def record(self, target: str | os.PathLike[str] | IO[str]) -> Iterator[None]:
        """Write every event to ``target`` as JSON lines while the block runs."""
        recorder = JsonLinesRecorder(target)
        self.subscribe(recorder)
        try:
            yield
        finally:
            self.unsubscribe(recorder)
            recorder.close()


@contextlib.contextmanager
def tracing(tracer: Tracer, record: str | os.PathLike[str] | IO[str] | None = None
            ) -> Iterator[list[Event]]:
    """``m.tracing()``: collect the events of the block, and also write them to
    ``record`` (a path or a text file) as JSON lines if given."""
    with contextlib.ExitStack() as stack:
        events = stack.enter_context(tracer.collect())
        if record is not None:
            stack.enter_context(tracer.record(record))
        yield events
