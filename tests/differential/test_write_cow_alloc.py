"""Zero copy-on-write pieces past the end of the file are allocated, not written.

QEMU zeroes the COW regions of a fresh cluster with an efficient write-zeroes; we reserve
them with posix_fallocate. Either way the file holds the space (so `map`'s preallocation
heuristics see what they see on QEMU's files), reads are zeros, and check is clean.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import qcow2
from qcow2.engine.writer import WritableQcow2Image
from tests.conftest import qemu_img

pytestmark = pytest.mark.oracle

CS = 65536


class _CountingWrites:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written = 0
        self.allocated = 0

    def pwrite(self, offset: int, data: Any) -> None:
        self.written += len(data)
        self.inner.pwrite(offset, data)

    def allocate(self, offset: int, length: int) -> bool:
        ok = bool(self.inner.allocate(offset, length))
        self.allocated += length if ok else 0
        return ok

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("backing", [False, True])
def test_small_allocating_writes_reserve_zero_tails(tmp_path: Path, backing: bool) -> None:
    p = tmp_path / "img.qcow2"
    if backing:
        b = tmp_path / "base.raw"
        b.write_bytes(os.urandom(64 * CS))
        qemu_img("create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", p)
    else:
        qemu_img("create", "-q", "-f", "qcow2", p, str(64 * CS))
    model = bytearray(b.read_bytes() if backing else bytes(64 * CS))
    with qcow2.open(str(p), readonly=False, backing_policy="follow") as img:
        assert isinstance(img, WritableQcow2Image)
        counting = _CountingWrites(img.data_store)
        img.data_store = counting
        for i in range(16):
            off = i * 3 * CS + (i % 4) * 4096
            img.write(off, b"\x5a" * 4096)
            model[off:off + 4096] = b"\x5a" * 4096
        img.data_store = counting.inner
        img.flush()
    if backing:
        # COW from a backing file copies real data: nothing may be skipped
        assert counting.allocated == 0
        assert counting.written == 16 * CS
    else:
        # fresh clusters at the end of the file: heads and tails are both reserved
        assert counting.written == 16 * 4096
        assert counting.allocated == 16 * (CS - 4096)
    assert qemu_img("check", p).returncode == 0
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", p, out)
    assert out.read_bytes() == bytes(model)
    # the reserved tails occupy space, as QEMU's zeroed COW regions do
    assert os.stat(p).st_blocks * 512 >= 16 * CS


def test_reused_cluster_gets_real_zeros(tmp_path: Path) -> None:
    # A freed cluster inside the file holds old data: its COW zeros must be written.
    p = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, str(8 * CS))
    with qcow2.open(str(p), readonly=False) as img:
        img.write(0, b"\x11" * CS)
        img.write(CS, b"\x22" * CS)
        img.flush()
        img.discard(0, CS)
        img.flush()
        img.write(2 * CS + 100, b"\x33" * 10)   # reuses the freed cluster
        img.flush()
        assert img.read(2 * CS, CS) == bytes(100) + b"\x33" * 10 + bytes(CS - 110)
    assert qemu_img("check", p).returncode == 0
