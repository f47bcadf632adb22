"""Opt-in check (not a test: it needs QEMU, a guest kernel and root): VM dumps against
the real ksmd on the live VMs.

    python benchmarks/vm_dumps.py GUEST_KERNEL [N]

Boots N QEMU guests of 256 MiB (TCG; the kernel stops without a root file system, so
their memory stays still; THP off for QEMU, so every present page is one the guest
touched), dumps each with QMP ``dump-guest-memory``, estimates the dumps (zero pages
absent and present) and the live QEMU processes (``--pid --mergeable-only``), then runs
the real ksmd on the live guests under ``kernel_lock`` until its counters stay still,
and restores every knob.
"""

from __future__ import annotations

import ctypes
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ksmcore import kernel

PR_SET_THP_DISABLE = 41


def _no_thp() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


def qmp(path: Path, command: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        f = s.makefile("rw")
        f.readline()
        reply: dict = {}
        for c in ({"execute": "qmp_capabilities"}, command):
            f.write(json.dumps(c) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply


def estimate(*argv: str) -> dict:
    out = subprocess.run(["ksmcore", "estimate", "--json", "--no-progress", *argv],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main(guest_kernel: str, n: int = 3) -> None:
    d = Path(tempfile.mkdtemp(prefix="ksmcore-vms-"))
    procs = []
    try:
        for i in range(n):
            procs.append(subprocess.Popen(
                ["qemu-system-x86_64", "-m", "256", "-smp", "1", "-kernel", guest_kernel,
                 "-append", "console=ttyS0 nokaslr panic=0", "-display", "none", "-nodefaults",
                 "-serial", f"file:{d}/ser{i}", "-qmp", f"unix:{d}/qmp{i},server,nowait"],
                preexec_fn=_no_thp, stderr=subprocess.DEVNULL))
        deadline = time.time() + 120
        while time.time() < deadline and not all(
                (d / f"ser{i}").exists() and b"end Kernel panic" in (d / f"ser{i}").read_bytes()
                for i in range(n)):
            time.sleep(0.5)
        dumps = []
        for i in range(n):
            qmp(d / f"qmp{i}", {"execute": "dump-guest-memory",
                                "arguments": {"paging": False, "protocol": f"file:{d}/dump{i}"}})
            dumps.append(str(d / f"dump{i}"))
        for zp in ("absent", "present"):
            r = estimate("--zero-pages", zp, *dumps)
            print(f"dumps, --zero-pages {zp}: pages {r['pages']}, "
                  f"pages_sharing {r['ksm']['pages_sharing']}")
        r = estimate("--mergeable-only", *[a for p in procs for a in ("--pid", str(p.pid))])
        print(f"--pid --mergeable-only: pages {r['pages']}, "
              f"pages_sharing {r['ksm']['pages_sharing']}")
        with kernel.kernel_lock():
            saved = kernel.save_knobs()
            try:
                kernel._write("run", 2)
                kernel._write("pages_to_scan", 5000)
                kernel._write("sleep_millisecs", 10)
                kernel._write("run", 1)
                last, still, t0 = None, 0, time.time()
                while still < 3 and time.time() - t0 < 120:
                    time.sleep(1)
                    s = kernel.read_sysfs()
                    now = (s["pages_shared"], s["pages_sharing"])
                    still = still + 1 if s["full_scans"] >= 4 and now == last else 0
                    last = now
                print(f"real ksmd: full_scans {s['full_scans']}, pages_shared {s['pages_shared']}, "
                      f"pages_sharing {s['pages_sharing']}")
            finally:
                kernel.restore_knobs(saved)
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
