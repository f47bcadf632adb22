"""Parsing of /sys/kernel/mm/ksm/ writes, as the kernel's store functions parse them.

Shared by the engine and the reference: it turns the text written to a file into a
value or an ``OSError`` with the kernel's errno. Checks that depend on the machine's
state (EBUSY while KSM pages exist, pages_to_scan while the advisor runs) are made by
each implementation's ``ksm`` object.
"""

from __future__ import annotations

import errno
import operator
from collections.abc import Collection
from typing import SupportsIndex, cast

from .constants import COUNTERS, KNOB_DEFAULTS, PAGE_SIZE, SYSFS_FILES
from .errors import ksm_error

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
S32_MIN, S32_MAX = -(1 << 31), (1 << 31) - 1
S64_MAX = (1 << 63) - 1


def _strip_newline(text: str) -> str:
    # kstrto*() and sysfs_streq() accept one trailing newline.
    return text[:-1] if text.endswith("\n") else text


def _kstrtoull(s: str) -> int:
    """lib/kstrtox.c _kstrtoull(), base 10: the longest run of digits (none: EINVAL;
    overflow: ERANGE, even with junk after it), then one optional newline, then the
    end of the string (else EINVAL)."""
    n = 0
    while n < len(s) and "0" <= s[n] <= "9":
        n += 1
    if n == 0:
        raise ksm_error(errno.EINVAL, f"not a number: {s!r}")
    value = int(s[:n])
    if value > U64_MAX:
        raise ksm_error(errno.ERANGE, f"out of range: {s!r}")
    rest = s[n:]
    if rest not in ("", "\n"):
        raise ksm_error(errno.EINVAL, f"not a number: {s!r}")
    return value


def kstrtoull(text: str) -> int:
    """kstrtoull(): an optional '+' before _kstrtoull()."""
    return _kstrtoull(text[1:] if text.startswith("+") else text)


def kstrtouint(text: str) -> int:
    value = kstrtoull(text)
    if value > U32_MAX:
        raise ksm_error(errno.ERANGE, f"out of range for unsigned int: {text!r}")
    return value


def kstrtoul(text: str) -> int:
    return kstrtoull(text)


def kstrtoint(text: str) -> int:
    """kstrtoll() then the int range: '-' then _kstrtoull() (no '+' after the '-')."""
    if text.startswith("-"):
        value = -_kstrtoull(text[1:])
    else:
        value = kstrtoull(text)
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


def sysfs_buffer(data: str | bytes) -> str | None:
    """What a store function sees of a write(2) of ``data`` to a sysfs file: at most
    PAGE_SIZE bytes (kernfs writes no more at once), read as a C string (up to the
    first NUL). None for an empty write, which returns 0 without calling the store."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if not raw:
        return None
    raw = raw[:PAGE_SIZE].split(b"\0", 1)[0]
    # bytes as chars: parsing only ever accepts ASCII, so nothing else can match
    return raw.decode("latin-1")


def _einval(parse, text: str) -> int:
    """Parse, reporting any parse error (ERANGE too) as EINVAL, as most ksm stores do."""
    try:
        return int(parse(text))
    except OSError as e:
        raise ksm_error(errno.EINVAL, str(e.strerror)) from None


def check_file(name: str, write: bool, files: Collection[str] = SYSFS_FILES) -> None:
    """What open(2) of /sys/kernel/mm/ksm/``name`` says: ENOENT for no such file (the
    kernel's ``files``: a profile's), EACCES when opening a read-only file (mode 0444,
    no store) for writing."""
    if name not in files or (name not in KNOB_DEFAULTS and name not in COUNTERS):
        raise ksm_error(errno.ENOENT, f"no such file /sys/kernel/mm/ksm/{name}")
    if write and name in COUNTERS:
        raise ksm_error(errno.EACCES, f"/sys/kernel/mm/ksm/{name} is read-only")


def parse_knob(name: str, text: str) -> int | str:
    """Value that the store of /sys/kernel/mm/ksm/``name`` sets for the C string
    ``text`` (see :func:`sysfs_buffer`), or OSError with the store's errno."""
    check_file(name, write=True)
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
    if name == "advisor_max_cpu":
        # parsed as unsigned long, kept in an unsigned int: the top bits are dropped
        return _einval(kstrtoul, text) & U32_MAX
    # advisor_min_pages_to_scan, advisor_max_pages_to_scan
    return _einval(kstrtoul, text)


def knob_text(value: object) -> str | bytes:
    """The text an attribute assignment writes: ints as decimal, bools as 0/1."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (str, bytes)):
        return value
    try:
        return str(operator.index(cast(SupportsIndex, value)))  # int, numpy ints
    except TypeError:
        pass
    raise TypeError(f"a knob takes an int, a str or bytes, not {type(value).__name__}")


def format_sysfs(name: str, value: int | str) -> str:
    """A file's contents as the kernel prints them (with the newline)."""
    if name == "advisor_mode":
        return "[none] scan-time\n" if value == "none" else "none [scan-time]\n"
    return f"{value}\n"
