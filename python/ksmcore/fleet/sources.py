"""What a fleet's sources are, and how a worker opens one.

A source spec is a string a worker can open on its own: a raw memory image or ELF core
dump path (as ``ksmcore estimate`` reads them), or a synthetic member
(``synth:...``, see :mod:`.synth`). Openers are looked up by prefix in ``OPENERS``, so
another kind of source (a recorded trace, say) registers one more prefix.
"""

from __future__ import annotations

from collections.abc import Callable

from ..estimate.errors import EXIT_USAGE, EstimateError
from ..estimate.sources import Source, open_file
from . import synth


def _open_synth(spec: str) -> Source:
    try:
        fleet, idx = synth.parse(spec)
    except ValueError as e:
        raise EstimateError(str(e), EXIT_USAGE) from None
    if idx is None:
        raise EstimateError(f"{spec}: a whole fleet, not one member", EXIT_USAGE)
    return Source(spec, "synthetic", [fleet.image(idx)])


OPENERS: dict[str, Callable[[str], Source]] = {synth.PREFIX: _open_synth}


def expand(specs: list[str]) -> list[str]:
    """Fleet specs (``synth:FxNxSIZE``) as their members; others unchanged."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(synth.PREFIX):
            try:
                out += synth.expand(spec)
            except ValueError as e:
                raise EstimateError(str(e), EXIT_USAGE) from None
        else:
            out.append(spec)
    return out


def open_source(spec: str) -> Source:
    for prefix, opener in OPENERS.items():
        if spec.startswith(prefix):
            return opener(spec)
    return open_file(spec)
