"""The kernel's KSM hooks (include/linux/ksm.h, mm/ksm.c): the one way the engine's mm
code (process.py) reaches KSM, by the kernel's names, as the reference's mm code calls
its ``Ksm`` (reference/scan.py). Each takes the mm (an engine ``Process``) and calls
ksmd's mm_slot list (``ksmd.Ksm._ksm_enter``/``_ksm_exit``) only where the kernel's
hook would."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .process import Process


def ksm_enter(mm: Process) -> None:
    """ksm_madvise(MADV_MERGEABLE): __ksm_enter() unless MMF_VM_MERGEABLE is set."""
    if not mm.ksm_registered:
        mm.machine.ksm._ksm_enter(mm)


def ksm_exit(mm: Process) -> None:
    """ksm_exit(), from exit_mmap(): __ksm_exit() of a registered mm."""
    if mm.ksm_registered:
        mm.machine.ksm._ksm_exit(mm)


def ksm_fork(mm: Process, oldmm: Process) -> None:
    """ksm_fork(), from dup_mmap(): a registered parent's child is registered too."""
    if oldmm.ksm_registered:
        mm.machine.ksm._ksm_enter(mm)


def ksm_execve(mm: Process) -> None:
    """ksm_execve(): the new mm of an exec keeps MMF_VM_MERGE_ANY (MMF_INIT_MASK, 6.7+)
    and is entered with KSM (6.10+)."""
    profile = mm.machine.profile
    if not profile.has("merge_any_exec"):
        mm.merge_any = False
    elif mm.merge_any and profile.has("ksm_execve"):
        mm.machine.ksm._ksm_enter(mm)


def ksm_vma_flags(mm: Process) -> bool:
    """ksm_vma_flags() (6.17+): whether a new VMA of mm is VM_MERGEABLE from its
    creation; 6.18 re-enters an mm whose slot ksmd dropped meanwhile."""
    if not mm.merge_any:
        return False
    if not mm.ksm_registered and mm.machine.profile.has("merge_any_kept"):
        mm.machine.ksm._ksm_enter(mm)
    return True


def ksm_enable_merge_any(mm: Process) -> None:
    """prctl(PR_SET_MEMORY_MERGE, 1): MMF_VM_MERGE_ANY, and ksm_add_vmas()."""
    if mm.merge_any:
        return
    if not mm.ksm_registered:
        mm.machine.ksm._ksm_enter(mm)
    mm.merge_any = True
    mem = mm.machine.mem
    for v in mm.vmas:  # ksm_add_vmas(): every VMA of the model is compatible
        if not v.mergeable:
            v.mergeable = True
            mem.set_mergeable(v.slot_base, v.slot(v.end), True)


def ksm_disable_merge_any(mm: Process) -> None:
    """prctl(PR_SET_MEMORY_MERGE, 0): ksm_del_vmas() unmerges and clears every
    VM_MERGEABLE VMA (madvised ones too); the mm stays registered."""
    if not mm.merge_any:
        return
    mem = mm.machine.mem
    for v in mm.vmas:
        if v.mergeable:
            mm._break_ksm(v, v.slot_base, v.slot(v.end))
            v.mergeable = False
            mem.set_mergeable(v.slot_base, v.slot(v.end), False)
    mm.merge_any = False
