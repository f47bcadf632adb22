"""The reference's port of lib/rbtree.c: order, red-black properties and exact shapes."""

from __future__ import annotations

import random

import pytest

from ksmcore.reference.rbtree import (
    RB_BLACK,
    RB_RED,
    RbNode,
    RbRoot,
    rb_check,
    rb_erase,
    rb_first,
    rb_insert_color,
    rb_link_node,
    rb_next,
    rb_replace_node,
)


class Key(RbNode):
    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key


def insert(root: RbRoot, key: int) -> Key:
    """The caller's walk, as mm/ksm.c does it, then rb_link_node + rb_insert_color."""
    node = Key(key)
    parent = None
    left = False
    cur = root.rb_node
    while cur is not None:
        assert isinstance(cur, Key)
        parent = cur
        if key < cur.key:
            cur, left = cur.rb_left, True
        else:
            cur, left = cur.rb_right, False
    rb_link_node(node, parent, left, root)
    rb_insert_color(node, root)
    return node


def keys(root: RbRoot) -> list[int]:
    out = []
    node = rb_first(root)
    while node is not None:
        assert isinstance(node, Key)
        out.append(node.key)
        node = rb_next(node)
    return out


def shape(node: RbNode | None) -> object:
    """(key, colour, left, right), colour as 'R'/'B'."""
    if node is None:
        return None
    assert isinstance(node, Key)
    return (node.key, "R" if node.rb_color == RB_RED else "B",
            shape(node.rb_left), shape(node.rb_right))


def build(seq: list[int]) -> tuple[RbRoot, dict[int, Key]]:
    root = RbRoot()
    nodes = {k: insert(root, k) for k in seq}
    return root, nodes


# ---- hand-checked shapes -------------------------------------------------------------


def test_insert_ascending_1_to_7() -> None:
    # 1; 2 red under 1; 3 -> left rotate at 1 (case 3); 4 -> colour flip up to the
    # root; 5 -> rotate at 3; 6 -> flip (4 turns red); 7 -> rotate at 5.
    root, _ = build([1, 2, 3, 4, 5, 6, 7])
    assert shape(root.rb_node) == (
        2, "B",
        (1, "B", None, None),
        (4, "R",
         (3, "B", None, None),
         (6, "B", (5, "R", None, None), (7, "R", None, None))),
    )
    assert rb_check(root) == 2


def test_insert_8_recolours_then_rotates_at_the_root() -> None:
    root, _ = build([1, 2, 3, 4, 5, 6, 7, 8])
    # 8: flip at 6 makes 6 red under red 4; 4 is 2's right-right: left rotate at 2.
    assert shape(root.rb_node) == (
        4, "B",
        (2, "R", (1, "B", None, None), (3, "B", None, None)),
        (6, "R", (5, "B", None, None), (7, "B", None, (8, "R", None, None))),
    )


def test_insert_descending_mirrors() -> None:
    root, _ = build([7, 6, 5, 4, 3, 2, 1])
    assert shape(root.rb_node) == (
        6, "B",
        (4, "R",
         (2, "B", (1, "R", None, None), (3, "R", None, None)),
         (5, "B", None, None)),
        (7, "B", None, None),
    )


def test_insert_zigzag_uses_case_2() -> None:
    # 3, 1, 2: 2 is the right child of red 1 -> rotate at 1 then at 3.
    root, _ = build([3, 1, 2])
    assert shape(root.rb_node) == (2, "B", (1, "R", None, None), (3, "R", None, None))


def test_erase_black_leaf_rebalances() -> None:
    root, nodes = build([1, 2, 3, 4, 5, 6, 7])
    rb_erase(nodes[1], root)
    # ____rb_erase_color at 2: sibling 4 red -> case 1 (rotate at 2), then case 2
    # recolours 3 red and 2 (red) black.
    assert shape(root.rb_node) == (
        4, "B",
        (2, "B", None, (3, "R", None, None)),
        (6, "B", (5, "R", None, None), (7, "R", None, None)),
    )


def test_erase_with_two_children_takes_the_successor() -> None:
    root, nodes = build([1, 2, 3, 4, 5, 6, 7])
    rb_erase(nodes[4], root)
    # Successor 5 is leftmost under 6 (case 3); 5 was red: no rebalance.
    assert shape(root.rb_node) == (
        2, "B",
        (1, "B", None, None),
        (5, "R", (3, "B", None, None), (6, "B", None, (7, "R", None, None))),
    )


def test_erase_successor_is_right_child() -> None:
    root, nodes = build([1, 2, 3, 4, 5, 6, 7])
    rb_erase(nodes[6], root)
    # 6's right child 7 is its successor (case 2); 7 takes 6's place and colour,
    # and since 7 was red there is no rebalance.
    assert shape(root.rb_node) == (
        2, "B",
        (1, "B", None, None),
        (4, "R", (3, "B", None, None), (7, "B", (5, "R", None, None), None)),
    )


def test_erase_root_of_three() -> None:
    root, nodes = build([2, 1, 3])
    rb_erase(nodes[2], root)
    assert shape(root.rb_node) == (3, "B", (1, "R", None, None), None)


def test_replace_node_keeps_shape() -> None:
    root, nodes = build([1, 2, 3, 4, 5, 6, 7])
    before = shape(root.rb_node)
    new = Key(4)
    rb_replace_node(nodes[4], new, root)
    assert shape(root.rb_node) == before
    assert root.rb_node is not None and root.rb_node.rb_right is new
    assert new.rb_left is nodes[3] and nodes[3].rb_parent is new
    assert new.rb_right is nodes[6] and nodes[6].rb_parent is new
    rb_check(root)
    # Replacing the root updates root.rb_node.
    new_root = Key(2)
    rb_replace_node(nodes[2], new_root, root)
    assert root.rb_node is new_root and new_root.rb_color == RB_BLACK
    rb_check(root)


# ---- an independent textbook red-black tree (CLRS, with a sentinel) ----------------
# lib/rbtree.c is the CLRS algorithm with the same rotations and successor choice,
# so after any sequence the two must have identical shapes and colours.


class _C:
    __slots__ = ("key", "red", "left", "right", "p")

    def __init__(self, key: int, nil: _C | None) -> None:
        self.key = key
        self.red = False
        self.left = self.right = self.p = nil  # type: ignore[assignment]


class Clrs:
    def __init__(self) -> None:
        self.nil = _C(0, None)
        self.nil.left = self.nil.right = self.nil.p = self.nil
        self.root = self.nil

    def _rotate_left(self, x: _C) -> None:
        y = x.right
        x.right = y.left
        if y.left is not self.nil:
            y.left.p = x
        y.p = x.p
        if x.p is self.nil:
            self.root = y
        elif x is x.p.left:
            x.p.left = y
        else:
            x.p.right = y
        y.left = x
        x.p = y

    def _rotate_right(self, x: _C) -> None:
        y = x.left
        x.left = y.right
        if y.right is not self.nil:
            y.right.p = x
        y.p = x.p
        if x.p is self.nil:
            self.root = y
        elif x is x.p.right:
            x.p.right = y
        else:
            x.p.left = y
        y.right = x
        x.p = y

    def insert(self, key: int) -> _C:
        z = _C(key, self.nil)
        y, x = self.nil, self.root
        while x is not self.nil:
            y = x
            x = x.left if key < x.key else x.right
        z.p = y
        if y is self.nil:
            self.root = z
        elif key < y.key:
            y.left = z
        else:
            y.right = z
        z.red = True
        new = z
        while z.p.red:
            if z.p is z.p.p.left:
                y = z.p.p.right
                if y.red:
                    z.p.red = y.red = False
                    z.p.p.red = True
                    z = z.p.p
                else:
                    if z is z.p.right:
                        z = z.p
                        self._rotate_left(z)
                    z.p.red = False
                    z.p.p.red = True
                    self._rotate_right(z.p.p)
            else:
                y = z.p.p.left
                if y.red:
                    z.p.red = y.red = False
                    z.p.p.red = True
                    z = z.p.p
                else:
                    if z is z.p.left:
                        z = z.p
                        self._rotate_right(z)
                    z.p.red = False
                    z.p.p.red = True
                    self._rotate_left(z.p.p)
        self.root.red = False
        return new

    def _transplant(self, u: _C, v: _C) -> None:
        if u.p is self.nil:
            self.root = v
        elif u is u.p.left:
            u.p.left = v
        else:
            u.p.right = v
        v.p = u.p

    def delete(self, z: _C) -> None:
        y = z
        y_red = y.red
        if z.left is self.nil:
            x = z.right
            self._transplant(z, z.right)
        elif z.right is self.nil:
            x = z.left
            self._transplant(z, z.left)
        else:
            y = z.right
            while y.left is not self.nil:
                y = y.left
            y_red = y.red
            x = y.right
            if y.p is z:
                x.p = y
            else:
                self._transplant(y, y.right)
                y.right = z.right
                y.right.p = y
            self._transplant(z, y)
            y.left = z.left
            y.left.p = y
            y.red = z.red
        if not y_red:
            self._fixup(x)

    def _fixup(self, x: _C) -> None:
        while x is not self.root and not x.red:
            if x is x.p.left:
                w = x.p.right
                if w.red:
                    w.red = False
                    x.p.red = True
                    self._rotate_left(x.p)
                    w = x.p.right
                if not w.left.red and not w.right.red:
                    w.red = True
                    x = x.p
                else:
                    if not w.right.red:
                        w.left.red = False
                        w.red = True
                        self._rotate_right(w)
                        w = x.p.right
                    w.red = x.p.red
                    x.p.red = False
                    w.right.red = False
                    self._rotate_left(x.p)
                    x = self.root
            else:
                w = x.p.left
                if w.red:
                    w.red = False
                    x.p.red = True
                    self._rotate_right(x.p)
                    w = x.p.left
                if not w.right.red and not w.left.red:
                    w.red = True
                    x = x.p
                else:
                    if not w.left.red:
                        w.right.red = False
                        w.red = True
                        self._rotate_left(w)
                        w = x.p.left
                    w.red = x.p.red
                    x.p.red = False
                    w.left.red = False
                    self._rotate_right(x.p)
                    x = self.root
        x.red = False

    def shape(self, n: _C | None = None) -> object:
        n = self.root if n is None else n
        if n is self.nil:
            return None
        return (n.key, "R" if n.red else "B", self.shape_or_none(n.left),
                self.shape_or_none(n.right))

    def shape_or_none(self, n: _C) -> object:
        return None if n is self.nil else self.shape(n)


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences_match_textbook_and_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    root = RbRoot()
    clrs = Clrs()
    mine: dict[int, Key] = {}
    theirs: dict[int, _C] = {}
    for step in range(600):
        if mine and rng.random() < 0.45:
            k = rng.choice(sorted(mine))
            rb_erase(mine.pop(k), root)
            clrs.delete(theirs.pop(k))
        else:
            k = rng.randrange(10_000)
            if k in mine:
                continue
            mine[k] = insert(root, k)
            theirs[k] = clrs.insert(k)
        assert keys(root) == sorted(mine)  # brute-force in-order check
        rb_check(root)
        if step % 10 == 0 or len(mine) < 20:
            assert shape(root.rb_node) == clrs.shape_or_none(clrs.root)
    assert shape(root.rb_node) == clrs.shape_or_none(clrs.root)


def test_rb_check_catches_broken_trees() -> None:
    root, nodes = build([1, 2, 3, 4, 5, 6, 7])
    nodes[4].rb_color = RB_BLACK  # black heights now differ
    with pytest.raises(AssertionError, match="black heights"):
        rb_check(root)
    nodes[4].rb_color = RB_RED
    nodes[6].rb_color = RB_RED  # red 6 under red 4
    with pytest.raises(AssertionError, match="red"):
        rb_check(root)


def test_duplicate_keys_keep_insertion_order_to_the_right() -> None:
    # Callers send equal keys right (like a walk that never finds equality);
    # the in-order walk then lists them in insertion order.
    root = RbRoot()
    made = [insert(root, 5) for _ in range(9)]
    walked = []
    node = rb_first(root)
    while node is not None:
        walked.append(node)
        node = rb_next(node)
    assert walked == made
    rb_check(root)
