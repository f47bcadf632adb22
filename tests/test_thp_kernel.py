"""Transparent huge pages against the real ksmd: THP-backed workloads (PMD-aligned,
MADV_HUGEPAGE) through this machine's kernel and both implementations; every counter,
every ksm_stat field and, per process, the PTEs that a huge page split mapped to the
shared zero page (counted from /proc/PID/pagemap and /proc/kpageflags) must be equal.

Skips (with the reason) where /sys/kernel/mm/ksm is not writable or THP is off. The
host's THP settings are read, never written.
"""

from __future__ import annotations

import functools

import pytest

from ksmcore.kernel import kernel_available, run_kernel, thp_setting
from ksmcore.workloads import Result, run_model, thp_workloads

from conftest import IMPLEMENTATIONS, machine_class

AVAILABLE, WHY = kernel_available()
WORKLOADS = {w.name: w for w in thp_workloads()}


def _thp_on() -> tuple[bool, str]:
    try:
        setting = thp_setting()
    except OSError:
        return False, "no /sys/kernel/mm/transparent_hugepage"
    return setting in ("always", "madvise"), f"transparent_hugepage/enabled is {setting}"


THP_ON, THP_WHY = _thp_on()


@functools.cache
def kernel_result(name: str) -> Result:
    return run_kernel(WORKLOADS[name])


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_models_agree_on_thp_workloads(name: str) -> None:
    w = WORKLOADS[name]
    engine, reference = (run_model(machine_class(impl), w) for impl in IMPLEMENTATIONS)
    assert engine == reference
    assert engine.thp_split_zero_pages == reference.thp_split_zero_pages


def test_thp_workloads_free_pages_by_splitting() -> None:
    """The workloads are worth running: the splits map zero-filled subpages to the
    zero page, which no KSM counter shows."""
    freed = {name: sum(run_model(machine_class("engine"), w).thp_split_zero_pages)
             for name, w in WORKLOADS.items()}
    assert freed["thp_within"] == 512 - 40
    assert freed["thp_half_zero_2p"] == 2 * 256
    assert freed["thp_ksm_tests_H"] == 0  # no zero-filled subpage
    assert all(v for name, v in freed.items() if name != "thp_ksm_tests_H")


@pytest.mark.skipif(not AVAILABLE, reason=f"kernel parity needs it: {WHY}")
@pytest.mark.skipif(not THP_ON, reason=f"THP is off: {THP_WHY}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_thp_kernel_parity(name: str, impl: str) -> None:
    w = WORKLOADS[name]
    kernel = kernel_result(name)
    model = run_model(machine_class(impl), w)
    assert model.counters == kernel.counters, f"{name}: counters differ"
    assert model.ksm_stat == kernel.ksm_stat, f"{name}: ksm_stat differs"
    assert model.thp_split_zero_pages == kernel.thp_split_zero_pages, \
        f"{name}: pages freed by splitting differ"
