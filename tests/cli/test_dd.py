"""`qcow2 dd` against `qemu-img dd` (7.2): same exit status and messages, same output bytes
(raw and qcow outputs byte for byte; qcow2 outputs compared with `qemu-img compare`)."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io

pytestmark = pytest.mark.oracle

KiB = 1024
MiB = 1024 * KiB
OURS = [sys.executable, "-m", "qcow2", "dd"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """in.raw (5000 bytes: not a sector multiple), in.qcow2 (sparse, 1 MiB, with zero and
    compressed clusters), top.qcow (qcow over a qcow2 backing file)."""
    d = tmp_path_factory.mktemp("dd-inputs")
    (d / "in.raw").write_bytes(random.Random(1).randbytes(5000))
    q = d / "in.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", q, "1M")
    qemu_io(q, "write -P 0x11 0 10000", "write -z 65536 8192", "write -c -P 0x22 131072 4096",
            "write -P 0x33 700001 3333", fmt="qcow2")
    top = d / "top.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "in.qcow2", "-F", "qcow2", top, "1536K")
    qemu_io(top, "write -P 0x44 5000 3000", "write -P 0x55 1048000 2000", fmt="qcow")
    return d


def _run(tool: list[str], cwd: Path, args: list[str]) -> tuple[int, str, str]:
    p = subprocess.run([*tool, *args], capture_output=True, text=True, cwd=cwd)
    err = p.stderr.replace("qemu-img: ", "qcow2: ").replace("'qemu-img --help'",
                                                            "'qcow2 --help'")
    return p.returncode, p.stdout, err


def both(inputs: Path, tmp: Path, args: list[str]) -> tuple[Path, Path]:
    """Run dd with `args` in two copies of the input directory: (qemu's dir, ours)."""
    q, o = tmp / "q", tmp / "o"
    for d in (q, o):
        shutil.copytree(inputs, d)
    res_q = _run(["qemu-img", "dd"], q, args)
    res_o = _run(OURS, o, args)
    assert res_o == res_q
    return q, o


COPIES = [
    ["if=in.raw", "of=out"],
    ["bs=1000", "count=3", "skip=1", "if=in.raw", "of=out"],   # copies count-skip blocks
    ["bs=1000", "count=3", "if=in.raw", "of=out"],
    ["bs=1000", "skip=9", "if=in.raw", "of=out"],              # past the end: warning, rc 0
    ["bs=1000", "count=2", "skip=3", "if=in.raw", "of=out"],
    ["-f", "qcow2", "bs=64k", "if=in.qcow2", "of=out"],
    ["bs=777", "skip=3", "if=in.qcow2", "of=out", "-U"],
    ["bs=4k", "count=300", "if=top.qcow", "of=out"],
    ["if=in.raw", "of=out", "bs=0x10", "count=1k"],
]


@pytest.mark.parametrize("args", COPIES, ids=lambda a: " ".join(a))
@pytest.mark.parametrize("out_fmt", ["raw", "qcow"])
def test_output_byte_identical(inputs: Path, tmp_path: Path, args: list[str],
                               out_fmt: str) -> None:
    q, o = both(inputs, tmp_path, [*args, "-O", out_fmt])
    if (q / "out").exists() or (o / "out").exists():
        assert (o / "out").read_bytes() == (q / "out").read_bytes()


@pytest.mark.parametrize("args", [COPIES[0], COPIES[1], COPIES[6], COPIES[7]],
                         ids=lambda a: " ".join(a))
def test_qcow2_output_same_content_fully_allocated(inputs: Path, tmp_path: Path,
                                                   args: list[str]) -> None:
    q, o = both(inputs, tmp_path, [*args, "-O", "qcow2"])
    assert qemu_img("compare", "-s", q / "out", o / "out", check=False).returncode == 0
    assert qemu_img("check", o / "out").returncode == 0
    for d in (q, o):
        mapped = qemu_img("map", "--output=json", d / "out").stdout
        assert '"data": false' not in mapped  # every block was written, zeros included


ERRORS = [
    [], ["if=in.raw"], ["of=x"], ["bs=0", "if=in.raw", "of=x"], ["bs=-1", "if=in.raw", "of=x"],
    ["bs=3G", "if=in.raw", "of=x"], ["bs=1x", "if=in.raw", "of=x"],
    ["count=-1", "if=in.raw", "of=x"], ["skip=abc", "if=in.raw", "of=x"],
    ["count=", "if=in.raw", "of=x"], ["foo=bar", "if=in.raw", "of=x"],
    ["foo", "if=in.raw", "of=x"], ["if=in.raw", "of=x", "extra=1"],
    ["if=nonexist", "of=x"], ["if=", "of=x"], ["if=in.raw", "of="],
    ["-f", "qcow2", "if=in.raw", "of=x"], ["-f", "foo", "if=in.raw", "of=x"],
    ["-O", "foo", "if=in.raw", "of=x"], ["-O", "bochs", "if=in.raw", "of=x"],
    ["-f"], ["-O"], ["--object"], ["--foo", "if=in.raw", "of=x"], ["-x", "if=in.raw", "of=x"],
    ["if=in.raw", "of=nodir/x"], ["-O", "qcow", "count=0", "if=in.raw", "of=x"],
    ["-O", "qcow", "bs=1000", "skip=9", "if=in.raw", "of=x"],
    ["-Uf", "raw", "--force-sh", "if=in.raw", "of=x", "--", "bs=1k"],
    ["if=in.raw", "of=x", "--object", "secret,id=s0,data=x"],
]


@pytest.mark.parametrize("args", ERRORS, ids=lambda a: " ".join(a) or "none")
def test_messages_and_exit_status(inputs: Path, tmp_path: Path, args: list[str]) -> None:
    both(inputs, tmp_path, args)


def test_help_and_image_opts(inputs: Path, tmp_path: Path) -> None:
    rc, out, err = _run(OURS, inputs, ["-h"])
    assert (rc, err) == (0, "") and "if=input of=output" in out
    rc, out, err = _run(OURS, inputs, ["--image-opts", "if=in.raw", "of=x"])
    assert rc == 1 and "not supported" in err


def test_overwrites_and_truncates_existing_output(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "o" / "out"
    q, o = tmp_path / "q", tmp_path / "o"
    for d in (q, o):
        shutil.copytree(inputs, d)
        (d / "out").write_bytes(b"\xff" * 3 * MiB)
    assert _run(["qemu-img", "dd"], q, ["if=in.raw", "of=out", "bs=4k"])[0] == 0
    assert _run(OURS, o, ["if=in.raw", "of=out", "bs=4k"])[0] == 0
    assert out.read_bytes() == (q / "out").read_bytes()
