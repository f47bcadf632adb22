"""PNG plots (matplotlib, without pyplot's global state or a display)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..constants import PAGE_SIZE
from .errors import EstimateError
from .simulate import Run, ksmd_times

MAX_POINTS = 20_000  # per curve; the batch-by-batch record can be much longer


def _figure() -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(9, 5), dpi=110, layout="constrained")


def _save(fig: Any, path: str) -> None:
    try:
        fig.savefig(path)
    except (OSError, ValueError) as e:
        raise EstimateError(f"--plot {path}: cannot write the plot: {e}") from None


def check_path(path: str) -> None:
    """Fail before the (possibly long) run if the plot cannot be written."""
    if not path.lower().endswith(".png"):
        raise EstimateError(f"--plot {path}: the plot is a PNG file (name it *.png)", 2)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise EstimateError(f"--plot {path}: directory {parent} is not writable")


def _thin(n: int, keep: np.ndarray) -> np.ndarray:
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.unique(np.concatenate([np.linspace(0, n - 1, MAX_POINTS).astype(np.int64), keep]))


def _time_axis(t_max: float) -> tuple[float, str]:
    if t_max >= 7200:
        return 3600.0, "h"
    if t_max >= 120:
        return 60.0, "min"
    return 1.0, "s"


def savings(path: str, result: dict[str, Any], run: Run, cost_per_page_s: float) -> None:
    """Memory saved (and general_profit) against simulated ksmd time."""
    k = result["ksm"]
    fig = _figure()
    ax = fig.add_subplot()
    times = ksmd_times(run.processed, int(k["sleep_millisecs"]), cost_per_page_s)
    if len(times):
        idx = _thin(len(times), run.scan_ends)
        unit, name = _time_axis(float(times[-1]))
        t = np.concatenate([[0.0], times[idx] / unit])
        saved = np.concatenate([[0.0], run.saved[idx] * PAGE_SIZE / 2**20])
        profit = np.concatenate([[0.0], run.profit[idx] / 2**20])
        ax.step(t, saved, where="post", lw=2, label="memory saved (pages_sharing + ksm_zero_pages)")
        ax.step(t, profit, where="post", lw=1, ls="--", label="general_profit")
        for i, end in enumerate(run.scan_ends):
            ax.axvline(times[end] / unit, color="0.8", lw=0.8, zorder=0)
            ax.annotate(f"{i + 1}", (times[end] / unit, 0), xytext=(2, 2),
                        textcoords="offset points", fontsize=7, color="0.5")
        if result["time_to_converge_s"] is not None and result["converged_at_full_scan"]:
            tc = result["time_to_converge_s"] / unit
            ax.axvline(tc, color="tab:red", lw=1)
            ax.annotate(f"converged: {result['saved']['mib']:.1f} MiB",
                        (tc, result["saved"]["mib"]), xytext=(6, -14),
                        textcoords="offset points", color="tab:red")
        ax.set_xlabel(f"simulated ksmd time ({name}); grey lines: end of each full scan")
    else:
        ax.set_xlabel("simulated ksmd time (s)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=min(0.0, float(run.profit.min()) / 2**20 if len(run.profit) else 0.0))
    ax.set_title(
        f"ksmcore estimate: {len(result['processes'])} sources, "
        f"{result['pages'] * PAGE_SIZE / 2**20:.0f} MiB; pages_to_scan {k['pages_to_scan']}, "
        f"sleep_millisecs {k['sleep_millisecs']}, smart_scan {k['smart_scan']}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    _save(fig, path)


def tune(path: str, rows: list[dict[str, Any]], within_s: float,
         best: dict[str, Any] | None) -> None:
    """Time to 90% of the savings (bars: 50% to 100%) against pages scanned per second."""
    fig = _figure()
    ax = fig.add_subplot()
    # smart_scan 0 as open circles around smart_scan 1's squares: they often coincide
    for smart, color, marker, size in ((0, "tab:blue", "o", 9), (1, "tab:orange", "s", 4)):
        sel = [r for r in rows if r["smart_scan"] == smart and r["t90_s"] is not None
               and not r.get("advisor")]
        if not sel:
            continue
        x = np.array([r["pages_per_second"] for r in sel])
        y = np.array([r["t90_s"] for r in sel])
        lo = y - np.array([r["t50_s"] for r in sel])
        hi = np.array([r["t100_s"] for r in sel]) - y
        ax.errorbar(x, y, yerr=[lo, hi], fmt=marker, color=color, ms=size, capsize=2, lw=0.8,
                    mfc="none" if smart == 0 else color, label=f"smart_scan {smart}")
    ax.axhline(within_s, color="tab:red", ls="--", lw=1, label=f"target {within_s:g} s")
    adv = [r for r in rows if r.get("advisor") and r["t90_s"] is not None]
    if adv:
        ax.plot([r["pages_per_second"] for r in adv], [r["t90_s"] for r in adv], marker="D",
                color="tab:green", ls="none", ms=6, label="scan-time advisor (average pages/s)")
    if best is not None:
        ax.plot([best["pages_per_second"]], [best["t90_s"]], marker="*", ms=18, color="tab:red",
                ls="none", label=(f"cheapest: pages_to_scan "
                                  f"{'advisor' if best.get('advisor') else best['pages_to_scan']}, "
                                  f"sleep {best['sleep_millisecs']} ms, "
                                  f"smart_scan {best['smart_scan']}"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pages scanned per second (CPU cost)")
    ax.set_ylabel("simulated time to 90% of the savings (s); bars: 50% to 100%")
    ax.set_title("ksmcore tune: time to save memory against ksmd's scan rate", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)
