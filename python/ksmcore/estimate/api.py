"""``ksmcore.estimate.estimate()``: the estimate as one Python call."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from typing import Any

from .sources import Source

SourceSpec = str | os.PathLike[str] | int | Source


def _parser() -> argparse.ArgumentParser:
    from .commands import add_parsers

    parser = argparse.ArgumentParser(prog="ksmcore")
    return add_parsers(parser.add_subparsers())["estimate"]


def estimate(sources: Iterable[SourceSpec] = (), **knobs: Any) -> dict[str, Any]:
    """What ``ksmcore estimate --json`` prints for the same input, as a dict.

    ``sources``: paths of raw images or ELF cores (``"FILE@NODE"`` places one on a
    node), process ids (ints, as ``--pid``) or :class:`~.sources.Source` objects (in
    that order: files, pids, then Source objects). ``knobs``: the command's options by
    their destination names, e.g. ``pages_to_scan=1000, sleep_millisecs=20,
    smart_scan=1, use_zero_pages=0, max_page_sharing=256, merge_across_nodes=1,
    nodes=2, cost_per_page_us=2.6, max_scans=50, zero_pages="absent",
    mergeable_only=True, sample=True``. Bad input raises
    :class:`~.errors.EstimateError` (its ``exit_code`` as the command's)."""
    from .commands import _finite
    from .commands import estimate as run_estimate

    args = _parser().parse_args([])
    for name, value in knobs.items():
        if name in ("json", "output_format", "plot", "no_progress", "sources", "pid") or \
                not hasattr(args, name):
            raise TypeError(f"estimate() got an unexpected keyword argument {name!r}")
        setattr(args, name, value)
    files: list[str] = []
    pids: list[str] = []
    objects: list[Source] = []
    for s in sources:
        if isinstance(s, Source):
            objects.append(s)
        elif isinstance(s, int) and not isinstance(s, bool):
            pids.append(str(s))
        else:
            files.append(os.fspath(s))  # type: ignore[arg-type]  # a bool is refused above
    args.sources, args.pid, args.extra_sources = files, pids, objects
    args.json, args.no_progress = True, True
    _, result = run_estimate(args)
    return dict(json.loads(json.dumps(_finite(result), allow_nan=False)))
