"""`qcow2 map` in-process on builder images: exact JSON and human text, options, errors.

Expected texts follow qemu-img 7.2 (checked against it by tests/differential/test_info_map.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qcow2.cli.main import main
from qcow2.format.builder import ZERO, ImageSpec, build_image

MiB = 1 << 20
HEADER = "Offset          Length          Mapped to       File\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make(path: Path, size: int = 1 * MiB, **kw: object) -> Path:
    path.write_bytes(build_image(ImageSpec(size=size, **kw)))  # type: ignore[arg-type]
    return path


# Builder layout with 64 KiB clusters: header, reftable, refblock, L1, one L2, then data
# from 0x50000 in guest order.
def plain(cwd: Path) -> Path:
    return make(cwd / "a.qcow2", clusters={0: b"a", 1: b"b", 3: ZERO, 5: b"c"})


def test_map_json(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain(cwd)
    rc, out, err = run(capsys, "map", "--output=json", "a.qcow2")
    assert (rc, err) == (0, "")
    assert out == (
        '[{ "start": 0, "length": 131072, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 327680},\n'
        '{ "start": 131072, "length": 65536, "depth": 0, "present": false, "zero": true, '
        '"data": false},\n'
        '{ "start": 196608, "length": 65536, "depth": 0, "present": true, "zero": true, '
        '"data": false},\n'
        '{ "start": 262144, "length": 65536, "depth": 0, "present": false, "zero": true, '
        '"data": false},\n'
        '{ "start": 327680, "length": 65536, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 458752},\n'
        '{ "start": 393216, "length": 655360, "depth": 0, "present": false, "zero": true, '
        '"data": false}]\n')


def test_map_human(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain(cwd)
    assert run(capsys, "map", "a.qcow2") == (0, HEADER + (
        "0               0x20000         0x50000         a.qcow2\n"
        "0x50000         0x10000         0x70000         a.qcow2\n"), "")


def test_map_window(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain(cwd)
    rc, out, _ = run(capsys, "map", "--output=json", "--start-offset=1000",
                     "--max-length=0x20000", "a.qcow2")
    assert rc == 0
    assert out == (
        '[{ "start": 1000, "length": 130072, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 328680},\n'
        '{ "start": 131072, "length": 1000, "depth": 0, "present": false, "zero": true, '
        '"data": false}]\n')
    assert run(capsys, "map", "-s", "1000", "-l", "1k", "a.qcow2")[1] == HEADER + "0x3e8           0x400           0x503e8         a.qcow2\n"


@pytest.mark.parametrize("argv", [["--start-offset=2M"], ["--max-length=0"],
                                  ["-s", "1M", "-l", "1"]])
def test_map_empty_range(cwd: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
                         ) -> None:
    # qemu-img prints its initial empty entry when there is nothing to map
    plain(cwd)
    start = {"--start-offset=2M": 2 * MiB, "-s": MiB}.get(argv[0], 0)
    rc, out, _ = run(capsys, "map", "--output=json", *argv, "a.qcow2")
    assert (rc, out) == (0, f'[{{ "start": {start}, "length": 0, "depth": 0, '
                            '"present": false, "zero": false, "data": false}]\n')
    assert run(capsys, "map", *argv, "a.qcow2") == (0, HEADER, "")


def test_map_compressed(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(cwd / "c.qcow2", clusters={0: b"x", 1: ("compressed", b"y" * 1000),
                                     2: ("compressed", b"z" * 1000)})
    out = run(capsys, "map", "--output=json", "c.qcow2")[1]
    assert out.splitlines()[1] == ('{ "start": 65536, "length": 131072, "depth": 0, '
                                   '"present": true, "zero": false, "data": true},')
    # human output lists what it can, then fails on the compressed run
    assert run(capsys, "map", "c.qcow2") == (
        1, HEADER + "0               0x10000         0x50000         c.qcow2\n",
        "qcow2: File contains external, encrypted or compressed clusters.\n")


def test_map_backing_chain(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (cwd / "base.raw").write_bytes(b"\x01" * 65536)
    make(cwd / "top.qcow2", 256 * 1024, backing_file="base.raw", backing_format="raw",
         clusters={1: b"t"})
    rc, out, err = run(capsys, "map", "--output=json", "top.qcow2")
    assert (rc, err) == (0, "")
    assert out == (
        '[{ "start": 0, "length": 65536, "depth": 1, "present": true, "zero": false, '
        '"data": true, "offset": 0},\n'
        '{ "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 327680},\n'
        '{ "start": 131072, "length": 131072, "depth": 0, "present": false, "zero": true, '
        '"data": false}]\n')
    assert run(capsys, "map", "top.qcow2")[1] == HEADER + (
        "0               0x10000         0               base.raw\n"
        "0x10000         0x10000         0x50000         top.qcow2\n")


def test_map_empty_image(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(cwd / "e.qcow2", 0)
    assert run(capsys, "map", "--output=json", "e.qcow2") == (
        0, '[{ "start": 0, "length": 0, "depth": 0, "present": false, "zero": false, '
           '"data": false}]\n', "")


@pytest.mark.parametrize("argv,message", [
    (["map", "missing.qcow2"],
     "Could not open 'missing.qcow2': Could not open 'missing.qcow2': "
     "No such file or directory"),
    (["map", "top.qcow2"],
     "Could not open 'top.qcow2': Could not open backing file: Could not open "
     "'nothere.qcow2': No such file or directory"),
    (["map", "--output=yaml", "a.qcow2"],
     "--output must be used with human or json as argument."),
    (["map", "--start-offset=1.5", "a.qcow2"],
     "Invalid start offset specified. You may use k, M, G, T, P or E suffixes for\n"
     "qcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."),
    (["map", "--max-length=-1", "a.qcow2"],
     "Invalid max length specified. You may use k, M, G, T, P or E suffixes for\n"
     "qcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."),
    (["map", "--max-length=8E", "a.qcow2"],
     "Invalid max length specified. Must be between 0 and 9223372036854775807."),
    (["map"], "Expecting one image file name"),
])
def test_map_errors(cwd: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                    message: str) -> None:
    plain(cwd)
    make(cwd / "top.qcow2", backing_file="nothere.qcow2", backing_format="qcow2")
    assert run(capsys, *argv) == (1, "", f"qcow2: {message}\n")


def test_map_corrupt_entry(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Guest clusters 0 and 1 map to 0x50000 and 0x60000 (builder layout); cluster 1's entry
    # gets an unaligned offset. qemu-img has printed nothing but "[" when the query at
    # cluster 1 fails: the entry of cluster 0 was still being merged.
    p = make(cwd / "b.qcow2", clusters={0: b"a", 1: b"b", 4: b"c"})
    with open(p, "r+b") as f:
        f.seek(4 * 65536 + 8)
        f.write((0x8000000000000000 | 0x60200).to_bytes(8, "big"))
    notice = ("qcow2: Image is corrupt: Cluster allocation offset 0x60200 unaligned (L2 offset: "
              "0x40000, L2 index: 0x1); further non-fatal corruption events will be "
              "suppressed\nqcow2: Could not read file metadata: Input/output error\n")
    assert run(capsys, "map", "--output=json", "b.qcow2") == (1, "[", notice)
    assert run(capsys, "map", "--output=json", "-s", "1k", "-l", "10k", "b.qcow2") == (
        0, '[{ "start": 1024, "length": 10240, "depth": 0, "present": true, "zero": false, '
           '"data": true, "offset": 328704}]\n', "")
    assert run(capsys, "map", "b.qcow2") == (1, HEADER, notice)


def test_map_corrupt_entry_after_others(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # cluster 0 is data, 1-3 unallocated, 4 unreadable: only the data entry was printed
    p = make(cwd / "b.qcow2", clusters={0: b"a", 4: b"c"})
    with open(p, "r+b") as f:
        f.seek(4 * 65536 + 4 * 8)
        f.write((0x8000000000000000 | 0x60200).to_bytes(8, "big"))
    rc, out, err = run(capsys, "map", "--output=json", "b.qcow2")
    assert (rc, out) == (1, '[{ "start": 0, "length": 65536, "depth": 0, "present": true, '
                            '"zero": false, "data": true, "offset": 327680},\n')
    assert err.endswith("Could not read file metadata: Input/output error\n")
    assert run(capsys, "map", "b.qcow2")[:2] == (
        1, HEADER + "0               0x10000         0x50000         b.qcow2\n")
