"""Random KSM programs on a real kernel, compared op by op with the model.

A two-node QEMU guest (TCG) boots a distribution kernel (Debian 12's 6.1 by default)
with an initramfs made here: /init is tests/qemu_guest.c, built statically, and
/prog.txt the programs. The guest executes each operation with real processes and
prints the kernel's KSM counters, every worker's ksm_rmap_items and
ksm_merging_pages, and where each page is (move_pages(2) with nodes=NULL, and which
pages share a frame, from /proc/PID/pagemap) after each one. The same operations run
on ``ksmcore.Machine(nodes=2, kernel=...)`` and on the reference; every observation
must agree.

Needs qemu-system-x86_64, a static libc (gcc, libc6-dev) and the kernel image:
``apt-get install qemu-system-x86 gcc libc6-dev`` and Debian 12's kernel package,
e.g. ``apt-get download linux-image-6.1.0-57-amd64 && dpkg -x linux-image-*.deb
/opt/ksmcore-guest`` (or ``$KSMCORE_GUEST_KERNEL=/path/to/vmlinuz``).

The sweep: ``python tests/qemu_guest.py --programs 150`` (see --help).
"""

from __future__ import annotations

import argparse
import errno
import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
GUEST_C = HERE / "qemu_guest.c"
PAGE = 4096
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
            "stable_node_chains", "stable_node_dups")


# ---- what the harness needs


def find_kernel(version: str = "6.1") -> Path | None:
    """$KSMCORE_GUEST_KERNEL, else a vmlinuz-VERSION.* under /boot or /opt/ksmcore-guest."""
    env = os.environ.get("KSMCORE_GUEST_KERNEL")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted(glob.glob(f"/boot/vmlinuz-{version}.*")
                   + glob.glob(f"/opt/ksmcore-guest/boot/vmlinuz-{version}.*"))
    return Path(found[-1]) if found else None


def qemu() -> str | None:
    return shutil.which("qemu-system-x86_64")


def build_init(workdir: Path) -> Path:
    """The guest's /init, static; RuntimeError if it cannot be built."""
    out = workdir / "init"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (apt-get install gcc libc6-dev)")
    r = subprocess.run([cc, "-static", "-O2", "-Wall", "-o", str(out), str(GUEST_C)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cannot build the static guest init (apt-get install gcc "
                           f"libc6-dev): {r.stderr.strip()[:300]}")
    return out


def missing(version: str = "6.1") -> str | None:
    """Why the guest cannot run here, or None."""
    if qemu() is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if find_kernel(version) is None:
        return (f"no Linux {version} kernel image (apt-get download linux-image-6.1.0-*-amd64 "
                "and dpkg -x it into /opt/ksmcore-guest, or set KSMCORE_GUEST_KERNEL)")
    with tempfile.TemporaryDirectory() as d:
        try:
            build_init(Path(d))
        except RuntimeError as e:
            return str(e)
    return None


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks as an initramfs."""
    out = bytearray()

    def member(ino: int, name: str, mode: int, data: bytes) -> None:
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        out.extend(b"070701" + "".join(f"{x:08X}" for x in fields).encode() + nb)
        out.extend(b"\0" * (-(110 + len(nb)) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(data) % 4))

    for i, (name, mode, data) in enumerate(entries, 1):
        member(i, name, mode, data)
    member(len(entries) + 1, "TRAILER!!!", 0, b"")
    return bytes(out)


def boot(lines: list[str], kernel: Path, timeout: float = 900.0,
         workdir: Path | None = None) -> str:
    """Run the operations in a fresh two-node guest; the guest's observations."""
    with tempfile.TemporaryDirectory() as tmp:
        d = workdir or Path(tmp)
        init = build_init(d)
        initrd = d / "initrd.cpio"
        initrd.write_bytes(newc([
            ("dev", 0o40755, b""), ("proc", 0o40755, b""), ("sys", 0o40755, b""),
            ("init", 0o100755, init.read_bytes()),
            ("prog.txt", 0o100644, ("\n".join(lines) + "\n").encode()),
        ]))
        out = d / "observations.txt"
        console = d / "console.txt"
        cmd = [
            # mem-merge=off: the guest's RAM is not MADV_MERGEABLE, so the host's KSM
            # never sees this process (the host's ksmd belongs to kernel_lock holders)
            qemu() or "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc,mem-merge=off",
            "-m", "1024", "-smp", "2",
            "-object", "memory-backend-ram,id=m0,size=512M",
            "-object", "memory-backend-ram,id=m1,size=512M",
            "-numa", "node,nodeid=0,cpus=0,memdev=m0",
            "-numa", "node,nodeid=1,cpus=1,memdev=m1",
            "-nographic", "-monitor", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1 transparent_hugepage=never",
            "-serial", f"file:{console}", "-serial", f"file:{out}",
        ]
        try:
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=timeout, check=True)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the guest ran past {timeout:.0f} s") from None
        text = out.read_text(errors="replace") if out.exists() else ""
        if "END" not in text.splitlines():
            tail = console.read_text(errors="replace")[-2000:] if console.exists() else ""
            raise RuntimeError(f"the guest stopped early: {text[-1000:]}\n{tail}")
        return text


# ---- the guest's output


@dataclass
class Step:
    op: str
    reply: str = ""
    counters: dict[str, int] = field(default_factory=dict)
    # rmap_items, merging_pages, lines of /proc/PID/ksm_stat
    workers: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    status: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)
    frames: dict[tuple[int, int], tuple[str, ...]] = field(default_factory=dict)

    def observed(self) -> dict[str, Any]:
        """What is compared: pfns only as which pages share a frame and which map
        the zero page."""
        groups: dict[str, set[tuple[int, int, int]]] = {}
        zero = set()
        for (w, v), pfns in self.frames.items():
            for i, pfn in enumerate(pfns):
                if pfn == "z":
                    zero.add((w, v, i))
                elif pfn != "-":
                    groups.setdefault(pfn, set()).add((w, v, i))
        shared = frozenset(frozenset(g) for g in groups.values() if len(g) > 1)
        return {"reply": self.reply, "counters": self.counters, "ksm_stat": self.workers,
                "placement": self.status, "sharing": shared, "zero": frozenset(zero)}


def parse(text: str) -> tuple[str, list[Step]]:
    """The guest's header line and its steps, in order."""
    header = ""
    steps: list[Step] = []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "FATAL":
            raise RuntimeError(f"the guest failed: {line}")
        if kind == "H":
            header = rest
        elif kind == "O":
            steps.append(Step(rest.partition(" ")[2]))
        elif kind == "R":
            steps[-1].reply = rest
        elif kind == "K":
            name, value = rest.split()
            steps[-1].counters[name] = int(value)
        elif kind == "W":
            w, _pid, rmap, merging, lines = map(int, rest.split())
            steps[-1].workers[w] = (rmap, merging, lines)
        elif kind == "L":
            head, _, pfns = rest.partition(";")
            w, v, *status = map(int, head.split())
            steps[-1].status[(w, v)] = tuple(status)
            steps[-1].frames[(w, v)] = tuple(pfns.split())
    return header, steps


# ---- the same operations on a model machine


class Runner:
    """Executes the guest's operation lines on one machine of the model."""

    def __init__(self, machine_cls: Any, kernel: str) -> None:
        self.machine_cls = machine_cls
        self.kernel = kernel
        self.new_program()

    def new_program(self) -> None:
        self.m = self.machine_cls(nodes=2, kernel=self.kernel)
        self.m.ksm.pages_to_scan = 1_000_000  # as in the guest: a batch is a full scan
        self.m.ksm.run = 1
        self.procs: list[Any] = []
        self.vmas: list[list[tuple[int, int]]] = []  # per worker: (address, npages)

    def apply(self, line: str) -> str:
        op, *a = line.split()
        try:
            return self._apply(op, a)
        except OSError as e:
            return str(-(e.errno or 0))

    def _apply(self, op: str, a: list[str]) -> str:
        from ksmcore.errors import KsmdNotRunning

        if op == "P":
            self.new_program()
            return "0"
        if op == "K":
            self.m.ksm.sysfs_write(a[0], a[1])
            return "0"
        if op == "S":
            self.procs.append(self.m.spawn(node=int(a[0])))
            self.vmas.append([])
            return str(len(self.procs) - 1)
        if op == "C":
            try:
                self.m.ksm.scan(full_scans=1)
            except KsmdNotRunning:
                return "-1"
            return "0"
        w = int(a[0])
        p = self.procs[w]
        if op == "M":
            npages, node = int(a[1]), int(a[2])
            addr = p.mmap(npages, node=None if node < 0 else node)
            self.vmas[w].append((addr, npages))
            return f"{len(self.vmas[w]) - 1}"
        if op == "X":
            self.procs.append(p.fork())
            self.vmas.append(list(self.vmas[w]))
            return "pid"
        if op == "E":
            p.exit()
            return "0"
        addr = self.vmas[w][int(a[1])][0]
        if op == "F":
            first, values = int(a[2]), [int(x) for x in a[3:]]
            pages = np.zeros((len(values), PAGE), np.uint8)
            for i, v in enumerate(values):
                pages[i] = v & 0xFF
                if v >= 256:
                    pages[i, 8:16] = np.frombuffer(v.to_bytes(8, "little"), np.uint8)
            p.fill(addr + first * PAGE, pages)
            return "0"
        if op == "B":
            page, off, count, byte = map(int, a[2:6])
            p.write(addr + page * PAGE + off, bytes([byte]) * count)
            return "0"
        if op == "A":
            first, count, advice = map(int, a[2:5])
            p.madvise(addr + first * PAGE, count * PAGE, advice)
            return "0"
        if op == "V":
            first, count, node, flags = map(int, a[2:6])
            status = p.move_pages(addr + first * PAGE, count, node, flags)
            return " ".join(map(str, [0, *status]))
        raise ValueError(f"unknown operation {op!r}")

    def observe(self, reply: str, op: str) -> dict[str, Any]:
        m = self.m
        stats = m.ksm.stats(every=True)
        step = Step(op, reply, {n: int(stats[n]) for n in COUNTERS})
        missing = -errno.ENOENT if m.profile.has("move_pages_enoent") else -errno.EFAULT
        for w, p in enumerate(self.procs):
            if p.exited:
                continue
            st = p.ksm_stat(every=True)
            step.workers[w] = (int(st["ksm_rmap_items"]), int(st["ksm_merging_pages"]),
                               len(p.ksm_stat()))
            for v, (addr, npages) in enumerate(self.vmas[w]):
                status, frames = [], []
                for i in range(npages):
                    pfn = p.pfn(addr + i * PAGE)
                    if pfn is None:
                        status.append(missing)
                        frames.append("-")
                    elif pfn == 0:
                        status.append(-errno.EFAULT)
                        frames.append("z")
                    else:
                        status.append(m.pfn_to_nid(pfn))
                        frames.append(str(pfn))
                step.status[(w, v)] = tuple(status)
                step.frames[(w, v)] = tuple(frames)
        return step.observed()


def normalized(op: str, observed: dict[str, Any]) -> dict[str, Any]:
    """Replies that name kernel-chosen values (pids, addresses) are not compared."""
    out = dict(observed)
    kind = op.split()[0]
    if kind in ("X", "S"):
        out["reply"] = ""
    elif kind == "M":
        out["reply"] = observed["reply"].split()[0]
    return out


# ---- random programs, biased towards the NUMA cases of the seed thread


def generate(seed: int, kernel: str = "6.1", length: int = 22) -> list[str]:
    """One program: merge_across_nodes 0 or 1, workers on both nodes, pages equal
    within and across nodes, merges, move_pages across nodes between scans, fork,
    writes, unmerge, exit; scans one full scan at a time. Operations that the model
    refuses as bad input are not generated."""
    import ksmcore

    rng = random.Random(seed)
    run = Runner(ksmcore.Machine, kernel)
    lines: list[str] = []

    def emit(line: str) -> bool:
        reply = run.apply(line)
        if line == "C" and reply != "0":
            return False  # ksmd would not run: no full scan to wait for
        lines.append(line)
        return True

    emit("P")
    emit(f"K merge_across_nodes {rng.randrange(2)}")
    emit(f"K use_zero_pages {int(rng.random() < 0.2)}")
    values = [1, 2, 0, 3] + [256 + rng.randrange(4) for _ in range(2)]

    def live() -> list[int]:
        return [w for w, p in enumerate(run.procs) if not p.exited]

    def fill_line(w: int, v: int, first: int, n: int) -> str:
        base = rng.choice(values)
        vals = [base if rng.random() < 0.75 else rng.choice(values) for _ in range(n)]
        return f"F {w} {v} {first} " + " ".join(map(str, vals))

    def new_vma(w: int) -> None:
        npages = rng.randrange(2, 9)
        node = rng.choice([-1, -1, 0, 1])
        emit(f"M {w} {npages} {node}")
        v = len(run.vmas[w]) - 1
        emit(fill_line(w, v, 0, npages))
        emit(f"A {w} {v} 0 {npages} 12")

    for node in (0, 1)[: rng.randrange(1, 3)] + (rng.randrange(2),):
        emit(f"S {node}")
        new_vma(len(run.procs) - 1)
    ops = ["C"] * 25 + ["V"] * 16 + ["F"] * 14 + ["B"] * 6 + ["X"] * 6 + ["A"] * 10 \
        + ["M"] * 5 + ["S"] * 3 + ["E"] * 4
    emit("C")
    while len(lines) < length:
        op = rng.choice(ops)
        ws = [w for w in live() if run.vmas[w]]
        if op == "S" and len(run.procs) < 8:
            emit(f"S {rng.randrange(2)}")
            new_vma(len(run.procs) - 1)
            continue
        if not ws:
            if not emit("C"):
                break
            continue
        w = rng.choice(ws)
        v = rng.randrange(len(run.vmas[w]))
        npages = run.vmas[w][v][1]
        first = rng.randrange(npages)
        count = rng.randrange(1, npages - first + 1)
        if op == "C":
            emit("C")
        elif op == "V":
            flags = 4 if rng.random() < 0.6 else 2  # MPOL_MF_MOVE_ALL, MPOL_MF_MOVE
            emit(f"V {w} {v} {first} {count} {rng.randrange(2)} {flags}")
        elif op == "F":
            emit(fill_line(w, v, first, count))
        elif op == "B":
            emit(f"B {w} {v} {first} {rng.randrange(PAGE - 16)} {rng.randrange(1, 16)} "
                 f"{rng.choice([0, 1, 2, 0xCF])}")
        elif op == "X" and len(run.procs) < 8:
            emit(f"X {w}")
        elif op == "A":
            advice = rng.choice([12, 12, 13, 13, 4])
            emit(f"A {w} {v} {first} {count} {advice}")
        elif op == "M" and len(run.vmas[w]) < 4:
            new_vma(w)
        elif op == "E" and len(live()) > 1:
            emit(f"E {w}")
    emit("C")
    return lines


# ---- comparing


@dataclass
class Difference:
    program: int
    step: int
    op: str
    what: str


def compare(programs: list[list[str]], steps: list[Step], kernel: str) -> list[Difference]:
    """Replay every program on the engine and the reference; the differences from the
    guest's steps (and between the two implementations)."""
    import ksmcore
    import ksmcore.reference

    diffs: list[Difference] = []
    flat = [(i, line) for i, prog in enumerate(programs) for line in prog]
    if len(flat) != len(steps):
        raise RuntimeError(f"{len(flat)} operations sent, {len(steps)} observed")
    runners = [Runner(ksmcore.Machine, kernel), Runner(ksmcore.reference.Machine, kernel)]
    failed: set[int] = set()
    for n, ((i, line), step) in enumerate(zip(flat, steps, strict=True)):
        if step.op != line:
            raise RuntimeError(f"operation {n}: sent {line!r}, the guest ran {step.op!r}")
        if i in failed:
            continue
        want = normalized(line, step.observed())
        got = [normalized(line, r.observe(r.apply(line), line)) for r in runners]
        if got[0] != got[1]:
            diffs.append(Difference(i, n, line, "engine != reference: "
                                    + describe(got[0], got[1])))
        if got[1] != want:
            diffs.append(Difference(i, n, line, describe(want, got[1])))
            failed.add(i)  # the rest of this program would differ too
    return diffs


def describe(kernel: dict[str, Any], model: dict[str, Any]) -> str:
    parts = []
    for key in kernel:
        if kernel[key] != model[key]:
            a, b = kernel[key], model[key]
            if isinstance(a, dict):
                keys = sorted(set(a) | set(b), key=str)
                a = {k: a.get(k) for k in keys if a.get(k) != b.get(k)}
                b = {k: b.get(k) for k in keys if k in a}
            parts.append(f"{key}: kernel {a} model {b}")
    return "; ".join(parts)


def run_programs(seeds: list[int], kernel_version: str = "6.1", per_boot: int = 30,
                 timeout: float = 900.0, log: Any = None,
                 profile: str | None = None) -> dict[str, Any]:
    """Generate, boot, compare: the numbers of a sweep. ``profile``: the model's
    kernel profile, if not the guest's version (to show what a profile changes)."""
    image = find_kernel(kernel_version)
    if image is None:
        raise RuntimeError(missing(kernel_version) or "no kernel image")
    profile = profile or kernel_version
    programs = [generate(s, kernel_version) for s in seeds]
    diffs: list[Difference] = []
    header = ""
    seen = {"EBUSY statuses": 0, "move_pages calls": 0, "full scans": 0,
            "merge_across_nodes=0 programs": 0, "steps with pages_sharing > 0": 0,
            "steps with KSM zero pages": 0, "unmerges of KSM zero pages": 0,
            "forks of KSM processes": 0}
    t0 = time.monotonic()
    for b in range(0, len(programs), per_boot):
        batch = programs[b:b + per_boot]
        text = boot([line for prog in batch for line in prog], image, timeout)
        header, steps = parse(text)
        for d in compare(batch, steps, profile):
            diffs.append(Difference(d.program + b, d.step, d.op, d.what))
        prev: Step | None = None
        for s in steps:
            kind, *a = s.op.split()
            if prev is not None and kind == "A" and a[4] == "13":
                w, v, first, count = map(int, a[:4])
                frames = prev.frames.get((w, v), ())[first:first + count]
                seen["unmerges of KSM zero pages"] += "z" in frames
            if prev is not None and kind == "X":
                seen["forks of KSM processes"] += prev.workers.get(int(a[0]), (0,))[0] > 0
            prev = s
            seen["move_pages calls"] += kind == "V"
            seen["EBUSY statuses"] += s.reply.split().count(str(-errno.EBUSY)) * (kind == "V")
            seen["full scans"] += kind == "C"
            seen["merge_across_nodes=0 programs"] += s.op == "K merge_across_nodes 0"
            seen["steps with pages_sharing > 0"] += s.counters.get("pages_sharing", 0) > 0
            seen["steps with KSM zero pages"] += any("z" in f for f in s.frames.values())
        if log:
            log(f"programs {b + len(batch)}/{len(programs)}: {len(diffs)} differences, "
                f"{time.monotonic() - t0:.0f} s")
    return {
        "kernel": header,
        "image": str(image),
        "programs": len(programs),
        "operations": sum(len(p) for p in programs),
        "programs_differing": len({d.program for d in diffs}),
        "differences": diffs,
        "profile": profile,
        "seen": seen,
        "seconds": time.monotonic() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--programs", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--per-boot", type=int, default=30)
    ap.add_argument("--kernel", default="6.1", help="guest kernel and model profile")
    ap.add_argument("--profile", default=None,
                    help="the model's profile, if not --kernel (e.g. 6.18 against a 6.1 "
                         "guest, to see what the profile changes)")
    ap.add_argument("--show", type=int, default=10, help="differences to print")
    args = ap.parse_args(argv)
    why = missing(args.kernel)
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    res = run_programs(list(range(args.seed, args.seed + args.programs)), args.kernel,
                       args.per_boot, log=lambda s: print(s, file=sys.stderr),
                       profile=args.profile)
    print(f"guest: Linux {res['kernel']} ({res['image']})")
    print(f"{res['programs']} programs, {res['operations']} operations compared with "
          f"Machine(nodes=2, kernel={res['profile']!r}) and the reference in "
          f"{res['seconds']:.0f} s: {res['programs_differing']} programs differ")
    print("reached: " + ", ".join(f"{k} {v}" for k, v in res["seen"].items()))
    for d in res["differences"][: args.show]:
        print(f"  program {d.program} step {d.step} [{d.op}]: {d.what}")
    return 1 if res["differences"] else 0


if __name__ == "__main__":
    sys.exit(main())
