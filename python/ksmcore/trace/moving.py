"""Live workloads that keep writing: processes for recording and for the real ksmd.

A :class:`MovingWorkload` is a few processes, each one private anonymous area of
``pages`` pages (MADV_NOHUGEPAGE, MADV_MERGEABLE) made of :class:`Group` s of pages.
Each group starts as ``common`` (the same bytes in every process), ``private``
(random, its own) or ``zero`` contents, and after the go signal is written at
``rate`` pages per second by its ``mode``:

- ``"fresh"``: random pages of the group get fresh random bytes (volatile pages);
- ``"same"``: random pages of the group are rewritten with their own bytes (a merged
  page is copied on write, and ksmd must merge it again);
- ``"converge"``: the group's pages, in order, are given the bytes of a target page
  common to every process (pages that become equal over time).

Each process is ``python -m ksmcore.trace.moving SPEC`` (a fresh interpreter: no state
inherited from the caller, such as PR_SET_MEMORY_MERGE). It prints ``ready`` once its
area is filled and madvised, waits for ``go`` on stdin, writes for ``seconds``, then
waits for stdin to close (it stops as soon as stdin closes; with ``exit_after`` it
exits that long after go).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

PAGE = 4096
TICK_S = 0.005


@dataclass
class Group:
    count: int
    init: str = "private"  # "common", "private" or "zero"
    mode: str | None = None  # None, "fresh", "same" or "converge"
    rate: float = 0.0  # pages written per second


@dataclass
class ProcessSpec:
    groups: list[Group]
    seed: int = 0
    seconds: float = 10.0  # how long it writes after go
    exit_after: float | None = None  # exit this long after go (None: wait for stdin)
    mergeable: bool = True

    @property
    def pages(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass
class MovingWorkload:
    processes: list[ProcessSpec]
    common_seed: int = 7
    knobs: dict[str, int] = field(default_factory=dict)  # sysfs knobs for the real ksmd


def _common(seed: int, group: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, group]).integers(0, 256, (count, PAGE), np.uint8)


def _main(spec_json: str) -> None:
    d = json.loads(spec_json)
    groups = [Group(**g) for g in d["groups"]]
    seed, common_seed = int(d["seed"]), int(d["common_seed"])
    npages = sum(g.count for g in groups)
    rng = np.random.default_rng([common_seed, seed, 1])
    area = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with contextlib.suppress(OSError):
        area.madvise(mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(area, np.uint8).reshape(npages, PAGE)
    first = 0
    starts = []
    for gi, g in enumerate(groups):
        starts.append(first)
        if g.init == "common":
            view[first : first + g.count] = _common(common_seed, gi, g.count)
        elif g.init == "private":
            view[first : first + g.count] = rng.integers(0, 256, (g.count, PAGE), np.uint8)
        else:
            view[first : first + g.count] = 0
        first += g.count
    if d["mergeable"]:
        area.madvise(mmap.MADV_MERGEABLE)
    target = _common(common_seed, 10_000, 1)[0]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    t0 = time.monotonic()
    done = [0] * len(groups)
    nxt = [0] * len(groups)
    while True:
        now = time.monotonic() - t0
        if now >= d["seconds"]:
            break
        for gi, g in enumerate(groups):
            if not g.mode or g.rate <= 0:
                continue
            due = int(now * g.rate) - done[gi]
            for _ in range(max(0, due)):
                if g.mode == "converge":
                    if nxt[gi] >= g.count:
                        break
                    i = starts[gi] + nxt[gi]
                    nxt[gi] += 1
                    view[i] = target
                else:
                    i = starts[gi] + int(rng.integers(0, g.count))
                    if g.mode == "fresh":
                        view[i] = rng.integers(0, 256, PAGE, np.uint8)
                    else:
                        view[i, 0] = view[i, 0]  # a write of the byte already there
            done[gi] += max(0, due)
        if d.get("exit_after") is not None and now >= d["exit_after"]:
            return
        if select.select([sys.stdin], [], [], TICK_S)[0]:
            return  # stdin closed: the parent is done
    if d.get("exit_after") is not None:
        time.sleep(max(0.0, d["exit_after"] - (time.monotonic() - t0)))
        return
    sys.stdin.readline()  # EOF: the parent is done


class Running:
    """The processes of a workload, started and ready (their areas madvised)."""

    def __init__(self, w: MovingWorkload) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        try:
            for i, spec in enumerate(w.processes):
                d = asdict(spec)
                d["common_seed"] = w.common_seed
                d["seed"] = spec.seed or i + 1
                p = subprocess.Popen([sys.executable, "-m", "ksmcore.trace.moving",
                                      json.dumps(d)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
                self.procs.append(p)
                assert p.stdout is not None
                line = p.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"a workload process failed to start ({line!r})")
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def go(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                p.stdin.write("go\n")
                p.stdin.flush()

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                if p.stdin is not None:
                    p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    _main(sys.argv[1])
