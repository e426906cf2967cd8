"""qcow v1 images made by qemu-img/qemu-io, read by us: content == `qemu-img convert -O raw`,
extents == `qemu-img map --output=json`, geometry == `qemu-img info --output=json`."""

from __future__ import annotations

import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import qcow2
from qcow2.engine.qcow1 import QcowImage
from tests.conftest import qemu_img, qemu_io, qemu_json, qemu_raw

pytestmark = pytest.mark.oracle


@dataclass
class Case:
    path: Path
    raw: bytes
    map: list[dict[str, Any]]
    info: dict[str, Any]


def _source_raw(size: int) -> bytes:
    """Zero clusters, repetitive data, incompressible data and a partial tail cluster."""
    rnd = random.Random(1)
    b = bytearray(size)
    b[0:8192] = b"\x07" * 8192
    b[20000:60000] = rnd.randbytes(40000)
    b[100000:100100] = b"hello" * 20
    b[150000:170000] = b"".join(b"line %05d of some text\n" % i for i in range(1000))[:20000]
    b[size - 1000:size] = b"x" * 1000
    return bytes(b)


def _convert_compressed(src: Path, dst: Path) -> None:
    # qemu-img 7.2 exits 1 without a message after writing a correct compressed qcow image.
    p = qemu_img("convert", "-c", "-O", "qcow", src, dst, check=False)
    assert p.returncode in (0, 1) and not p.stderr.strip(), p.stderr
    assert qemu_img("compare", src, dst, check=False).returncode == 0


def _build(d: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}

    def qcow(name: str, size: str | None, *opts: str, writes: tuple[str, ...] = ()) -> Path:
        p = d / name
        qemu_img("create", "-f", "qcow", *opts, p, *([size] if size else []))
        if writes:
            qemu_io(p, *writes, fmt="qcow")
        return p

    # Default geometry (4 KiB clusters, 512-entry L2), size not a cluster multiple,
    # unaligned writes, one crossing the image's last partial cluster.
    out["plain"] = qcow("plain.qcow", "1000000", writes=(
        "write -P 0x5a 4096 8192", "write -P 0x33 100000 777", "write -P 0x21 0 1",
        "write -P 0x44 995000 5000"))
    # Several L2 tables (each maps 2 MiB); explicit zero writes still allocate data.
    out["multi_l2"] = qcow("multi.qcow", "5M", writes=(
        "write -P 0x71 2097000 1000", "write -P 0x72 4700000 70000",
        "write -z 300000 8192", "write -P 0x73 3000000 4096"))
    # A header size that is not a sector multiple: QEMU drops the partial sector.
    odd = d / "odd.qcow"
    shutil.copy(out["plain"], odd)
    with open(odd, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", 1000100))
    out["odd_size"] = odd

    src = d / "src.raw"
    src.write_bytes(_source_raw(300000))
    out["compressed"] = d / "comp.qcow"
    _convert_compressed(src, out["compressed"])
    # Partial writes into compressed clusters make QEMU inflate and rewrite them as data.
    out["compressed_rewritten"] = d / "comp2.qcow"
    shutil.copy(out["compressed"], out["compressed_rewritten"])
    qemu_io(out["compressed_rewritten"], "write -P 0x09 5000 100", "write -P 0x0a 98500 3000",
            "write -P 0x0b 299900 132", fmt="qcow")
    out["converted"] = d / "conv.qcow"
    qemu_img("convert", "-O", "qcow", src, out["converted"])

    # qcow over qcow2 (backing images get 512-byte clusters and 4096-entry L2 tables);
    # the overlay is larger than its backing file.
    base2 = d / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base2, "1M")
    qemu_io(base2, "write -P 0x11 0 65536", "write -P 0x22 500000 3000", fmt="qcow2")
    out["over_qcow2"] = qcow("ov2.qcow", "2M", "-b", "base.qcow2", "-F", "qcow2", writes=(
        "write -P 0x5a 1000 3000", "write -P 0x66 1048000 2000", "write -P 0x67 1500000 100"))
    # qcow over raw; the raw file is not a sector multiple and shorter than the overlay.
    (d / "base.raw").write_bytes(random.Random(2).randbytes(100000))
    out["over_raw"] = qcow("ovr.qcow", "300000", "-b", "base.raw", "-F", "raw", writes=(
        "write -P 0x5a 1000 3000", "write -P 0x01 99000 2000"))
    # qcow over qcow, size taken from the backing file.
    out["over_qcow"] = qcow("ov1.qcow", None, "-b", "plain.qcow", "-F", "qcow", writes=(
        "write -P 0x3c 4000 200", "write -P 0x3d 600000 5000"))
    # A qcow v1 (compressed) image as the backing file of a qcow2 overlay.
    top = d / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "comp.qcow", "-F", "qcow", top)
    qemu_io(top, "write -P 0x77 70000 5000", fmt="qcow2")
    out["qcow2_over_qcow"] = top
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    d = tmp_path_factory.mktemp("qcow1")
    cases = {}
    for name, path in _build(d).items():
        cases[name] = Case(path, qemu_raw(path, d),
                           qemu_json("map", "--output=json", path),
                           qemu_json("info", "--output=json", path))
    return cases


NAMES = ["plain", "multi_l2", "odd_size", "compressed", "compressed_rewritten", "converted",
         "over_qcow2", "over_raw", "over_qcow", "qcow2_over_qcow"]


def _open(case: Case) -> qcow2.BlockDevice:
    return qcow2.open(str(case.path), backing_policy="follow")


@pytest.mark.parametrize("name", NAMES)
def test_full_read(corpus: dict[str, Case], name: str) -> None:
    case = corpus[name]
    with _open(case) as img:
        assert img.virtual_size == len(case.raw) == case.info["virtual-size"]
        assert img.read(0, img.virtual_size) == case.raw
        buf = bytearray(img.virtual_size)
        assert img.as_file().readinto(buf) == len(buf)
        assert buf == case.raw


@pytest.mark.parametrize("name", NAMES)
def test_random_ranges(corpus: dict[str, Case], name: str) -> None:
    case = corpus[name]
    size = len(case.raw)
    rnd = random.Random(name)
    with _open(case) as img:
        for _ in range(60):
            a = rnd.randrange(size)
            n = rnd.randrange(min(size - a, 70000) + 1)
            assert img.read(a, n) == case.raw[a:a + n], (a, n)


@pytest.mark.parametrize("name", NAMES)
def test_map(corpus: dict[str, Case], name: str) -> None:
    case = corpus[name]
    with _open(case) as img:
        assert [e.to_map_json() for e in img.extents()] == case.map


@pytest.mark.parametrize("name", ["plain", "multi_l2", "compressed", "compressed_rewritten",
                                  "over_qcow2", "over_raw"])
def test_map_subranges(corpus: dict[str, Case], name: str) -> None:
    case = corpus[name]
    size = len(case.raw)
    rnd = random.Random(name)
    with _open(case) as img:
        for _ in range(3):
            start = rnd.randrange(size)
            length = rnd.randrange(1, size - start + 1)
            expect = qemu_json("map", "--output=json", f"--start-offset={start}",
                               f"--max-length={length}", case.path)
            assert [e.to_map_json() for e in img.extents(start, length)] == expect, (
                start, length)


@pytest.mark.parametrize("name", NAMES)
def test_info_geometry(corpus: dict[str, Case], name: str) -> None:
    case = corpus[name]
    with _open(case) as img:
        assert img.format_name == case.info["format"]
        assert img.virtual_size == case.info["virtual-size"]
        if isinstance(img, QcowImage):
            assert img.cluster_size == case.info["cluster-size"]
            assert img.backing_file == case.info.get("backing-filename")
            chain = qemu_json("info", "--output=json", "--backing-chain", case.path)
            assert [layer.format_name for layer in img.chain()] == [i["format"] for i in chain]


def test_default_geometry(corpus: dict[str, Case]) -> None:
    # QEMU's create defaults: 4 KiB clusters and 512-entry L2 tables without a backing file,
    # 512-byte clusters and 4096-entry L2 tables with one; the L1 follows the header and name.
    with _open(corpus["plain"]) as img:
        assert isinstance(img, QcowImage)
        assert (img.cluster_bits, img.l2_bits, img.header.l1_table_offset) == (12, 9, 48)
        assert img.header.size == 1000448  # create rounds the size up to a sector
    with _open(corpus["over_qcow2"]) as img:
        assert isinstance(img, QcowImage)
        assert (img.cluster_bits, img.l2_bits) == (9, 12)
        assert img.header.backing_file_offset == 48
        assert img.header.l1_table_offset == (48 + len("base.qcow2") + 7) & ~7


def test_compressed_entries_as_qemu_writes_them(corpus: dict[str, Case]) -> None:
    # Every compressed cluster starts at a 512-aligned offset; entries decode to in-file data.
    path = corpus["compressed"].path
    data = path.read_bytes()
    with _open(corpus["compressed"]) as img:
        assert isinstance(img, QcowImage)
        l2_off = struct.unpack_from(">Q", data, img.header.l1_table_offset)[0]
        entries = struct.unpack_from(">512Q", data, l2_off)
    compressed = [e for e in entries if e >> 63]
    assert compressed
    for e in compressed:
        coffset, csize = e & ((1 << 51) - 1), (e >> 51) & 0xFFF
        assert coffset % 512 == 0 and 0 < csize < 4096 and coffset + csize <= len(data)


def test_human_map_refuses_compressed(corpus: dict[str, Case]) -> None:
    # qemu-img's human map cannot print data without an offset; our extents say the same.
    p = qemu_img("map", corpus["compressed"].path, check=False)
    assert p.returncode == 1
    with _open(corpus["compressed"]) as img:
        assert any(e.data and e.host_offset is None for e in img.extents())



def test_aes_encrypted_image_refused(tmp_path: Path) -> None:
    p = tmp_path / "enc.qcow"
    qemu_img("create", "-f", "qcow", "--object", "secret,id=sec0,data=pw", "-o",
             "encrypt.format=aes,encrypt.key-secret=sec0", p, "1M")
    assert qemu_json("info", "--output=json", p)["encrypted"] is True
    with pytest.raises(qcow2.EncryptionError, match="encryption not supported yet"):
        qcow2.open(str(p))
