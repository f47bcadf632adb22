"""The estimate in other formats: Prometheus text exposition (node_exporter's
textfile collector) and CSV (one row per source)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

from ..constants import KSM_STAT_FIELDS, PAGE_SIZE

OUTPUT_FORMATS = ("text", "json", "prometheus", "csv")

# The files node_exporter's ksmd collector exports, and its names for them.
NODE_KSMD = ("full_scans", "merge_across_nodes", "pages_shared", "pages_sharing",
             "pages_to_scan", "pages_unshared", "pages_volatile", "run", "sleep_millisecs")


def _node_ksmd_name(name: str) -> str:
    if name == "full_scans":
        return "node_ksmd_full_scans_total"
    if name == "sleep_millisecs":
        return "node_ksmd_sleep_seconds"
    return f"node_ksmd_{name}"


def _label(value: Any) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Sequence[tuple[dict[str, Any], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {_number(value)}" if lab
                              else f"{name} {_number(value)}")


def prometheus(result: dict[str, Any]) -> str:
    """node_exporter textfile-collector format: the kernel counters the estimate
    predicts under node_ksmd_* (as node_exporter's ksmd collector names them), the
    other counters and the estimate itself as ksmcore_* gauges, per source labelled."""
    k = result["ksm"]
    w = _Writer()
    for name in NODE_KSMD:
        value = float(k[name]) / (1000 if name == "sleep_millisecs" else 1)
        w.family(_node_ksmd_name(name), "counter" if name == "full_scans" else "gauge",
                 f"ksmd '{name}' file.", [({}, value)])
    for name, value in k.items():
        if name in NODE_KSMD or not _numeric(value):
            continue
        w.family(f"ksmcore_ksm_{name}", "gauge",
                 f"/sys/kernel/mm/ksm/{name} after the simulated run.", [({}, float(value))])
    saved = result["saved"]
    w.family("ksmcore_estimate_saved_bytes", "gauge",
             "Memory KSM would save (pages_sharing + ksm_zero_pages).",
             [({}, float(saved["bytes"]))])
    w.family("ksmcore_estimate_scanned_bytes", "gauge", "Memory the estimate scanned.",
             [({}, float(result["pages"] * PAGE_SIZE))])
    t = result["time_to_converge_s"]
    w.family("ksmcore_estimate_time_to_converge_seconds", "gauge",
             "Simulated ksmd time until the counters converged (NaN: not converged).",
             [({}, float("nan") if t is None else float(t))])
    w.family("ksmcore_estimate_ksmd_cpu_ratio", "gauge",
             "ksmd's share of one CPU while scanning, at these knobs (time model).",
             [({}, float(result["time_model"]["cpu_fraction"]))])
    zp = result.get("zero_pages")
    if zp is not None:
        w.family("ksmcore_estimate_saved_if_zero_pages_present_bytes", "gauge",
                 "Memory saved if the all-zero pages of cores counted as present.",
                 [({}, float(zp["saved_pages_if_present"] * PAGE_SIZE))])
    procs = result["processes"]

    def labels(p: dict[str, Any]) -> dict[str, Any]:
        return {"source": p["source"], "kind": p["kind"], "node": p["node"]}

    w.family("ksmcore_source_pages", "gauge", "Pages of the source that ksmd scans.",
             [(labels(p), float(p["pages"])) for p in procs])
    for field in KSM_STAT_FIELDS:
        values = [(labels(p), float(p["ksm_stat"][field])) for p in procs
                  if _numeric(p["ksm_stat"][field])]
        if values:
            w.family(f"ksmcore_source_{field}", "gauge",
                     f"/proc/<pid>/ksm_stat {field} of the source after the simulated run.",
                     values)
    return "\n".join(w.lines) + "\n"


def _numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def csv_rows(result: dict[str, Any]) -> str:
    """One row per source: where it is, its pages, its ksm_stat, its notes."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    head = ["source", "kind", "pid", "node", "pages", *KSM_STAT_FIELDS, "notes"]
    w.writerow(head)
    for p in result["processes"]:
        st = p["ksm_stat"]
        w.writerow([p["source"], p["kind"], "" if p["pid"] is None else p["pid"], p["node"],
                    p["pages"], *[_csv_value(st[f]) for f in KSM_STAT_FIELDS],
                    "; ".join(p["notes"])])
    return out.getvalue()


def tune_csv(result: dict[str, Any]) -> str:
    """One row per setting of the sweep."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    keys = ["advisor", "smart_scan", "pages_to_scan", "sleep_millisecs", "pages_per_second",
            "cpu_fraction", "cpu_percent_per_gib_saved", "t50_s", "t90_s", "t100_s",
            "saved_pages", "converged", "full_scans_to_converge"]
    w.writerow(keys)
    for r in result["settings"]:
        w.writerow([_csv_value(r.get(k)) for k in keys])
    return out.getvalue()


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return v
