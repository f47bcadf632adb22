"""Fixtures shared by the tests: both implementations of the one API."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import pytest

# The model's tests expect the KSM of Linux 6.18 (this project's development kernel)
# whatever kernel runs them; a machine built without kernel= takes this profile.
os.environ["KSMCORE_KERNEL"] = "6.18"

IMPLEMENTATIONS = ("engine", "reference")


def machine_class(name: str) -> type:
    if name == "engine":
        return importlib.import_module("ksmcore").Machine
    return importlib.import_module("ksmcore.reference").Machine


@pytest.fixture(params=IMPLEMENTATIONS)
def Machine(request: pytest.FixtureRequest) -> type:
    """Each test taking this fixture runs once per implementation."""
    return machine_class(request.param)


# Test modules that drive the real KSM (sysfs knobs, ksmd, KSM-registered processes).
# The knobs are machine-wide: each such test holds ksmcore.kernel.kernel_lock(), so
# two test sessions on one host (or a benchmark beside them) wait for each other.
KERNEL_MODULES = {
    "test_kernel_parity",
    "test_kernel_harness",
    "test_estimate_kernel",
    "test_estimate_procmem",
    "test_estimate_cli",
    "test_estimate_compare",
    "test_sysfs",
    "test_trace_record",
    "test_trace_kernel",
    "test_thp_kernel",
}


@pytest.fixture(autouse=True)
def _real_ksm_lock(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.module.__name__.rpartition(".")[2] not in KERNEL_MODULES:
        yield
        return
    from ksmcore.kernel import kernel_lock

    with kernel_lock():
        yield
