"""Both implementations satisfy ksmcore.api's protocols, member by member: the same
public names, each a method or a property as the protocol says, with the protocol's
parameter names, kinds and defaults. (mypy checks the types statically:
tests/embed_example.py.)"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from ksmcore import api

from conftest import IMPLEMENTATIONS, machine_class


def members(protocol: type) -> dict[str, Any]:
    """Methods and properties, and plain attributes (annotations: given as properties)."""
    out = {n: property() for n in vars(protocol).get("__annotations__", {})}
    out.update({n: v for n, v in vars(protocol).items()
                if not n.startswith("_") or n in ("__getattr__", "__setattr__")})
    return out


def params(fn: Any) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default if p.default is not Ellipsis else None)
            for p in sig.parameters.values()]


def check(obj: Any, protocol: type) -> None:
    cls = type(obj)
    for name, want in members(protocol).items():
        if isinstance(want, property):
            assert hasattr(obj, name), f"{cls.__name__} lacks {name}"
            continue
        got = getattr(cls, name, None)
        assert callable(got), f"{cls.__name__}.{name} is not a method"
        w, g = params(want), params(got)
        # a default the protocol leaves as ... (a kernel constant) is not compared
        g = [(n, k, d if wd is not None else None) for (n, k, d), (_, _, wd) in zip(g, w,
                                                                                  strict=False)]
        assert g == w, f"{cls.__name__}.{name}{inspect.signature(got)} != protocol {w}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_both_satisfy_the_protocols(impl: str) -> None:
    m = machine_class(impl)()
    check(m, api.MachineAPI)
    check(m.ksm, api.KsmAPI)
    check(m.spawn(), api.ProcessAPI)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_no_public_member_beyond_the_contract(impl: str) -> None:
    """Drift shows here first: a public name one implementation adds."""
    m = machine_class(impl)()
    p = m.spawn()
    for obj, protocol in ((m, api.MachineAPI), (p, api.ProcessAPI)):
        public = {n for n in dir(type(obj)) if not n.startswith("_")}
        public |= {n for n in vars(obj) if not n.startswith("_")}
        extra = public - set(members(protocol))
        # plain data attributes the protocol does not list are the machine's wiring
        assert extra <= {"distances", "mem", "ctx", "machine", "mempolicy", "mm", "mm_id",
                         "vmas", "dead", "next_addr", "ksm_registered", "merge_any",
                         "profile", "ksm_stat_base", "pmd_table", "pmd_hzero"}, extra
