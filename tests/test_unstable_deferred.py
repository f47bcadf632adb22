"""The engine's deferred unstable tree (struct ksm_ctx ulazy/ulog/uhash) decides what the
walked rbtree decides, and once built has the very shape the walks would have made.

Two engines run the lockstep fuzz programs (tests/test_fuzz_lockstep.py): one defers
the tree while nothing disturbs it (the default), one walks the rbtree always
(``ctx.unstable_lazy = 0``). After every operation their observable states are equal;
every few operations the deferred tree is built (ksm_unstable_tree_sync) and its nodes,
links, colours and roots must equal the walked tree's, array for array. A second test
checks the built tree is an rbtree in memcmp order of exactly the round's live items.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from test_fuzz_lockstep import outcome, program

from ksmcore._native import ffi, lib
from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE

from conftest import machine_class
from observe import snapshot

SEEDS = range(12)


def _tree(m: Any) -> dict[str, Any]:
    c = m.ctx
    n = int(c.ucount)
    un = np.frombuffer(ffi.buffer(c.unode, 12 * n), dtype=np.int32).reshape(n, 3)
    return {
        "ucount": n,
        "roots": list(c.root_unstable_tree),
        "links": un.tolist(),
        "slots": np.frombuffer(ffi.buffer(c.uslot, 4 * n), dtype=np.int32).tolist(),
        "nids": np.frombuffer(ffi.buffer(c.unid, 2 * n), dtype=np.int16).tolist(),
        "prefixes": np.frombuffer(ffi.buffer(c.uprefix, 8 * n), dtype=np.uint64).tolist(),
    }


def _live_nodes(m: Any) -> dict[int, list[int]]:
    """nid -> the tree nodes of this round's live unstable items, as the slots say."""
    c = m.ctx
    out: dict[int, list[int]] = {}
    for tn in range(c.ucount):
        s = c.uslot[tn]
        if (c.ri_flags[s] & lib.KSM_UNSTABLE_FLAG) and c.ri_head[s] == tn and \
                (c.ri_flags[s] & lib.KSM_SEQNR_MASK) == (c.seqnr & lib.KSM_SEQNR_MASK):
            out.setdefault(int(c.unid[tn]), []).append(tn)
    return out


def _run(seed: int) -> int:
    """One fuzz program on both engines; returns how many times a deferred tree (with
    logged work) was built and compared."""
    Engine = machine_class("engine")
    lazy, walked = Engine(nodes=2), Engine(nodes=2)
    walked.ctx.unstable_lazy = 0
    procs: list[list[Any]] = [[], []]
    machines = [lazy, walked]
    compared = 0
    for step, (what, op) in enumerate(program(seed)):
        got = [outcome(lambda m=m, s=s, op=op: op(m, procs[s])) for s, m in enumerate(machines)]
        where = f"seed {seed} step {step} ({what})"
        assert got[0] == got[1], where
        assert snapshot(lazy, procs[0]) == snapshot(walked, procs[1]), where
        if step % 9 == 8:
            compared += bool(lazy.ctx.ulazy and lazy.ctx.ucount)
            lib.ksm_unstable_tree_sync(lazy.ctx)
            assert not lazy.ctx.ulazy
            assert _tree(lazy) == _tree(walked), where
            lazy.check_invariants()
    assert walked.ctx.ulazy == 0
    return compared


def test_deferred_tree_is_the_walked_tree() -> None:
    compared = sum(_run(seed) for seed in SEEDS)
    assert compared >= 5, f"only {compared} deferred trees were built and compared"


def test_built_tree_is_an_rbtree_of_the_live_items_in_memcmp_order() -> None:
    m = machine_class("engine")()
    rng = np.random.default_rng(7)
    p = m.spawn()
    a = p.mmap(600)
    pages = rng.integers(0, 256, (600, PAGE_SIZE), dtype=np.uint8)
    pages[::3, :64] = 0  # long equal prefixes: memcmp decides, not the cached prefix
    pages[1::7] = pages[0]  # duplicates: merges erase tree nodes mid-round
    p.fill(a, pages)
    p.madvise(a, 600 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.do_scan(600)  # checksums
    m.ksm.do_scan(1)  # the empty batch that ends the first full scan
    m.ksm.do_scan(450)  # three quarters of a round, deferred
    assert m.ctx.ulazy and m.ctx.ucount > 0 and m.ctx.nr_ulog > 0  # inserts and erases
    lib.ksm_unstable_tree_sync(m.ctx)
    c = m.ctx
    live = _live_nodes(m)[0]
    order: list[int] = []
    tn = lib.ksm_rb_first(c.unode, c.root_unstable_tree[0])
    while tn != lib.KSM_NIL:
        order.append(tn)
        tn = lib.ksm_rb_next(c.unode, tn)
    assert sorted(order) == sorted(live)
    keys = [bytes(m.mem.page(int(c.pte[c.uslot[t]]))) for t in order]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    # red-black: the root black, no red node with a red child, equal black heights
    un = c.unode

    def black_height(t: int) -> int:
        if t == lib.KSM_NIL:
            return 1
        left, right = un[t].left, un[t].right
        red = not (un[t].parent_color & 1)
        if red:
            for child in (left, right):
                assert child == lib.KSM_NIL or un[child].parent_color & 1
        hl, hr = black_height(left), black_height(right)
        assert hl == hr
        return hl + (0 if red else 1)

    assert un[c.root_unstable_tree[0]].parent_color & 1
    black_height(c.root_unstable_tree[0])
    m.check_invariants()
    m.ksm.do_scan(1000)  # the round ends walking the built tree
    m.check_invariants()
