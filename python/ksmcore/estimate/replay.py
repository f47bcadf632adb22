"""``ksmcore estimate TRACE`` and ``ksmcore tune TRACE``: memory that moves, replayed.

A trace (``ksmcore record``) is replayed onto a simulated machine while ksmd runs on
its clock (:mod:`ksmcore.trace.replay`): the report is the timeline of every sysfs
counter and the steady state over the trace's second half: what ksmd holds while the
processes keep writing, and what it costs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import Any

from ..constants import PAGE_SIZE
from ..timing import CostModel
from ..trace.format import Trace, TraceError, is_trace, read_trace
from ..trace.replay import Replay, replay, steady_state
from .errors import EXIT_USAGE, EstimateError
from .report import _table, render
from .simulate import DEFAULT_COST_PER_PAGE_US, Knobs, knob_option, new_machine
from .sources import split_node

# The cost model of estimate/tune on a trace, unless --cost-model names a file made by
# `ksmcore calibrate`: sleeps in jiffies of HZ=250 (a common distribution HZ, and this
# machine's) as the timer wheel times them, and the costs `ksmcore calibrate` measured
# on the development machine (2 vCPUs, shared: a load average of about 4-8).
HOST_MODEL = CostModel(page_ns=3000, batch_ns=140_000, hz=250, wake_ns=1_200_000)
TIMELINE_MS = 1000

# --------------------------------------------------------------------------------
# the trace and the machine


def trace_path(args: argparse.Namespace) -> str | None:
    """The trace among the sources (told by its magic), or None; a trace is replayed
    alone."""
    paths = [split_node(s, "source")[0] for s in args.sources]
    traces = [p for p in paths if is_trace(p)]
    if not traces:
        return None
    if len(paths) > 1 or args.pid or args.all or args.sample:
        raise EstimateError("a trace is replayed alone: name one trace and no other source",
                            EXIT_USAGE)
    return traces[0]


def load_trace(path: str) -> Trace:
    try:
        return read_trace(path)
    except TraceError as e:
        raise EstimateError(str(e)) from None


def load_cost_model(path: str) -> CostModel:
    """A cost-model file of ``ksmcore calibrate`` (JSON: page_ns, batch_ns, hz, wake_ns)."""
    try:
        with open(path) as f:
            d = json.load(f)
        model = d.get("cost_model", d)
        return CostModel(**{k: int(model[k]) for k in ("page_ns", "batch_ns", "hz", "wake_ns")})
    except OSError as e:
        raise EstimateError(f"--cost-model {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EstimateError(f"--cost-model {path}: not a cost-model file ({e})") from None


def cost_model(args: argparse.Namespace) -> CostModel:
    path = getattr(args, "cost_model", None)
    if path:
        return load_cost_model(path)
    if args.cost_per_page_us != DEFAULT_COST_PER_PAGE_US:
        return replace(HOST_MODEL, page_ns=round(args.cost_per_page_us * 1000))
    return HOST_MODEL


def describe_model(cm: CostModel) -> str:
    return (f"{cm.page_ns / 1000:.2f} us per page + {cm.batch_ns / 1000:.0f} us per batch, "
            f"sleeps in jiffies of HZ={cm.hz} + {cm.wake_ns / 1000:.0f} us to wake")


def machine(args: argparse.Namespace, knobs: Knobs, trace: Trace, cm: CostModel) -> Any:
    for p in trace.processes:
        if p.node is not None and p.node >= args.nodes:
            raise EstimateError(f"the trace puts {p.name} on node {p.node}: give --nodes "
                                f"{p.node + 1} or more", EXIT_USAGE)
    m = new_machine(args.nodes, knobs)
    m.cost_model = cm
    return m


def run(trace: Trace, args: argparse.Namespace, knobs: Knobs, cm: CostModel) -> tuple[Any, Replay]:
    m = machine(args, knobs, trace, cm)
    return m, replay(trace, m, TIMELINE_MS)


# --------------------------------------------------------------------------------
# estimate TRACE


def _trace_info(path: str, trace: Trace) -> dict[str, Any]:
    return {
        "path": path,
        "complete": trace.complete,
        "damage": trace.damage,
        "status": trace.status(),
        "duration_s": trace.duration,
        "intervals": trace.intervals,
        "interval_ms": trace.meta.get("interval_ms"),
        "method": trace.meta.get("method"),
        "fault_trace": bool(trace.meta.get("fault_trace")),
        "imputed_writes": bool(trace.meta.get("imputed_writes")),
        "processes": len(trace.processes),
        "initial_pages": trace.initial_pages(),
        "distinct_pages": len(trace.contents),
    }


def estimate_trace(args: argparse.Namespace, path: str) -> dict[str, Any]:
    from .commands import _check_common, _knobs

    _check_common(args)
    knobs = _knobs(args)
    cm = cost_model(args)
    new_machine(args.nodes, knobs)  # refuse bad knobs before reading
    trace = load_trace(path)
    m, rp = run(trace, args, knobs, cm)
    steady = steady_state(rp.timeline, rp.duration)
    procs = []
    for tp, p in zip(trace.processes, rp.processes, strict=True):
        entry: dict[str, Any] = {"source": tp.name, "pid": tp.pid, "node": tp.node or 0,
                                 "exited_s": None if tp.exited_ns is None else tp.exited_ns / 1e9}
        if p is not None and tp.exited_ns is None:
            entry["ksm_stat"] = p.ksm_stat()
        procs.append(entry)
    remarks = [trace.status()]
    remarks += [f"{p.name} exited after {p.exited_ns / 1e9:.1f} s (replayed up to its exit)"
                for p in trace.processes if p.exited_ns is not None]
    if rp.pages_outside:
        remarks.append(f"{rp.pages_outside} page changes outside every recorded mapping left out")
    if trace.meta.get("method") == "hash" and not trace.meta.get("pfns_visible"):
        remarks.append("recorded by hashing without pfns: writes of unchanged bytes (copies "
                       "on write of merged pages) are not in the trace")
    return {
        "trace": _trace_info(path, trace),
        "knobs": knobs.as_dict(),
        "cost_model": asdict(cm),
        "steady_state": steady,
        "ksm": dict(m.ksm.stats()),
        "processes": procs,
        "timeline": rp.timeline,
        "remarks": remarks,
    }


def _mib(pages: float) -> float:
    return pages * PAGE_SIZE / 2**20


def _header(result: dict[str, Any]) -> list[str]:
    """The trace, the knobs and the cost model of the replay."""
    tr, k = result["trace"], result["knobs"]
    return [
        f"ksmcore estimate: trace {tr['path']}, {tr['processes']} processes, "
        f"{tr['initial_pages']} pages at the start ({_mib(tr['initial_pages']):.1f} MiB), "
        f"{tr['duration_s']:.1f} s recorded every {tr['interval_ms']} ms ({tr['method']}"
        + (", write faults" if tr.get("fault_trace") else "")
        + (", imputed writes" if tr.get("imputed_writes") else "") + ")",
        "knobs: " + ", ".join(f"{n} {v}" for n, v in k.items()),
        "cost model: " + describe_model(CostModel(**result["cost_model"])),
        "",
    ]


def _steady(result: dict[str, Any]) -> list[str]:
    """The means over the trace's second half: what ksmd holds and what it costs."""
    st = result["steady_state"]
    if not st.get("rows"):
        return ["steady state: the trace is too short to have a second half"]
    lines = [
        f"steady state over the second half ({st['from_s']:.1f}-{st['to_s']:.1f} s, "
        f"means of {st['rows']} samples):",
        f"  memory saved      {st['saved_pages']:.0f} pages = {st['saved_mib']:.1f} MiB  "
        f"(pages_sharing {st['pages_sharing']:.0f} + ksm_zero_pages "
        f"{st['ksm_zero_pages']:.0f})",
        f"  general_profit    {st['general_profit_mib']:.1f} MiB",
        f"  pages_volatile    {st['pages_volatile']:.0f}  (pages_shared "
        f"{st['pages_shared']:.0f}, pages_unshared {st['pages_unshared']:.0f})",
    ]
    if "cow_per_s" in st:
        lines.append(f"  copied on write   {st['cow_per_s']:.0f} pages/s (writes to "
                     f"merged pages)")
    if "cpu_fraction" in st:
        lines.append(f"  ksmd              {100 * st['cpu_fraction']:.1f}% of one CPU, "
                     f"{st['full_scans_per_s']:.2f} full scans/s, "
                     f"{st['pages_scanned_per_s']:.0f} pages scanned/s")
    return lines


def _sysfs_at_end(result: dict[str, Any]) -> list[str]:
    """/sys/kernel/mm/ksm when the trace ends."""
    lines = ["", f"/sys/kernel/mm/ksm at the end ({result['trace']['duration_s']:.1f} s):"]
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "pages_skipped", "pages_scanned", "ksm_zero_pages", "full_scans",
                 "general_profit"):
        lines.append(f"  {name:<20} {result['ksm'][name]}")
    return lines


def _per_process(result: dict[str, Any]) -> list[str]:
    """/proc/<pid>/ksm_stat of each process at the end (or when it exited)."""
    rows = []
    for p in result["processes"]:
        ks = p.get("ksm_stat")
        rows.append([p["source"], str(p["node"]),
                     f"exited {p['exited_s']:.1f} s" if p["exited_s"] is not None else "",
                     str(ks["ksm_merging_pages"]) if ks else "-",
                     f"{int(ks['ksm_process_profit']) / 2**20:.1f}" if ks else "-"])
    lines = ["", "per process (/proc/<pid>/ksm_stat at the end):"]
    return lines + _table(["source", "node", "", "merging_pages", "profit_MiB"], rows)


def text(result: dict[str, Any]) -> str:
    """The readable report of ``estimate TRACE``: its sections in order."""
    sections = (_header, _steady, _sysfs_at_end, _per_process)
    return render(sections, result)


def plot_timeline(path: str, result: dict[str, Any]) -> None:
    from .plot import _figure, _save

    rows = result["timeline"]
    fig = _figure()
    ax = fig.add_subplot()
    t = [r["t"] for r in rows]
    for name, style in (("pages_sharing", "-"), ("pages_shared", "-"),
                        ("pages_unshared", ":"), ("pages_volatile", "--")):
        ax.plot(t, [r[name] for r in rows], ls=style, lw=1.5, label=name)
    ax2 = ax.twinx()
    ax2.plot(t, [r["general_profit"] / 2**20 for r in rows], color="0.3", lw=1,
             label="general_profit (MiB, right)")
    ax2.set_ylabel("general_profit (MiB)")
    st = result["steady_state"]
    ax.axvspan(st["from_s"], st["to_s"], color="0.92", zorder=0, label="steady state")
    ax.set_xlabel("seconds since the trace's start (simulated)")
    ax.set_ylabel("pages")
    k = result["knobs"]
    ax.set_title(f"ksmcore estimate {result['trace']['path']}: pages_to_scan "
                 f"{k['pages_to_scan']}, sleep_millisecs {k['sleep_millisecs']}, smart_scan "
                 f"{k['smart_scan']}", fontsize=10)
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    _save(fig, path)


def _csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    out = io.StringIO()
    names = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(out, names, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return out.getvalue()


def _emit(args: argparse.Namespace, result: dict[str, Any], text_fn: Any,
          rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Text (with the remarks and the plot's path), JSON, or CSV of ``rows``."""
    from . import commands

    fmt = commands.output_format(args) if hasattr(commands, "output_format") \
        else ("json" if args.json else "text")
    if fmt == "json":
        return json.dumps(result, indent=1) + "\n", result
    if fmt == "csv":
        return _csv(rows), result
    if fmt != "text":
        raise EstimateError(f"--output-format {fmt}: a trace's replay is a timeline; use "
                            f"text, json or csv", EXIT_USAGE)
    out = text_fn(result)
    extra = list(result["remarks"]) + ([f"plot: {args.plot}"] if args.plot else [])
    if extra:
        out += "\n" + "\n".join(extra) + "\n"
    return out, result


def estimate_report(args: argparse.Namespace, path: str) -> tuple[str, dict[str, Any]]:
    result = estimate_trace(args, path)
    if args.plot:
        plot_timeline(args.plot, result)
    return _emit(args, result, text, result["timeline"])


# --------------------------------------------------------------------------------
# tune TRACE


TRACE_PAGES_TO_SCAN = (100, 200, 500, 1000, 5000)
TRACE_SLEEP_MILLISECS = (20, 50, 200)
KEEP = 0.9  # of the best steady-state savings


def tune_trace(args: argparse.Namespace, path: str) -> dict[str, Any]:
    from .commands import _check_common, _knobs
    from .tune import parse_values

    _check_common(args)
    base = _knobs(args)
    defaults = {"pages_to_scan_values": TRACE_PAGES_TO_SCAN,
                "sleep_millisecs_values": TRACE_SLEEP_MILLISECS}
    pts = _values(args, "pages_to_scan_values", defaults, parse_values, 1)
    sleeps = _values(args, "sleep_millisecs_values", defaults, parse_values, 0)
    smart = parse_values(args.smart_scan_values, "--smart-scan-values", 0)
    cm = cost_model(args)
    for p in pts:
        for s in smart:
            for sl in sleeps:
                new_machine(args.nodes, replace(base, pages_to_scan=p, smart_scan=s,
                                                sleep_millisecs=sl))
    trace = load_trace(path)
    rows = []
    for s in smart:
        for p in pts:
            for sl in sleeps:
                knobs = replace(base, pages_to_scan=p, smart_scan=s, sleep_millisecs=sl)
                _, rp = run(trace, args, knobs, cm)
                st = steady_state(rp.timeline, rp.duration)
                cpu = st.get("cpu_fraction", 0.0)
                saved = st.get("saved_mib", 0.0)
                rows.append({
                    "smart_scan": s, "pages_to_scan": p, "sleep_millisecs": sl,
                    "saved_mib": saved, "general_profit_mib": st.get("general_profit_mib", 0.0),
                    "pages_volatile": st.get("pages_volatile", 0.0),
                    "cow_per_s": st.get("cow_per_s"),
                    "cpu_fraction": cpu,
                    "full_scans_per_s": st.get("full_scans_per_s", 0.0),
                    "cpu_ms_per_s_per_saved_mib": (1000 * cpu / saved) if saved > 0 else None,
                })
    rows.sort(key=lambda r: (r["cpu_fraction"], -r["saved_mib"]))
    best = max((r["saved_mib"] for r in rows), default=0.0)
    keep = [r for r in rows if best > 0 and r["saved_mib"] >= KEEP * best]
    cheapest = min(keep, key=lambda r: r["cpu_fraction"]) if keep else None
    return {
        "trace": _trace_info(path, trace),
        "fixed_knobs": {k: v for k, v in base.as_dict().items()
                        if k not in ("pages_to_scan", "sleep_millisecs", "smart_scan")},
        "cost_model": asdict(cm),
        "rows": rows,
        "best_saved_mib": best,
        "keep": KEEP,
        "cheapest": cheapest,
        "remarks": [trace.status()],
    }


def _values(args: argparse.Namespace, name: str, defaults: dict[str, tuple[int, ...]],
            parse: Any, low: int) -> tuple[int, ...]:
    """The sweep's values: the option when given, else the defaults for traces (the
    static defaults of tune reach far past what a trace of a few seconds can tell)."""
    from . import tune

    text = getattr(args, name)
    static = ",".join(map(str, getattr(tune, "DEFAULT_" + name.removesuffix("_values").upper())))
    if text == static:
        return defaults[name]
    return parse(text, knob_option(name), low)


def _tune_header(result: dict[str, Any]) -> list[str]:
    """The trace and the fixed knobs of the sweep."""
    tr = result["trace"]
    return [
        f"ksmcore tune: trace {tr['path']}, {tr['processes']} processes, "
        f"{tr['initial_pages']} pages at the start, {tr['duration_s']:.1f} s; steady state "
        f"over its second half",
        "fixed knobs: " + ", ".join(f"{n} {v}" for n, v in result["fixed_knobs"].items())
        + "; cost model " + describe_model(CostModel(**result["cost_model"])),
        "",
    ]


def _tune_table(result: dict[str, Any]) -> list[str]:
    """One row per setting, its steady state; the pick marked <."""
    best = result["cheapest"]
    rows = []
    for r in result["rows"]:
        per = r["cpu_ms_per_s_per_saved_mib"]
        rows.append([
            str(r["smart_scan"]), str(r["pages_to_scan"]), str(r["sleep_millisecs"]),
            f"{r['saved_mib']:.2f}", f"{r['general_profit_mib']:.2f}",
            f"{r['pages_volatile']:.0f}",
            f"{r['cow_per_s']:.0f}" if r["cow_per_s"] is not None else "-",
            f"{100 * r['cpu_fraction']:.2f}", f"{per:.2f}" if per is not None else "-",
            f"{r['full_scans_per_s']:.2f}" + (" <" if r is best else ""),
        ])
    return _table(["smart_scan", "pages_to_scan", "sleep_ms", "saved_MiB", "profit_MiB",
                   "volatile", "cow/s", "CPU%", "CPU_ms/s/MiB", "scans/s"], rows) + [""]


def _tune_verdict(result: dict[str, Any]) -> list[str]:
    """The cheapest setting keeping most of the best steady-state savings."""
    best = result["cheapest"]
    if best is None:
        return ["no setting saves memory at steady state on this trace"]
    return [
        f"cheapest setting keeping {100 * result['keep']:.0f}% of the best steady-state "
        f"savings ({result['best_saved_mib']:.2f} MiB) (marked <): pages_to_scan "
        f"{best['pages_to_scan']}, sleep_millisecs {best['sleep_millisecs']}, smart_scan "
        f"{best['smart_scan']}: {best['saved_mib']:.2f} MiB saved, "
        f"{100 * best['cpu_fraction']:.2f}% of one CPU"]


def tune_text(result: dict[str, Any]) -> str:
    """The readable table of ``tune TRACE``: its sections in order."""
    sections = (_tune_header, _tune_table, _tune_verdict)
    return render(sections, result)


def plot_tune(path: str, result: dict[str, Any]) -> None:
    from .plot import _figure, _save

    fig = _figure()
    ax = fig.add_subplot()
    for smart, color, marker in ((0, "tab:blue", "o"), (1, "tab:orange", "s")):
        sel = [r for r in result["rows"] if r["smart_scan"] == smart]
        if sel:
            ax.plot([100 * r["cpu_fraction"] for r in sel], [r["saved_mib"] for r in sel],
                    marker=marker, ls="none", color=color, label=f"smart_scan {smart}")
    best = result["cheapest"]
    if best is not None:
        ax.plot([100 * best["cpu_fraction"]], [best["saved_mib"]], marker="*", ms=16,
                color="tab:red", ls="none",
                label=f"cheapest: {best['pages_to_scan']} pages / {best['sleep_millisecs']} ms, "
                      f"smart_scan {best['smart_scan']}")
        ax.axhline(result["keep"] * result["best_saved_mib"], color="tab:red", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("ksmd CPU (% of one CPU)")
    ax.set_ylabel("steady-state memory saved (MiB)")
    ax.set_title(f"ksmcore tune {result['trace']['path']}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def tune_report(args: argparse.Namespace, path: str) -> tuple[str, dict[str, Any]]:
    result = tune_trace(args, path)
    if args.plot:
        plot_tune(args.plot, result)
    return _emit(args, result, tune_text, result["rows"])
