"""``ksmcore fleet``: place sources on hosts so KSM saves the most, verify each host
exactly on Dask, and report predicted against exact savings."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..constants import PAGE_SIZE
from ..estimate.errors import EXIT_INPUT, EXIT_USAGE, EstimateError
from . import cluster, fileformat
from .place import PlacementError, in_order, place, shuffled
from .sketch import Sketch, estimate
from .sources import expand

MIB = 2**20
DEFAULT_SLACK = 1.25  # default capacity: the fleet's memory over the hosts, plus 25%
_UNITS = {"": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes, from 512MiB, 16G, 4096..."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 16GiB or 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def add_parser(sub: Any, add_sketch_params: Callable[[argparse.ArgumentParser], None],
               one_line_errors: Callable[[argparse.ArgumentParser], None]
               ) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "fleet", help="place sources on hosts so that KSM saves the most (on Dask)",
        description="Sketch the sources on Dask workers (or read sketch files), place them "
                    "on H hosts under a capacity to maximise the savings predicted from the "
                    "sketches (greedy, then local search), compare with the given order and "
                    "a random one, and verify each host exactly: the engine runs ksmd on "
                    "the host's sources on a worker.")
    p.add_argument("sources", nargs="*", metavar="SOURCE|SKETCH",
                   help="memory images, ELF cores, synth:FxNxSIZE[@SEED] fleets, or sketch "
                        "files from `ksmcore sketch`")
    p.add_argument("--hosts", type=int, required=True, metavar="H")
    p.add_argument("--host-capacity", type=parse_size, metavar="SIZE",
                   help="memory per host, counted before merging (default: the sources' "
                        f"total over H, plus {round((DEFAULT_SLACK - 1) * 100)}%%)")
    g = p.add_argument_group("Dask")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running scheduler (tcp://HOST:8786); default: a LocalCluster")
    g.add_argument("--workers", type=int, metavar="N",
                   help="LocalCluster worker processes (default: one per CPU)")
    g = p.add_argument_group("placement and verification")
    g.add_argument("--use-zero-pages", type=int, choices=(0, 1), default=0)
    g.add_argument("--verify", choices=("both", "placement", "none"), default="both",
                   help="which placements the engine verifies exactly (default: the "
                        "placement and the given order)")
    g.add_argument("--seed", type=int, default=0, help="of the random placement")
    g.add_argument("--search-seconds", type=float, default=60.0, metavar="S",
                   help="time limit of the local search (default %(default)s)")
    add_sketch_params(p)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead")
    g.add_argument("--plot", metavar="FILE.png", help="draw predicted against exact savings")
    p.set_defaults(func=run_fleet)
    one_line_errors(p)
    return p


def _mib(pages: float) -> float:
    return pages * PAGE_SIZE / MIB


def _hosts_report(sketches: Sequence[Sketch], where: Sequence[int], hosts: int,
                  use_zero_pages: int, exact: Sequence[dict[str, Any] | None] | None
                  ) -> dict[str, Any]:
    groups: list[list[int]] = [[] for _ in range(hosts)]
    for i, h in enumerate(where):
        groups[h].append(i)
    rows = []
    for h, members in enumerate(groups):
        est = estimate([sketches[i] for i in members], use_zero_pages=use_zero_pages) \
            if members else None
        row: dict[str, Any] = {
            "host": h, "sources": [sketches[i].name for i in members], "index": members,
            "pages": sum(sketches[i].pages for i in members),
            "predicted_saved_pages": est.saved if est else 0.0,
            "predicted_stderr_pages": est.stderr if est else 0.0,
            "predicted_general_profit": est.general_profit if est else 0.0,
            "method": est.method if est else "exact",
        }
        if exact is not None:
            row["exact"] = exact[h]
        rows.append(row)
    total = {
        "predicted_saved_pages": sum(r["predicted_saved_pages"] for r in rows),
        "predicted_stderr_pages": math.sqrt(sum(r["predicted_stderr_pages"] ** 2
                                                for r in rows)),
        "predicted_general_profit": sum(r["predicted_general_profit"] for r in rows),
    }
    if exact is not None and all(e is not None for e in exact):
        total["exact_saved_pages"] = sum(int(e["saved_pages"]) for e in exact if e)
        total["exact_general_profit"] = sum(int(e["general_profit"]) for e in exact if e)
    return {"assignment": list(where), "hosts": rows, "total": total}


def _max_rss() -> int:
    """The driver's peak resident memory (it holds sketches, never pages)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _verifiable(sketches: Sequence[Sketch]) -> str | None:
    gone = [s.name for s in sketches if not s.source]
    return (f"{len(gone)} sources cannot be read again (live processes, merged sketches): "
            "not verified") if gone else None


def fleet(args: argparse.Namespace) -> dict[str, Any]:
    """The whole fleet report, computed in full before anything is printed."""
    from .commands import sketch_params

    t0 = time.perf_counter()
    if args.hosts < 1:
        raise EstimateError(f"--hosts {args.hosts}: expected at least 1", EXIT_USAGE)
    if args.workers is not None and args.workers < 1:
        raise EstimateError(f"--workers {args.workers}: expected at least 1", EXIT_USAGE)
    if args.plot:
        from ..estimate.plot import check_path

        check_path(args.plot)
    params = sketch_params(args)
    specs = expand(list(args.sources))
    if not specs:
        raise EstimateError("no sources: name images, cores, synth:... fleets or sketch files",
                            EXIT_USAGE)
    # sketch files are read here; everything else is read by the workers
    slots: list[Sketch | str] = []
    for spec in specs:
        if fileformat.is_sketch_file(spec):
            try:
                slots += fileformat.load(spec)
            except (fileformat.SketchFileError, OSError) as e:
                raise EstimateError(str(e), EXIT_INPUT) from None
        else:
            slots.append(spec)
    to_sketch = [s for s in slots if isinstance(s, str)]
    remarks: list[str] = []
    result: dict[str, Any] = {}
    verify = args.verify
    with cluster.connect(args.scheduler, args.workers) as client:
        result["dask"] = cluster.describe(client, args.scheduler)
        t1 = time.perf_counter()
        made = iter(cluster.sketch_all(client, to_sketch, params)) if to_sketch else iter(())
        sketches = [next(made) if isinstance(s, str) else s for s in slots]
        t_sketch = time.perf_counter() - t1
        for s in sketches:
            if s.max_page_sharing != args.max_page_sharing:
                raise EstimateError(f"{s.name}: sketched with max_page_sharing "
                                    f"{s.max_page_sharing}, not {args.max_page_sharing}",
                                    EXIT_USAGE)
        total_pages = sum(s.pages for s in sketches)
        if args.host_capacity is not None:
            capacity = args.host_capacity // PAGE_SIZE
        else:
            capacity = max(max(s.pages for s in sketches),
                           math.ceil(DEFAULT_SLACK * total_pages / args.hosts))
        sizes = [s.pages for s in sketches]
        try:
            placed = place(sketches, args.hosts, capacity, args.use_zero_pages,
                           time_limit=args.search_seconds)
            given = in_order(sizes, args.hosts, capacity)
            rand = shuffled(sizes, args.hosts, capacity, args.seed)
        except PlacementError as e:
            raise EstimateError(str(e), EXIT_USAGE) from None
        why_not = _verifiable(sketches)
        if why_not and verify != "none":
            remarks.append(why_not)
            verify = "none"
        exact: dict[str, list[dict[str, Any] | None]] = {}
        t2 = time.perf_counter()
        if verify != "none":
            todo = [("placement", placed.assignment)]
            if verify == "both":
                todo.append(("given_order", given))
            groups, owner = [], []
            for label, where in todo:
                for h in range(args.hosts):
                    groups.append([sketches[i].source for i, w in enumerate(where) if w == h])
                    owner.append(label)
            results = cluster.verify_all(client, groups, args.max_page_sharing,
                                         args.use_zero_pages)
            for label, r in zip(owner, results, strict=True):
                exact.setdefault(label, []).append(r)
        t_verify = time.perf_counter() - t2
    result.update({
        "hosts": args.hosts,
        "host_capacity_pages": capacity,
        "sources": [{"name": s.name, "source": s.source, "pages": s.pages,
                     "zero_pages": s.zero_pages, "sketch_bytes": s.payload_bytes}
                    for s in sketches],
        "pages": total_pages,
        "sketch": {**params, "bytes": sum(s.payload_bytes for s in sketches),
                   "fraction": sum(s.payload_bytes for s in sketches) / (total_pages *
                                                                         PAGE_SIZE)},
        "algorithm": "greedy by decreasing size onto the host with the largest predicted "
                     "gain, then local search (moves and swaps) on the predicted total",
        "local_search_moves": placed.moves,
        "placement": _hosts_report(sketches, placed.assignment, args.hosts,
                                   args.use_zero_pages, exact.get("placement")),
        "given_order": _hosts_report(sketches, given, args.hosts, args.use_zero_pages,
                                     exact.get("given_order")),
        "random": _hosts_report(sketches, rand, args.hosts, args.use_zero_pages, None),
        "seconds": {"sketch": t_sketch, "place": placed.seconds, "verify": t_verify,
                    "total": time.perf_counter() - t0},
        "max_rss_bytes": {"driver": _max_rss()},
        "remarks": remarks,
    })
    result["random"]["seed"] = args.seed
    if args.plot:
        from .plot import fleet_plot

        fleet_plot(args.plot, result)
    return result


def _pm(row: dict[str, Any], key: str = "predicted") -> str:
    return (f"{_mib(row[key + '_saved_pages']):9.1f} MiB ± "
            f"{_mib(row[key + '_stderr_pages']):.1f}")


def text(r: dict[str, Any]) -> str:
    d = r["dask"]
    out = [f"ksmcore fleet: {len(r['sources'])} sources ({_mib(r['pages']):.1f} MiB) on "
           f"{r['hosts']} hosts of {_mib(r['host_capacity_pages']):.1f} MiB "
           f"({r['host_capacity_pages']} pages, before merging)",
           f"dask: {d['scheduler']} at {d['address']}, {d['workers']} workers",
           f"sketches: {r['sketch']['bytes']} bytes ({r['sketch']['fraction']:.3%} of the "
           f"memory), sample rate 1/{2 ** r['sketch']['sample_shift']}, "
           f"{r['sketch']['bits_per_page']} bitmap bits per page; "
           f"{r['seconds']['sketch']:.1f} s on the workers",
           f"placement: greedy + local search on predicted savings ({r['local_search_moves']} "
           f"moves, {r['seconds']['place']:.2f} s); verified on the workers in "
           f"{r['seconds']['verify']:.1f} s; total {r['seconds']['total']:.1f} s, driver peak "
           f"memory {r['max_rss_bytes']['driver'] / MIB:.0f} MiB",
           "",
           f"  {'':<12} {'predicted saved':>22} {'exact saved':>14} {'exact general_profit':>21}"]
    for label, key in (("placement", "placement"), ("given order", "given_order"),
                       ("random", "random")):
        t = r[key]["total"]
        ex = (f"{_mib(t['exact_saved_pages']):10.1f} MiB" if "exact_saved_pages" in t
              else f"{'not verified':>14}")
        gp = (f"{t['exact_general_profit'] / MIB:17.1f} MiB" if "exact_general_profit" in t
              else f"{'':>21}")
        out.append(f"  {label:<12} {_pm(t):>22} {ex} {gp}")
    out += ["", "per host (placement):",
            f"  {'host':>4} {'sources':>7} {'MiB':>8} {'predicted MiB':>17} "
            f"{'exact MiB':>10} {'error':>7}  members"]
    for h in r["placement"]["hosts"]:
        ex = h.get("exact")
        exs = f"{_mib(ex['saved_pages']):10.1f}" if ex else f"{'-':>10}"
        err = (f"{(h['predicted_saved_pages'] - ex['saved_pages']) / ex['saved_pages']:+7.2%}"
               if ex and ex["saved_pages"] else f"{'-':>7}")
        names = ", ".join(_short(n) for n in h["sources"])
        out.append(f"  {h['host']:>4} {len(h['sources']):>7} {_mib(h['pages']):>8.1f} "
                   f"{_mib(h['predicted_saved_pages']):>9.1f} ± "
                   f"{_mib(h['predicted_stderr_pages']):<5.1f} {exs} {err}  {names}")
    out.append("")
    out.append("saved: pages_sharing + ksm_zero_pages at convergence; predicted from the "
               "sketches (± one standard error), exact from the engine")
    out += r["remarks"]
    return "\n".join(out) + "\n"


def _short(name: str) -> str:
    if name.startswith("synth:") and "/" in name:
        return "#" + name.rsplit("/", 1)[1]
    return name.rsplit("/", 1)[-1]


def run_fleet(args: argparse.Namespace) -> int:
    try:
        result = fleet(args)
    except EstimateError as e:
        print(f"ksmcore fleet: {e}", file=sys.stderr)
        return e.exit_code
    except MemoryError:
        print("ksmcore fleet: out of memory", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("ksmcore fleet: interrupted", file=sys.stderr)
        return 130
    if args.json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        sys.stdout.write(text(result) + (f"plot: {args.plot}\n" if args.plot else ""))
    sys.stdout.flush()
    return 0
