"""The unstable tree is ordered by contents that may change under it (pages are not
write-protected until merged). The kernel tolerates a mis-ordered tree; so must both
implementations, and they must take the same decisions walking it."""

from __future__ import annotations

import numpy as np

from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE

from conftest import machine_class
from observe import snapshot


def scrambled_run(impl: str, seed: int) -> tuple[dict, list[int]]:
    rng = np.random.default_rng(seed)
    m = machine_class(impl)()
    p = m.spawn()
    n = 400
    addr = p.mmap(n)
    # few distinct contents, so the tree pages have partners to be found (or missed)
    pages = rng.integers(0, 3, size=(n, 1), dtype=np.uint8) * np.ones((1, PAGE_SIZE), np.uint8)
    pages[:, :4] = rng.integers(0, 8, size=(n, 4), dtype=np.uint8)
    p.fill(addr, pages)
    p.madvise(addr, n * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.smart_scan = 0
    m.ksm.run = 1
    m.ksm.scan(full_scans=1)  # checksums recorded
    progress = []
    for _ in range(12):
        m.ksm.do_scan(int(rng.integers(20, 60)))  # part of a round: tree pages inserted
        for i in rng.choice(n, 30, replace=False):  # then change pages under the tree
            p.write(addr + int(i) * PAGE_SIZE + int(rng.integers(0, 4)), bytes([rng.integers(8)]))
        m.check_invariants()
        progress.append(m.ksm.pages_sharing)
    return snapshot(m, [p]), progress


def test_scrambled_unstable_tree_same_decisions() -> None:
    for seed in range(6):
        engine = scrambled_run("engine", seed)
        reference = scrambled_run("reference", seed)
        assert engine == reference
        assert max(engine[1]) > 0  # merges did happen along the way
