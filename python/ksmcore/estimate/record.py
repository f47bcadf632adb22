"""The ``record`` subcommand: a trace of live processes for ``estimate TRACE``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from ..trace.format import CODECS, DEFAULT_INTERVAL_MS
from .errors import EXIT_USAGE, EstimateError
from .sources import check_node


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from .commands import _one_line_errors, _positive_float

    p = sub.add_parser(
        "record",
        help="record live processes' memory as it changes, for estimate/tune TRACE",
        description="Record the pages ksmd would visit in live processes, then at each "
                    "interval the pages that changed (contents, present or gone, "
                    "mappings, exits), into a trace file for `ksmcore estimate TRACE` and "
                    "`ksmcore tune TRACE`. By default the processes are only read "
                    "(smaps, pagemap, mem), never written.",
    )
    p.add_argument("--pid", action="append", default=[], metavar="PID[@NODE]",
                   help="a live process (repeatable)")
    p.add_argument("--all", action="store_true",
                   help="every process this user may read (not this one), at the start")
    p.add_argument("--user", metavar="USER", help="with --all: only the processes of USER")
    p.add_argument("--mergeable-only", action="store_true",
                   help="only ranges already marked mergeable (madvise or prctl)")
    p.add_argument("--seconds", type=_positive_float, required=True, metavar="S",
                   help="how long to record")
    p.add_argument("--interval-ms", type=int, default=DEFAULT_INTERVAL_MS, metavar="MS",
                   help="time between two samples (default %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="TRACE", help="the trace file")
    p.add_argument("--soft-dirty", action="store_true",
                   help="find written pages by their soft-dirty bits: WRITES "
                        "/proc/PID/clear_refs (write-protects the targets' pages; each "
                        "first write to a page per interval costs them a minor fault), "
                        "but sees writes of unchanged bytes and reads only written pages")
    p.add_argument("--fault-trace", action=argparse.BooleanOptionalAction, default=None,
                   help="trace the processes' write faults (root, x86: a private tracefs "
                        "instance; nothing is written to them): each copy on write of a "
                        "merged page is recorded at its time even when the bytes did not "
                        "change. Default: where this host can; --fault-trace: or fail")
    p.add_argument("--impute-writes", action=argparse.BooleanOptionalAction, default=True,
                   help="with traced faults (root): add the writes the kernel could not "
                        "show (to pages it had writable, so that they did not fault), "
                        "drawn at each page's write rate as seen while it faulted; an "
                        "estimate, for a replay whose ksmd merges other pages at other "
                        "times (default: on)")
    p.add_argument("--compress", choices=CODECS, default="auto",
                   help="page contents: auto (the default: lzma for the initial pages, "
                        "where most bytes go, zlib for the changes), zlib (fast; about "
                        "2x bigger on process memory) or lzma (all of them)")
    p.add_argument("--nodes", type=int, default=1, help="NUMA nodes that @NODE may name")
    p.set_defaults(func=run_record)
    _one_line_errors(p)
    return p


def _targets(args: argparse.Namespace) -> list[tuple[int, int | None]]:
    from .commands import _pid_spec, _uid

    if args.user and not args.all:
        raise EstimateError("--user applies to --all only", EXIT_USAGE)
    if bool(args.pid) == bool(args.all):
        raise EstimateError("name the processes: --pid PID (repeatable) or --all", EXIT_USAGE)
    if args.interval_ms < 1:
        raise EstimateError(f"--interval-ms {args.interval_ms}: expected at least 1",
                            EXIT_USAGE)
    if args.interval_ms > args.seconds * 1000:
        raise EstimateError(f"--interval-ms {args.interval_ms} is longer than --seconds "
                            f"{args.seconds:g}", EXIT_USAGE)
    pids = [_pid_spec(spec) for spec in args.pid]
    for pid, node in pids:
        check_node(node, args.nodes, f"--pid {pid}")
    if args.all:
        uid = _uid(args.user) if args.user else None
        from .procmem import readable_pids

        pids = [(pid, None) for pid in readable_pids(uid)]
    parent = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output) or not os.access(parent, os.W_OK):
        raise EstimateError(f"-o {args.output}: cannot write a trace there")
    return pids


def record_report(args: argparse.Namespace) -> str:
    from ..trace.recorder import record  # the tracing and sampling machinery, when used

    pids = _targets(args)
    method = "soft-dirty" if args.soft_dirty else "hash"
    try:
        res = record(pids, args.seconds, args.output, args.interval_ms, args.mergeable_only,
                     method, meta={"command": " ".join(sys.argv[1:])}, codec=args.compress,
                     skip_unreadable=args.all, fault_trace=args.fault_trace,
                     impute_writes=args.impute_writes)
    except EstimateError:  # ProcessUnreadable too: nothing half-written is left
        with contextlib.suppress(OSError):
            os.unlink(args.output)
        raise
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(args.output)
        raise EstimateError(f"-o {args.output}: {e.strerror}") from None
    lines = [
        f"ksmcore record: {len(res.processes)} processes, {res.samples} samples every "
        f"{args.interval_ms} ms over {res.seconds:.1f} s ({method}"
        + (", write faults traced)" if res.fault_trace else ")"),
        f"trace {args.output}: {res.bytes / 2**20:.1f} MiB, {res.unique_pages} distinct pages",
    ]
    for p in res.processes:
        lines.append(f"  pid {p['pid']}: " + (
            f"exited during the recording, kept up to its exit ({p['pages_at_end']} pages)"
            if p["exited"] else f"{p['pages_at_end']} pages at the end"))
    if res.fault_trace:
        rate = res.write_faults / max(res.seconds, 1e-9)
        lines.append(f"write faults: {res.write_faults} ({rate:.0f}/s), recorded as "
                     f"writes at their times"
                     + (f"; {res.lost_faults} lost" if res.lost_faults else ""))
        if res.imputed_writes:
            lines.append(f"imputed writes: {res.imputed_writes} (to pages the kernel had "
                         f"writable, at each page's rate)")
    if res.late_samples:
        lines.append(f"{res.late_samples} samples started late: a sample took longer than "
                     f"the interval (try a longer --interval-ms)")
    if res.skipped:
        lines.append("left out: " + ", ".join(f"{n} {why}" for why, n in res.skipped.items()))
    lines += [n for n in res.notes if not n.startswith("pid ")]
    return "\n".join(lines) + "\n"


def run_record(args: argparse.Namespace) -> int:
    try:
        out = record_report(args)
    except EstimateError as e:
        print(f"ksmcore record: {e}", file=sys.stderr)
        return e.exit_code
    sys.stdout.write(out)
    return 0
