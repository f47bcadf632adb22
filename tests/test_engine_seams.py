"""The engine's seams (issue 13): its classes reach each other only through public
names, mm code reaches ksmd only through the kernel's hooks (engine/hooks.py), and a
process's mm is its own object, replaced by exec."""

from __future__ import annotations

import ast
from pathlib import Path

import ksmcore
import ksmcore.engine

ENGINE = Path(ksmcore.engine.__file__).parent
# the machine's lock, handed to every object that serializes calls (guard.py)
WIRING = {"_guard"}


def private_reaches(path: Path) -> list[str]:
    """Every ``x._name`` in the module where x is not ``self`` (nor a dunder)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name in WIRING:
            continue
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            continue
        out.append(f"{path.name}:{node.lineno}: .{name}")
    return out


def test_no_private_cross_calls_between_engine_classes() -> None:
    found = [hit for path in sorted(ENGINE.glob("*.py")) for hit in private_reaches(path)]
    assert found == []


def test_mm_code_reaches_ksmd_only_through_the_hooks() -> None:
    for name in ("mm.py", "process.py"):
        tree = ast.parse((ENGINE / name).read_text())
        reached = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not reached & {"ksm", "ksmd"}, name
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"ksm", "ksmd"}, name


def test_exec_gives_the_process_a_new_mm_and_puts_the_old_one() -> None:
    m = ksmcore.Machine()
    p = m.spawn()
    addr = p.mmap(4)
    p.write(addr, b"x" * 4096 * 4)
    p.madvise(addr, 4 * 4096, ksmcore.MADV_MERGEABLE)
    m.ksm.run = 1
    m.ksm.scan(1)  # the old mm now has rmap_items: its slot outlives the exec
    old = p.mm
    p.exec()
    assert p.mm is not old and p.mm.pid == old.pid == p.pid
    assert old.exiting and not old.vmas and not p.mm.exiting
    assert p.maps() == []
    m.check_invariants()
    m.ksm.scan(1)  # ksmd frees the old mm's rmap_items and drops its slot
    assert not old.ksm_registered
    assert p.ksm_stat(every=True)["ksm_rmap_items"] == 0
    m.check_invariants()
