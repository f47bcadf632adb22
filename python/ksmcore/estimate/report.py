"""The estimate as data (the ``--json`` object) and as a readable report."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from ..constants import KSM_STAT_FIELDS, PAGE_SIZE, SIZEOF_RMAP_ITEM
from ..profiles import Profile
from .extents import nonzero_pages, zero_merge_savings
from .simulate import (
    Knobs,
    Run,
    cpu_fraction,
    ksmd_times,
    milestone_times,
    pages_per_second,
)
from .sources import Source

MIB = 2**20


def mib(pages: int) -> float:
    return pages * PAGE_SIZE / MIB


def _nodes(m: Any, sources: Sequence[Source], stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per node: the sources placed there and their ksm_stat totals; pages_shared and
    pages_sharing per node when the machine can tell them (``m.ksm.node_stats()``)."""
    shared = m.ksm.node_stats()
    out = []
    for nid in range(m.nodes):
        mine = [i for i, s in enumerate(sources) if (s.node or 0) == nid]
        entry: dict[str, Any] = {
            "node": nid,
            "sources": [sources[i].name for i in mine],
            "pages": sum(sources[i].npages for i in mine),
            "ksm_merging_pages": sum(int(stats[i]["ksm_merging_pages"]) for i in mine),
            "ksm_zero_pages": sum(int(stats[i]["ksm_zero_pages"]) for i in mine),
        }
        if nid in shared:
            entry["pages_shared"] = int(shared[nid]["pages_shared"])
            entry["pages_sharing"] = int(shared[nid]["pages_sharing"])
        out.append(entry)
    return out


def zero_pages_section(sources: Sequence[Source], knobs: Knobs, saved: int,
                       mode: str) -> dict[str, Any]:
    """What the pages left out as never touched would change: the all-zero pages of
    cores (counted as present with ``--zero-pages present``) and the holes of images
    (never written, always left out). Zero pages merge only with zero pages, so what
    they would save follows from their number in each tree (one tree, or one per node
    with merge_across_nodes=0), with the zero pages already scanned there."""
    left: dict[int, int] = {}
    for s in sources:
        tree = 0 if knobs.merge_across_nodes else (s.node or 0)
        left[tree] = left.get(tree, 0) + s.zero_pages
    more = 0
    for tree, z in left.items():
        if not z:
            continue
        # the zero pages already scanned in this tree, which the left-out ones join
        here = sum(int(len(seg) - nonzero_pages(seg).sum()) for s in sources
                   if (0 if knobs.merge_across_nodes else (s.node or 0)) == tree
                   for seg in s.segments)
        more += (zero_merge_savings(here + z, knobs.max_page_sharing, knobs.use_zero_pages)
                 - zero_merge_savings(here, knobs.max_page_sharing, knobs.use_zero_pages))
    left_out = sum(s.zero_pages for s in sources)
    return {
        "mode": mode,
        "left_out": left_out,
        "hole_pages": sum(s.hole_pages for s in sources),
        "saved_if_present": more,
        "saved_pages_if_present": saved + more,
        "saved_mib_if_present": round(mib(saved + more), 3),
    }


def build(m: Any, procs: Sequence[Any], sources: Sequence[Source], run: Run, knobs: Knobs,
          cost_per_page_s: float, zero_pages: str = "absent") -> dict[str, Any]:
    """The --json object: every sysfs file, per-process ksm_stat, per-node figures and
    the simulated time."""
    # every counter and ksm_stat field the model keeps, also where this kernel has no
    # file for it (ksm_zero_pages before 6.6, ...): what KSM saves there all the same
    ksm = m.ksm.stats(every=True)
    stats = [{k: p.ksm_stat(every=True)[k] for k in KSM_STAT_FIELDS} for p in procs]
    times = ksmd_times(run.processed, knobs.sleep_millisecs, cost_per_page_s)
    total = sum(s.npages for s in sources)
    saved = int(ksm["pages_sharing"]) + int(ksm["ksm_zero_pages"])
    # huge page splits: what they freed is not KSM's (no counter shows it) but real
    split = int(m.thp_split_zero_pages)
    huge = any(any(s.hugepage) for s in sources) and m.thp_enabled != "never" or split > 0
    t_conv = (
        float(times[run.scan_ends[run.converged_at - 1]])
        if run.converged and run.converged_at
        else (0.0 if run.converged else None)
    )
    scans = []
    for i, s in enumerate(run.scans):
        scans.append({
            "full_scan": i + 1,
            "time_s": float(times[run.scan_ends[i]]),
            **{k: int(s[k]) for k in ("pages_shared", "pages_sharing", "pages_unshared",
                                      "pages_volatile", "ksm_zero_pages", "general_profit")},
        })
    return {
        "kernel": m.profile.name,
        "ksm": dict(ksm),
        "processes": [
            {
                "source": src.name,
                "kind": src.kind,
                "pid": src.pid,
                "node": src.node or 0,
                "pages": src.npages,
                "ksm_stat": st,
                "thp_split_zero_pages": int(p.thp_split_zero_pages),
                "notes": list(src.notes),
            }
            for src, st, p in zip(sources, stats, procs, strict=True)
        ],
        "nodes": _nodes(m, sources, stats),
        "time_to_converge_s": t_conv,
        "converged": run.converged,
        "converged_at_full_scan": run.converged_at,
        "pages": total,
        "saved": {
            "pages": saved,
            "bytes": saved * PAGE_SIZE,
            "mib": round(mib(saved), 3),
            "fraction": saved / total if total else 0.0,
        },
        "zero_pages": zero_pages_section(sources, knobs, saved, zero_pages),
        # pages freed by splitting huge pages (zero-filled subpages mapped to the shared
        # zero page); the memory saved in total is "saved" (KSM's) plus these
        "thp": {"enabled": m.thp_enabled, "huge_pages_split": int(m.thp_splits),
                "shown": huge},
        "thp_split_zero_pages": {
            "pages": split,
            "bytes": split * PAGE_SIZE,
            "mib": round(mib(split), 3),
        },
        "saved_total": {
            "pages": saved + split,
            "bytes": (saved + split) * PAGE_SIZE,
            "mib": round(mib(saved + split), 3),
            "fraction": (saved + split) / total if total else 0.0,
        },
        "savings_time_s": milestone_times(run.saved, times, saved),
        "full_scans": scans,
        "time_model": {
            "pages_to_scan": knobs.pages_to_scan,
            "sleep_millisecs": knobs.sleep_millisecs,
            "cost_per_page_us": cost_per_page_s * 1e6,
            "pages_per_second": pages_per_second(knobs.pages_to_scan, knobs.sleep_millisecs,
                                                 cost_per_page_s),
            "cpu_fraction": cpu_fraction(knobs.pages_to_scan, knobs.sleep_millisecs,
                                         cost_per_page_s),
        },
        "machine": {"nodes": m.nodes},
    }


SUMMARY_FROM = 4  # more sources than this: their notes are summed, not listed
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def summarise_notes(procs: Sequence[dict[str, Any]]) -> list[str]:
    """Notes of the same form summed over the sources ("3 of 40 mappings ..." + "5 of
    20 mappings ..." -> "8 of 60 mappings ... (2 sources)"), in first-seen order."""
    groups: dict[str, tuple[list[float], bool, int]] = {}
    for p in procs:
        for note in p["notes"]:
            form = _NUMBER.sub("{}", note)
            nums = [float(x) for x in _NUMBER.findall(note)]
            decimal = "." in "".join(_NUMBER.findall(note))
            if form not in groups:
                groups[form] = (nums, decimal, 1)
            else:
                total, dec, count = groups[form]
                groups[form] = ([a + b for a, b in zip(total, nums, strict=True)],
                                dec or decimal, count + 1)
    out = []
    for form, (nums, decimal, count) in groups.items():
        shown = [f"{x:.1f}" if decimal else f"{x:.0f}" for x in nums]
        out.append(form.format(*shown) + f" ({count} source{'s' * (count != 1)})")
    return out


def top_sources(result: dict[str, Any], n: int) -> None:
    """Keep the ``n`` processes with the highest ksm_process_profit, best first."""
    procs = result["processes"]
    result["sources_total"] = len(procs)
    result["processes"] = sorted(procs, key=lambda p: -int(p["ksm_stat"]["ksm_process_profit"]))[:n]


def duration(seconds: float | None) -> str:
    """3.2 s, 4 min 12 s, 2 h 05 min."""
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds >= 1 or seconds == 0 else f"{seconds * 1000:.0f} ms"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> list[str]:
    """Columns right-aligned except the first ``left``."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for r in cells:
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                       strict=True))]
        out.append("  " + "  ".join(parts).rstrip())
    return out


def kernel_line(kernel: str) -> str:
    """Which kernel's KSM the report models (--kernel, else the running kernel)."""
    return f"kernel: the KSM of Linux {kernel} (ksmcore profile {kernel}; --kernel)"


def _header(result: dict[str, Any]) -> list[str]:
    """What was scanned, the knobs, the kernel."""
    k = result["ksm"]
    procs = result["processes"]
    total = result["pages"]
    nodes = result["machine"]["nodes"]
    return [
        f"ksmcore estimate: {len(procs)} source{'s' * (len(procs) != 1)}, "
        f"{total} pages ({mib(total):.1f} MiB), {nodes} NUMA node{'s' * (nodes != 1)}",
        f"knobs: pages_to_scan {k['pages_to_scan']}, sleep_millisecs {k['sleep_millisecs']}, "
        f"smart_scan {k['smart_scan']}, use_zero_pages {k['use_zero_pages']}, "
        f"max_page_sharing {k['max_page_sharing']}, merge_across_nodes {k['merge_across_nodes']}",
        kernel_line(result["kernel"]),
        "",
    ]


def _savings(result: dict[str, Any]) -> list[str]:
    """The memory saved: KSM's, what the left-out zero pages and holes would change,
    THP splits, general_profit."""
    k = result["ksm"]
    total = result["pages"]
    saved = result["saved"]
    lines = []
    if not total:
        lines.append("nothing to scan: no source has memory KSM could merge")
    pct = f", {100 * saved['fraction']:.1f}% of the memory scanned" if total else ""
    lines.append(
        f"memory saved      {saved['pages']} pages = {saved['mib']:.1f} MiB"
        f"  (pages_sharing {k['pages_sharing']} + ksm_zero_pages {k['ksm_zero_pages']}){pct}"
    )
    zp = result.get("zero_pages", {})
    if zp.get("left_out"):
        lines.append(
            f"zero pages        {zp['left_out']} all-zero pages of cores left out as never "
            f"touched; counted as present (--zero-pages present): "
            f"{zp['saved_pages_if_present']} pages = {zp['saved_mib_if_present']:.1f} MiB saved"
        )
    if zp.get("hole_pages"):
        lines.append(f"holes             {zp['hole_pages']} pages of images in holes (never "
                     "written) left out")
    if result["thp"]["shown"]:
        split = result["thp_split_zero_pages"]
        both = result["saved_total"]
        lines.append(
            f"THP splits        {split['pages']} pages = {split['mib']:.1f} MiB freed by "
            "splitting huge pages (zero-filled subpages mapped to the shared zero page)"
        )
        lines.append(
            f"saved in total    {both['pages']} pages = {both['mib']:.1f} MiB  (KSM + THP "
            f"splits; {result['thp']['huge_pages_split']} huge pages split, THP "
            f"{result['thp']['enabled']})"
        )
    lines.append(
        f"general_profit    {int(k['general_profit']) / MIB:.1f} MiB  (saved memory less "
        f"{SIZEOF_RMAP_ITEM} bytes per rmap_item)"
    )
    return lines


def _timing(result: dict[str, Any]) -> list[str]:
    """How long ksmd takes: to converge, to the savings milestones, a full scan; and
    what it costs."""
    k = result["ksm"]
    tm = result["time_model"]
    if result["converged"]:
        at = result["converged_at_full_scan"]
        conv = (
            f"time to converge  {duration(result['time_to_converge_s'])} of ksmd"
            f"  (counters final after full scan {at}; {k['full_scans']} full scans run)"
            if at else "time to converge  0 s (nothing to scan)"
        )
    else:
        conv = (
            f"not converged     after {k['full_scans']} full scans"
            f" ({duration(result['full_scans'][-1]['time_s']) if result['full_scans'] else '0 s'}"
            " of ksmd); raise --max-scans"
        )
    lines = [conv]
    ms = result["savings_time_s"]
    if result["saved"]["pages"]:
        lines.append(
            "savings reached   "
            + ", ".join(f"{key} after {duration(t)}" for key, t in ms.items())
        )
    lines.append(
        f"ksmd              {tm['pages_per_second']:.0f} pages/s, "
        f"{100 * tm['cpu_fraction']:.1f}% of one CPU while scanning "
        f"(model: {tm['cost_per_page_us']:.2f} us per page + {tm['sleep_millisecs']} ms sleep "
        f"per batch of {tm['pages_to_scan']})"
    )
    if result["full_scans"]:
        first = result["full_scans"][0]["time_s"]
        lines.append(f"one full scan     {duration(first)} (the first)")
    return lines


SYSFS_SHOWN = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
               "pages_skipped", "pages_scanned", "ksm_zero_pages", "full_scans",
               "stable_node_chains", "stable_node_dups", "general_profit")


def _sysfs(result: dict[str, Any]) -> list[str]:
    """/sys/kernel/mm/ksm at the end, saying which files the modelled kernel lacks."""
    k = result["ksm"]
    files = Profile(result["kernel"]).sysfs_files
    return ["", f"/sys/kernel/mm/ksm after {k['full_scans']} full scans:"] + [
        f"  {name:<20} {k[name]}" + ("" if name in files else
                                     f"  (no such file in Linux {result['kernel']})")
        for name in SYSFS_SHOWN]


def _per_source(result: dict[str, Any]) -> list[str]:
    """/proc/<pid>/ksm_stat of each source (the --top ones, said so)."""
    procs = result["processes"]
    rows = []
    for p in procs:
        st = p["ksm_stat"]
        rows.append([
            p["source"], p["node"], p["pages"], st["ksm_rmap_items"], st["ksm_merging_pages"],
            st["ksm_zero_pages"], f"{int(st['ksm_process_profit']) / MIB:.1f}",
        ])
    lines = ["", "per source (/proc/<pid>/ksm_stat):"]
    lines += _table(["source", "node", "pages", "rmap_items", "merging_pages", "zero_pages",
                     "profit_MiB"], rows)
    if result.get("sources_total", len(procs)) > len(procs):
        lines.append(f"  (the {len(procs)} of {result['sources_total']} sources that save the "
                     "most, by ksm_process_profit: --top)")
    return lines


def _notes(result: dict[str, Any]) -> list[str]:
    """The sources' notes: listed for a few sources, summed over many."""
    procs = result["processes"]
    if len(procs) > SUMMARY_FROM:
        summary = summarise_notes(procs)
        if summary:
            return ["", "notes (summed over the sources):"] + [f"  {n}" for n in summary]
        return []
    notes = [(p["source"], n) for p in procs for n in p["notes"]]
    if notes:
        return ["", "notes:"] + [f"  {src}: {n}" for src, n in notes]
    return []


def _security(result: dict[str, Any]) -> list[str]:
    """--domain-by: merging across trust domains (domains.text)."""
    if not result.get("security"):
        return []
    from .domains import text as security_text

    return security_text(result["security"])


def _per_node(result: dict[str, Any]) -> list[str]:
    """With several NUMA nodes: each node's sources and KSM pages."""
    if len(result["nodes"]) <= 1:
        return []
    lines = ["", "per node:"]
    has_shared = any("pages_shared" in n for n in result["nodes"])
    head = ["node", "sources", "pages", "merging_pages", "zero_pages"]
    if has_shared:
        head += ["pages_shared", "pages_sharing"]
    rows = []
    for n in result["nodes"]:
        row = [n["node"], len(n["sources"]), n["pages"], n["ksm_merging_pages"],
               n["ksm_zero_pages"]]
        if has_shared:
            row += [n.get("pages_shared", "-"), n.get("pages_sharing", "-")]
        rows.append(row)
    lines += _table(head, rows)
    if not has_shared:
        lines.append("  (per-node pages_shared/pages_sharing need Machine.ksm.node_stats())")
    if result["ksm"]["merge_across_nodes"]:
        lines.append("  merge_across_nodes=1: a KSM page may serve processes on other nodes")
    return lines


Section = Callable[[dict[str, Any]], list[str]]


def render(sections: Sequence[Section], result: dict[str, Any]) -> str:
    """A text report: the lines of its sections, in order."""
    return "\n".join(line for section in sections for line in section(result)) + "\n"


SECTIONS = (_header, _savings, _timing, _sysfs, _per_source, _notes, _security, _per_node)


def text(result: dict[str, Any]) -> str:
    """The readable report: its sections in order."""
    return render(SECTIONS, result)
