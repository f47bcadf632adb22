"""Kernel profiles: what KSM decides differently from one kernel version to another.

ONE table (``CHANGES``) names every behaviour of mm/ksm.c (and of the mm around it
that the model follows) that changed between Linux 6.1 and 6.18: the version it
entered, with the upstream commit title, what it changes and how the model follows
it. The engine and the reference ask ``profile.has(NAME)`` by name; docs/
kernel-profiles.md is this table in prose. A :class:`Profile` is one kernel version:
a change is in it when the change entered at or before that version.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import sys
from dataclasses import dataclass, field

from .constants import SYSFS_FILES
from .errors import ksm_error

Version = tuple[int, int]


@dataclass(frozen=True)
class Change:
    """One behaviour that entered in ``version`` (upstream ``commit`` titles)."""

    name: str
    version: Version
    commits: tuple[str, ...]
    behaviour: str
    model: str
    checked: str = "not checked on a real kernel here"
    sysfs: tuple[str, ...] = ()  # the /sys/kernel/mm/ksm files it added


CHANGES: tuple[Change, ...] = (
    Change(
        "general_profit", (6, 4),
        ("mm: add new KSM process and sysfs knobs",),
        "/sys/kernel/mm/ksm/general_profit; ksm_merging_pages and ksm_process_profit "
        "in /proc/PID/ksm_stat (6.1 prints ksm_rmap_items alone there)",
        "the file and the ksm_stat fields exist from this version on",
        sysfs=("general_profit",),
    ),
    Change(
        "prctl_memory_merge", (6, 4),
        ("mm: add new api to enable ksm per process",
         "mm/ksm: unmerge and clear VM_MERGEABLE when setting PR_SET_MEMORY_MERGE=0"),
        "prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE): every VMA of the process "
        "mergeable (MMF_VM_MERGE_ANY)",
        "before it, both prctls fail with EINVAL, as an unknown prctl option does",
    ),
    Change(
        "ksm_zero_pages", (6, 6),
        ("ksm: count all zero pages placed by KSM",
         "ksm: add ksm zero pages for each process",
         "ksm: consider KSM-placed zeropages when calculating KSM profit"),
        "ksm_zero_pages in sysfs and /proc/PID/ksm_stat, counted in general_profit and "
        "ksm_process_profit",
        "the counters are kept in every version and shown from this one on",
        sysfs=("ksm_zero_pages",),
    ),
    Change(
        "unshare_zero_pages", (6, 6),
        ("ksm: support unsharing KSM-placed zero pages",),
        "MADV_UNMERGEABLE and run=2 also replace the zero pages KSM mapped (before, "
        "unmerging left them mapped)",
        "before it, break_ksm() leaves a KSM zero PTE in place",
    ),
    Change(
        "fork_resets_ksm_counters", (6, 6),
        ("mm/ksm: fix incorrect KSM counter handling in mm_struct during fork",),
        "a child's ksm_rmap_items and ksm_merging_pages start at 0; before, dup_mm() "
        "copied the parent's, and the child's counts stay off by them",
        "before it, the child's ksm_stat starts from the parent's values; mainline took "
        "the fix in 6.17, the 6.6.y and 6.12.y stable series have it, 6.1.y does not",
        checked="6.1: the child starts from the parent's counts (QEMU)",
    ),
    Change(
        "pages_scanned", (6, 6),
        ("mm/ksm: add pages scanned metric",),
        "/sys/kernel/mm/ksm/pages_scanned",
        "the file exists from this version on; counted per page as \"mm/ksm: fix "
        "ksm_pages_scanned accounting\" (6.10, backported to the stable series) does",
        sysfs=("pages_scanned",),
    ),
    Change(
        "smart_scan", (6, 7),
        ('mm/ksm: add "smart" page scanning mode', "mm/ksm: add pages_skipped metric"),
        "smart_scan (default 1) skips pages that stayed unique for several scans; "
        "pages_skipped counts them",
        "before it, the files do not exist and ksmd never skips (smart_scan is 0)",
        sysfs=("smart_scan", "pages_skipped"),
    ),
    Change(
        "merge_any_exec", (6, 7),
        ("mm/ksm: support fork/exec for prctl",),
        "MMF_VM_MERGE_ANY survives execve (MMF_INIT_MASK)",
        "before it, exec gives the process an mm without MERGE_ANY",
    ),
    Change(
        "advisor", (6, 8),
        ("mm/ksm: add ksm advisor", "mm/ksm: add sysfs knobs for advisor"),
        "the scan-time advisor sets pages_to_scan (advisor_mode and its knobs)",
        "before it, the advisor files do not exist and advisor_mode stays none",
        sysfs=("advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan",
               "advisor_max_pages_to_scan", "advisor_target_scan_time"),
    ),
    Change(
        "ksm_execve", (6, 10),
        ("mm/ksm: fix ksm exec support for prctl",),
        "exec enters the new mm with KSM when MERGE_ANY survived (ksm_execve)",
        "6.7-6.9 keep MERGE_ANY across exec but do not register the new mm: ksmd "
        "does not scan it until something else enters it",
    ),
    Change(
        "checksum_first", (6, 11),
        ("mm/ksm: don't waste time searching stable tree for fast changing page",),
        "cmp_and_merge_page() checks the checksum (and the zero page) before the "
        "stable tree for a page that is not a KSM page; before, the stable tree came "
        "first, so a new or rewritten page equal to a KSM page merged in the same scan",
        "cmp_and_merge_page() of the engine (csrc/ksm.c) and of the reference take "
        "the order of the profile",
        checked="6.1 order checked on a real 6.1 kernel (QEMU, two nodes); 6.18 order "
        "on this machine's kernel",
    ),
    Change(
        "move_pages_enoent", (6, 12),
        ("mm/migrate: convert add_page_for_migration() from follow_page() to folio_walk",),
        "move_pages(2) reports -ENOENT for a page that is not present; before, "
        "follow_page(FOLL_DUMP) made it -EFAULT",
        "the status of a non-present page follows the profile",
        checked="6.1 checked on a real 6.1 kernel (QEMU, two nodes)",
    ),
    Change(
        "thp_split_zero", (6, 12),
        ("mm: remap unused subpages to shared zeropage when splitting isolated thp",),
        "splitting an anonymous THP maps its zero-filled subpages to the shared zero "
        "page",
        "recorded only: the model maps no THP (see the THP work)",
    ),
    Change(
        "ksm_stat_merge_any", (6, 14),
        ("ksm: add ksm involvement information for each process",),
        "ksm_merge_any and ksm_mergeable in /proc/PID/ksm_stat",
        "the fields exist from this version on",
    ),
    Change(
        "merge_any_kept", (6, 18),
        ("mm/ksm: fix exec/fork inheritance support for prctl",),
        "ksmd dropping the slot of an mm without mergeable VMAs keeps MMF_VM_MERGE_ANY, "
        "and a new VMA of a MERGE_ANY mm enters the mm again (backported to 6.12.y)",
        "before it, dropping the slot clears MERGE_ANY, and a new VMA does not "
        "register the mm",
    ),
)

CHANGES_BY_NAME = {c.name: c for c in CHANGES}

# the profiles a user names; a full version string maps to the newest one not newer
PROFILES: tuple[str, ...] = ("6.1", "6.6", "6.8", "6.12", "6.18")
NEWEST = PROFILES[-1]

_VERSION = re.compile(r"^\s*(\d+)\.(\d+)(?:[.\-+_~].*)?\s*$")


def parse_version(text: str) -> Version:
    m = _VERSION.match(text) if isinstance(text, str) else None
    if m is None:
        raise ksm_error(errno.EINVAL, f"not a kernel version: {text!r} (e.g. 6.1 or "
                                      "6.1.0-28-amd64)")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Profile:
    """One kernel's KSM: ``has(name)`` tells whether a change of ``CHANGES`` is in it."""

    name: str  # one of PROFILES
    # the changes in it, by name (computed once: the scan asks for every page)
    changes: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        version = parse_version(self.name)
        object.__setattr__(self, "changes",
                           frozenset(c.name for c in CHANGES if c.version <= version))

    @property
    def version(self) -> Version:
        return parse_version(self.name)

    def has(self, change: str) -> bool:
        if change in self.changes:
            return True
        if change not in CHANGES_BY_NAME:
            raise KeyError(f"no change {change!r} in ksmcore.profiles.CHANGES")
        return False

    @property
    def sysfs_files(self) -> tuple[str, ...]:
        """The files of /sys/kernel/mm/ksm this kernel has, in the kernel's order."""
        missing = {f for c in CHANGES if not self.has(c.name) for f in c.sysfs}
        return tuple(f for f in SYSFS_FILES if f not in missing)

    @property
    def ksm_stat_fields(self) -> tuple[str, ...]:
        """The lines of /proc/PID/ksm_stat, in order."""
        fields = ["ksm_rmap_items"]
        if self.has("ksm_zero_pages"):
            fields.append("ksm_zero_pages")
        if self.has("general_profit"):
            fields += ["ksm_merging_pages", "ksm_process_profit"]
        if self.has("ksm_stat_merge_any"):
            fields += ["ksm_merge_any", "ksm_mergeable"]
        return tuple(fields)

    def __str__(self) -> str:
        return f"Linux {self.name}"


def default_kernel() -> str:
    """$KSMCORE_KERNEL if set; else the running kernel's release on Linux (when a
    profile covers it); else the newest profile."""
    env = os.environ.get("KSMCORE_KERNEL")
    if env:
        return resolve(env).name
    if sys.platform.startswith("linux"):
        try:
            return resolve(platform.release()).name
        except OSError:
            pass
    return NEWEST


def resolve(kernel: str | Profile | None = None) -> Profile:
    """The profile for ``kernel``: "6.1", "6.18", a full release such as
    "6.1.0-28-amd64" (the newest profile not newer than it), None for the default.
    OSError(EINVAL) for text that is no version or a kernel older than 6.1."""
    if isinstance(kernel, Profile):
        return kernel
    if kernel is None:
        return Profile(default_kernel())
    if not isinstance(kernel, str):
        raise TypeError(f"kernel is a version string, not {type(kernel).__name__}")
    want = parse_version(kernel)
    fits = [p for p in PROFILES if parse_version(p) <= want]
    if not fits:
        raise ksm_error(errno.EINVAL, f"no kernel profile for {kernel!r}: the oldest is "
                                      f"{PROFILES[0]} (profiles: {', '.join(PROFILES)})")
    return Profile(fits[-1])
