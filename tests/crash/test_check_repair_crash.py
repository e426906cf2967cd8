"""Crash safety of `check -r all`: replay every prefix of a repair's write log (and partial,
reordered persistence of the last unflushed batch). Every crashed state must read the same
guest data as before the repair, and a new repair must still make it clean."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import pytest

from qcow2.engine.check import check_store
from qcow2.engine.image import Qcow2Image
from qcow2.io import MemoryStore
from tests.conftest import qemu_img, qemu_io
from tests.crash.test_crash_replay import RecordingStore, _apply

pytestmark = pytest.mark.oracle

SIZE = 4 << 20


def _read(data: bytes) -> bytes:
    with Qcow2Image(MemoryStore(data), "m") as img:   # type: ignore[arg-type]
        return img.read(0, SIZE)


def _lazy_abort(tmp: Path) -> bytes:
    p = tmp / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", p,
             str(SIZE))
    qemu_io(p, "write -P 1 0 100000", fmt="qcow2")
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 200000 300000",
                        "-c", "write -z 1048576 65536", "-c", "abort", str(p)],
                       capture_output=True)
    assert r.returncode != 0
    return p.read_bytes()


def _leak_and_copied(tmp: Path) -> bytes:
    p = tmp / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, str(SIZE))
    qemu_io(p, "write -P 1 0 300k", fmt="qcow2")
    raw = bytearray(p.read_bytes())
    rt = struct.unpack_from(">Q", raw, 48)[0]
    rb = struct.unpack_from(">Q", raw, rt)[0]
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    data0 = (struct.unpack_from(">Q", raw, l2)[0] & 0x00FFFFFFFFFFFE00) >> 16
    struct.pack_into(">H", raw, rb + 2 * data0, 2)                     # leak + COPIED
    e1 = struct.unpack_from(">Q", raw, l2 + 8)[0]
    struct.pack_into(">Q", raw, l2 + 8, e1 & ~(1 << 63))              # COPIED cleared
    raw += bytes(65536)
    struct.pack_into(">H", raw, rb + 2 * (len(raw) // 65536 - 1), 1)  # leaked cluster
    return bytes(raw)


@pytest.mark.parametrize("make", [_lazy_abort, _leak_and_copied])
def test_every_prefix_of_a_repair_is_safe(make: object, tmp_path: Path) -> None:
    assert callable(make)
    base: bytes = make(tmp_path)
    want = _read(base)
    store = RecordingStore(base, "rec")
    res = check_store(store, "rec", "all")   # type: ignore[arg-type]
    assert res.failure is None and (res.corruptions_fixed or res.leaks_fixed)
    log = store.log
    assert log
    rnd = random.Random(len(log))
    out = tmp_path / "crash.qcow2"
    for cut in range(len(log) + 1):
        last_flush = max(i for i in range(cut + 1) if i == 0 or log[i - 1][0] == "f")
        batch = log[last_flush:cut]
        keep = [op for op in batch if rnd.random() < 0.5]
        rnd.shuffle(keep)
        for ops in (log[:cut], log[:last_flush] + keep):
            state = _apply(base, ops)
            assert _read(state) == want, cut
            again = MemoryStore(state)
            fixed = check_store(again, "x", "all")   # type: ignore[arg-type]
            assert fixed.failure is None, (cut, fixed.messages)
            final = check_store(again, "x")   # type: ignore[arg-type]
            assert final.clean, (cut, [m.text for m in final.messages])
            assert _read(bytes(again.buf)) == want
            if cut % 7 == 0 or cut == len(log):
                out.write_bytes(bytes(again.buf))
                assert qemu_img("check", out, check=False).returncode == 0, cut
