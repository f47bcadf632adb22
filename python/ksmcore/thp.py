"""Transparent huge pages: the knobs and the rules both implementations share.

Linux 6.18 backs an anonymous mapping with PMD-sized (2 MiB) folios where
``/sys/kernel/mm/transparent_hugepage/enabled`` and the VMA's MADV_HUGEPAGE /
MADV_NOHUGEPAGE allow it (``thp_vma_allowable_order()``), and only for a PMD range
that lies wholly in one VMA (``thp_vma_suitable_order()``). docs/MODEL.md, "Transparent
huge pages", says what the model does with them.
"""

from __future__ import annotations

import errno

from .constants import PAGE_SHIFT, PAGE_SIZE
from .errors import ksm_error
from .guard import serialized

HPAGE_PMD_NR = 512
HPAGE_PMD_SIZE = HPAGE_PMD_NR * PAGE_SIZE
HPAGE_PMD_MASK = ~(HPAGE_PMD_SIZE - 1)

THP_ENABLED_VALUES = ("always", "madvise", "never")
# CONFIG_TRANSPARENT_HUGEPAGE_MADVISE=y: this machine's kernel config (and the usual
# distribution default); the upstream Kconfig default is "always"
THP_ENABLED_DEFAULT = "madvise"
THP_USE_ZERO_PAGE_DEFAULT = 1

# a VMA's THP advice (VM_HUGEPAGE / VM_NOHUGEPAGE), 0 for neither
VM_HUGEPAGE = 1
VM_NOHUGEPAGE = 2


def check_enabled(value: object) -> str:
    """The value for ``enabled``, or EINVAL as the kernel's store refuses it."""
    if isinstance(value, bytes):
        value = value.decode()
    if not isinstance(value, str) or value.strip() not in THP_ENABLED_VALUES:
        raise ksm_error(errno.EINVAL, f"transparent_hugepage/enabled takes always, "
                                      f"madvise or never, not {value!r}")
    return value.strip()


def check_use_zero_page(value: object) -> int:
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int) or value not in (0, 1):
        raise ksm_error(errno.EINVAL, f"use_zero_page takes 0 or 1, not {value!r}")
    return value


def vma_thp_allowed(enabled: str, advice: int) -> bool:
    """``thp_vma_allowable_order()`` for a private anonymous VMA and the PMD order."""
    if advice == VM_NOHUGEPAGE or enabled == "never":
        return False
    return enabled == "always" or advice == VM_HUGEPAGE


def pmd_ranges(start: int, end: int) -> range:
    """The PMD-aligned addresses of the 2 MiB ranges overlapping [start, end)."""
    return range(start & HPAGE_PMD_MASK, end, HPAGE_PMD_SIZE)


def mmap_address(next_addr: int, npages: int) -> int:
    """Where mmap puts ``npages`` of anonymous memory: a length that is a multiple of
    2 MiB gets a PMD-aligned address (__get_unmapped_area(), 6.7+, limited to
    PMD-multiple lengths since 6.13)."""
    if npages % HPAGE_PMD_NR == 0:
        return (next_addr + HPAGE_PMD_SIZE - 1) & HPAGE_PMD_MASK
    return next_addr


def pmd_slot_offset(addr: int, start: int) -> int:
    return (addr - start) >> PAGE_SHIFT


@serialized
class ThpKnobs:
    """/sys/kernel/mm/transparent_hugepage's two knobs as properties of a machine,
    written once for both implementations (their values are checked before they are
    kept; a machine's lock guards them as its own members)."""

    _thp_enabled: str = THP_ENABLED_DEFAULT
    _thp_use_zero_page: int = THP_USE_ZERO_PAGE_DEFAULT

    @property
    def thp_enabled(self) -> str:
        """/sys/kernel/mm/transparent_hugepage/enabled: always, madvise or never."""
        return self._thp_enabled

    @thp_enabled.setter
    def thp_enabled(self, value: str) -> None:
        self._thp_enabled = check_enabled(value)

    @property
    def thp_use_zero_page(self) -> int:
        """/sys/kernel/mm/transparent_hugepage/use_zero_page (0 or 1)."""
        return self._thp_use_zero_page

    @thp_use_zero_page.setter
    def thp_use_zero_page(self, value: int) -> None:
        self._thp_use_zero_page = check_use_zero_page(value)
