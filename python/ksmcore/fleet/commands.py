"""``ksmcore sketch`` and ``ksmcore fleet``: options, output, errors (one line on
stderr, exit 1 for input and 2 for options, nothing on stdout)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from ..constants import PAGE_SIZE
from ..estimate.errors import EXIT_INPUT, EXIT_USAGE, EstimateError
from . import fileformat
from .sketch import (
    DEFAULT_BITS_PER_PAGE,
    DEFAULT_SAMPLE_SHIFT,
    MAX_BITS_PER_PAGE,
    MAX_SAMPLE_SHIFT,
    Sketch,
    check_params,
    sketch_pages,
)
from .sources import expand, open_source

MIB = 2**20


def _one_line_errors(p: argparse.ArgumentParser) -> None:
    def error(message: str) -> NoReturn:
        p.exit(EXIT_USAGE, f"{p.prog}: {message} (see --help)\n")

    p.error = error  # type: ignore[method-assign]


def _add_sketch_params(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the sketch")
    g.add_argument("--sample-shift", type=int, default=DEFAULT_SAMPLE_SHIFT, metavar="S",
                   help=f"sample the contents whose hash is under 2**(64-S), rate 1/2**S "
                        f"(0..{MAX_SAMPLE_SHIFT}; default %(default)s)")
    g.add_argument("--bits-per-page", type=int, default=DEFAULT_BITS_PER_PAGE, metavar="B",
                   help=f"linear-counting bitmap of at least B bits per distinct page "
                        f"(0: none; up to {MAX_BITS_PER_PAGE}; default %(default)s)")
    g.add_argument("--max-page-sharing", type=int, default=256, metavar="N",
                   help="the max_page_sharing the savings are counted with (default 256)")


def add_parsers(sub: Any) -> dict[str, argparse.ArgumentParser]:
    sk = sub.add_parser(
        "sketch", help="summarise sources' pages in a small mergeable sketch file",
        description="Hash every page of each source and write a sketch per source: exact "
                    "page, zero-page and distinct-content counts, a hash-threshold sample "
                    "of the contents with their counts and a linear-counting bitmap (well "
                    "under 1%% of the memory). `ksmcore fleet` places sketched sources.")
    sk.add_argument("sources", nargs="*", metavar="SOURCE",
                    help="a raw memory image, an ELF core dump, or synth:FxNxSIZE[@SEED]")
    sk.add_argument("--pid", action="append", type=int, default=[], metavar="PID",
                    help="a live process, read through /proc (repeatable)")
    sk.add_argument("-o", "--output", required=True, metavar="FILE",
                    help="the sketch file to write")
    _add_sketch_params(sk)
    sk.add_argument("--json", action="store_true", help="print the summary as JSON")
    sk.set_defaults(func=run_sketch)
    _one_line_errors(sk)
    from .fleetcmd import add_parser

    return {"sketch": sk, "fleet": add_parser(sub, _add_sketch_params, _one_line_errors)}


def sketch_params(args: argparse.Namespace) -> dict[str, int]:
    params = {"sample_shift": args.sample_shift, "bits_per_page": args.bits_per_page,
              "max_page_sharing": args.max_page_sharing}
    try:
        check_params(**params)
    except ValueError as e:
        raise EstimateError(str(e), EXIT_USAGE) from None
    return params


def summary(s: Sketch) -> dict[str, Any]:
    return {"name": s.name, "source": s.source, "kind": s.kind, "pages": s.pages,
            "zero_pages": s.zero_pages, "distinct": s.distinct,
            "sampled": len(s.sample_hashes), "sample_rate": s.rate,
            "bitmap_bits": (1 << s.bits_log2) if s.bits_log2 else 0,
            "payload_bytes": s.payload_bytes,
            "payload_fraction": s.payload_bytes / max(1, s.pages * PAGE_SIZE)}


def make_sketches(args: argparse.Namespace) -> list[Sketch]:
    params = sketch_params(args)
    specs = expand(list(args.sources))
    if not specs and not args.pid:
        raise EstimateError("nothing to sketch: name image or core files, synth:..., or "
                            "--pid PID", EXIT_USAGE)
    out = []
    for spec in specs:
        src = open_source(spec)
        out.append(sketch_pages(src.segments, src.name, spec, src.kind, **params))
    if args.pid:
        from ..estimate.procmem import read_process

        for pid in args.pid:
            src = read_process(pid)
            # a live process changes: its sketch is a snapshot, not read again
            out.append(sketch_pages(src.segments, src.name, "", src.kind, **params))
    return out


def run_sketch(args: argparse.Namespace) -> int:
    try:
        sketches = make_sketches(args)
        size = fileformat.save(args.output, sketches)
    except EstimateError as e:
        print(f"ksmcore sketch: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"ksmcore sketch: {args.output}: {e.strerror}", file=sys.stderr)
        return EXIT_INPUT
    rows = [summary(s) for s in sketches]
    if args.json:
        print(json.dumps({"file": args.output, "bytes": size, "sketches": rows}, indent=1))
        return 0
    total = sum(s.pages for s in sketches)
    print(f"ksmcore sketch: {len(sketches)} sources, {total} pages "
          f"({total * PAGE_SIZE / MIB:.1f} MiB) -> {args.output} ({size} bytes, "
          f"{size / max(1, total * PAGE_SIZE):.4%} of the memory)")
    print(f"  {'source':<40} {'pages':>8} {'zero':>7} {'distinct':>8} {'sampled':>7} "
          f"{'bitmap':>8} {'size':>7}")
    for r in rows:
        print(f"  {r['name'][-40:]:<40} {r['pages']:>8} {r['zero_pages']:>7} "
              f"{r['distinct']:>8} {r['sampled']:>7} {r['bitmap_bits']:>8} "
              f"{r['payload_fraction']:>7.3%}")
    return 0
