"""Kernel profiles (ksmcore.profiles): each behaviour of the version table, in both
implementations, with the version it entered."""

from __future__ import annotations

import errno
from typing import Any

import numpy as np
import pytest

from ksmcore.constants import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MPOL_MF_MOVE,
    PAGE_SIZE,
    SYSFS_FILES,
)
from ksmcore.profiles import CHANGES, PROFILES, Profile, default_kernel, resolve


def merged_process(m: Any, contents: list[int], node: int = 0) -> tuple[Any, int]:
    p = m.spawn(node=node)
    addr = p.mmap(len(contents))
    p.fill(addr, np.array([np.full(PAGE_SIZE, c, np.uint8) for c in contents]))
    p.madvise(addr, len(contents) * PAGE_SIZE, MADV_MERGEABLE)
    return p, addr


# ---- choosing a profile


@pytest.mark.parametrize(("text", "profile"), [
    ("6.1", "6.1"), ("6.1.0-28-amd64", "6.1"), ("6.5.3", "6.1"), ("6.6", "6.6"),
    ("6.8.0-45-generic", "6.8"), ("6.11", "6.8"), ("6.12.9+bpo-amd64", "6.12"),
    ("6.17", "6.12"), ("6.18", "6.18"), ("6.18.44-fc-v669", "6.18"), ("7.0.1", "6.18"),
])
def test_resolve_maps_to_the_newest_profile_not_newer(text: str, profile: str) -> None:
    assert resolve(text) == Profile(profile)


@pytest.mark.parametrize("text", ["5.15", "6.0.9", "linux", "", "6", "6.x"])
def test_resolve_refuses_unknown_or_too_old(text: str) -> None:
    with pytest.raises(OSError) as e:
        resolve(text)
    assert e.value.errno == errno.EINVAL


def test_machines_take_the_profile(Machine: type) -> None:
    assert Machine(kernel="6.1.0-28-amd64").profile == Profile("6.1")
    assert Machine().profile == Profile(default_kernel())
    with pytest.raises(OSError) as e:
        Machine(kernel="5.10")
    assert e.value.errno == errno.EINVAL


def test_default_is_the_environment_then_the_running_kernel(monkeypatch: Any) -> None:
    monkeypatch.setenv("KSMCORE_KERNEL", "6.8.0-45-generic")
    assert default_kernel() == "6.8"
    monkeypatch.delenv("KSMCORE_KERNEL")
    monkeypatch.setattr("platform.release", lambda: "6.1.0-28-amd64")
    assert default_kernel() in ("6.1", PROFILES[-1])  # 6.1 on Linux, else the newest


def test_the_table_names_every_change_once_in_version_order() -> None:
    names = [c.name for c in CHANGES]
    assert len(names) == len(set(names))
    assert [c.version for c in CHANGES] == sorted(c.version for c in CHANGES)
    assert all(c.commits and c.behaviour and c.model for c in CHANGES)
    assert Profile("6.18").sysfs_files == SYSFS_FILES  # the newest has every file


# ---- checksum before the stable tree (6.11)


@pytest.mark.parametrize(("kernel", "sharing", "volatile"), [("6.1", 49, 0), ("6.8", 49, 0),
                                                             ("6.12", 25, 24),
                                                             ("6.18", 25, 24)])
def test_merge_order(Machine: type, kernel: str, sharing: int, volatile: int) -> None:
    """One process, 25 equal pages, one scan, fork, one scan. Before 6.11 a page equal
    to a KSM page merges in its first scan (the stable tree comes before the checksum);
    from 6.11 a new page waits a scan for its checksum. Measured on a real 6.1."""
    m = Machine(nodes=2, kernel=kernel)
    p, _ = merged_process(m, [7] * 25)
    m.ksm.run = 1
    m.ksm.scan(full_scans=1)
    p.fork()
    m.ksm.scan(full_scans=1)
    assert (m.ksm.pages_shared, m.ksm.pages_sharing, m.ksm.pages_volatile) == \
        (1, sharing, volatile)
    m.check_invariants()


# ---- sysfs files that a version does not have


def test_missing_sysfs_files_are_enoent(Machine: type) -> None:
    m = Machine(kernel="6.1")
    missing = set(SYSFS_FILES) - set(m.profile.sysfs_files)
    assert missing == {"general_profit", "ksm_zero_pages", "pages_scanned", "smart_scan",
                       "pages_skipped", "advisor_mode", "advisor_max_cpu",
                       "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
                       "advisor_target_scan_time"}
    assert set(m.ksm.stats()) == set(m.profile.sysfs_files)
    for name in sorted(missing):
        with pytest.raises(OSError) as e:
            m.ksm.sysfs_read(name)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(OSError) as e:
            m.ksm.sysfs_write(name, "1")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(AttributeError):
            getattr(m.ksm, name)
    assert m.ksm.sysfs_read("use_zero_pages") == "0\n"
    assert set(Machine(kernel="6.6").ksm.stats()) >= {"general_profit", "ksm_zero_pages",
                                                      "pages_scanned"}
    assert "smart_scan" not in Machine(kernel="6.6").ksm.stats()
    assert "advisor_mode" not in Machine(kernel="6.6").ksm.stats()
    assert "advisor_mode" in Machine(kernel="6.8").ksm.stats()


def test_no_smart_scan_before_6_7(Machine: type) -> None:
    """A page that stays unique is visited every scan (no pages_skipped)."""
    m = Machine(kernel="6.6")
    p, _ = merged_process(m, list(range(1, 9)))
    m.ksm.run = 1
    m.ksm.scan(full_scans=8)
    assert m.ksm.pages_scanned == 8 * 8
    m18 = Machine(kernel="6.18")
    merged_process(m18, list(range(1, 9)))
    m18.ksm.run = 1
    m18.ksm.scan(full_scans=8)
    assert m18.ksm.pages_skipped > 0 and m18.ksm.pages_scanned < 8 * 8


# ---- /proc/PID/ksm_stat, prctl and exec


@pytest.mark.parametrize(("kernel", "fields"), [
    ("6.1", ["ksm_rmap_items"]),
    ("6.6", ["ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit"]),
    ("6.12", ["ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit"]),
    ("6.18", ["ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit",
              "ksm_merge_any", "ksm_mergeable"]),
])
def test_ksm_stat_fields(Machine: type, kernel: str, fields: list[str]) -> None:
    m = Machine(kernel=kernel)
    p, _ = merged_process(m, [3, 3])
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    stat = p.ksm_stat()
    assert list(stat) == fields
    assert stat["ksm_rmap_items"] == 2


def test_no_prctl_memory_merge_in_6_1(Machine: type) -> None:
    p = Machine(kernel="6.1").spawn()
    for call in (lambda: p.prctl_set_memory_merge(1), p.prctl_get_memory_merge):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL
    assert Machine(kernel="6.6").spawn().prctl_get_memory_merge() == 0


@pytest.mark.parametrize(("kernel", "merge_any", "scanned"), [
    ("6.6", 0, False), ("6.8", 1, False), ("6.12", 1, True), ("6.18", 1, True)])
def test_merge_any_across_exec(Machine: type, kernel: str, merge_any: int,
                               scanned: bool) -> None:
    """MERGE_ANY survives exec from 6.7; ksm_execve() enters the new mm from 6.10."""
    m = Machine(kernel=kernel)
    p = m.spawn()
    p.prctl_set_memory_merge(1)
    p.exec()
    assert p.prctl_get_memory_merge() == merge_any
    addr = p.mmap(4)
    p.fill(addr, np.full((4, PAGE_SIZE), 5, np.uint8))
    m.ksm.run = 1
    if scanned:
        m.ksm.scan(full_scans=2)
        assert m.ksm.pages_sharing == 3
    else:
        m.ksm.do_scan(100)
        assert m.ksm.pages_sharing == 0 and m.ksm.full_scans == 0  # nothing registered
    m.check_invariants()


# ---- unmerging KSM zero pages (6.6) and move_pages of a non-present page (6.12)


@pytest.mark.parametrize(("kernel", "zero_after"), [("6.1", True), ("6.6", False)])
def test_unmerge_and_ksm_zero_pages(Machine: type, kernel: str, zero_after: bool) -> None:
    m = Machine(kernel=kernel)
    m.ksm.use_zero_pages = 1
    p, addr = merged_process(m, [0, 0, 9])
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    assert p.pfn(addr) == 0 and p.pfn(addr + PAGE_SIZE) == 0
    p.madvise(addr, 3 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert (p.pfn(addr) == 0) == zero_after
    assert p.read(addr, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
    m.check_invariants()


@pytest.mark.parametrize(("kernel", "status"), [("6.1", -errno.EFAULT),
                                                ("6.8", -errno.EFAULT),
                                                ("6.12", -errno.ENOENT)])
def test_move_pages_of_a_page_not_present(Machine: type, kernel: str, status: int) -> None:
    m = Machine(nodes=2, kernel=kernel)
    p = m.spawn()
    addr = p.mmap(2)
    p.write(addr, b"x")
    assert p.move_pages(addr, 2, 1, MPOL_MF_MOVE) == [1, status]


# ---- the command line: --kernel beside the knobs, and the report names the profile


def test_estimate_and_tune_take_kernel(tmp_path: Any, capsys: Any) -> None:
    import json

    from ksmcore.cli import main

    image = tmp_path / "a.img"
    pages = np.zeros((64, PAGE_SIZE), np.uint8)
    pages[::2] = 7  # half the pages equal, half zero
    pages.tofile(image)
    assert main(["estimate", str(image), str(image), "--kernel", "6.1.0-28-amd64", "--json",
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kernel"] == "6.1"
    assert out["ksm"]["pages_sharing"] == 2 * 64 - 2  # the zero and the 7 pages
    assert main(["estimate", str(image), "--kernel", "6.18", "--no-progress"]) == 0
    assert "kernel: the KSM of Linux 6.18" in capsys.readouterr().out
    assert main(["tune", str(image), "--kernel", "6.6", "--pages-to-scan-values", "100",
                 "--sleep-millisecs-values", "20", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kernel"] == "6.6"
    assert {r["smart_scan"] for r in out["settings"]} == {0}  # no smart scan before 6.7
    assert not out["advisor"]["included"]
    assert main(["estimate", str(image), "--kernel", "5.10", "--no-progress"]) == 2
    assert "--kernel 5.10" in capsys.readouterr().err


def test_docs_table_names_every_change() -> None:
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "kernel-profiles.md").read_text()
    for c in CHANGES:
        assert f"| `{c.name}` |" in doc, c.name
        assert c.commits[0].replace('"', '\\"') in doc or c.commits[0] in doc, c.name
        assert f"{c.version[0]}.{c.version[1]}, " in doc


@pytest.mark.parametrize(("kernel", "inherited"), [("6.1", True), ("6.6", False),
                                                   ("6.18", False)])
def test_fork_and_the_childs_ksm_counters(Machine: type, kernel: str, inherited: bool) -> None:
    """Before "mm/ksm: fix incorrect KSM counter handling in mm_struct during fork"
    dup_mm() copied the parent's ksm_rmap_items and ksm_merging_pages into the child,
    and the child's own items count from there. Measured on a real 6.1 (QEMU)."""
    m = Machine(kernel=kernel)
    p, _ = merged_process(m, [4] * 5)
    m.ksm.run = 1
    m.ksm.scan(full_scans=2)
    child = p.fork()
    base = (5, 5) if inherited else (0, 0)
    stat = child.ksm_stat(every=True)
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"]) == base
    m.ksm.scan(full_scans=1)  # the child's 5 pages join the KSM page
    stat = child.ksm_stat(every=True)
    assert (stat["ksm_rmap_items"], stat["ksm_merging_pages"]) == (base[0] + 5, base[1] + 5)
    m.check_invariants()


def test_an_unknown_change_name_is_an_error() -> None:
    with pytest.raises(KeyError):
        Profile("6.18").has("no_such_change")
    assert Profile("6.1").has("checksum_first") is False
    assert Profile("6.12").has("checksum_first") is True
