"""WritableQcowImage in memory: QEMU's append-only layout, the crash-safe write order (spec §2),
and that a crash after any prefix of the write log leaves every cluster old or new."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from qcow2.engine.qcow1 import QcowImage, WritableQcowImage
from qcow2.engine.raw import RawImage
from qcow2.errors import OutOfRangeError, ReadOnlyImageError
from qcow2.io import MemoryStore

HDR = struct.Struct(">IIQIIQBBHIQ")
MAGIC = 0x514649FB
Op = tuple[str, int, bytes]


class LogStore(MemoryStore):
    """A MemoryStore that records every mutation and flush."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.log: list[Op] = []

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.log.append(("pwrite", offset, bytes(data)))
        super().pwrite(offset, data)

    def truncate(self, size: int) -> None:
        self.log.append(("truncate", size, b""))
        super().truncate(size)

    def flush(self) -> None:
        self.log.append(("flush", 0, b""))


def new_image(size: int, cbits: int = 12, l2bits: int = 9) -> bytes:
    """What `qemu-img create -f qcow` writes: header, then the L1 as zeroed sectors."""
    shift = cbits + l2bits
    l1 = (size + (1 << shift) - 1) >> shift
    hdr = HDR.pack(MAGIC, 1, 0, 0, 0, size, cbits, l2bits, 0, 0, 48)
    return hdr + bytes((l1 * 8 + 511) & ~511)


def replay(base: bytes, ops: list[Op]) -> bytes:
    s = MemoryStore(base)
    for kind, off, data in ops:
        if kind == "pwrite":
            s.pwrite(off, data)
        elif kind == "truncate":
            s.truncate(off)
    return bytes(s.buf)


def test_first_write_order_and_layout() -> None:
    store = LogStore(new_image(1 << 20))
    img = WritableQcowImage(store, "x")
    img.write(5000, b"\x11" * 100)
    be = struct.Struct(">Q").pack
    assert store.log == [
        ("pwrite", 4096, bytes(4096)), ("flush", 0, b""),        # zeroed L2 at EOF rounded up
        ("pwrite", 48, be(4096)), ("flush", 0, b""),             # then the L1 entry
        ("truncate", 12288, b""), ("pwrite", 8192 + 904, b"\x11" * 100),  # data cluster
        ("flush", 0, b""),
        ("pwrite", 4096 + 8, be(8192)), ("flush", 0, b""),       # then the L2 entry
    ]
    store.log.clear()
    img.write(4096 + 10, b"\x22")  # allocated: in place, no metadata
    assert store.log == [("pwrite", 8192 + 10, b"\x22")]
    assert img.read(4096, 16) == b"\x00" * 10 + b"\x22" + b"\x00" * 5


def test_contiguous_run_is_one_write_and_one_l2_update() -> None:
    store = LogStore(new_image(1 << 20))
    img = WritableQcowImage(store, "x")
    img.write(0, b"\x33" * 5 * 4096)
    pw = [(off, len(d)) for k, off, d in store.log if k == "pwrite"]
    assert pw == [(4096, 4096), (48, 8), (8192, 5 * 4096), (4096, 5 * 8)]
    assert len(store.buf) == 8192 + 5 * 4096


def test_read_only_class_refuses_and_zero_discard_semantics() -> None:
    with pytest.raises(ReadOnlyImageError):
        QcowImage(MemoryStore(new_image(1 << 20)), "x", readonly=False)
    img = WritableQcowImage(MemoryStore(new_image(1 << 20)), "x")
    img.write(0, b"\x44" * 8192)
    img.discard(0, 8192)  # no discard in qcow: the data stays
    assert img.read(0, 8192) == b"\x44" * 8192
    img.write_zeroes(100, 8000, unmap=True)
    assert img.read(0, 8192) == b"\x44" * 100 + bytes(8000) + b"\x44" * 92
    with pytest.raises(OutOfRangeError):
        img.write((1 << 20) - 1, b"ab")


def _compressed_image(size: int, payload: bytes) -> bytes:
    """new_image + one L2 table + cluster 3 stored compressed."""
    buf = bytearray(new_image(size))
    buf += bytes(4096 - len(buf))
    struct.pack_into(">Q", buf, 48, 4096)
    buf += bytes(4096)
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    z = c.compress(payload) + c.flush()
    struct.pack_into(">Q", buf, 4096 + 3 * 8, (1 << 63) | (len(z) << 51) | len(buf))
    buf += z
    return bytes(buf)


@pytest.mark.parametrize("seed", range(4))
def test_crash_after_any_prefix_leaves_old_or_new_clusters(seed: int) -> None:
    """Replay every prefix of the write log: each cluster reads as one of its versions."""
    rnd = random.Random(seed)
    size = 3 << 20
    cs = 4096
    payload = bytes(range(256)) * 16
    base_img = _compressed_image(size, payload)
    backing = rnd.randbytes(size // 2)
    model = bytearray(size)
    model[:len(backing)] = backing
    model[3 * cs:4 * cs] = payload
    versions: list[set[bytes]] = [{bytes(model[i:i + cs])} for i in range(0, size, cs)]
    store = LogStore(base_img)
    img = WritableQcowImage(store, "x")
    img.backing = RawImage(MemoryStore(backing, writable=False), "b")
    for _ in range(12):
        off = rnd.choice([rnd.randrange(size), 3 * cs + rnd.randrange(cs), (2 << 20) - 100])
        n = min(size - off, rnd.choice([1, 700, 5000, 3 * cs]))
        data = rnd.randbytes(n)
        img.write(off, data)
        model[off:off + n] = data
        for c in range(off // cs, (off + n - 1) // cs + 1):
            versions[c].add(bytes(model[c * cs:(c + 1) * cs]))
    assert img.read(0, size) == model
    ops = [op for op in store.log if op[0] != "flush"]
    for k in range(len(ops) + 1):
        crashed = QcowImage(MemoryStore(replay(base_img, ops[:k])), "x")
        crashed.backing = RawImage(MemoryStore(backing, writable=False), "b")
        got = crashed.read(0, size)
        for c in range(size // cs):
            assert got[c * cs:(c + 1) * cs] in versions[c], (k, c)


def test_long_zero_write_over_backing() -> None:
    """Zero writes allocate like QEMU's fallback; partial clusters keep the backing data."""
    size = 3 << 20
    backing = random.Random(9).randbytes(size)
    img = WritableQcowImage(MemoryStore(new_image(size)), "x")
    img.backing = RawImage(MemoryStore(backing, writable=False), "b")
    img.write_zeroes(100, size - 300)
    assert img.read(0, size) == backing[:100] + bytes(size - 300) + backing[-200:]
    # Every cluster is allocated (2 L2 tables + 768 data clusters after the 4 KiB header area).
    assert img.store.size() == 4096 + 2 * 4096 + 768 * 4096
