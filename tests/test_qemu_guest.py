"""Machine(nodes=2, kernel="6.1") against a real 6.1 kernel in a two-node QEMU guest
(tests/qemu_guest.py): the issue's two minimal cases and a few random NUMA programs,
operation by operation. One boot, about 10 s under TCG; the 150-program sweep is
``python tests/qemu_guest.py --programs 150``. Skips where QEMU, a static libc or
the kernel image is absent (the README says how to install them)."""

from __future__ import annotations

import errno

import pytest
import qemu_guest

REASON = qemu_guest.missing("6.1")

# merge order: one process, 25 equal pages, one scan, fork, one scan
MERGE_ORDER = ["P", "K merge_across_nodes 1", "K use_zero_pages 0", "S 0", "M 0 25 -1",
               "F 0 0 0 " + " ".join(["7"] * 25), "A 0 0 0 25 12", "C", "X 0", "C"]
# move_pages: 26 equal merged pages on node 1, three of them to node 0 with MOVE_ALL
MOVE_PAGES = ["P", "K merge_across_nodes 1", "K use_zero_pages 0", "S 1", "M 0 26 -1",
              "F 0 0 0 " + " ".join(["9"] * 26), "A 0 0 0 26 12", "C", "C",
              "V 0 0 0 3 0 4"]
# sysfs files 6.1 does not have: writing them fails as a missing file does (ENOENT)
MISSING_FILES = ["P", "S 0", "K smart_scan 0", "K pages_skipped 0", "K advisor_mode none",
                 "K advisor_max_cpu 70", "K pages_scanned 0", "K ksm_zero_pages 0",
                 "K general_profit 0", "K use_zero_pages 0"]
RANDOM_SEEDS = (7, 8, 9)


@pytest.fixture(scope="module")
def guest() -> tuple[str, list[list[str]], list[qemu_guest.Step]]:
    if REASON:
        pytest.skip(f"the QEMU guest cannot run: {REASON}")
    programs = [MERGE_ORDER, MOVE_PAGES, MISSING_FILES] + [qemu_guest.generate(s)
                                                          for s in RANDOM_SEEDS]
    image = qemu_guest.find_kernel("6.1")
    assert image is not None
    header, steps = qemu_guest.parse(qemu_guest.boot(
        [line for p in programs for line in p], image, timeout=300))
    return header, programs, steps


def test_the_guest_runs_linux_6_1_on_two_nodes(guest: tuple) -> None:
    header, _, _ = guest
    assert header.startswith("6.1.") and "nodes 0-1" in header


def test_issue_minimal_cases_on_the_real_kernel(guest: tuple) -> None:
    _, _, steps = guest
    merge = steps[len(MERGE_ORDER) - 1]
    assert (merge.counters["pages_shared"], merge.counters["pages_sharing"],
            merge.counters["pages_volatile"]) == (1, 49, 0)
    move = steps[len(MERGE_ORDER) + len(MOVE_PAGES) - 1]
    assert move.reply.split() == ["0", "0", str(-errno.EBUSY), "0"]
    first = len(MERGE_ORDER) + len(MOVE_PAGES)
    missing = steps[first:first + len(MISSING_FILES)]
    assert [s.reply for s in missing[2:-1]] == [str(-errno.ENOENT)] * 7
    assert missing[-1].reply == "0"
    assert missing[-1].workers[0][2] == 1  # /proc/PID/ksm_stat: ksm_rmap_items alone


def test_model_matches_the_kernel_op_by_op(guest: tuple) -> None:
    _, programs, steps = guest
    diffs = qemu_guest.compare(programs, steps, "6.1")
    assert not diffs, "\n".join(f"program {d.program} step {d.step} [{d.op}]: {d.what}"
                                for d in diffs[:5])
    assert sum(len(p) for p in programs) == len(steps) > 80


def test_the_6_18_profile_does_not_match_6_1(guest: tuple) -> None:
    """The comparison has teeth: the newest profile's merge order differs from the
    real 6.1 (and so does its move_pages status of pages not present)."""
    import ksmcore

    _, _, steps = guest
    kernel = steps[len(MERGE_ORDER) - 1].observed()
    run = qemu_guest.Runner(ksmcore.Machine, "6.18")
    for line in MERGE_ORDER:
        model = run.observe(run.apply(line), line)
    assert (model["counters"]["pages_sharing"], model["counters"]["pages_volatile"]) == (25, 24)
    assert model["counters"] != kernel["counters"]
    assert qemu_guest.compare([MERGE_ORDER], steps[:len(MERGE_ORDER)], "6.18")
