"""The security view (--domain-by): pages merged across trust domains, the savings
with merging kept inside each domain, and from zero pages alone, on two domains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_estimate_procmem import live, make_area

from ksmcore.constants import PAGE_SIZE
from ksmcore.estimate.domains import domain_of
from ksmcore.estimate.sources import Source

from clirun import run

NOBODY = 65534


def two_files(tmp_path: Path) -> tuple[Path, Path]:
    """a: 100 common + 50 own + 20 zero pages; b: 100 common + 40 own, 10 of them twice,
    + 10 zero pages."""
    rng = np.random.default_rng(12)
    rand = lambda n: rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)  # noqa: E731
    common = rand(100)
    own_b = rand(40)
    zero = np.zeros((1, PAGE_SIZE), np.uint8)
    a = np.concatenate([common, rand(50), np.repeat(zero, 20, axis=0)])
    b = np.concatenate([common, own_b, own_b[:10], np.repeat(zero, 10, axis=0)])
    pa, pb = tmp_path / "a.img", tmp_path / "b.img"
    a.tofile(pa)
    b.tofile(pb)
    return pa, pb


def check_two_domains(sec: dict) -> None:
    assert len(sec["domains"]) == 2
    # common pages (100 KSM pages) and the zero pages (one KSM page) are mapped from both
    assert sec["ksm_pages"] == 111 and sec["ksm_pages_across_domains"] == 101
    assert sec["mappings_across_domains"] == 2 * 100 + 30
    assert sec["saved_pages"] == 100 + 29 + 10
    assert [d["saved_within"] for d in sec["domains"]] == [19, 9 + 10]
    assert sec["saved_pages_within_domains"] == 38
    assert sec["saved_pages_zero_only"] == 30


def test_two_sources_as_two_domains(tmp_path: Path) -> None:
    pa, pb = two_files(tmp_path)
    code, out, err = run("estimate", "--json", "--domain-by", "source", str(pa), str(pb))
    assert code == 0, err
    check_two_domains(json.loads(out)["security"])
    code, out, err = run("estimate", "--no-progress", "--domain-by", "source", str(pa), str(pb))
    assert "security view (trust domains by source):" in out
    assert "merged across domains  101 of 111 KSM pages, mapped 230 times" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the files two owners")
def test_two_users_as_two_domains(tmp_path: Path) -> None:
    pa, pb = two_files(tmp_path)
    os.chown(pb, NOBODY, NOBODY)
    code, out, err = run("estimate", "--json", "--domain-by", "user", str(pa), str(pb))
    assert code == 0, err
    sec = json.loads(out)["security"]
    assert [d["domain"] for d in sec["domains"]] == ["user root", "user nobody"]
    check_two_domains(sec)
    # the same file twice, one owner: one domain, nothing crosses
    code, out, err = run("estimate", "--json", "--domain-by", "user", str(pa), str(pa))
    sec = json.loads(out)["security"]
    assert len(sec["domains"]) == 1 and sec["ksm_pages_across_domains"] == 0
    assert sec["saved_pages_within_domains"] == sec["saved_pages"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_live_processes_of_two_users() -> None:
    area = make_area(30, npages=120, nwritten=100, mergeable=False)
    with live([area]) as mine, live([area], uid=NOBODY) as theirs:
        code, out, err = run("estimate", "--json", "--domain-by", "user",
                             "--pid", str(mine.pid), "--pid", str(theirs.pid))
        assert code == 0, err
        r = json.loads(out)
        sec = r["security"]
        assert {d["domain"] for d in sec["domains"]} == {"user root", "user nobody"}
        # the same written pages in both: each distinct content is one KSM page both map
        assert sec["ksm_pages_across_domains"] > 0
        assert sec["saved_pages_within_domains"] < sec["saved_pages"]
        code, out, err = run("estimate", "--json", "--domain-by", "cgroup",
                             "--pid", str(mine.pid), "--pid", str(theirs.pid))
        assert code == 0, err
        (dom,) = json.loads(out)["security"]["domains"]  # one cgroup: one domain
        assert dom["domain"].startswith("cgroup /")


def test_domain_of_files_and_bad_choice(tmp_path: Path) -> None:
    src = Source(str(tmp_path), "image", [])
    assert domain_of(src, "cgroup") == str(tmp_path)  # a file has no cgroup
    assert domain_of(src, "source") == str(tmp_path)
    with pytest.raises(SystemExit) as e:
        run("estimate", "--sample", "--domain-by", "vm")
    assert e.value.code == 2
