"""NUMA topology and memory policy, shared by the engine and the reference: which node
a fault allocates on (docs/MODEL.md, "NUMA")."""

from __future__ import annotations

import errno
from collections.abc import Sequence

from .constants import MPOL_BIND, MPOL_DEFAULT, MPOL_INTERLEAVE, MPOL_PREFERRED, PAGE_SHIFT
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


def check_policy(nodes: int, mode: int, policy_nodes: Sequence[int]) -> tuple[int, ...]:
    """The node set of a valid set_mempolicy(mode, nodes), or OSError(EINVAL)."""
    ns = tuple(int(n) for n in policy_nodes)
    if len(set(ns)) != len(ns) or any(not 0 <= n < nodes for n in ns):
        raise ksm_error(errno.EINVAL, f"bad node set {ns} for {nodes} nodes")
    if mode == MPOL_DEFAULT and not ns:
        return ()
    if mode == MPOL_PREFERRED and len(ns) == 1:
        return ns
    if mode in (MPOL_BIND, MPOL_INTERLEAVE) and ns:
        return tuple(sorted(ns))
    raise ksm_error(errno.EINVAL, f"bad memory policy mode {mode} with nodes {ns}")


def policy_node(
    mode: int, policy_nodes: tuple[int, ...], home: int, distances: list[list[int]], addr: int
) -> int:
    """The node a fault at ``addr`` allocates on under a process's policy."""
    if mode == MPOL_DEFAULT:
        return home
    if mode == MPOL_PREFERRED:
        return policy_nodes[0]
    if mode == MPOL_BIND:
        return min(policy_nodes, key=lambda n: (distances[home][n], n))
    return policy_nodes[(addr >> PAGE_SHIFT) % len(policy_nodes)]  # MPOL_INTERLEAVE
