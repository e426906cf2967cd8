"""Reads of qemu-made images (every layout, chain, compression and state of the matrix) are
byte-identical to `qemu-img convert -O raw`."""

from __future__ import annotations

import io
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest

import qcow2
from qcow2.engine.device import BlockDevice
from qcow2.engine.image import Qcow2Image
from tests.conftest import qemu_img, qemu_io
from tests.differential.conftest import CASE_NAMES, SEED, MatrixImage, MiB

pytestmark = pytest.mark.oracle


def open_case(case: MatrixImage) -> BlockDevice:
    return qcow2.open(str(case.path), backing_policy="follow", snapshot=case.snapshot,
                      **case.open_kwargs)


def _interesting_ranges(case: MatrixImage) -> list[tuple[int, int]]:
    """Where the data of a huge sparse image is: everything the oracle's map reports present."""
    assert case.map_json is not None
    return [(e["start"], e["length"]) for e in case.map_json if e["present"]]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_full_read_equals_qemu(matrix: dict[str, MatrixImage], name: str, l2_classifier: str) -> None:
    case = matrix[name]
    with open_case(case) as img:
        assert img.virtual_size == case.size
        if case.full_read:
            assert img.read(0, case.size) == case.read_oracle(0, case.size)
        else:
            for start, length in _interesting_ranges(case):
                s = max(0, start - 4096)
                n = min(case.size, start + length + 4096) - s
                assert img.read(s, n) == case.read_oracle(s, n), (s, n)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_random_ranges_equal_qemu(matrix: dict[str, MatrixImage], name: str, l2_classifier: str) -> None:
    case = matrix[name]
    rng = random.Random(f"{SEED}-ranges-{name}")
    size = case.size
    # Unaligned ranges anywhere, small ones and ones spanning many clusters; for a huge image
    # half of them are drawn near its data.
    hot = [] if case.full_read else _interesting_ranges(case)
    with open_case(case) as img:
        for i in range(20):
            if hot and i % 2:
                s0, n0 = rng.choice(hot)
                off = max(0, min(size - 1, s0 + rng.randrange(-5000, n0 + 5000)))
            else:
                off = rng.randrange(size)
            length = rng.choice((1, rng.randrange(1, 600), rng.randrange(1, 70000),
                                 rng.randrange(1, 2 * MiB)))
            length = min(length, size - off)
            want = case.read_oracle(off, length)
            assert img.read(off, length) == want, (off, length)
            buf = bytearray(length)
            assert img.readinto(off, memoryview(buf)) == length
            assert buf == want, (off, length)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_as_file_copy(matrix: dict[str, MatrixImage], name: str) -> None:
    case = matrix[name]
    start = 0 if case.full_read else case.size - 4 * MiB
    with open_case(case) as img:
        f = img.as_file()
        f.seek(start)
        out = io.BytesIO()
        shutil.copyfileobj(f, out, 300001)   # an odd chunk size: reads straddle clusters
        assert out.getvalue() == case.read_oracle(start, case.size - start)
        assert f.read(10) == b""
        f.seek(-min(case.size, 3 * MiB + 7), io.SEEK_END)
        tail = f.read()   # readall
        assert tail == case.read_oracle(case.size - len(tail), len(tail))
        assert len(tail) == min(case.size, 3 * MiB + 7)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_zero_extents_read_as_zero(matrix: dict[str, MatrixImage], name: str) -> None:
    # For snapshot cases (which qemu-img map cannot show) at least the extents must agree
    # with the content and cover the image exactly.
    case = matrix[name]
    if not case.full_read:
        pytest.skip("too large to read whole")
    with open_case(case) as img:
        data = img.read(0, case.size)
        pos = 0
        for e in img.extents():
            assert e.start == pos
            if e.zero:
                assert data[e.start:e.start + e.length].count(0) == e.length, e
            pos += e.length
        assert pos == case.size


# ----------------------------------------------------------------------------- damaged streams
def _zstd_frames(*parts: bytes) -> bytes:
    import zstandard

    return b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(data) + c.flush()


CS = 65536
# (id, compression type, replacement stream for the first compressed cluster, QEMU reads it?)
STREAMS: list[tuple[str, str, bytes, bool]] = [
    ("zstd-frame-larger-than-cluster", "zstd", _zstd_frames(b"\x01" * (CS + 100)), False),
    ("zstd-frame-shorter-than-cluster", "zstd", _zstd_frames(b"\x01" * (CS - 100)), False),
    ("zstd-two-frames", "zstd", _zstd_frames(b"\x02" * (CS // 2), b"\x03" * (CS // 2)), True),
    ("zstd-two-frames-overflowing", "zstd",
     _zstd_frames(b"\x02" * (CS // 2), b"\x03" * (CS // 2 + 1)), False),
    ("zstd-garbage", "zstd", b"\x11" * 64, False),
    ("zlib-short-stream", "zlib", _deflate(b"\x04" * (CS - 100)), False),
    ("zlib-long-stream", "zlib", _deflate(b"\x05" * (CS + 100)), True),
    ("zlib-garbage", "zlib", b"\xff" * 64, False),
]


@pytest.mark.parametrize(("ctype", "stream", "qemu_ok"),
                         [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS])
def test_damaged_compressed_cluster_like_qemu(tmp_path: Path, ctype: str, stream: bytes,
                                              qemu_ok: bool) -> None:
    p = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compression_type={ctype}", p, "1M")
    rnd = random.Random(7)
    text = bytes(rnd.choices(b"ab \n", k=CS))   # compresses to well over 100 bytes
    src = tmp_path / "src"
    src.write_bytes(text)
    qemu_io(p, f"write -c -s {src} 0 {CS}", f"write -c -s {src} {CS} {CS}", fmt="qcow2")
    with qcow2.open(str(p)) as img:
        assert isinstance(img, Qcow2Image)
        entry = next(h for _, _, kind, h in img._map_runs(0, CS))
        assert entry is not None
        coffset, csize = img.compressed_layout.decode(entry)
    assert len(stream) <= csize
    with open(p, "r+b") as f:
        f.seek(coffset)
        f.write(stream)
    r = qemu_img("convert", "-O", "raw", p, tmp_path / "out.raw", check=False)
    assert (r.returncode == 0) == qemu_ok, r.stderr
    with qcow2.open(str(p)) as img:
        if qemu_ok:
            assert img.read(0, 2 * CS) == (tmp_path / "out.raw").read_bytes()[:2 * CS]
        else:
            with pytest.raises(qcow2.CorruptImageError, match="decompress"):
                img.read(0, 2 * CS)
            assert img.read(CS, CS) == text   # the neighbour in the same host cluster is fine


# ----------------------------------------------------------------------------- I/O pattern
class _CountingStore:
    """Wraps a ByteStore and counts the data reads (the engine's readinto calls)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads: list[tuple[int, int]] = []

    def readinto(self, offset: int, buf: memoryview) -> int:
        self.reads.append((offset, len(buf)))
        return int(self.inner.readinto(offset, buf))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("name", ["v3_64k", "v3_4k", "v3_512", "extl2_64k", "extl2_2M",
                                  "refcount1", "prealloc_full", "data_file", "grown"])
def test_one_read_per_host_contiguous_run(matrix: dict[str, MatrixImage], name: str) -> None:
    case = matrix[name]
    assert case.map_json is not None
    # every run of data QEMU maps to one host range is at most one read for us
    runs = sum(1 for e in case.map_json if e["data"] and "offset" in e)
    with open_case(case) as img:
        assert isinstance(img, Qcow2Image)
        counting = _CountingStore(img.data_store)
        img.data_store = counting
        assert img.read(0, case.size) == case.read_oracle(0, case.size)
        assert 0 < len(counting.reads) <= runs
        img.data_store = counting.inner


# ----------------------------------------------------------------------------- parallel inflate
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_inflate_equals_qemu_and_reports_first_bad_cluster(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ctype: str, workers: int) -> None:
    from qcow2.engine import image as image_mod

    monkeypatch.setattr(image_mod, "_decompress_workers", lambda: workers)
    n = 40
    p = tmp_path / "img.qcow2"
    src = tmp_path / "src.raw"
    rnd = random.Random(ctype)
    src.write_bytes(b"".join(bytes(rnd.choices(b"xyz \n", k=CS // 2)) + bytes(CS // 2)
                             for _ in range(n)))
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, p)
    with qcow2.open(str(p)) as img:
        assert img.read(0, n * CS) == src.read_bytes()
        assert img.read(CS // 3, 7 * CS) == src.read_bytes()[CS // 3:CS // 3 + 7 * CS]
        assert isinstance(img, Qcow2Image)
        entries = [h for _, _, kind, h in img._map_runs(0, n * CS)]
        bad = [img.compressed_layout.decode(entries[i])[0] for i in (17, 31)]
    with open(p, "r+b") as f:
        for off in bad:
            f.seek(off)
            f.write(b"\xff" * 64)
    with qcow2.open(str(p)) as img, \
            pytest.raises(qcow2.CorruptImageError, match=f"{bad[0]:#x}"):
        img.read(0, n * CS)
