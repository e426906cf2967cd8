"""engine/compress.py without the oracle: the codecs' fit rule, qcow2_alloc_bytes packing
(byte-granular, refcount per compressed cluster, spill, refcount_max), request checks."""

from __future__ import annotations

import errno
import random
import zlib
from pathlib import Path
from typing import Any

import pytest

import qcow2
from qcow2.engine.compress import ZLIB, ZSTD, compress_cluster
from qcow2.format import constants as C

CS = 65536


def _text(n: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rnd.choice([b"alpha ", b"beta ", b"gamma ", b"delta "])
    return bytes(out[:n])


def test_zlib_is_raw_deflate_with_small_window() -> None:
    data = _text(CS)
    out = compress_cluster(data, CS, ZLIB)
    assert out is not None and len(out) < CS - 1
    assert zlib.decompressobj(-12).decompress(out) == data


def test_incompressible_cluster_is_not_compressed() -> None:
    assert compress_cluster(random.Random(1).randbytes(CS), CS, ZLIB) is None
    assert compress_cluster(random.Random(1).randbytes(CS), CS, ZSTD) is None


def test_short_tail_is_zero_padded_and_zstd_is_one_frame() -> None:
    import zstandard

    out = compress_cluster(b"x" * 1000, CS, ZSTD)
    assert out is not None and out[:4] == b"\x28\xb5\x2f\xfd"
    assert zstandard.get_frame_parameters(out).content_size == CS
    assert zstandard.ZstdDecompressor().decompress(out) == b"x" * 1000 + bytes(CS - 1000)


def _entries(img: Any, n: int) -> list[int]:
    t = img.l2_cache.get(img.l1_table[0] & C.L1E_OFFSET_MASK)
    return [t[i] for i in range(n)]


def test_packing_and_refcounts(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    qcow2.create(str(p), 4 << 20)
    with qcow2.open(str(p), readonly=False) as img:
        for i in range(4):
            img.write_compressed(i * CS, bytes([i + 1]) * CS)
        ents = _entries(img, 4)
        layout = img.compressed_layout
        spans = [layout.decode(e) for e in ents]
        starts = [e & layout.offset_mask for e in ents]
        assert all(e & C.QCOW_OFLAG_COMPRESSED and not e & C.QCOW_OFLAG_COPIED for e in ents)
        # back to back at byte granularity, all in one host cluster with refcount 4
        assert len({s >> 16 for s in starts}) == 1
        assert starts == sorted(starts) and starts[1] - starts[0] < 512
        assert img.refcounts.get(starts[0] >> 16) == 4
        assert spans[0][0] == starts[0]
        with pytest.raises(OSError) as ei:
            img.write_compressed(0, bytes(CS))
        assert ei.value.errno == errno.EIO
        for off, n in ((512, CS), (CS, 4096)):
            with pytest.raises(OSError) as ei:
                img.write_compressed(off, _text(n))
            assert ei.value.errno == errno.EINVAL
    for i in range(4):
        with qcow2.open(str(p)) as img:
            assert img.read(i * CS, CS) == bytes([i + 1]) * CS


def test_spill_into_next_cluster_raises_both_refcounts(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    qcow2.create(str(p), 4 << 20, cluster_size=4096)
    # half-compressible clusters: ~2 KiB each, so the second one spills
    rnd = random.Random(5)
    with qcow2.open(str(p), readonly=False) as img:
        for i in range(3):
            img.write_compressed(i * 4096, rnd.randbytes(1800) + bytes(4096 - 1800))
        ents = _entries(img, 3)
        offs = [e & img.compressed_layout.offset_mask for e in ents]
        sizes = [img.compressed_layout.decode(e)[1] for e in ents]
        spilled = [i for i in range(3) if (offs[i] >> 12) != ((offs[i] + sizes[i] - 1) >> 12)]
        assert spilled
        i = spilled[0]
        assert img.refcounts.get(offs[i] >> 12) >= 2
        assert img.refcounts.get((offs[i] >> 12) + 1) >= 1


def test_refcount_max_starts_a_new_cluster(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    qcow2.create(str(p), 4 << 20, refcount_bits=1)
    with qcow2.open(str(p), readonly=False) as img:
        for i in range(3):
            img.write_compressed(i * CS, bytes([i + 1]) * CS)
        offs = [e & img.compressed_layout.offset_mask for e in _entries(img, 3)]
        assert len({o >> 16 for o in offs}) == 3


def test_data_file_refuses_compressed_writes(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    qcow2.create(str(p), 1 << 20, data_file=str(tmp_path / "a.data"))
    with qcow2.open(str(p), readonly=False) as img:
        with pytest.raises(OSError) as ei:
            img.write_compressed(0, bytes(CS))
        assert ei.value.errno == errno.ENOTSUP
