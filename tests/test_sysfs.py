"""/sys/kernel/mm/ksm/ as the kernel's store and show functions handle it: parsing,
errno, the value after a rejected write, read formats. The same table of writes runs
on both implementations and, where /sys/kernel/mm/ksm is writable, on this machine's
kernel, which must agree with the table step by step.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ksmcore import kernel
from ksmcore.constants import COUNTERS, KNOB_DEFAULTS, MADV_MERGEABLE, PAGE_SIZE, SYSFS_FILES

from conftest import IMPLEMENTATIONS, machine_class

OK = 0
EINVAL, ERANGE, EACCES, ENOENT = errno.EINVAL, errno.ERANGE, errno.EACCES, errno.ENOENT

# (file, bytes written, errno (0 = accepted), file to read back, its text afterwards).
# Applied in order from the defaults with run=2 (no KSM page exists). The readback
# of a rejected write shows the value is unchanged.
STEPS: list[tuple[str, bytes, int, str, str]] = [
    # run: kstrtouint, > 2 is EINVAL, every parse error EINVAL
    ("run", b"0", OK, "run", "0\n"),
    ("run", b"3", EINVAL, "run", "0\n"),
    ("run", b"-1", EINVAL, "run", "0\n"),
    ("run", b" 1", EINVAL, "run", "0\n"),
    ("run", b"1x", EINVAL, "run", "0\n"),
    ("run", b"0\n\n", EINVAL, "run", "0\n"),
    ("run", b"4294967296", EINVAL, "run", "0\n"),
    ("run", b"+1", OK, "run", "1\n"),
    ("run", b"", OK, "run", "1\n"),  # an empty write never reaches the store
    ("run", b"0\n", OK, "run", "0\n"),
    ("run", b"2", OK, "run", "2\n"),
    # pages_to_scan: kstrtouint, 0 allowed
    ("pages_to_scan", b"0", OK, "pages_to_scan", "0\n"),
    ("pages_to_scan", b"4294967295", OK, "pages_to_scan", "4294967295\n"),
    ("pages_to_scan", b"4294967296", EINVAL, "pages_to_scan", "4294967295\n"),
    ("pages_to_scan", b"0x10", EINVAL, "pages_to_scan", "4294967295\n"),
    ("pages_to_scan", b"1e3", EINVAL, "pages_to_scan", "4294967295\n"),
    ("pages_to_scan", b"00012", OK, "pages_to_scan", "12\n"),
    ("pages_to_scan", b"100\x00junk", OK, "pages_to_scan", "100\n"),  # a C string
    ("pages_to_scan", b"0" * 4096 + b"7", OK, "pages_to_scan", "0\n"),  # 4096 bytes read
    ("pages_to_scan", b"100", OK, "pages_to_scan", "100\n"),
    # sleep_millisecs
    ("sleep_millisecs", b"0", OK, "sleep_millisecs", "0\n"),
    ("sleep_millisecs", b"-5", EINVAL, "sleep_millisecs", "0\n"),
    ("sleep_millisecs", b"4294967295", OK, "sleep_millisecs", "4294967295\n"),
    ("sleep_millisecs", b"20", OK, "sleep_millisecs", "20\n"),
    # merge_across_nodes: kstrtoul's own errno; > 1 EINVAL
    ("merge_across_nodes", b"2", EINVAL, "merge_across_nodes", "1\n"),
    ("merge_across_nodes", b"x", EINVAL, "merge_across_nodes", "1\n"),
    ("merge_across_nodes", b"-1", EINVAL, "merge_across_nodes", "1\n"),
    ("merge_across_nodes", b"18446744073709551616", ERANGE, "merge_across_nodes", "1\n"),
    ("merge_across_nodes", b"99999999999999999999x", ERANGE, "merge_across_nodes", "1\n"),
    ("merge_across_nodes", b"0", OK, "merge_across_nodes", "0\n"),
    ("merge_across_nodes", b"1\n", OK, "merge_across_nodes", "1\n"),
    # max_page_sharing: kstrtoint's own errno; < 2 EINVAL
    ("max_page_sharing", b"1", EINVAL, "max_page_sharing", "256\n"),
    ("max_page_sharing", b"-1", EINVAL, "max_page_sharing", "256\n"),
    ("max_page_sharing", b"abc", EINVAL, "max_page_sharing", "256\n"),
    ("max_page_sharing", b"-+3", EINVAL, "max_page_sharing", "256\n"),
    ("max_page_sharing", b"2147483648", ERANGE, "max_page_sharing", "256\n"),
    ("max_page_sharing", b"-2147483649", ERANGE, "max_page_sharing", "256\n"),
    ("max_page_sharing", b"99999999999999999999x", ERANGE, "max_page_sharing", "256\n"),
    ("max_page_sharing", b"2", OK, "max_page_sharing", "2\n"),
    ("max_page_sharing", b"+3", OK, "max_page_sharing", "3\n"),
    ("max_page_sharing", b"256\n", OK, "max_page_sharing", "256\n"),
    # stable_node_chains_prune_millisecs: kstrtouint
    ("stable_node_chains_prune_millisecs", b"0", OK, "stable_node_chains_prune_millisecs",
     "0\n"),
    ("stable_node_chains_prune_millisecs", b"4294967296", EINVAL,
     "stable_node_chains_prune_millisecs", "0\n"),
    ("stable_node_chains_prune_millisecs", b"2000", OK, "stable_node_chains_prune_millisecs",
     "2000\n"),
    # use_zero_pages, smart_scan: kstrtobool (the first one or two characters)
    ("use_zero_pages", b"Yes", OK, "use_zero_pages", "1\n"),
    ("use_zero_pages", b"of", OK, "use_zero_pages", "0\n"),
    ("use_zero_pages", b"on", OK, "use_zero_pages", "1\n"),
    ("use_zero_pages", b"o", EINVAL, "use_zero_pages", "1\n"),
    ("use_zero_pages", b"2", EINVAL, "use_zero_pages", "1\n"),
    ("use_zero_pages", b"f", OK, "use_zero_pages", "0\n"),
    ("use_zero_pages", b"10", OK, "use_zero_pages", "1\n"),
    ("use_zero_pages", b"N\n", OK, "use_zero_pages", "0\n"),
    ("smart_scan", b"0", OK, "smart_scan", "0\n"),
    ("smart_scan", b"x", EINVAL, "smart_scan", "0\n"),
    ("smart_scan", b"t", OK, "smart_scan", "1\n"),
    # the advisor's knobs: kstrtoul, any parse error EINVAL
    ("advisor_max_cpu", b"4294967366", OK, "advisor_max_cpu", "70\n"),  # unsigned int
    ("advisor_max_cpu", b"-1", EINVAL, "advisor_max_cpu", "70\n"),
    ("advisor_max_cpu", b"18446744073709551616", EINVAL, "advisor_max_cpu", "70\n"),
    ("advisor_max_cpu", b"0", OK, "advisor_max_cpu", "0\n"),
    ("advisor_max_cpu", b"70", OK, "advisor_max_cpu", "70\n"),
    ("advisor_max_pages_to_scan", b"18446744073709551615", OK, "advisor_max_pages_to_scan",
     "18446744073709551615\n"),
    ("advisor_max_pages_to_scan", b"30000", OK, "advisor_max_pages_to_scan", "30000\n"),
    ("advisor_target_scan_time", b"0", EINVAL, "advisor_target_scan_time", "200\n"),
    ("advisor_target_scan_time", b"1", OK, "advisor_target_scan_time", "1\n"),
    ("advisor_target_scan_time", b"200", OK, "advisor_target_scan_time", "200\n"),
    ("advisor_min_pages_to_scan", b"4294967297", OK, "advisor_min_pages_to_scan",
     "4294967297\n"),
    # advisor_mode: exactly "none" or "scan-time" (one newline allowed)
    ("advisor_mode", b"Scan-time", EINVAL, "advisor_mode", "[none] scan-time\n"),
    ("advisor_mode", b"scan-time\n\n", EINVAL, "advisor_mode", "[none] scan-time\n"),
    ("advisor_mode", b"scan-time", OK, "advisor_mode", "none [scan-time]\n"),
    # set_advisor_defaults(): pages_to_scan = advisor_min_pages_to_scan, cut to 32 bits
    ("advisor_mode", b"scan-time\n", OK, "pages_to_scan", "1\n"),
    ("pages_to_scan", b"100", EINVAL, "pages_to_scan", "1\n"),  # the advisor owns it
    ("pages_to_scan", b"abc", EINVAL, "pages_to_scan", "1\n"),
    ("advisor_min_pages_to_scan", b"500", OK, "pages_to_scan", "1\n"),
    ("advisor_mode", b"none", OK, "pages_to_scan", "100\n"),
    ("advisor_mode", b"none", OK, "advisor_mode", "[none] scan-time\n"),
    ("pages_to_scan", b"33", OK, "pages_to_scan", "33\n"),
    ("advisor_mode", b"none\n", OK, "pages_to_scan", "33\n"),  # no change, no defaults
    # read-only files: open(O_WRONLY) fails, even for an empty write
    ("pages_shared", b"0", EACCES, "pages_to_scan", "33\n"),
    ("full_scans", b"1", EACCES, "pages_to_scan", "33\n"),
    ("general_profit", b"", EACCES, "pages_to_scan", "33\n"),
    ("ksm_zero_pages", b"x", EACCES, "pages_to_scan", "33\n"),
    ("no_such_file", b"1", ENOENT, "pages_to_scan", "33\n"),
]

WRITABLE = [n for n in SYSFS_FILES if n in KNOB_DEFAULTS]


def baseline(write) -> None:
    """run=2 (no KSM page can exist), then every knob at its default."""
    write("run", b"2")
    write("advisor_mode", b"none")
    for name in WRITABLE:
        if name not in ("run", "advisor_mode"):
            write(name, str(KNOB_DEFAULTS[name]).encode())


def model_writer(m):
    def write(name: str, data: bytes) -> int:
        try:
            m.ksm.sysfs_write(name, data)
        except OSError as e:
            return e.errno
        return OK
    return write


def test_every_file_reads_as_the_kernel_prints_it(Machine: type) -> None:
    m = Machine()
    for name in SYSFS_FILES:
        text = m.ksm.sysfs_read(name)
        assert text.endswith("\n") and text.count("\n") == 1, name
        if name == "advisor_mode":
            assert text == "[none] scan-time\n"
        else:
            assert text == f"{int(m.ksm.stats()[name])}\n"
            assert getattr(m.ksm, name) == int(text)
    with pytest.raises(OSError) as e:
        m.ksm.sysfs_read("no_such_file")
    assert e.value.errno == ENOENT


def test_the_table_of_writes(Machine: type) -> None:
    m = Machine()
    write = model_writer(m)
    baseline(write)
    for i, (name, data, err, read_name, text) in enumerate(STEPS):
        before = m.ksm.stats()
        got = write(name, data)
        assert got == err, f"step {i}: {name} <- {data[:40]!r}: errno {got}, want {err}"
        assert m.ksm.sysfs_read(read_name) == text, f"step {i}: {read_name}"
        if err:
            assert m.ksm.stats() == before, f"step {i}: a rejected write changed something"


def test_attribute_assignment_is_validated_the_same_way(Machine: type) -> None:
    m = Machine()
    m.ksm.pages_to_scan = 7
    m.ksm.use_zero_pages = True
    assert (m.ksm.pages_to_scan, m.ksm.use_zero_pages) == (7, 1)
    for name, value, err in (("run", 3, EINVAL), ("pages_to_scan", -1, EINVAL),
                             ("max_page_sharing", 1, EINVAL),
                             ("max_page_sharing", 1 << 31, ERANGE),
                             ("pages_shared", 0, EACCES), ("advisor_mode", "auto", EINVAL)):
        with pytest.raises(OSError) as e:
            setattr(m.ksm, name, value)
        assert e.value.errno == err, name
    with pytest.raises(TypeError):
        m.ksm.pages_to_scan = 1.5
    with pytest.raises(AttributeError):
        m.ksm.no_such_file = 1
    assert (m.ksm.pages_to_scan, m.ksm.max_page_sharing, m.ksm.advisor_mode) == (7, 256, "none")


def test_ebusy_while_ksm_pages_exist(Machine: type) -> None:
    """max_page_sharing and merge_across_nodes: EBUSY while pages are shared; the same
    value is accepted without the check; after run=2 the change goes through."""
    m = Machine()
    p = m.spawn()
    a = p.mmap(4)
    p.fill(a, np.full((4, PAGE_SIZE), 3, np.uint8))
    p.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert m.ksm.pages_shared == 1
    for name, value in (("max_page_sharing", "3"), ("merge_across_nodes", "0")):
        with pytest.raises(OSError) as e:
            m.ksm.sysfs_write(name, value)
        assert e.value.errno == errno.EBUSY
    m.ksm.sysfs_write("max_page_sharing", "256")  # unchanged: no check
    m.ksm.run = 2
    m.ksm.max_page_sharing = 3
    m.ksm.merge_across_nodes = 0
    assert (m.ksm.max_page_sharing, m.ksm.merge_across_nodes, m.ksm.pages_shared) == (3, 0, 0)
    m.check_invariants()


def test_sleep_millisecs_wakes_a_sleeping_ksmd(Machine: type) -> None:
    """sleep_millisecs_store() wakes ksmd (ksm_iter_wait) when the value changes."""
    m = Machine()
    p = m.spawn()
    a = p.mmap(2)
    p.fill(a, np.full((2, PAGE_SIZE), 3, np.uint8))
    p.madvise(a, 2 * PAGE_SIZE, MADV_MERGEABLE)
    m.ksm.sleep_millisecs = 1000
    m.ksm.run = 1
    m.run_for(0.010)  # one batch (one full scan), then a sleep of a second
    assert m.ksm.full_scans == 1
    m.ksm.sleep_millisecs = 1000  # the same value: still asleep
    m.run_for(0.010)
    assert m.ksm.full_scans == 1
    m.ksm.sleep_millisecs = 999  # a new value: ksmd wakes now
    m.run_for(0.010)
    assert m.ksm.full_scans == 2


# ---- the same table on this machine's kernel

AVAILABLE, WHY = kernel.kernel_available()


def kernel_write(name: str, data: bytes) -> int:
    try:
        fd = os.open(kernel.KSM_DIR / name, os.O_WRONLY)
    except OSError as e:
        return e.errno or -1
    try:
        os.write(fd, data)
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)
    return OK


def kernel_read(name: str) -> str:
    return Path(kernel.KSM_DIR / name).read_text()


@pytest.fixture
def kernel_knobs() -> Iterator[None]:
    """Save every writable knob and restore it on every path (run=2 first)."""
    saved = kernel.save_knobs()
    try:
        yield
    finally:
        kernel.restore_knobs(saved)


@pytest.mark.skipif(not AVAILABLE, reason=f"sysfs parity needs the kernel: {WHY}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_kernel_parity_of_the_table(impl: str, kernel_knobs: None) -> None:
    """Each step on the kernel and on the model: the same errno, and every writable
    file reads the same afterwards."""
    m = machine_class(impl)()
    model_write = model_writer(m)
    files = [n for n in WRITABLE if (kernel.KSM_DIR / n).exists()]
    baseline(kernel_write)
    baseline(model_write)
    for i, (name, data, err, read_name, text) in enumerate(STEPS):
        got = kernel_write(name, data), model_write(name, data)
        assert got == (err, err), f"step {i}: {name} <- {data[:40]!r}: kernel, model {got}"
        assert kernel_read(read_name) == text, f"step {i}: the kernel's {read_name}"
        kernel_view = {n: kernel_read(n) for n in files}
        model_view = {n: m.ksm.sysfs_read(n) for n in files}
        assert model_view == kernel_view, f"step {i}: {name} <- {data[:40]!r}"


@pytest.mark.skipif(not AVAILABLE, reason=f"sysfs parity needs the kernel: {WHY}")
def test_kernel_counters_read_in_the_same_format() -> None:
    """Every read-only file is one decimal number and a newline, as in the model."""
    for name in COUNTERS:
        text = kernel_read(name)
        assert text.endswith("\n") and text.count("\n") == 1
        int(text)
    assert kernel_read("advisor_mode") in ("[none] scan-time\n", "none [scan-time]\n")
