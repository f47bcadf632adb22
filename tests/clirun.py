"""The console script run in-process, as the estimate tests drive it."""

from __future__ import annotations

import contextlib
import io

from ksmcore.cli import main


def run(*argv: str) -> tuple[int, str, str]:
    """``ksmcore ARGV...``: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()
