"""NUMA scenarios of mm/ksm.c (Linux 6.18) on the model, checked step by step.

The founding document is the 2013 linux-mm thread on Hugh Dickins' "ksm: treat
unstable nid like in stable tree" (/work/shared/seeds/000_7d12d19f07f9e7ff.txt), with
Ric Mason and Will Huck. Each test quotes the passage it checks (of the thread, or of
the mm/ksm.c comment in question) and asserts the intermediate states: where every
stable node is (``stable_nodes()``: tree / dup / migrate, nid, kpfn), the counters,
which addresses share a frame and on which node each frame is.

Every test runs on both implementations (the ``Machine`` fixture); the last one runs
the migration scenarios on both and compares what a user can observe.

Reminders of the model used below: a page needs two visits (the first only records
its checksum) before it can merge; ``do_scan(n)`` processes n pages and never crosses
the end of a full scan; the scan order is mm_slot registration order (madvise), then
address order; a migrated KSM page keeps its stable node, whose ``kpfn`` follows the
page while its ``nid`` does not (``folio_migrate_ksm``).
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from ksmcore.constants import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MPOL_BIND,
    MPOL_DEFAULT,
    MPOL_INTERLEAVE,
    MPOL_MF_MOVE,
    MPOL_MF_MOVE_ALL,
    MPOL_PREFERRED,
    PAGE_SIZE,
)

from conftest import machine_class
from observe import snapshot

A, B, C = 0xA5, 0xB6, 0x3C  # page contents; A < B so that B sorts right of A


# ---- helpers


def pages(*values: int) -> np.ndarray:
    """One 4 KiB page per value, filled with it."""
    return np.stack([np.full(PAGE_SIZE, v, np.uint8) for v in values])


def mergeable(p: Any, *values: int, node: int | None = None) -> int:
    """mmap one page per value (bound to ``node`` if given), fill, MADV_MERGEABLE."""
    addr = p.mmap(len(values), node=node)
    p.fill(addr, pages(*values))
    p.madvise(addr, len(values) * PAGE_SIZE, MADV_MERGEABLE)
    return addr


def numa_machine(Machine: type, nodes: int = 2, merge_across_nodes: int = 0,
                 **knobs: int) -> Any:
    """A machine of ``nodes`` nodes with merge_across_nodes set, then run=1."""
    m = Machine(nodes=nodes)
    m.ksm.merge_across_nodes = merge_across_nodes
    for name, value in knobs.items():
        setattr(m.ksm, name, value)
    m.ksm.run = 1
    return m


def sn(kpfn: int, nid: int, where: str, rmap_hlist_len: int,
       chain: Sequence[int] | None = None) -> dict[str, Any]:
    """One entry of stable_nodes()."""
    d: dict[str, Any] = {"kpfn": kpfn, "nid": nid, "where": where,
                         "rmap_hlist_len": rmap_hlist_len}
    if chain is not None:
        d["chain"] = list(chain)
    return d


def counters(m: Any) -> tuple[int, int, int, int]:
    """(pages_shared, pages_sharing, pages_unshared, pages_volatile)."""
    s = m.ksm.stats()
    return (int(s["pages_shared"]), int(s["pages_sharing"]), int(s["pages_unshared"]),
            int(s["pages_volatile"]))


def per_node(m: Any) -> dict[int, tuple[int, int]]:
    """node_stats() as {nid: (pages_shared, pages_sharing)}."""
    return {n: (d["pages_shared"], d["pages_sharing"]) for n, d in m.ksm.node_stats().items()}


def visit(m: Any, n: int = 1) -> None:
    """One ksm_do_scan(n) that processes exactly n pages (it does not reach a round end)."""
    assert m.ksm.do_scan(n) == n
    m.check_invariants()


def end_round(m: Any) -> None:
    """The next call finds the end of the full scan: no page processed, full_scans + 1."""
    before = m.ksm.full_scans
    assert m.ksm.do_scan(1) == 0
    assert m.ksm.full_scans == before + 1
    m.check_invariants()


def full_scans(m: Any, k: int) -> None:
    m.ksm.scan(full_scans=k)
    m.check_invariants()


def nid_at(m: Any, p: Any, addr: int) -> int:
    return int(m.pfn_to_nid(p.pfn(addr)))


# ---- a. a migrated KSM page is re-placed when ksmd meets one of its mappings


def scenario_a_replaced_on_visit(Machine: type, merge_across_nodes: int) -> tuple[Any, list]:
    m = numa_machine(Machine, merge_across_nodes=merge_across_nodes)
    p = m.spawn(node=0)
    z = mergeable(p, C, node=0)  # an unrelated page: the first item of every round
    k = mergeable(p, A, A, node=0)
    full_scans(m, 2)
    kpfn = p.pfn(k)
    assert p.pfn(k + PAGE_SIZE) == kpfn and m.pfn_to_nid(kpfn) == 0
    assert m.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 2)]
    assert counters(m) == (1, 1, 1, 0)

    new = m.migrate_page(kpfn, 1)
    m.check_invariants()
    # folio_migrate_ksm: every mapping follows, the stable node's kpfn follows,
    # its nid does not.
    assert new != kpfn and m.pfn_to_nid(new) == 1
    assert p.pfn(k) == p.pfn(k + PAGE_SIZE) == new
    assert p.read(k, PAGE_SIZE) == bytes([A]) * PAGE_SIZE
    assert m.ksm.stable_nodes() == [sn(new, 0, "tree", 2)]
    assert per_node(m) == {0: (0, 0), 1: (1, 1)}  # numastat counts by the page's node
    assert counters(m) == (1, 1, 1, 0)

    visit(m)  # round 3 begins with z: the KSM page's node is not looked at
    assert m.ksm.stable_nodes() == [sn(new, 0, "tree", 2)]
    visit(m)  # k: cmp_and_merge_page() meets a mapping of the migrated page
    # merge_across_nodes=0: get_kpfn_nid(kpfn) = 1 != nid 0: out of tree[0] onto
    # migrate_nodes, then stable_tree_search() links it into tree[1] (nid = 1) within
    # the same call. merge_across_nodes=1: every nid is 0, nothing moves.
    new_nid = 1 if merge_across_nodes == 0 else 0
    assert m.ksm.stable_nodes() == [sn(new, new_nid, "tree", 2)]
    visit(m)  # k + 1: the fast path (already on this stable node)
    end_round(m)
    assert m.ksm.stable_nodes() == [sn(new, new_nid, "tree", 2)]
    assert p.pfn(k) == p.pfn(k + PAGE_SIZE) == new
    s = m.ksm.stats()
    assert (s["stable_node_chains"], s["stable_node_dups"]) == (0, 0)
    assert counters(m) == (1, 1, 1, 0)
    assert p.pfn(z) != new
    return m, [p]


@pytest.mark.parametrize("merge_across_nodes", [0, 1])
def test_a_migrated_ksm_page_replaced_when_ksmd_meets_a_mapping(
        Machine: type, merge_across_nodes: int) -> None:
    """Hugh Dickins: "ksm_migrate_page() updates stable_node->kpfn for the new page on
    the new NUMA node; but it cannot (get the right locking to) move the stable_node to
    its new tree at that time. It's moved out once ksmd notices that it's in the wrong
    NUMA node tree - perhaps when one its rmap_items reaches the head of
    cmp_and_merge_page()", and earlier: "But ksm_migrate_page() did ...
    stable_node->kpfn = page_to_pfn(newpage); without changing stable_node->nid."

    The migrated node keeps nid 0 until ksmd reaches a mapping of it; then (with
    merge_across_nodes=0) it passes through migrate_nodes and is linked into tree[1]
    in the same cmp_and_merge_page() call, so the "migrate" state is not observable
    here (see the next test for a case where it is). With merge_across_nodes=1
    get_kpfn_nid() is always 0 and nothing moves.
    """
    scenario_a_replaced_on_visit(Machine, merge_across_nodes)


def scenario_a_waits_on_migrate_nodes(Machine: type) -> tuple[Any, list]:
    # smart_scan=0: k0 below is an ordinary page that never merges; smart scan would
    # skip it on its fifth visit (round 5) and change the unstable counts checked there.
    m = numa_machine(Machine, max_page_sharing=2, smart_scan=0)
    p0 = m.spawn(node=0)
    k = mergeable(p0, A, A, node=0)
    p1 = m.spawn(node=1)
    e = mergeable(p1, A, A, node=1)
    full_scans(m, 2)
    kpfn, epfn = p0.pfn(k), p1.pfn(e)
    assert m.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 2), sn(epfn, 1, "tree", 2)]
    assert counters(m) == (2, 2, 0, 0)

    p0.write(k, b"\x01")  # COW: k0 gets a private copy; K keeps one mapping
    assert nid_at(m, p0, k) == 0 and p0.pfn(k) != kpfn
    full_scans(m, 1)  # round 3: k0's rmap_item leaves K (lazy until this visit)
    assert m.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 1), sn(epfn, 1, "tree", 2)]
    assert counters(m) == (2, 1, 0, 1)

    new = m.migrate_page(kpfn, 1)
    m.check_invariants()
    assert m.ksm.stable_nodes() == [sn(new, 0, "tree", 1), sn(epfn, 1, "tree", 2)]
    visit(m)  # round 4, k0: compared with K in tree[0] (not equal), unstable tree[0]
    assert m.ksm.stable_nodes() == [sn(new, 0, "tree", 1), sn(epfn, 1, "tree", 2)]
    assert counters(m) == (2, 1, 1, 0)
    visit(m)  # k1: K -> migrate_nodes; in tree[1] it meets E, equal but full
    # (max_page_sharing 2) and K is mapped once, so no chain_append:
    # stable_tree_search() returns NULL and K stays on migrate_nodes with its old nid.
    # cmp_and_merge_page() then removes k1's rmap_item from K (pages_shared - 1) and
    # puts it in unstable tree[1].
    assert m.ksm.stable_nodes() == [sn(epfn, 1, "tree", 2), sn(new, 0, "migrate", 0)]
    assert counters(m) == (1, 1, 2, 0)
    assert p0.pfn(k + PAGE_SIZE) == new != epfn
    visit(m, 2)  # e0, e1: fast path
    end_round(m)

    full_scans(m, 1)  # round 5: K is live, so the round-start prune keeps it; same state
    assert m.ksm.stable_nodes() == [sn(epfn, 1, "tree", 2), sn(new, 0, "migrate", 0)]
    assert counters(m) == (1, 1, 2, 0)
    assert per_node(m) == {0: (0, 0), 1: (1, 1)}

    p1.munmap(e, 2 * PAGE_SIZE)  # E's page is freed: its node is stale in tree[1]
    m.check_invariants()
    visit(m)  # round 6, k0: unstable tree[0] again
    visit(m)  # k1: the search in tree[1] meets E stale: removed with its rmap_items,
    # walk restarted on an empty tree: K is linked there at last, nid 1. K has no
    # rmap_item, so it is no sharing candidate: NULL, and k1 goes to unstable tree[1].
    assert m.ksm.stable_nodes() == [sn(new, 1, "tree", 0)]
    assert counters(m) == (0, 0, 2, 2)  # e0, e1 still have (flagless) rmap_items
    end_round(m)  # p1 has no mergeable VMA left: its slot and items are freed
    assert counters(m) == (0, 0, 2, 0)
    visit(m)  # round 7, k0
    visit(m)  # k1: K is in the right tree; "KSM page forked" path: k1 is appended
    assert m.ksm.stable_nodes() == [sn(new, 1, "tree", 1)]
    assert counters(m) == (1, 0, 1, 0)
    assert per_node(m) == {0: (0, 0), 1: (1, 0)}
    return m, [p0, p1]


def test_a_migrated_ksm_page_waits_on_migrate_nodes_when_replacement_fails(
        Machine: type) -> None:
    """Hugh Dickins: "It's moved out once ksmd notices that it's in the wrong NUMA node
    tree - perhaps when one its rmap_items reaches the head of cmp_and_merge_page()";
    and stable_tree_search() when the equal dup cannot take one more mapping (mm/ksm.c:
    "we cannot merge the scanned page in any of the existing stable_node dups because
    they're all full, we need to wait the scanned page to find itself a match in the
    unstable tree"): return NULL, the migrated node stays on migrate_nodes.

    A KSM page with one mapping, migrated to node 1 where a full copy of the same
    content (max_page_sharing=2) sits in tree[1]: the "migrate" state (with the old
    nid) persists after ksmd met the page, and across the next round start. Once the
    full copy is gone, the next visit links the node into tree[1] with nid 1, and the
    one after appends the mapping's rmap_item to it again.
    """
    scenario_a_waits_on_migrate_nodes(Machine)


# ---- b. stable_tree_search() meeting a node whose page migrated away: replace


def scenario_b_replace_without_page_node(Machine: type) -> tuple[Any, list]:
    # smart_scan=0: x is an ordinary page that never merges; smart scan would skip it
    # on its fifth visit (round 5), where the test checks that it is re-inserted.
    m = numa_machine(Machine, smart_scan=0)
    p = m.spawn(node=0)
    x = mergeable(p, C, node=0)
    k = mergeable(p, A, A, node=0)
    full_scans(m, 2)
    kpfn = p.pfn(k)
    assert m.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 2)]
    assert counters(m) == (1, 1, 1, 0)

    p.write(x, bytes([A]) * PAGE_SIZE)  # x now has K's content (written in place)
    full_scans(m, 1)  # round 3: x's new checksum recorded
    assert counters(m) == (1, 1, 0, 1)
    new = m.migrate_page(kpfn, 1)
    m.check_invariants()
    assert m.ksm.stable_nodes() == [sn(new, 0, "tree", 2)]

    visit(m)  # round 4, x (node 0): stable_tree_search() finds K equal in tree[0],
    # but get_kpfn_nid(kpfn) = 1 != nid 0: "replace" without a page_node: rb_erase,
    # K onto migrate_nodes (nid unchanged), NULL returned; x goes to unstable tree[0].
    assert m.ksm.stable_nodes() == [sn(new, 0, "migrate", 2)]
    assert counters(m) == (1, 1, 1, 0)
    assert p.pfn(x) != new and nid_at(m, p, x) == 0
    visit(m)  # k0: K is on migrate_nodes: page_node; tree[1] is empty: linked there
    assert m.ksm.stable_nodes() == [sn(new, 1, "tree", 2)]
    visit(m)  # k1: fast path
    end_round(m)
    assert m.ksm.stable_nodes() == [sn(new, 1, "tree", 2)]

    full_scans(m, 1)  # round 5: x finds nothing in tree[0], stays unshared on node 0
    assert m.ksm.stable_nodes() == [sn(new, 1, "tree", 2)]
    assert counters(m) == (1, 1, 1, 0)
    assert per_node(m) == {0: (0, 0), 1: (1, 1)}
    assert p.pfn(k) == p.pfn(k + PAGE_SIZE) == new != p.pfn(x)
    return m, [p]


def test_b_stable_search_replace_without_page_node(Machine: type) -> None:
    """Hugh Dickins: "if (get_kpfn_nid(stable_node->kpfn) != NUMA(stable_node->nid))
    { put_page(tree_page); goto replace; } to make sure that we don't latch on to a
    node whose page got migrated away", moved out "perhaps here in stable_tree_search()
    when it matches another page coming in to cmp_and_merge_page()". Ric Mason: "If
    ksmd scan and compare another page in old node and search stable tree will figure
    out that stable node relevant ksm page is migrated to new node, stable node will be
    erased from old node's stable tree and link to migrate_nodes list."

    An ordinary page of node 0 with the content of a KSM page that migrated to node 1:
    the node leaves tree[0] for migrate_nodes (caught in the "migrate" state, old
    nid), the search returns NULL and the page goes to the unstable tree; the next
    visit of a mapping links the node into tree[1].
    """
    scenario_b_replace_without_page_node(Machine)


def scenario_b_replace_with_page_node(Machine: type) -> tuple[Any, list]:
    m = numa_machine(Machine)
    p0 = m.spawn(node=0)
    k = mergeable(p0, A, A, node=0)
    p1 = m.spawn(node=1)
    d = mergeable(p1, A, A, node=1)
    full_scans(m, 2)
    kpfn, dpfn = p0.pfn(k), p1.pfn(d)
    assert m.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 2), sn(dpfn, 1, "tree", 2)]
    assert per_node(m) == {0: (1, 1), 1: (1, 1)}

    p0.write(k + PAGE_SIZE, b"\x01")  # K keeps one mapping (k0); k1's item is lazy
    knew = m.migrate_page(kpfn, 1)
    dnew = m.migrate_page(dpfn, 0)
    m.check_invariants()
    assert m.pfn_to_nid(knew) == 1 and m.pfn_to_nid(dnew) == 0
    assert m.ksm.stable_nodes() == [sn(knew, 0, "tree", 2), sn(dnew, 1, "tree", 2)]
    assert counters(m) == (2, 2, 0, 0)

    visit(m)  # round 3, k0: K (misplaced in tree[0]) -> migrate_nodes; searching
    # tree[1] it meets D, equal, a candidate, but itself migrated away (nid 1, page on
    # node 0); K has mapcount 1, so no chain_append: "replace" with page_node:
    # rb_replace_node(D -> K), K.nid = 1; D onto migrate_nodes (nid still 1).
    assert m.ksm.stable_nodes() == [sn(knew, 1, "tree", 2), sn(dnew, 1, "migrate", 2)]
    assert counters(m) == (2, 2, 0, 0)
    assert p0.pfn(k) == knew
    visit(m)  # k1 (the private copy): its rmap_item leaves K
    assert m.ksm.stable_nodes() == [sn(knew, 1, "tree", 1), sn(dnew, 1, "migrate", 2)]
    assert counters(m) == (2, 1, 0, 1)
    visit(m)  # d0: D on migrate_nodes is page_node; tree[0] is empty: linked there
    assert m.ksm.stable_nodes() == [sn(dnew, 0, "tree", 2), sn(knew, 1, "tree", 1)]
    visit(m)  # d1: fast path
    end_round(m)
    assert m.ksm.stable_nodes() == [sn(dnew, 0, "tree", 2), sn(knew, 1, "tree", 1)]
    assert per_node(m) == {0: (1, 1), 1: (1, 0)}
    assert p1.pfn(d) == p1.pfn(d + PAGE_SIZE) == dnew
    return m, [p0, p1]


def test_b_stable_search_replace_with_page_node(Machine: type) -> None:
    """Hugh Dickins: "You may be concentrating on the case when that "another page" is
    a ksm page migrated from a different NUMA node; and overlooking the case of when
    the matching ksm page in this stable tree has itself been migrated." Ric Mason:
    "But in special case, the stable node relevant ksm page can also migrated, new
    stable node will replace the stable node which relevant page migrated this time."

    Two KSM pages of equal content swap nodes. The one met first (mapped once) finds
    the other, misplaced, in its new tree: it takes its place (rb_replace_node) and
    the other goes to migrate_nodes, to be linked into tree[0] at its next visit.
    """
    scenario_b_replace_with_page_node(Machine)


# ---- c. a migrated KSM page re-placed into a tree holding equal content


def scenario_c_chain_append(Machine: type) -> tuple[Any, list]:
    m = numa_machine(Machine)
    p0 = m.spawn(node=0)
    k = mergeable(p0, A, A, node=0)
    p1 = m.spawn(node=1)
    e = mergeable(p1, A, A, node=1)
    full_scans(m, 2)
    kpfn, epfn = p0.pfn(k), p1.pfn(e)
    new = m.migrate_page(kpfn, 1)
    m.check_invariants()
    assert m.ksm.stable_nodes() == [sn(new, 0, "tree", 2), sn(epfn, 1, "tree", 2)]

    visit(m)  # round 3, k0: K -> migrate_nodes, meets E in tree[1]; mapcount 2 > 1:
    # chain_append: E becomes a chain's dup (chains+1, dups+1), K is added as a second
    # dup at the head of the chain's hlist (dups+1), nid 1.
    chain = [new, epfn]
    assert m.ksm.stable_nodes() == [sn(new, 1, "dup", 2, chain), sn(epfn, 1, "dup", 2, chain)]
    s = m.ksm.stats()
    assert (s["stable_node_chains"], s["stable_node_dups"]) == (1, 2)
    assert counters(m) == (2, 2, 0, 0)
    visit(m, 3)  # k1, e0, e1: fast path, each on its own dup
    end_round(m)
    full_scans(m, 1)
    assert m.ksm.stable_nodes() == [sn(new, 1, "dup", 2, chain), sn(epfn, 1, "dup", 2, chain)]
    s = m.ksm.stats()
    assert (s["stable_node_chains"], s["stable_node_dups"]) == (1, 2)
    assert counters(m) == (2, 2, 0, 0)
    assert per_node(m) == {0: (0, 0), 1: (2, 2)}
    assert p0.pfn(k) == p0.pfn(k + PAGE_SIZE) == new != epfn
    return m, [p0, p1]


def test_c_collision_chain_append_when_mapped_more_than_once(Machine: type) -> None:
    """Ric Mason: "For the case of a ksm page is migrated to a different NUMA node and
    migrate its stable node to the right tree and collide with an existing stable
    node." mm/ksm.c, stable_tree_search(): "If the mapcount of our migrated KSM folio
    is at most 1, we can merge it with another KSM folio ... This way, we can avoid
    adding this stable node to the chain"; otherwise chain_append: "Add this
    stable_node dup that was migrated to the stable_node chain of the current nid for
    this page content."

    A KSM page mapped twice migrates onto a node whose tree has the same content: two
    dups in one chain, no rmap_item moves, no page is freed.
    """
    scenario_c_chain_append(Machine)


def scenario_c_single_mapping(Machine: type) -> tuple[Any, list]:
    m = numa_machine(Machine)
    p0 = m.spawn(node=0)
    k = mergeable(p0, A, A, node=0)
    p1 = m.spawn(node=1)
    e = mergeable(p1, A, A, node=1)
    full_scans(m, 2)
    kpfn, epfn = p0.pfn(k), p1.pfn(e)
    p0.write(k + PAGE_SIZE, b"\x01")  # K keeps one mapping (k0); k1's item is lazy
    new = m.migrate_page(kpfn, 1)
    m.check_invariants()
    assert m.ksm.stable_nodes() == [sn(new, 0, "tree", 2), sn(epfn, 1, "tree", 2)]
    assert counters(m) == (2, 2, 0, 0)

    visit(m)  # round 3, k0: K -> migrate_nodes, meets E in tree[1] (a candidate, on
    # its node); mapcount 1, so no chain_append: stable_tree_search() returns E's page.
    # cmp_and_merge_page() removes k0's rmap_item from K (pages_sharing - 1), then
    # try_to_merge_with_ksm_page(k0, K's page, E's page) fails: write_protect_page()
    # gets -EFAULT from page_address_in_vma() for a KSM folio (folio_anon_vma() is
    # NULL). K stays on migrate_nodes with its old nid; k0 still maps K's page.
    assert p0.pfn(k) == new != epfn
    assert m.ksm.stable_nodes() == [sn(epfn, 1, "tree", 2), sn(new, 0, "migrate", 1)]
    assert counters(m) == (2, 1, 0, 1)
    assert p0.ksm_stat()["ksm_merging_pages"] == 1
    visit(m)  # k1 (its private copy): its lazy rmap_item leaves K, the last one
    assert m.ksm.stable_nodes() == [sn(epfn, 1, "tree", 2), sn(new, 0, "migrate", 0)]
    assert counters(m) == (1, 1, 0, 2)
    assert p0.ksm_stat()["ksm_merging_pages"] == 0
    visit(m, 2)  # e0, e1
    end_round(m)

    full_scans(m, 1)  # round 4: the same for k0 (K is live: the prune keeps it);
    # k1's copy goes to unstable tree[0]
    assert m.ksm.stable_nodes() == [sn(epfn, 1, "tree", 2), sn(new, 0, "migrate", 0)]
    assert counters(m) == (1, 1, 1, 1)
    assert p0.pfn(k) == new and p1.pfn(e) == p1.pfn(e + PAGE_SIZE) == epfn
    assert per_node(m) == {0: (0, 0), 1: (1, 1)}

    p0.write(k, b"\x02")  # the old page dies only when its last mapping goes
    m.check_invariants()
    assert m.ksm.stable_nodes() == [sn(epfn, 1, "tree", 2)]
    assert counters(m) == (1, 1, 1, 1)
    return m, [p0, p1]


def test_c_collision_single_mapping_gets_existing_page(Machine: type) -> None:
    """Ric Mason: "it will search stable tree in new node and if doesn't find matched
    stable node, the new node is deleted from migrate_node list and add to new node's
    table tree as a leaf, if find stable node in stable tree, they will be merged."
    mm/ksm.c, stable_tree_search(): "If the mapcount of our migrated KSM folio is at
    most 1, we can merge it with another KSM folio where we know that we have space for
    one more mapping without exceeding the ksm_max_page_sharing limit: see
    chain_prune(). This way, we can avoid adding this stable node to the chain."

    The migrated page, mapped once, is not chained: stable_tree_search() hands back the
    existing KSM page. But the merge that follows cannot succeed in 6.18: the scanned
    page is itself a KSM folio, and write_protect_page() -> page_address_in_vma()
    returns -EFAULT for it (mm/rmap.c: "KSM folios don't reach here because of the
    !anon_vma check"). So the mapping keeps the migrated page, which stays on
    migrate_nodes (with its old nid) without rmap_items, until the page is freed.
    """
    scenario_c_single_mapping(Machine)


# ---- d. the unstable tree: a tree page on the wrong node (Hugh's patch 2/7)


def scenario_d_unstable_wrong_node(Machine: type) -> tuple[Any, list]:
    m = numa_machine(Machine)
    p0 = m.spawn(node=0)
    base = mergeable(p0, A, B, A, B, node=0)
    u, s_b, s_a, t_b = (base + i * PAGE_SIZE for i in range(4))
    p1 = m.spawn(node=1)
    v = mergeable(p1, A, node=1)
    full_scans(m, 1)  # checksums only
    assert counters(m) == (0, 0, 0, 5)

    visit(m)  # round 2, u: into unstable tree[0]
    assert counters(m) == (0, 0, 1, 4)
    upfn = m.migrate_page(p0.pfn(u), 1)  # between two batches of one round
    m.check_invariants()
    assert m.pfn_to_nid(upfn) == 1

    visit(m)  # s_b (B): compared with u (A, now on node 1) for the ordering, inserted
    assert counters(m) == (0, 0, 2, 3)
    visit(m)  # s_a (A): equal to u, but u's page is on node 1 != 0: NULL, not inserted
    assert counters(m) == (0, 0, 2, 3)
    assert p0.pfn(s_a) != upfn
    visit(m)  # t_b (B): walks past u to s_b and merges with it
    bpfn = p0.pfn(t_b)
    assert p0.pfn(s_b) == bpfn and m.pfn_to_nid(bpfn) == 0
    assert m.ksm.stable_nodes() == [sn(bpfn, 0, "tree", 2)]
    assert counters(m) == (1, 1, 1, 2)
    visit(m)  # v (node 1): unstable tree[1]
    end_round(m)
    assert counters(m) == (1, 1, 2, 1)  # u (misplaced) and v unshared, s_a volatile

    visit(m)  # round 3 (unstable trees reset), u: into unstable tree[1]
    assert counters(m) == (1, 1, 2, 1)
    visit(m)  # s_b: fast path
    assert counters(m) == (1, 1, 2, 1)
    visit(m)  # s_a: into unstable tree[0] (u is not there any more)
    assert counters(m) == (1, 1, 3, 0)
    visit(m)  # t_b: fast path
    visit(m)  # v: merges with u in tree[1]; the scanned page v survives
    vpfn = p1.pfn(v)
    assert p0.pfn(u) == vpfn and m.pfn_to_nid(vpfn) == 1
    end_round(m)
    assert m.ksm.stable_nodes() == [sn(bpfn, 0, "tree", 2), sn(vpfn, 1, "tree", 2)]
    assert counters(m) == (2, 2, 1, 0)
    assert per_node(m) == {0: (1, 1), 1: (1, 1)}
    assert nid_at(m, p0, s_a) == 0 and p0.pfn(s_a) not in (vpfn, bpfn)
    return m, [p0, p1]


def test_d_unstable_tree_page_on_wrong_node(Machine: type) -> None:
    """Hugh Dickins (patch 2/7): "when meeting a page from the wrong NUMA node in a
    stable tree, we say that it's okay for comparisons, but not as a leaf for merging;
    whereas when meeting a page from the wrong NUMA node in an unstable tree, we bail
    out immediately." And: "it makes sense to compare content, no matter what NUMA node
    it is on, in order to locate a page of the same content; but wrong to merge with
    that page if it's on the wrong NUMA node, if !merge_across_nodes tells us not to."
    mm/ksm.c: "If tree_page has been migrated to another NUMA node, it will be flushed
    out and put in the right unstable tree next time: only merge with it when
    across_nodes."

    u enters unstable tree[0] and migrates to node 1 within the round. Pages of other
    content still order themselves on it (t_b finds s_b past it and merges); s_a, equal
    to u, is neither merged nor inserted (volatile). After the next reset u goes to
    tree[1] and merges there with v; s_a stays unshared in tree[0].
    """
    scenario_d_unstable_wrong_node(Machine)


# ---- e. migrate_nodes pruned of stale nodes at the start of each full scan


def scenario_e_prune(Machine: type) -> tuple[Any, list]:
    # smart_scan=0: z, an ordinary page, must be the one page processed by the first
    # batch of round 5; smart scan would skip it there (its fifth visit) and the batch
    # would reach k0.
    m = numa_machine(Machine, smart_scan=0)
    p = m.spawn(node=0)
    mergeable(p, C, node=0)  # z: the first item of every round
    k = mergeable(p, A, A, node=0)
    x = mergeable(p, B, node=0)
    full_scans(m, 2)
    kpfn = p.pfn(k)
    assert m.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 2)]
    p.write(x, bytes([A]) * PAGE_SIZE)
    full_scans(m, 1)  # round 3: x's new checksum recorded

    visit(m, 3)  # round 4: z, k0, k1 (K still correctly placed)
    new = m.migrate_page(kpfn, 1)
    m.check_invariants()
    visit(m)  # x: meets K in tree[0], migrated away: K -> migrate_nodes
    assert m.ksm.stable_nodes() == [sn(new, 0, "migrate", 2)]
    assert counters(m) == (1, 1, 2, 0)

    p.write(k, b"\x01")  # both mappings COW: the KSM page is freed
    p.write(k + PAGE_SIZE, b"\x02")
    m.check_invariants()
    assert m.ksm.stable_nodes() == []  # stale nodes are not listed...
    assert counters(m) == (1, 1, 2, 0)  # ...but still counted (lazy counters)
    assert p.ksm_stat()["ksm_merging_pages"] == 2
    end_round(m)
    assert counters(m) == (1, 1, 2, 0)

    visit(m)  # round 5: the prune of migrate_nodes at the round start removes K;
    # only z has been processed, k0 and k1 are not visited yet.
    assert counters(m) == (0, 0, 2, 2)
    assert p.ksm_stat()["ksm_merging_pages"] == 0
    assert p.ksm_stat()["ksm_rmap_items"] == 4
    visit(m, 3)  # k0, k1: new checksums recorded; x: unstable tree[0] (K is gone)
    end_round(m)
    assert counters(m) == (0, 0, 2, 2)
    assert m.ksm.stable_nodes() == []
    return m, [p]


def test_e_migrate_nodes_pruned_at_round_start(Machine: type) -> None:
    """mm/ksm.c, scan_get_next_rmap_item(): "Whereas stale stable_nodes on the
    stable_tree itself get pruned in the regular course of stable_tree_search(), those
    moved out to the migrate_nodes list can accumulate: so prune them once before each
    full scan." (only when !ksm_merge_across_nodes). How the node got there, Hugh
    Dickins: "It's moved out once ksmd notices that it's in the wrong NUMA node tree -
    ... or perhaps here in stable_tree_search() when it matches another page coming in
    to cmp_and_merge_page()."

    A node on migrate_nodes whose page is then freed (both mappings COW-written): not
    listed any more, still counted, and gone from pages_shared/pages_sharing as soon as
    the next round starts, before ksmd visits its rmap_items.
    """
    scenario_e_prune(Machine)


# ---- f. fork of a process holding KSM pages (Will Huck's question)


@pytest.mark.parametrize("merge_across_nodes", [1, 0])
def test_f_fork_joins_existing_stable_node(Machine: type, merge_across_nodes: int) -> None:
    """Will Huck: "How ksm treat a ksm forked page? IIUC, it's not merged in ksm stable
    tree. It will just be ignore?" Hugh Dickins: "No, it's there in the stable tree, as
    it was before it got forked. And when ksmd comes around to find the new mm, it will
    allocate an rmap_item for that page in the new mm, and append it to the existing
    stable_node."

    Four equal pages on node 1, merged; fork: the child maps the same KSM page and has
    no rmap_item; when ksmd reaches it, each of its pages is appended to the existing
    stable node (nid 0 with merge_across_nodes=1, nid 1 with 0). No new KSM page.
    """
    m = numa_machine(Machine, merge_across_nodes=merge_across_nodes)
    nid = 0 if merge_across_nodes else 1
    p = m.spawn(node=1)
    addr = mergeable(p, A, A, A, A)  # MPOL_DEFAULT: allocated on the home node, 1
    assert all(nid_at(m, p, addr + i * PAGE_SIZE) == 1 for i in range(4))
    full_scans(m, 2)
    kpfn = p.pfn(addr)
    assert m.pfn_to_nid(kpfn) == 1
    assert m.ksm.stable_nodes() == [sn(kpfn, nid, "tree", 4)]
    assert counters(m) == (1, 3, 0, 0)

    child = p.fork()
    m.check_invariants()
    assert child.node == 1 and child.get_mempolicy() == p.get_mempolicy()
    assert all(child.pfn(addr + i * PAGE_SIZE) == kpfn for i in range(4))
    cs = child.ksm_stat()
    assert (cs["ksm_rmap_items"], cs["ksm_merging_pages"], cs["ksm_mergeable"]) == (0, 0, True)
    assert m.ksm.stable_nodes() == [sn(kpfn, nid, "tree", 4)]
    assert counters(m) == (1, 3, 0, 0)

    visit(m, 4)  # round 3: the parent's four pages, fast path
    assert m.ksm.stable_nodes() == [sn(kpfn, nid, "tree", 4)]
    visit(m)  # the child's first page: "ksm page forked", appended to the stable node
    assert m.ksm.stable_nodes() == [sn(kpfn, nid, "tree", 5)]
    assert counters(m) == (1, 4, 0, 0)
    assert child.ksm_stat()["ksm_rmap_items"] == 1
    assert child.ksm_stat()["ksm_merging_pages"] == 1
    visit(m, 3)
    end_round(m)
    assert m.ksm.stable_nodes() == [sn(kpfn, nid, "tree", 8)]
    assert counters(m) == (1, 7, 0, 0)
    s = m.ksm.stats()
    assert (s["stable_node_chains"], s["stable_node_dups"]) == (0, 0)
    assert child.ksm_stat()["ksm_merging_pages"] == 4
    assert p.ksm_stat()["ksm_merging_pages"] == 4
    assert all(child.pfn(addr + i * PAGE_SIZE) == kpfn for i in range(4))
    assert per_node(m) == {0: (0, 0), 1: (1, 7)}


# ---- g. the kernel's own NUMA tests


@pytest.mark.parametrize("merge_across_nodes", [1, 0])
def test_g_ksm_tests_N_numa_merge(Machine: type, merge_across_nodes: int) -> None:
    """ksm_tests -N -m 1 and -N -m 0 (check_ksm_numa_merge), whose comment reads:
    "verify that the right number of pages are merged: 1) if merge_across_nodes was
    enabled, 2 duplicate pages will be merged; 2) if merge_across_nodes = 0, there must
    be 0 merged pages, since there is only 1 unique page in each node and they can't be
    shared." In the thread, Hugh Dickins: "wrong to merge with that page if it's on the
    wrong NUMA node, if !merge_across_nodes tells us not to."

    One page of '*' on node 0 and one on node 1 (numa_alloc_onnode), each region
    merged on its own (ksm_merge_pages: madvise, run=1, two more full scans).
    """
    m = Machine(nodes=2)
    m.ksm.run = 2  # ksm_tests global setup
    m.ksm.sleep_millisecs = 0
    m.ksm.merge_across_nodes = 1
    m.ksm.pages_to_scan = 10
    m.ksm.merge_across_nodes = merge_across_nodes
    p = m.spawn()
    a = p.mmap(1, node=0)
    b = p.mmap(1, node=1)
    p.fill(a, pages(ord("*")))
    p.fill(b, pages(ord("*")))
    assert (nid_at(m, p, a), nid_at(m, p, b)) == (0, 1)
    bpfn = p.pfn(b)
    for region in (a, b):
        p.madvise(region, PAGE_SIZE, MADV_MERGEABLE)
        m.ksm.run = 1
        full_scans(m, 2)
        if region == a:
            assert counters(m) == (0, 0, 1, 0)
    if merge_across_nodes:
        # the scanned page (b, on node 1) is the one that survives; nid is 0
        assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (1, 1)
        assert p.pfn(a) == p.pfn(b) == bpfn
        assert m.ksm.stable_nodes() == [sn(bpfn, 0, "tree", 2)]
        assert counters(m) == (1, 1, 0, 0)
        assert per_node(m) == {0: (0, 0), 1: (1, 1)}
    else:
        assert (m.ksm.pages_shared, m.ksm.pages_sharing) == (0, 0)
        assert p.pfn(a) != p.pfn(b)
        assert (nid_at(m, p, a), nid_at(m, p, b)) == (0, 1)
        assert m.ksm.stable_nodes() == []
        assert counters(m) == (0, 0, 2, 0)


def ltp_ksm_group_check(m: Any, shared: int, sharing: int, total: int) -> None:
    """LTP ksm_group_check(1, shared, sharing, 0, 0, 0, total): wait_ksmd_full_scan()
    (three more full scans), then run=0 during the reads, then run restored."""
    assert m.ksm.run == 1
    full_scans(m, 3)
    m.ksm.run = 0
    s = m.ksm.stats()
    got = (s["pages_shared"], s["pages_sharing"], s["pages_volatile"], s["pages_unshared"],
           s["sleep_millisecs"], s["pages_to_scan"])
    assert got == (shared, sharing, 0, 0, 0, total)
    m.ksm.run = 1


@pytest.mark.parametrize("nodes", [2, 4])
def test_g_ltp_ksm06(Machine: type, nodes: int) -> None:
    """LTP ksm06: "merge_across_nodes and max_page_sharing setting can be changed only
    when there are no ksm shared pages in system, so set run 2 to unmerge pages first,
    then to 1 after changing merge_across_nodes, to remerge according to the new
    setting." (Hugh Dickins' wording in Documentation/vm/ksm.txt, 2013).

    100 pages per node (mbind to the node), all of value 10: merge_across_nodes=1 gives
    shared 1, sharing 100*nodes - 1 (one KSM page, on node 0); after run=2 the pages are
    back on their nodes; merge_across_nodes=0 gives one KSM page per node, in its own
    node's tree: shared = nodes, sharing = 100*nodes - nodes.
    """
    n = 100
    total = n * nodes
    m = Machine(nodes=nodes)
    p = m.spawn()
    regions = []
    for i in range(nodes):
        addr = p.mmap(n, node=i)  # mmap + mbind(MPOL_BIND, node i)
        p.madvise(addr, n * PAGE_SIZE, MADV_MERGEABLE)
        p.fill(addr, np.full((n, PAGE_SIZE), 10, np.uint8))
        regions.append(addr)
    m.ksm.sleep_millisecs = 0
    m.ksm.pages_to_scan = total
    m.ksm.run = 2
    m.ksm.max_page_sharing = total
    m.ksm.merge_across_nodes = 1
    m.ksm.run = 1
    ltp_ksm_group_check(m, 1, total - 1, total)
    m.check_invariants()
    kpfn = p.pfn(regions[0])
    assert m.pfn_to_nid(kpfn) == 0
    assert all(p.pfn(r + j * PAGE_SIZE) == kpfn for r in regions for j in range(n))
    assert m.ksm.stable_nodes() == [sn(kpfn, 0, "tree", total)]
    assert per_node(m) == {i: ((1, total - 1) if i == 0 else (0, 0)) for i in range(nodes)}

    m.ksm.run = 2
    m.check_invariants()
    assert counters(m) == (0, 0, 0, 0)
    assert m.ksm.full_scans == 0
    for i, r in enumerate(regions):  # unmerged copies follow the VMA's binding
        assert all(nid_at(m, p, r + j * PAGE_SIZE) == i for j in range(n))
    m.ksm.merge_across_nodes = 0
    m.ksm.run = 1
    ltp_ksm_group_check(m, nodes, total - nodes, total)
    m.check_invariants()
    expected = []
    for i, r in enumerate(regions):
        kp = p.pfn(r)
        assert m.pfn_to_nid(kp) == i
        assert all(p.pfn(r + j * PAGE_SIZE) == kp for j in range(n))
        expected.append(sn(kp, i, "tree", n))
    assert m.ksm.stable_nodes() == expected
    assert per_node(m) == {i: (1, n - 1) for i in range(nodes)}

    m.ksm.run = 2
    assert counters(m) == (0, 0, 0, 0)
    m.check_invariants()


def rmap_process_tree(root: Any, rng: random.Random, total_level: int = 5,
                      max_children: int = 3) -> list[Any]:
    """rmap.c propagate_children(): a tree of TOTAL_LEVEL levels, 1..MAX_CHILDREN
    children per process (fork)."""
    procs, frontier = [root], [root]
    for _ in range(1, total_level):
        nxt = [q.fork() for q in frontier for _ in range(rng.randrange(max_children) + 1)]
        procs += nxt
        frontier = nxt
    return procs


@pytest.mark.parametrize("merge_across_nodes", [1, 0])
def test_g_rmap_migrate_ksm(Machine: type, merge_across_nodes: int) -> None:
    """tools/testing/selftests/mm/rmap.c TEST_F(migrate, ksm): a process tree, each
    process with one page of 0xcf (prepare_local_region); a worker runs ksm_start()
    then move_pages(..., MPOL_MF_MOVE_ALL) to another node; has_same_pfn(): every other
    process maps the worker's new PFN. In the thread, Ric Mason: "For page migratyion
    stuff, new page is allocated from node *which page is migrated to*." - Hugh
    Dickins: "Yes, by definition." and "ksm_migrate_page() did ...
    stable_node->kpfn = page_to_pfn(newpage); without changing stable_node->nid."

    PR_SET_MEMORY_MERGE is replaced by MADV_MERGEABLE on each process's page. Without
    MPOL_MF_MOVE_ALL, move_pages() refuses a page mapped more than once (-EACCES).
    """
    m = Machine(nodes=2)
    m.ksm.run = 2  # ksm_stop()
    m.ksm.merge_across_nodes = merge_across_nodes
    procs = rmap_process_tree(m.spawn(node=0), random.Random(2025))
    region = 0
    for q in procs:  # prepare_local_region(), in every process after the forks
        region = mergeable(q, 0xCF)
    npr = len(procs)
    assert npr >= 5
    m.ksm.run = 1  # ksm_start(): run=1, two more full scans
    full_scans(m, 2)
    kpfn = procs[0].pfn(region)
    assert all(q.pfn(region) == kpfn for q in procs)
    assert counters(m) == (1, npr - 1, 0, 0)
    assert m.ksm.stable_nodes() == [sn(kpfn, 0, "tree", npr)]

    worker = procs[random.Random(7).randrange(npr)]
    target = 1 - m.pfn_to_nid(worker.pfn(region))
    assert target == 1
    assert worker.move_pages(region, 1, target, MPOL_MF_MOVE) == [-errno.EACCES]
    assert worker.pfn(region) == kpfn
    assert worker.move_pages(region, 1, target, MPOL_MF_MOVE_ALL) == [target]
    m.check_invariants()
    expected_pfn = worker.pfn(region)
    assert expected_pfn != kpfn and m.pfn_to_nid(expected_pfn) == target
    assert all(q.pfn(region) == expected_pfn for q in procs)  # has_same_pfn()
    assert all(q.read(region, PAGE_SIZE) == b"\xcf" * PAGE_SIZE for q in procs)
    assert m.ksm.stable_nodes() == [sn(expected_pfn, 0, "tree", npr)]
    assert counters(m) == (1, npr - 1, 0, 0)

    full_scans(m, 1)  # merge_across_nodes=0: ksmd re-places the node into tree[1]
    nid = 1 if merge_across_nodes == 0 else 0
    assert m.ksm.stable_nodes() == [sn(expected_pfn, nid, "tree", npr)]
    assert all(q.pfn(region) == expected_pfn for q in procs)
    assert counters(m) == (1, npr - 1, 0, 0)


# ---- h. switching merge_across_nodes


def test_h_merge_across_nodes_switching(Machine: type) -> None:
    """Hugh Dickins, Documentation/vm/ksm.txt (2013, same series): "merge_across_nodes
    setting can be changed only when there are no ksm shared pages in system: set run 2
    to unmerge pages first, then to 1 after changing merge_across_nodes, to remerge
    according to the new setting." merge_across_nodes_store(): kstrtoul, "> 1" is
    EINVAL, the same value does nothing, else EBUSY if ksm_pages_shared or
    remove_all_stable_nodes() finds a page still mapped.
    """
    m = Machine(nodes=2)
    assert m.ksm.merge_across_nodes == 1
    # (an empty write(2) never reaches the store: it succeeds and changes nothing, as
    # on the kernel; "\n" is the empty number)
    for text in ("2", "abc", "-1", "\n"):
        with pytest.raises(OSError) as e:
            m.ksm.sysfs_write("merge_across_nodes", text)
        assert e.value.errno == errno.EINVAL, text
    with pytest.raises(OSError) as e:
        m.ksm.merge_across_nodes = 2
    assert e.value.errno == errno.EINVAL
    assert m.ksm.merge_across_nodes == 1

    p = m.spawn()
    a0 = mergeable(p, A, A, node=0)
    a1 = mergeable(p, A, A, node=1)
    m.ksm.run = 1
    full_scans(m, 2)
    assert counters(m) == (1, 3, 0, 0)
    before = m.ksm.stable_nodes()
    m.ksm.merge_across_nodes = 1  # same value: nothing to do, no EBUSY
    m.ksm.sysfs_write("merge_across_nodes", "1\n")
    for run in (1, 0):  # run=0 keeps the merged pages: still busy
        m.ksm.run = run
        with pytest.raises(OSError) as e:
            m.ksm.merge_across_nodes = 0
        assert e.value.errno == errno.EBUSY
        assert m.ksm.merge_across_nodes == 1
        assert m.ksm.stable_nodes() == before
        assert counters(m) == (1, 3, 0, 0)
        m.check_invariants()

    m.ksm.run = 2  # the documented procedure
    assert counters(m) == (0, 0, 0, 0)
    assert [nid_at(m, p, a) for a in (a0, a0 + PAGE_SIZE, a1, a1 + PAGE_SIZE)] == [0, 0, 1, 1]
    m.ksm.merge_across_nodes = 0
    assert m.ksm.merge_across_nodes == 0
    m.ksm.run = 1
    full_scans(m, 2)
    k0, k1 = p.pfn(a0), p.pfn(a1)
    assert p.pfn(a0 + PAGE_SIZE) == k0 != k1 == p.pfn(a1 + PAGE_SIZE)
    assert m.ksm.stable_nodes() == [sn(k0, 0, "tree", 2), sn(k1, 1, "tree", 2)]
    assert counters(m) == (2, 2, 0, 0)
    with pytest.raises(OSError) as e:
        m.ksm.merge_across_nodes = 1
    assert e.value.errno == errno.EBUSY
    assert m.ksm.merge_across_nodes == 0

    m.ksm.run = 2
    m.ksm.merge_across_nodes = 1
    m.ksm.run = 1
    full_scans(m, 2)
    assert counters(m) == (1, 3, 0, 0)
    assert len({p.pfn(a) for a in (a0, a0 + PAGE_SIZE, a1, a1 + PAGE_SIZE)}) == 1
    m.check_invariants()


def test_h_merge_across_nodes_ebusy_follows_lazy_counters_and_mapped_nodes(
        Machine: type) -> None:
    """merge_across_nodes_store(): "if (ksm_pages_shared || remove_all_stable_nodes())
    err = -EBUSY"; remove_stable_node(): "Page could be still mapped ... Just refuse to
    let merge_across_nodes/max_page_sharing be switched." Hugh Dickins (ksm.txt):
    "merge_across_nodes setting can be changed only when there are no ksm shared pages
    in system".

    (1) pages_shared is lazy: after both mappings of the only KSM page are COW-written
    the write is still EBUSY, until ksmd has visited them. (2) pages_shared is 0 but a
    stable node's page is still mapped (by a forked child ksmd has not reached yet):
    remove_all_stable_nodes() says EBUSY.
    """
    m = numa_machine(Machine, merge_across_nodes=1)
    p = m.spawn()
    k = mergeable(p, A, A)
    full_scans(m, 2)
    p.write(k, b"\x01")
    p.write(k + PAGE_SIZE, b"\x02")
    assert m.ksm.stable_nodes() == []
    assert counters(m) == (1, 1, 0, 0)
    with pytest.raises(OSError) as e:
        m.ksm.merge_across_nodes = 0
    assert e.value.errno == errno.EBUSY
    visit(m)  # k0: its node is stale, removed with both rmap_items
    assert counters(m) == (0, 0, 0, 2)
    m.ksm.merge_across_nodes = 0
    assert m.ksm.merge_across_nodes == 0
    m.check_invariants()

    m2 = numa_machine(Machine, merge_across_nodes=1)
    parent = m2.spawn()
    k = mergeable(parent, A, A)
    z = mergeable(parent, B)
    full_scans(m2, 2)
    kpfn = parent.pfn(k)
    child = parent.fork()
    parent.munmap(k, 2 * PAGE_SIZE)
    visit(m2)  # round 3: the parent's items for k0, k1 are freed on the way to z
    assert m2.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 0)]
    assert counters(m2) == (0, 0, 1, 0)
    with pytest.raises(OSError) as e:
        m2.ksm.merge_across_nodes = 0
    assert e.value.errno == errno.EBUSY
    assert m2.ksm.merge_across_nodes == 1
    assert m2.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 0)]
    m2.check_invariants()
    visit(m2, 2)  # the child's two mappings join the stable node (KSM fork)
    assert m2.ksm.stable_nodes() == [sn(kpfn, 0, "tree", 2)]
    assert counters(m2) == (1, 1, 1, 0)
    assert child.pfn(k) == child.pfn(k + PAGE_SIZE) == kpfn
    assert parent.pfn(z) == child.pfn(z)


# ---- i. memory policy placement


def test_i_mempolicy_placement(Machine: type) -> None:
    """Ric Mason: "For page migratyion stuff, new page is allocated from node *which
    page is migrated to*." Hugh Dickins: "Yes, by definition." Every new frame - first
    touch, COW copy, break_ksm copy, migration target - is allocated on a node the
    model chooses as the kernel does: the VMA's binding, else the policy of the process
    that faults (MPOL_DEFAULT: home node; PREFERRED; BIND: nearest of the set;
    INTERLEAVE: by page number), inherited across fork.
    """
    d = [[10, 20, 20, 15],
         [20, 10, 15, 20],
         [20, 15, 10, 20],
         [15, 20, 20, 10]]
    m = Machine(nodes=4, distances=d)
    assert m.distances == d

    def nodes_of(p: Any, addr: int, n: int) -> list[int]:
        return [nid_at(m, p, addr + i * PAGE_SIZE) for i in range(n)]

    def touched(p: Any, n: int, node: int | None = None) -> int:
        addr = p.mmap(n, node=node)
        p.fill(addr, pages(*([A] * n)))
        return addr

    p = m.spawn(node=0)
    q = m.spawn(node=2)
    assert p.get_mempolicy() == (MPOL_DEFAULT, ())
    assert nodes_of(p, touched(p, 2), 2) == [0, 0]
    assert nodes_of(q, touched(q, 2), 2) == [2, 2]
    p.set_mempolicy(MPOL_PREFERRED, [3])
    assert p.get_mempolicy() == (MPOL_PREFERRED, (3,))
    assert nodes_of(p, touched(p, 2), 2) == [3, 3]
    p.set_mempolicy(MPOL_BIND, [1, 2])  # distances 20 and 20: the lower id
    assert nodes_of(p, touched(p, 1), 1) == [1]
    p.set_mempolicy(MPOL_BIND, [2, 3])  # 20 and 15: node 3
    assert nodes_of(p, touched(p, 1), 1) == [3]
    q.set_mempolicy(MPOL_BIND, [1, 3])  # from node 2: 15 and 20: node 1
    assert nodes_of(q, touched(q, 1), 1) == [1]
    p.set_mempolicy(MPOL_INTERLEAVE, [3, 1])
    assert p.get_mempolicy() == (MPOL_INTERLEAVE, (1, 3))
    il = touched(p, 4)
    assert nodes_of(p, il, 4) == [[1, 3][((il >> 12) + i) % 2] for i in range(4)]
    assert nodes_of(p, touched(p, 2, node=2), 2) == [2, 2]  # the VMA's binding wins
    for mode, nodes in ((MPOL_BIND, []), (MPOL_DEFAULT, [1]), (7, [0]), (MPOL_BIND, [4])):
        with pytest.raises(OSError) as e:
            p.set_mempolicy(mode, nodes)
        assert e.value.errno == errno.EINVAL
    assert p.get_mempolicy() == (MPOL_INTERLEAVE, (1, 3))
    m.check_invariants()

    # COW copies by the faulting process's policy; the policy is inherited by fork
    parent = m.spawn(node=0)
    parent.set_mempolicy(MPOL_PREFERRED, [1])
    a = touched(parent, 3)
    ppfns = [parent.pfn(a + i * PAGE_SIZE) for i in range(3)]
    assert nodes_of(parent, a, 3) == [1, 1, 1]
    child = parent.fork()
    assert child.get_mempolicy() == (MPOL_PREFERRED, (1,)) and child.node == 0
    assert [child.pfn(a + i * PAGE_SIZE) for i in range(3)] == ppfns
    child.write(a, b"x")  # inherited policy: copy on node 1
    child.set_mempolicy(MPOL_DEFAULT, [])
    child.write(a + PAGE_SIZE, b"y")  # default: the home node, 0
    child.set_mempolicy(MPOL_PREFERRED, [2])
    child.write(a + 2 * PAGE_SIZE, b"z")
    assert nodes_of(child, a, 3) == [1, 0, 2]
    assert all(child.pfn(a + i * PAGE_SIZE) != ppfns[i] for i in range(3))
    assert [parent.pfn(a + i * PAGE_SIZE) for i in range(3)] == ppfns
    parent.write(a, b"w")  # mapped once again: written in place
    assert parent.pfn(a) == ppfns[0]
    m.check_invariants()

    # KSM: the COW copy of a KSM page and a break_ksm copy, by the faulter's policy
    m.ksm.run = 1
    r1 = m.spawn(node=0)
    r2 = m.spawn(node=0)
    b1 = mergeable(r1, B)
    b2 = mergeable(r2, B)
    for other in (p, q, parent, child):  # keep the other processes out of KSM's way
        assert other.ksm_stat()["ksm_mergeable"] is False
    full_scans(m, 2)
    kpfn = r1.pfn(b1)
    assert r2.pfn(b2) == kpfn and m.pfn_to_nid(kpfn) == 0
    r2.set_mempolicy(MPOL_PREFERRED, [3])
    r2.write(b2, b"\x00")
    assert nid_at(m, r2, b2) == 3
    r3 = r1.fork()  # shares the KSM page
    r3.set_mempolicy(MPOL_BIND, [2])
    r3.madvise(b1, PAGE_SIZE, MADV_UNMERGEABLE)  # break_ksm in r3
    assert nid_at(m, r3, b1) == 2 and r1.pfn(b1) == kpfn
    new = m.migrate_page(kpfn, 3)  # by definition on the target node
    assert m.pfn_to_nid(new) == 3 and r1.pfn(b1) == new
    assert r1.read(b1, PAGE_SIZE) == bytes([B]) * PAGE_SIZE
    m.check_invariants()


# ---- the migration scenarios: both implementations observe the same


def normalized_nodes(m: Any, procs: list[Any]) -> list[tuple]:
    """stable_nodes() with kpfns replaced by the (process, address) pairs mapping them
    and the node of the frame (pfn values are an implementation detail)."""
    owners: dict[int, list[tuple[int, int]]] = {}
    for i, p in enumerate(procs):
        for start, end, _ in p.maps():
            for addr in range(start, end, PAGE_SIZE):
                pfn = p.pfn(addr)
                if pfn:
                    owners.setdefault(pfn, []).append((i, addr))

    def key(kpfn: int) -> tuple:
        return (m.pfn_to_nid(kpfn), tuple(owners.get(kpfn, ())))

    return [(key(n["kpfn"]), n["nid"], n["where"], n["rmap_hlist_len"],
             tuple(key(c) for c in n.get("chain", ()))) for n in m.ksm.stable_nodes()]


SCENARIOS: dict[str, Callable[[type], tuple[Any, list]]] = {
    "a_replaced": lambda M: scenario_a_replaced_on_visit(M, 0),
    "a_waits": scenario_a_waits_on_migrate_nodes,
    "b_without_page_node": scenario_b_replace_without_page_node,
    "b_with_page_node": scenario_b_replace_with_page_node,
    "c_chain_append": scenario_c_chain_append,
    "c_single_mapping": scenario_c_single_mapping,
    "d_unstable": scenario_d_unstable_wrong_node,
    "e_prune": scenario_e_prune,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenarios_engine_and_reference_agree(name: str) -> None:
    """The engine and the reference observe the same state at the end of each
    migration scenario: counters, ksm_stat, sharing, contents, stable nodes."""
    states = []
    for impl in ("engine", "reference"):
        m, procs = SCENARIOS[name](machine_class(impl))
        states.append((snapshot(m, procs), normalized_nodes(m, procs), per_node(m)))
    assert states[0] == states[1]
