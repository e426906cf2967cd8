"""Internal snapshots against qemu-img 7.2, in both directions.

- The same sequence of snapshot operations (qemu-img snapshot on one copy, our API on the
  other, guest writes by qemu-io on both) gives files whose allocated clusters are byte for
  byte the same (dates masked) and `qemu-img check` stays clean after every step.
- Snapshots we create, with our own interleaved writes, hold exactly what a bytearray model
  says (`qemu-img convert -l ID`), and qemu-img lists, applies and deletes them cleanly;
  snapshots qemu-img creates are applied and deleted by us.
- `qcow2 snapshot` prints what `qemu-img snapshot` prints, errors and exit statuses included.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import qcow2
from qcow2.engine.image import Qcow2Image
from qcow2.engine.writer import WritableQcow2Image
from qcow2.io import FileStore
from tests.conftest import qemu_img, qemu_io, qemu_json, qemu_raw

pytestmark = pytest.mark.oracle

MiB = 1 << 20
OURS = [sys.executable, "-m", "qcow2"]
OPTS = ["compat=1.1", "compat=0.10", "cluster_size=512", "cluster_size=2097152",
        "refcount_bits=64", "extended_l2=on", "backing"]


def _create(path: Path, opts: str, size: str = "4M") -> None:
    if opts == "backing":
        base = path.with_name(path.name + ".base")
        qemu_img("create", "-q", "-f", "qcow2", base, size)
        qemu_io(base, "write -P 0x77 0 4M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", path, size)
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, size)


def _open(path: Path) -> WritableQcow2Image:
    img = qcow2.open(str(path), readonly=False, backing_policy="follow")
    assert isinstance(img, WritableQcow2Image)
    return img


def _check_clean(path: Path) -> None:
    r = qemu_img("check", "--output=json", path, check=False)
    res = json.loads(r.stdout)
    assert r.returncode == 0 and not res.get("leaks") and not res.get("corruptions"), \
        (r.stdout, r.stderr)


def _allocated_bytes(path: Path) -> bytes:
    """The file with snapshot dates zeroed and every cluster with refcount 0 blanked: QEMU
    leaves freed clusters as they were, we punch them (so a table written over a freed one
    leaves zeros, not stale bytes, after its end)."""
    data = bytearray(path.read_bytes())
    n, off = struct.unpack(">IQ", data[60:72])
    pos = off
    for _ in range(n):
        pos = (pos + 7) & ~7
        data[pos + 16:pos + 24] = bytes(8)
        ids, names = struct.unpack(">HH", data[pos + 12:pos + 16])
        (extra,) = struct.unpack(">I", data[pos + 36:pos + 40])
        pos += 40 + extra + ids + names
    with Qcow2Image(FileStore(str(path)), str(path)) as img:
        cs = img.cluster_size
        if n:  # the rest of the table's last cluster: stale bytes in QEMU's files
            data[pos:-(-pos // cs) * cs] = bytes(len(data[pos:-(-pos // cs) * cs]))
        for ci in range(-(-len(data) // cs)):
            if not img.get_refcount(ci):
                data[ci * cs:(ci + 1) * cs] = bytes(len(data[ci * cs:(ci + 1) * cs]))
    return bytes(data)


def _info_snapshots(path: Path) -> list[dict[str, Any]]:
    sns = qemu_json("info", "--output=json", "-U", path).get("snapshots", [])
    for s in sns:
        s.pop("date-sec")
        s.pop("date-nsec")
    return list(sns)


STEPS: list[tuple[str, str]] = [
    ("c", "s1"), ("w", "write -P 2 64k 128k"), ("c", "s2"), ("w", "write -P 3 0 4k"),
    ("c", "s1"), ("w", "write -z 1M 64k"), ("a", "s1"), ("w", "write -P 4 2M 4k"),
    ("c", ""), ("d", "s2"), ("a", "4"), ("w", "write -P 5 3M 8k"), ("d", "s1"),
    ("a", "3"), ("d", "s1"), ("d", ""),
]


@pytest.mark.parametrize("opts", OPTS)
def test_same_operations_same_file(tmp_path: Path, opts: str) -> None:
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    _create(q, opts)
    qemu_io(q, "write -P 1 0 128k", "write -P 9 3M 64k")
    shutil.copy(q, o)
    for kind, arg in STEPS:
        if kind == "w":
            qemu_io(q, arg)
            qemu_io(o, arg)
            continue
        rq = qemu_img("snapshot", f"-{kind}", arg, q, check=False)
        with _open(o) as img:
            if kind == "c":
                img.create_snapshot(arg)
            elif kind == "a":
                img.apply_snapshot(arg)
            else:
                img.delete_snapshot(name=arg)
        assert rq.returncode == 0, rq.stderr
        _check_clean(o)
        assert _info_snapshots(o) == _info_snapshots(q), (kind, arg)
        ao, aq = _allocated_bytes(o), _allocated_bytes(q)
        assert ao == aq, (kind, arg, _debug_diff(ao, aq))
        assert qemu_img("compare", "-U", q, o, check=False).returncode == 0


def _model_check(path: Path, tmp: Path, active: bytes, snaps: dict[str, bytes]) -> None:
    assert qemu_raw(path, tmp) == active
    for sid, content in snaps.items():
        assert qemu_raw(path, tmp, "-l", f"snapshot.id={sid}") == content, sid


@pytest.mark.parametrize("opts", OPTS)
def test_interleaved_writes_match_model(tmp_path: Path, opts: str) -> None:
    size = 16 * MiB if "2097152" in opts else 4 * MiB
    p = tmp_path / "img.qcow2"
    _create(p, opts, str(size))
    model = bytearray(b"\x77" * size if opts == "backing" else bytes(size))
    snaps: dict[str, bytes] = {}
    rnd = random.Random(opts)
    img = _open(p)
    cs = img.cluster_size
    for step in range(14):
        for _ in range(4):
            off = rnd.randrange(0, size - 3 * cs)
            n = rnd.choice([rnd.randrange(1, 5000), cs, 2 * cs + 17])
            if rnd.random() < 0.2:
                img.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                data = bytes([rnd.randrange(1, 256)]) * n
                img.write(off, data)
                model[off:off + n] = data
        r = rnd.random()
        if r < 0.45 or not snaps:
            sn = img.create_snapshot(f"snap{step}")
            snaps[sn.id_str] = bytes(model)
        elif r < 0.75:
            sid = rnd.choice(sorted(snaps))
            img.apply_snapshot(sid)
            model[:] = snaps[sid]
        else:
            sid = rnd.choice(sorted(snaps))
            img.delete_snapshot(snapshot_id=sid)
            del snaps[sid]
        img.flush()
        _check_clean(p)
    img.close()
    _model_check(p, tmp_path, bytes(model), snaps)
    assert [s["id"] for s in _info_snapshots(p)] == list(snaps)
    # qemu-img takes over: it applies and deletes what we created.
    for sid in list(snaps):
        qemu_img("snapshot", "-a", sid, p)
        model[:] = snaps[sid]
        _check_clean(p)
        _model_check(p, tmp_path, bytes(model), snaps)
        name = next(s["name"] for s in _info_snapshots(p) if s["id"] == sid)
        qemu_img("snapshot", "-d", name, p)
        del snaps[sid]
        _check_clean(p)
    _model_check(p, tmp_path, bytes(model), snaps)


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on"])
def test_we_apply_and_delete_qemu_snapshots(tmp_path: Path, opts: str) -> None:
    p = tmp_path / "img.qcow2"
    _create(p, opts)
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "a", p)
    qemu_io(p, "write -P 2 512k 1M", "write -c -P 3 2M 64k")
    qemu_img("snapshot", "-c", "b", p)
    qemu_io(p, "write -P 4 0 64k", "discard 2M 64k")
    want_a = qemu_raw(p, tmp_path, "-l", "a")
    want_b = qemu_raw(p, tmp_path, "-l", "b")
    with _open(p) as img:
        assert [s.name for s in img.list_snapshots()] == ["a", "b"]
        img.apply_snapshot("a")
        img.write(4096, b"x" * 100)
    _check_clean(p)
    cur = bytearray(want_a)
    cur[4096:4196] = b"x" * 100
    _model_check(p, tmp_path, bytes(cur), {"1": want_a, "2": want_b})
    with _open(p) as img:
        img.delete_snapshot("a")
        img.apply_snapshot("b")
    _check_clean(p)
    _model_check(p, tmp_path, want_b, {"2": want_b})
    with _open(p) as img:
        img.delete_snapshot("2")
    _check_clean(p)
    assert qemu_raw(p, tmp_path) == want_b
    assert _info_snapshots(p) == []


def test_apply_restores_disk_size(tmp_path: Path) -> None:
    p = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "4M")
    qemu_io(p, "write -P 1 0 4M")
    with _open(p) as img:
        img.create_snapshot("small")
        img.resize(8 * MiB)
        img.write(6 * MiB, b"y" * 4096)
        img.create_snapshot("big")
        img.apply_snapshot("small")
        assert img.virtual_size == 4 * MiB
    _check_clean(p)
    assert qemu_json("info", "--output=json", p)["virtual-size"] == 4 * MiB
    with _open(p) as img:
        img.apply_snapshot("big")
        assert img.read(6 * MiB, 4096) == b"y" * 4096
    _check_clean(p)
    assert qemu_json("info", "--output=json", p)["virtual-size"] == 8 * MiB


def test_refcount_bits_1_refuses_like_qemu(tmp_path: Path) -> None:
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", q, "1M")
    qemu_io(q, "write 0 64k")
    shutil.copy(q, o)
    rq = qemu_img("snapshot", "-c", "s", q, check=False)
    ro = subprocess.run([*OURS, "snapshot", "-c", "s", str(o)], capture_output=True, text=True)
    assert (ro.returncode, ro.stderr.replace("qcow2:", "qemu-img:")) == (rq.returncode, rq.stderr)
    assert rq.stderr == "qemu-img: Could not create snapshot 's': -22 (Invalid argument)\n"
    # QEMU leaks the L1 copy it allocated before the refcount overflow; we refuse first.
    _check_clean(o)


def _craft_vm_state(path: Path) -> int:
    """A snapshot with a VM state area as savevm leaves it: 512-byte clusters put the state
    at the first L1 entry past a 64 KiB disk (guest offset 64 KiB). The image is made 128 KiB,
    the state written there, snapshotted, then the disk and the snapshot shrunk to 64 KiB."""
    vm_size = 10240
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "128K")
    qemu_io(path, "write -P 1 0 16k", f"write -P 0x5e 64k {vm_size}")
    qemu_img("snapshot", "-c", "vm", path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">Q", data, 24, 64 << 10)
    n, off = struct.unpack(">IQ", data[60:72])
    assert n == 1
    struct.pack_into(">I", data, off + 32, vm_size)
    struct.pack_into(">QQ", data, off + 40, vm_size, 64 << 10)
    path.write_bytes(bytes(data))
    _check_clean(path)
    return vm_size


def test_vm_state_listed_and_freed(tmp_path: Path) -> None:
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    vm_size = _craft_vm_state(q)
    shutil.copy(q, o)
    assert _info_snapshots(q)[0]["vm-state-size"] == vm_size
    lq = qemu_img("snapshot", "-l", q).stdout
    lo = subprocess.run([*OURS, "snapshot", "-l", str(o)], capture_output=True, text=True)
    assert lo.stdout == lq and "10 KiB" in lq
    qemu_img("snapshot", "-c", "second", q)
    with _open(o) as img:
        img.create_snapshot("second")  # the VM state entry is rewritten as it was
        assert img.list_snapshots()[0].effective_vm_state_size == vm_size
    _check_clean(o)
    assert _info_snapshots(o) == _info_snapshots(q)
    assert _allocated_bytes(o) == _allocated_bytes(q)
    qemu_img("snapshot", "-d", "second", q)
    # One open per command, as qemu-img: the header's offset of an empty table is where the
    # process's free-cluster search stands.
    with _open(o) as img:
        img.delete_snapshot(name="second")
    with _open(o) as img:
        img.delete_snapshot(name="vm")
    qemu_img("snapshot", "-d", "vm", q)
    _check_clean(o)
    assert _allocated_bytes(o) == _allocated_bytes(q)


def test_unknown_extra_data_preserved(tmp_path: Path) -> None:
    p = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    qemu_img("snapshot", "-c", "old", p)
    # Rewrite the table with 40 bytes of extra data (16 unknown) at the end of the file.
    data = bytearray(p.read_bytes())
    n, off = struct.unpack(">IQ", data[60:72])
    entry = bytes(data[off:off + 40 + 24 + 1 + 3])
    extra_unknown = bytes(range(1, 17))
    new = bytearray(entry[:40]) + entry[40:64] + extra_unknown + entry[64:]
    struct.pack_into(">I", new, 36, 40)
    table_off = -(-len(data) // 65536) * 65536
    data += bytes(table_off - len(data)) + new
    struct.pack_into(">IQ", data, 60, 1, table_off)
    p.write_bytes(bytes(data))
    qemu_img("check", "-q", "-r", "all", p, check=False)  # refcounts for the moved table
    with _open(p) as img:
        img.create_snapshot("new")
    _check_clean(p)
    data = p.read_bytes()
    n, off = struct.unpack(">IQ", data[60:72])
    assert n == 2
    assert struct.unpack(">I", data[off + 36:off + 40])[0] == 40
    assert data[off + 64:off + 80] == extra_unknown
    assert [s["name"] for s in _info_snapshots(p)] == ["old", "new"]


# ----------------------------------------------------------------------------- CLI
def _run_both(q: Path, o: Path, args: list[str]) -> None:
    rq = qemu_img("snapshot", *args, q, check=False)
    ro = subprocess.run([*OURS, "snapshot", *args, str(o)], capture_output=True, text=True)
    date = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

    def norm(text: str, path: Path) -> str:
        return date.sub("DATE", text.replace(str(path), "FILE"))

    assert ro.returncode == rq.returncode, (args, ro.stderr, rq.stderr)
    assert norm(ro.stdout, o) == norm(rq.stdout, q), args
    assert norm(ro.stderr, o).replace("qcow2", "qemu-img") == norm(rq.stderr, q), args


@pytest.mark.parametrize("fmt", ["qcow2", "qcow2-v2", "qcow", "raw"])
def test_cli_matches_qemu_img(tmp_path: Path, fmt: str) -> None:
    q, o = tmp_path / "q.img", tmp_path / "o.img"
    if fmt == "qcow2-v2":
        qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", q, "1M")
    else:
        qemu_img("create", "-q", "-f", fmt, q, "1M")
    shutil.copy(q, o)
    long_name = "n" * 300
    for args in (["-l"], ["-c", "s1"], ["-c", "s1"], ["-c", ""], ["-c", "a_long_name_over_16"],
                 ["-c", "ünï"], ["-c", long_name], ["-l"], ["-a", "nope"], ["-d", "nope"],
                 ["-d", "3"], ["-a", "3"], ["-a", "s1"], ["-d", "s1"], ["-l"],
                 ["-d", "n" * 255], ["-l"], ["-l", "-c", "x"], ["-c", "x", "-a", "y"], [],
                 ["-x"], ["-c"], ["-U", "-c", "x"], ["-U", "-l"], ["-q", "-c", "q"], ["-l"]):
        _run_both(q, o, args)
    if fmt.startswith("qcow2"):
        _check_clean(o)


def test_cli_missing_file_and_bitmaps(tmp_path: Path) -> None:
    _run_both(tmp_path / "nofile.qcow2", tmp_path / "nofile.qcow2", ["-l"])
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", q, "1M")
    qemu_img("snapshot", "-c", "s", q)
    qemu_img("bitmap", "--add", q, "b0")
    shutil.copy(q, o)
    _run_both(q, o, ["-a", "s"])


def test_cli_data_file(tmp_path: Path) -> None:
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=q.raw", q, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=o.raw", o, "1M")
    for args in (["-c", "s"], ["-l"], ["-a", "s"], ["-d", "s"]):
        _run_both(q, o, args)


def _debug_diff(a: bytes, b: bytes) -> list[int]:
    """The first differing offsets, then both lengths (for assertion messages)."""
    return [*[i for i in range(min(len(a), len(b))) if a[i] != b[i]][:10], len(a), len(b)]
