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
