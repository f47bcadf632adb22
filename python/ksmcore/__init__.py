"""ksmcore: Linux's Kernel Samepage Merging as a user-space engine.

``ksmcore.Machine`` is the engine (Python with a C core through cffi);
``ksmcore.reference.Machine`` is the pure-Python executable specification.
Both implement the same API and decide exactly what ``mm/ksm.c`` decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .constants import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, PAGE_SIZE, ZERO_PFN
from .errors import KsmdNotRunning

if TYPE_CHECKING:
    from .engine import Machine, Process

__all__ = [
    "MADV_DONTNEED",
    "MADV_MERGEABLE",
    "MADV_UNMERGEABLE",
    "PAGE_SIZE",
    "ZERO_PFN",
    "KsmdNotRunning",
    "Machine",
    "Process",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The engine needs the compiled core; import it on first use so that the shared
    # modules and the reference load without it.
    if name in ("Machine", "Process"):
        from . import engine

        return getattr(engine, name)
    if name in ("reference", "estimate"):
        # "ksmcore.reference.Machine" after a plain "import ksmcore"
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ksmcore' has no attribute {name!r}")
