"""The compiled core and the Python code agree: the ABI version, a stale build refused
clearly, and the flags both sides name."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmcore import constants
from ksmcore._native import ABI_VERSION, _check_build, lib

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "ksmcore.h"


def test_abi_version_matches() -> None:
    assert lib.KSMCORE_ABI_VERSION == ABI_VERSION
    _check_build(HEADER)  # the tree's header is the one the core was built from


def test_stale_build_is_refused(tmp_path: Path) -> None:
    changed = tmp_path / "ksmcore.h"
    changed.write_text(HEADER.read_text().replace(
        "/* CFFI-END */", "int ksm_new_entry_point(void);\n/* CFFI-END */"))
    with pytest.raises(ImportError, match="stale"):
        _check_build(changed)


@pytest.mark.parametrize("python,c", [
    ("PAGE_SIZE", "KSM_PAGE_SIZE"),
    ("SEQNR_MASK", "KSM_SEQNR_MASK"),
    ("UNSTABLE_FLAG", "KSM_UNSTABLE_FLAG"),
    ("STABLE_FLAG", "KSM_STABLE_FLAG"),
    ("STABLE_NODE_CHAIN", "KSM_STABLE_NODE_CHAIN"),
])
def test_flags_equal_the_c_library(python: str, c: str) -> None:
    assert getattr(constants, python) == getattr(lib, c)


def test_typed_embedding_example() -> None:
    """tests/embed_example.py (checked by mypy in CI) runs: the shared half merges."""
    from embed_example import main

    assert main(pages=64) == 32
