"""The engine's simulated machine: physical memory, processes and ksmd."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._native import lib, ptr
from ..constants import FIRST_PID
from ..errors import ksm_error
from ..numa import check_distances
from .ksmd import Ksm
from .memory import CHUNK_PAGES, Memory
from .process import Process


class Machine:
    """A machine with ``nodes`` NUMA nodes, its processes and its ksmd (``m.ksm``)."""

    def __init__(self, nodes: int = 1, distances: Sequence[Sequence[int]] | None = None) -> None:
        if not isinstance(nodes, int) or not 1 <= nodes <= 64:
            raise ksm_error(errno.EINVAL, f"nodes must be 1..64, not {nodes!r}")
        self.nodes = nodes
        self.distances = check_distances(nodes, distances)
        self.mem = Memory(nodes)
        self.ctx: Any = self.mem.ctx
        self.ksm = Ksm(self)
        self._all: list[Process] = []
        self._next_pid = FIRST_PID

    def _new_process(self, node: int = 0) -> Process:
        p = Process(self, self._next_pid, node)
        self._next_pid += 1
        self._all.append(p)
        return p

    def spawn(self, node: int = 0) -> Process:
        """A new process with an empty address space, running on ``node``."""
        if not isinstance(node, int) or not 0 <= node < self.nodes:
            raise ksm_error(errno.EINVAL, f"no NUMA node {node!r}")
        return self._new_process(node)

    @property
    def processes(self) -> list[Process]:
        return [p for p in self._all if not p.exited]

    def check_invariants(self) -> None:
        """Raise AssertionError if the trees, counters or page tables disagree."""
        from .invariants import check_invariants

        check_invariants(self)

    @property
    def clock_ms(self) -> int:
        """The simulated jiffies clock in ms (HZ=1000); 0 unless advanced."""
        return int(self.ctx.jiffies)

    @clock_ms.setter
    def clock_ms(self, value: int) -> None:
        if value < self.ctx.jiffies:
            raise ValueError("the clock never goes back")
        self.ctx.jiffies = value

    def pfn_to_nid(self, pfn: int) -> int:
        if not 0 <= pfn < len(self.mem.chunks) * CHUNK_PAGES:
            raise ksm_error(errno.EINVAL, f"no page frame {pfn}")
        return self.mem.frame_nid(pfn)

    def migrate_page(self, pfn: int, node: int) -> int:
        """Move frame ``pfn`` to a new frame on ``node`` as the migration core does;
        every mapping follows. Returns the new pfn."""
        frames = self.mem.frames
        if not isinstance(pfn, int) or not 0 < pfn < len(self.mem.chunks) * CHUNK_PAGES \
                or frames["frame_mapcount"][pfn] <= 0:
            raise ksm_error(errno.EINVAL, f"page frame {pfn} is not in use")
        if not isinstance(node, int) or not 0 <= node < self.nodes:
            raise ksm_error(errno.EINVAL, f"no NUMA node {node!r}")
        return self._migrate([pfn], node)[0]

    def _migrate(self, pfns: list[int], node: int) -> list[int]:
        if not pfns:
            return []
        self.mem.ensure_free(node, len(pfns))
        new = np.array([lib.ksm_frame_alloc(self.ctx, node) for _ in pfns], dtype=np.int32)
        old = np.asarray(pfns, dtype=np.int32)
        remap = np.full(len(self.mem.chunks) * CHUNK_PAGES, -1, dtype=np.int32)
        lib.ksm_migrate_frames(self.ctx, ptr(old), ptr(new), len(old), ptr(remap))
        return new.tolist()
