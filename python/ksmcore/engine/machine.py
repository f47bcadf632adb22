"""The engine's simulated machine: physical memory, processes and ksmd."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from .._native import lib
from ..checks import MAX_PAGES, as_int, as_node
from ..constants import FIRST_PID
from ..errors import ksm_error
from ..guard import Guard, serialized
from ..numa import check_distances
from ..profiles import Profile
from ..profiles import resolve as resolve_profile
from ..simclock import SimulatedTime
from ..thp import (
    THP_ENABLED_DEFAULT,
    THP_USE_ZERO_PAGE_DEFAULT,
    ThpKnobs,
)
from ..timing import CostModel
from ..tracing import Tracer
from .ksm import Ksm
from .memory import CHUNK_PAGES, Memory
from .process import Process


@serialized
class Machine(SimulatedTime, ThpKnobs):
    """A machine with ``nodes`` NUMA nodes, its processes and its ksmd (``m.ksm``).

    Thread-safe: calls on one machine are serialized by its lock (ksmcore/guard.py)."""

    def __init__(self, nodes: int = 1, distances: Sequence[Sequence[int]] | None = None,
                 max_pages: int = MAX_PAGES, kernel: str | Profile | None = None) -> None:
        nodes = as_int(nodes, "nodes")
        if not 1 <= nodes <= 64:
            raise ksm_error(errno.EINVAL, f"nodes must be 1..64, not {nodes!r}")
        max_pages = as_int(max_pages, "max_pages")
        if max_pages < 1:
            raise ValueError(f"max_pages must be positive, not {max_pages}")
        self._guard = Guard()
        self.nodes = nodes
        self.max_pages = max_pages  # mmap beyond this many pages in all: ENOMEM
        self.distances = check_distances(nodes, distances)
        # the kernel whose KSM this is (ksmcore.profiles): the running one by default
        self.profile = resolve_profile(kernel)
        self.mem = Memory(nodes)
        self._guard.checks.append(self._check_images)
        self.ctx: Any = self.mem.ctx
        self.ksm = Ksm(self)
        self._all: list[Process] = []
        self._next_pid = FIRST_PID
        self._thp_enabled = THP_ENABLED_DEFAULT
        self._thp_use_zero_page = THP_USE_ZERO_PAGE_DEFAULT

    def spawn(self, node: int = 0) -> Process:
        """A new process with an empty address space, running on ``node``."""
        p = Process(self, self._next_pid, as_node(node, self.nodes))
        self._next_pid += 1
        self._all.append(p)
        return p

    def _check_images(self) -> None:
        if self.mem.images:
            self.mem.check_images()

    @property
    def broken(self) -> BaseException | None:
        """Why this machine refuses every call (an earlier call failed half way, or an
        image changed underneath), or None."""
        return self._guard.broken

    @property
    def processes(self) -> list[Process]:
        return [p for p in self._all if not p.exited]

    def check_invariants(self) -> None:
        """Raise AssertionError if the trees, counters or page tables disagree."""
        from .invariants import check_invariants

        check_invariants(self)

    # ---- simulated time: the API is ksmcore.simclock.SimulatedTime's

    def _clock_now(self) -> int:
        return self.ksm.ksmd.clock_ns

    def _clock_move(self, ns: int) -> None:
        self.ksm.ksmd.clock_ns = ns

    def _cost(self) -> CostModel:
        return self.ksm.ksmd.cost

    def _set_cost(self, value: CostModel) -> None:
        self.ksm.ksmd.cost = value

    def _cpu_ns(self) -> int:
        return self.ksm.ksmd.ksmd_cpu_ns

    def _tracer(self) -> Tracer:
        return self.ksm.ksmd.tracer

    def _scan_thread(self, ns: int) -> None:
        self.ksm.ksmd.ksm_scan_thread(ns)

    # ---- transparent huge pages (ksmcore.thp)

    @property
    def thp_split_zero_pages(self) -> int:
        """Pages freed by splitting huge pages: PTEs that map the shared zero page
        because a split found their subpage zero-filled. Not a KSM counter (and not in
        ksm_zero_pages): ksmd never visits them again."""
        return int(self.ctx.thp_split_zero_pages)

    @property
    def thp_splits(self) -> int:
        """Huge pages split so far (by ksmd's merges, or to migrate a page of one)."""
        return int(self.ctx.thp_splits)

    def pfn_to_nid(self, pfn: int) -> int:
        """The node of frame ``pfn``: the zero page (pfn 0) or a frame in use; EINVAL
        for a free frame, whose node is an artefact of how each model grows memory."""
        pfn = as_int(pfn, "pfn")
        if pfn == 0:
            return 0
        if not 0 < pfn < len(self.mem.chunks) * CHUNK_PAGES \
                or self.mem.frames["frame_mapcount"][pfn] <= 0:
            raise ksm_error(errno.EINVAL, f"page frame {pfn} is not in use")
        return self.mem.frame_nid(pfn)

    def migrate_page(self, pfn: int, node: int) -> int:
        """Move frame ``pfn`` to a new frame on ``node`` as the migration core does;
        every mapping follows. Returns the new pfn."""
        frames = self.mem.frames
        pfn = as_int(pfn, "pfn")
        if not 0 < pfn < len(self.mem.chunks) * CHUNK_PAGES or frames["frame_mapcount"][pfn] <= 0:
            raise ksm_error(errno.EINVAL, f"page frame {pfn} is not in use")
        node = as_node(node, self.nodes)
        if frames["frame_folio"][pfn]:  # in a huge page (folio index + 1)
            lib.ksm_split_folio(self.ctx, pfn)  # the model splits a huge page to move it
            if frames["frame_mapcount"][pfn] <= 0:
                raise ksm_error(errno.EINVAL, f"page frame {pfn} was zero-filled: the "
                                              "split mapped the zero page instead")
        return self.mem.migrate_pages([pfn], node)[0]
