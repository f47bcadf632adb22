"""``commands.validate``: every source option is checked before anything is read, and
``gather`` then reads what it passed."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from ksmcore.constants import PAGE_SIZE
from ksmcore.estimate.commands import SourceSpecs, add_parsers, gather, validate
from ksmcore.estimate.errors import EXIT_USAGE, EstimateError


def _args(*argv: str) -> argparse.Namespace:
    parser = add_parsers(argparse.ArgumentParser().add_subparsers())["estimate"]
    args = parser.parse_args(list(argv))
    args.command = "estimate"
    return args


def test_validate_reads_no_file(tmp_path: Path) -> None:
    """A file that does not exist passes validate (nothing is opened); gather is where
    it fails."""
    missing = tmp_path / "gone.img"
    args = _args(f"{missing}@1", "--pid", "7@0", "--nodes", "2")
    specs = validate(args)
    assert specs == SourceSpecs(files=[(str(missing), 1)], pids=[(7, 0)], uid=None)
    with pytest.raises(EstimateError, match="no such file"):
        gather(args, specs)


@pytest.mark.parametrize("argv, message", [
    ((), "nothing to estimate"),
    (("--user", "root"), "--user applies to --all only"),
    (("x.img", "--nodes", "0"), "--nodes 0: expected 1..64"),
    (("--pid", "12x"), "expected a process id"),
    (("--pid", "1@2"), "no NUMA node 2"),
    (("x.img@1",), "no NUMA node 1"),
    (("--all", "--user", "no-such-user-here"), "no such user"),
])
def test_validate_refuses(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(EstimateError, match=message) as e:
        validate(_args(*argv))
    assert e.value.exit_code == EXIT_USAGE


def test_gather_reads_in_order(tmp_path: Path) -> None:
    """Files in the order named, each on its node."""
    paths = []
    for i in range(2):
        path = tmp_path / f"{i}.img"
        np.full((3 + i, PAGE_SIZE), i + 1, np.uint8).tofile(path)
        paths.append(path)
    args = _args(f"{paths[1]}@1", str(paths[0]), "--nodes", "2")
    sources, remarks = gather(args, validate(args))
    assert [(s.name, s.node, s.npages) for s in sources] == [
        (str(paths[1]), 1, 4), (str(paths[0]), None, 3)]
    assert remarks == []
