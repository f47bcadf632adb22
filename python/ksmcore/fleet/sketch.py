"""Sketches: a small, mergeable summary of a source's page contents, and what KSM would
save for any group of sources placed together, estimated from their sketches alone.

A sketch of one source holds (every page is hashed with 64-bit XXH3):

- exact counts: present pages, zero pages, distinct non-zero contents, and the
  source's own ``max_page_sharing`` correction (see :func:`chain_saving`);
- a **hash-threshold sample**: every distinct non-zero content whose hash falls under
  ``2**64 * rate`` (``rate = 2**-sample_shift``), with its page count. Sampling by hash
  value picks the same contents in every source, so samples merge (sum the counts of
  equal hashes) and a content shared by several sources is either in all their
  samples or in none;
- a **linear-counting bitmap** of the non-zero contents (bit ``hash mod 2**bits_log2``
  set), 16-32 bits per distinct content by default. Bitmaps merge by OR after folding
  the larger onto the smaller size; the number of distinct contents of a union is
  ``-m ln(unset/m)``. It measures the overlap between sources far more precisely per
  byte than the sample does (its error grows with the union's size, the sample's
  with the overlap over the rate).

**What KSM saves for a group** (at convergence, static memory, one NUMA node):
``pages_sharing + ksm_zero_pages``. Each distinct content of ``c`` pages is merged
into KSM pages of at most ``max_page_sharing`` mappings (stable_node_dup chains): it
saves :func:`chain_saving` ``(c)`` pages. Zero pages are one content (or, with
``use_zero_pages``, each becomes a ksm_zero_page and saves itself). Every present
page keeps a 64-byte rmap_item (but pages merged with the zero page), and
``general_profit = saved*4096 - rmap_items*64``.

Writing ``N`` for the non-zero pages and ``D`` for their distinct contents,
``sum chain_saving(c) = N - D + sum corr(c)`` with ``corr(c) = chain_saving(c) - (c-1)``
(zero unless ``c > max_page_sharing``). For a group, ``N`` is exact; ``D`` is the sum
of the members' exact ``D`` less their overlap, which the bitmaps (or, failing them,
the sample) estimate; the chain correction is the members' exact one plus what the
sample says merging adds. A group of one source is therefore exact, and the error
comes only from the contents the group's sources share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from ..constants import PAGE_SIZE, SIZEOF_RMAP_ITEM

ZERO_HASH = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))
DEFAULT_SAMPLE_SHIFT = 6  # rate 1/64
DEFAULT_BITS_PER_PAGE = 16
MIN_BITS_LOG2 = 6
MAX_BITS_PER_PAGE = 64  # with the sample at rate 1, still under 1% of the memory
MAX_SAMPLE_SHIFT = 32
# linear counting is trusted while more than this share of the bitmap is unset
MIN_UNSET_FRACTION = 0.01


def chain_saving(c: np.ndarray | int, max_page_sharing: int) -> np.ndarray:
    """Pages saved by ``c`` identical pages: full stable_node_dups of
    ``max_page_sharing`` mappings save ``max_page_sharing - 1`` each, the rest
    ``r - 1`` if ``r >= 2`` (a lone page left over stays unshared in the unstable tree)."""
    c = np.asarray(c, dtype=np.int64)
    q, r = np.divmod(c, max_page_sharing)
    return q * (max_page_sharing - 1) + np.maximum(r - 1, 0)


def chain_correction(c: np.ndarray, max_page_sharing: int) -> np.ndarray:
    """chain_saving(c) - (c - 1) for c >= 1: what the chains cost against one KSM page."""
    c = np.asarray(c, dtype=np.int64)
    return chain_saving(c, max_page_sharing) - np.maximum(c - 1, 0)


def page_hashes(pages: np.ndarray) -> np.ndarray:
    """XXH3-64 of every row of a C-contiguous (n, 4096) uint8 array."""
    f = xxhash.xxh3_64_intdigest
    return np.fromiter((f(row) for row in pages), np.uint64, len(pages))


@dataclass
class Sketch:
    """The summary of one source, or of a group merged with :func:`merge`."""

    name: str  # how reports name it
    source: str  # what a worker opens to read it again ("" if it cannot be read again)
    kind: str
    pages: int  # present pages (each has an rmap_item)
    zero_pages: int
    distinct: int  # distinct non-zero contents (exact for one source)
    chain_corr: int  # exact sum of chain_correction over its contents, at max_page_sharing
    max_page_sharing: int
    sample_shift: int  # the sample keeps hashes < 2**(64 - sample_shift)
    sample_hashes: np.ndarray  # uint64, sorted, distinct
    sample_counts: np.ndarray  # uint32 pages per sampled content
    bits_log2: int
    bitmap: np.ndarray  # uint8, 2**bits_log2 / 8 bytes, little bit order
    members: list[str] = field(default_factory=list)  # names of merged sources

    @property
    def rate(self) -> float:
        return 2.0 ** -self.sample_shift

    @property
    def nonzero_pages(self) -> int:
        return self.pages - self.zero_pages

    @property
    def payload_bytes(self) -> int:
        """What the sample and the bitmap take (12 bytes per sampled content)."""
        return 12 * len(self.sample_hashes) + len(self.bitmap)


def _set_bits(bits_log2: int, hashes: np.ndarray) -> np.ndarray:
    idx = (hashes & np.uint64((1 << bits_log2) - 1)).astype(np.int64)
    bits = np.zeros(1 << bits_log2, dtype=bool)
    bits[idx] = True
    return np.packbits(bits, bitorder="little")


def sketch_hashes(hashes: np.ndarray, name: str, source: str = "", kind: str = "image",
                  sample_shift: int = DEFAULT_SAMPLE_SHIFT,
                  bits_per_page: int = DEFAULT_BITS_PER_PAGE,
                  max_page_sharing: int = 256) -> Sketch:
    """The sketch of a source given the hashes of its present pages."""
    check_params(sample_shift, bits_per_page, max_page_sharing)
    hashes = np.asarray(hashes, dtype=np.uint64)
    zero = hashes == np.uint64(ZERO_HASH)
    uniq, counts = np.unique(hashes[~zero], return_counts=True)
    distinct = len(uniq)
    keep = uniq < np.uint64(1 << (64 - sample_shift)) if sample_shift else slice(None)
    if bits_per_page:
        bits_log2 = max(MIN_BITS_LOG2, math.ceil(math.log2(max(1, bits_per_page * distinct))))
        bitmap = _set_bits(bits_log2, uniq)
    else:
        bits_log2, bitmap = 0, np.zeros(0, np.uint8)
    return Sketch(
        name=name, source=source, kind=kind, pages=len(hashes), zero_pages=int(zero.sum()),
        distinct=distinct,
        chain_corr=int(chain_correction(counts, max_page_sharing).sum()),
        max_page_sharing=max_page_sharing, sample_shift=sample_shift,
        sample_hashes=uniq[keep].copy(), sample_counts=counts[keep].astype(np.uint32),
        bits_log2=bits_log2, bitmap=bitmap, members=[name],
    )


def sketch_pages(segments: Iterable[np.ndarray], name: str, source: str = "",
                 kind: str = "image", **params: int) -> Sketch:
    """The sketch of a source given its memory as (n, 4096) uint8 arrays."""
    parts = [page_hashes(np.ascontiguousarray(s)) for s in segments]
    hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    return sketch_hashes(hashes, name, source, kind, **params)


def check_params(sample_shift: int, bits_per_page: int, max_page_sharing: int) -> None:
    if not 0 <= sample_shift <= MAX_SAMPLE_SHIFT:
        raise ValueError(f"sample shift {sample_shift}: expected 0..{MAX_SAMPLE_SHIFT} "
                         "(rate 1/2**shift)")
    if not 0 <= bits_per_page <= MAX_BITS_PER_PAGE:
        raise ValueError(f"bits per page {bits_per_page}: expected 0..{MAX_BITS_PER_PAGE}")
    if max_page_sharing < 2:
        raise ValueError(f"max_page_sharing {max_page_sharing}: the kernel takes 2 or more")


# --------------------------------------------------------------------------------
# merging


def fold(bitmap: np.ndarray, bits_log2: int, to_log2: int) -> np.ndarray:
    """A bitmap of 2**bits_log2 bits folded onto 2**to_log2 (bit j of the result is the
    OR of every bit congruent to j): what hashing into the smaller size would give."""
    if to_log2 == bits_log2:
        return bitmap
    width = (1 << to_log2) // 8  # whole bytes: sizes are at least 2**MIN_BITS_LOG2
    return np.bitwise_or.reduce(bitmap.reshape(-1, width), axis=0)


def _merge_samples(sketches: Sequence[Sketch], shift: int) -> tuple[np.ndarray, np.ndarray]:
    limit = np.uint64(1 << (64 - shift)) if shift else None
    hs, cs = [], []
    for s in sketches:
        keep = s.sample_hashes < limit if limit is not None else slice(None)
        hs.append(s.sample_hashes[keep])
        cs.append(s.sample_counts[keep].astype(np.int64))
    h = np.concatenate(hs) if hs else np.zeros(0, np.uint64)
    c = np.concatenate(cs) if cs else np.zeros(0, np.int64)
    uniq, inv = np.unique(h, return_inverse=True)
    total = np.zeros(len(uniq), np.int64)
    np.add.at(total, inv, c)
    return uniq, total


def merge(sketches: Sequence[Sketch], name: str | None = None) -> Sketch:
    """One sketch of sources placed together, as if sketched as one source (but with
    ``distinct`` and ``chain_corr`` estimated: see :func:`estimate`)."""
    if not sketches:
        raise ValueError("nothing to merge")
    est = estimate(sketches)
    shift = max(s.sample_shift for s in sketches)
    h, c = _merge_samples(sketches, shift)
    with_bits = [s for s in sketches if s.bits_log2]
    if len(with_bits) == len(sketches):
        k = min(s.bits_log2 for s in sketches)
        bitmap = np.bitwise_or.reduce([fold(s.bitmap, s.bits_log2, k) for s in sketches])
    else:
        k, bitmap = 0, np.zeros(0, np.uint8)
    members = [m for s in sketches for m in s.members]
    return Sketch(
        name=name or "+".join(members), source="", kind="group",
        pages=est.pages, zero_pages=est.zero_pages,
        distinct=round(est.distinct), chain_corr=round(est.chain_corr),
        max_page_sharing=sketches[0].max_page_sharing, sample_shift=shift,
        sample_hashes=h, sample_counts=c.astype(np.uint32), bits_log2=k, bitmap=bitmap,
        members=members,
    )


# --------------------------------------------------------------------------------
# estimating


@dataclass
class Estimate:
    """What KSM would save on a group, from sketches: pages and a standard error."""

    pages: int
    zero_pages: int
    distinct: float  # distinct non-zero contents of the group (estimated)
    chain_corr: float
    saved: float  # pages_sharing + ksm_zero_pages
    stderr: float  # standard error of ``saved``, in pages
    method: str  # how the overlap was estimated: "exact", "bitmap" or "sample"
    max_page_sharing: int
    use_zero_pages: int

    @property
    def rmap_items(self) -> int:
        """Every present page keeps an rmap_item, except those merged with the zero
        page (use_zero_pages): the scan no longer finds an anonymous page there."""
        return self.pages - (self.zero_pages if self.use_zero_pages else 0)

    @property
    def general_profit(self) -> float:
        return self.saved * PAGE_SIZE - self.rmap_items * SIZEOF_RMAP_ITEM

    def as_dict(self) -> dict[str, float | int | str]:
        return {"pages": self.pages, "zero_pages": self.zero_pages,
                "saved_pages": self.saved, "stderr_pages": self.stderr,
                "general_profit": self.general_profit, "method": self.method}


def _lc(bitmap: np.ndarray, bits_log2: int) -> tuple[float, float, bool]:
    """Linear counting: (distinct estimate, its variance, trusted)."""
    m = float(1 << bits_log2)
    unset = m - float(np.unpackbits(bitmap).sum())
    if unset < 1:
        return math.inf, math.inf, False
    t = -math.log(unset / m)
    return m * t, m * (math.exp(t) - t - 1), unset / m > MIN_UNSET_FRACTION


def _overlap_bitmap(sketches: Sequence[Sketch]) -> tuple[float, float] | None:
    """sum D_i - D_union from the bitmaps folded to the smallest size, corrected by each
    member's known D_i: (overlap, variance), or None if a bitmap is missing or full."""
    if any(s.bits_log2 == 0 for s in sketches):
        return None
    k = min(s.bits_log2 for s in sketches)
    folded = [fold(s.bitmap, s.bits_log2, k) for s in sketches]
    union, var_u, ok = _lc(np.bitwise_or.reduce(folded), k)
    if not ok:
        return None
    members = 0.0
    var = var_u
    for f in folded:
        d, v, ok = _lc(f, k)
        if not ok:
            return None
        members += d
        var += v
    # D_union = sum D_i - (sum LC_i - LC_union): the members' own collisions cancel
    return members - union, var


def estimate(sketches: Sequence[Sketch], max_page_sharing: int | None = None,
             use_zero_pages: int = 0) -> Estimate:
    """What KSM would save on the sources of ``sketches`` placed on one host."""
    if not sketches:
        return Estimate(0, 0, 0.0, 0.0, 0.0, 0.0, "exact", max_page_sharing or 256,
                        use_zero_pages)
    mps = max_page_sharing or sketches[0].max_page_sharing
    for s in sketches:
        if s.max_page_sharing != mps:
            raise ValueError(f"{s.name}: sketched with max_page_sharing {s.max_page_sharing}, "
                             f"not {mps}; sketch it again")
    pages = sum(s.pages for s in sketches)
    zero = sum(s.zero_pages for s in sketches)
    nonzero = pages - zero
    sum_d = sum(s.distinct for s in sketches)
    sum_corr = sum(s.chain_corr for s in sketches)
    if len(sketches) == 1:
        overlap, var_o, method = 0.0, 0.0, "exact"
        corr_gain, var_c = 0.0, 0.0
    else:
        shift = max(s.sample_shift for s in sketches)
        p = 2.0 ** -shift
        h, c = _merge_samples(sketches, shift)
        # per sampled content: in how many members, and the chain correction merging adds
        in_members = np.zeros(len(h), np.int64)
        own_corr = np.zeros(len(h), np.int64)
        for s in sketches:
            pos = np.searchsorted(h, s.sample_hashes)
            ok = pos < len(h)
            pos, sc = pos[ok], s.sample_counts[ok]
            hit = h[pos] == s.sample_hashes[ok]
            np.add.at(in_members, pos[hit], 1)
            np.add.at(own_corr, pos[hit], chain_correction(sc[hit], mps))
        g = chain_correction(c, mps) - own_corr
        corr_gain = float(g.sum()) / p
        var_c = float((g.astype(np.float64) ** 2).sum()) * (1 - p) / p**2
        extra = (in_members - 1).astype(np.float64)
        overlap_s, var_s = float(extra.sum()) / p, float((extra**2).sum()) * (1 - p) / p**2
        bm = _overlap_bitmap(sketches)
        if bm is not None:
            # the sample's variance grows with the true overlap: judge it by the larger
            # of the two estimates, so a sample that happens to see nothing is not
            # taken for an exact zero
            plug = max(overlap_s, bm[0], 0.0)
            var_s = max(var_s, plug * (1 - p) / p)
        if bm is not None and bm[1] <= var_s:
            overlap, var_o, method = bm[0], bm[1], "bitmap"
        else:
            overlap, var_o, method = overlap_s, var_s, "sample"
    distinct = float(sum_d) - overlap
    corr = float(sum_corr) + corr_gain
    saved_nz = nonzero - distinct + corr
    saved_zero = zero if use_zero_pages else int(chain_saving(zero, mps))
    saved = max(0.0, min(float(pages), saved_nz + saved_zero))
    return Estimate(pages, zero, distinct, corr, saved, math.sqrt(var_o + var_c), method, mps,
                    use_zero_pages)
