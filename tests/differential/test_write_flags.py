"""Dirty bit (lazy refcounts) and corrupt bit handling of the write path, checked with
qemu-img."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import qcow2
from tests.conftest import qemu_img, qemu_io, run

pytestmark = pytest.mark.oracle


def _info(p: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads(qemu_img("info", "-U", "--output=json", p).stdout)
    return out


def test_lazy_refcounts_dirty_while_writing_clean_after_close(tmp_path: Path) -> None:
    p = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "8M")
    img = qcow2.open(str(p), readonly=False)
    img.write(0, b"x" * 100000)
    img.flush()
    assert _info(p)["dirty-flag"] is True
    img.close()
    assert _info(p)["dirty-flag"] is False
    assert qemu_img("check", p, check=False).returncode == 0
    with qcow2.open(str(p)) as ro:
        assert ro.read(0, 100000) == b"x" * 100000


def test_dirty_image_is_repaired_on_read_write_open_and_readable_read_only(
        tmp_path: Path) -> None:
    p = tmp_path / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "8M")
    r = run(["qemu-io", "-c", "write -P 7 0 64k", "-c", "abort", p], check=False)
    assert r.returncode != 0  # qemu-io aborted on purpose, leaving the image dirty
    with qcow2.open(str(p)) as ro:
        assert ro.read(0, 65536) == b"\x07" * 65536
    assert qemu_img("check", p, check=False).returncode == 2   # stale refcounts
    # As QEMU: a read-write open of a dirty image repairs the refcounts first.
    with qcow2.open(str(p), readonly=False) as img:
        assert not img.dirty
        assert img.read(0, 65536) == b"\x07" * 65536
        img.write(65536, b"\x08" * 4096)
    assert qemu_img("check", p, check=False).returncode == 0
    assert _info(p)["dirty-flag"] is False


def test_write_hitting_metadata_marks_image_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "8M")
    qemu_io(p, "write -P 1 0 64k")
    raw = bytearray(p.read_bytes())
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    l2_off = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    # Point guest cluster 0 at the L1 table itself (COPIED set, so it is written in place).
    struct.pack_into(">Q", raw, l2_off, l1_off | 1 << 63)
    p.write_bytes(raw)
    img = qcow2.open(str(p), readonly=False)
    with pytest.raises(qcow2.MetadataOverlapError):
        img.write(0, b"boom")
    with pytest.raises(qcow2.CorruptImageError):
        img.write(1 << 20, b"more")
    img.close()
    assert p.read_bytes()[l1_off:l1_off + 4] != b"boom"
    data = _info(p)["format-specific"]
    assert isinstance(data, dict) and data["data"]["corrupt"] is True
    with pytest.raises(qcow2.ReadOnlyImageError):
        qcow2.open(str(p), readonly=False)


def test_writable_open_drops_bitmaps_without_leaks(tmp_path: Path) -> None:
    p = tmp_path / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "64M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", p, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", p, "b1")
    qemu_io(p, "write -P 1 2M 1M")  # QEMU records these writes in the bitmaps
    with qcow2.open(str(p), readonly=False, backing_policy="follow") as img:
        img.write(0, b"\x02" * 4096)
    r = qemu_img("check", "--output=json", p, check=False)
    assert r.returncode == 0, r.stdout
    assert "leaks" not in json.loads(r.stdout)
    data = _info(p)["format-specific"]
    assert isinstance(data, dict) and "bitmaps" not in data["data"]
    with qcow2.open(str(p)) as ro:
        assert ro.read(0, 8192) == b"\x02" * 4096 + b"\x01" * 4096
        assert ro.read(2 << 20, 4096) == b"\x01" * 4096


def test_discard_punches_holes_for_freed_clusters(tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "64M")
    with qcow2.open(str(p), readonly=False) as img:
        img.write(0, b"\x11" * (16 << 20))
    before = p.stat().st_blocks
    with qcow2.open(str(p), readonly=False) as img:
        img.discard(1 << 20, 12 << 20)
    after = p.stat().st_blocks
    assert after * 512 <= before * 512 - (11 << 20)
    assert qemu_img("check", p, check=False).returncode == 0
    with qcow2.open(str(p)) as ro:
        assert ro.read(0, 1 << 20) == b"\x11" * (1 << 20)
        assert ro.read(1 << 20, 12 << 20) == bytes(12 << 20)
        assert ro.read(13 << 20, 3 << 20) == b"\x11" * (3 << 20)
