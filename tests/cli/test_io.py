"""`qcow2 io` runs qemu-io scripts: same output lines (timings aside), same image contents."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_img

pytestmark = pytest.mark.oracle

SCRIPT = ["write -P 0xab 1000 70000", "write -z 2M 64k", "read -P 0xab 1000 100",
          "read -P 0xac 1000 100", "read -v 1000 40", "alloc 0 1M", "alloc 2M 64k", "map",
          "discard 0 64k", "write -z -u 3M 100k", "flush", "info", "length", "bogus 1 2"]


def _run(tool: list[str], path: Path, cmds: list[str], ro: bool = False) -> tuple[int, str]:
    argv = [*tool, *(["-r"] if ro else [])]
    for c in cmds:
        argv += ["-c", c]
    p = subprocess.run([*argv, str(path)], capture_output=True, text=True)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines()
             if "ops/sec" not in ln and "read-only" not in ln]
    return p.returncode, "\n".join(sorted(lines))


OURS = [sys.executable, "-m", "qcow2", "io"]


@pytest.mark.parametrize("opts", ["cluster_size=65536", "compat=0.10", "extended_l2=on",
                                  "cluster_size=4096,refcount_bits=8"])
def test_script_output_and_contents_match_qemu_io(tmp_path: Path, opts: str) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, "4M")
    rnd = random.Random(opts)
    script = list(SCRIPT)
    for i in range(30):
        off = rnd.randrange(0, 4 << 20 - 1) // 512 * 512
        n = rnd.randrange(1, 200) * 512
        n = min(n, (4 << 20) - off)
        script.append(rnd.choice([f"write -P {i} {off} {n}", f"write -z {off} {n}",
                                  f"discard {off} {n}", f"read -P {i} {off} {n}"]))
    rc_q, out_q = _run(["qemu-io"], a, script)
    rc_o, out_o = _run(OURS, b, script)
    assert (rc_o, out_o) == (rc_q, out_q)
    assert qemu_img("compare", a, b, check=False).returncode == 0
    assert qemu_img("check", b, check=False).returncode == 0


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    rc, _ = _run(OURS, p, ["write 0 512"], ro=True)
    assert rc == 1


def test_missing_file_one_line_error(tmp_path: Path) -> None:
    p = subprocess.run([*OURS, "-c", "read 0 1", str(tmp_path / "nope.qcow2")],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_write_from_pattern_file_matches_qemu_io(tmp_path: Path) -> None:
    # -s FILE fills the request with the file's bytes, repeated (qemu_io_alloc_from_file)
    src = tmp_path / "pattern.bin"
    src.write_bytes(bytes(range(7, 250)) * 3)
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", p, "4M")
    script = [f"write -s {src} 1000 70000", f"write -c -s {src} 1M 64k", "read -v 1000 32"]
    rc_q, out_q = _run(["qemu-io"], a, script)
    rc_o, out_o = _run(OURS, b, script)
    assert (rc_o, out_o) == (rc_q, out_q)
    assert a.read_bytes() == b.read_bytes()
