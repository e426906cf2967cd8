"""`qcow2 check` against `qemu-img check` (7.2): same JSON, human text, diagnostics and exit
status on clean images of every layout, on images corrupted by poking bytes (as qemu-iotests
do), and after repairs (-r leaks / -r all): the repaired file is byte-identical to the one
qemu-img repairs, and the guest data is unchanged. Also: a writable open of a dirty
lazy-refcounts image repairs it first, as QEMU does.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qcow2
from qcow2.cli import check as cli_check
from qcow2.cli import common as cli_common
from qcow2.cli import main as cli_main
from qcow2.cli.main import main
from tests.conftest import qemu_img, qemu_io, qemu_raw

pytestmark = pytest.mark.oracle

MiB = 1 << 20
L2E_OFFSET = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63


# ----------------------------------------------------------------------------- helpers
def _qemu_check(path: Path, *args: str) -> tuple[str, str, int]:
    p = subprocess.run(["qemu-img", "check", *args, path.name], capture_output=True,
                       text=True, cwd=path.parent)
    return p.stdout, p.stderr, p.returncode


def _our_check(path: Path, *args: str, capsys: pytest.CaptureFixture[str]
               ) -> tuple[str, str, int]:
    capsys.readouterr()
    old = os.getcwd()
    os.chdir(path.parent)
    # Our program name in error lines is "qcow2"; QEMU's driver messages also start with
    # "qcow2: ", so the name is switched instead of rewriting the output.
    with pytest.MonkeyPatch.context() as mp:
        for mod in (cli_main, cli_common, cli_check):
            mp.setattr(mod, "PROG", "qemu-img")
        try:
            rc = main(["check", *args, path.name])
        finally:
            os.chdir(old)
    out, err = capsys.readouterr()
    return out, err, rc


def _twins(src: Path, tmp: Path) -> tuple[Path, Path]:
    """Two copies of `src` with the same file name (JSON prints it), for qemu-img and us."""
    a = tmp / "qemu" / src.name
    b = tmp / "ours" / src.name
    for d in (a, b):
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d)
    return a, b


def _u64(p: Path, off: int) -> int:
    with open(p, "rb") as f:
        f.seek(off)
        return int(struct.unpack(">Q", f.read(8))[0])


def _put(p: Path, off: int, fmt: str, *vals: int) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def _refblock0(p: Path) -> int:
    return _u64(p, _u64(p, 48)) & ~511


def _cluster_bits(p: Path) -> int:
    with open(p, "rb") as f:
        f.seek(20)
        return int.from_bytes(f.read(4), "big")


def _set_refcount16(p: Path, cluster: int, value: int) -> None:
    _put(p, _refblock0(p) + 2 * cluster, ">H", value)


def _l1_entry_offset(p: Path, index: int) -> int:
    return _u64(p, 40) + 8 * index


def _l2_entry_offset(p: Path, l1_index: int, l2_index: int, entry_size: int = 8) -> int:
    return (_u64(p, _l1_entry_offset(p, l1_index)) & L2E_OFFSET) + entry_size * l2_index


def _data_cluster(p: Path, l2_index: int) -> int:
    return (_u64(p, _l2_entry_offset(p, 0, l2_index)) & L2E_OFFSET) >> _cluster_bits(p)


# ----------------------------------------------------------------------------- clean matrix
Build = Callable[[Path], Path]
OPS = ["write -s {rand} 0 1000000", "write -P 5 2000000 300000", "write -z 3000000 70000",
       "discard 100000 200000", "write -c -P 7 6291456 131072"]


def _create(d: Path, name: str, size: int | str, opts: str = "", *extra: str) -> Path:
    p = d / name
    argv = ["create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    qemu_img(*argv, *extra, p, str(size))
    return p


def _io(p: Path, *cmds: str) -> None:
    rand = p.parent.parent / "rand.bin"
    qemu_io(p, *[c.format(rand=rand) for c in cmds], fmt="qcow2")


def _layout(opts: str, ops: list[str]) -> Build:
    def build(d: Path) -> Path:
        p = _create(d, "img.qcow2", 8 * MiB, opts)
        _io(p, *ops)
        return p
    return build


def _snapshots(d: Path) -> Path:
    p = _create(d, "img.qcow2", 8 * MiB, "cluster_size=4k")
    _io(p, *OPS)
    qemu_img("snapshot", "-c", "s1", p)
    _io(p, "write -P 9 0 100000", "write -c -P 8 7340032 4096")
    qemu_img("snapshot", "-c", "s2", p)
    _io(p, "discard 0 50000")
    return p


def _snapshots_v2(d: Path) -> Path:
    p = _create(d, "img.qcow2", 4 * MiB, "compat=0.10,cluster_size=16k")
    _io(p, "write -s {rand} 0 700000")
    qemu_img("snapshot", "-c", "a", p)
    _io(p, "write -P 1 5000 10000", "write -z 100000 32768")
    return p


def _bitmaps(d: Path) -> Path:
    p = _create(d, "img.qcow2", 8 * MiB)
    qemu_img("bitmap", "--add", p, "b0")
    _io(p, "write -P 1 100000 300000")
    qemu_img("bitmap", "--add", "-g", "512k", p, "b1")
    return p


def _converted(d: Path) -> Path:
    p = d / "img.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", d.parent / "rand.bin", p)
    return p


def _zstd(d: Path) -> Path:
    p = _create(d, "img.qcow2", 4 * MiB, "compression_type=zstd")
    _io(p, "write -c -s {rand} 0 1048576", "write -c -P 0 2097152 65536")
    return p


def _data_file(d: Path) -> Path:
    # absolute: QEMU resolves a relative data file name against the current directory
    p = _create(d, "img.qcow2", 4 * MiB, f"data_file={d / 'img.raw'}")
    _io(p, "write -P 1 0 100000", "write -z 200000 70000")
    return p


def _overlay(d: Path) -> Path:
    base = _create(d, "base.qcow2", 4 * MiB)
    _io(base, "write -P 1 0 1M")
    p = _create(d, "img.qcow2", 4 * MiB, "", "-b", "base.qcow2", "-F", "qcow2")
    _io(p, "write -P 2 4096 4096")
    return p


def _ours(d: Path) -> Path:
    """An image written by our engine: allocating, in-place, zero and discard writes."""
    p = d / "img.qcow2"
    qcow2.create(str(p), 16 * MiB, cluster_size=4096)
    with qcow2.open(str(p), readonly=False) as img:
        img.write(0, os.urandom(700000))
        img.write(5 * MiB + 123, b"x" * 300000)
        img.write_zeroes(100000, 50000)
        img.discard(300000, 100000)
        img.write(2000, b"y" * 10000)
    return p


def _ours_extl2(d: Path) -> Path:
    p = d / "img.qcow2"
    qcow2.create(str(p), 16 * MiB, extended_l2=True, refcount_bits=8)
    with qcow2.open(str(p), readonly=False) as img:
        img.write(1000, os.urandom(200000))
        img.write_zeroes(70000, 10000)
        img.write(9 * MiB, b"z" * 4096)
    return p


def _truncated(d: Path) -> Path:
    # a file shorter than its last cluster (image end offset past the file size)
    p = _create(d, "img.qcow2", 4 * MiB)
    _io(p, "write -P 1 0 65536")
    os.truncate(p, p.stat().st_size - 65536 + 8)
    return p


CLEAN: dict[str, Build] = {
    **{f"cs{cs}_rb{rb}": _layout(f"cluster_size={cs},refcount_bits={rb}",
                                 OPS[:4] if rb == 1 or cs == "2M" else OPS)
       for cs in ("512", "4k", "64k", "2M") for rb in (1, 16, 64)},
    **{f"rb{rb}": _layout(f"refcount_bits={rb}", OPS) for rb in (2, 4, 8, 32)},
    "extl2": _layout("extended_l2=on", [*OPS, "write -P 3 4096 2048"]),
    "extl2_2m": _layout("extended_l2=on,cluster_size=2M", [*OPS[:4], "write -P 3 4096 2048"]),
    "v2": _layout("compat=0.10", OPS),
    "lazy": _layout("lazy_refcounts=on", OPS),
    "prealloc_metadata": _layout("preallocation=metadata", ["write -P 1 0 70000"]),
    "prealloc_full": _layout("preallocation=full,cluster_size=4k", ["write -P 1 0 70000"]),
    "empty": _layout("", []),
    "snapshots": _snapshots,
    "snapshots_v2": _snapshots_v2,
    "bitmaps": _bitmaps,
    "converted_compressed": _converted,
    "zstd": _zstd,
    "data_file": _data_file,
    "overlay": _overlay,
    "truncated": _truncated,
    "ours": _ours,
    "ours_extl2": _ours_extl2,
}


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("check-clean")
    (root / "rand.bin").write_bytes(os.urandom(3 * MiB))
    yield root


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_images_same_json_and_text(name: str, clean_root: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = clean_root / name
    d.mkdir()
    p = CLEAN[name](d)
    want = _qemu_check(p, "--output=json")
    got = _our_check(p, "--output=json", capsys=capsys)
    assert got == want
    assert json.loads(got[0])["check-errors"] == 0
    assert _our_check(p, capsys=capsys) == _qemu_check(p)


# ----------------------------------------------------------------------------- corruptions
def _base(tmp: Path, opts: str = "", ops: tuple[str, ...] = ("write -P 1 0 128k",)) -> Path:
    d = tmp / "src"
    d.mkdir(exist_ok=True)
    p = _create(d, "img.qcow2", 64 * MiB, opts)
    qemu_io(p, *ops, fmt="qcow2")
    return p


def _leak_raise(tmp: Path) -> Path:
    p = _base(tmp)
    _set_refcount16(p, _data_cluster(p, 0), 2)
    return p


def _leak_extra(tmp: Path) -> Path:
    p = _base(tmp)
    size = p.stat().st_size
    os.truncate(p, size + 65536)
    _set_refcount16(p, size >> 16, 1)
    return p


def _refcount_zero(tmp: Path) -> Path:
    p = _base(tmp)
    _set_refcount16(p, _data_cluster(p, 1), 0)
    return p


def _refcount_zero_l2(tmp: Path) -> Path:
    p = _base(tmp)
    _set_refcount16(p, _u64(p, _l1_entry_offset(p, 0)) & L2E_OFFSET >> 16, 0)
    return p


def _refcount_low(tmp: Path) -> Path:
    # shared by a snapshot (reference 2) but refcount 1: too low, fixable without rebuild
    p = _base(tmp)
    qemu_img("snapshot", "-c", "s", p)
    _set_refcount16(p, _data_cluster(p, 0), 1)
    return p


def _copied_cleared(tmp: Path) -> Path:
    p = _base(tmp)
    off = _l2_entry_offset(p, 0, 0)
    _put(p, off, ">Q", _u64(p, off) & ~COPIED)
    return p


def _copied_l1_cleared(tmp: Path) -> Path:
    p = _base(tmp)
    off = _l1_entry_offset(p, 0)
    _put(p, off, ">Q", _u64(p, off) & ~COPIED)
    return p


def _copied_set_on_shared(tmp: Path) -> Path:
    p = _base(tmp)
    qemu_img("snapshot", "-c", "s", p)
    off = _l2_entry_offset(p, 0, 1)
    _put(p, off, ">Q", _u64(p, off) | COPIED)
    return p


def _unaligned_data(tmp: Path) -> Path:
    p = _base(tmp)
    off = _l2_entry_offset(p, 0, 1)
    _put(p, off, ">Q", _u64(p, off) + 0x200)
    return p


def _unaligned_prealloc_zero(tmp: Path) -> Path:
    p = _base(tmp, ops=("write -P 1 0 128k", "write -z 0 64k"))
    off = _l2_entry_offset(p, 0, 0)
    _put(p, off, ">Q", (_u64(p, off) | 1) + 0x200)   # a zero-alloc entry, unaligned
    return p


def _unaligned_l2_table(tmp: Path) -> Path:
    p = _base(tmp)
    off = _l1_entry_offset(p, 0)
    _put(p, off, ">Q", _u64(p, off) + 0x200)
    return p


def _past_eof(tmp: Path) -> Path:
    p = _base(tmp)
    _put(p, _l2_entry_offset(p, 0, 1), ">Q", COPIED | 0x1000000)
    return p


def _l2_reserved(tmp: Path) -> Path:
    p = _base(tmp)
    off = _l2_entry_offset(p, 0, 1)
    _put(p, off, ">Q", _u64(p, off) | 0x2)
    return p


def _l1_reserved(tmp: Path) -> Path:
    p = _base(tmp)
    off = _l1_entry_offset(p, 0)
    _put(p, off, ">Q", _u64(p, off) | 0x100)
    return p


def _compressed_copied(tmp: Path) -> Path:
    p = _base(tmp, ops=("write -c -P 3 0 64k", "write -c -P 4 64k 64k"))
    off = _l2_entry_offset(p, 0, 1)
    _put(p, off, ">Q", _u64(p, off) | COPIED)
    return p


def _reftable_reserved(tmp: Path) -> Path:
    p = _base(tmp)
    rt = _u64(p, 48)
    _put(p, rt, ">Q", _u64(p, rt) | 0x1)
    return p


def _refblock_outside(tmp: Path) -> Path:
    p = _base(tmp)
    rt = _u64(p, 48)
    _put(p, rt + 8, ">Q", 64 * MiB)   # refblock 1 far past EOF
    return p


def _refblock_refcount(tmp: Path) -> Path:
    # the L2 table entry points at the refblock: the refblock gets two references
    p = _base(tmp)
    _put(p, _l2_entry_offset(p, 0, 5), ">Q", _refblock0(p))
    return p


def _extl2_bitmap(tmp: Path) -> Path:
    p = _base(tmp, opts="extended_l2=on", ops=("write -P 1 0 128k",))
    _put(p, _l2_entry_offset(p, 0, 0, 16) + 8, ">Q", (1 << 32) | 1)
    _put(p, _l2_entry_offset(p, 0, 7, 16) + 8, ">Q", 1)   # unallocated with alloc bits
    return p


def _snapshot_l1_unaligned(tmp: Path) -> Path:
    p = _base(tmp)
    qemu_img("snapshot", "-c", "s", p)
    snap = _u64(p, 64)
    _put(p, snap, ">Q", _u64(p, snap) + 0x200)
    return p


def _snapshot_incomplete_extra(tmp: Path) -> Path:
    # a v3 snapshot entry with 8 bytes of extra data (16 required): -r all rewrites the table
    p = _base(tmp)
    qemu_img("snapshot", "-c", "snapA", p)
    so = _u64(p, 64)
    with open(p, "r+b") as f:
        f.seek(so)
        hdr = f.read(40)
        extra = struct.unpack_from(">I", hdr, 36)[0]
        id_size, name_size = struct.unpack_from(">HH", hdr, 12)
        f.seek(so + 40 + extra)
        strings = f.read(id_size + name_size)
        f.seek(so + 36)
        f.write(struct.pack(">I", 8))
        f.seek(so + 48)
        f.write(strings)
    return p


def _dirty_leaky(tmp: Path) -> Path:
    p = _leak_extra(tmp)
    _put(p, 72, ">Q", 1)
    return p


def _corrupt_bit_clean(tmp: Path) -> Path:
    p = _base(tmp)
    _put(p, 72, ">Q", 2)
    return p


def _lazy_abort(tmp: Path) -> Path:
    d = tmp / "src"
    d.mkdir(exist_ok=True)
    p = _create(d, "img.qcow2", 4 * MiB, "lazy_refcounts=on")
    qemu_io(p, "write -P 1 0 100000", fmt="qcow2")
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 200000 300000",
                        "-c", "write -z 1048576 65536", "-c", "abort", str(p)],
                       capture_output=True)
    assert r.returncode != 0
    assert p.read_bytes()[79] & 1
    return p


CORRUPT: dict[str, Callable[[Path], Path]] = {
    "leak_raise": _leak_raise,
    "leak_extra": _leak_extra,
    "refcount_zero": _refcount_zero,
    "refcount_zero_l2": _refcount_zero_l2,
    "refcount_low": _refcount_low,
    "copied_cleared": _copied_cleared,
    "copied_l1_cleared": _copied_l1_cleared,
    "copied_set_on_shared": _copied_set_on_shared,
    "unaligned_data": _unaligned_data,
    "unaligned_prealloc_zero": _unaligned_prealloc_zero,
    "unaligned_l2_table": _unaligned_l2_table,
    "past_eof": _past_eof,
    "l2_reserved": _l2_reserved,
    "l1_reserved": _l1_reserved,
    "compressed_copied": _compressed_copied,
    "reftable_reserved": _reftable_reserved,
    "refblock_outside": _refblock_outside,
    "refblock_refcount": _refblock_refcount,
    "extl2_bitmap": _extl2_bitmap,
    "snapshot_l1_unaligned": _snapshot_l1_unaligned,
    "snapshot_incomplete_extra": _snapshot_incomplete_extra,
    "dirty_leaky": _dirty_leaky,
    "corrupt_bit_clean": _corrupt_bit_clean,
    "lazy_abort": _lazy_abort,
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupted_same_report(name: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    src = CORRUPT[name](tmp_path)
    a, b = _twins(src, tmp_path)
    for args in (("--output=json",), ()):
        assert _our_check(b, *args, capsys=capsys) == _qemu_check(a, *args)
    assert a.read_bytes() == b.read_bytes()   # a plain check writes nothing


@pytest.mark.parametrize("repair", ["leaks", "all"])
@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_repair_same_as_qemu(name: str, repair: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    src = CORRUPT[name](tmp_path)
    try:
        before: bytes | None = qemu_raw(src, tmp_path)
    except AssertionError:   # QEMU cannot read it either (an unaligned entry, ...)
        before = None
    a, b = _twins(src, tmp_path)
    want = _qemu_check(a, "-r", repair, "--output=json")
    got = _our_check(b, "-r", repair, "--output=json", capsys=capsys)
    assert got == want
    qa, qb = a.read_bytes(), b.read_bytes()
    if qa != qb and want[2] == 1 and qa[79] & 1 == 0 and qb[79] & 1:
        # Deliberate difference: when the repair fails, qemu-img still clears the dirty bit
        # when it closes the image; we keep it, so that the next writable open repairs.
        qb = qb[:79] + bytes([qb[79] & ~1]) + qb[80:]
    assert qa == qb
    # the image as qemu-img sees it afterwards, and the guest data, are unchanged
    assert _qemu_check(b, "--output=json") == _qemu_check(a, "--output=json")
    if before is not None and want[2] != 1:
        assert qemu_raw(b, tmp_path) == before


def test_repair_all_makes_lazy_abort_clean(tmp_path: Path) -> None:
    src = _lazy_abort(tmp_path)
    before = qemu_raw(src, tmp_path)
    res = qcow2.check(str(src), repair="all")
    assert res.corruptions_fixed and res.clean
    assert qemu_img("check", src, check=False).returncode == 0
    assert qemu_raw(src, tmp_path) == before
    assert not src.read_bytes()[79] & 1


# ----------------------------------------------------------------------------- dirty open
def test_writable_open_of_dirty_image_repairs_first(tmp_path: Path) -> None:
    src = _lazy_abort(tmp_path)
    before = qemu_raw(src, tmp_path)
    assert qemu_img("check", src, check=False).returncode == 2
    with qcow2.open(str(src), readonly=False) as img:
        assert not img.dirty
        assert img.read(200000, 300000) == before[200000:500000]
        img.write(3 * MiB, b"\x09" * 70000)
    assert qemu_img("check", src, check=False).returncode == 0
    after = qemu_raw(src, tmp_path)
    assert after[:3 * MiB] == before[:3 * MiB]
    assert after[3 * MiB:3 * MiB + 70000] == b"\x09" * 70000


def test_writable_open_of_dirty_leaky_image(tmp_path: Path) -> None:
    src = _dirty_leaky(tmp_path)
    with qcow2.open(str(src), readonly=False) as img:
        assert img.repair_result is not None  # type: ignore[attr-defined]
        assert img.repair_result.leaks_fixed == 1  # type: ignore[attr-defined]
    assert qemu_img("check", src, check=False).returncode == 0


def test_writable_open_of_dirty_image_qemu_cannot_repair_fails(tmp_path: Path) -> None:
    p = _base(tmp_path)
    # a snapshot table too large to read: check errors, as "Could not repair dirty image"
    _put(p, 60, ">IQ", 70000, 65536)
    _put(p, 72, ">Q", 1)
    r = subprocess.run(["qemu-io", "-c", "read 0 512", str(p)], capture_output=True, text=True)
    with pytest.raises(qcow2.Qcow2Error):
        qcow2.open(str(p), readonly=False)
    assert "repair" in (r.stderr + r.stdout).lower() or r.returncode != 0


def test_our_lazy_writer_image_is_clean_after_close(tmp_path: Path) -> None:
    p = tmp_path / "lazy.qcow2"
    qcow2.create(str(p), 8 * MiB, lazy_refcounts=True)
    img = qcow2.open(str(p), readonly=False)
    img.write(0, b"a" * 300000)
    img.flush()
    # dirty but not closed: what a crash leaves; QEMU and we agree on the check
    a, b = _twins(p, tmp_path)
    ours = qcow2.check(str(b)).to_qapi()
    ours["filename"] = a.name
    assert ours == json.loads(
        qemu_img("check", "--output=json", a.name, check=False, cwd=a.parent).stdout)
    img.close()
    assert qemu_img("check", p, check=False).returncode == 0
