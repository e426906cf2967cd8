"""Random write workloads on images qemu-img creates: afterwards qemu-img check finds no
corruption and no leak, and qemu-img compare says the image equals the bytearray model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qcow2.engine.writer import WritableQcow2Image
from qcow2.io import FileStore
from tests.conftest import qemu_img, qemu_io

pytestmark = pytest.mark.oracle

SIZE = 8 << 20

VARIANTS = {
    "default": ["-o", "cluster_size=65536"],
    "v2": ["-o", "compat=0.10"],
    "c512": ["-o", "cluster_size=512"],
    "c4k-rc1": ["-o", "cluster_size=4096,refcount_bits=1"],
    "c2m": ["-o", "cluster_size=2M"],
    "rc64": ["-o", "refcount_bits=64"],
    "extl2": ["-o", "extended_l2=on,cluster_size=65536"],
    "extl2-c16k": ["-o", "extended_l2=on,cluster_size=16384"],
}


def _prefill(path: Path, model: bytearray, rnd: random.Random, with_backing: bool) -> None:
    """Some data, zero clusters and compressed clusters written by QEMU itself."""
    cmds = []
    for _ in range(6):
        off = rnd.randrange(0, SIZE - 200000)
        n = rnd.randrange(1, 200000)
        pat = rnd.randrange(1, 255)
        cmds.append(f"write -P {pat} {off} {n}")
        model[off:off + n] = bytes([pat]) * n
    qemu_io(path, *cmds)


def _workload(img: WritableQcow2Image, model: bytearray, rnd: random.Random, n: int) -> None:
    cs = img.cluster_size
    for i in range(n):
        kind = rnd.random()
        if kind < 0.3:
            off = rnd.randrange(0, SIZE)
            length = rnd.randrange(1, min(3 * cs + 777, SIZE - off) + 1)
        elif kind < 0.6:
            off = rnd.randrange(0, SIZE // cs) * cs
            length = min(cs * rnd.randrange(1, 5), SIZE - off)
        else:
            off = rnd.randrange(0, SIZE - 600)
            length = rnd.randrange(1, 600)
        op = rnd.random()
        if op < 0.15:
            img.write_zeroes(off, length, unmap=rnd.random() < 0.5)
            model[off:off + length] = bytes(length)
        elif op < 0.25:
            img.discard(off, length)
            lo = -(-off // cs) * cs
            hi = (off + length) // cs * cs if off + length < SIZE else SIZE
            if lo < hi and not (img.header.version < 3 and img.backing is not None):
                model[lo:hi] = bytes(hi - lo)
        else:
            data = rnd.randbytes(length) if rnd.random() < 0.5 else bytes([i % 251 + 1]) * length
            img.write(off, data)
            model[off:off + length] = data
        if rnd.random() < 0.1:
            img.flush()
        if rnd.random() < 0.2:
            o2 = rnd.randrange(0, SIZE - 5000)
            assert img.read(o2, 5000) == bytes(model[o2:o2 + 5000])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backing", [False, True], ids=["standalone", "backed"])
def test_random_writes_check_clean_and_equal_model(tmp_path: Path, variant: str,
                                                   backing: bool) -> None:
    rnd = random.Random(f"{variant}-{backing}")
    model = bytearray(SIZE)
    p = tmp_path / "img.qcow2"
    if backing:
        base = tmp_path / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
        _prefill(base, model, rnd, False)
        qemu_img("create", "-q", "-f", "qcow2", *VARIANTS[variant], "-b", "base.qcow2",
                 "-F", "qcow2", p, str(SIZE))
    else:
        qemu_img("create", "-q", "-f", "qcow2", *VARIANTS[variant], p, str(SIZE))
    cs = {"c512": 512, "c4k-rc1": 4096, "c2m": 2 << 20, "extl2-c16k": 16384}.get(variant, 65536)
    ccl = (SIZE // cs) // 2 * cs
    qemu_io(p, f"write -c -P 7 {ccl} {cs}")
    model[ccl:ccl + cs] = b"\x07" * cs
    if variant != "v2":
        zoff = cs * 3 if cs < SIZE // 4 else 0
        qemu_io(p, f"write -z {zoff} {cs}")
        model[zoff:zoff + cs] = bytes(cs)
    _prefill(p, model, rnd, backing)
    from qcow2.engine.open import open_image

    backing_dev = open_image(str(tmp_path / "base.qcow2")) if backing else None
    img = WritableQcow2Image(FileStore(str(p), writable=True), str(p))
    img.backing = backing_dev
    _workload(img, model, rnd, 150)
    assert img.read(0, SIZE) == bytes(model)
    img.close()
    r = qemu_img("check", "--output=json", p, check=False)
    res = json.loads(r.stdout)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "corruptions" not in res and "leaks" not in res
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    c = qemu_img("compare", "-f", "qcow2", "-F", "raw", p, raw, check=False)
    assert c.returncode == 0, c.stdout + c.stderr


QEMU_IO_VARIANTS = ["default", "v2", "c4k-rc1", "extl2"]


def _script(rnd: random.Random, cs: int, n: int) -> list[str]:
    cmds = []
    for i in range(n):
        op = rnd.random()
        if rnd.random() < 0.5:
            off = rnd.randrange(0, SIZE // cs) * cs
            length = min(cs * rnd.randrange(1, 4), SIZE - off)
        else:
            off = rnd.randrange(0, SIZE - 3 * cs) // 512 * 512
            length = rnd.randrange(1, 3 * cs // 512) * 512
        if op < 0.2:
            cmds.append(f"write -z {'-u ' if rnd.random() < 0.5 else ''}{off} {length}")
        elif op < 0.35:
            cmds.append(f"discard {off} {length}")
        else:
            cmds.append(f"write -P {i % 250 + 1} {off} {length}")
    return cmds


def _apply(img: WritableQcow2Image, cmd: str) -> None:
    parts = cmd.split()
    off, length = int(parts[-2]), int(parts[-1])
    if parts[0] == "discard":
        img.discard(off, length)
    elif parts[1] == "-z":
        img.write_zeroes(off, length, unmap="-u" in parts)
    else:
        img.write(off, bytes([int(parts[2])]) * length)


def _map_kinds(path: Path) -> list[dict[str, object]]:
    # Host offsets (and so the splits between host-discontiguous runs) may differ.
    out: list[dict[str, object]] = []
    for e in json.loads(qemu_img("map", "--output=json", path).stdout):
        e.pop("offset", None)
        if out and all(out[-1][k] == e[k] for k in ("depth", "present", "zero", "data")):
            out[-1]["length"] = int(str(out[-1]["length"])) + e["length"]
        else:
            out.append(e)
    return out


@pytest.mark.parametrize("variant", QEMU_IO_VARIANTS)
@pytest.mark.parametrize("backing", [False, True], ids=["standalone", "backed"])
def test_same_script_as_qemu_io_gives_same_image(tmp_path: Path, variant: str,
                                                 backing: bool) -> None:
    """The same write/zero/discard script through qemu-io and through our engine: equal
    content and the same allocation map (kinds of every range, depth, present)."""
    rnd = random.Random(f"io-{variant}-{backing}")
    cs = {"c4k-rc1": 4096}.get(variant, 65536)
    base = tmp_path / "base.qcow2"
    if backing:
        qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
        qemu_io(base, "write -P 0x42 0 3M", "write -P 0x43 5M 2M")
    paths = []
    for name in ("qemu.qcow2", "ours.qcow2"):
        p = tmp_path / name
        extra = ["-b", "base.qcow2", "-F", "qcow2"] if backing else []
        qemu_img("create", "-q", "-f", "qcow2", *VARIANTS[variant], *extra, p, str(SIZE))
        qemu_io(p, "write -P 9 0 1M", f"write -P 8 {4 << 20} 300k")
        paths.append(p)
    cmds = _script(rnd, cs, 60)
    qemu_io(paths[0], *cmds)
    from qcow2.engine.open import open_image

    img = WritableQcow2Image(FileStore(str(paths[1]), writable=True), str(paths[1]))
    img.backing = open_image(str(base)) if backing else None
    for c in cmds:
        _apply(img, c)
    img.close()
    r = qemu_img("check", "--output=json", paths[1], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    c = qemu_img("compare", paths[0], paths[1], check=False)
    assert c.returncode == 0, c.stdout
    assert _map_kinds(paths[1]) == _map_kinds(paths[0])
