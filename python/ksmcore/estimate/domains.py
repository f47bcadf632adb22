"""The security view (``--domain-by``): KSM merges equal pages whatever process they
belong to, and a merged page is what a KSM timing side channel needs (a write to it
takes a copy-on-write fault, which another process can time). Sources are grouped
into trust domains, and the report gives

- the KSM pages mapped from more than one domain, and their mappings: the exposure;
- the savings if merging were kept within each domain (what VMware's salting and
  Windows' same-domain rule keep): ksmd run on each domain on its own;
- the savings from zero pages alone (``use_zero_pages``: every all-zero page mapped to
  the zero page, which reveals nothing that is not already public).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import EXIT_USAGE, EstimateError
from .extents import nonzero_pages
from .mappings import cross_group
from .procmem import real_uid
from .report import _table, mib
from .simulate import Knobs, load, new_machine, run_ksmd
from .sources import Source

DOMAIN_BY = ("user", "source", "cgroup")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _process_cgroup(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            hier, _, path = line.split(":", 2)
            if hier == "0":  # the unified (v2) hierarchy
                return path
        return None
    except (OSError, ValueError):
        return None


def domain_of(src: Source, by: str) -> str:
    """The trust domain of a source: its user (a process's real uid, a file's owner),
    itself, or its cgroup (a file has none: it is its own domain)."""
    if by == "source":
        return src.name
    if by == "user":
        uid = real_uid(src.pid) if src.pid is not None else None
        if uid is None and src.kind in ("image", "core"):
            try:
                uid = os.stat(src.name).st_uid
            except OSError:
                uid = None
        return f"user {_user_name(uid)}" if uid is not None else src.name
    if by == "cgroup":
        cg = _process_cgroup(src.pid) if src.pid is not None else None
        return f"cgroup {cg}" if cg is not None else src.name
    raise EstimateError(f"--domain-by {by!r}: expected one of {', '.join(DOMAIN_BY)}",
                        EXIT_USAGE)


def zero_pages(sources: Sequence[Source]) -> int:
    """All-zero pages among the pages ksmd scans."""
    return sum(int(len(seg) - nonzero_pages(seg).sum()) for s in sources for seg in s.segments)


def security_view(m: Any, procs: Sequence[Any], sources: Sequence[Source], knobs: Knobs,
                  nodes: int, max_scans: int, by: str) -> dict[str, Any]:
    """The --domain-by section of the report (``m`` has run to convergence)."""
    names = [domain_of(s, by) for s in sources]
    order = list(dict.fromkeys(names))
    groups = [order.index(n) for n in names]
    across = cross_group(m, procs, groups)
    stats = m.ksm.stats()
    saved_all = int(stats["pages_sharing"]) + int(stats["ksm_zero_pages"])
    domains = []
    within = 0
    for d, name in enumerate(order):
        mine = [s for s, g in zip(sources, groups, strict=True) if g == d]
        dm = new_machine(nodes, replace(knobs, pages_to_scan=max(knobs.pages_to_scan, 1000)))
        load(dm, mine)
        run_ksmd(dm, max_scans)
        st = dm.ksm.stats()
        saved = int(st["pages_sharing"]) + int(st["ksm_zero_pages"])
        within += saved
        domains.append({"domain": name, "sources": [s.name for s in mine],
                        "pages": sum(s.npages for s in mine), "saved_within": saved})
    zero = zero_pages(sources)
    return {
        "domain_by": by,
        "domains": domains,
        "ksm_pages": across["ksm_pages"],
        "ksm_pages_across_domains": across["ksm_pages_across"],
        "mappings_across_domains": across["mappings_across"],
        "saved_pages": saved_all,
        "saved_pages_within_domains": within,
        "saved_pages_zero_only": zero,
    }


def text(view: dict[str, Any]) -> list[str]:
    lines = ["", f"security view (trust domains by {view['domain_by']}):"]
    lines += _table(["domain", "sources", "pages", "saved_within_MiB"],
                    [[d["domain"], len(d["sources"]), d["pages"], f"{mib(d['saved_within']):.1f}"]
                     for d in view["domains"]])
    saved = view["saved_pages"]
    lines += [
        f"  merged across domains  {view['ksm_pages_across_domains']} of "
        f"{view['ksm_pages']} KSM pages, mapped {view['mappings_across_domains']} times: "
        "the pages a KSM timing side channel could observe across domains",
        f"  savings, all merging   {saved} pages = {mib(saved):.1f} MiB",
        f"  savings within domains {view['saved_pages_within_domains']} pages = "
        f"{mib(view['saved_pages_within_domains']):.1f} MiB (merging kept inside each domain, "
        "as salting does)",
        f"  savings, zero pages    {view['saved_pages_zero_only']} pages = "
        f"{mib(view['saved_pages_zero_only']):.1f} MiB (use_zero_pages alone: empty pages "
        "mapped to the zero page)",
    ]
    return lines


