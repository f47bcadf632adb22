"""The ``ksmcore`` command."""

from __future__ import annotations

import argparse
import errno
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence

# The command does no linear algebra worth threads: without this, numpy's OpenBLAS
# starts a thread per CPU at import, and they spin beside the scan. (Set before numpy
# is first imported; a user's own setting wins.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .constants import MADV_MERGEABLE, PAGE_SIZE  # noqa: E402

SHOWN = (
    "full_scans",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "general_profit",
)


def _demo(args: argparse.Namespace) -> int:
    from . import Machine
    from .demo import vm_like_images

    images = vm_like_images(args.processes, args.pages)
    m = Machine()
    procs = []
    for image in images:
        p = m.spawn()
        addr = p.mmap(len(image))
        p.fill(addr, image)
        p.madvise(addr, len(image) * PAGE_SIZE, MADV_MERGEABLE)
        procs.append(p)
    m.ksm.pages_to_scan = args.pages_to_scan
    m.ksm.run = 1
    print(
        f"ksmcore demo: {args.processes} VM-like processes of {args.pages} pages "
        f"({args.processes * args.pages * PAGE_SIZE >> 20} MiB), pages_to_scan={args.pages_to_scan}"
    )
    print("  ".join(f"{name:>14}" for name in SHOWN))
    last = None
    still = 0
    t0 = time.perf_counter()
    while still < 2 and m.ksm.full_scans < args.max_scans:
        m.ksm.scan(full_scans=1)
        s = m.ksm.stats()
        print("  ".join(f"{s[name]:>14}" for name in SHOWN))
        now = tuple(s[n] for n in SHOWN if n not in ("full_scans", "pages_scanned"))
        still = still + 1 if now == last else 0
        last = now
    s = m.ksm.stats()
    saved = int(s["pages_sharing"]) + int(s["ksm_zero_pages"])
    print(
        f"converged after {s['full_scans']} full scans in {time.perf_counter() - t0:.2f} s: "
        f"{saved} pages ({saved * PAGE_SIZE / 2**20:.1f} MiB) saved, "
        f"general_profit {int(s['general_profit']) / 2**20:.1f} MiB"
    )
    for p in procs:
        print(f"  pid {p.pid}: " + ", ".join(f"{k} {v}" for k, v in p.ksm_stat().items()))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import platform

    from .bench import bench_rows, format_table

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    rows = bench_rows(args.scale, kernel=not args.no_kernel, reference=not args.no_reference,
                      log=log)
    print(f"ksmcore bench on {platform.node()} ({platform.machine()}, Linux "
          f"{platform.release()}, {_cpu_model()}), W1-W2 at {int(262_144 * args.scale)} pages")
    print(format_table(rows))
    if not args.no_speeds:
        _bench_speeds(args.scale, log)
    return 0


def _bench_speeds(scale: float, log: Callable[[str], None]) -> None:
    """The whole estimate against a page-cache read, and the replay against real time."""
    from .benchspeed import GIB, estimate_vs_read, replay_speed, room_for_image

    size = max(64 << 20, int(4 * GIB * scale) >> 20 << 20)
    name = f"{size // GIB} GiB" if size % GIB == 0 else f"{size >> 20} MiB"
    if room_for_image(size):
        log(f"estimate of a {name} raw image against cat, 3 times each ...")
        e = estimate_vs_read(size)
        print(f"estimate of a {name} raw image: {e.estimate_s:.2f} s, a page-cache "
              f"read {e.read_s:.2f} s: {e.ratio:.1f}x the read (medians of 3; "
              f"{e.full_scans} full scans)")
    else:
        print(f"estimate of a {name} raw image: skipped, not enough free space "
              f"and memory for it")
    log("replay of the record/replay issue's 60 s workload, 3 times ...")
    r = replay_speed(60.0)
    print(f"replay of a 60 s trace (3 x 3,000 pages, 1,700 writes/s): {r.cpu_s:.2f} s of CPU, "
          f"{r.ratio:.0f}x real time (median of 3)")


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import main as calibrate_main

    return calibrate_main(args)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _add_version(parser: argparse.ArgumentParser) -> None:
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ksmcore {__version__}")


EXIT_SIGPIPE = 128 + 13  # what a shell reports for a writer killed by SIGPIPE


def _stdout_gone() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's own flush at exit does not
    fail again (and print "Exception ignored ...")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: the command's exit code. Output errors end in one line on
    stderr (no traceback): a closed stdout or a full device exit 1; a pipe closed by
    its reader (``| head``) exits quietly with 141, as a writer killed by SIGPIPE."""
    if sys.stdout is None or not _fd_open(1):
        print("ksmcore: standard output is closed; nowhere to write the result",
              file=sys.stderr)
        return 1
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _stdout_gone()
        return EXIT_SIGPIPE
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EBADF, errno.EIO, errno.EDQUOT, errno.EFBIG):
            _stdout_gone()
            print(f"ksmcore: cannot write the output: {e.strerror}", file=sys.stderr)
            return 1
        raise


def console() -> int:
    """The ``ksmcore`` command as a process of its own (the console script): main(),
    with the collector tuned for a process that exits when the command ends. Not for
    calling from a program that goes on (main() is): it changes the process's gc."""
    # The commands allocate few objects that form cycles, but their imports allocate
    # many: collecting every 700 allocations spent ~10 ms of a 1 s estimate on them.
    gc.set_threshold(100_000, 10, 10)
    code = main()
    # What is left is freed at exit: the interpreter's last full collection would walk
    # every object of the imports (~50 ms after a 1 s estimate) for no cycle worth
    # finding.
    gc.freeze()
    return code


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# the commands each module adds (tests/test_cli_groups.py checks this against them)
COMMAND_GROUPS = {
    "estimate": ("estimate", "tune", "compare"),
    "fleet": ("sketch", "fleet"),
    "record": ("record",),
}


def _command_groups(argv: Sequence[str]) -> set[str]:
    """The groups of COMMAND_GROUPS whose parsers this command line needs: the top
    level's options take no value, so the first other word names the command."""
    first = next((a for a in argv if not a.startswith("-")), None)
    for group, names in COMMAND_GROUPS.items():
        if first in names:
            return {group}
    return set(COMMAND_GROUPS)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ksmcore", description="Linux KSM (mm/ksm.c) as a user-space engine."
    )
    _add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run ksmd on a built-in VM-like workload")
    demo.add_argument("--processes", type=int, default=3)
    demo.add_argument("--pages", type=int, default=8192, help="pages per process")
    demo.add_argument("--pages-to-scan", type=int, default=4096)
    demo.add_argument("--max-scans", type=int, default=20)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="time W1-W4: engine vs kernel ksmd vs reference")
    bench.add_argument("--scale", type=float, default=1.0,
                       help="W1/W2 size as a fraction of 1 GiB (default 1)")
    bench.add_argument("--no-kernel", action="store_true", help="leave the real ksmd out")
    bench.add_argument("--no-reference", action="store_true", help="leave the reference out")
    bench.add_argument("--no-speeds", action="store_true",
                       help="leave out the whole estimate of a 4 GiB image (against a "
                            "page-cache read) and the 60 s trace replay")
    bench.set_defaults(func=_bench)
    cal = sub.add_parser("calibrate", help="measure this host's ksmd; write a cost model "
                                           "for --cost-model (root, a KSM kernel)")
    cal.add_argument("-o", "--output", metavar="FILE", help="write the cost-model file here")
    cal.set_defaults(func=_calibrate)
    # the other commands' modules load only when the command line is parsed, and only
    # the one it names (all of them for --help or a command that is none of them)
    groups = _command_groups(sys.argv[1:] if argv is None else argv)
    commands: dict[str, argparse.ArgumentParser] = {}
    if "estimate" in groups:  # estimate, tune and compare
        from .estimate.commands import add_parsers

        commands.update(add_parsers(sub))
    if "fleet" in groups:  # sketch and fleet (ksmcore.fleet)
        from .fleet.commands import add_parsers as add_fleet_parsers

        commands.update(add_fleet_parsers(sub))
    if "record" in groups:
        from .estimate.record import add_parser as add_record

        add_record(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in commands:
        # sources after an option ("a.img --json b.img") are sources too
        unknown = [e for e in extra if e.startswith("-")]
        if unknown:  # said by the subcommand, in one line
            commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        args.sources += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(console())
