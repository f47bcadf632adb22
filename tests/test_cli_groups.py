"""The CLI loads only the module of the command it runs (cli.COMMAND_GROUPS): the table
must name exactly the commands each module adds, and a command line must work the same
with one group loaded as with all."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from ksmcore import cli
from ksmcore.estimate.commands import add_parsers as add_estimate
from ksmcore.estimate.record import add_parser as add_record
from ksmcore.fleet.commands import add_parsers as add_fleet


def _names(add: object) -> set[str]:
    sub = argparse.ArgumentParser().add_subparsers()
    add(sub)  # type: ignore[operator]
    return set(sub.choices)


def test_the_table_names_what_each_module_adds() -> None:
    assert _names(add_estimate) == set(cli.COMMAND_GROUPS["estimate"])
    assert _names(add_fleet) == set(cli.COMMAND_GROUPS["fleet"])
    assert _names(add_record) == set(cli.COMMAND_GROUPS["record"])


@pytest.mark.parametrize("argv, groups", [
    (["estimate", "--sample"], {"estimate"}),
    (["tune", "x.img"], {"estimate"}),
    (["fleet", "--help"], {"fleet"}),
    (["sketch", "-o", "s", "a.img"], {"fleet"}),
    (["record", "--pid", "1"], {"record"}),
    (["--help"], set(cli.COMMAND_GROUPS)),
    (["demo"], set(cli.COMMAND_GROUPS)),
    (["nosuchcommand"], set(cli.COMMAND_GROUPS)),
    ([], set(cli.COMMAND_GROUPS)),
])
def test_command_groups(argv: list[str], groups: set[str]) -> None:
    assert cli._command_groups(argv) == groups


def test_one_group_loaded() -> None:
    """`ksmcore estimate` imports neither ksmcore.fleet nor the recorder's trace format;
    the top-level help still lists every command."""
    probe = ("import sys; from ksmcore import cli\n"
             "try:\n    cli._main(['estimate', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith(('ksmcore.fleet', "
             "'ksmcore.estimate.record'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    top = subprocess.run([sys.executable, "-m", "ksmcore.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for names in cli.COMMAND_GROUPS.values():
        for name in names:
            assert name in top
    bad = subprocess.run([sys.executable, "-m", "ksmcore.cli", "nosuchcommand"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "fleet" in bad.stderr and "estimate" in bad.stderr


def test_main_in_process_leaves_the_collector_alone(tmp_path: object) -> None:
    """cli.main() is for programs that go on: it neither retunes nor freezes the gc
    (console(), the console script, does both for its own process)."""
    import gc

    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert cli.main(["estimate", "--sample", "--json", "--no-progress"]) == 0
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen
    out = subprocess.run([sys.executable, "-c", "import sys; from ksmcore import cli; "
                          "sys.argv = ['ksmcore', '--version']; cli.console()"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ksmcore ")
