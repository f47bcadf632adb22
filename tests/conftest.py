"""Fixtures shared by the tests: both implementations of the one API."""

from __future__ import annotations

import importlib

import pytest

IMPLEMENTATIONS = ("engine", "reference")


def machine_class(name: str) -> type:
    if name == "engine":
        return importlib.import_module("ksmcore").Machine
    return importlib.import_module("ksmcore.reference").Machine


@pytest.fixture(params=IMPLEMENTATIONS)
def Machine(request: pytest.FixtureRequest) -> type:
    """Each test taking this fixture runs once per implementation."""
    return machine_class(request.param)
