"""convert -O qcow2 / qcow: the output equals qemu-img's byte for byte where QEMU's layout is
deterministic (it is for sequential in-order conversion), and always passes check and
compares identical to the source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io

pytestmark = pytest.mark.oracle

OURS = [sys.executable, "-m", "qcow2"]


def _src(tmp: Path, opts: str = "") -> Path:
    p = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), p, "70M")
    qemu_io(p, "write -P 1 0 3M", "write -z 5M 1M", "write -P 2 17M 100k",
            "write -P 3 33M 5000", "write -P 0 40M 1M", "write -P 4 69M 1M")
    if "compat=0.10" not in opts:
        qemu_io(p, "write -c -P 5 30M 64k")
    return p


@pytest.mark.parametrize("oopts", ["", "cluster_size=4096", "cluster_size=2M",
                                   "compat=0.10", "refcount_bits=1", "extended_l2=on",
                                   "lazy_refcounts=on", "preallocation=metadata",
                                   "compression_type=zstd"])
def test_convert_to_qcow2_identical_to_qemu(tmp_path: Path, oopts: str) -> None:
    src = _src(tmp_path)
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    extra = ["-o", oopts] if oopts else []
    qemu_img("convert", "-O", "qcow2", *extra, src, a)
    r = subprocess.run([*OURS, "convert", "-O", "qcow2", *extra, str(src), str(b)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert qemu_img("check", b, check=False).returncode == 0
    assert qemu_img("compare", src, b, check=False).returncode == 0
    assert a.read_bytes() == b.read_bytes()


def test_convert_raw_source_to_qcow2_identical(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(20 << 20)
        f.seek(1 << 20)
        f.write(b"abc" * 100000)
        f.seek(9 << 20)
        f.write(bytes(8192) + b"x" * 70000)
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, a)
    r = subprocess.run([*OURS, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(b)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()


def test_convert_to_qcow_v1(tmp_path: Path) -> None:
    src = _src(tmp_path)
    a, b = tmp_path / "qemu.qcow", tmp_path / "ours.qcow"
    qemu_img("convert", "-O", "qcow", src, a)
    r = subprocess.run([*OURS, "convert", "-O", "qcow", str(src), str(b)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert qemu_img("compare", src, b, check=False).returncode == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("oopts", ["cluster_size=3", "bogus=1", "compat=0.10,refcount_bits=8"])
def test_convert_create_errors_like_qemu(tmp_path: Path, oopts: str) -> None:
    src = _src(tmp_path)
    out = tmp_path / "o.qcow2"
    q = qemu_img("convert", "-O", "qcow2", "-o", oopts, src, out, check=False)
    o = subprocess.run([*OURS, "convert", "-O", "qcow2", "-o", oopts, str(src), str(out)],
                       capture_output=True, text=True)
    assert o.returncode == q.returncode == 1
    assert o.stderr.replace("qcow2: ", "qemu-img: ", 1) == q.stderr
