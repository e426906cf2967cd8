"""Malformed headers: our open fails with the same reason qemu-img gives, never a traceback."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import qcow2
from qcow2.format.builder import ImageSpec, build_image
from tests.conftest import qemu_img

pytestmark = pytest.mark.oracle

# (id, offset, struct format, value)
POKES = [
    ("version-4", 4, ">I", 4),
    ("version-1-as-qcow2", 4, ">I", 0),
    ("cluster-bits-8", 20, ">I", 8),
    ("cluster-bits-22", 20, ">I", 22),
    ("cluster-bits-huge", 20, ">I", 0xFFFFFFFF),
    ("header-length-short", 100, ">I", 50),
    ("header-length-huge", 100, ">I", 70000),
    ("backing-offset-past-cluster", 8, ">Q", 1 << 20),
    ("refcount-order-7", 96, ">I", 7),
    ("compression-type-without-bit", 104, ">B", 1),
    ("compression-type-unknown", 104, ">B", 7),
    ("compression-type-unknown-with-bit", 72, ">Q", 1 << 3),
    ("crypt-method-3", 32, ">I", 3),
    ("reftable-clusters-zero", 56, ">I", 0),
    ("reftable-clusters-huge", 56, ">I", 0xFFFFFFFF),
    ("reftable-offset-unaligned", 48, ">Q", 65536 + 8),
    ("reftable-offset-overflow", 48, ">Q", (1 << 63) - 65536),
    ("nb-snapshots-huge", 60, ">I", 70000),
    ("snapshots-offset-unaligned", 64, ">Q", 12345),
    ("l1-size-huge", 36, ">I", 0x7FFFFFFF),
    ("l1-size-too-small", 36, ">I", 0),
    ("l1-offset-unaligned", 40, ">Q", 3 * 65536 + 1),
    ("l1-offset-overflow", 40, ">Q", (1 << 63) - 8),
    ("incompat-bit-5", 72, ">Q", 1 << 5),
    ("incompat-bits-5-and-40", 72, ">Q", (1 << 5) | (1 << 40)),
    ("incompat-compression-bit-zlib", 72, ">Q", 1 << 3),
    ("size-huge", 24, ">Q", (1 << 63) + 512),
    ("backing-name-too-long", 16, ">I", 4000),
]


def _image(tmp_path: Path, name: str, backing: bool = False) -> Path:
    spec = ImageSpec(size=16 << 20, clusters={0: b"data" * 100},
                     backing_file="base.raw" if backing else None,
                     backing_format="raw" if backing else None)
    p = tmp_path / name
    p.write_bytes(build_image(spec))
    return p


def _qemu_reason(path: Path) -> str:
    r = qemu_img("info", "--output=json", path, check=False)
    assert r.returncode != 0, "qemu-img accepted the image"
    prefix = f"qemu-img: Could not open '{path}': "
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(prefix), line
    return line[len(prefix):]


@pytest.mark.parametrize(("name", "offset", "fmt", "value"), POKES, ids=[p[0] for p in POKES])
def test_malformed_header_same_reason_as_qemu(tmp_path: Path, name: str, offset: int, fmt: str,
                                              value: int) -> None:
    p = _image(tmp_path, name + ".qcow2", backing=name.startswith("backing"))
    raw = bytearray(p.read_bytes())
    if name == "compression-type-unknown-with-bit":
        raw[104] = 7
    if name == "nb-snapshots-huge":
        struct.pack_into(">Q", raw, 64, 5 * 65536)
    struct.pack_into(fmt, raw, offset, value)
    p.write_bytes(raw)
    before = p.read_bytes()
    with pytest.raises(qcow2.Qcow2Error) as ei:
        qcow2.open(str(p), fmt="qcow2", backing_policy="follow").close()
    ours = str(ei.value)
    theirs = _qemu_reason(p) if name != "version-1-as-qcow2" else "Unsupported qcow2 version 0"
    assert ours == theirs
    assert "\n" not in ours
    assert p.read_bytes() == before


def test_truncated_files_never_traceback(tmp_path: Path) -> None:
    full = _image(tmp_path, "full.qcow2").read_bytes()
    for cut in (0, 3, 4, 8, 71, 72, 100, 104, 111, 112, 65536, 65536 * 2, 65536 * 3 + 8,
                len(full) - 1):
        p = tmp_path / f"cut{cut}.qcow2"
        p.write_bytes(full[:cut])
        try:
            with qcow2.open(str(p), fmt="qcow2") as img:
                img.read(0, img.virtual_size)
                list(img.extents())
        except qcow2.Qcow2Error as e:
            assert str(e)
