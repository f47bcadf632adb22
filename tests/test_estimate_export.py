"""Exports of the estimate: Prometheus text (parsed by the official client's parser),
CSV, and ``ksmcore.estimate.estimate()`` equal to ``--json``."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ksmcore.estimate
from ksmcore.constants import KSM_STAT_FIELDS, PAGE_SIZE
from ksmcore.estimate.errors import EstimateError
from ksmcore.estimate.samples import sample_sources, write_images

from clirun import run


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    paths = write_images(d, vms=3, pages=300, seed=8)
    odd = d / 'a "quoted" \\ name.img'  # label values must be escaped
    shutil.copy(paths[2], odd)
    return [paths[0], paths[1], odd]


def test_prometheus_textfile(images: list[Path]) -> None:
    args = [f"{images[0]}@0", f"{images[1]}@1", str(images[2]), "--nodes", "2"]
    code, out, err = run("estimate", "--no-progress", "--output-format", "prometheus", *args)
    assert code == 0, err
    _, js, _ = run("estimate", "--no-progress", "--json", *args)
    r = json.loads(js)
    families = {f.name: f for f in text_string_to_metric_families(out)}
    # the kernel counters under node_exporter's ksmd collector's names
    assert families["node_ksmd_full_scans"].type == "counter"
    assert families["node_ksmd_full_scans"].samples[0].value == r["ksm"]["full_scans"]
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "pages_to_scan", "run", "merge_across_nodes"):
        (sample,) = families[f"node_ksmd_{name}"].samples
        assert sample.value == r["ksm"][name] and sample.labels == {}
    sleep = families["node_ksmd_sleep_seconds"].samples[0].value
    assert sleep == r["ksm"]["sleep_millisecs"] / 1000
    assert families["ksmcore_ksm_general_profit"].samples[0].value == r["ksm"]["general_profit"]
    assert families["ksmcore_estimate_saved_bytes"].samples[0].value == r["saved"]["bytes"]
    # per-source gauges, labelled
    merging = {s.labels["source"]: s for s in families["ksmcore_source_ksm_merging_pages"].samples}
    assert set(merging) == {str(p) for p in images}
    for p in r["processes"]:
        s = merging[p["source"]]
        assert s.value == p["ksm_stat"]["ksm_merging_pages"]
        assert s.labels == {"source": p["source"], "kind": "image", "node": str(p["node"])}
    pages = {s.labels["source"]: s.value for s in families["ksmcore_source_pages"].samples}
    assert pages[str(images[2])] == 300
    for name, fam in families.items():
        assert fam.type in ("gauge", "counter") and fam.documentation, name


def test_csv_one_row_per_source(images: list[Path]) -> None:
    code, out, err = run("estimate", "--no-progress", "--output-format", "csv", *map(str, images))
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    _, js, _ = run("estimate", "--no-progress", "--json", *map(str, images))
    r = json.loads(js)
    assert [row["source"] for row in rows] == [p["source"] for p in r["processes"]]
    for row, p in zip(rows, r["processes"], strict=True):
        assert int(row["pages"]) == p["pages"] and row["pid"] == ""
        for f in KSM_STAT_FIELDS:
            assert int(row[f]) == int(p["ksm_stat"][f])
    code, out, err = run("tune", "--no-progress", "--output-format", "csv", *map(str, images),
                         "--pages-to-scan-values", "100", "--sleep-millisecs-values", "20")
    assert code == 0, err
    assert len(list(csv.DictReader(io.StringIO(out)))) == 2 + 1  # smart_scan 0/1, advisor
    code, out, err = run("estimate", "--sample", "--json", "--output-format", "csv")
    assert code == 2 and not out and "choose one" in err


def test_library_call_equals_json(images: list[Path]) -> None:
    argv = [f"{images[0]}@1", str(images[1]), "--nodes", "2", "--pages-to-scan", "300",
            "--merge-across-nodes", "0", "--use-zero-pages", "1"]
    code, out, err = run("estimate", "--no-progress", "--json", *argv)
    assert code == 0, err
    got = ksmcore.estimate.estimate([f"{images[0]}@1", images[1]], nodes=2, pages_to_scan=300,
                                    merge_across_nodes=0, use_zero_pages=1)
    assert got == json.loads(out)
    # Source objects and the sample too
    sample = ksmcore.estimate.estimate(sample=True)
    assert sample["saved"]["pages"] == json.loads(run("estimate", "--sample", "--json")[1])[
        "saved"]["pages"]
    objs = ksmcore.estimate.estimate(sample_sources(vms=2, pages=200))
    assert objs["pages"] == 400 and objs["saved"]["bytes"] == objs["saved"]["pages"] * PAGE_SIZE
    with pytest.raises(TypeError, match="unexpected keyword argument 'page_to_scan'"):
        ksmcore.estimate.estimate(sample=True, page_to_scan=5)
    with pytest.raises(EstimateError, match="--max-page-sharing 1: refused") as e:
        ksmcore.estimate.estimate(sample=True, max_page_sharing=1)
    assert e.value.exit_code == 2
