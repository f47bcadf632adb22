"""The pure-Python reference implementation of ksmcore: an executable specification
of Linux 6.18's mm/ksm.c on the machine model of docs/MODEL.md.

Modules, bottom up: ``rbtree`` (lib/rbtree.c), ``mm`` (frames, VMAs, page tables,
faults), ``ksm_structs`` (rmap_item, stable_node, mm_slot, ksm_scan), ``state``
(globals and helpers), ``stable_tree``, ``merge`` (cmp_and_merge_page), ``scan``
(ksmd), ``ksm`` (sysfs), ``invariants`` and ``machine`` (the public API).
"""

from .machine import Machine, Process

__all__ = ["Machine", "Process"]
