"""Engine reads on images built in memory: no oracle needed, runs in the quick subset."""

from __future__ import annotations

import io
import os
import shutil
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcow2
from qcow2.engine.image import Qcow2Image
from qcow2.format.builder import ZERO, ImageSpec, build_image
from qcow2.io import MemoryStore

CS = 65536


def _model(spec: ImageSpec) -> bytes:
    out = bytearray(spec.size)
    cs = 1 << spec.cluster_bits
    for gc, item in spec.clusters.items():
        if item == ZERO:
            continue
        data = item[1] if isinstance(item, tuple) else item
        assert isinstance(data, bytes)
        out[gc * cs:gc * cs + cs] = data.ljust(cs, b"\0")[:cs]
    return bytes(out)


def _open(spec: ImageSpec) -> Qcow2Image:
    return Qcow2Image(MemoryStore(build_image(spec), writable=False), "mem.qcow2")


def test_reads_every_cluster_kind() -> None:
    rnd = os.urandom(CS)
    spec = ImageSpec(size=4 << 20, clusters={0: rnd, 1: ZERO, 2: ("compressed", b"xy" * 20000),
                                             3: ("compressed", rnd[:1000]), 40: b"\xee" * CS})
    img = _open(spec)
    assert img.read(0, spec.size) == _model(spec)
    assert img.read(CS - 7, 20) == _model(spec)[CS - 7:CS + 13]


def test_extents_merge_and_kinds() -> None:
    spec = ImageSpec(size=1 << 20, clusters={0: b"a", 1: b"b", 2: ZERO, 3: ("compressed", b"c")})
    got = [e.to_map_json() for e in _open(spec).extents()]
    assert got[0]["data"] and got[0]["length"] == 2 * CS and "offset" in got[0]
    assert got[1] == {"start": 2 * CS, "length": CS, "depth": 0, "present": True,
                      "zero": True, "data": False}
    assert got[2] == {"start": 3 * CS, "length": CS, "depth": 0, "present": True,
                      "zero": False, "data": True}
    assert got[3]["present"] is False and got[3]["zero"] is True
    assert sum(e["length"] for e in got) == spec.size


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(0, 63), st.one_of(
    st.binary(min_size=1, max_size=64).map(lambda b: (b * (CS // len(b) + 1))[:CS]),
    st.just(ZERO),
    st.binary(min_size=1, max_size=200).map(lambda b: ("compressed", b))), max_size=12),
    st.lists(st.tuples(st.integers(0, (4 << 20) - 1), st.integers(0, 300000)), max_size=6))
def test_random_images_read_like_model(clusters: dict[int, object],
                                       ranges: list[tuple[int, int]]) -> None:
    spec = ImageSpec(size=4 << 20, clusters=clusters)
    model = _model(spec)
    img = _open(spec)
    assert img.read(0, spec.size) == model
    for off, n in ranges:
        n = min(n, spec.size - off)
        assert img.read(off, n) == model[off:off + n]
    assert sum(e.length for e in img.extents()) == spec.size


def test_as_file_with_shutil(tmp_path: os.PathLike[str]) -> None:
    spec = ImageSpec(size=1 << 20, clusters={3: b"hello" * 1000})
    p = os.path.join(tmp_path, "a.qcow2")
    with open(p, "wb") as f:
        f.write(build_image(spec))
    with qcow2.open(p) as img:
        out = io.BytesIO()
        shutil.copyfileobj(img.as_file(), out, 100000)
        assert out.getvalue() == _model(spec)
        f2 = img.as_file()
        f2.seek(3 * CS + 2)
        assert f2.read(3) == b"llo"


def test_out_of_range_read() -> None:
    img = _open(ImageSpec(size=1 << 20))
    with pytest.raises(qcow2.OutOfRangeError):
        img.read((1 << 20) - 1, 2)


def test_unknown_incompatible_bit_named_from_feature_table() -> None:
    raw = bytearray(build_image(ImageSpec(size=1 << 20)))
    struct.pack_into(">Q", raw, 72, 1 << 4 | 1 << 9)
    with pytest.raises(qcow2.UnsupportedFeatureError) as ei:
        Qcow2Image(MemoryStore(raw), "x")
    assert str(ei.value) == "Unsupported qcow2 feature(s): Unknown incompatible feature: 200"


def test_encrypted_image_refused() -> None:
    raw = bytearray(build_image(ImageSpec(size=1 << 20)))
    struct.pack_into(">I", raw, 32, 1)
    with pytest.raises(qcow2.EncryptionError, match="not supported yet"):
        Qcow2Image(MemoryStore(raw), "x")


def test_corrupt_l2_offset_is_a_clean_error() -> None:
    spec = ImageSpec(size=1 << 20, clusters={0: b"x"})
    raw = bytearray(build_image(spec))
    struct.pack_into(">Q", raw, 3 * CS, (4 * CS + 512) | 1 << 63)
    img = Qcow2Image(MemoryStore(raw), "x")
    with pytest.raises(qcow2.CorruptImageError, match="unaligned"):
        img.read(0, 512)
