"""``ksmcore tune``: sweep pages_to_scan x sleep_millisecs x smart_scan and show, for
each setting, how long ksmd takes to reach 50/90/100% of the savings against what it
costs (pages scanned per second), and name the cheapest setting that reaches 90%
within a target time.

Batch boundaries never change what ksmd decides, so one simulation per
(smart_scan, pages_to_scan) serves every sleep_millisecs: only the clock differs
(:func:`~.simulate.ksmd_times`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..constants import PAGE_SIZE
from ..knobs import kstrtoull
from ..profiles import resolve as resolve_profile
from ..timing import CostModel
from .errors import EXIT_USAGE, EstimateError
from .report import _table, duration, kernel_line, mib, render
from .simulate import (
    Knobs,
    converged_at_scan,
    cpu_fraction,
    ksmd_times,
    load,
    milestone_times,
    new_machine,
    pages_per_second,
    run_ksmd,
)
from .sources import Source

DEFAULT_PAGES_TO_SCAN = (100, 500, 1000, 5000, 10000)
DEFAULT_SLEEP_MILLISECS = (10, 20, 100, 200)
DEFAULT_SMART_SCAN = (0, 1)
DEFAULT_WITHIN = "10m"

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"10m"``, ``"90s"``, ``"1.5h"``, ``"500ms"`` or ``"90"`` (seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|min|m|h)?\s*", text, re.ASCII)
    if not m:
        raise EstimateError(f"--within {text!r}: expected a duration such as 10m, 90s or 1h",
                            EXIT_USAGE)
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_values(text: str, option: str, low: int = 0) -> tuple[int, ...]:
    """``"100,500,1000"`` as ints (each >= ``low``), without duplicates, in order."""
    try:  # each as the kernel reads a sysfs write (kstrtoull): no spaces, '_' or non-ASCII
        values = [kstrtoull(v) for v in text.split(",") if v]
    except OSError:
        values = []
    if not values or any(v < low for v in values):
        raise EstimateError(f"{option} {text!r}: expected a comma-separated list of integers "
                            f">= {low}", EXIT_USAGE)
    return tuple(dict.fromkeys(values))


def advisor_status(nodes: int, kernel: str | None = None) -> tuple[bool, str]:
    """Whether the scan-time advisor can join the sweep (it runs on the machine's
    simulated clock, ``Machine.run_for``, since it sets pages_to_scan from how long
    full scans take), and what its rows mean."""
    m = new_machine(nodes, Knobs(kernel=kernel))
    if not m.profile.has("advisor"):
        return False, f"Linux {m.profile.name} has no scan-time advisor (6.8+)"
    try:
        m.ksm.advisor_mode = "scan-time"
    except OSError as e:
        return False, f"advisor_mode=scan-time is refused ({e})"
    return True, ("advisor_mode=scan-time with smart_scan 1, for each sleep_millisecs; "
                  "its pages/s and CPU are averages over the run")


def _advisor_row(sources: Sequence[Source], base: Knobs, nodes: int, cost_per_page_s: float,
                 sleep: int, max_scans: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """ksmd with the scan-time advisor, on the machine's own clock: the advisor reads
    scan times, so the clock cannot be computed afterwards as for fixed settings.
    Observed after every run_for step (a tenth of a full scan at most), so its times
    are that coarse."""
    knobs = replace(base, smart_scan=1, sleep_millisecs=sleep)
    m = new_machine(nodes, knobs)
    m.cost_model = CostModel(page_ns=round(cost_per_page_s * 1e9))  # as the fixed settings
    m.ksm.advisor_mode = "scan-time"
    load(m, sources)
    total = sum(s.npages for s in sources)
    t0 = m.clock
    times: list[float] = []
    saved: list[int] = []
    scans: list[dict[str, Any]] = []
    converged_at = None
    if total:
        m.ksm.run = 1
        steps = 0
        # steps are a tenth of a scan: the cap only stops a ksmd that stopped scanning
        while len(scans) < max_scans and converged_at is None and steps < 100 * max_scans:
            steps += 1
            pts = max(1, int(m.ksm.pages_to_scan))
            scan_s = (total / pts + 1) * (sleep / 1000 + pts * cost_per_page_s)
            m.run_for(max(scan_s / 10, 1e-3))
            s = m.ksm.stats(every=True)
            times.append(m.clock - t0)
            saved.append(int(s["pages_sharing"]) + int(s["ksm_zero_pages"]))
            while len(scans) < int(s["full_scans"]):
                scans.append(s)
            converged_at = converged_at_scan(scans)
    elapsed = times[-1] if times else 0.0
    cpu_s = m.ksmd_cpu_ns / 1e9
    s = m.ksm.stats(every=True)
    row = {
        "advisor": True,
        "smart_scan": 1,
        "pages_to_scan": int(s["pages_to_scan"]),
        "sleep_millisecs": sleep,
        "pages_per_second": int(s["pages_scanned"]) / elapsed if elapsed else 0.0,
        "cpu_fraction": cpu_s / elapsed if elapsed else 0.0,
        "saved_pages": saved[-1] if saved else 0,
        "converged": converged_at is not None or not total,
        "full_scans_to_converge": converged_at or 0,
    }
    return row, np.array(saved, np.int64), np.array(times)


ProgressHook = Callable[[str], None]


def sweep(sources: Sequence[Source], base: Knobs, nodes: int, cost_per_page_s: float,
          pages_to_scan: Sequence[int], sleep_millisecs: Sequence[int],
          smart_scan: Sequence[int], max_scans: int,
          progress: ProgressHook | None = None, advisor: bool = False) -> list[dict[str, Any]]:
    """One row per setting, with the times to 50/90/100% of the best savings found;
    with ``advisor``, one more per sleep_millisecs with the scan-time advisor."""
    runs = []
    for smart in smart_scan:
        for pts in pages_to_scan:
            knobs = replace(base, pages_to_scan=pts, smart_scan=smart)
            if progress is not None:
                progress(f"smart_scan {smart}, pages_to_scan {pts}")
            m = new_machine(nodes, knobs)
            load(m, sources)
            run = run_ksmd(m, max_scans)
            final = int(run.saved[-1]) if len(run.saved) else 0
            runs.append((smart, pts, run, final))
    advised = []
    if advisor:
        for sleep in sleep_millisecs:
            if progress is not None:
                progress(f"advisor, sleep_millisecs {sleep}")
            advised.append(_advisor_row(sources, base, nodes, cost_per_page_s, sleep,
                                        max_scans))
    # Measure every setting against the best savings any reached, so a setting that
    # converges on less does not look fast.
    reference = max([r[3] for r in runs] + [a[0]["saved_pages"] for a in advised], default=0)
    rows = []
    for row, saved, times in advised:
        ms = milestone_times(saved, times, reference)
        rows.append(row | {"t50_s": ms["50%"], "t90_s": ms["90%"], "t100_s": ms["100%"]})
    for smart, pts, run, final in runs:
        for sleep in sleep_millisecs:
            times = ksmd_times(run.processed, sleep, cost_per_page_s)
            ms = milestone_times(run.saved, times, reference)
            rows.append({
                "advisor": False,
                "smart_scan": smart,
                "pages_to_scan": pts,
                "sleep_millisecs": sleep,
                "pages_per_second": pages_per_second(pts, sleep, cost_per_page_s),
                "cpu_fraction": cpu_fraction(pts, sleep, cost_per_page_s),
                "t50_s": ms["50%"],
                "t90_s": ms["90%"],
                "t100_s": ms["100%"],
                "saved_pages": final,
                "converged": run.converged,
                "full_scans_to_converge": run.converged_at,
            })
    rows.sort(key=lambda r: (r["pages_per_second"], r["smart_scan"]))
    return rows


def cheapest(rows: Sequence[dict[str, Any]], within_s: float) -> dict[str, Any] | None:
    """The lowest scan rate that reaches 90% of the savings within ``within_s``."""
    ok = [r for r in rows if r["t90_s"] is not None and r["t90_s"] <= within_s]
    # ties: the faster one, then smart_scan 1 (the kernel default; it saves CPU on
    # memory that changes, which a static snapshot cannot show)
    return min(ok, key=lambda r: (r["pages_per_second"], r["t90_s"], -r["smart_scan"]),
               default=None)


SYSFS = "/sys/kernel/mm/ksm"
KERNEL_DEFAULTS = Knobs()
# the scan-time advisor's own settings (the kernel's defaults, as the sweep ran it)
ADVISOR_SETTINGS = ("advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
                    "advisor_target_scan_time")


def advisor_settings(nodes: int) -> dict[str, int]:
    m = new_machine(nodes, Knobs())
    return {name: int(getattr(m.ksm, name)) for name in ADVISOR_SETTINGS}


def apply_lines(best: dict[str, Any] | None, base: Knobs,
                advisor: dict[str, int] | None = None) -> list[str]:
    """The shell lines that set the pick on a host: the knobs that take effect only
    while no KSM page exists (merge_across_nodes, max_page_sharing) after ``run=2``,
    which unmerges everything; for the advisor row, advisor_mode and its settings
    (the advisor sets pages_to_scan itself)."""
    if best is None:
        return []
    lines = []
    fixed = {k: v for k, v in base.as_dict().items()
             if k in ("merge_across_nodes", "max_page_sharing", "use_zero_pages")
             and v != getattr(KERNEL_DEFAULTS, k)}
    if "merge_across_nodes" in fixed or "max_page_sharing" in fixed:
        lines.append(f"echo 2 > {SYSFS}/run")
    knobs: dict[str, Any] = dict(fixed)
    if best.get("advisor"):
        knobs["advisor_mode"] = "scan-time"
        knobs |= advisor or {}
    else:
        knobs["advisor_mode"] = "none"
        knobs["pages_to_scan"] = best["pages_to_scan"]
    knobs["sleep_millisecs"] = best["sleep_millisecs"]
    knobs["smart_scan"] = best["smart_scan"]
    lines += [f"echo {v} > {SYSFS}/{k}" for k, v in knobs.items()]
    lines.append(f"echo 1 > {SYSFS}/run")
    return lines


def edge_remark(best: dict[str, Any] | None, pages_to_scan: Sequence[int],
                sleep_millisecs: Sequence[int]) -> str | None:
    """Say when the pick is the cheapest corner of the grid in some knob: a cheaper
    setting may lie beyond it."""
    if best is None:
        return None
    beyond = []
    if not best.get("advisor") and len(pages_to_scan) and best["pages_to_scan"] == min(
            pages_to_scan):
        beyond.append(f"pages_to_scan below {best['pages_to_scan']}")
    if len(sleep_millisecs) and best["sleep_millisecs"] == max(sleep_millisecs):
        beyond.append(f"sleep_millisecs above {best['sleep_millisecs']}")
    if not beyond:
        return None
    return ("the pick sits on the edge of the grid: a cheaper setting may reach the target "
            "too, with " + " or ".join(beyond) + " (widen --pages-to-scan-values / "
            "--sleep-millisecs-values)")


def cpu_per_saved(row: dict[str, Any]) -> float | None:
    """ksmd's share of one CPU (in %) per GiB it keeps saved at this setting."""
    gib = row["saved_pages"] * PAGE_SIZE / 2**30
    return 100 * row["cpu_fraction"] / gib if gib else None


RESULT_KEYS = ("pages_per_second", "cpu_fraction", "t50_s", "t90_s", "t100_s", "saved_pages",
               "converged", "full_scans_to_converge", "advisor", "pages_to_scan",
               "sleep_millisecs")


def fold(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """Rows whose results are identical, folded: (the first row, its smart_scan values)."""
    out: list[tuple[dict[str, Any], list[int]]] = []
    seen: dict[tuple[Any, ...], int] = {}
    for r in rows:
        key = tuple(r[k] for k in RESULT_KEYS)
        if key in seen:
            out[seen[key]][1].append(r["smart_scan"])
            continue
        seen[key] = len(out)
        out.append((r, [r["smart_scan"]]))
    return out


def numa_tradeoff(sources: Sequence[Source], base: Knobs, nodes: int, pages_to_scan: int,
                  max_scans: int) -> list[dict[str, Any]]:
    """merge_across_nodes 1 against 0 when the sources sit on several nodes: what
    per-node trees lose in savings, against the mappings that 1 leaves on a KSM page
    of another node (every access to them crosses the interconnect)."""
    from .mappings import remote_mappings

    out = []
    for mam in (1, 0):
        m = new_machine(nodes, replace(base, merge_across_nodes=mam, pages_to_scan=pages_to_scan))
        procs = load(m, sources)
        run = run_ksmd(m, max_scans)
        saved = int(run.saved[-1]) if len(run.saved) else 0
        out.append({
            "merge_across_nodes": mam,
            "saved_pages": saved,
            "saved_mib": round(mib(saved), 3),
            "remote_mappings": remote_mappings(m, procs, [s.node or 0 for s in sources]),
            "converged": run.converged,
        })
    lost = out[0]["saved_pages"] - out[1]["saved_pages"]
    out[1]["savings_lost"] = lost
    out[0]["savings_lost"] = 0
    return out


def build(sources: Sequence[Source], rows: list[dict[str, Any]], within_s: float,
          advisor: tuple[bool, str], base: Knobs, cost_per_page_s: float,
          grid: tuple[Sequence[int], Sequence[int]] = ((), ()),
          advisor_knobs: dict[str, int] | None = None,
          numa: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    total = sum(s.npages for s in sources)
    reference = max((r["saved_pages"] for r in rows), default=0)
    for r in rows:
        r["cpu_percent_per_gib_saved"] = cpu_per_saved(r)
    best = cheapest(rows, within_s)
    return {
        "kernel": resolve_profile(base.kernel).name,
        "sources": [s.name for s in sources],
        "pages": total,
        "reference_saved_pages": reference,
        "reference_saved_mib": round(mib(reference), 3),
        "within_s": within_s,
        "knobs": {k: v for k, v in base.as_dict().items()
                  if k not in ("pages_to_scan", "sleep_millisecs", "smart_scan")},
        "cost_per_page_us": cost_per_page_s * 1e6,
        "settings": rows,
        "cheapest": best,
        "apply": apply_lines(best, base, advisor_knobs),
        "edge": edge_remark(best, *grid),
        "merge_across_nodes": numa,
        "advisor": {"included": advisor[0], "reason": advisor[1]},
    }


def _header(result: dict[str, Any]) -> list[str]:
    """The sources, the savings every setting is measured against, the fixed knobs."""
    ref = result["reference_saved_pages"]
    return [
        f"ksmcore tune: {len(result['sources'])} sources, {result['pages']} pages "
        f"({result['pages'] * PAGE_SIZE / 2**20:.1f} MiB); savings at convergence: {ref} pages "
        f"= {result['reference_saved_mib']:.1f} MiB",
        "fixed knobs: " + ", ".join(f"{k} {v}" for k, v in result["knobs"].items())
        + f"; cost model {result['cost_per_page_us']:.2f} us per page",
        kernel_line(result["kernel"]),
        "",
    ]


def _settings_table(result: dict[str, Any]) -> list[str]:
    """One row per setting (identical smart_scan rows folded), the pick marked <."""
    rows = result["settings"]
    best = result["cheapest"]
    table = []
    for r, smart in fold(rows):
        mark = " <" if best is not None and any(
            best is x for x in rows if all(x[k] == r[k] for k in RESULT_KEYS)) else ""
        per = r.get("cpu_percent_per_gib_saved")
        table.append([
            ",".join(map(str, smart)),
            f"advisor: {r['pages_to_scan']}" if r.get("advisor") else r["pages_to_scan"],
            r["sleep_millisecs"],
            f"{r['pages_per_second']:.0f}", f"{100 * r['cpu_fraction']:.1f}",
            "-" if per is None else f"{per:.1f}",
            duration(r["t50_s"]), duration(r["t90_s"]), duration(r["t100_s"]),
            f"{r['full_scans_to_converge'] if r['converged'] else 'no'}{mark}",
        ])
    return _table(["smart_scan", "pages_to_scan", "sleep_ms", "pages/s", "CPU%",
                   "CPU%/GiB", "to 50%", "to 90%", "to 100%", "scans"], table, left=0) + [""]


def _verdict(result: dict[str, Any]) -> list[str]:
    """The cheapest setting reaching 90% within the target (or why there is none), and
    whether a cheaper one may lie beyond the grid."""
    rows = result["settings"]
    best = result["cheapest"]
    within = result["within_s"]
    lines = []
    if not result["reference_saved_pages"]:
        lines.append("nothing to save: KSM would merge nothing in these sources")
    elif best is None:
        fastest = min((r for r in rows if r["t90_s"] is not None), key=lambda r: r["t90_s"],
                      default=None)
        lines.append(f"no setting reaches 90% of the savings within {duration(within)}"
                     + (f"; the fastest takes {duration(fastest['t90_s'])} "
                        f"(pages_to_scan {fastest['pages_to_scan']}, sleep_millisecs "
                        f"{fastest['sleep_millisecs']}, smart_scan {fastest['smart_scan']})"
                        if fastest else ""))
    else:
        lines.append(
            f"cheapest setting reaching 90% within {duration(within)} (marked <): "
            f"pages_to_scan {best['pages_to_scan']}, sleep_millisecs {best['sleep_millisecs']}, "
            f"smart_scan {best['smart_scan']}: {best['pages_per_second']:.0f} pages/s, "
            f"{100 * best['cpu_fraction']:.1f}% of one CPU, 90% after {duration(best['t90_s'])}"
        )
    if result.get("edge"):
        lines.append(result["edge"])
    return lines


def _apply(result: dict[str, Any]) -> list[str]:
    """The shell lines that set the pick on a host."""
    if not result.get("apply"):
        return []
    return ["", "to apply it (as root):"] + [f"  {x}" for x in result["apply"]]


def _numa(result: dict[str, Any]) -> list[str]:
    """merge_across_nodes 1 against 0, when the sources sit on several nodes."""
    if not result.get("merge_across_nodes"):
        return []
    lines = ["", "merge_across_nodes (the sources sit on several nodes):"]
    lines += _table(["merge_across_nodes", "saved_MiB", "savings_lost_pages",
                     "remote_mappings"],
                    [[x["merge_across_nodes"], f"{x['saved_mib']:.1f}", x["savings_lost"],
                      x["remote_mappings"]] for x in result["merge_across_nodes"]], left=0)
    lines.append("  1: one tree, a KSM page serves every node (remote_mappings: pages "
                 "mapped from a KSM page on another node); 0: a tree per node, no remote "
                 "mapping, the savings lost to per-node trees")
    return lines


def _legend(result: dict[str, Any]) -> list[str]:
    """What the columns and the advisor rows mean (or why the advisor is left out)."""
    lines = ["CPU%/GiB: ksmd's share of one CPU while scanning, per GiB it keeps saved; "
             "smart_scan \"0,1\": both gave identical results"]
    adv = result["advisor"]
    if not adv["included"]:
        lines.append(f"advisor (advisor_mode=scan-time): left out of the sweep: {adv['reason']}")
    else:
        lines.append(f"advisor rows (pages_to_scan \"advisor: N\", N where it settled): "
                     f"{adv['reason']}")
    return lines


SECTIONS = (_header, _settings_table, _verdict, _apply, _numa, _legend)


def text(result: dict[str, Any]) -> str:
    """The readable table and pick: its sections in order."""
    return render(SECTIONS, result)
