"""Argument checks shared by the engine and the reference, made before any state
changes: integers are checked as integers (``bool`` refused, ``numpy`` integers and
anything else with ``__index__`` accepted: TypeError otherwise), then their ranges
(the kernel's errno where a syscall has one, ValueError elsewhere)."""

from __future__ import annotations

import errno
import operator
from typing import SupportsIndex, cast

from .constants import MPOL_MF_MOVE, MPOL_MF_MOVE_ALL, PAGE_SIZE
from .errors import ksm_error

KTIME_MAX = (1 << 63) - 1  # ktime_t is s64 nanoseconds
U32_MAX = (1 << 32) - 1
MAX_BATCHES = 1 << 20  # do_scans() keeps a row per batch
TASK_SIZE = 1 << 47  # x86-64 user address space (4-level page tables)
# A machine maps at most this many pages over all its processes: mmap beyond it is
# refused with ENOMEM (as the kernel's overcommit heuristic refuses a mapping larger
# than the machine), before anything is allocated. The engine keeps 20 bytes for each
# mapped page from the mmap on, so the default, 256 GiB of mapped memory, costs it up
# to 1.3 GiB; Machine(max_pages=...) sets another limit (ksmcore estimate sets it from
# its sources, after checking the memory the run needs).
MAX_PAGES = 1 << 26


def as_int(value: object, what: str) -> int:
    """``value`` as a Python int: TypeError for bool and for non-integers."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"{what} must be an integer, not a bool")
    try:
        return operator.index(cast(SupportsIndex, value))
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None


def as_node(value: object, nodes: int, what: str = "node") -> int:
    """A NUMA node number of a machine with ``nodes`` nodes: EINVAL out of range."""
    n = as_int(value, what)
    if not 0 <= n < nodes:
        raise ksm_error(errno.EINVAL, f"no NUMA node {n} (the machine has {nodes})")
    return n


def as_opt_node(value: object, nodes: int, what: str = "node") -> int | None:
    return None if value is None else as_node(value, nodes, what)


def as_user_addr(value: object, what: str = "address") -> int:
    """A user address: an integer, EINVAL when negative or past TASK_SIZE (the kernel
    sees a negative address as a huge unsigned one)."""
    addr = as_int(value, what)
    if not 0 <= addr < TASK_SIZE:
        raise ksm_error(errno.EINVAL, f"{what} {addr:#x} is outside the user address space")
    return addr


def as_count(value: object, what: str, maximum: int) -> int:
    """A count in [0, maximum]: ValueError outside."""
    n = as_int(value, what)
    if not 0 <= n <= maximum:
        raise ValueError(f"{what} must be in 0..{maximum}, not {n}")
    return n


def check_clock(ns: int, what: str = "the clock") -> int:
    """A clock value in nanoseconds that ktime_t can hold."""
    if ns > KTIME_MAX:
        raise ValueError(f"{what} would pass ktime_t's range ({KTIME_MAX} ns, about 292 years)")
    return ns


def check_move_pages(addr: object, npages: object, node: object, flags: object,
                     nodes: int) -> tuple[int, int, int, int]:
    """move_pages(2)'s arguments, in the order the models check them: flags, node,
    then a page-aligned, non-negative address and count (EINVAL)."""
    flags = as_int(flags, "flags")
    if flags & ~(MPOL_MF_MOVE | MPOL_MF_MOVE_ALL) or not flags:
        raise ksm_error(errno.EINVAL, f"bad move_pages flags {flags:#x}")
    node = as_node(node, nodes)
    addr = as_int(addr, "address")
    npages = as_int(npages, "npages")
    if addr < 0 or addr % PAGE_SIZE or npages < 0:
        raise ksm_error(errno.EINVAL, "move_pages takes a page-aligned address and a count")
    return addr, npages, node, flags
