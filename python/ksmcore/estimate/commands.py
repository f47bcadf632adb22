"""The ``estimate`` and ``tune`` subcommands: options, sources, output.

Everything that can fail is done before anything is printed on stdout: bad input
gives one line on stderr and a non-zero exit (1: a file or process; 2: an option).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import pwd
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TextIO

from ..api import MachineAPI, ProcessAPI
from ..guard import MachineBroken
from ..knobs import kstrtoull
from ..thp import THP_ENABLED_DEFAULT, THP_ENABLED_VALUES
from . import export, plot, report, samples, tune
from .errors import EXIT_USAGE, EstimateError
from .export import OUTPUT_FORMATS
from .extents import ZERO_PAGES
from .procmem import (
    ProcessUnreadable,
    mem_available,
    process_node,
    read_process,
    readable_pids,
)
from .samples import sample_sources
from .simulate import DEFAULT_COST_PER_PAGE_US, Knobs, Run, load, new_machine, run_ksmd
from .sources import FORMATS, Source, check_node, open_file, split_node

DEFAULT_MAX_SCANS = 50
HEADROOM = 256 << 20
# What the engine needs per scanned page at most: slot and rmap_item fields, a frame,
# and a tree node when every page is unique (benchmarks/test_memory.py measures 30
# bytes a page for duplicate-rich memory and 63-65 for all-unique memory), and room
# for the old and new copy of an array while it grows.
MODEL_BYTES_PER_PAGE = 96
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


# --------------------------------------------------------------------------------
# options

ESTIMATE_EXAMPLES = """examples:
  ksmcore estimate --sample                       the built-in sample
  ksmcore estimate vm1.img vm2.img                raw guest RAM files
  ksmcore estimate core.1234 core.1235            ELF cores (gcore, the kernel's, QEMU)
  ksmcore estimate --pid 1234 --pid 1235          live processes (read-only)
  ksmcore estimate --all --user www --top 10      every process of one user
  ksmcore estimate a.img@0 b.img@1 --nodes 2 --merge-across-nodes 0
  ksmcore estimate --sample --output-format prometheus > /var/lib/node_exporter/ksm.prom
"""

TUNE_EXAMPLES = """examples:
  ksmcore tune --sample --within 1m
  ksmcore tune vm1.img vm2.img --pages-to-scan-values 100,1000,5000 --sleep-millisecs-values 20,200
  ksmcore tune a.img@0 b.img@1 --nodes 2          adds merge_across_nodes 1 vs 0
"""


def _nonneg(text: str) -> int:
    """A knob value parsed as the kernel's kstrtoull() parses a sysfs write: ASCII
    decimal digits, an optional '+' before and newline after; no spaces, no '_', no
    other digits (Python's int() would take all three)."""
    try:
        return kstrtoull(text)
    except OSError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a decimal integer as the kernel reads one") from None


def _positive_int(text: str) -> int:
    v = _nonneg(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or not v > 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite positive number")
    return v


def _size(text: str) -> int:
    """A size in bytes: ``512M``, ``8G``, ``1.5GiB``, ``1T`` or plain bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.strip().lower(), re.ASCII)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512M or 8G")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def check_memory(args: argparse.Namespace, sources: list[Source], remarks: list[str]) -> None:
    """Say what the run needs, and refuse before starting when that is more than
    ``--max-memory`` (default: what the machine has available)."""
    pages = sum(s.npages for s in sources)
    need = pages * MODEL_BYTES_PER_PAGE
    limit = args.max_memory if args.max_memory is not None else mem_available() - HEADROOM
    what = "--max-memory" if args.max_memory is not None else "available on this machine"
    if need > limit:
        raise EstimateError(
            f"{pages} pages ({_human(pages * 4096)}) need up to {_human(need)} of model memory "
            f"({MODEL_BYTES_PER_PAGE} bytes a page), more than the {_human(max(limit, 0))} "
            f"{what}; --max-memory SIZE sets the limit")
    line = f"model memory: up to {_human(need)} for {pages} pages"
    if _progress_wanted(args):
        print(f"ksmcore {args.command}: {line}", file=sys.stderr)
    if need >= 256 << 20:
        remarks.append(line)


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} bytes"


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no Infinity or NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _add_sources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sources (each becomes one process of the simulated machine)")
    g.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="a raw memory image (whole 4096-byte pages) or an ELF core dump "
                        "(gcore, QEMU dump-guest-memory); FILE@NODE places it on a NUMA node")
    g.add_argument("--pid", action="append", default=[], metavar="PID[@NODE]",
                   help="a live process, read through /proc (repeatable)")
    g.add_argument("--all", action="store_true",
                   help="every process this user may read (not this one)")
    g.add_argument("--user", metavar="USER",
                   help="with --all: only the processes of USER (a name or uid)")
    g.add_argument("--mergeable-only", action="store_true",
                   help="live processes: only ranges already marked mergeable (madvise or "
                        "prctl), i.e. what the running kernel's KSM scans today")
    g.add_argument("--sample", action="store_true",
                   help="the built-in sample: 4 generated VM-like images of 64 MiB")
    g.add_argument("--format", choices=FORMATS, default="auto",
                   help="how to read SOURCE files (auto: ELF cores by their magic, else raw)")
    g.add_argument("--zero-pages", choices=ZERO_PAGES, default="absent",
                   help="all-zero pages of a core (gcore, the kernel's, a VM dump): absent "
                        "(default: a core cannot tell them from memory never touched, which "
                        "ksmd never visits; in a sparse core, such as the kernel's, only its "
                        "holes) or present (counted as memory ksmd scans)")
    g.add_argument("--allow-partial", action="store_true",
                   help="pad a file (or core segment) whose size is not a whole number of "
                        "pages with zeros, instead of refusing it")


def _add_machine(p: argparse.ArgumentParser, swept: bool) -> None:
    g = p.add_argument_group("the simulated machine (/sys/kernel/mm/ksm knobs; kernel defaults)")
    g.add_argument("--nodes", type=_nonneg, default=1, metavar="N",
                   help="NUMA nodes of the simulated machine (default 1); place sources with "
                        "FILE@NODE or --pid PID@NODE (live processes: their node from "
                        "/proc/PID/numa_maps)")
    g.add_argument("--kernel", metavar="VERSION", default=None,
                   help="the kernel whose KSM to model: 6.1, 6.6, 6.8, 6.12, 6.18 or a "
                        "release such as 6.1.0-28-amd64 (default: the running kernel)")
    g.add_argument("--merge-across-nodes", type=_nonneg, default=1, metavar="0|1",
                   help="merge_across_nodes: 1 (default) one stable tree for all nodes, 0 one "
                        "per node")
    g.add_argument("--max-page-sharing", type=_nonneg, default=256, metavar="N",
                   help="max_page_sharing: mappings per KSM page before a new one is made "
                        "(stable node chains; default 256, at least 2)")
    g.add_argument("--use-zero-pages", type=_nonneg, default=0, metavar="0|1",
                   help="use_zero_pages: 1 maps empty pages to the zero page instead of "
                        "merging them (default 0)")
    if not swept:
        g.add_argument("--smart-scan", type=_nonneg, default=1, metavar="0|1",
                       help="smart_scan: skip pages that stayed unique (default 1)")
        g.add_argument("--pages-to-scan", type=_nonneg, default=100, metavar="N",
                       help="pages_to_scan: pages per ksmd batch (default 100)")
        g.add_argument("--sleep-millisecs", type=_nonneg, default=20, metavar="MS",
                       help="sleep_millisecs: ksmd's sleep between batches (default 20)")
    g.add_argument("--cost-per-page-us", type=_positive_float, default=DEFAULT_COST_PER_PAGE_US,
                   metavar="US",
                   help="ksmd's CPU time per page it scans, for the simulated clock (default "
                        "%(default).2f: ksmcore.timing.CostModel, measured by timing this "
                        "project's kernel harness against the real ksmd of its development "
                        "machine; measure your own with ksmcore bench)")
    g.add_argument("--cost-model", metavar="FILE",
                   help="a cost-model file of `ksmcore calibrate` (its cost per page; on a "
                        "trace also its batch overhead and sleep rounding)")
    g.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="refuse to start a run whose model would need more memory than "
                        "this (e.g. 8G; default: the memory available on this machine)")
    g.add_argument("--max-scans", type=_nonneg, default=DEFAULT_MAX_SCANS, metavar="N",
                   help="give up after N full scans without convergence (default %(default)s)")


def _add_output(p: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-format", choices=formats, default="text",
                   help="text (default), json (as --json), "
                        + ("prometheus (node_exporter's textfile-collector format), "
                           if "prometheus" in formats else "")
                        + "csv (one row per " + ("source" if "prometheus" in formats
                                                 else "setting") + ")")
    g.add_argument("--json", action="store_true", help="print one JSON object instead")
    g.add_argument("--plot", metavar="FILE.png", help="draw a PNG plot (matplotlib)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (shown on stderr only when it is a terminal)")


def _one_line_errors(p: argparse.ArgumentParser) -> None:
    """Malformed options get one line on stderr too, not argparse's usage block."""

    def error(message: str) -> NoReturn:
        p.exit(EXIT_USAGE, f"{p.prog}: {message} (see --help)\n")

    p.error = error  # type: ignore[method-assign]


def add_parsers(sub: Any) -> dict[str, argparse.ArgumentParser]:
    return {"estimate": _estimate_parser(sub), "tune": _tune_parser(sub),
            "compare": _compare_parser(sub)}


def _estimate_parser(sub: Any) -> argparse.ArgumentParser:
    est = sub.add_parser(
        "estimate",
        help="what KSM would save on real memory (images, cores, live processes)",
        description=textwrap.fill(
            "Run ksmd (the kernel's algorithm, simulated) on memory images, ELF core dumps "
            "or live processes until its counters converge, and report what KSM would save "
            "and how long ksmd would take. The host's KSM is never touched.", 78),
        epilog=ESTIMATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sources(est)
    _add_machine(est, swept=False)
    _add_output(est, OUTPUT_FORMATS)
    est.add_argument_group("security").add_argument(
        "--domain-by", choices=("user", "source", "cgroup"),
        help="group the sources into trust domains (a process's user or cgroup, a file's "
             "owner; or each source alone) and report the pages merged across domains, "
             "the savings with merging kept within each domain, and from zero pages alone")
    est.add_argument_group("output").add_argument(
        "--top", type=_positive_int, metavar="N",
        help="list only the N sources that save the most (by ksm_process_profit)")
    est.add_argument_group("transparent huge pages").add_argument(
        "--thp", choices=THP_ENABLED_VALUES, default=THP_ENABLED_DEFAULT,
        help="/sys/kernel/mm/transparent_hugepage/enabled of the simulated host (default "
             f"{THP_ENABLED_DEFAULT}): images and guest cores are mapped as QEMU maps guest "
             "RAM (MADV_HUGEPAGE), process cores without advice; --pid sources keep the "
             "huge pages they have")
    est.set_defaults(func=run_estimate)
    _one_line_errors(est)
    return est


def _tune_parser(sub: Any) -> argparse.ArgumentParser:
    tn = sub.add_parser(
        "tune",
        help="which pages_to_scan/sleep_millisecs/smart_scan reach the savings, at what cost",
        description=textwrap.fill(
            "Sweep pages_to_scan x sleep_millisecs x smart_scan on the sources and show the "
            "time to 50/90/100% of the savings against pages scanned per second; name the "
            "cheapest setting reaching 90% within --within, with the lines that apply it.", 78),
        epilog=TUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sources(tn)
    _add_machine(tn, swept=True)
    g = tn.add_argument_group("the sweep")
    g.add_argument("--pages-to-scan-values", default=",".join(map(str, tune.DEFAULT_PAGES_TO_SCAN)),
                   metavar="N,N,...", help="pages_to_scan values to sweep (default %(default)s)")
    g.add_argument("--sleep-millisecs-values",
                   default=",".join(map(str, tune.DEFAULT_SLEEP_MILLISECS)), metavar="MS,MS,...",
                   help="sleep_millisecs values to sweep (default %(default)s)")
    g.add_argument("--smart-scan-values", default=",".join(map(str, tune.DEFAULT_SMART_SCAN)),
                   metavar="0,1", help="smart_scan values to sweep (default %(default)s)")
    g.add_argument("--within", default=tune.DEFAULT_WITHIN, metavar="DURATION",
                   help="target time to 90%% of the savings (10m, 90s, 1h; default %(default)s)")
    _add_output(tn, ("text", "json", "csv"))
    tn.set_defaults(func=run_tune)
    _one_line_errors(tn)
    return tn


def _compare_parser(sub: Any) -> argparse.ArgumentParser:
    cmp = sub.add_parser(
        "compare",
        help="where KSM runs: what ksmd holds now against what it converges to",
        description=textwrap.fill(
            "On a host where KSM already runs: read (never write) /sys/kernel/mm/ksm and "
            "the /proc/PID/ksm_stat of the processes registered with KSM, run the estimate "
            "on the same processes (their mergeable ranges) with the host's knobs, and show "
            "what ksmd holds now against what it converges to, and how long it needs at "
            "the current knobs and at a faster pages_to_scan.", 78),
        epilog="examples:\n  ksmcore compare\n  ksmcore compare --pid 1234 --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmp.add_argument("--pid", action="append", default=[], type=_nonneg, metavar="PID",
                     help="compare these processes only (default: every process registered "
                          "with KSM)")
    cmp.add_argument("--faster-pages-to-scan", type=_positive_int, metavar="N",
                     help="the faster setting to time (default: 10x the host's pages_to_scan, "
                          "at least 1000)")
    cmp.add_argument("--cost-per-page-us", type=_positive_float,
                     default=DEFAULT_COST_PER_PAGE_US, metavar="US",
                     help="ksmd's CPU time per page it scans (default %(default).2f, as for "
                          "estimate)")
    cmp.add_argument("--max-scans", type=_positive_int, default=DEFAULT_MAX_SCANS, metavar="N",
                     help="give up after N full scans without convergence (default "
                          "%(default)s)")
    cmp.add_argument("--json", action="store_true", help="print one JSON object instead")
    cmp.set_defaults(func=run_compare, sources=[])
    _one_line_errors(cmp)
    return cmp


# --------------------------------------------------------------------------------
# sources


def _uid(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise EstimateError(f"--user {user}: no such user", EXIT_USAGE) from None


def _pid_spec(spec: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"(\d+)(?:@(\d+))?", spec.strip())
    if not m:
        raise EstimateError(f"--pid {spec!r}: expected a process id, optionally @NODE",
                            EXIT_USAGE)
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def _numa_node(pid: int, nodes: int) -> int | None:
    """With --nodes N > 1 and no @NODE: the node of most of the process's anonymous
    memory on this host (/proc/PID/numa_maps)."""
    if nodes <= 1:
        return None
    node = process_node(pid)
    return node if node is not None and node < nodes else None


@dataclass(frozen=True)
class SourceSpecs:
    """The sources the options name, parsed and checked; nothing read yet."""

    files: list[tuple[str, int | None]]  # (path, NUMA node or None)
    pids: list[tuple[int, int | None]]  # (pid, NUMA node or None)
    uid: int | None  # --all --user


def validate(args: argparse.Namespace) -> SourceSpecs:
    """Every check of the source options, before anything is read or printed: --user
    goes with --all, --nodes is 1..64, each --pid PID[@NODE] and FILE[@NODE] is well
    formed and names an existing node, the user exists, and some source is named.
    Reads nothing (but the user database); raises EstimateError."""
    if args.user and not args.all:
        raise EstimateError("--user applies to --all only", EXIT_USAGE)
    if args.nodes < 1 or args.nodes > 64:
        raise EstimateError(f"--nodes {args.nodes}: expected 1..64", EXIT_USAGE)
    pids = [_pid_spec(spec) for spec in args.pid]
    for pid, node in pids:
        check_node(node, args.nodes, f"--pid {pid}")
    files = [split_node(spec, "source") for spec in args.sources]
    for path, node in files:
        check_node(node, args.nodes, path)
    uid = _uid(args.user) if args.user else None
    if not (args.sample or files or getattr(args, "extra_sources", []) or pids or args.all):
        raise EstimateError("nothing to estimate: name image or core files, --pid PID, --all "
                            "or --sample", EXIT_USAGE)
    return SourceSpecs(files, pids, uid)


def gather(args: argparse.Namespace, specs: SourceSpecs) -> tuple[list[Source], list[str]]:
    """Every source ``validate`` passed, read in order: the sample, files, Source
    objects (estimate()), --pid, --all. Also remarks on what was left out (printed
    with the report)."""
    sources: list[Source] = []
    remarks: list[str] = []
    if args.sample:
        sources += sample_sources()
        remarks.append(samples.describe())
    for path, node in specs.files:
        src = open_file(path, args.format, args.allow_partial, args.zero_pages)
        src.node = node
        sources.append(src)
    sources += getattr(args, "extra_sources", [])  # estimate(): Source objects
    budget = mem_available() - HEADROOM
    for pid, node in specs.pids:
        src = read_process(pid, args.mergeable_only, budget=budget)
        budget -= src.npages * 4096
        src.node = node if node is not None else _numa_node(pid, args.nodes)
        sources.append(src)
    if args.all:
        found, remark = _gather_all(args, specs.uid, budget)
        sources += found
        remarks.append(remark)
    return sources, remarks


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _named(pids: list[int], most: int = 8) -> str:
    shown = ", ".join(f"{p} ({_comm(p)})" for p in pids[:most])
    return shown + (f" and {len(pids) - most} more" if len(pids) > most else "")


def _anonymous_bytes(pid: int) -> int:
    """The process's anonymous memory (smaps_rollup), an upper bound of what reading
    it copies; 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class _AllRead:
    """What --all read, and what it left out and why."""

    sources: list[Source] = field(default_factory=list)
    skipped: dict[str, list[int]] = field(
        default_factory=lambda: {"denied": [], "gone": [], "empty": [], "memory": []})
    nothing: int = 0  # read, but with no memory KSM could merge


def _gather_all(args: argparse.Namespace, uid: int | None,
                budget: int) -> tuple[list[Source], str]:
    """--all: every process this user may read, each copied while the memory lasts
    (the rest are named, not read). Says up front (on stderr) how much it will copy at
    most, and shows progress while reading /proc."""
    pids = readable_pids(uid)
    need = sum(_anonymous_bytes(p) for p in pids)
    print(f"ksmcore {args.command}: --all: {len(pids)} processes, up to {need >> 20} MiB of "
          f"anonymous memory to copy ({max(budget, 0) >> 20} MiB may be used)",
          file=sys.stderr)
    read = _read_all(args, pids, budget)
    who = f"of user {args.user} " if args.user else ""
    if not read.sources:
        raise EstimateError(_none_read(who, len(pids), read))
    return read.sources, _all_remark(who, read)


def _read_all(args: argparse.Namespace, pids: list[int], budget: int) -> _AllRead:
    """Read each process while the memory budget lasts, with a progress bar on a
    terminal; sort the ones left out by why."""
    bar = None
    if _progress_wanted(args):
        from tqdm import tqdm

        bar = tqdm(total=len(pids), unit="proc", file=sys.stderr, leave=False,
                   desc="reading /proc")
    read = _AllRead()
    try:
        for pid in pids:
            if bar is not None:
                bar.update(1)
            try:
                src = read_process(pid, args.mergeable_only, budget=budget)
            except ProcessUnreadable as e:
                read.skipped[e.reason].append(pid)
                continue
            except EstimateError:  # more than the memory left: named, not read
                read.skipped["memory"].append(pid)
                continue
            budget -= src.npages * 4096
            src.node = _numa_node(pid, args.nodes)
            if src.npages:
                read.sources.append(src)
            else:
                read.nothing += 1
    finally:
        if bar is not None:
            bar.close()
    return read


def _none_read(who: str, found: int, read: _AllRead) -> str:
    """Why --all has no source: how many processes it found, and why each was left out."""
    skipped = read.skipped
    why = (f"{len(skipped['denied'])} not readable (needs root or CAP_SYS_PTRACE: "
           f"{_named(skipped['denied'])})" if skipped["denied"] else "")
    return (
        f"--all: no process {who}could be read ({found} found"
        + (f", {why}" if why else "")
        + (f", {read.nothing} with no memory KSM could merge" if read.nothing else "")
        + (f", {len(skipped['empty'])} kernel threads or zombies" if skipped["empty"]
           else "")
        + ")"
    )


def _all_remark(who: str, read: _AllRead) -> str:
    """What --all read, and the processes it left out (printed with the report)."""
    skipped = read.skipped
    return (
        f"--all: {len(read.sources)} processes {who}read"
        + (f", {read.nothing} with no candidate memory left out" if read.nothing else "")
        + (f"; not readable (needs root or CAP_SYS_PTRACE): {_named(skipped['denied'])}"
           if skipped["denied"] else "")
        + (f"; left out for lack of memory: {_named(skipped['memory'])}"
           if skipped["memory"] else "")
        + (f"; {len(skipped['empty'])} kernel threads or zombies" if skipped["empty"] else "")
        + (f"; {len(skipped['gone'])} exited meanwhile" if skipped["gone"] else "")
    )


# --------------------------------------------------------------------------------
# progress


class _ScanBar:
    """A tqdm bar of the pages of the current full scan, reset at each full scan."""

    def __init__(self, pages: int, stream: TextIO) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=pages, unit="page", unit_scale=True, file=stream, leave=False,
                        desc="full scan 1", dynamic_ncols=True)
        self.scans = 0

    def __call__(self, processed: int, stats: dict[str, Any]) -> None:
        fs = int(stats["full_scans"])
        if fs != self.scans:
            self.scans = fs
            self.bar.reset()
            self.bar.set_description(f"full scan {fs + 1}")
            saved = (int(stats["pages_sharing"]) + int(stats["ksm_zero_pages"])) * 4096 / 2**20
            self.bar.set_postfix_str(f"saved {saved:.1f} MiB", refresh=False)
        else:
            self.bar.update(processed)

    def close(self) -> None:
        self.bar.close()


def _progress_wanted(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


# --------------------------------------------------------------------------------
# the commands


def _knobs(args: argparse.Namespace) -> Knobs:
    return Knobs(
        merge_across_nodes=args.merge_across_nodes,
        max_page_sharing=args.max_page_sharing,
        pages_to_scan=getattr(args, "pages_to_scan", 100),
        sleep_millisecs=getattr(args, "sleep_millisecs", 20),
        smart_scan=getattr(args, "smart_scan", 1),
        use_zero_pages=args.use_zero_pages,
        kernel=args.kernel,
    )


def _check_common(args: argparse.Namespace) -> None:
    if args.max_scans < 1:
        raise EstimateError(f"--max-scans {args.max_scans}: expected at least 1", EXIT_USAGE)
    if args.plot:
        plot.check_path(args.plot)


def _trace_hook(args: argparse.Namespace) -> str | None:
    """A trace among the sources (``ksmcore record``): replayed by .replay. Else a
    --cost-model file gives the static run its cost per page."""
    from .replay import load_cost_model, trace_path

    path = trace_path(args)
    if path is None and args.cost_model:
        args.cost_per_page_us = load_cost_model(args.cost_model).page_ns / 1000
    return path


def _estimate_machine(args: argparse.Namespace) -> tuple[Knobs, MachineAPI]:
    """The checks of estimate's own options, before any source is read: --max-scans,
    --plot, and the knobs as the kernel takes them (on the machine that will run)."""
    _check_common(args)
    knobs = _knobs(args)
    return knobs, new_machine(args.nodes, knobs, thp=getattr(args, "thp", THP_ENABLED_DEFAULT))


def _simulate(args: argparse.Namespace, m: MachineAPI,
              sources: list[Source]) -> tuple[list[ProcessAPI], Run]:
    """ksmd on machine ``m`` holding the sources, until it converges or --max-scans,
    with a progress bar on a terminal."""
    procs = load(m, sources)
    bar = _ScanBar(sum(s.npages for s in sources), sys.stderr) if _progress_wanted(args) else None
    try:
        run = run_ksmd(m, args.max_scans, on_batch=bar)
    finally:
        if bar is not None:
            bar.close()
    return procs, run


def estimate(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The report (text or JSON) for ``ksmcore estimate``, computed in full."""
    trace = _trace_hook(args)
    if trace is not None:
        from .replay import estimate_report

        return estimate_report(args, trace)
    knobs, m = _estimate_machine(args)  # refuse bad options before reading anything
    sources, remarks = gather(args, validate(args))
    check_memory(args, sources, remarks)
    procs, run = _simulate(args, m, sources)
    cost = args.cost_per_page_us * 1e-6
    result = report.build(m, procs, sources, run, knobs, cost, args.zero_pages)
    if getattr(args, "domain_by", None):
        from . import domains

        result["security"] = domains.security_view(m, procs, sources, knobs, args.nodes,
                                                   args.max_scans, args.domain_by)
    result["remarks"] = remarks
    if args.plot:
        plot.savings(args.plot, result, run, cost)
    if getattr(args, "top", None):
        report.top_sources(result, args.top)
    return _output(args, result, report.text, export.csv_rows)


def output_format(args: argparse.Namespace) -> str:
    fmt = getattr(args, "output_format", "text")
    if args.json and fmt not in ("text", "json"):
        raise EstimateError(f"--json and --output-format {fmt}: choose one", EXIT_USAGE)
    return "json" if args.json else fmt


def _output(args: argparse.Namespace, result: dict[str, Any],
            text: Callable[[dict[str, Any]], str],
            csv: Callable[[dict[str, Any]], str]) -> tuple[str, dict[str, Any]]:
    """What estimate and tune print: one JSON object, Prometheus text, CSV, or the
    text report followed by the remarks and where the plot went."""
    fmt = output_format(args)
    if fmt == "json":
        return json.dumps(_finite(result), indent=1, allow_nan=False) + "\n", result
    if fmt == "prometheus":
        return export.prometheus(result), result
    if fmt == "csv":
        return csv(result), result
    out = text(result)
    extra = list(result["remarks"]) + ([f"plot: {args.plot}"] if args.plot else [])
    if extra:
        out += "\n" + "\n".join(extra) + "\n"
    return out, result


@dataclass(frozen=True)
class _Grid:
    """The sweep of ``ksmcore tune``: its target time and the knob values."""

    within_s: float
    pages_to_scan: tuple[int, ...]
    sleep_millisecs: tuple[int, ...]
    smart_scan: tuple[int, ...]


def _tune_grid(args: argparse.Namespace, base: Knobs) -> _Grid:
    """The checks of tune's own options, before any source is read: --max-scans,
    --plot, --within, the swept values, and every setting as the kernel takes it."""
    _check_common(args)
    within = tune.parse_duration(args.within)
    pts = tune.parse_values(args.pages_to_scan_values, "--pages-to-scan-values", 1)
    sleeps = tune.parse_values(args.sleep_millisecs_values, "--sleep-millisecs-values", 0)
    smart = tune.parse_values(args.smart_scan_values, "--smart-scan-values", 0)
    if "smart_scan" not in new_machine(args.nodes, base).profile.sysfs_files:
        smart = (0,)  # a kernel without smart scan (before 6.7) has one setting
    for p in pts:  # every setting must be one the kernel takes
        for s in smart:
            for sl in sleeps:
                new_machine(args.nodes, replace(base, pages_to_scan=p, smart_scan=s,
                                                sleep_millisecs=sl))
    return _Grid(within, pts, sleeps, smart)


def _sweep(args: argparse.Namespace, sources: list[Source], base: Knobs, grid: _Grid,
           cost: float, advisor: bool) -> list[dict[str, Any]]:
    """tune.sweep over the grid, with a progress bar (one step a run) on a terminal."""
    bar = None
    hook = None
    if _progress_wanted(args):
        from tqdm import tqdm

        runs = (len(grid.pages_to_scan) * len(grid.smart_scan)
                + (len(grid.sleep_millisecs) if advisor else 0))
        bar = tqdm(total=runs, unit="run", file=sys.stderr, leave=False)

        def hook(what: str) -> None:
            bar.set_description(what)
            bar.update(1)

    try:
        return tune.sweep(sources, base, args.nodes, cost, grid.pages_to_scan,
                          grid.sleep_millisecs, grid.smart_scan, args.max_scans, hook,
                          advisor=advisor)
    finally:
        if bar is not None:
            bar.close()


def tune_report(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The table (text or JSON) for ``ksmcore tune``, computed in full."""
    trace = _trace_hook(args)
    if trace is not None:
        from .replay import tune_report as tune_trace_report

        return tune_trace_report(args, trace)
    base = _knobs(args)
    grid = _tune_grid(args, base)  # refuse bad options before reading anything
    cost = args.cost_per_page_us * 1e-6
    sources, remarks = gather(args, validate(args))
    check_memory(args, sources, remarks)
    advisor = tune.advisor_status(args.nodes, args.kernel)
    rows = _sweep(args, sources, base, grid, cost, advisor[0])
    numa = None
    if len({s.node or 0 for s in sources}) > 1:
        numa = tune.numa_tradeoff(sources, base, args.nodes, max(grid.pages_to_scan),
                                  args.max_scans)
    result = tune.build(sources, rows, grid.within_s, advisor, base, cost,
                        grid=(grid.pages_to_scan, grid.sleep_millisecs),
                        advisor_knobs=tune.advisor_settings(args.nodes), numa=numa)
    result["remarks"] = remarks
    if args.plot:
        plot.tune(args.plot, rows, grid.within_s, result["cheapest"])
    return _output(args, result, tune.text, export.tune_csv)


def _run(args: argparse.Namespace, make: Any) -> int:
    try:
        out, _ = make(args)
    except EstimateError as e:
        print(f"ksmcore {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except MemoryError:
        print(f"ksmcore {args.command}: out of memory", file=sys.stderr)
        return 1
    except MachineBroken as e:
        print(f"ksmcore {args.command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno != errno.ESTALE:  # a memory image changed under the run (images.py)
            raise
        print(f"ksmcore {args.command}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ksmcore {args.command}: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(out)
    sys.stdout.flush()
    return 0


def run_estimate(args: argparse.Namespace) -> int:
    return _run(args, estimate)


def run_tune(args: argparse.Namespace) -> int:
    return _run(args, tune_report)


def compare_report(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    from . import compare

    result = compare.compare(args)
    if args.json:
        return json.dumps(_finite(result), indent=1, allow_nan=False) + "\n", result
    return compare.text(result), result


def run_compare(args: argparse.Namespace) -> int:
    return _run(args, compare_report)
