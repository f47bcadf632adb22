"""A typed program that embeds ksmcore, as a larger tool would: mypy checks it against
the package's annotations in CI (.ci/run), and tests/test_native_abi.py runs it.

It builds two VM-like processes, lets ksmd run on the simulated clock from a worker
thread while the main thread keeps writing (one lock per machine makes that safe),
and reports what KSM saved; the same function runs on the engine and on the reference,
typed with ksmcore.api's protocols."""

from __future__ import annotations

import threading

import numpy as np

import ksmcore
import ksmcore.reference
from ksmcore.api import MachineAPI, ProcessAPI
from ksmcore.constants import MADV_MERGEABLE, PAGE_SIZE


def vm_memory(seed: int, pages: int) -> np.ndarray:
    """Half a shared "OS" part, half private data."""
    shared = np.repeat(np.arange(pages // 2, dtype=np.uint8), PAGE_SIZE).reshape(-1, PAGE_SIZE)
    private = np.random.default_rng(seed).integers(0, 256, (pages - pages // 2, PAGE_SIZE),
                                                   dtype=np.uint8)
    return np.concatenate([shared, private])


def saved_pages(machine: MachineAPI) -> int:
    stats = machine.ksm.stats()
    return int(stats["pages_sharing"]) + int(stats["ksm_zero_pages"])


def run(m: MachineAPI, pages: int) -> int:
    """The same program on either implementation: mypy checks that both satisfy
    ksmcore.api.MachineAPI where main() passes them here."""
    procs: list[ProcessAPI] = []
    for seed in range(2):
        p = m.spawn()
        addr = p.mmap(pages)
        p.fill(addr, vm_memory(seed, pages))
        p.madvise(addr, pages * PAGE_SIZE, MADV_MERGEABLE)
        procs.append(p)
    m.ksm.run = 1
    m.ksm.pages_to_scan = 16

    def ksmd() -> None:
        m.run_for(2.0)  # two simulated seconds of ksm_scan_thread()

    worker = threading.Thread(target=ksmd)
    worker.start()
    last = procs[1].maps()[0][1] - PAGE_SIZE
    for _ in range(20):  # a private page that keeps changing
        procs[1].write(last, b"moving")
    worker.join()
    m.ksm.scan(2)
    m.check_invariants()
    return saved_pages(m)


def main(pages: int = 64) -> int:
    engine = run(ksmcore.Machine(), pages)
    reference = run(ksmcore.reference.Machine(), pages)
    assert engine == reference, (engine, reference)
    return engine


if __name__ == "__main__":
    print(f"{main()} pages saved")
