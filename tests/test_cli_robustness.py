"""The console script at its edges: where its output goes, hostile or huge inputs, and
knob values the kernel's parser refuses. Each ends in one line on stderr and a
non-zero exit, or (a pipe closed by its reader) quietly, as Unix tools do."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_estimate_sources import write_core

from ksmcore.constants import PAGE_SIZE
from ksmcore.estimate.elfcore import open_core
from ksmcore.estimate.errors import EstimateError

KSMCORE = [sys.executable, "-m", "ksmcore.cli"]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "ram.img"
    np.repeat(np.arange(64, dtype=np.uint8) % 4, PAGE_SIZE).tofile(path)
    return path


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KSMCORE, *args], capture_output=True, text=True, timeout=120,
                          **kw)  # type: ignore[call-overload]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ---- output


def test_closed_stdout(image: Path) -> None:
    out = subprocess.run([*KSMCORE, "estimate", str(image)], stdout=None, stderr=subprocess.PIPE,
                         text=True, timeout=120, pass_fds=(), close_fds=True,
                         preexec_fn=lambda: os.close(1))
    assert out.returncode == 1
    assert "standard output is closed" in one_line(out.stderr)


def test_full_device(image: Path) -> None:
    with open("/dev/full", "w") as full:
        out = subprocess.run([*KSMCORE, "estimate", str(image), "--json"], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    assert out.returncode == 1
    assert "No space left on device" in one_line(out.stderr)


def test_pipe_closed_early(image: Path) -> None:
    """`ksmcore ... | head -c 1`: the reader goes away before the report is written."""
    r, w = os.pipe()
    proc = subprocess.Popen([*KSMCORE, "estimate", "--sample", "--json", "--no-progress"],
                            stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.close(r)  # the reader is gone
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141
    assert err == ""


# ---- values the kernel's parser refuses


@pytest.mark.parametrize("flag,value", [
    ("--pages-to-scan", " 7"),
    ("--pages-to-scan", "1_000"),
    ("--sleep-millisecs", "\u0663"),  # ARABIC-INDIC DIGIT THREE: int() takes it
    ("--max-page-sharing", "-2"),
    ("--cost-per-page-us", "inf"),
    ("--cost-per-page-us", "nan"),
    ("--nodes", "1.0"),
])
def test_refused_values(image: Path, flag: str, value: str) -> None:
    out = run(["estimate", str(image), flag, value])
    assert out.returncode == 2
    assert flag in one_line(out.stderr)


def test_tune_values_refused_like_the_kernel(image: Path) -> None:
    out = run(["tune", str(image), "--pages-to-scan-values", "100,1_000"])
    assert out.returncode == 2
    assert "--pages-to-scan-values" in one_line(out.stderr)


def test_json_is_standard(image: Path) -> None:
    out = run(["estimate", str(image), "--json", "--cost-per-page-us", "1e-300"])
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


# ---- hostile and huge inputs


def _notes_offset(core: bytes) -> int:
    phoff = struct.unpack_from("<Q", core, 32)[0]
    return int(struct.unpack_from("<Q", core, phoff + 8)[0])  # PT_NOTE comes first


def test_nt_file_count_bounded_by_the_note(tmp_path: Path) -> None:
    path = tmp_path / "core"
    write_core(path, [(0x10000, bytes(4 * PAGE_SIZE), 4 * PAGE_SIZE)],
               files=[(0x400000, 0x401000)])
    core = bytearray(path.read_bytes())
    # the NT_FILE note follows NT_PRSTATUS (12 + 8 + 336 bytes); its count is first
    at = _notes_offset(bytes(core)) + 12 + 8 + 336 + 12 + 8
    struct.pack_into("<Q", core, at, 1 << 40)
    path.write_bytes(bytes(core))
    t0 = time.process_time()
    with pytest.raises(EstimateError, match="claims 1099511627776 mappings"):
        open_core(str(path))
    assert time.process_time() - t0 < 5  # refused from the note's size, not by reading


@pytest.mark.parametrize("field", [0, 4])  # namesz, descsz
def test_note_sizes_past_the_segment(tmp_path: Path, field: int) -> None:
    path = tmp_path / "core"
    write_core(path, [(0x10000, bytes(4 * PAGE_SIZE), 4 * PAGE_SIZE)])
    core = bytearray(path.read_bytes())
    struct.pack_into("<I", core, _notes_offset(bytes(core)) + field, 0xFFFFFFF0)
    path.write_bytes(bytes(core))
    with pytest.raises(EstimateError, match="corrupt ELF core.*past the segment"):
        open_core(str(path))


def test_huge_sparse_image_refused_up_front(tmp_path: Path) -> None:
    path = tmp_path / "huge.img"
    with open(path, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, nothing written
    out = run(["estimate", str(path), "--max-memory", "1G", "--no-progress"])
    if out.returncode == 0:  # holes are not present: nothing to scan, nothing needed
        assert "holes" in out.stdout or "not present" in out.stdout
        return
    assert out.returncode == 1
    assert "more than the 1.0 GiB --max-memory" in one_line(out.stderr)


def test_max_memory_refuses_before_starting(image: Path) -> None:
    out = run(["estimate", str(image), "--max-memory", "1k"])
    assert out.returncode == 1
    assert "model memory" in one_line(out.stderr)
    assert out.stdout == ""


def test_image_truncated_during_the_run(image: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Another process truncates the image while ksmd runs on it (the README suggests a
    VM's RAM file): one line and exit 1, where it used to die of SIGBUS (exit 135)."""
    from ksmcore import cli
    from ksmcore.estimate import commands

    real = commands.run_ksmd

    def truncate_then_run(*args: object, **kw: object) -> object:
        os.truncate(image, 8 * PAGE_SIZE)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(commands, "run_ksmd", truncate_then_run)
    assert cli.main(["estimate", str(image), "--no-progress"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert "memory image changed underneath" in one_line(out.err)
    assert "changed size from 262144 to 32768 bytes" in out.err
