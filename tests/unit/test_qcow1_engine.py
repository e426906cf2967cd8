"""QcowImage on crafted in-memory qcow v1 images: reads, status runs, caches, hostile entries."""

from __future__ import annotations

import random
import struct
import time
import zlib
from pathlib import Path

import pytest

import qcow2
from qcow2.engine.device import STATUS_DATA, STATUS_OFFSET_VALID, LayerRun
from qcow2.engine.qcow1 import QcowImage
from qcow2.errors import (
    CorruptImageError,
    EncryptionError,
    ImageLimitError,
    InvalidImageError,
    Qcow2Error,
    ReadOnlyImageError,
)
from qcow2.io import MemoryStore

HDR = struct.Struct(">IIQIIQBBHIQ")
MAGIC = 0x514649FB


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(data) + c.flush()


class Builder:
    """Lays out an image the way QEMU does: header, name, L1, then tables and data at EOF."""

    def __init__(self, size: int, cbits: int = 12, l2bits: int = 9, backing: bytes = b"",
                 crypt: int = 0) -> None:
        self.size, self.cbits, self.l2bits = size, cbits, l2bits
        self.cs = 1 << cbits
        shift = cbits + l2bits
        self.l1_size = (size + (1 << shift) - 1) >> shift
        self.l1_off = (48 + len(backing) + 7) & ~7
        self.buf = bytearray(HDR.pack(MAGIC, 1, 48 if backing else 0, len(backing), 0, size,
                                      cbits, l2bits, 0, crypt, self.l1_off))
        self.buf += backing
        self.buf += bytes(self.l1_off + self.l1_size * 8 - len(self.buf))
        self.l2: dict[int, int] = {}

    def _eof(self, align: int) -> int:
        off = (len(self.buf) + align - 1) & ~(align - 1)
        self.buf += bytes(off - len(self.buf))
        return off

    def _ensure_l2(self, cluster: int) -> int:
        l1_index = cluster >> self.l2bits
        if l1_index not in self.l2:
            off = self._eof(self.cs)
            self.buf += bytes(8 << self.l2bits)
            self.l2[l1_index] = off
            struct.pack_into(">Q", self.buf, self.l1_off + 8 * l1_index, off)
        return l1_index

    def set_entry(self, cluster: int, entry: int) -> None:
        l1_index = self._ensure_l2(cluster)
        idx = cluster & ((1 << self.l2bits) - 1)
        struct.pack_into(">Q", self.buf, self.l2[l1_index] + 8 * idx, entry)

    def data(self, cluster: int, payload: bytes) -> int:
        self._ensure_l2(cluster)
        off = self._eof(self.cs)
        self.buf += payload.ljust(self.cs, b"\0")
        self.set_entry(cluster, off)
        return off

    def compressed(self, cluster: int, payload: bytes) -> int:
        self._ensure_l2(cluster)
        z = deflate(payload.ljust(self.cs, b"\0"))
        assert len(z) < self.cs
        off = self._eof(512)
        self.buf += z
        entry = (1 << 63) | (len(z) << (63 - self.cbits)) | off
        self.set_entry(cluster, entry)
        return entry

    def image(self, *, readonly: bool = True) -> QcowImage:
        return QcowImage(MemoryStore(bytes(self.buf)), "mem.qcow", readonly=readonly)


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_reads_every_kind_against_model() -> None:
    b = Builder(10 * 4096 + 1024)
    model = bytearray(b.size)
    for cl, kind in [(0, "d"), (1, "d"), (2, "c"), (4, "d"), (5, "c"), (6, "c"), (10, "c")]:
        payload = pattern(cl, 4096) if kind == "d" else bytes([cl + 1]) * 3000
        (b.data if kind == "d" else b.compressed)(cl, payload)
        end = min(b.size, (cl + 1) * 4096)
        model[cl * 4096:end] = payload.ljust(4096, b"\0")[:end - cl * 4096]
    img = b.image()
    assert img.virtual_size == b.size and img.format_name == "qcow"
    assert img.cluster_size == 4096 and img.cluster_bits == 12 and img.l2_bits == 9
    assert img.backing_file is None
    assert img.read(0, b.size) == bytes(model)
    rnd = random.Random(7)
    for _ in range(300):
        a = rnd.randrange(b.size)
        n = rnd.randrange(b.size - a + 1)
        assert img.read(a, n) == bytes(model[a:a + n])


def test_layer_status_runs() -> None:
    b = Builder(12 * 4096)
    h0 = b.data(0, b"a")
    b.data(1, b"b")  # host-contiguous with cluster 0
    b.compressed(3, b"c")
    b.compressed(4, b"d")
    h6 = b.data(6, b"e")
    b.set_entry(7, h6 + 2 * 4096)  # not contiguous: a separate run
    img = b.image()
    runs = list(img.layer_status(0, 12 * 4096))
    assert runs == [
        LayerRun(0, 8192, STATUS_DATA | STATUS_OFFSET_VALID, h0, img.store),
        LayerRun(8192, 4096, 0),
        LayerRun(12288, 8192, STATUS_DATA),
        LayerRun(20480, 4096, 0),
        LayerRun(24576, 4096, STATUS_DATA | STATUS_OFFSET_VALID, h6, img.store),
        LayerRun(28672, 4096, STATUS_DATA | STATUS_OFFSET_VALID, h6 + 8192, img.store),
        LayerRun(32768, 16384, 0),
    ]
    # unaligned start inside a data cluster: the host offset moves with it
    first = next(iter(img.layer_status(100, 50)))
    assert first == LayerRun(100, 50, STATUS_DATA | STATUS_OFFSET_VALID, h0 + 100, img.store)
    ext = [e.to_map_json() for e in img.extents()]
    assert ext[0] == {"start": 0, "length": 8192, "depth": 0, "present": True,
                      "zero": False, "data": True, "offset": h0}
    assert ext[2] == {"start": 12288, "length": 8192, "depth": 0, "present": True,
                      "zero": False, "data": True}


class CountingStore(MemoryStore):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def readinto(self, offset: int, buf: memoryview) -> int:
        self.reads.append((offset, len(buf)))
        buf[:] = MemoryStore.pread(self, offset, len(buf))
        return len(buf)

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().pread(offset, length)


def test_contiguous_clusters_read_with_one_call_and_caches() -> None:
    b = Builder(64 * 4096)
    first = b.data(0, pattern(1, 4096))
    for cl in range(1, 16):
        b.data(cl, pattern(cl + 1, 4096))
    entry = b.compressed(20, b"z" * 4096)
    store = CountingStore(bytes(b.buf))
    img = QcowImage(store, "x")
    store.reads.clear()
    img.read(10, 16 * 4096 - 20)
    # one L2 load (and the first L1 slice), then one read for the whole data run
    assert store.reads[-1] == (first + 10, 16 * 4096 - 20)
    assert len(store.reads) == 3
    store.reads.clear()
    img.read(0, 4096)
    assert store.reads == [(first, 4096)]  # L1 and L2 cached
    store.reads.clear()
    assert img.read(20 * 4096 + 5, 100) == b"z" * 100
    assert img.read(20 * 4096 + 1000, 3096) == b"z" * 3096
    coffset = entry & ((1 << 51) - 1)
    assert [r for r in store.reads if r[0] == coffset] == [(coffset, (entry >> 51) & 0xFFF)]


def test_l2_cache_is_bounded() -> None:
    b = Builder(64 << 20, cbits=9, l2bits=6)  # an L2 table maps 32 KiB
    for cl in range(0, (64 << 20) // 512, 64):
        b.data(cl, b"x")
    img = QcowImage(MemoryStore(bytes(b.buf)), "x", l2_cache_size=8 * 512)
    img.read(0, 64 << 20)
    assert len(img.l2_cache) <= img.l2_cache.capacity == 8


def test_backing_name_and_chain(tmp_path: Path) -> None:
    base = Builder(8192)
    base.data(1, b"B" * 4096)
    (tmp_path / "base.qcow").write_bytes(base.buf)
    ov = Builder(16384, cbits=9, l2bits=12, backing=b"base.qcow")
    ov.data(17, b"O" * 512)
    (tmp_path / "ov.qcow").write_bytes(ov.buf)
    with qcow2.open(str(tmp_path / "ov.qcow")) as img:
        assert isinstance(img, QcowImage)
        assert img.backing_file == "base.qcow"
        assert img.backing is not None and img.backing.format_name == "qcow"
        data = img.read(0, 16384)
    # the overlay's cluster 17 lies past the end of the 8 KiB base
    assert data == bytes(4096) + b"B" * 4096 + bytes(512) + b"O" * 512 + bytes(7168)
    with qcow2.open(str(tmp_path / "ov.qcow"), open_backing=False) as img:
        assert img.read(0, 16384) == bytes(8704) + b"O" * 512 + bytes(7168)


def test_backing_name_is_a_c_string() -> None:
    b = Builder(4096, backing=b"a.img\0junk")
    assert b.image().backing_file == "a.img"
    b = Builder(4096, backing=b"\0abc")
    assert b.image().backing_file is None


def test_backing_name_outside_the_file() -> None:
    b = Builder(4096)
    struct.pack_into(">QI", b.buf, 8, len(b.buf) - 4, 10)
    with pytest.raises(InvalidImageError, match="extends past the end"):
        b.image()


def test_encrypted_refused_at_open() -> None:
    b = Builder(4096, crypt=1)
    with pytest.raises(EncryptionError, match="encryption not supported yet"):
        b.image()
    # QEMU checks the encryption before the L1 geometry
    b = Builder(4096, crypt=1)
    struct.pack_into(">Q", b.buf, 24, 2**64 - 1)
    with pytest.raises(EncryptionError):
        b.image()


def test_header_errors_at_open() -> None:
    b = Builder(4096)
    b.buf[32] = 17
    with pytest.raises(InvalidImageError, match="Cluster size must be between 512 and 64k"):
        b.image()
    with pytest.raises(InvalidImageError, match="Image not in qcow format"):
        QcowImage(MemoryStore(b"QFI"), "x")
    with pytest.raises(ImageLimitError, match="Image too large"):
        QcowImage(MemoryStore(HDR.pack(MAGIC, 1, 0, 0, 0, 2**43, 9, 6, 0, 0, 48)), "x")


def test_writable_open_refused() -> None:
    with pytest.raises(ReadOnlyImageError):
        Builder(4096).image(readonly=False)


def test_huge_declared_l1_is_loaded_lazily() -> None:
    # 2^28 - 1 L1 entries (2 GiB) declared by a tiny file: open allocates nothing that size.
    size = ((2**31 - 1) // 8) << 15
    hdr = HDR.pack(MAGIC, 1, 0, 0, 0, size, 9, 6, 0, 0, 48)
    t = time.perf_counter()
    img = QcowImage(MemoryStore(hdr), "x")
    assert img.l1_size == (2**31 - 1) // 8
    assert img.read(size - 8192 - 512, 4096) == bytes(4096)
    assert time.perf_counter() - t < 1


def test_l1_and_l2_past_eof_read_as_unallocated() -> None:
    b = Builder(1 << 20)
    struct.pack_into(">Q", b.buf, 40, 1 << 40)  # L1 far past EOF
    assert b.image().read(0, 1 << 20) == bytes(1 << 20)
    b = Builder(1 << 20)
    struct.pack_into(">Q", b.buf, b.l1_off, 1 << 40)  # L2 far past EOF
    img = b.image()
    assert img.read(0, 1 << 20) == bytes(1 << 20)
    assert [r.status for r in img.layer_status(0, 1 << 20)] == [0]


@pytest.mark.parametrize("l2_offset", [2**63, 2**64 - 1, (2**63 - 2**30) - 100])
def test_l2_offset_beyond_sanity(l2_offset: int) -> None:
    b = Builder(1 << 20)
    struct.pack_into(">Q", b.buf, b.l1_off, l2_offset)
    img = b.image()
    with pytest.raises(CorruptImageError, match="L2 table offset"):
        img.read(0, 512)
    with pytest.raises(CorruptImageError):
        list(img.extents())


def test_unaligned_data_cluster() -> None:
    b = Builder(16384)
    h = b.data(1, b"q" * 4096)
    b.set_entry(2, h + 100)  # not 512-aligned: QEMU fails the read with EIO
    b.set_entry(3, h + 512)  # 512-aligned, not cluster-aligned: QEMU reads it
    img = b.image()
    with pytest.raises(CorruptImageError, match="Invalid data cluster offset"):
        img.read(8192, 10)
    assert img.read(12288, 3584) == b"q" * 3584
    # block status reports what QEMU's map prints: cluster_offset | offset_in_cluster
    runs = list(img.layer_status(12288 + 1024, 100))
    assert runs[0].host_offset == (h + 512) | 1024
    assert img.read(4096, 4096) == b"q" * 4096


def test_data_cluster_beyond_sanity() -> None:
    b = Builder(16384)
    b.set_entry(0, (2**63 - 2**30) - 512)
    with pytest.raises(CorruptImageError):
        b.image().read(0, 4096)


@pytest.mark.parametrize("mangle", ["garbage", "short", "zero_size", "past_eof", "huge_offset",
                                    "stream_too_short"])
def test_bad_compressed_cluster(mangle: str) -> None:
    b = Builder(16384)
    entry = b.compressed(1, pattern(3, 512) * 8)
    coffset, csize = entry & ((1 << 51) - 1), (entry >> 51) & 0xFFF
    if mangle == "garbage":
        b.buf[coffset:coffset + csize] = b"\xff" * csize
    elif mangle == "short":
        b.set_entry(1, (1 << 63) | ((csize // 2) << 51) | coffset)
    elif mangle == "zero_size":
        b.set_entry(1, (1 << 63) | coffset)
    elif mangle == "past_eof":
        b.set_entry(1, (1 << 63) | (csize << 51) | (1 << 40))
    elif mangle == "huge_offset":
        b.set_entry(1, (1 << 63) | (4095 << 51) | ((1 << 51) - 1))
    else:
        z = deflate(b"x" * 1000)  # a complete stream that inflates to less than a cluster
        b.buf[coffset:coffset + len(z)] = z
        b.set_entry(1, (1 << 63) | (len(z) << 51) | coffset)
    img = b.image()
    with pytest.raises(CorruptImageError, match="does not inflate to a full 4096-byte cluster"):
        img.read(4096, 1)
    assert img.read(0, 4096) == bytes(4096)
    # status does not decompress: the cluster is data without an offset
    assert [r.status for r in img.layer_status(4096, 4096)] == [STATUS_DATA]


def test_compressed_with_trailing_input_is_accepted() -> None:
    b = Builder(8192)
    entry = b.compressed(0, b"k" * 4096)
    b.buf += b"\x00" * 600
    csize = (entry >> 51) & 0xFFF
    b.set_entry(0, entry + (min(4095, csize + 500) - csize << 51))
    assert b.image().read(0, 4096) == b"k" * 4096


def test_random_hostile_images_raise_only_library_errors() -> None:
    rnd = random.Random(11)
    good = Builder(64 * 1024, cbits=9, l2bits=6)
    for cl in range(0, 128, 3):
        if cl % 2:
            good.compressed(cl, bytes([cl]) * 512)
        else:
            good.data(cl, pattern(cl, 512))
    base = bytes(good.buf)
    for _ in range(300):
        buf = bytearray(base)
        for _ in range(rnd.randrange(1, 12)):
            pos = rnd.randrange(len(buf))
            buf[pos] = rnd.randrange(256)
        try:
            img = QcowImage(MemoryStore(bytes(buf)), "x")
            img.read(0, img.virtual_size)
            list(img.extents())
        except Qcow2Error:
            pass
