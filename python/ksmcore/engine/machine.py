"""The engine's simulated machine: physical memory, processes and ksmd."""

from __future__ import annotations

import errno
from typing import Any

from ..constants import FIRST_PID
from ..errors import ksm_error
from .ksmd import Ksm
from .memory import Memory
from .process import Process


class Machine:
    """A machine with ``nodes`` NUMA nodes, its processes and its ksmd (``m.ksm``)."""

    def __init__(self, nodes: int = 1) -> None:
        if not isinstance(nodes, int) or not 1 <= nodes <= 64:
            raise ksm_error(errno.EINVAL, f"nodes must be 1..64, not {nodes!r}")
        self.nodes = nodes
        self.mem = Memory(nodes)
        self.ctx: Any = self.mem.ctx
        self.ksm = Ksm(self)
        self._all: list[Process] = []
        self._next_pid = FIRST_PID

    def _new_process(self) -> Process:
        p = Process(self, self._next_pid)
        self._next_pid += 1
        self._all.append(p)
        return p

    def spawn(self) -> Process:
        """A new process with an empty address space."""
        return self._new_process()

    @property
    def processes(self) -> list[Process]:
        return [p for p in self._all if not p.exited]

    def check_invariants(self) -> None:
        """Raise AssertionError if the trees, counters or page tables disagree."""
        from .invariants import check_invariants

        check_invariants(self)

    def pfn_to_nid(self, pfn: int) -> int:
        return int(self.mem.frames["frame_nid"][pfn])
