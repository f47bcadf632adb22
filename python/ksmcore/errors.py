"""Exceptions shared by the engine and the reference.

Misuse raises an ``OSError`` with the errno the kernel would give (EFAULT, EINVAL,
ENOMEM, EBUSY, ESRCH, ...), so callers can test ``e.errno`` as with a syscall.
"""

from __future__ import annotations

import errno
import os


def ksm_error(err: int, what: str) -> OSError:
    """An OSError carrying a kernel errno and a readable message."""
    if err == errno.ESRCH:
        return ProcessLookupError(err, f"{os.strerror(err)}: {what}")
    return OSError(err, f"{os.strerror(err)}: {what}")


class KsmdNotRunning(RuntimeError):
    """ksm.scan() was asked for full scans that ksmd cannot make (run != 1, no mm, ...)."""
