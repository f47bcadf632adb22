"""One lock per machine: what is thread-safe, and what is refused.

Every public call on a machine, its processes and its ``m.ksm`` holds the machine's
lock for the whole call, so threads calling one machine are served one at a time:
a background ``do_scan`` and writes from another thread interleave call by call,
never inside a call (the C core releases the GIL, so without the lock two threads
would be in the C core on the same arrays at once). Machines are independent: two
machines in two threads run in parallel.

Refused with ``RuntimeError``:

- a call into the machine from code that runs on the same thread *during* another
  call on it: a tracepoint subscriber, or a signal handler that interrupts a call.
  The machine is mid-update there, so nothing may enter it;
- any call after a call was cut short by ``KeyboardInterrupt`` (or another
  ``BaseException`` that is not an ``Exception``) or ran out of memory: the machine may
  be half-updated, so it refuses from then on (``Machine.broken`` says why).

A memory image that changes on disk under the engine also breaks the machine
(``OSError(ESTALE)``): see ``images.py``.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class MachineBroken(RuntimeError):
    """The machine refuses every call: an earlier call left it in doubt."""


class Guard:
    """The lock of one machine, who holds it, and why the machine is broken, if it is."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.broken: BaseException | None = None
        # called after each outermost call; each raises to refuse
        self.checks: list[Callable[[], None]] = []

    def refuse_if_broken(self) -> None:
        if self.broken is not None:
            raise MachineBroken(f"this machine refuses every call since an earlier call "
                                f"failed in the middle: {self.broken!r}") from self.broken

    def run_checks(self) -> None:
        for check in self.checks:
            try:
                check()
            except BaseException as e:
                self.broken = e
                raise


def _nested(fn: Callable[..., T], self: Any, args: Any, kwargs: Any) -> T:
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller == "ksmcore" or caller.startswith("ksmcore."):
        return fn(self, *args, **kwargs)  # the models calling their own API
    raise RuntimeError(
        f"{fn.__qualname__}: re-entrant call into a machine during another call on the "
        "same thread (from a tracepoint subscriber or a signal handler); the machine is "
        "in the middle of an update"
    )


def entry(fn: Callable[..., T]) -> Callable[..., T]:
    """Make ``fn`` (a method of an object with a ``_guard``) one serialized call."""

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> T:
        g: Guard = self._guard
        me = threading.get_ident()
        if g.owner == me:
            return _nested(fn, self, args, kwargs)
        with g.lock:
            g.owner = me
            try:
                g.refuse_if_broken()
                # the checks run after each call: a change between two calls is found
                # at the end of the next one, before its result is returned
                result = fn(self, *args, **kwargs)
                if g.checks:
                    g.run_checks()
                return result
            except MemoryError as e:
                g.broken = e
                raise
            except Exception:
                if g.checks and g.broken is None:
                    g.run_checks()  # an image fault explains the failure better
                raise
            except BaseException as e:
                g.broken = e
                raise
            finally:
                g.owner = None

    return call


def serialized(cls: type[T]) -> type[T]:
    """Wrap every public method and property of ``cls`` (its own, not inherited) with
    :func:`entry`, and ``__getattr__``/``__setattr__`` where the class defines them."""
    for name, attr in list(vars(cls).items()):
        if name.startswith("_") and name not in ("__getattr__",):
            continue
        if name == "broken":
            continue  # says why the machine refuses: must answer when it does
        if isinstance(attr, property):
            setattr(cls, name, property(
                entry(attr.fget) if attr.fget else None,
                entry(attr.fset) if attr.fset else None,
                attr.fdel, attr.__doc__))
        elif callable(attr) and not isinstance(attr, (staticmethod, classmethod, type)):
            setattr(cls, name, entry(attr))
    return cls
