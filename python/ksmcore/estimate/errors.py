"""The one exception of ``ksmcore estimate``/``tune``: bad input, told in one line."""

from __future__ import annotations

# Exit codes: 1 for input that cannot be read or understood (files, processes),
# 2 for options the kernel would refuse (as argparse does for malformed options).
EXIT_INPUT = 1
EXIT_USAGE = 2


class EstimateError(Exception):
    """A message for stderr (one line, naming the file, process or option) and an
    exit code. Raised before anything is printed on stdout."""

    def __init__(self, message: str, exit_code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code
