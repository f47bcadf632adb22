"""Placing sources on hosts so that KSM saves the most, from sketches alone.

The objective is the sum over hosts of the savings :func:`.sketch.estimate` predicts
for each host's group. Hosts hold at most ``capacity`` pages each, counted before
merging (a host must be able to hold its sources before ksmd has merged anything).

**Algorithm**: a greedy placement followed by local search.

1. Greedy: at each step, of all the sources not yet placed and the hosts they fit
   on, the pair where the source adds the most predicted savings; when nothing adds
   anything, the largest source goes to the emptiest host (a new seed). So a group
   grows with what shares with it before new groups are started.
2. Local search: moves of one source to another host and swaps of two sources on
   different hosts, each taken when it raises the predicted total, in passes until a
   pass finds nothing (or ``max_passes``, or ``time_limit`` seconds).

A gain counts only above three standard errors of the overlap estimate of the host
it lands on (:meth:`Placer.noise`): otherwise the largest of many noisy zero gains
would pull unrelated sources together.

Each host keeps its group's state incrementally: per bit of the linear-counting
bitmaps (all folded to the fleet's smallest size), how many of its members set it;
its sampled contents with their counts. Adding or removing a source then costs
O(its distinct contents), not a merge of the whole group. Predictions reported for
the final groups come from :func:`.sketch.estimate` itself, with their errors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from .sketch import Sketch, chain_correction, chain_saving, fold


class PlacementError(ValueError):
    """No placement fits the capacity."""


@dataclass
class _Item:
    pages: int
    zero: int
    distinct: int
    chain_corr: int
    lc: float  # linear-counting estimate of its distinct contents at the fleet's size
    bits: np.ndarray  # indices of its set bits at the fleet's size
    sample: dict[int, int]  # sampled content -> pages


class _Host:
    def __init__(self, m_log2: int) -> None:
        self.members: set[int] = set()
        self.pages = 0
        self.zero = 0
        self.distinct = 0
        self.chain_corr = 0
        self.lc_sum = 0.0
        self.counts = np.zeros(1 << m_log2 if m_log2 else 0, np.int32)
        self.set_bits = 0
        self.sample: dict[int, list[int]] = {}  # hash -> [pages, members, own corr sum]
        self.extra = 0  # sum over sampled contents of (members - 1)
        self.gain = 0  # sum over sampled contents of chain_correction(pages) - own corr


class Placer:
    """The incremental objective and the search. ``use_bitmap``: overlap from the
    bitmaps (else from the sample alone)."""

    def __init__(self, sketches: Sequence[Sketch], hosts: int, capacity: int,
                 use_zero_pages: int = 0) -> None:
        if hosts < 1:
            raise PlacementError(f"--hosts {hosts}: expected at least 1")
        self.sketches = list(sketches)
        self.hosts = hosts
        self.capacity = capacity
        self.mps = sketches[0].max_page_sharing if sketches else 256
        self.uzp = use_zero_pages
        self.shift = max((s.sample_shift for s in sketches), default=0)
        self.p = 2.0 ** -self.shift
        self.use_bitmap = bool(sketches) and all(s.bits_log2 for s in sketches)
        self.m_log2 = min(s.bits_log2 for s in sketches) if self.use_bitmap else 0
        self.m = float(1 << self.m_log2) if self.use_bitmap else 0.0
        limit = (1 << (64 - self.shift)) if self.shift else None
        self.items = []
        self.alone: list[float] = []
        for s in sketches:
            if self.use_bitmap:
                f = fold(s.bitmap, s.bits_log2, self.m_log2)
                bits = np.flatnonzero(np.unpackbits(f, bitorder="little"))
                lc = self._lc(len(bits))
            else:
                bits, lc = np.zeros(0, np.int64), 0.0
            sample = {int(h): int(c) for h, c in zip(s.sample_hashes, s.sample_counts,
                                                     strict=True)
                      if limit is None or int(h) < limit}
            self.items.append(_Item(s.pages, s.zero_pages, s.distinct, s.chain_corr, lc,
                                    bits, sample))

        scratch = _Host(self.m_log2)
        for i in range(len(self.items)):  # what each saves alone
            self.add(scratch, i)
            self.alone.append(self.value(scratch))
            self.remove(scratch, i)

    def _lc(self, set_bits: int) -> float:
        unset = max(self.m - set_bits, 0.5)  # a full map: the largest count it can say
        return -self.m * math.log(unset / self.m)

    # ---- the objective --------------------------------------------------------

    def _saved(self, pages: int, zero: int, distinct: int, chain_corr: int, lc_sum: float,
               set_bits: int, overlap_sample: float, corr_gain: float) -> float:
        overlap = (lc_sum - self._lc(set_bits)) if self.use_bitmap else overlap_sample
        nz = (pages - zero) - (distinct - overlap) + chain_corr + corr_gain
        z = zero if self.uzp else int(chain_saving(zero, self.mps))
        return max(0.0, nz + z)

    def value(self, h: _Host) -> float:
        return self._saved(h.pages, h.zero, h.distinct, h.chain_corr, h.lc_sum, h.set_bits,
                           h.extra / self.p, h.gain / self.p)

    def _corr(self, c: int) -> int:
        return int(chain_correction(np.array(c, np.int64), self.mps)) if c > self.mps else 0

    def _sample_update(self, h: _Host, it: _Item, sign: int) -> None:
        for k, c in it.sample.items():
            v = h.sample.get(k)
            if v is None:
                v = h.sample[k] = [0, 0, 0]
            # take the content's old terms out, update it, put the new terms in
            h.extra -= max(v[1] - 1, 0)
            h.gain -= self._corr(v[0]) - v[2]
            v[0] += sign * c
            v[1] += sign
            v[2] += sign * self._corr(c)
            if v[1] == 0:
                del h.sample[k]
                continue
            h.extra += v[1] - 1
            h.gain += self._corr(v[0]) - v[2]

    def add(self, h: _Host, i: int) -> None:
        it = self.items[i]
        h.members.add(i)
        h.pages += it.pages
        h.zero += it.zero
        h.distinct += it.distinct
        h.chain_corr += it.chain_corr
        h.lc_sum += it.lc
        if self.use_bitmap:
            h.set_bits += int(np.count_nonzero(h.counts[it.bits] == 0))
            h.counts[it.bits] += 1
        self._sample_update(h, it, 1)

    def remove(self, h: _Host, i: int) -> None:
        it = self.items[i]
        h.members.discard(i)
        h.pages -= it.pages
        h.zero -= it.zero
        h.distinct -= it.distinct
        h.chain_corr -= it.chain_corr
        h.lc_sum -= it.lc
        if self.use_bitmap:
            h.counts[it.bits] -= 1
            h.set_bits -= int(np.count_nonzero(h.counts[it.bits] == 0))
        self._sample_update(h, it, -1)

    def _new_hosts(self) -> list[_Host]:
        return [_Host(self.m_log2) for _ in range(self.hosts)]

    def evaluate(self, assignment: Sequence[int]) -> list[float]:
        """The predicted savings of each host under ``assignment`` (source -> host)."""
        hosts = self._new_hosts()
        for i, h in enumerate(assignment):
            self.add(hosts[h], i)
        return [self.value(h) for h in hosts]

    # ---- the search -----------------------------------------------------------

    def noise(self, h: _Host) -> float:
        """Three standard errors of the host's predicted overlap: gains under this are
        not told apart from the sketches' noise (so they count as none)."""
        if self.use_bitmap:
            t = -math.log(max(self.m - h.set_bits, 0.5) / self.m)
            return 3 * math.sqrt(self.m * (math.exp(t) - t - 1))
        return 3 * math.sqrt((h.extra + 1) * (1 - self.p)) / self.p

    def _gain(self, h: _Host, i: int) -> float:
        """What placing ``i`` on ``h`` adds to the savings beyond what ``i`` saves alone
        (the sharing it finds there)."""
        before = self.value(h)
        self.add(h, i)
        gain = self.value(h) - before - self.alone[i]
        noise = self.noise(h)
        self.remove(h, i)
        return gain if gain > noise else 0.0

    def greedy(self) -> tuple[list[_Host], list[int]]:
        """At each step the (source, host) pair with the largest predicted gain among
        the sources not yet placed; with no gain anywhere, the largest source goes to
        the emptiest host. A host's gains change only when it does, so only its column
        is computed again: O(sources x hosts) at first, then O(sources) a step."""
        hosts = self._new_hosts()
        n = len(self.items)
        where = [-1] * n
        sizes = np.array([it.pages for it in self.items], np.int64)
        gains = np.zeros((n, self.hosts))
        placed = np.zeros(n, bool)
        for _ in range(n):
            room = np.array([self.capacity - h.pages for h in hosts], np.int64)
            fits: np.ndarray = (sizes[:, None] <= room[None, :]) & ~placed[:, None]
            if not np.asarray(fits.any(axis=1))[~placed].all():
                i = int(np.flatnonzero(~placed & ~fits.any(axis=1))[0])
                raise PlacementError(
                    f"{self.sketches[i].name} ({self.items[i].pages} pages) fits on no host "
                    f"of {self.capacity} pages; raise --host-capacity or --hosts")
            g = np.where(fits, gains, -np.inf)
            best = g.max()
            cand = np.argwhere(g >= best - 1e-6)
            i, j = min(((int(a), int(b)) for a, b in cand),
                       key=lambda ab: (-sizes[ab[0]], hosts[ab[1]].pages, ab[0], ab[1]))
            self.add(hosts[j], i)
            where[i] = j
            placed[i] = True
            for k in np.flatnonzero(~placed):
                gains[k, j] = self._gain(hosts[j], int(k))
        return hosts, where

    def _shares(self, hosts: list[_Host], where: list[int], share: np.ndarray,
                columns: Sequence[int]) -> None:
        """share[i, b]: the sharing source i finds on host b (0 on its own host)."""
        for b in columns:
            for i in range(len(self.items)):
                share[i, b] = 0.0 if where[i] == b else self._gain(hosts[b], i)

    def local_search(self, hosts: list[_Host], where: list[int], max_passes: int = 20,
                     time_limit: float = 60.0) -> int:
        """Improving moves and swaps until none is left; returns how many were made.

        Only candidates that can gain are tried: moving ``i`` to ``b`` needs ``i`` to
        share something on ``b``, and swapping ``i`` (on ``a``) with ``t`` (on ``b``)
        needs ``i`` to share on ``b`` or ``t`` on ``a`` (sharing with a subset of a
        host is never more than with the host), so a pass over a settled placement
        costs O(sources x hosts) estimates, not O(sources**2)."""
        t_end = time.monotonic() + time_limit
        values = [self.value(h) for h in hosts]
        share = np.zeros((len(self.items), self.hosts))
        made = 0
        eps = 1e-6
        for _ in range(max_passes):
            improved = False
            self._shares(hosts, where, share, range(self.hosts))
            for i in range(len(self.items)):
                a = where[i]
                ha = hosts[a]
                if not (share[i] > 0).any() and not (share[:, a] > 0).any():
                    continue
                self.remove(ha, i)
                va_without = self.value(ha)
                best_gain, best_move = eps, cast(tuple[int, int | None] | None, None)
                for b, hb in enumerate(hosts):
                    if b == a:
                        continue
                    if share[i, b] > 0 and hb.pages + self.items[i].pages <= self.capacity:
                        self.add(hb, i)
                        gain = va_without + self.value(hb) - values[a] - values[b]
                        noise = max(self.noise(hb), self.noise(ha))
                        self.remove(hb, i)
                        if gain > max(best_gain, noise):
                            best_gain, best_move = gain, (b, None)
                    for t in list(hb.members):  # swap i and t
                        if not (share[i, b] > 0 or share[t, a] > 0):
                            continue
                        if (ha.pages + self.items[t].pages > self.capacity or
                                hb.pages - self.items[t].pages + self.items[i].pages
                                > self.capacity):
                            continue
                        self.remove(hb, t)
                        self.add(hb, i)
                        self.add(ha, t)
                        gain = self.value(ha) + self.value(hb) - values[a] - values[b]
                        noise = max(self.noise(ha), self.noise(hb))
                        self.remove(ha, t)
                        self.remove(hb, i)
                        self.add(hb, t)
                        if gain > max(best_gain, noise):
                            best_gain, best_move = gain, (b, t)
                if best_move is None:
                    self.add(ha, i)
                    continue
                b, t2 = best_move
                hb = hosts[b]
                if t2 is not None:
                    self.remove(hb, t2)
                    self.add(ha, t2)
                    where[t2] = a
                self.add(hb, i)
                where[i] = b
                values[a], values[b] = self.value(ha), self.value(hb)
                self._shares(hosts, where, share, (a, b))
                made += 1
                improved = True
                if time.monotonic() > t_end:
                    return made
            if not improved or time.monotonic() > t_end:
                break
        return made


@dataclass
class Placement:
    assignment: list[int]  # source index -> host
    predicted: list[float]  # per host, the search's objective
    moves: int  # local-search moves and swaps made
    seconds: float

    def groups(self, hosts: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(hosts)]
        for i, h in enumerate(self.assignment):
            out[h].append(i)
        return out


def place(sketches: Sequence[Sketch], hosts: int, capacity: int, use_zero_pages: int = 0,
          max_passes: int = 20, time_limit: float = 60.0) -> Placement:
    """Greedy, then local search (see the module's docstring)."""
    t0 = time.perf_counter()
    p = Placer(sketches, hosts, capacity, use_zero_pages)
    hs, where = p.greedy()
    moves = p.local_search(hs, where, max_passes, time_limit)
    return Placement(where, [p.value(h) for h in hs], moves, time.perf_counter() - t0)


def in_order(sizes: Sequence[int], hosts: int, capacity: int) -> list[int]:
    """The given order, first fit: sources fill host 0, then host 1, ..."""
    where, h, used = [], 0, 0
    for i, n in enumerate(sizes):
        while used + n > capacity:
            h, used = h + 1, 0
            if h >= hosts:
                raise PlacementError(f"source {i} ({n} pages): the given order does not fit "
                                     f"{hosts} hosts of {capacity} pages")
        where.append(h)
        used += n
    return where


def shuffled(sizes: Sequence[int], hosts: int, capacity: int, seed: int = 0) -> list[int]:
    """A random order (seeded), first fit."""
    order = np.random.default_rng(seed).permutation(len(sizes))
    placed = in_order([sizes[i] for i in order], hosts, capacity)
    where = [0] * len(sizes)
    for k, i in enumerate(order):
        where[int(i)] = placed[k]
    return where
