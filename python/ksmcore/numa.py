"""NUMA topology and memory policy, shared by the engine and the reference: which node
a fault allocates on (docs/MODEL.md, "NUMA")."""

from __future__ import annotations

import errno
from collections.abc import Sequence

from .checks import as_int
from .constants import (
    MPOL_BIND,
    MPOL_DEFAULT,
    MPOL_INTERLEAVE,
    MPOL_LOCAL,
    MPOL_PREFERRED,
    MPOL_PREFERRED_MANY,
    MPOL_WEIGHTED_INTERLEAVE,
    PAGE_SHIFT,
)
from .errors import ksm_error


def default_distances(nodes: int) -> list[list[int]]:
    """numactl -H's matrix of an unconfigured machine: 10 locally, 20 remotely."""
    return [[10 if i == j else 20 for j in range(nodes)] for i in range(nodes)]


def check_distances(nodes: int, distances: Sequence[Sequence[int]] | None) -> list[list[int]]:
    if distances is None:
        return default_distances(nodes)
    rows = [list(map(int, row)) for row in distances]
    if len(rows) != nodes or any(len(r) != nodes for r in rows):
        raise ksm_error(errno.EINVAL, f"distances must be a {nodes}x{nodes} matrix")
    if any(rows[i][i] != 10 for i in range(nodes)) or any(d < 10 for r in rows for d in r):
        raise ksm_error(errno.EINVAL, "distances: 10 on the diagonal, at least 10 elsewhere")
    return rows


def check_policy(nodes: int, mode: int, policy_nodes: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """set_mempolicy(mode, nodes) as mpol_new() normalizes it, or OSError(EINVAL).

    MPOL_PREFERRED with no node is MPOL_LOCAL and with several keeps the first;
    MPOL_DEFAULT and MPOL_LOCAL take no node; the others need at least one.
    """
    mode = as_int(mode, "mode")
    ns = tuple(sorted(set(as_int(n, "a node") for n in policy_nodes)))
    if any(not 0 <= n < nodes for n in ns):
        raise ksm_error(errno.EINVAL, f"bad node set {tuple(policy_nodes)} for {nodes} nodes")
    if mode in (MPOL_DEFAULT, MPOL_LOCAL) and not ns:
        return mode, ()
    if mode == MPOL_PREFERRED:
        return (MPOL_PREFERRED, ns[:1]) if ns else (MPOL_LOCAL, ())
    if mode in (MPOL_BIND, MPOL_INTERLEAVE, MPOL_PREFERRED_MANY, MPOL_WEIGHTED_INTERLEAVE) and ns:
        return mode, ns
    raise ksm_error(errno.EINVAL, f"bad memory policy mode {mode} with nodes {tuple(policy_nodes)}")


def policy_node(
    mode: int, policy_nodes: tuple[int, ...], home: int, distances: list[list[int]], addr: int
) -> int:
    """The node a fault at ``addr`` allocates on under a process's policy."""
    if mode in (MPOL_DEFAULT, MPOL_LOCAL):
        return home
    if mode == MPOL_PREFERRED:
        return policy_nodes[0]
    if mode in (MPOL_BIND, MPOL_PREFERRED_MANY):
        return min(policy_nodes, key=lambda n: (distances[home][n], n))
    # MPOL_INTERLEAVE, and MPOL_WEIGHTED_INTERLEAVE with its default weights (all 1)
    return policy_nodes[(addr >> PAGE_SHIFT) % len(policy_nodes)]
