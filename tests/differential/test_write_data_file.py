"""Writes to images with an external data file (guest offset == host offset in the data
file, no refcounts for data) and with data_file_raw (the data file stays a valid raw image)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import qcow2
from tests.conftest import qemu_img, qemu_io

pytestmark = pytest.mark.oracle

SIZE = 8 << 20


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_workload_on_data_file_image(tmp_path: Path, raw: bool,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # QEMU resolves relative data file names from the cwd
    opts = "data_file=img.data" + (",data_file_raw=on" if raw else "")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", str(SIZE))
    qemu_io("img.qcow2", "write -P 3 100k 300k")
    model = bytearray(SIZE)
    model[100 * 1024:400 * 1024] = b"\x03" * (300 * 1024)
    rnd = random.Random(raw)
    with qcow2.open("img.qcow2", readonly=False, backing_policy="follow") as img:
        for i in range(80):
            off = rnd.randrange(0, SIZE - 200000)
            n = rnd.randrange(1, 200000)
            op = rnd.random()
            if op < 0.2:
                img.write_zeroes(off, n, unmap=rnd.random() < 0.5)
                model[off:off + n] = bytes(n)
            else:
                img.write(off, bytes([i + 1]) * n)
                model[off:off + n] = bytes([i + 1]) * n
        assert img.read(0, SIZE) == bytes(model)
    r = qemu_img("check", "--output=json", "img.qcow2", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert "leaks" not in res and "corruptions" not in res
    Path("model.raw").write_bytes(bytes(model))
    c = qemu_img("compare", "-f", "qcow2", "-F", "raw", "img.qcow2", "model.raw", check=False)
    assert c.returncode == 0, c.stdout
    if raw:
        # data_file_raw: the data file itself reads like the guest.
        assert Path("img.data").read_bytes()[:SIZE].ljust(SIZE, b"\0") == bytes(model)
