"""Crafted images the fuzzer found: each once hung, crashed or corrupted something."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2
from tests.fuzz.harness import bounded, run_case

# 104 bytes: a qcow2 v3 header whose refcount table (past EOF) holds no refblock, so no
# cluster, not even the header, has a refcount. A write allocated the header's own cluster
# for a self-describing refblock and looped; now the overlap check refuses (as QEMU does).
UNREFCOUNTED_HEADER = bytes.fromhex(
    "514649fb000000030000000000000000000000000000000c"
    "000000000040000000000000000000020000000000003000"
    "000000000000100000000001000000000000000000000000"
    "000000000000000000000000000000000000000000000000"
    "0000000000000070")


def test_write_to_image_without_refcounts_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "img.qcow2"
    p.write_bytes(UNREFCOUNTED_HEADER)
    with bounded(5.0), qcow2.open(str(p), readonly=False) as img, \
            pytest.raises(qcow2.CorruptImageError, match="Preventing invalid write"):
        img.write(12345, b"x")
    assert p.read_bytes()[:104] == UNREFCOUNTED_HEADER[:72] + p.read_bytes()[72:80] + \
        UNREFCOUNTED_HEADER[80:104]   # only the corrupt bit (incompatible features) changed
    with qcow2.open(str(p)) as img:
        assert img.corrupt


def test_harness_accepts_it(tmp_path: Path) -> None:
    with bounded(5.0):
        run_case(UNREFCOUNTED_HEADER, tmp_path)


def test_raw_probed_mutant_is_writable_through_the_api(tmp_path: Path) -> None:
    # A mangled magic makes the image probe as raw: writes, zeroes, discard and flush work.
    p = tmp_path / "img"
    p.write_bytes(b"QFI\xfa" + bytes(8188))
    with qcow2.open(str(p), readonly=False) as img:
        img.write(10, b"abc")
        img.write_zeroes(4096, 4096, unmap=True)
        img.discard(0, 512)
        img.flush()
        assert img.read(0, 16) == bytes(16)
    with qcow2.open(str(p)) as img, pytest.raises(qcow2.ReadOnlyImageError):
        img.write(0, b"x")


CASES = sorted((Path(__file__).parent / "cases").glob("*.img"))


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_saved_fuzz_cases(case: Path, tmp_path: Path) -> None:
    # Each file once failed the harness (see its name); they must now pass its bounds.
    with bounded():
        run_case(case.read_bytes(), tmp_path)
