"""Parsing of /sys/kernel/mm/ksm/ writes, as the kernel's store functions parse them.

Shared by the engine and the reference: it turns the text written to a file into a
value or an ``OSError`` with the kernel's errno. Checks that depend on the machine's
state (EBUSY while KSM pages exist, pages_to_scan while the advisor runs) are made by
each implementation's ``ksm`` object.
"""

from __future__ import annotations

import errno

from .constants import COUNTERS, KNOB_DEFAULTS
from .errors import ksm_error

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
S32_MIN, S32_MAX = -(1 << 31), (1 << 31) - 1
S64_MAX = (1 << 63) - 1


def _strip_newline(text: str) -> str:
    # kstrto*() and sysfs_streq() accept one trailing newline.
    return text[:-1] if text.endswith("\n") else text


def _kstrtoull(text: str) -> int:
    """Base-10 kstrtoull(): an optional '+', digits, one optional newline."""
    s = text[1:] if text.startswith("+") else text
    s = _strip_newline(s)
    if not s or not s.isascii() or not s.isdigit():
        raise ksm_error(errno.EINVAL, f"not a number: {text!r}")
    value = int(s)
    if value > U64_MAX:
        raise ksm_error(errno.ERANGE, f"out of range: {text!r}")
    return value


def kstrtouint(text: str) -> int:
    value = _kstrtoull(text)
    if value > U32_MAX:
        raise ksm_error(errno.ERANGE, f"out of range for unsigned int: {text!r}")
    return value


def kstrtoul(text: str) -> int:
    return _kstrtoull(text)


def kstrtoint(text: str) -> int:
    if text.startswith("-"):
        magnitude = _kstrtoull(text[1:]) if not text[1:].startswith("+") else None
        if magnitude is None:
            raise ksm_error(errno.EINVAL, f"not a number: {text!r}")
        value = -magnitude
    else:
        value = _kstrtoull(text)
    if not S32_MIN <= value <= S32_MAX:
        raise ksm_error(errno.ERANGE, f"out of range for int: {text!r}")
    return value


def kstrtobool(text: str) -> bool:
    if not text:
        raise ksm_error(errno.EINVAL, "empty boolean")
    c0 = text[0].lower()
    if c0 in "yt1":
        return True
    if c0 in "nf0":
        return False
    if c0 == "o" and len(text) > 1:
        c1 = text[1].lower()
        if c1 == "n":
            return True
        if c1 == "f":
            return False
    raise ksm_error(errno.EINVAL, f"not a boolean: {text!r}")


def _einval(parse, text: str) -> int:
    """Parse, reporting any parse error (ERANGE too) as EINVAL, as most ksm stores do."""
    try:
        return int(parse(text))
    except OSError as e:
        raise ksm_error(errno.EINVAL, str(e.strerror)) from None


def parse_knob(name: str, text: str) -> int | str:
    """Value that writing ``text`` to /sys/kernel/mm/ksm/``name`` would set, or OSError."""
    if name in COUNTERS:
        raise ksm_error(errno.EACCES, f"{name} is read-only")
    if name not in KNOB_DEFAULTS:
        raise ksm_error(errno.ENOENT, f"no such file /sys/kernel/mm/ksm/{name}")
    if name == "run":
        value = _einval(kstrtouint, text)
        if value > 2:
            raise ksm_error(errno.EINVAL, f"run takes 0, 1 or 2, not {text!r}")
        return value
    if name in ("pages_to_scan", "sleep_millisecs", "stable_node_chains_prune_millisecs"):
        return _einval(kstrtouint, text)
    if name == "merge_across_nodes":
        value = kstrtoul(text)  # errors returned as they are
        if value > 1:
            raise ksm_error(errno.EINVAL, f"merge_across_nodes takes 0 or 1, not {text!r}")
        return value
    if name == "max_page_sharing":
        value = kstrtoint(text)  # errors returned as they are
        if value < 2:
            raise ksm_error(errno.EINVAL, f"max_page_sharing must be at least 2, not {text!r}")
        return value
    if name in ("use_zero_pages", "smart_scan"):
        return _einval(kstrtobool, text)
    if name == "advisor_mode":
        s = _strip_newline(text)
        if s not in ("none", "scan-time"):
            raise ksm_error(errno.EINVAL, f"advisor_mode takes none or scan-time, not {text!r}")
        return s
    if name == "advisor_target_scan_time":
        value = _einval(kstrtoul, text)
        if value < 1:
            raise ksm_error(errno.EINVAL, "advisor_target_scan_time must be at least 1")
        return value
    # advisor_max_cpu, advisor_min_pages_to_scan, advisor_max_pages_to_scan
    return _einval(kstrtoul, text)


def knob_text(value: object) -> str:
    """The text an attribute assignment writes: ints as decimal, bools as 0/1."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"a knob takes an int or a str, not {type(value).__name__}")


def format_sysfs(name: str, value: int | str) -> str:
    """A file's contents as the kernel prints them (with the newline)."""
    if name == "advisor_mode":
        return "[none] scan-time\n" if value == "none" else "none [scan-time]\n"
    return f"{value}\n"
