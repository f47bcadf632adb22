"""No crash and no silent corruption: threads on one machine, images that change
underneath, calls that fail half way, and re-entrant calls (ksmcore/guard.py,
ksmcore/images.py, ksmcore/checks.py)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ksmcore.constants import MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE
from ksmcore.guard import MachineBroken

from observe import snapshot


def merged_machine(Machine: type, npages: int = 64) -> tuple[Any, Any, int]:
    m = Machine()
    p = m.spawn()
    addr = p.mmap(npages)
    p.fill(addr, np.repeat(np.arange(npages, dtype=np.uint8) % 4, PAGE_SIZE).reshape(npages, -1))
    p.madvise(addr, npages * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    return m, p, addr


# ---- 1. threads hammering one machine


def test_threads_hammering_one_machine(Machine: type) -> None:
    """A scanning thread, writers, mappers and readers on one machine: every call is
    served whole (the machine's lock), the invariants hold throughout and after."""
    m, p, addr = merged_machine(Machine)
    errors: list[BaseException] = []
    stop = threading.Event()

    def scanner() -> None:
        while not stop.is_set():
            m.ksm.do_scan(16)

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(150):
            page = int(rng.integers(0, 64))
            p.write(addr + page * PAGE_SIZE, bytes([int(rng.integers(0, 4))]) * PAGE_SIZE)

    def mapper() -> None:
        q = m.spawn()
        for _ in range(40):
            a = q.mmap(8)
            q.fill(a, np.zeros((8, PAGE_SIZE), np.uint8))
            q.madvise(a, 8 * PAGE_SIZE, MADV_MERGEABLE)
            q.munmap(a, 8 * PAGE_SIZE)

    def checker() -> None:
        for _ in range(20):
            m.check_invariants()
            m.ksm.stats()

    def run(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: B036 - reported to the test thread
            errors.append(e)

    workers = [threading.Thread(target=run, args=(writer, s)) for s in range(3)]
    workers += [threading.Thread(target=run, args=(mapper,)),
                threading.Thread(target=run, args=(checker,))]
    scan = threading.Thread(target=run, args=(scanner,))
    scan.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    scan.join()
    assert errors == []
    m.check_invariants()
    m.ksm.scan(2)
    m.check_invariants()


def test_machines_in_threads_are_independent(Machine: type) -> None:
    results: list[dict[str, Any]] = []

    def one() -> None:
        m, _, _ = merged_machine(Machine)
        m.ksm.scan(2)
        results.append(m.ksm.stats())

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert results[0]["pages_sharing"] == 60


def test_reentrant_call_from_a_subscriber_is_refused(Machine: type) -> None:
    m, p, addr = merged_machine(Machine)
    seen: list[str] = []

    def meddle(event: dict[str, Any]) -> None:
        try:
            p.write(addr, b"x")
        except RuntimeError as e:
            seen.append(str(e))

    m.trace.subscribe(meddle)
    m.ksm.scan(2)
    assert seen and "re-entrant" in seen[0]
    m.trace.unsubscribe(meddle)
    m.check_invariants()
    assert p.read(addr, 1) == b"\0"  # the meddling write never happened


def test_interrupted_call_breaks_the_machine(Machine: type) -> None:
    """KeyboardInterrupt inside a call may leave it half done: later calls refuse."""
    m, p, addr = merged_machine(Machine)

    def interrupt(event: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    m.trace.subscribe(interrupt)
    with pytest.raises(KeyboardInterrupt):
        m.ksm.scan(2)
    assert isinstance(m.broken, KeyboardInterrupt)
    with pytest.raises(MachineBroken, match="KeyboardInterrupt"):
        m.ksm.stats()
    with pytest.raises(MachineBroken):
        p.read(addr, 1)


# ---- 2. images that change under mmap_image


def write_image(path: Path, npages: int = 64) -> None:
    pages = np.repeat(np.arange(npages, dtype=np.uint8) % 3 + 1, PAGE_SIZE)
    path.write_bytes(pages.tobytes())


def image_machine(Machine: type, path: Path) -> tuple[Any, Any, int]:
    m = Machine()
    p = m.spawn()
    addr = p.mmap_image(path)
    p.madvise(addr, 64 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(2)
    return m, p, addr


def test_truncated_image_engine(tmp_path: Path) -> None:
    """A file truncated while mapped: the engine reads it in place; a read past the new
    end would be SIGBUS. It ends in OSError(ESTALE), and the machine refuses from then."""
    from ksmcore import Machine

    path = tmp_path / "ram.img"
    write_image(path)
    m, p, addr = image_machine(Machine, path)
    os.truncate(path, 8 * PAGE_SIZE)
    with pytest.raises(OSError) as info:
        m.ksm.scan(1)
    assert info.value.errno == errno.ESTALE
    assert "changed size" in str(info.value)
    with pytest.raises(MachineBroken):
        p.read(addr, 1)


def test_truncated_image_sigbus_is_caught(tmp_path: Path) -> None:
    """Even a read that races the check (no fstat in between) gets no SIGBUS: run in a
    child so that a failure kills the child, not the test session."""
    path = tmp_path / "ram.img"
    write_image(path)
    code = textwrap.dedent(f"""
        import os, errno
        import numpy as np
        from ksmcore import Machine
        from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE
        m = Machine()
        p = m.spawn()
        addr = p.mmap_image({str(path)!r})
        p.madvise(addr, 64 * PAGE_SIZE, MADV_MERGEABLE)
        m.ksm.run = 1
        m._guard.checks.clear()  # no fstat: the read past the end is what happens
        os.truncate({str(path)!r}, 0)
        m.ksm.scan(2)  # reads every page: past the end of the file
        m._guard.checks.append(m._check_images)
        try:
            m.ksm.stats()
        except OSError as e:
            print("refused", errno.errorcode[e.errno], e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.returncode != -signal.SIGBUS
    assert out.stdout.startswith("refused ESTALE")
    assert "vanished" in out.stdout or "changed size" in out.stdout


def test_rewritten_image_is_refused_not_drifted(tmp_path: Path) -> None:
    from ksmcore import Machine

    path = tmp_path / "ram.img"
    write_image(path)
    m, p, addr = image_machine(Machine, path)
    with open(path, "r+b") as f:  # another writer rewrites one page in place
        f.seek(5 * PAGE_SIZE)
        f.write(b"\xee" * PAGE_SIZE)
    with pytest.raises(OSError) as info:
        m.check_invariants()
    assert info.value.errno == errno.ESTALE and "was modified" in str(info.value)


def test_replaced_image_is_no_change(tmp_path: Path) -> None:
    """A file replaced by rename leaves the mapping on the old file: nothing changed."""
    from ksmcore import Machine

    path = tmp_path / "ram.img"
    write_image(path)
    m, p, addr = image_machine(Machine, path)
    stats = m.ksm.stats()
    other = tmp_path / "new.img"
    other.write_bytes(b"\x01" * PAGE_SIZE)
    os.replace(other, path)
    m.ksm.scan(1)
    m.check_invariants()
    assert m.ksm.stats()["pages_sharing"] == stats["pages_sharing"]


def test_reference_takes_a_snapshot(tmp_path: Path) -> None:
    from ksmcore.reference import Machine

    path = tmp_path / "ram.img"
    write_image(path)
    m, p, addr = image_machine(Machine, path)
    os.truncate(path, 0)
    m.ksm.scan(1)
    m.check_invariants()
    assert p.read(addr, 1) == b"\x01"


# ---- 3. validate first, then change anything


def test_clock_overflow_changes_nothing(Machine: type) -> None:
    m, p, addr = merged_machine(Machine)
    with pytest.raises(ValueError):
        m.clock = 1e20
    m.run_for(0.01)
    m.ksm.do_scan(4)
    m.ksm.scan(1)
    m.check_invariants()


@pytest.mark.parametrize("n", [2**63, None, -1, 1.5, True])
def test_bad_do_scan_moves_no_clock(Machine: type, n: Any) -> None:
    m, p, addr = merged_machine(Machine)
    clock, cpu = m.clock_ns, m.ksmd_cpu_ns
    with pytest.raises((TypeError, ValueError)):
        m.ksm.do_scan(n)
    assert (m.clock_ns, m.ksmd_cpu_ns) == (clock, cpu)


def test_bad_node_is_refused_and_nothing_half_applies(Machine: type) -> None:
    m, p, addr = merged_machine(Machine)
    with pytest.raises(TypeError):
        p.mmap(4, node=0.5)
    p.prctl_set_memory_merge(1)
    p.prctl_set_memory_merge(0)
    m.ksm.run = 2
    assert m.ksm.run == 2
    p.madvise(addr, PAGE_SIZE, MADV_MERGEABLE)
    m.check_invariants()


def test_read_of_unmapped_memory_allocates_nothing(Machine: type) -> None:
    import tracemalloc

    m, p, addr = merged_machine(Machine)
    tracemalloc.start()
    try:
        with pytest.raises(OSError) as info:
            p.read(addr + 64 * PAGE_SIZE, 2 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.errno == errno.EFAULT
    assert peak < 1 << 20


def test_huge_mmap_is_refused_before_allocating(Machine: type) -> None:
    m = Machine()
    p = m.spawn()
    with pytest.raises(OSError) as info:
        p.mmap(10**9)
    assert info.value.errno == errno.ENOMEM
    assert p.maps() == []
    small = Machine(max_pages=100)
    q = small.spawn()
    q.mmap(60)
    with pytest.raises(OSError):
        q.mmap(41)
    q.mmap(40)


def test_noop_madvise_splits_nothing(Machine: type) -> None:
    m, p, addr = merged_machine(Machine)
    p.madvise(addr + PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE)  # already mergeable
    assert len(p.maps()) == 1
    p.madvise(addr + PAGE_SIZE, PAGE_SIZE, MADV_UNMERGEABLE)
    assert len(p.maps()) == 3


@pytest.mark.parametrize("call,exc", [
    (lambda m, p, a: p.munmap(-PAGE_SIZE, PAGE_SIZE), OSError),
    (lambda m, p, a: p.madvise(-PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE), OSError),
    (lambda m, p, a: p.mmap(True), TypeError),
    (lambda m, p, a: m.ksm.scan(-1), ValueError),
    (lambda m, p, a: m.pfn_to_nid(12345), OSError),
    (lambda m, p, a: m.spawn(node=True), TypeError),
    (lambda m, p, a: p.set_mempolicy(2, [0.0]), TypeError),
], ids=["munmap-negative", "madvise-negative", "mmap-bool", "scan-negative", "pfn-free",
        "spawn-bool", "mempolicy-float"])
def test_same_refusal_everywhere(Machine: type, call: Any, exc: type) -> None:
    m, p, addr = merged_machine(Machine)
    before = snapshot(m, [p])
    with pytest.raises(exc) as info:
        call(m, p, addr)
    if exc is OSError:
        assert info.value.errno == errno.EINVAL
    assert snapshot(m, [p]) == before


def test_numpy_integers_are_integers(Machine: type) -> None:
    m = Machine(nodes=np.int64(2))
    p = m.spawn(node=np.int8(1))
    addr = p.mmap(np.uint32(4), node=np.int16(0))
    p.write(np.int64(addr), b"abc")
    assert p.read(np.uint64(addr), np.int32(3)) == b"abc"
    p.madvise(np.int64(addr), np.int64(4 * PAGE_SIZE), np.int32(MADV_MERGEABLE))
    m.ksm.run = np.int64(1)
    m.ksm.pages_to_scan = np.uint16(10)
    m.ksm.do_scan(np.int64(5))
    m.ksm.scan(np.int8(1))
    m.clock_ns = np.int64(m.clock_ns + 5)
    assert m.pfn_to_nid(np.int64(p.pfn(addr))) == 0
    m.check_invariants()
