"""img.check() on an open image: report, and repair of an image opened read-write."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import qcow2
from qcow2.engine.writer import WritableQcow2Image
from tests.conftest import qemu_img

pytestmark = pytest.mark.oracle


def _leak_one(p: Path, host: int) -> None:
    # give a freed cluster inside the file a refcount again (16-bit refcounts, one refblock)
    data = p.read_bytes()
    (rt,) = struct.unpack_from(">Q", data, 48)
    (rb,) = struct.unpack_from(">Q", data, rt)
    with open(p, "r+b") as f:
        f.seek(rb + 2 * (host // 65536))
        f.write(struct.pack(">H", 1))


def test_check_then_repair_an_open_image(tmp_path: Path) -> None:
    p = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "16M")
    with qcow2.open(str(p), readonly=False) as img:
        img.write(0, b"a" * 100000)
        img.write(1 << 20, b"c" * 65536)
        freed = next(e.host_offset for e in img.extents(1 << 20, 65536))
        img.discard(1 << 20, 65536)
    assert freed is not None
    _leak_one(p, freed)
    r = qemu_img("check", "--output=json", p, check=False)
    assert r.returncode == 3
    exp = json.loads(r.stdout)
    with qcow2.open(str(p)) as ro:
        res = ro.check()
        assert res.to_qapi() == exp
        with pytest.raises(qcow2.ReadOnlyImageError):
            ro.check("leaks")
    with qcow2.open(str(p), readonly=False) as img:
        assert isinstance(img, WritableQcow2Image)
        assert img.check().leaks == 1
        fixed = img.check("leaks")
        assert fixed.leaks_fixed == 1 and fixed.leaks == 0 and fixed.clean
        img.write(200000, b"b" * 70000)       # the reloaded state keeps working
        assert img.read(0, 100000) == b"a" * 100000
    assert qemu_img("check", p).returncode == 0
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", p, out)
    raw = out.read_bytes()
    assert raw[:100000] == b"a" * 100000 and raw[200000:270000] == b"b" * 70000
