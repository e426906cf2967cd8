"""`qcow2 convert -O raw` and `qcow2 compare` against qemu-img 7.2.

convert: the output bytes equal qemu-img's, and so does the sparse layout of the output file
(SEEK_DATA/SEEK_HOLE map), for every image of the read matrix and for crafted zero patterns
under several -S values. compare: exit status and stdout equal qemu-img's for identical,
differing (at aligned and unaligned offsets), different-size and strict-mode cases, including
the strict block-status walk over every matrix image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from qcow2.cli.main import main
from tests.conftest import data_map, qemu_img, qemu_io
from tests.differential.conftest import CASE_NAMES, MatrixImage, MiB

pytestmark = pytest.mark.oracle



def same_bytes(a: Path, b: Path, ranges: Sequence[tuple[int, int]] | None = None) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if ranges is None:
            while True:
                x = fa.read(1 << 20)
                if x != fb.read(1 << 20):
                    return False
                if not x:
                    return True
        for start, length in ranges:
            fa.seek(start)
            fb.seek(start)
            if fa.read(length) != fb.read(length):
                return False
    return True


def ours(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def theirs(*argv: str | Path, cwd: Path | None = None) -> tuple[int, str, str]:
    # bytes, not text mode: universal newlines would turn the progress "\r" into "\n"
    p = subprocess.run(["qemu-img", *map(str, argv)], capture_output=True, cwd=cwd)
    return (p.returncode, p.stdout.decode(),
            p.stderr.decode().replace("qemu-img: ", "qcow2: "))


def assert_same_convert(capsys: pytest.CaptureFixture[str], tmp: Path, argv: Sequence[str | Path],
                        srcs: Sequence[str | Path], cwd: Path | None = None) -> Path:
    """Convert with both tools; outputs must have the same bytes and the same holes."""
    mine = tmp / "ours.raw"
    ref = tmp / "qemu.raw"
    rc, _, err = ours(capsys, "convert", *argv, *srcs, mine)
    assert (rc, err) == (0, "")
    qemu_img("convert", *argv, *srcs, ref, cwd=cwd)
    assert data_map(mine) == data_map(ref)
    assert same_bytes(mine, ref, None if os.path.getsize(ref) <= 256 * MiB
                      else data_map(ref))
    return mine


# ----------------------------------------------------------------------------- convert: matrix
@pytest.mark.parametrize("name", CASE_NAMES)
def test_convert_matrix(matrix: dict[str, MatrixImage], name: str, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                        ) -> None:
    case = matrix[name]
    assert case.raw is not None
    # relative external data files resolve against the current directory, as in QEMU
    monkeypatch.chdir(case.path.parent)
    mine = tmp_path / "ours.raw"
    argv = ["convert", *(["-l", case.snapshot] if case.snapshot else []), "-O", "raw",
            str(case.path), str(mine)]
    rc, out, err = ours(capsys, *argv)
    assert (rc, out, err) == (0, "", "")
    assert os.path.getsize(mine) == os.path.getsize(case.raw)
    qmap = data_map(case.raw)
    assert data_map(mine) == qmap
    assert same_bytes(mine, case.raw, None if case.full_read else qmap)


# ----------------------------------------------------------------------------- convert: holes
def _zero_pattern_raw(path: Path) -> None:
    """Data with zero runs of many lengths and alignments (in sectors), and a real hole."""
    chunk = bytes(range(1, 256)) * 3   # 765 bytes, no zero byte
    buf = bytearray()
    for zeros in (1, 3, 7, 8, 9, 15, 16, 17, 31, 64, 127, 128, 129, 255, 600):
        for lead in (1, 2, 5, 8):
            buf += (chunk * 2)[:lead * 512 - 37]   # data ending inside a sector
            buf += bytes(37)
            buf += bytes(zeros * 512)
    buf += bytes(3 * MiB)                          # zeros spanning a 2 MiB request border
    buf += chunk * 100
    with open(path, "wb") as f:
        f.write(buf)
        f.seek(len(buf) + 5 * MiB)                 # a hole, then data that ends mid-sector
        f.write(chunk)


@pytest.mark.parametrize("sparse", [None, "0", "512", "1k", "4k", "6k", "64k", "1M"])
def test_convert_sparse_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              sparse: str | None) -> None:
    src = tmp_path / "src.raw"
    _zero_pattern_raw(src)
    argv = [] if sparse is None else ["-S", sparse]
    assert_same_convert(capsys, tmp_path, argv, [src])


def test_convert_sparse_qcow2_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "src.raw"
    _zero_pattern_raw(raw)
    q = tmp_path / "src.qcow2"
    qemu_img("convert", "-S", "0", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, q)
    qemu_io(q, "write -z 1M 64k", "write -P 0 2M 8k", "discard 3M 128k")
    for argv in ([], ["-S", "0"], ["-S", "16k"]):
        assert_same_convert(capsys, tmp_path, argv, [q])


def test_convert_concatenates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", a, "3M")
    qemu_io(a, "write -P 0x11 0 1M", "write -P 0x22 2M 1M")
    b = tmp_path / "b.raw"
    b.write_bytes(b"\x33" * 5000)           # not a multiple of 512: rounded up
    c = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", c, "1M")
    qemu_io(c, "write -P 0x44 4k 4k")
    assert_same_convert(capsys, tmp_path, [], [a, b, c])
    # the key=value snapshot form applies to the first source only
    qemu_img("snapshot", "-c", "one", a)
    qemu_io(a, "write -P 0x55 0 2M")
    assert_same_convert(capsys, tmp_path, ["-l", "snapshot.id=1"], [a, b])


def test_convert_snapshot_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "first", img)
    qemu_io(img, "write -P 2 1M 1M")
    qemu_img("snapshot", "-c", "2", img)         # a name that is also an ID
    qemu_io(img, "write -P 3 2M 1M")
    for param in ("1", "first", "2", "snapshot.id=1", "snapshot.name=first",
                  "snapshot.id=2,snapshot.name=2", "snapshot.name=2"):
        assert_same_convert(capsys, tmp_path, ["-l", param], [img])


# ----------------------------------------------------------------------------- convert: messages
def _small(tmp: Path) -> Path:
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 7 0 1M", "write -P 8 2M 512k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_img("snapshot", "-c", "a", img)
    return img


@pytest.mark.parametrize("argv", [
    ["nonexist.qcow2", "o.raw"],
    ["-p", "nonexist.qcow2", "o.raw"],
    ["-p", "-t", "bogus", "a.qcow2", "o.raw"],
    ["-f", "foo", "a.qcow2", "o.raw"],
    ["-f", "qcow2", "r.raw", "o.raw"],
    ["-O", "foo", "a.qcow2", "o.raw"],
    ["-O", "bochs", "a.qcow2", "o.raw"],
    ["-S", "100", "a.qcow2", "o.raw"],
    ["-S", "1x", "a.qcow2", "o.raw"],
    ["-S", "32M", "a.qcow2", "o.raw"],
    ["-m", "0", "a.qcow2", "o.raw"],
    ["-m", "17", "a.qcow2", "o.raw"],
    ["-l", "nope", "a.qcow2", "o.raw"],
    ["-l", "snapshot.id=1,snapshot.name=s2", "a.qcow2", "o.raw"],
    ["-l", "snapshot.foo=1", "a.qcow2", "o.raw"],
    ["-l", "snapshot.id=a,snapshot.name=a", "a.qcow2", "o.raw"],
    ["-l", "s1", "a.qcow2", "a.qcow2", "o.raw"],
    ["-l", "s1", "r.raw", "o.raw"],
    ["-T", "bogus", "a.qcow2", "o.raw"],
    ["-t", "bogus", "a.qcow2", "o.raw"],
    ["a.qcow2"],
    ["a.qcow2", "nodir/o.raw"],
    ["a.qcow2", "adir"],
    ["a.qcow2", "/dev/null"],
    ["a.qcow2", "a.qcow2"],
    ["-f", "raw", "r.raw", "r.raw"],
])
def test_convert_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    _small(tmp_path)
    (tmp_path / "r.raw").write_bytes(b"x" * 4096)
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    want = theirs("convert", *argv, cwd=tmp_path)
    assert want[0] != 0
    got = ours(capsys, "convert", *argv)
    assert got == want


def test_convert_progress_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "p.qcow2"
    qemu_img("create", "-f", "qcow2", img, "64M")
    qemu_io(img, "write -P 1 0 1M", "write -P 2 10M 3M", "write -P 3 40M 1M",
            "write -P 4 50M 7M")
    for argv in (["-p"], ["-p", "-S", "0"], ["-p", "-q"]):
        rc, out, err = ours(capsys, "convert", *argv, img, tmp_path / "o.raw")
        assert (rc, out, err) == theirs("convert", *argv, img, tmp_path / "q.raw")
    empty = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", empty, "8M")
    assert ours(capsys, "convert", "-p", empty, tmp_path / "o.raw") == \
        theirs("convert", "-p", empty, tmp_path / "q.raw")


# ----------------------------------------------------------------------------- compare: matrix
@pytest.mark.parametrize("name", [n for n in CASE_NAMES if not n.startswith("snap")])
def test_compare_matrix(matrix: dict[str, MatrixImage], name: str,
                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                        ) -> None:
    case = matrix[name]
    assert case.raw is not None
    monkeypatch.chdir(case.path.parent)
    cwd = case.path.parent
    pairs: list[list[str | Path]] = [["-s", case.path, case.path]]
    if case.full_read:
        pairs += [[case.path, case.raw], ["-s", case.path, case.raw]]
    for argv in pairs:
        assert ours(capsys, "compare", *argv) == theirs("compare", *argv, cwd=cwd), argv


# ----------------------------------------------------------------------------- compare: pairs
@pytest.fixture(scope="module")
def pair_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    base = d / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 0x5a 0 3M", "write -z 4M 64k", "write -P 0x6b 6M 64k")
    qemu_img("convert", "-O", "raw", base, d / "base.raw")
    return d


@pytest.fixture
def pair_dir(pair_base: Path, tmp_path: Path) -> Path:
    for name in ("base.qcow2", "base.raw"):
        shutil.copy(pair_base / name, tmp_path / name)
    return tmp_path


def _variant(d: Path, name: str, *cmds: str, size: str | None = None,
             fmt: str = "qcow2") -> Path:
    p = d / name
    src = d / ("base.raw" if fmt == "raw" else "base.qcow2")
    shutil.copy(src, p)
    if size is not None:
        qemu_img("resize", "-f", fmt, p, size)
    if cmds:
        qemu_io(p, *cmds, fmt=fmt)
    return p


@pytest.mark.parametrize("cmds", [
    ("write -P 1 0 1",), ("write -P 1 511 1",), ("write -P 1 512 1",), ("write -P 1 65535 1",),
    ("write -P 1 2097155 1",), ("write -P 1 3145727 1",), ("write -P 0 1M 64k",),
    ("write -P 1 3M 512",), ("write -P 1 5M 4k",), ("write -P 1 8388607 1",),
    ("write -z 4M 64k", "write -P 0 4M 64k"), ("discard 0 64k",), ("write -z 0 3M",),
    ("write -P 0x5a 7M 64k", "write -z 7M 64k"),
])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_compare_pairs(pair_dir: Path, capsys: pytest.CaptureFixture[str],
                       cmds: tuple[str, ...], fmt: str) -> None:
    other = _variant(pair_dir, f"v.{fmt}", *cmds, fmt=fmt)
    base = pair_dir / "base.qcow2"
    for argv in ([base, other], ["-s", other, base]):
        assert ours(capsys, "compare", *argv) == theirs("compare", *argv), argv


@pytest.mark.parametrize("argv", [["-p"], ["-q"], ["-p", "-q"], ["-p", "-s"]])
def test_compare_progress_and_quiet(pair_dir: Path, capsys: pytest.CaptureFixture[str],
                                    argv: list[str]) -> None:
    base = pair_dir / "base.qcow2"
    other = _variant(pair_dir, "v.qcow2", "write -P 1 5M 4k")
    big = _variant(pair_dir, "big.raw", size="+3M", fmt="raw")
    for files in ([base, pair_dir / "base.raw"], [base, other], [big, base]):
        assert ours(capsys, "compare", *argv, *files) == theirs("compare", *argv, *files)


@pytest.mark.parametrize("size,cmds", [
    ("+1M", ()), ("+1M", ("write -P 3 8M 512",)), ("+1M", ("write -P 3 9437183 1",)),
    ("+1M", ("write -z 8M 1M",)), ("+1M", ("write -P 0 8M 1M",)), ("12M", ("write -P 9 11M 4k",)),
])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_compare_sizes(pair_dir: Path, capsys: pytest.CaptureFixture[str], size: str,
                       cmds: tuple[str, ...], fmt: str) -> None:
    big = _variant(pair_dir, f"big.{fmt}", *cmds, size=size, fmt=fmt)
    base = pair_dir / "base.qcow2"
    for argv in ([base, big], [big, base], ["-s", base, big]):
        assert ours(capsys, "compare", *argv) == theirs("compare", *argv), argv


def test_compare_backing_chains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "2M")
    qemu_io(base, "write -P 1 0 2M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "4M")
    qemu_io(top, "write -P 2 64k 64k")
    flat = tmp_path / "flat.qcow2"
    qemu_img("convert", "-O", "qcow2", top, flat)
    raw = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", top, raw)
    for argv in ([top, flat], ["-s", top, flat], ["-s", top, top], ["-s", top, raw],
                 [top, base], ["-s", base, top], ["-f", "qcow2", "-F", "raw", top, raw]):
        assert ours(capsys, "compare", *argv) == theirs("compare", *argv), argv


@pytest.mark.parametrize("argv", [
    ["a.qcow2"], ["a.qcow2", "a.qcow2", "a.qcow2"], ["-T", "foo", "a.qcow2", "a.qcow2"],
    ["nonexist", "a.qcow2"], ["a.qcow2", "nonexist"], ["-f", "foo", "a.qcow2", "a.qcow2"],
    ["-F", "qcow2", "a.qcow2", "r.raw"], ["-p", "a.qcow2", "nonexist"],
])
def test_compare_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    _small(tmp_path)
    (tmp_path / "r.raw").write_bytes(b"x" * 4096)
    monkeypatch.chdir(tmp_path)
    want = theirs("compare", *argv, cwd=tmp_path)
    want = (want[0], want[1], want[2].replace("'qemu-img --help'", "'qcow2 --help'"))
    assert ours(capsys, "compare", *argv) == want


def test_compare_after_convert_many_sizes(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Our raw output compares identical to the source, with both tools."""
    src = tmp_path / "src.raw"
    _zero_pattern_raw(src)
    mine = assert_same_convert(capsys, tmp_path, [], [src])
    for argv in ([src, mine], ["-s", src, mine]):
        assert ours(capsys, "compare", *argv) == theirs("compare", *argv)


# ----------------------------------------------------------------------------- damaged images
def _poke_l2_entry(path: Path, index: int, fn: Callable[[int], int]) -> int:
    """Rewrite entry `index` of the first L2 table; returns the old entry."""
    with open(path, "r+b") as f:
        header = f.read(48)
        l1_offset = int.from_bytes(header[40:48], "big")
        f.seek(l1_offset)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8 * index)
        old = int.from_bytes(f.read(8), "big")
        f.seek(l2 + 8 * index)
        f.write(fn(old).to_bytes(8, "big"))
    return old


def test_damaged_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    unaligned = tmp_path / "unaligned.qcow2"
    qemu_img("create", "-f", "qcow2", unaligned, "4M")
    qemu_io(unaligned, "write -P 1 0 64k", "write -P 2 128k 64k")
    _poke_l2_entry(unaligned, 2, lambda e: e + 512)
    garbled = tmp_path / "garbled.qcow2"
    qemu_img("create", "-f", "qcow2", garbled, "4M")
    qemu_io(garbled, "write -P 1 0 64k", "write -c -P 7 64k 64k")
    entry = _poke_l2_entry(garbled, 1, lambda e: e)
    with open(garbled, "r+b") as f:
        f.seek(entry & ((1 << 54) - 1))
        f.write(b"\xff" * 64)
    for img in ("unaligned.qcow2", "garbled.qcow2"):
        for argv in (["convert", img, "o.raw"], ["compare", img, img],
                     ["compare", "-s", img, img]):
            assert ours(capsys, *argv) == theirs(*argv, cwd=tmp_path), argv
