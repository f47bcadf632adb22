"""What the tests compare between implementations: the state a user can observe."""

from __future__ import annotations

from typing import Any

from ksmcore.constants import PAGE_SIZE


def normalized_maps(p: Any) -> list[tuple[int, int, bool]]:
    """maps() with adjacent pieces of equal flags joined (VMA splits are not observable)."""
    out: list[tuple[int, int, bool]] = []
    for start, end, mergeable in p.maps():
        if out and out[-1][1] == start and out[-1][2] == mergeable:
            out[-1] = (out[-1][0], end, mergeable)
        else:
            out.append((start, end, mergeable))
    return out


def sharing(procs: list[Any]) -> tuple[frozenset, frozenset]:
    """Which (process index, address) pairs share a frame, and which map the zero page."""
    by_pfn: dict[int, list[tuple[int, int]]] = {}
    zero: set[tuple[int, int]] = set()
    for i, p in enumerate(procs):
        if p.exited:
            continue
        for start, end, _ in p.maps():
            for addr in range(start, end, PAGE_SIZE):
                pfn = p.pfn(addr)
                if pfn is None:
                    continue
                if pfn == 0:
                    zero.add((i, addr))
                else:
                    by_pfn.setdefault(pfn, []).append((i, addr))
    groups = frozenset(frozenset(v) for v in by_pfn.values() if len(v) > 1)
    return groups, frozenset(zero)


def snapshot(m: Any, procs: list[Any]) -> dict[str, Any]:
    """Everything observable: counters, ksm_stat, maps, sharing and contents."""
    state: dict[str, Any] = {"stats": m.ksm.stats(), "sharing": sharing(procs)}
    for i, p in enumerate(procs):
        if p.exited:
            state[f"p{i}"] = "exited"
            continue
        contents = b"".join(p.read(s, e - s) for s, e, _ in p.maps())
        state[f"p{i}"] = (p.ksm_stat(), normalized_maps(p), contents)
    return state


def frame_owners(procs: list[Any]) -> dict[int, tuple[tuple[int, int], ...]]:
    """Every mapped frame (pfn > 0) with the (pid, address) pairs that map it."""
    owners: dict[int, list[tuple[int, int]]] = {}
    for p in procs:
        if p.exited:
            continue
        for start, end, _ in p.maps():
            for addr in range(start, end, PAGE_SIZE):
                pfn = p.pfn(addr)
                if pfn:
                    owners.setdefault(pfn, []).append((p.pid, addr))
    return {pfn: tuple(sorted(v)) for pfn, v in owners.items()}


def canonical_events(events: list[dict[str, Any]], procs: list[Any]) -> list[dict[str, Any]]:
    """Tracepoint events with pfns replaced by what they name, so that the engine's and
    the reference's streams compare equal: the zero page stays 0; a removed stable
    node's page is a freed one ("stale"); a page being merged is named by the
    (pid, address) pairs that map it after the step ("freed" if none do)."""
    owners: dict[int, tuple[tuple[int, int], ...]] | None = None
    out = []
    for e in events:
        e = dict(e)
        name = e["event"]
        if name in ("ksm_remove_ksm_page", "ksm_remove_rmap_item"):
            e["pfn"] = "stale"
        elif name == "ksm_merge_with_ksm_page":
            if owners is None:
                owners = frame_owners(procs)
            for key in ("ksm_page", "pfn"):
                if e[key] is not None:
                    e[key] = owners.get(e[key], "freed")
        out.append(e)
    return out
