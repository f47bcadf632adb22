"""ksmcore fleet: the placement recovers families, comes within 5% of the best
placement, and runs on a real Dask cluster (a scheduler and two workers started here,
on 127.0.0.1, stopped on every path)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmcore.cli import main
from ksmcore.fleet import fileformat, sketch_source, synth
from ksmcore.fleet.exact import exact_savings
from ksmcore.fleet.place import PlacementError, Placer, in_order, place
from ksmcore.fleet.sources import open_source

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):  # workers first, then the scheduler
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in reversed(procs):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1."""
    from dask.distributed import Client

    work = tmp_path_factory.mktemp("dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--no-dashboard", "--dashboard-address", "127.0.0.1:0"], cwd=work, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for k in range(2):
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads",
                 "1", "--no-nanny", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                 "--name", f"w{k}",
                 "--local-directory", str(work)], cwd=work, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout=5) as c:
                    c.wait_for_workers(2, timeout=max(1.0, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise
                time.sleep(0.5)
        yield address
    finally:
        _stop(procs)


def test_placement_recovers_the_families() -> None:
    fleet = synth.Fleet(4, 3, 512, seed=3)
    sks = [sketch_source(s) for s in fleet.members()]
    pl = place(sks, hosts=4, capacity=3 * 512)
    for members in pl.groups(4):
        assert len(members) == 3
        assert len({fleet.family(i) for i in members}) == 1
    # the interleaved given order mixes them, and saves less by the sketches' account
    given = in_order([s.pages for s in sks], 4, 3 * 512)
    assert sum(Placer(sks, 4, 3 * 512).evaluate(given)) < 0.7 * sum(pl.predicted)


def test_local_search_repairs_a_mixed_placement() -> None:
    """From the interleaved given order (every host mixing families), moves and swaps
    alone bring each family together."""
    fleet = synth.Fleet(3, 3, 512, seed=6)
    sks = [sketch_source(s) for s in fleet.members()]
    p = Placer(sks, 3, 3 * 512)
    where = in_order([s.pages for s in sks], 3, 3 * 512)
    hosts = p._new_hosts()
    for i, h in enumerate(where):
        p.add(hosts[h], i)
    assert all(len({fleet.family(i) for i in h.members}) == 3 for h in hosts)
    assert p.local_search(hosts, where) > 0
    assert all(len({fleet.family(i) for i in h.members}) == 1 for h in hosts)


def test_within_five_percent_of_the_best_placement() -> None:
    """8 sources (families of 3, 3 and 2), 2 hosts of 4: every split verified by the
    engine; the placement's exact savings reach 95% of the best."""
    fleet = synth.Fleet(3, 3, 256, seed=8)
    specs = fleet.members()[:8]
    sources = [open_source(s) for s in specs]
    sks = [sketch_source(s) for s in specs]
    cap = 4 * 256
    exact_of: dict[tuple[int, ...], int] = {}

    def exact(group: tuple[int, ...]) -> int:
        if group not in exact_of:
            exact_of[group] = exact_savings([sources[i] for i in group])["saved_pages"]
        return exact_of[group]

    best = 0
    for first in itertools.combinations(range(1, 8), 3):
        a = (0, *first)
        b = tuple(i for i in range(8) if i not in a)
        best = max(best, exact(a) + exact(b))
    pl = place(sks, hosts=2, capacity=cap)
    got = sum(exact(tuple(sorted(g))) for g in pl.groups(2))
    assert got >= 0.95 * best, (got, best)


def test_capacity_is_respected_and_refused() -> None:
    fleet = synth.Fleet(2, 2, 64, seed=1)
    sks = [sketch_source(s) for s in fleet.members()]
    pl = place(sks, hosts=3, capacity=128)
    for g in pl.groups(3):
        assert sum(sks[i].pages for i in g) <= 128
    with pytest.raises(PlacementError, match="fits on no host"):
        place(sks, hosts=3, capacity=63)
    with pytest.raises(PlacementError):
        place(sks, hosts=1, capacity=128)


def test_fleet_on_a_started_dask_cluster(scheduler, tmp_path, capsys) -> None:
    """Files on disk and a synthetic fleet, read by the two workers; sketch files too."""
    fleet = synth.Fleet(2, 2, 1024, seed=21)
    paths = []
    for i in range(fleet.size):
        path = tmp_path / f"vm{i}.img"
        fleet.image(i).tofile(path)
        paths.append(str(path))
    plot = tmp_path / "fleet.png"
    rc = main(["fleet", *paths, "synth:2x1x1024@4", "--hosts", "3", "--host-capacity",
               "8MiB", "--scheduler", scheduler, "--json", "--plot", str(plot)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    r = json.loads(captured.out)
    assert r["dask"]["workers"] == 2 and r["dask"]["address"] == scheduler
    assert plot.stat().st_size > 0
    hosts = r["placement"]["hosts"]
    # the two families of files end up together, pair by pair
    groups = [set(h["index"]) for h in hosts]
    assert {0, 2} in groups and {1, 3} in groups
    for h in hosts:
        ex = h["exact"]
        assert ex["pages"] == h["pages"] <= r["host_capacity_pages"]
        # the workers' exact figures are the engine's
        if h["index"]:
            mine = exact_savings([open_source(s) for s in
                                  [r["sources"][i]["source"] for i in h["index"]]])
            assert ex["saved_pages"] == mine["saved_pages"]
            assert abs(h["predicted_saved_pages"] - ex["saved_pages"]) <= 0.02 * max(
                1, ex["saved_pages"])
    t = r["placement"]["total"]
    assert t["exact_saved_pages"] > r["given_order"]["total"]["exact_saved_pages"]
    # the same from sketch files made beforehand
    ksk = tmp_path / "fleet.ksk"
    assert main(["sketch", *paths, "-o", str(ksk)]) == 0
    capsys.readouterr()
    assert len(fileformat.load(ksk)) == 4
    rc = main(["fleet", str(ksk), "--hosts", "2", "--scheduler", scheduler,
               "--verify", "placement"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "ksmcore fleet: 4 sources" in captured.out and "not verified" in captured.out


def test_fleet_errors(capsys, tmp_path) -> None:
    assert main(["fleet", "synth:1x2x64", "--hosts", "0"]) == 2
    assert main(["fleet", "--hosts", "2"]) == 2
    with pytest.raises(SystemExit) as e:  # a malformed option: argparse, in one line
        main(["fleet", "synth:1x2x64", "--hosts", "2", "--host-capacity", "lots"])
    assert e.value.code == 2
    assert main(["fleet", "synth:1x2x64", "--hosts", "1", "--plot", str(tmp_path / "x.txt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 4


def test_fleet_on_a_local_cluster() -> None:
    """The default: a LocalCluster (one worker here), started and closed by the command.
    Run as a command of its own: a LocalCluster leaves multiprocessing's helper
    processes behind in the process that started it, and later tests (the kernel
    harness) check that this test process has no children left."""
    out = subprocess.run([sys.executable, "-m", "ksmcore.cli", "fleet", "synth:2x2x64@3",
                          "--hosts", "2", "--workers", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["dask"]["scheduler"] == "LocalCluster" and r["dask"]["workers"] == 1
    groups = [set(h["index"]) for h in r["placement"]["hosts"]]
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3]]
    assert all(h["exact"]["pages"] == 128 for h in r["placement"]["hosts"])
