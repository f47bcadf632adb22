"""``ksmcore compare``: on a host where KSM already runs, what ksmd holds now against
what it converges to, and how long it needs.

It reads, and never writes, /sys/kernel/mm/ksm and the /proc/PID/ksm_stat of the
processes KSM scans (VM_MERGEABLE ranges or PR_SET_MEMORY_MERGE), reads those
processes as ``estimate --pid PID --mergeable-only`` does, and runs the estimate with
the host's knobs. Pages the host's ksmd already merged are read like any other page
(a KSM page is an anonymous page), so the estimate starts from the same contents;
with use_zero_pages, pages ksmd already replaced by the zero page are not visible
any more (the zero page is never a candidate) and are counted from ksm_stat instead.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from .errors import EXIT_USAGE, EstimateError
from .procmem import ProcessUnreadable, read_process
from .report import _table, duration, mib, render
from .simulate import Knobs, cpu_fraction, ksmd_times, load, new_machine, run_ksmd
from .sources import Source

KSM_DIR = Path("/sys/kernel/mm/ksm")
KNOB_NAMES = ("merge_across_nodes", "max_page_sharing", "pages_to_scan", "sleep_millisecs",
              "smart_scan", "use_zero_pages")
SAVINGS = ("pages_shared", "pages_sharing", "ksm_zero_pages", "general_profit")


def read_host_ksm(root: Path = KSM_DIR) -> dict[str, int | str]:
    """Every file of /sys/kernel/mm/ksm, read only."""
    if not root.is_dir():
        raise EstimateError(f"{root}: no such directory (a kernel without CONFIG_KSM?)")
    out: dict[str, int | str] = {}
    for f in sorted(root.iterdir()):
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if f.name == "advisor_mode":
            m = re.search(r"\[(\S+)\]", text)
            out[f.name] = m.group(1) if m else text
        else:
            try:
                out[f.name] = int(text)
            except ValueError:
                out[f.name] = text
    return out


def read_ksm_stat(pid: int) -> dict[str, int | bool] | None:
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return None
    out: dict[str, int | bool] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        value = value.strip()
        try:
            out[key.rstrip(":")] = value == "yes" if value in ("yes", "no") else int(value)
        except ValueError:
            continue
    return out


def mergeable_pids() -> list[int]:
    """The processes KSM scans now: a VM_MERGEABLE range, PR_SET_MEMORY_MERGE, or
    rmap_items left from one."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        st = read_ksm_stat(int(entry))
        if st and (st.get("ksm_mergeable") or st.get("ksm_merge_any")
                   or int(st.get("ksm_rmap_items", 0))):
            out.append(int(entry))
    return sorted(out)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """The comparison as the --json object."""
    from . import report

    if getattr(args, "sources", None):
        raise EstimateError(f"compare reads the host's mergeable processes; unexpected "
                            f"{' '.join(args.sources)}", EXIT_USAGE)
    host = read_host_ksm()
    pids = [int(p) for p in args.pid] if args.pid else mergeable_pids()
    if not pids:
        raise EstimateError("no process is registered with KSM here (no VM_MERGEABLE range, "
                            "no PR_SET_MEMORY_MERGE): nothing to compare; ksmcore estimate "
                            "tells what KSM would save")
    knobs = Knobs(**{k: int(host[k]) for k in KNOB_NAMES if k in host})  # type: ignore[arg-type]
    sources: list[Source] = []
    stats: list[dict[str, Any]] = []
    remarks: list[str] = []
    for pid in pids:
        try:
            src = read_process(pid, mergeable_only=True)
        except ProcessUnreadable as e:
            remarks.append(str(e))
            continue
        st = read_ksm_stat(pid) or {}
        sources.append(src)
        stats.append({"pid": pid, "comm": _comm(pid), "ksm_stat": st})
    if not sources:
        raise EstimateError("none of the mergeable processes could be read: "
                            + "; ".join(remarks))
    cost = args.cost_per_page_us * 1e-6
    m = new_machine(1, knobs)
    procs = load(m, sources)
    run = run_ksmd(m, args.max_scans)
    est = report.build(m, procs, sources, run, knobs, cost)
    faster_pts = args.faster_pages_to_scan or max(1000, 10 * knobs.pages_to_scan)
    fm = new_machine(1, Knobs(**(knobs.as_dict() | {"pages_to_scan": faster_pts})))
    load(fm, sources)
    frun = run_ksmd(fm, args.max_scans)
    ftimes = ksmd_times(frun.processed, knobs.sleep_millisecs, cost)
    f_conv = (float(ftimes[frun.scan_ends[frun.converged_at - 1]])
              if frun.converged and frun.converged_at else None)
    now_saved = int(host.get("pages_sharing", 0)) + int(host.get("ksm_zero_pages", 0))
    will = est["saved"]["pages"]
    zero_hidden = knobs.use_zero_pages and any(int(s["ksm_stat"].get("ksm_zero_pages", 0))
                                               for s in stats)
    if zero_hidden:
        remarks.append("use_zero_pages: pages ksmd already mapped to the zero page are not "
                       "candidates any more; the estimate does not see them (ksm_zero_pages "
                       "of the host counts them)")
    if host.get("advisor_mode") == "scan-time":
        remarks.append("advisor_mode scan-time: ksmd moves pages_to_scan itself; the times "
                       "are for today's pages_to_scan")
    return {
        "host": {
            "ksm": host,
            "processes": stats,
            "saved_pages": now_saved,
            "saved_mib": round(mib(now_saved), 3),
        },
        "estimate": est,
        "converged_saved_pages": will,
        "fraction_reached": now_saved / will if will else (1.0 if not now_saved else None),
        "time_to_converge_s": est["time_to_converge_s"],
        "faster": {
            "pages_to_scan": faster_pts,
            "sleep_millisecs": knobs.sleep_millisecs,
            "time_to_converge_s": f_conv,
            "cpu_fraction": cpu_fraction(faster_pts, knobs.sleep_millisecs, cost),
        },
        "remarks": remarks,
    }


def _header(result: dict[str, Any]) -> list[str]:
    """The processes compared and the host's knobs."""
    k = result["host"]["ksm"]
    est = result["estimate"]
    procs = result["host"]["processes"]
    return [
        f"ksmcore compare: {len(procs)} process{'es' * (len(procs) != 1)} registered with "
        f"KSM, {est['pages']} candidate pages ({mib(est['pages']):.1f} MiB)",
        "host knobs: " + ", ".join(f"{n} {k[n]}" for n in (*KNOB_NAMES, "advisor_mode")
                                   if n in k)
        + f"; ksmd has run {k.get('full_scans', 0)} full scans",
        "",
    ]


def _savings(result: dict[str, Any]) -> list[str]:
    """The host's savings counters now against the estimate's converged ones."""
    host = result["host"]
    k = host["ksm"]
    ek = result["estimate"]["ksm"]
    rows = []
    for name in SAVINGS:
        now, then = int(k.get(name, 0)), int(ek[name])
        if name == "general_profit":
            rows.append([name + " (MiB)", f"{now / 2**20:.1f}", f"{then / 2**20:.1f}"])
        else:
            rows.append([name, str(now), str(then)])
    rows.append(["memory saved (MiB)", f"{host['saved_mib']:.1f}",
                 f"{mib(result['converged_saved_pages']):.1f}"])
    lines = _table(["", "ksmd now", "converged (estimate)"], rows)
    frac = result["fraction_reached"]
    if frac is not None:
        lines.append(f"  ksmd holds {100 * frac:.0f}% of the savings it converges to")
    return lines


def _timing(result: dict[str, Any]) -> list[str]:
    """How long ksmd needs to converge at the host's knobs and at a faster setting."""
    k = result["host"]["ksm"]
    f = result["faster"]
    return [
        "",
        f"time to converge  {duration(result['time_to_converge_s'])} of ksmd from the start "
        f"at the host's knobs (pages_to_scan {k.get('pages_to_scan')}, sleep_millisecs "
        f"{k.get('sleep_millisecs')}); counters final after full scan "
        f"{result['estimate']['converged_at_full_scan']}",
        f"                  {duration(f['time_to_converge_s'])} at pages_to_scan "
        f"{f['pages_to_scan']} ({100 * f['cpu_fraction']:.1f}% of one CPU while scanning)",
    ]


def _per_process(result: dict[str, Any]) -> list[str]:
    """Each process's ksm_stat now against the estimate's converged one."""
    rows = []
    for p, e in zip(result["host"]["processes"], result["estimate"]["processes"], strict=True):
        st = p["ksm_stat"]
        rows.append([f"{p['pid']} ({p['comm']})", e["pages"], st.get("ksm_rmap_items", "-"),
                     st.get("ksm_merging_pages", "-"), e["ksm_stat"]["ksm_merging_pages"],
                     st.get("ksm_zero_pages", "-"), e["ksm_stat"]["ksm_zero_pages"]])
    return ["", "per process (/proc/<pid>/ksm_stat now, and converged):"] + _table(
        ["process", "pages", "rmap_items", "merging_now", "merging_converged",
         "zero_now", "zero_converged"], rows)


def _remarks(result: dict[str, Any]) -> list[str]:
    return [""] + result["remarks"] if result["remarks"] else []


def text(result: dict[str, Any]) -> str:
    """The readable comparison: its sections in order."""
    sections = (_header, _savings, _timing, _per_process, _remarks)
    return render(sections, result)
