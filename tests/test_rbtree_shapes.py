"""The C core's red-black tree and the reference's keep the same shape (lib/rbtree.c's)
after any sequence of insertions, erasures and replacements.

The shape matters: with contents changing under the unstable tree, which pages a walk
meets depends on it, so both implementations must rebalance exactly as the kernel.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ksmcore._native import ffi, lib
from ksmcore.engine.invariants import rb_color, rb_parent
from ksmcore.reference import rbtree as prb

NIL = -1
CAP = 512


class CTree:
    def __init__(self) -> None:
        self.nodes = ffi.new("struct ksm_rbnode[]", CAP)
        self.root = ffi.new("int32_t *", NIL)
        self.key: dict[int, int] = {}

    def insert(self, idx: int, key: int) -> None:
        parent, link = NIL, self.root
        while link[0] != NIL:
            parent = link[0]
            n = self.nodes[parent]
            link = ffi.addressof(n, "left") if key < self.key[parent] else ffi.addressof(n, "right")
        self.key[idx] = key
        lib.ksm_rb_link_node(self.nodes, idx, parent, link)
        lib.ksm_rb_insert_color(self.nodes, idx, self.root)

    def erase(self, idx: int) -> None:
        lib.ksm_rb_erase(self.nodes, idx, self.root)
        del self.key[idx]

    def replace(self, victim: int, new: int) -> None:
        lib.ksm_rb_replace_node(self.nodes, victim, new, self.root)
        self.key[new] = self.key.pop(victim)

    def shape(self, i: int | None = None, parent: int = NIL) -> Any:
        i = self.root[0] if i is None else i
        if i == NIL:
            return None
        n = self.nodes[i]
        assert rb_parent(n) == parent  # the parent packed with the colour
        return (self.key[i], rb_color(n), self.shape(n.left, i), self.shape(n.right, i))

    def inorder(self) -> list[int]:
        out, i = [], lib.ksm_rb_first(self.nodes, self.root[0])
        while i != NIL:
            out.append(self.key[i])
            i = lib.ksm_rb_next(self.nodes, i)
        return out


class PyTree:
    def __init__(self) -> None:
        self.root = prb.RbRoot()
        self.node: dict[int, prb.RbNode] = {}
        self.key: dict[int, int] = {}  # id(node) -> key

    def insert(self, idx: int, key: int) -> None:
        node = prb.RbNode()
        parent, left, cur = None, False, self.root.rb_node
        while cur is not None:
            parent = cur
            left = key < self.key[id(cur)]
            cur = cur.rb_left if left else cur.rb_right
        self.node[idx] = node
        self.key[id(node)] = key
        prb.rb_link_node(node, parent, left, self.root)
        prb.rb_insert_color(node, self.root)

    def erase(self, idx: int) -> None:
        prb.rb_erase(self.node.pop(idx), self.root)

    def replace(self, victim: int, new: int) -> None:
        node = prb.RbNode()
        old = self.node.pop(victim)
        self.key[id(node)] = self.key[id(old)]
        self.node[new] = node
        prb.rb_replace_node(old, node, self.root)

    def shape(self, n: prb.RbNode | None = "root") -> Any:  # type: ignore[assignment]
        n = self.root.rb_node if n == "root" else n
        if n is None:
            return None
        return (self.key[id(n)], n.rb_color, self.shape(n.rb_left), self.shape(n.rb_right))


ops = st.lists(st.tuples(st.sampled_from("iiiier"), st.integers(0, 10**6)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_same_shape_as_reference(ops: list[tuple[str, int]]) -> None:
    c, p = CTree(), PyTree()
    next_idx = 0
    live: list[int] = []
    for op, x in ops:
        if op == "i" and next_idx < CAP:
            key = x % 1000 * 1000 + next_idx  # distinct keys
            c.insert(next_idx, key)
            p.insert(next_idx, key)
            live.append(next_idx)
            next_idx += 1
        elif op == "e" and live:
            idx = live.pop(x % len(live))
            c.erase(idx)
            p.erase(idx)
        elif op == "r" and live and next_idx < CAP:
            j = x % len(live)
            c.replace(live[j], next_idx)
            p.replace(live[j], next_idx)
            live[j] = next_idx
            next_idx += 1
        assert c.shape() == p.shape()
        assert c.inorder() == sorted(c.key.values())


def test_ascending_inserts_shape() -> None:
    """Inserting 1..7 in order: lib/rbtree.c ends with 2 at the root, 4 red, 6 black."""
    c = CTree()
    for i in range(7):
        c.insert(i, i + 1)
    key, color, left, right = c.shape()
    assert (key, color) == (2, 1)
    assert (left[0], left[1]) == (1, 1)
    assert (right[0], right[1]) == (4, 0)
    assert (right[2][0], right[3][0]) == (3, 6)
