"""No phantom zeros: holes of images and all-zero pages of cores are memory never
touched, which ksmd never visits; real cores of live processes against ``--pid``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_estimate_sources import pages, write_core

from ksmcore.constants import PAGE_SIZE
from ksmcore.estimate.elfcore import open_core
from ksmcore.estimate.extents import data_extents, zero_merge_savings
from ksmcore.estimate.sources import open_file

from clirun import run


def estimate_json(*argv: str) -> dict:
    code, out, err = run("estimate", "--json", "--no-progress", *argv)
    assert code == 0, err
    return json.loads(out)


def sparse_supported(path: Path) -> bool:
    probe = path / "probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 24)
        f.seek(1 << 20)
        f.write(b"x")
    ok = data_extents(str(probe), 0, 1 << 24) != [(0, 1 << 24)]
    probe.unlink()
    return ok


# --- holes of raw images ------------------------------------------------------------


def test_holes_of_an_image_are_not_present(tmp_path: Path) -> None:
    if not sparse_supported(tmp_path):
        pytest.skip("the filesystem of the test's temporary directory has no holes")
    data = np.repeat(pages(4, 1), 3, axis=0)  # 12 pages, 4 contents x 3
    path = tmp_path / "guest.img"
    size = 64 << 30  # a 64 GiB guest that wrote 12 pages: cheap, the holes are not read
    with open(path, "wb") as f:
        f.truncate(size)
        for i, row in enumerate(data):
            f.seek((i * 1000 + 7) * PAGE_SIZE)
            f.write(row.tobytes())
        f.seek(5 << 30)
        f.write(bytes(PAGE_SIZE))  # a page written with zeros is memory: present
    t0 = time.perf_counter()
    src = open_file(str(path))
    assert time.perf_counter() - t0 < 5
    assert src.npages == 13 and src.hole_pages == size // PAGE_SIZE - 13
    assert np.array_equal(np.concatenate(src.segments)[:12], data)
    r = estimate_json(str(path))
    assert r["pages"] == 13
    assert r["saved"]["pages"] == 8  # 4 contents x 3 copies: 2 saved each
    assert r["zero_pages"]["hole_pages"] == size // PAGE_SIZE - 13
    code, out, _ = run("estimate", "--no-progress", str(path))
    assert "pages of images in holes (never written) left out" in out


# --- all-zero pages of cores ----------------------------------------------------------


def _core_with_zeros(path: Path, qemu: bool) -> np.ndarray:
    """A core of 3 x 40 pages with zeros in runs and alone, and 30 distinct x 2."""
    rng = np.random.default_rng(5)
    content = np.repeat(pages(30, 2), 2, axis=0)
    rng.shuffle(content)
    segs = []
    for k in range(3):
        seg = np.zeros((40, PAGE_SIZE), np.uint8)
        seg[20 : 20 + 20] = content[k * 20 : (k + 1) * 20]
        seg[25] = 0  # a zero page amid data
        segs.append(seg)
    write_core(path, [(0x10000000 * (k + 1), s.tobytes(), 40 * PAGE_SIZE)
                      for k, s in enumerate(segs)], qemu=qemu)
    return np.concatenate(segs)


@pytest.mark.parametrize("qemu", [False, True], ids=["process core", "VM dump"])
def test_zero_pages_of_a_core_are_absent_by_default(tmp_path: Path, qemu: bool) -> None:
    path = tmp_path / "core"
    whole = _core_with_zeros(path, qemu)
    zero = int((~whole.any(axis=1)).sum())
    src = open_core(str(path))
    assert src.zero_pages == zero and src.npages == len(whole) - zero
    assert any("all-zero pages" in n and "--zero-pages present" in n for n in src.notes)
    assert open_core(str(path), zero_pages="present").npages == len(whole)

    absent = estimate_json(str(path), str(path))  # two copies: the pages merge
    present = estimate_json(str(path), str(path), "--zero-pages", "present")
    assert present["pages"] == 2 * len(whole) and absent["pages"] == 2 * (len(whole) - zero)
    # both figures: the one given for present is what a present run saves
    assert absent["zero_pages"]["left_out"] == 2 * zero
    assert absent["zero_pages"]["saved_pages_if_present"] == present["saved"]["pages"]
    assert present["saved"]["pages"] > absent["saved"]["pages"] > 0
    with_zero = estimate_json(str(path), str(path), "--use-zero-pages", "1")
    assert with_zero["zero_pages"]["saved_if_present"] == 2 * zero
    _, out, _ = run("estimate", "--no-progress", str(path))
    assert "all-zero pages of cores left out as never touched" in out
    assert "--zero-pages present" in out


@pytest.mark.parametrize("zero, mps, use_zero", [(1000, 256, 0), (257, 256, 0), (3, 2, 0),
                                                 (1, 256, 0), (100, 256, 1)])
def test_zero_merge_savings_is_what_ksmd_does(zero: int, mps: int, use_zero: int) -> None:
    from ksmcore.estimate.simulate import Knobs, load, new_machine, run_ksmd
    from ksmcore.estimate.sources import Source

    m = new_machine(1, Knobs(max_page_sharing=mps, use_zero_pages=use_zero))
    zeros = [np.zeros((k, PAGE_SIZE), np.uint8) for k in (zero // 2, zero - zero // 2)]
    load(m, [Source("a", "x", [z for z in (zeros[0], pages(20)) if len(z)]),
             Source("b", "x", [zeros[1]])])
    run_ksmd(m, 20)
    s = m.ksm.stats()
    assert s["pages_sharing"] + s["ksm_zero_pages"] == zero_merge_savings(zero, mps, use_zero)


def test_sparse_core_tells_untouched_pages_by_its_holes(tmp_path: Path) -> None:
    if not sparse_supported(tmp_path):
        pytest.skip("the filesystem of the test's temporary directory has no holes")
    path = tmp_path / "core"
    seg = np.repeat(pages(10, 3), 2, axis=0)
    seg[5] = 0  # written with zeros: present
    blob = seg.tobytes() + bytes(30 * PAGE_SIZE)  # 30 untouched pages
    write_core(path, [(0x20000000, blob, 50 * PAGE_SIZE)], file_note=False)
    # punch the untouched pages out, as the kernel's dump_skip() leaves them
    data = path.read_bytes()
    start = data.index(blob) + 20 * PAGE_SIZE
    hole_from = -(-start // PAGE_SIZE) * PAGE_SIZE
    with open(path, "r+b") as f:
        f.truncate(hole_from)
        f.truncate(len(data))
    skipped = (len(data) - hole_from) // PAGE_SIZE
    src = open_core(str(path))
    assert src.zero_pages == skipped
    assert src.npages == 50 - skipped  # the zero page written as data stays
    assert any("in holes of the core" in n for n in src.notes)
    # both figures: the one for present counts the zero pages scanned already (the
    # one written as data), which the left-out ones join
    absent = estimate_json(str(path), str(path))
    present = estimate_json(str(path), str(path), "--zero-pages", "present")
    assert present["pages"] == 100
    assert absent["zero_pages"]["saved_pages_if_present"] == present["saved"]["pages"]


# --- real cores against --pid on the same idle processes ------------------------------


IDLE = ("import json, decimal, asyncio, email.parser, http.server, numpy, sys; "
        "sys.stdout.write('r'); sys.stdout.flush(); import time; time.sleep(600)")


@contextlib.contextmanager
def idle_pythons(n: int, cwd: Path, core_limit: bool) -> Iterator[list[subprocess.Popen]]:
    procs = []

    def limit() -> None:
        if core_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)

    try:
        for i in range(n):
            d = cwd / f"p{i}"
            d.mkdir()
            # plain processes to be read: not under the sanitizer run's preloaded ASan,
            # whose terabytes of shadow mappings gcore would try to dump
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            p = subprocess.Popen([sys.executable, "-c", IDLE], cwd=d, stdout=subprocess.PIPE,
                                 preexec_fn=limit, env=env)
            procs.append(p)
        for p in procs:
            assert p.stdout is not None and p.stdout.read(1) == b"r"
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _pid_saved(procs: list[subprocess.Popen]) -> dict:
    return estimate_json(*[a for p in procs for a in ("--pid", str(p.pid))])


def test_kernel_cores_against_pid(tmp_path: Path) -> None:
    """The kernel's cores of idle processes (sparse: untouched pages are holes) give
    the savings --pid gives on the same processes, within 10%."""
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern or "%" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write a core into the process's "
                    "directory; this test does not change it")
    if not sparse_supported(tmp_path):
        pytest.skip("the filesystem of the test's temporary directory has no holes")
    with idle_pythons(3, tmp_path, core_limit=True) as procs:
        live = _pid_saved(procs)
        for p in procs:
            p.send_signal(signal.SIGABRT)
            p.wait()
    # core_uses_pid=1 appends ".PID"
    found = [sorted((tmp_path / f"p{i}").glob(pattern + "*")) for i in range(3)]
    if not all(found):
        pytest.skip("the kernel wrote no core here (RLIMIT_CORE or the filesystem refused)")
    cores = [f[0] for f in found]
    dumped = estimate_json(*map(str, cores))
    a, b = live["saved"]["pages"], dumped["saved"]["pages"]
    assert a > 0 and abs(b - a) <= 0.1 * a, (a, b)
    # the core leaves out the private file mappings, copied-on-write pages included
    assert 0.8 * live["pages"] <= dumped["pages"] <= live["pages"]


@pytest.mark.skipif(shutil.which("gcore") is None, reason="needs gdb's gcore")
def test_gcore_cores_against_pid(tmp_path: Path) -> None:
    """gcore writes untouched memory as zeros (no holes), so its zero pages cannot be
    told from zero-filled ones: --pid lies between the two figures the report gives
    (zero pages absent, the default, and present), far below the second."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # gdb without ASan
    with idle_pythons(3, tmp_path, core_limit=False) as procs:
        live = _pid_saved(procs)
        for p in procs:
            out = subprocess.run(["gcore", "-o", str(tmp_path / "core"), str(p.pid)],
                                 capture_output=True, timeout=120, env=env)
            if out.returncode:
                pytest.skip(f"gcore cannot dump here: {out.stderr.decode()[-200:]}")
        cores = [str(tmp_path / f"core.{p.pid}") for p in procs]
    dumped = estimate_json(*cores)
    a = live["saved"]["pages"]
    low, high = dumped["saved"]["pages"], dumped["zero_pages"]["saved_pages_if_present"]
    assert low <= a * 1.1 and a < high / 5, (low, a, high)
