"""Resize against qemu-img: the same grow/shrink sequence gives the same guest view and a
check-clean image; growing over a longer backing file reads zeros (iotest 292)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2
from tests.conftest import qemu_img, qemu_io

pytestmark = pytest.mark.oracle

OURS = [sys.executable, "-m", "qcow2"]


def _ours(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OURS, *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512",
                                  "compat=0.10", "extended_l2=on", "refcount_bits=1"])
def test_resize_sequence_matches_qemu_img(tmp_path: Path, opts: str) -> None:
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    for p in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, "4M")
        qemu_io(p, "write -P 1 0 1M", "write -P 2 3M 1M")
    steps = [["+5M"], ["--shrink", "2M"], ["2M"], ["100M"], ["--shrink", "3584K"],
             ["-", "512K"]]
    for st in steps:
        args = ["--shrink", "--", "-512K"] if st == ["-", "512K"] else st
        rq = qemu_img("resize", a, *args, check=False)
        ro = _ours("resize", b, *args)
        assert (ro.returncode, ro.stdout) == (rq.returncode, rq.stdout), (st, ro.stderr)
        qemu_io(a, "write -P 3 1536K 4096")
        qemu_io(b, "write -P 3 1536K 4096")
    assert qemu_img("compare", a, b, check=False).returncode == 0
    ia = json.loads(qemu_img("info", "--output=json", a).stdout)
    ib = json.loads(qemu_img("info", "--output=json", b).stdout)
    assert ia["virtual-size"] == ib["virtual-size"]
    r = qemu_img("check", "--output=json", b, check=False)
    assert r.returncode == 0, r.stdout
    # The shrink really freed the space: no more than QEMU's file, give or take a cluster.
    assert b.stat().st_size <= a.stat().st_size + 65536


def test_grow_over_longer_backing_reads_zeros(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x55 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1M")
    qemu_io(top, "write -P 0x66 100k 4k")
    r = _ours("resize", top, "3M")
    assert r.returncode == 0, r.stderr
    with qcow2.open(str(top), backing_policy="follow") as img:
        data = img.read(0, img.virtual_size)
    assert data[:100 * 1024] == b"\x55" * 100 * 1024
    assert data[1 << 20:] == bytes(2 << 20)
    assert qemu_img("check", top, check=False).returncode == 0
    raw = tmp_path / "raw"
    qemu_img("convert", "-O", "raw", top, raw)
    assert raw.read_bytes() == data


def test_resize_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "1M")
    qemu_img("snapshot", "-c", "s1", p)
    for args in (["2M"], ["--", "-2M"], ["abc"]):
        rq = qemu_img("resize", p, *args, check=False)
        ro = _ours("resize", p, *args)
        assert ro.returncode == rq.returncode == 1
        assert ro.stderr.replace("qcow2:", "qemu-img:") == rq.stderr


@pytest.mark.parametrize("opts", ["", ",extended_l2=on", ",cluster_size=4096",
                                  ",data_file_raw=off"])
@pytest.mark.parametrize("size", ["128M", "100000K", "67109376", "32M"])
def test_resize_data_file_matches_qemu_img(tmp_path: Path, opts: str, size: str) -> None:
    """The data file is resized with the image. Growing a data-file-raw image also maps the
    new clusters to themselves in the data file (QEMU preallocates their metadata) and grows
    the data file to a whole subcluster."""
    dirs = [tmp_path / "q", tmp_path / "o"]
    for d in dirs:
        d.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file=d.raw,data_file_raw=on{opts}".replace(
                     "on,data_file_raw=off", "off"),
                 "a.qcow2", "64M", cwd=d)
        subprocess.run(["qemu-io", "-c", "write -P 1 0 1M", "a.qcow2"], cwd=d, check=True,
                       capture_output=True)
    args = ["--shrink", "a.qcow2", size] if size == "32M" else ["a.qcow2", size]
    rq = qemu_img("resize", *args, cwd=dirs[0], check=False)
    ro = subprocess.run([*OURS, "resize", *args], capture_output=True, text=True, cwd=dirs[1])
    assert (ro.returncode, ro.stdout) == (rq.returncode, rq.stdout), ro.stderr
    for name in ("a.qcow2", "d.raw"):
        assert (dirs[1] / name).read_bytes() == (dirs[0] / name).read_bytes(), name
