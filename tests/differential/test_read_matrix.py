"""Reads of qemu-made images (every layout, chain, compression and state of the matrix) are
byte-identical to `qemu-img convert -O raw`."""

from __future__ import annotations

import io
import random
import shutil

import pytest

import qcow2
from qcow2.engine.device import BlockDevice
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
def test_full_read_equals_qemu(matrix: dict[str, MatrixImage], name: str) -> None:
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
def test_random_ranges_equal_qemu(matrix: dict[str, MatrixImage], name: str) -> None:
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
