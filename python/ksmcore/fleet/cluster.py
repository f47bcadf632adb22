"""The fleet's work as Dask tasks: sketches where the data is, exact figures per host.

The driver (``ksmcore fleet``) holds sketches only: each source is opened, hashed
and sketched by a worker (:func:`sketch_task`), and each host's group is opened and
run through the engine by a worker (:func:`verify_task`); only sketches and counters
cross the network. The default cluster is a ``dask.distributed.LocalCluster`` of
one single-threaded worker process per CPU (the engine holds the GIL while it scans);
``--scheduler tcp://HOST:8786`` uses a running cluster, whose workers must be able to
open the sources under the same names (a shared file system, or ``synth:`` sources).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..estimate.errors import EXIT_USAGE, EstimateError
from .exact import verify_group
from .sketch import Sketch


def sketch_task(spec: str, params: dict[str, int]) -> Sketch:
    from . import sketch_source

    return sketch_source(spec, **params)


def verify_task(specs: Sequence[str], max_page_sharing: int, use_zero_pages: int
                ) -> dict[str, Any]:
    return verify_group(specs, max_page_sharing, use_zero_pages)


@contextmanager
def connect(scheduler: str | None = None, workers: int | None = None,
            timeout: float = 20.0) -> Iterator[Any]:
    """A dask.distributed Client: of ``scheduler``, or of a LocalCluster of ``workers``
    processes (default: one per CPU) on 127.0.0.1, closed on every path."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as e:
            raise EstimateError(f"--scheduler {scheduler}: cannot connect ({e})",
                                EXIT_USAGE) from None
        try:
            yield client
        finally:
            client.close()
        return
    n = workers or os.cpu_count() or 1
    # no dashboard; the scheduler's HTTP endpoints on a free port of 127.0.0.1 (not 8787,
    # which another cluster may hold)
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None,
                           scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                           silence_logs=logging.ERROR)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def describe(client: Any, scheduler: str | None) -> dict[str, Any]:
    info = client.scheduler_info()
    workers = info.get("workers", {})
    return {"scheduler": scheduler or "LocalCluster", "address": info.get("address"),
            "workers": len(workers),
            "threads": sum(int(w.get("nthreads", 1)) for w in workers.values())}


def sketch_all(client: Any, specs: Sequence[str], params: dict[str, int]) -> list[Sketch]:
    futures = client.map(sketch_task, list(specs), params=params, pure=False)
    return list(client.gather(futures))


def verify_all(client: Any, groups: Sequence[Sequence[str]], max_page_sharing: int,
               use_zero_pages: int) -> list[dict[str, Any]]:
    futures = client.map(verify_task, [list(g) for g in groups],
                         max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages,
                         pure=False)
    return list(client.gather(futures))
