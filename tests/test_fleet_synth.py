"""Synthetic fleets (ksmcore.fleet.synth): deterministic, with the structure they
claim."""

from __future__ import annotations

import numpy as np
import pytest

from ksmcore.fleet import synth
from ksmcore.fleet.sketch import ZERO_HASH, page_hashes


def test_spec_parsing() -> None:
    fleet, idx = synth.parse("synth:3x4x8MiB@9")
    assert (fleet.families, fleet.per_family, fleet.pages, fleet.seed, idx) == (3, 4, 2048, 9, None)
    assert synth.expand("synth:2x2x16") == [f"synth:2x2x16@{synth.DEFAULT_SEED}/{i}"
                                            for i in range(4)]
    assert synth.expand("synth:2x2x16@1/3") == ["synth:2x2x16@1/3"]
    for bad in ("synth:0x2x16", "synth:2x2x3KiB", "synth:2x2", "synth:1x1x16/1"):
        with pytest.raises(ValueError):
            synth.parse(bad)


def test_deterministic_from_the_seed() -> None:
    a = synth.Fleet(2, 2, 256, seed=4)
    assert np.array_equal(a.image(3), a.image(3))
    assert not np.array_equal(a.image(3), synth.Fleet(2, 2, 256, seed=5).image(3))


def test_known_structure() -> None:
    """Per image 40% family pages, 20% zero, 10% repeats, 30% unique; families share
    their 40% and nothing else."""
    fleet = synth.Fleet(2, 2, 1000, seed=1)
    hs = [page_hashes(fleet.image(i)) for i in range(fleet.size)]
    for h in hs:
        assert int((h == np.uint64(ZERO_HASH)).sum()) == 200
        nz = h[h != np.uint64(ZERO_HASH)]
        _, counts = np.unique(nz, return_counts=True)
        assert int((counts == 1).sum()) == 400 + 300  # family part + unique, each once
        assert int(counts[counts > 1].sum()) == 100  # the repeats (12 distinct pages)
    sets = [set(h[h != np.uint64(ZERO_HASH)].tolist()) for h in hs]
    assert fleet.family(0) == fleet.family(2) != fleet.family(1)
    assert len(sets[0] & sets[2]) == 400
    assert len(sets[1] & sets[3]) == 400
    assert not sets[0] & sets[1] and not sets[0] & sets[3]
