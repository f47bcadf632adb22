"""Kernel parity: every generated workload through this machine's real ksmd and through
both implementations; every counter and every ksm_stat field must be equal.

Skips (with the reason) where /sys/kernel/mm/ksm is not writable. Each kernel run
restores every knob it wrote, on every path (ksmcore.kernel.run_kernel).
"""

from __future__ import annotations

import functools

import pytest

from ksmcore.kernel import kernel_available, run_kernel
from ksmcore.workloads import Result, Workload, parity_workloads, run_model

from conftest import IMPLEMENTATIONS, machine_class

AVAILABLE, WHY = kernel_available()
WORKLOADS = {w.name: w for w in parity_workloads()}


@functools.cache
def kernel_result(name: str) -> Result:
    return run_kernel(WORKLOADS[name])


def test_at_least_a_dozen_workloads() -> None:
    assert len(WORKLOADS) >= 12


@pytest.mark.skipif(not AVAILABLE, reason=f"kernel parity needs it: {WHY}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_kernel_parity(name: str, impl: str) -> None:
    w: Workload = WORKLOADS[name]
    kernel = kernel_result(name)
    model = run_model(machine_class(impl), w)
    assert model.counters == kernel.counters, f"{name}: counters differ"
    assert model.ksm_stat == kernel.ksm_stat, f"{name}: ksm_stat differs"
