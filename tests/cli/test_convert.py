"""`qcow2 convert` in-process: output bytes and holes, options, progress, error messages; and
the zero-detection core checked against a line-by-line port of qemu-img's C loops."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcow2.cli.main import main
from qcow2.format.builder import ZERO, ImageSpec, build_image
from qcow2.ops.convert import allocated_ranges, sector_flags
from qcow2.ops.progress import Progress
from tests.conftest import data_map

CS = 65536
MiB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err



def _holes_supported(tmp: Path) -> bool:
    p = tmp / "probe"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return data_map(p) == []


@pytest.fixture
def qcow2_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A builder image with data, zero and compressed clusters; returns (path, guest bytes)."""
    rnd = os.urandom(CS)
    half = b"\x07" * (CS // 2) + bytes(CS // 2)
    spec = ImageSpec(size=8 * MiB, clusters={0: rnd, 1: ZERO, 2: ("compressed", b"xy" * 20000),
                                             5: half, 40: b"\xee" * CS, 100: bytes(CS)})
    path = tmp_path / "img.qcow2"
    path.write_bytes(build_image(spec))
    model = bytearray(spec.size)
    model[0:CS] = rnd
    model[2 * CS:2 * CS + 40000] = b"xy" * 20000
    model[5 * CS:6 * CS] = half
    model[40 * CS:41 * CS] = b"\xee" * CS
    return path, bytes(model)


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("workers", ["1", "2", "4"])
def test_qcow2_to_raw(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      qcow2_image: tuple[Path, bytes], workers: str) -> None:
    src, model = qcow2_image
    out = tmp_path / "out.raw"
    assert run(capsys, "convert", "-m", workers, "-O", "raw", src, out) == (0, "", "")
    assert out.read_bytes() == model
    if _holes_supported(tmp_path):
        # zero tails (cluster 2 after 40000 bytes, rounded up to 4k; the second half of
        # cluster 5) and the all-zero cluster 100 are holes
        assert data_map(out) == [(0, CS), (2 * CS, 40960), (5 * CS, CS // 2), (40 * CS, CS)]


def test_sparse_zero_disables_holes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    qcow2_image: tuple[Path, bytes]) -> None:
    src, model = qcow2_image
    out = tmp_path / "out.raw"
    assert run(capsys, "convert", "-S", "0", src, out) == (0, "", "")
    assert out.read_bytes() == model
    if _holes_supported(tmp_path):
        assert data_map(out) == [(0, len(model))]


def test_raw_source_options_after_files_and_existing_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(b"A" * 3000)
        f.seek(5 * MiB)
        f.write(b"B" * 100)       # ends inside a sector: the output is rounded up
    out = tmp_path / "out.raw"
    out.write_bytes(b"old" * 10_000_000)   # an existing target is truncated first
    assert run(capsys, "convert", src, "-O", "raw", out) == (0, "", "")
    data = out.read_bytes()
    assert len(data) == 5 * MiB + 512
    assert data[:3000] == b"A" * 3000 and data[5 * MiB:5 * MiB + 100] == b"B" * 100
    assert data.count(0) == len(data) - 3100


def test_concatenation(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       qcow2_image: tuple[Path, bytes]) -> None:
    src, model = qcow2_image
    r = tmp_path / "r.raw"
    r.write_bytes(b"\x01" * 1000)
    out = tmp_path / "out.raw"
    assert run(capsys, "convert", r, src, r, out) == (0, "", "")
    one = b"\x01" * 1000 + bytes(24)
    assert out.read_bytes() == one + model + one


def test_snapshot_on_raw_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     qcow2_image: tuple[Path, bytes]) -> None:
    src, _ = qcow2_image
    r = tmp_path / "r.raw"
    r.write_bytes(b"\x01" * 1000)
    out = tmp_path / "out.raw"
    assert run(capsys, "convert", "-l", "x", r, out) == (
        1, "", "qcow2: Failed to load snapshot: Block format 'raw' used by device '' does not "
               "support temporarily loading internal snapshots\n")
    assert run(capsys, "convert", "-l", "snapshot.name=x", src, out) == (
        1, "", "qcow2: Failed to load snapshot: Can't find snapshot\n")


# ----------------------------------------------------------------------------- progress
def test_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        qcow2_image: tuple[Path, bytes]) -> None:
    src, _ = qcow2_image
    out = tmp_path / "out.raw"
    rc, text, err = run(capsys, "convert", "-p", src, out)
    assert (rc, err) == (0, "")
    # five one-cluster data requests, then the final 100% and the newline
    assert text == "".join(f"    ({p}/100%)\r" for p in
                           ("0.00", "20.00", "40.00", "60.00", "80.00", "100.00", "100.00")
                           ) + "\n"
    assert run(capsys, "convert", "-p", "-q", src, out) == (0, "", "")


def test_progress_float_rounding() -> None:
    import io

    buf = io.StringIO()
    p = Progress(True, 2.0, stream=buf, use_signal=False)
    p.print(0, 100)
    for _ in range(3):
        p.print(5.208333, 100)     # 15.625 after three steps: printed as 15.62
    p.end()
    assert buf.getvalue() == ("    (0.00/100%)\r    (5.21/100%)\r    (10.42/100%)\r"
                              "    (15.62/100%)\r\n")
    buf = io.StringIO()
    p = Progress(True, 2.0, stream=buf, use_signal=False)
    for _ in range(3):
        p.print(1.5, 100)          # 1.5 is not > 2, 3.0 is, 4.5 is not > 5
    assert buf.getvalue() == "    (3.00/100%)\r"


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv,message", [
    (["nonexist", "o.raw"],
     "Could not open 'nonexist': Could not open 'nonexist': No such file or directory"),
    (["-O", "vmdk", "r.raw", "o.raw"], "convert -O vmdk is not supported yet (raw, qcow2 and qcow only)"),
    (["-O", "foo", "r.raw", "o.raw"], "Unknown file format 'foo'"),
    (["-S", "100", "r.raw", "o.raw"],
     "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
     "16777216. Select 0 to disable sparse detection (fully allocates output)."),
    (["-S", "1x", "r.raw", "o.raw"],
     "Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E "
     "suffixes for\nqcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."),
    (["-m", "17", "r.raw", "o.raw"],
     "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"),
    (["-l", "snapshot.foo=1", "r.raw", "o.raw"],
     "Invalid parameter 'snapshot.foo'\nqcow2: Failed in parsing snapshot param "
     "'snapshot.foo=1'"),
    (["-l", "s", "r.raw", "r.raw", "o.raw"], "No support for concatenating multiple snapshot"),
    (["r.raw"], "Must specify image file name"),
    (["-c", "r.raw", "o.raw"], "Compression not supported for this file format"),
    (["-c", "-C", "r.raw", "o.qcow2"], "Cannot enable copy offloading when -c is used"),
    (["--compression-level", "3", "r.raw", "o.raw"], "--compression-level requires -c"),
    (["-T", "bad", "r.raw", "o.raw"], "Invalid source cache option: bad"),
    (["-t", "bad", "r.raw", "o.raw"], "Invalid cache option: bad"),
    (["r.raw", "no/such/dir/o.raw"], "no/such/dir/o.raw: error while converting raw: Could not "
     "create 'no/such/dir/o.raw': No such file or directory"),
])
def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    Path("r.raw").write_bytes(b"x" * 4096)
    assert run(capsys, "convert", *argv) == (1, "", f"qcow2: {message}\n")


def test_corrupt_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = ImageSpec(size=1 * MiB, clusters={0: b"\x01" * CS})
    data = bytearray(build_image(spec))
    l2 = int.from_bytes(data[3 * CS:3 * CS + 8], "big") & 0x00FFFFFFFFFFFE00  # L1[0]
    entry = int.from_bytes(data[l2:l2 + 8], "big")
    data[l2:l2 + 8] = (entry + 512).to_bytes(8, "big")       # unaligned data cluster
    src = tmp_path / "bad.qcow2"
    src.write_bytes(bytes(data))
    rc, out, err = run(capsys, "convert", src, tmp_path / "o.raw")
    assert rc == 1 and out == ""
    assert err.startswith("qcow2: Image is corrupt: Cluster allocation offset ")
    assert err.endswith("further non-fatal corruption events will be suppressed\n"
                        "qcow2: error while reading block status at offset 0: "
                        "Input/output error\n")


# ----------------------------------------------------------------------------- zero detection
def _ref_is_allocated(flags: list[bool], start: int, n: int, sector_num: int,
                      alignment: int) -> tuple[int, bool]:
    """qemu-img.c is_allocated_sectors(), sector by sector."""
    is_zero = not flags[start]
    i = 1
    while i < n and (not flags[start + i]) == is_zero:
        i += 1
    if i == n:
        return i, not is_zero
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if is_zero and i <= tail:
            is_zero = False
        if not is_zero:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return i, not is_zero


def _ref_is_allocated_min(flags: list[bool], start: int, n: int, min_: int, sector_num: int,
                          alignment: int) -> tuple[int, bool]:
    min_ = min(min_, n)
    i, ret = _ref_is_allocated(flags, start, n, sector_num, alignment)
    if not ret:
        return i, False
    used = checked = i
    pos, n, sector_num = start + i, n - i, sector_num + i
    while n > 0:
        k, r = _ref_is_allocated(flags, pos, n, sector_num, alignment)
        pos, n, sector_num, checked = pos + k, n - k, sector_num + k, checked + k
        if r:
            used = checked
        elif k >= min_:
            break
    return used, True


def _ref_ranges(flags: list[bool], sector_num: int, min_: int,
                alignment: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < len(flags):
        k, r = _ref_is_allocated_min(flags, pos, len(flags) - pos, min_, sector_num + pos,
                                     alignment)
        if r:
            if out and sum(out[-1]) == pos:
                out[-1] = (out[-1][0], out[-1][1] + k)
            else:
                out.append((pos, k))
        pos += k
    return out


@settings(max_examples=400, deadline=None)
@given(runs=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=30),
       sector_num=st.integers(0, 64), min_sparse=st.sampled_from([1, 2, 3, 8, 9, 16, 64]))
def test_allocated_ranges_matches_qemu(runs: list[tuple[bool, int]], sector_num: int,
                                       min_sparse: int) -> None:
    flags = [v for v, n in runs for _ in range(n)]
    alignment = 1 << (min_sparse.bit_length() - 1)
    got = allocated_ranges(np.array(flags, dtype=bool), sector_num, min_sparse, alignment)
    assert got == _ref_ranges(flags, sector_num, min_sparse, alignment)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=1, max_size=64))
def test_sector_flags(kinds: list[int]) -> None:
    buf = bytearray()
    for k in kinds:
        sector = bytearray(512)
        if k == 1:
            sector[0] = 1          # first word non-zero
        elif k == 2:
            sector[511] = 9        # only the last byte
        elif k == 3:
            sector[200] = 1
        buf += sector
    got = sector_flags(buf, len(kinds))
    assert got.tolist() == [k != 0 for k in kinds]


def test_progress_on_sigusr1() -> None:
    """Without -p, SIGUSR1 asks for one report on stderr (qemu-progress.c's dummy mode)."""
    import io
    import signal

    out, err = io.StringIO(), io.StringIO()
    p = Progress(False, 1.0, stream=out, err_stream=err)
    try:
        p.print(0, 100)
        p.print(30.0, 0)
        os.kill(os.getpid(), signal.SIGUSR1)
        p.print(60.0, 0)
        p.print(90.0, 0)
    finally:
        p.end()
    assert (out.getvalue(), err.getvalue()) == ("", "    (60.00/100%)\n")
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
