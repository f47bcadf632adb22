"""Side-by-side timing: every benchmark records its seconds per page here, and the
session ends with the ratios (engine vs kernel vs reference) of this one run."""

from __future__ import annotations

from typing import Any

import pytest

TIMES: dict[str, dict[str, float]] = {}  # workload -> implementation -> seconds per page


@pytest.fixture
def record() -> Any:
    def _record(workload: str, impl: str, seconds: float, pages: int) -> None:
        TIMES.setdefault(workload, {})[impl] = seconds / pages

    return _record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMES:
        return
    tr = terminalreporter
    tr.section("ksmcore ratios (same run; time per page)")
    for workload, t in sorted(TIMES.items()):
        parts = [f"{impl} {1 / s / 1e6:.2f} Mpages/s" for impl, s in sorted(t.items())]
        tr.write_line(f"{workload}: " + ", ".join(parts))
        if "engine" in t:
            for other in ("kernel", "reference"):
                if other in t:
                    tr.write_line(f"  engine is {t[other] / t['engine']:.1f}x faster than {other}")
