"""``ksmcore estimate`` and ``ksmcore tune``: what KSM would save on real memory, and
with which knobs, without touching the host's KSM.

- :mod:`.sources`: sources (raw images) and what every reader returns;
  :mod:`.elfcore`: ELF core dumps; :mod:`.procmem`: live processes;
  :mod:`.samples`: the built-in sample.
- :mod:`.simulate`: ksmd to convergence, and the simulated clock.
- :mod:`.report`: the report as JSON and text; :mod:`.plot`: PNG plots;
  :mod:`.tune`: the knob sweep; :mod:`.export`: Prometheus and CSV output;
  :mod:`.commands`: the subcommands; :mod:`.api`: :func:`estimate`, the ``--json``
  object from one call.
"""

from __future__ import annotations

from .api import estimate
from .errors import EstimateError
from .simulate import Knobs, Run, ksmd_times, load, new_machine, run_ksmd
from .sources import Source, open_file

__all__ = [
    "EstimateError",
    "Knobs",
    "Run",
    "Source",
    "estimate",
    "ksmd_times",
    "load",
    "new_machine",
    "open_file",
    "run_ksmd",
]
