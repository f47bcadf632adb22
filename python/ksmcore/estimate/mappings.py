"""Who maps which KSM page after a run: the pages that a KSM page serves across
groups of processes (NUMA nodes for ``tune``'s merge_across_nodes trade-off, trust
domains for the security view)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..constants import PAGE_SIZE

NO_PAGE = -1


def page_frames(m: Any, p: Any) -> np.ndarray:
    """The frame mapped at every page of ``p``'s mappings (0: the zero page,
    NO_PAGE: none), in address order."""
    mem = getattr(m, "mem", None)
    slots = getattr(mem, "slots", None)
    vmas = getattr(p, "vmas", None)
    if slots is not None and vmas is not None:  # the engine: its page table at once
        from .._native import lib

        parts = []
        for v in vmas:
            n = (v.end - v.start) // PAGE_SIZE
            pte = np.asarray(slots["pte"][v.slot_base : v.slot_base + n], dtype=np.int64)
            pte = np.where(pte == lib.KSM_PTE_ZERO, 0, pte)
            parts.append(np.where(pte == lib.KSM_PTE_NONE, NO_PAGE, pte))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    out = []
    for start, end, _ in p.maps():
        for addr in range(start, end, PAGE_SIZE):
            f = p.pfn(addr)
            out.append(NO_PAGE if f is None else f)
    return np.asarray(out, dtype=np.int64)


def ksm_frames(m: Any) -> np.ndarray:
    """The frames of every live KSM page."""
    return np.asarray(sorted({int(s["kpfn"]) for s in m.ksm.stable_nodes()}), dtype=np.int64)


def ksm_mappings(m: Any, procs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Every mapping of a KSM page: (frame, index of the process) pairs."""
    kpfns = ksm_frames(m)
    frames, owners = [], []
    for i, p in enumerate(procs):
        f = page_frames(m, p)
        f = f[np.isin(f, kpfns)]
        frames.append(f)
        owners.append(np.full(len(f), i, dtype=np.int64))
    if not frames:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(frames), np.concatenate(owners)


def cross_group(m: Any, procs: Sequence[Any], groups: Sequence[int]) -> dict[str, int]:
    """KSM pages mapped by processes of more than one group, and their mappings."""
    frames, owners = ksm_mappings(m, procs)
    g = np.asarray(groups, dtype=np.int64)[owners] if len(owners) else owners
    pairs = np.unique(np.stack([frames, g]), axis=1) if len(frames) else np.zeros((2, 0))
    kp, per = np.unique(pairs[0], return_counts=True)
    shared = kp[per > 1]
    crossing = np.isin(frames, shared)
    return {
        "ksm_pages": int(len(kp)),
        "ksm_pages_across": int(len(shared)),
        "mappings_across": int(crossing.sum()),
    }


def remote_mappings(m: Any, procs: Sequence[Any], nodes: Sequence[int]) -> int:
    """Mappings of a KSM page that sits on another node than the process's memory."""
    frames, owners = ksm_mappings(m, procs)
    if not len(frames):
        return 0
    where = np.fromiter((m.pfn_to_nid(int(f)) for f in frames), dtype=np.int64,
                        count=len(frames))
    return int((where != np.asarray(nodes, dtype=np.int64)[owners]).sum())
