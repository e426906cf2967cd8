"""`qcow2 compare` in-process: messages, exit statuses, strict mode, size differences, and the
block-status walk on crafted images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qcow2.cli.main import main
from qcow2.engine.image import Qcow2Image
from qcow2.format.builder import ZERO, ImageSpec, build_image
from qcow2.io import MemoryStore
from qcow2.ops.compare import ALLOCATED, DATA, EOF, OFFSET_VALID, status_runs
from qcow2.ops.compare import ZERO as Z

CS = 65536
MiB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def sparse_raw(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """The same content as qcow2 (data + zero clusters + unallocated) and as a raw file."""
    rnd = os.urandom(CS)
    spec = ImageSpec(size=4 * MiB, clusters={0: rnd, 1: ZERO, 3: b"\x11" * CS,
                                             4: ("compressed", b"ab" * 1000)})
    q = tmp_path / "a.qcow2"
    q.write_bytes(build_image(spec))
    r = sparse_raw(tmp_path / "a.raw", 4 * MiB,
                   {0: rnd, 3 * CS: b"\x11" * CS, 4 * CS: b"ab" * 1000})
    return q, r


def test_identical(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    q, r = pair
    assert run(capsys, "compare", q, r) == (0, "Images are identical.\n", "")
    assert run(capsys, "compare", "-q", q, r) == (0, "", "")
    assert run(capsys, "compare", "-f", "qcow2", "-F", "raw", r, q)[0] == 2


@pytest.mark.parametrize("offset,reported", [
    (0, 0), (511, 0), (512, 512), (CS + 5, CS), (2 * CS + 700, 2 * CS + 512),
    (4 * CS + 1999, 4 * CS + 1536), (4 * MiB - 1, 4 * MiB - 512), (3 * MiB + 3, 3 * MiB),
])
def test_mismatch_offsets(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                          offset: int, reported: int) -> None:
    q, r = pair
    with open(r, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    want = (1, f"Content mismatch at offset {reported}!\n", "")
    assert run(capsys, "compare", q, r) == want
    assert run(capsys, "compare", r, q) == want


def test_size_difference(pair: tuple[Path, Path], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    q, r = pair
    with open(r, "r+b") as f:
        f.truncate(5 * MiB)
    assert run(capsys, "compare", q, r) == (
        0, "Warning: Image size mismatch!\nImages are identical.\n", "")
    assert run(capsys, "compare", "-s", q, r) == (1, "Strict mode: Image size mismatch!\n", "")
    with open(r, "r+b") as f:
        f.seek(5 * MiB - 1000)
        f.write(b"\x01")
    assert run(capsys, "compare", r, q) == (
        1, f"Warning: Image size mismatch!\nContent mismatch at offset {5 * MiB - 1024}!\n", "")


def test_strict_status(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    q, r = pair
    # cluster 0 is data on both sides; cluster 1 is a zero cluster in the qcow2 image
    # (ZERO|ALLOCATED) but a hole in the raw file (ZERO|OFFSET_VALID|ALLOCATED)
    assert run(capsys, "compare", "-s", q, r) == (
        1, f"Strict mode: Offset {CS} block status mismatch!\n", "")
    assert run(capsys, "compare", "-s", q, q) == (0, "Images are identical.\n", "")


def test_status_runs_flags() -> None:
    spec = ImageSpec(size=4 * CS, clusters={0: b"x", 1: ZERO, 2: ("compressed", b"y")})
    img = Qcow2Image(MemoryStore(build_image(spec), writable=False), "m.qcow2")
    runs = list(status_runs(img))
    assert runs == [(0, CS, DATA | OFFSET_VALID | ALLOCATED),
                    (CS, 2 * CS, Z | ALLOCATED),
                    (2 * CS, 3 * CS, DATA | ALLOCATED),
                    (3 * CS, 4 * CS, Z | EOF)]


def test_status_runs_split_at_l2_tables() -> None:
    # 4 KiB clusters: one L2 table maps 2 MiB; QEMU answers one table at a time
    spec = ImageSpec(size=4 * MiB, cluster_bits=12)
    img = Qcow2Image(MemoryStore(build_image(spec), writable=False), "m.qcow2")
    assert list(status_runs(img)) == [(0, 2 * MiB, Z), (2 * MiB, 4 * MiB, Z | EOF)]


def test_progress(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    q, r = pair
    rc, out, err = run(capsys, "compare", "-p", q, r)
    assert (rc, err) == (0, "")
    assert out.startswith("    (0.00/100%)\r") and out.endswith(
        "    (100.00/100%)\rImages are identical.\n\n")
    assert run(capsys, "compare", "-p", "-q", q, r) == (0, "", "")


def test_errors(pair: tuple[Path, Path], tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> None:
    q, _ = pair
    missing = tmp_path / "nope"
    assert run(capsys, "compare", q, missing) == (
        2, "", f"qcow2: Could not open '{missing}': Could not open '{missing}': "
               "No such file or directory\n")
    assert run(capsys, "compare", q) == (
        1, "", "qcow2: Expecting two image file names\nTry 'qcow2 --help' for more information\n")
    assert run(capsys, "compare", "-T", "x", q, q) == (
        2, "", "qcow2: Invalid source cache option: x\n")
    assert run(capsys, "compare", "-f", "vmdk", q, q) == (
        2, "", f"qcow2: Could not open '{q}': Unknown driver 'vmdk'\n")


def test_corrupt_and_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = ImageSpec(size=1 * MiB, clusters={0: b"\x01" * CS, 2: ("compressed", b"z" * 500)})
    good = build_image(spec)
    bad_l2 = bytearray(good)
    l2 = int.from_bytes(good[3 * CS:3 * CS + 8], "big") & 0x00FFFFFFFFFFFE00
    entry = int.from_bytes(good[l2:l2 + 8], "big")
    bad_l2[l2:l2 + 8] = (entry + 512).to_bytes(8, "big")
    p = tmp_path / "bad.qcow2"
    p.write_bytes(bytes(bad_l2))
    rc, out, err = run(capsys, "compare", p, p)
    assert (rc, out) == (3, "")
    assert err.startswith("qcow2: Image is corrupt: ")
    assert err.endswith(f"\nqcow2: Sector allocation test failed for {p}\n")
    # a compressed cluster that does not inflate: a read error (4), no corruption report
    bad_c = bytearray(good)
    centry = int.from_bytes(good[l2 + 16:l2 + 24], "big")
    coff = centry & ((1 << (62 - 8)) - 1)
    bad_c[coff:coff + 64] = b"\xff" * 64
    p2 = tmp_path / "badc.qcow2"
    p2.write_bytes(bytes(bad_c))
    assert run(capsys, "compare", p2, p2) == (
        4, "", f"qcow2: Error while reading offset {2 * CS} of {p2}: Input/output error\n")
