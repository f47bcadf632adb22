"""The kernel's KSM hooks (include/linux/ksm.h, mm/ksm.c): the one way the engine's mm
code (mm.py, process.py) reaches KSM, by the kernel's names, as the reference's mm
code calls its ``Ksm`` (reference/scan.py). Each takes an mm (engine/mm.py) and calls
ksmd's mm_slot list (``Ksmd.ksm_enter``: __ksm_enter(), ``Ksmd.ksm_exit``:
__ksm_exit()) only where the kernel's hook would."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ksmd import Ksmd
    from .mm import Mm


def _ksmd(mm: Mm) -> Ksmd:
    return mm.machine.ksm.ksmd


def ksm_enter(mm: Mm) -> None:
    """ksm_madvise(MADV_MERGEABLE): __ksm_enter() unless MMF_VM_MERGEABLE is set."""
    if not mm.ksm_registered:
        _ksmd(mm).ksm_enter(mm)


def ksm_exit(mm: Mm) -> None:
    """ksm_exit(), from exit_mmap(): __ksm_exit() of a registered mm."""
    if mm.ksm_registered:
        _ksmd(mm).ksm_exit(mm)


def ksm_fork(mm: Mm, oldmm: Mm) -> None:
    """ksm_fork(), from dup_mmap(): a registered parent's child is registered too."""
    if oldmm.ksm_registered:
        _ksmd(mm).ksm_enter(mm)


def ksm_execve(mm: Mm) -> None:
    """ksm_execve(): the new mm of an exec keeps MMF_VM_MERGE_ANY (MMF_INIT_MASK, 6.7+)
    and is entered with KSM (6.10+)."""
    profile = mm.machine.profile
    if not profile.has("merge_any_exec"):
        mm.merge_any = False
    elif mm.merge_any and profile.has("ksm_execve"):
        _ksmd(mm).ksm_enter(mm)


def ksm_vma_flags(mm: Mm) -> bool:
    """ksm_vma_flags() (6.17+): whether a new VMA of mm is VM_MERGEABLE from its
    creation; 6.18 re-enters an mm whose slot ksmd dropped meanwhile."""
    if not mm.merge_any:
        return False
    if not mm.ksm_registered and mm.machine.profile.has("merge_any_kept"):
        _ksmd(mm).ksm_enter(mm)
    return True


def ksm_enable_merge_any(mm: Mm) -> None:
    """prctl(PR_SET_MEMORY_MERGE, 1): MMF_VM_MERGE_ANY, and ksm_add_vmas()."""
    if mm.merge_any:
        return
    if not mm.ksm_registered:
        _ksmd(mm).ksm_enter(mm)
    mm.merge_any = True
    mem = mm.machine.mem
    for v in mm.vmas:  # ksm_add_vmas(): every VMA of the model is compatible
        if not v.mergeable:
            v.mergeable = True
            mem.set_mergeable(v.slot_base, v.slot(v.end), True)


def ksm_disable_merge_any(mm: Mm) -> None:
    """prctl(PR_SET_MEMORY_MERGE, 0): ksm_del_vmas() unmerges and clears every
    VM_MERGEABLE VMA (madvised ones too); the mm stays registered."""
    if not mm.merge_any:
        return
    mem = mm.machine.mem
    for v in mm.vmas:
        if v.mergeable:
            mm.unmerge_ksm_pages(v, v.start, v.end)
            v.mergeable = False
            mem.set_mergeable(v.slot_base, v.slot(v.end), False)
    mm.merge_any = False
