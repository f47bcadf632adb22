"""Memory that moves: traces of live processes (``ksmcore record``) and their replay
onto a simulated machine (``ksmcore estimate TRACE``)."""

from .format import (
    ABSENT,
    Change,
    Trace,
    TraceError,
    TraceProcess,
    TraceWriter,
    is_trace,
    read_trace,
    write_trace,
)

__all__ = ["ABSENT", "Change", "Trace", "TraceError", "TraceProcess", "TraceWriter",
           "is_trace", "read_trace", "write_trace"]
