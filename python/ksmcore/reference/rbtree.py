"""A red-black tree ported line by line from Linux ``lib/rbtree.c``.

KSM's unstable tree is walked while the contents it is ordered by change under it,
so which node a walk meets depends on the tree's *shape*. This port keeps the
kernel's exact rebalancing (``__rb_insert``, ``__rb_erase_augmented`` without
augmentation, ``____rb_erase_color``, ``rb_replace_node``) so that the shape after
any sequence of operations is the kernel's.

As in the kernel, nodes are embedded: ``rmap_item`` and ``stable_node`` inherit
from :class:`RbNode`, and callers do their own search walks, ending with
:func:`rb_link_node` and :func:`rb_insert_color`.
"""

from __future__ import annotations

from collections.abc import Iterator

RB_RED = 0
RB_BLACK = 1


class RbNode:
    """``struct rb_node``: the parent pointer and colour kept apart (no bit packing)."""

    __slots__ = ("rb_parent", "rb_left", "rb_right", "rb_color")

    def __init__(self) -> None:
        self.rb_parent: RbNode | None = None
        self.rb_left: RbNode | None = None
        self.rb_right: RbNode | None = None
        self.rb_color: int = RB_RED


class RbRoot:
    """``struct rb_root``."""

    __slots__ = ("rb_node",)

    def __init__(self) -> None:
        self.rb_node: RbNode | None = None

    def __iter__(self) -> Iterator[RbNode]:
        """In-order walk (rb_first / rb_next)."""
        node = rb_first(self)
        while node is not None:
            yield node
            node = rb_next(node)


def _set_parent_color(node: RbNode, parent: RbNode | None, color: int) -> None:
    node.rb_parent = parent
    node.rb_color = color


def _change_child(old: RbNode, new: RbNode | None, parent: RbNode | None, root: RbRoot) -> None:
    """``__rb_change_child``."""
    if parent is not None:
        if parent.rb_left is old:
            parent.rb_left = new
        else:
            parent.rb_right = new
    else:
        root.rb_node = new


def _rotate_set_parents(old: RbNode, new: RbNode, root: RbRoot, color: int) -> None:
    """``__rb_rotate_set_parents``: old's parent and colour go to new; old gets new and color."""
    parent = old.rb_parent
    new.rb_parent = old.rb_parent
    new.rb_color = old.rb_color
    _set_parent_color(old, new, color)
    _change_child(old, new, parent, root)


def rb_link_node(node: RbNode, parent: RbNode | None, left: bool, root: RbRoot) -> None:
    """``rb_link_node(node, parent, link)``: link is root if parent is None, else parent's
    left (``left=True``) or right child slot. The node starts red with no children."""
    node.rb_parent = parent
    node.rb_color = RB_RED
    node.rb_left = None
    node.rb_right = None
    if parent is None:
        root.rb_node = node
    elif left:
        parent.rb_left = node
    else:
        parent.rb_right = node


def rb_insert_color(node: RbNode, root: RbRoot) -> None:
    """``__rb_insert``: rebalance after rb_link_node."""
    parent = node.rb_parent
    while True:
        # Loop invariant: node is red.
        if parent is None:
            _set_parent_color(node, None, RB_BLACK)
            break
        if parent.rb_color == RB_BLACK:
            break
        gparent = parent.rb_parent
        assert gparent is not None  # a red parent is never the root
        tmp = gparent.rb_right
        if parent is not tmp:  # parent == gparent.rb_left
            if tmp is not None and tmp.rb_color == RB_RED:
                # Case 1 - colour flips, then recurse at gparent.
                _set_parent_color(tmp, gparent, RB_BLACK)
                _set_parent_color(parent, gparent, RB_BLACK)
                node = gparent
                parent = node.rb_parent
                _set_parent_color(node, parent, RB_RED)
                continue
            tmp = parent.rb_right
            if node is tmp:
                # Case 2 - left rotate at parent.
                tmp = node.rb_left
                parent.rb_right = tmp
                node.rb_left = parent
                if tmp is not None:
                    _set_parent_color(tmp, parent, RB_BLACK)
                _set_parent_color(parent, node, RB_RED)
                parent = node
                tmp = node.rb_right
            # Case 3 - right rotate at gparent.
            gparent.rb_left = tmp
            parent.rb_right = gparent
            if tmp is not None:
                _set_parent_color(tmp, gparent, RB_BLACK)
            _rotate_set_parents(gparent, parent, root, RB_RED)
            break
        else:
            tmp = gparent.rb_left
            if tmp is not None and tmp.rb_color == RB_RED:
                # Case 1 - colour flips.
                _set_parent_color(tmp, gparent, RB_BLACK)
                _set_parent_color(parent, gparent, RB_BLACK)
                node = gparent
                parent = node.rb_parent
                _set_parent_color(node, parent, RB_RED)
                continue
            tmp = parent.rb_left
            if node is tmp:
                # Case 2 - right rotate at parent.
                tmp = node.rb_right
                parent.rb_left = tmp
                node.rb_right = parent
                if tmp is not None:
                    _set_parent_color(tmp, parent, RB_BLACK)
                _set_parent_color(parent, node, RB_RED)
                parent = node
                tmp = node.rb_left
            # Case 3 - left rotate at gparent.
            gparent.rb_right = tmp
            parent.rb_left = gparent
            if tmp is not None:
                _set_parent_color(tmp, gparent, RB_BLACK)
            _rotate_set_parents(gparent, parent, root, RB_RED)
            break


def _erase_color(parent: RbNode, root: RbRoot) -> None:
    """``____rb_erase_color``: fix a black-height deficit on the path through parent."""
    node: RbNode | None = None
    while True:
        # Invariants: node is black (or None on the first pass) and not the root.
        sibling = parent.rb_right
        if node is not sibling:  # node == parent.rb_left
            assert sibling is not None
            if sibling.rb_color == RB_RED:
                # Case 1 - left rotate at parent.
                tmp1 = sibling.rb_left
                assert tmp1 is not None
                parent.rb_right = tmp1
                sibling.rb_left = parent
                _set_parent_color(tmp1, parent, RB_BLACK)
                _rotate_set_parents(parent, sibling, root, RB_RED)
                sibling = tmp1
            tmp1 = sibling.rb_right
            if tmp1 is None or tmp1.rb_color == RB_BLACK:
                tmp2 = sibling.rb_left
                if tmp2 is None or tmp2.rb_color == RB_BLACK:
                    # Case 2 - sibling colour flip.
                    _set_parent_color(sibling, parent, RB_RED)
                    if parent.rb_color == RB_RED:
                        parent.rb_color = RB_BLACK
                    else:
                        node = parent
                        up = node.rb_parent
                        if up is not None:
                            parent = up
                            continue
                    break
                # Case 3 - right rotate at sibling.
                tmp1 = tmp2.rb_right
                sibling.rb_left = tmp1
                tmp2.rb_right = sibling
                parent.rb_right = tmp2
                if tmp1 is not None:
                    _set_parent_color(tmp1, sibling, RB_BLACK)
                tmp1 = sibling
                sibling = tmp2
            # Case 4 - left rotate at parent + colour flips.
            tmp2 = sibling.rb_left
            parent.rb_right = tmp2
            sibling.rb_left = parent
            _set_parent_color(tmp1, sibling, RB_BLACK)
            if tmp2 is not None:
                tmp2.rb_parent = parent
            _rotate_set_parents(parent, sibling, root, RB_BLACK)
            break
        else:
            sibling = parent.rb_left
            assert sibling is not None
            if sibling.rb_color == RB_RED:
                # Case 1 - right rotate at parent.
                tmp1 = sibling.rb_right
                assert tmp1 is not None
                parent.rb_left = tmp1
                sibling.rb_right = parent
                _set_parent_color(tmp1, parent, RB_BLACK)
                _rotate_set_parents(parent, sibling, root, RB_RED)
                sibling = tmp1
            tmp1 = sibling.rb_left
            if tmp1 is None or tmp1.rb_color == RB_BLACK:
                tmp2 = sibling.rb_right
                if tmp2 is None or tmp2.rb_color == RB_BLACK:
                    # Case 2 - sibling colour flip.
                    _set_parent_color(sibling, parent, RB_RED)
                    if parent.rb_color == RB_RED:
                        parent.rb_color = RB_BLACK
                    else:
                        node = parent
                        up = node.rb_parent
                        if up is not None:
                            parent = up
                            continue
                    break
                # Case 3 - left rotate at sibling.
                tmp1 = tmp2.rb_left
                sibling.rb_right = tmp1
                tmp2.rb_left = sibling
                parent.rb_left = tmp2
                if tmp1 is not None:
                    _set_parent_color(tmp1, sibling, RB_BLACK)
                tmp1 = sibling
                sibling = tmp2
            # Case 4 - right rotate at parent + colour flips.
            tmp2 = sibling.rb_right
            parent.rb_left = tmp2
            sibling.rb_right = parent
            _set_parent_color(tmp1, sibling, RB_BLACK)
            if tmp2 is not None:
                tmp2.rb_parent = parent
            _rotate_set_parents(parent, sibling, root, RB_BLACK)
            break


def rb_erase(node: RbNode, root: RbRoot) -> None:
    """``rb_erase``: ``__rb_erase_augmented`` with dummy callbacks, then ``____rb_erase_color``."""
    child = node.rb_right
    tmp = node.rb_left
    rebalance: RbNode | None
    if tmp is None:
        # Case 1: at most one child (the right one).
        pc_parent, pc_color = node.rb_parent, node.rb_color
        parent = pc_parent
        _change_child(node, child, parent, root)
        if child is not None:
            child.rb_parent, child.rb_color = pc_parent, pc_color
            rebalance = None
        else:
            rebalance = parent if pc_color == RB_BLACK else None
    elif child is None:
        # Still case 1, but the child is node.rb_left.
        tmp.rb_parent, tmp.rb_color = node.rb_parent, node.rb_color
        parent = node.rb_parent
        _change_child(node, tmp, parent, root)
        rebalance = None
    else:
        successor = child
        tmp = child.rb_left
        if tmp is None:
            # Case 2: node's successor is its right child.
            parent = successor
            child2 = successor.rb_right
        else:
            # Case 3: the successor is leftmost under node's right child.
            while True:
                parent = successor
                successor = tmp
                tmp = tmp.rb_left
                if tmp is None:
                    break
            child2 = successor.rb_right
            parent.rb_left = child2
            successor.rb_right = child
            child.rb_parent = successor
        tmp = node.rb_left
        assert tmp is not None  # a node with two children
        successor.rb_left = tmp
        tmp.rb_parent = successor
        pc_parent, pc_color = node.rb_parent, node.rb_color
        _change_child(node, successor, pc_parent, root)
        if child2 is not None:
            successor.rb_parent, successor.rb_color = pc_parent, pc_color
            _set_parent_color(child2, parent, RB_BLACK)
            rebalance = None
        else:
            pc2_color = successor.rb_color
            successor.rb_parent, successor.rb_color = pc_parent, pc_color
            rebalance = parent if pc2_color == RB_BLACK else None
    if rebalance is not None:
        _erase_color(rebalance, root)


def rb_replace_node(victim: RbNode, new: RbNode, root: RbRoot) -> None:
    """``rb_replace_node``: new takes victim's place, colour and children."""
    parent = victim.rb_parent
    new.rb_parent = victim.rb_parent
    new.rb_left = victim.rb_left
    new.rb_right = victim.rb_right
    new.rb_color = victim.rb_color
    if victim.rb_left is not None:
        victim.rb_left.rb_parent = new
    if victim.rb_right is not None:
        victim.rb_right.rb_parent = new
    _change_child(victim, new, parent, root)


def rb_first(root: RbRoot) -> RbNode | None:
    node = root.rb_node
    if node is None:
        return None
    while node.rb_left is not None:
        node = node.rb_left
    return node


def rb_next(node: RbNode) -> RbNode | None:
    if node.rb_right is not None:
        node = node.rb_right
        while node.rb_left is not None:
            node = node.rb_left
        return node
    parent = node.rb_parent
    while parent is not None and node is parent.rb_right:
        node = parent
        parent = node.rb_parent
    return parent


def rb_check(root: RbRoot) -> int:
    """Check the red-black properties and parent links; return the black height.

    Raises AssertionError naming the broken property.
    """
    top = root.rb_node
    if top is None:
        return 0
    if top.rb_parent is not None:
        raise AssertionError("rbtree: root has a parent")
    if top.rb_color != RB_BLACK:
        raise AssertionError("rbtree: root is red")
    # Iterative post-order to survive deep (corrupt) trees without recursion limits.
    heights: dict[int, int] = {}
    stack: list[tuple[RbNode, bool]] = [(top, False)]
    while stack:
        node, done = stack.pop()
        if not done:
            stack.append((node, True))
            for kid in (node.rb_left, node.rb_right):
                if kid is not None:
                    if kid.rb_parent is not node:
                        raise AssertionError("rbtree: child's parent pointer is wrong")
                    if node.rb_color == RB_RED and kid.rb_color == RB_RED:
                        raise AssertionError("rbtree: red node with a red child")
                    stack.append((kid, False))
            continue
        hl = heights.pop(id(node.rb_left), 0) if node.rb_left is not None else 0
        hr = heights.pop(id(node.rb_right), 0) if node.rb_right is not None else 0
        if hl != hr:
            raise AssertionError("rbtree: unequal black heights")
        heights[id(node)] = hl + (1 if node.rb_color == RB_BLACK else 0)
    return heights[id(top)]
