"""calc_checksum() and memcmp_pages() of the C core, bit for bit against the kernel's
definitions: XXH64 (seed 0) of the page, low 32 bits; memcmp's unsigned-byte order."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmcore._native import calc_checksums, ffi, lib, page_hashes
from ksmcore.constants import ZERO_CHECKSUM


def test_zero_page_checksum() -> None:
    zero = bytes(4096)
    assert lib.calc_checksum(zero) == 0x32D8BBDB == ZERO_CHECKSUM
    assert lib.ksm_xxh64(zero, 4096, 0) == 0xAC869B6F32D8BBDB


@pytest.mark.parametrize(
    "data,digest",
    [(b"", 0xEF46DB3751D8E999), (b"a", 0xD24EC4F1A98C6E5B), (b"abc", 0x44BC2CF5AD770999)],
)
def test_published_vectors(data: bytes, digest: int) -> None:
    assert lib.ksm_xxh64(data, len(data), 0) == digest


@settings(max_examples=300)
@given(data=st.binary(max_size=300), seed=st.integers(0, 2**64 - 1))
def test_xxh64_matches_xxhash(data: bytes, seed: int) -> None:
    assert lib.ksm_xxh64(data, len(data), seed) == xxhash.xxh64_intdigest(data, seed=seed)


def test_batched_checksums_match_one_by_one() -> None:
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 256, size=(257, 4096), dtype=np.uint8)
    pages[3] = 0
    got = calc_checksums(pages)
    want = [xxhash.xxh64_intdigest(p.tobytes(), seed=0) & 0xFFFFFFFF for p in pages]
    assert got.tolist() == want
    assert got[3] == ZERO_CHECKSUM


def test_batched_checksums_reject_bad_shapes() -> None:
    with pytest.raises(ValueError):
        calc_checksums(np.zeros((2, 100), np.uint8))


@settings(max_examples=200)
@given(seed=st.integers(0, 2**32), i=st.integers(0, 4095), v=st.integers(0, 255))
def test_memcmp_pages_is_unsigned_lexicographic(seed: int, i: int, v: int) -> None:
    a = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    b = bytearray(a)
    b[i] = v
    want = (a > bytes(b)) - (a < bytes(b))
    assert lib.memcmp_pages(ffi.from_buffer(a), ffi.from_buffer(b)) == want


def _selectable(impl: int) -> bool:
    """Whether this CPU runs that form (the form in use is left as it was)."""
    before = lib.ksm_checksum_impl()
    ok = lib.ksm_checksum_select(impl) == impl
    lib.ksm_checksum_select(before)
    return ok


def test_the_best_form_is_chosen_by_default() -> None:
    best = lib.ksm_checksum_select(lib.KSM_CSUM_BEST)
    assert best == lib.ksm_checksum_impl()
    assert _selectable(best)
    # the scalar form runs everywhere; an unknown form is refused and changes nothing
    assert lib.ksm_checksum_select(lib.KSM_CSUM_SCALAR) == lib.KSM_CSUM_SCALAR
    assert lib.ksm_checksum_select(7) == -1
    assert lib.ksm_checksum_impl() == lib.KSM_CSUM_SCALAR
    lib.ksm_checksum_select(best)


@pytest.mark.parametrize("impl", [lib.KSM_CSUM_SCALAR, lib.KSM_CSUM_AVX512],
                         ids=["scalar", "avx512"])
def test_every_checksum_form_is_xxh64(impl: int) -> None:
    if not _selectable(impl):
        pytest.skip("this CPU has no AVX-512 F/DQ/VL: only the scalar form can run")
    rng = np.random.default_rng(impl)
    pages = rng.integers(0, 256, size=(64, 4096), dtype=np.uint8)
    pages[1] = 0
    pages[2] = 255
    pages[3, ::7] = 0x80  # bytes with the top bit set in every lane position
    whole = [xxhash.xxh64_intdigest(p.tobytes(), seed=0) for p in pages]
    want = [h & 0xFFFFFFFF for h in whole]
    best = lib.ksm_checksum_impl()
    try:
        assert lib.ksm_checksum_select(impl) == impl
        assert calc_checksums(pages).tolist() == want
        assert [lib.calc_checksum(ffi.from_buffer(p)) for p in pages] == want
        # the recorder's batch of whole 64-bit hashes, of which the checksum is the low half
        assert page_hashes(pages).tolist() == whole
    finally:
        lib.ksm_checksum_select(best)


def test_page_hashes_of_nothing_and_of_bad_shapes() -> None:
    assert page_hashes(np.zeros((0, 4096), np.uint8)).tolist() == []
    for bad in (np.zeros(4096, np.uint8), np.zeros((2, 4095), np.uint8)):
        with pytest.raises(ValueError):
            page_hashes(bad)
