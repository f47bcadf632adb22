"""Bad input gets a clear exception with the kernel's errno and changes nothing."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ksmcore.constants import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE

from observe import snapshot


def setup(Machine: type) -> tuple[Any, list[Any], int]:
    m = Machine()
    p = m.spawn()
    addr = p.mmap(4)
    p.fill(addr, np.full((4, PAGE_SIZE), 7, np.uint8))
    p.madvise(addr, 4 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    return m, [p], addr


CASES: list[tuple[str, Callable[[Any, Any, int], Any], type, int | None]] = [
    ("write unmapped", lambda m, p, a: p.write(a - PAGE_SIZE, b"x"), OSError, errno.EFAULT),
    ("write past the end", lambda m, p, a: p.write(a + 4 * PAGE_SIZE - 2, b"xyz"), OSError,
     errno.EFAULT),
    ("read unmapped", lambda m, p, a: p.read(a + 5 * PAGE_SIZE, 1), OSError, errno.EFAULT),
    ("fill past the end", lambda m, p, a: p.fill(a + PAGE_SIZE, np.zeros((4, PAGE_SIZE),
                                                                         np.uint8)),
     OSError, errno.EFAULT),
    ("fill bad shape", lambda m, p, a: p.fill(a, np.zeros((4, 100), np.uint8)), ValueError, None),
    ("fill bad dtype", lambda m, p, a: p.fill(a, np.zeros((1, PAGE_SIZE), np.int32)), ValueError,
     None),
    ("madvise unaligned", lambda m, p, a: p.madvise(a + 1, PAGE_SIZE, MADV_UNMERGEABLE), OSError,
     errno.EINVAL),
    ("madvise hole", lambda m, p, a: p.madvise(a, 6 * PAGE_SIZE, MADV_UNMERGEABLE), OSError,
     errno.ENOMEM),
    ("madvise bad advice", lambda m, p, a: p.madvise(a, PAGE_SIZE, 99), OSError, errno.EINVAL),
    ("munmap unaligned", lambda m, p, a: p.munmap(a + 5, PAGE_SIZE), OSError, errno.EINVAL),
    ("mmap zero pages", lambda m, p, a: p.mmap(0), OSError, errno.EINVAL),
    ("pfn unmapped", lambda m, p, a: p.pfn(a - PAGE_SIZE), OSError, errno.EFAULT),
    ("run 3", lambda m, p, a: setattr(m.ksm, "run", 3), OSError, errno.EINVAL),
    ("run text", lambda m, p, a: m.ksm.sysfs_write("run", "one"), OSError, errno.EINVAL),
    ("pages_to_scan negative", lambda m, p, a: setattr(m.ksm, "pages_to_scan", -1), OSError,
     errno.EINVAL),
    ("max_page_sharing busy", lambda m, p, a: setattr(m.ksm, "max_page_sharing", 2), OSError,
     errno.EBUSY),
    ("max_page_sharing 1", lambda m, p, a: setattr(m.ksm, "max_page_sharing", 1), OSError,
     errno.EINVAL),
    ("merge_across_nodes 2", lambda m, p, a: setattr(m.ksm, "merge_across_nodes", 2), OSError,
     errno.EINVAL),
    ("read-only counter", lambda m, p, a: setattr(m.ksm, "pages_shared", 0), OSError,
     errno.EACCES),
]


@pytest.mark.parametrize("what,call,exc,err", CASES, ids=[c[0] for c in CASES])
def test_bad_input_changes_nothing(
    Machine: type, what: str, call: Callable[[Any, Any, int], Any], exc: type, err: int | None
) -> None:
    m, procs, addr = setup(Machine)
    before = snapshot(m, procs)
    with pytest.raises(exc) as info:
        call(m, procs[0], addr)
    if err is not None:
        assert info.value.errno == err
    assert snapshot(m, procs) == before
    m.check_invariants()


def test_exited_process(Machine: type) -> None:
    m, (p,), addr = setup(Machine)
    p.exit()
    for call in (lambda: p.read(addr, 1), lambda: p.write(addr, b"x"), lambda: p.fork(),
                 lambda: p.mmap(1), lambda: p.ksm_stat(), lambda: p.exit()):
        with pytest.raises(ProcessLookupError):
            call()
    assert p not in m.processes
    m.check_invariants()


def test_write_exactly_to_the_end_is_fine(Machine: type) -> None:
    m, (p,), addr = setup(Machine)
    p.write(addr + 4 * PAGE_SIZE - 3, b"xyz")
    assert p.read(addr + 4 * PAGE_SIZE - 3, 3) == b"xyz"
    m.check_invariants()
