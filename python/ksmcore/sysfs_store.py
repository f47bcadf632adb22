"""The stores of /sys/kernel/mm/ksm (mm/ksm.c's *_store() functions), written once
for both implementations: the open's checks, the bytes the store sees, the store's
own checks in the kernel's order, then the knob. What a knob does to each model's
state goes through :class:`KsmStore`."""

from __future__ import annotations

import errno
from collections.abc import Collection
from typing import Any, Protocol

from .constants import KSM_RUN_UNMERGE
from .errors import ksm_error
from .knobs import check_file, parse_knob, sysfs_buffer


class KsmStore(Protocol):
    """What the stores read and change: the knobs, ksmd's wake-up, and the
    operations some stores start."""

    @property
    def knobs(self) -> dict[str, Any]: ...
    @property
    def clock_ns(self) -> int: ...
    ksmd_wake: int | None

    def unmerge_and_remove_all_rmap_items(self) -> None: ...
    def stable_nodes_busy(self) -> bool: ...
    def set_advisor_defaults(self) -> None: ...
    def knob_stored(self, name: str, value: Any) -> None: ...


def ksm_sysfs_store(ksm: KsmStore, files: Collection[str], name: str,
                    text: str | bytes) -> None:
    """write(2) of ``text`` to /sys/kernel/mm/ksm/``name``: open (ENOENT, EACCES),
    the bytes the store sees (none for an empty write), then the store's own checks
    in the kernel's order. Raises OSError; a rejected write changes nothing, except
    that an EBUSY from remove_all_stable_nodes() keeps the removals it managed (as in
    the kernel)."""
    check_file(name, write=True, files=files)
    buf = sysfs_buffer(text)
    if buf is None:
        return  # an empty write never reaches the store
    knobs = ksm.knobs
    if name == "pages_to_scan" and knobs["advisor_mode"] != "none":
        raise ksm_error(errno.EINVAL, "pages_to_scan is set by the advisor")
    value = parse_knob(name, buf)
    if name == "run":
        if value != knobs["run"]:
            knobs["run"] = value
            if int(value) & KSM_RUN_UNMERGE:
                ksm.unmerge_and_remove_all_rmap_items()
        return
    if name in ("merge_across_nodes", "max_page_sharing", "advisor_mode") \
            and value == knobs[name]:
        return
    if name in ("merge_across_nodes", "max_page_sharing") and ksm.stable_nodes_busy():
        raise ksm_error(errno.EBUSY, f"{name} cannot change while KSM pages exist")
    if name == "sleep_millisecs" and value != knobs[name] and ksm.ksmd_wake is not None:
        # wake_up_interruptible(&ksm_iter_wait): a sleeping ksmd wakes at once if the
        # value it sleeps on changed
        ksm.ksmd_wake = ksm.clock_ns
    knobs[name] = value
    if name == "advisor_mode":
        ksm.set_advisor_defaults()
    ksm.knob_stored(name, value)
