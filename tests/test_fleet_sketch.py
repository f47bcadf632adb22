"""Sketches (ksmcore.fleet.sketch): size, file format, and the savings they predict
against the engine's exact figures."""

from __future__ import annotations

import itertools
import json
import struct

import numpy as np
import pytest

from ksmcore.cli import main
from ksmcore.constants import PAGE_SIZE
from ksmcore.estimate.sources import Source
from ksmcore.fleet import estimate, fileformat, merge, sketch_pages, sketch_source, synth
from ksmcore.fleet.exact import exact_savings
from ksmcore.fleet.sketch import chain_saving
from ksmcore.fleet.sources import open_source

# 3 families x 2 images of 16 MiB: big enough for the default sketch's error (about
# 0.3% of a pair's savings) to sit well inside 2%
FLEET = synth.Fleet(3, 2, 4096, seed=11)


@pytest.fixture(scope="module")
def fleet() -> tuple[list[Source], list]:
    sources = [open_source(s) for s in FLEET.members()]
    return sources, [sketch_pages(s.segments, s.name, s.name) for s in sources]


def _pages(rng: np.random.Generator, counts: list[int], zeros: int = 0) -> np.ndarray:
    rows = [np.repeat(rng.integers(0, 256, (1, PAGE_SIZE), dtype=np.uint8), c, axis=0)
            for c in counts]
    rows.append(np.zeros((zeros, PAGE_SIZE), np.uint8))
    a = np.concatenate(rows)
    return np.ascontiguousarray(a[rng.permutation(len(a))])


def test_chain_saving_is_what_the_engine_merges() -> None:
    rng = np.random.default_rng(1)
    for mps in (2, 3, 256):
        counts = [1, 2, 3, mps - 1, mps, mps + 1, mps + 2, 2 * mps + 1, 3 * mps + 5]
        counts = [c for c in counts if c >= 1]
        src = Source("s", "image", [_pages(rng, counts)])
        ex = exact_savings([src], max_page_sharing=mps)
        assert ex["saved_pages"] == int(sum(chain_saving(c, mps) for c in counts))


def test_one_source_is_exact() -> None:
    """A group of one: zero pages, repeats and max_page_sharing chains, both
    use_zero_pages settings, exactly as the engine counts them."""
    rng = np.random.default_rng(2)
    img = _pages(rng, [1] * 300 + [2] * 40 + [9] * 5 + [700], zeros=600)
    src = Source("s", "image", [img])
    for mps, uzp in ((256, 0), (256, 1), (5, 0)):
        sk = sketch_pages([img], "s", max_page_sharing=mps)
        est = estimate([sk], use_zero_pages=uzp)
        ex = exact_savings([src], max_page_sharing=mps, use_zero_pages=uzp)
        assert est.stderr == 0 and est.method == "exact"
        assert est.saved == ex["saved_pages"]
        assert est.general_profit == ex["general_profit"]


def test_sketch_is_under_one_percent(fleet) -> None:
    _, sketches = fleet
    for sk in sketches:
        assert sk.payload_bytes <= 0.01 * sk.pages * PAGE_SIZE
    # the most detailed sketch allowed (every content sampled, 64 bits per page)
    img = open_source(FLEET.member(0)).segments[0]
    full = sketch_pages([img], "x", sample_shift=0, bits_per_page=64)
    assert full.payload_bytes <= 0.01 * full.pages * PAGE_SIZE
    assert len(fileformat.dumps([full])) <= 0.01 * full.pages * PAGE_SIZE


def test_pairwise_estimates_within_two_percent(fleet) -> None:
    sources, sketches = fleet
    for i, j in itertools.combinations(range(len(sources)), 2):
        exact = exact_savings([sources[i], sources[j]])
        est = estimate([sketches[i], sketches[j]])
        err = est.saved - exact["saved_pages"]
        assert abs(err) <= 0.02 * exact["saved_pages"], (i, j, est, exact)
        # the stated error covers what is seen (3 standard errors)
        assert abs(err) <= 3 * est.stderr + 1e-9, (i, j, est.stderr, err)
        profit = est.general_profit - exact["general_profit"]
        assert abs(profit) <= 0.02 * exact["general_profit"]


def test_family_of_three_and_merge(fleet) -> None:
    """A larger group, estimated from the list or from merged sketches, all within 2%."""
    sources, sketches = fleet
    fam = [i for i in range(FLEET.size) if FLEET.family(i) == 0] + [1]
    exact = exact_savings([sources[i] for i in fam])["saved_pages"]
    group = [sketches[i] for i in fam]
    direct = estimate(group).saved
    merged = estimate([merge(group[:2]), group[2]]).saved
    assert abs(direct - exact) <= 0.02 * exact
    assert abs(merged - exact) <= 0.02 * exact
    m = merge(group)
    assert m.pages == sum(s.pages for s in group) and m.members == [s.name for s in group]


def test_chains_across_sources_from_the_sample() -> None:
    """Contents with more copies in the group than max_page_sharing: the sample (rate 1
    here) gives the chains exactly."""
    rng = np.random.default_rng(3)
    shared = rng.integers(0, 256, (30, PAGE_SIZE), dtype=np.uint8)
    imgs = []
    for k in range(3):
        own = rng.integers(0, 256, (50, PAGE_SIZE), dtype=np.uint8)
        a = np.concatenate([np.repeat(shared, 3 + k, axis=0), own])
        imgs.append(np.ascontiguousarray(a[rng.permutation(len(a))]))
    sks = [sketch_pages([a], f"s{k}", sample_shift=0, max_page_sharing=4)
           for k, a in enumerate(imgs)]
    exact = exact_savings([Source(f"s{k}", "image", [a]) for k, a in enumerate(imgs)],
                          max_page_sharing=4)
    assert estimate(sks).saved == exact["saved_pages"]


def test_file_round_trip_and_refusals(tmp_path, fleet) -> None:
    _, sketches = fleet
    path = tmp_path / "f.ksk"
    fileformat.save(path, sketches[:3])
    back = fileformat.load(path)
    for a, b in zip(sketches[:3], back, strict=True):
        assert (a.name, a.pages, a.zero_pages, a.distinct, a.bits_log2) == (
            b.name, b.pages, b.zero_pages, b.distinct, b.bits_log2)
        assert np.array_equal(a.sample_hashes, b.sample_hashes)
        assert np.array_equal(a.sample_counts, b.sample_counts)
        assert np.array_equal(a.bitmap, b.bitmap)
        assert estimate([a]).saved == estimate([b]).saved
    data = path.read_bytes()
    with pytest.raises(fileformat.SketchFileError, match="magic"):
        fileformat.loads(b"NOTASKETCH" + data[10:])
    newer = data[:8] + struct.pack("<I", 99) + data[12:]
    with pytest.raises(fileformat.SketchFileError, match="version 99"):
        fileformat.loads(newer)
    with pytest.raises(fileformat.SketchFileError):
        fileformat.loads(data[: len(data) - 100])


def test_sketch_command(tmp_path, capsys) -> None:
    img = tmp_path / "a.img"
    open_source(FLEET.member(0)).segments[0][:256].tofile(img)
    out = tmp_path / "s.ksk"
    assert main(["sketch", str(img), "synth:1x2x64@5", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["pages"] for s in report["sketches"]] == [256, 64, 64]
    assert report["bytes"] == out.stat().st_size
    loaded = fileformat.load(out)
    assert loaded[0].source == str(img) and loaded[1].source == "synth:1x2x64@5/0"
    assert estimate([loaded[0]]).saved == estimate([sketch_source(str(img))]).saved
    # errors: one line, nothing on stdout
    assert main(["sketch", str(tmp_path / "missing"), "-o", str(out)]) == 1
    assert main(["sketch", "synth:0x1x4", "-o", str(out)]) == 2
    assert main(["sketch", "synth:1x1x4", "--bits-per-page", "999", "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 3


def test_sources_of_different_sizes(fleet) -> None:
    """Bitmaps of different sizes are folded onto the smaller; the error stated then
    covers the larger noise (3 standard errors)."""
    sources, sketches = fleet
    small = np.ascontiguousarray(sources[3].segments[0][:512])  # same family as 0
    sk_small = sketch_pages([small], "small")
    assert sk_small.bits_log2 < sketches[0].bits_log2
    exact = exact_savings([sources[0], Source("small", "image", [small])])["saved_pages"]
    est = estimate([sketches[0], sk_small])
    assert abs(est.saved - exact) <= 3 * est.stderr
    assert abs(est.saved - exact) <= 0.05 * exact


def test_sketch_of_a_live_process(tmp_path, capsys) -> None:
    """--pid: a snapshot (it cannot be read again, so its source is empty)."""
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "b = bytearray(4 << 20)\n"
         "for i in range(0, len(b), 4096): b[i] = 1\n"
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        out = tmp_path / "p.ksk"
        assert main(["sketch", "--pid", str(child.pid), "-o", str(out)]) == 0
        capsys.readouterr()
        (sk,) = fileformat.load(out)
        assert sk.kind == "process" and sk.source == ""
        # the 4 MiB buffer: 1024 pages that are all the same (one byte set, at offset 0)
        assert sk.pages >= 1024
        assert estimate([sk]).saved >= 1000
    finally:
        child.kill()
        child.wait()
