"""The small things a new user meets: --version, help texts, one clear line for each
mistake, ``ksmcore.reference`` after ``import ksmcore``, and ``--all`` on a busy host
(the memory said up front, --top, summed notes, unreadable processes named)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ksmcore.cli import main
from ksmcore.constants import PAGE_SIZE
from ksmcore.estimate.commands import add_parsers
from ksmcore.estimate.report import summarise_notes

NOBODY = 65534


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def parsers() -> dict[str, argparse.ArgumentParser]:
    return add_parsers(argparse.ArgumentParser().add_subparsers())


def test_version() -> None:
    from ksmcore import __version__

    code, out, _ = run("--version")
    assert code == 0 and out.strip() == f"ksmcore {__version__}"


@pytest.mark.parametrize("command", ["estimate", "tune"])
def test_help_has_examples_and_every_knob_a_line(command: str) -> None:
    p = parsers()[command]
    text = p.format_help()
    assert "examples:\n  ksmcore " + command in text
    assert "%%" not in text
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help line"
    cost = next(a for a in p._actions if "--cost-per-page-us" in a.option_strings)
    assert "ksmcore.timing.CostModel" in cost.help and "measured" in cost.help


def test_tune_help_shows_percent() -> None:
    code, out, _ = run("tune", "--help")
    assert code == 0 and "50/90/100% of the savings" in out and "%%" not in out


def test_reference_after_a_plain_import() -> None:
    code = ("import ksmcore; m = ksmcore.reference.Machine(); "
            "print(type(m).__module__, callable(ksmcore.estimate.estimate))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["ksmcore.reference.machine", "True"]


@pytest.mark.parametrize("argv", [["--use-zero-pages", "2"], ["--smart-scan", "7"]])
def test_refused_knob_said_once(argv: list[str]) -> None:
    code, out, err = run("estimate", "--sample", *argv)
    assert code == 2 and not out
    assert err.count("Invalid argument") == 1 and "not a boolean" in err


def test_elf_that_is_not_a_core_hints_raw(tmp_path: Path) -> None:
    path = tmp_path / "guest.img"
    path.write_bytes(b"\x7fELF" + bytes([2, 1, 1]) + bytes(PAGE_SIZE - 7))
    code, _, err = run("estimate", str(path))
    assert code == 1 and "--format raw" in err
    code, out, err = run("estimate", "--format", "raw", "--json", str(path))
    assert code == 0 and json.loads(out)["pages"] == 1


def test_all_that_found_nothing_readable_says_so() -> None:
    unused = 54321
    code, out, err = run("estimate", "--all", "--user", str(unused), "--no-progress")
    assert code == 1 and not out
    assert f"--all: no process of user {unused} could be read (0 found)" in err
    assert "nothing to estimate" not in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another user")
def test_all_names_the_processes_it_cannot_read() -> None:
    """As nobody, root's processes are not readable: each is named, with the privilege."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 99
        try:
            os.close(r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code, out, err = run("estimate", "--all", "--user", "0", "--no-progress")
            os.write(w, json.dumps([code, out, err]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    code, out, err = json.loads(data)
    assert code == 1 and not out
    assert "up to" in err and "MiB of anonymous memory to copy" in err
    assert "no process of user 0 could be read" in err
    assert "not readable (needs root or CAP_SYS_PTRACE: 1 (" in err


def test_top_sorted_by_savings(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    common = rng.integers(0, 256, (50, PAGE_SIZE), dtype=np.uint8)
    paths = []
    for i, shared in enumerate((10, 50, 30, 0, 20)):
        own = rng.integers(0, 256, (60 - shared, PAGE_SIZE), dtype=np.uint8)
        p = tmp_path / f"s{i}.img"
        np.concatenate([common[:shared], own]).tofile(p)
        paths.append(str(p))
    code, out, err = run("estimate", "--json", "--top", "3", *paths)
    assert code == 0, err
    r = json.loads(out)
    assert r["sources_total"] == 5
    assert [p["source"] for p in r["processes"]] == [paths[1], paths[2], paths[4]]
    code, out, _ = run("estimate", "--no-progress", "--top", "2", *paths)
    assert "(the 2 of 5 sources that save the most, by ksm_process_profit: --top)" in out
    assert run("estimate", "--sample", "--top", "0")[0] == 2


def test_notes_summed() -> None:
    procs = [{"notes": ["3 of 40 mappings KSM could merge", "10 pages present",
                        "1.5 MiB file-backed left out"]},
             {"notes": ["5 of 20 mappings KSM could merge", "7 pages present",
                        "0.5 MiB file-backed left out"]},
             {"notes": ["2 pages vanished while being read"]}]
    assert summarise_notes(procs) == [
        "8 of 60 mappings KSM could merge (2 sources)",
        "17 pages present (2 sources)",
        "2.0 MiB file-backed left out (2 sources)",
        "2 pages vanished while being read (1 source)",
    ]
