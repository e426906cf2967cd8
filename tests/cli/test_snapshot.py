"""`qcow2 snapshot` in-process: listing layout, errors and exit statuses (the texts are
qemu-img 7.2's; tests/differential/test_snapshots.py compares them with the real thing)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import qcow2
from qcow2.cli.main import main
from qcow2.engine.writer import WritableQcow2Image

TRY = "Try 'qcow2 --help' for more information\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["snapshot", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "img.qcow2"
    qcow2.create(str(p), 1 << 20)
    return p


def test_create_list_apply_delete(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    assert run(capsys, "-l", str(image)) == (0, "", "")
    with qcow2.open(str(image), readonly=False) as img:
        img.write(0, b"a" * 4096)
    assert run(capsys, "-c", "first", str(image)) == (0, "", "")
    with qcow2.open(str(image), readonly=False) as img:
        img.write(0, b"b" * 4096)
    assert run(capsys, "-c", "a_name_longer_than_16", str(image)) == (0, "", "")
    assert run(capsys, "-c", "", str(image)) == (0, "", "")
    rc, out, err = run(capsys, "-l", str(image))
    assert rc == 0 and err == ""
    date = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    lines = out.splitlines()
    assert lines[0] == "Snapshot list:"
    assert lines[1] == ("ID        TAG               VM SIZE                DATE     VM CLOCK"
                        "     ICOUNT")
    assert re.fullmatch(rf"1         first                 0 B {date} 00:00:00.000          0",
                        lines[2])
    assert re.fullmatch(rf"2         a_name_longer_than_16      0 B {date} 00:00:00.000"
                        r"          0", lines[3])
    assert re.fullmatch(rf"3                               0 B {date} 00:00:00.000          0",
                        lines[4])
    assert run(capsys, "-a", "first", str(image)) == (0, "", "")
    with qcow2.open(str(image)) as img:
        assert img.read(0, 4096) == b"a" * 4096
    assert run(capsys, "-a", "2", str(image)) == (0, "", "")  # an ID
    with qcow2.open(str(image)) as img:
        assert img.read(0, 4096) == b"b" * 4096
    # -d matches names only
    assert run(capsys, "-d", "1", str(image)) == (
        1, "", "qcow2: Could not delete snapshot '1': snapshot not found\n")
    assert run(capsys, "-d", "first", str(image)) == (0, "", "")
    assert run(capsys, "-d", "", str(image)) == (0, "", "")
    with qcow2.open(str(image)) as img:
        assert [(s.id_str, s.name) for s in img.snapshots] == [("2", "a_name_longer_than_16")]
    # The next ID is one more than the largest.
    assert run(capsys, "-c", "again", str(image)) == (0, "", "")
    with qcow2.open(str(image)) as img:
        assert [s.id_str for s in img.snapshots] == ["2", "3"]


def test_errors(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    f = str(image)
    assert run(capsys, "-a", "nope", f) == (
        1, "", "qcow2: Could not apply snapshot 'nope': Failed to load snapshot: No such file "
               "or directory\n")
    assert run(capsys, "-d", "nope", f) == (
        1, "", "qcow2: Could not delete snapshot 'nope': snapshot not found\n")
    assert run(capsys, "-l", "-c", "x", f) == (
        1, "", "qcow2: Cannot mix '-l', '-a', '-c', '-d'\n" + TRY)
    assert run(capsys, "-c", "x") == (1, "", "qcow2: Expecting one image file name\n" + TRY)
    assert run(capsys, "-x", f) == (1, "", "qcow2: unrecognized option '-x'\n" + TRY)
    assert run(capsys, f, "-c") == (1, "", "qcow2: missing argument for option '-c'\n" + TRY)
    assert run(capsys, "-U", "-c", "x", f) == (
        1, "", f"qcow2: Could not open '{f}': force-share=on can only be used with read-only "
               "images\n")
    assert run(capsys, "-U", "-l", f) == (0, "", "")
    assert run(capsys, f, "-l") == (0, "", "")  # options after the file name, as getopt
    rc, _, err = run(capsys, "-l", f + ".missing")
    assert rc == 1 and err.startswith(f"qcow2: Could not open '{f}.missing': ")


def test_refcount_overflow(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "r1.qcow2"
    qcow2.create(str(p), 1 << 20, refcount_bits=1)
    with qcow2.open(str(p), readonly=False) as img:
        img.write(0, b"x" * 65536)
    assert run(capsys, "-c", "s", str(p)) == (
        1, "", "qcow2: Could not create snapshot 's': -22 (Invalid argument)\n")
    with qcow2.open(str(p)) as img:
        assert img.snapshots == []


def test_long_name_truncated(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    assert run(capsys, "-c", "é" * 200, str(image)) == (0, "", "")
    with qcow2.open(str(image)) as img:
        raw = img.snapshots[0].name.encode("utf-8", "surrogateescape")
    assert raw == ("é" * 200).encode()[:255]


def test_other_formats(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    q = tmp_path / "v1.qcow"
    qcow2.create(str(q), 1 << 20, fmt="qcow")
    assert run(capsys, "-c", "x", str(q)) == (
        1, "", "qcow2: Could not create snapshot 'x': -95 (Operation not supported)\n")
    assert run(capsys, "-a", "x", str(q)) == (
        1, "", "qcow2: Could not apply snapshot 'x': Block driver does not support snapshots\n")
    assert run(capsys, "-l", str(q)) == (0, "", "")


def test_api(image: Path) -> None:
    with qcow2.open(str(image), readonly=False) as img:
        assert isinstance(img, WritableQcow2Image)
        img.write(0, b"1" * 100)
        s1 = img.create_snapshot("one", date_sec=1000, date_nsec=5)
        img.write(0, b"2" * 100)
        assert (s1.id_str, s1.date_sec, s1.date_nsec, s1.icount) == ("1", 1000, 5, 0)
        assert [s.name for s in img.list_snapshots()] == ["one"]
        with pytest.raises(qcow2.NotFoundError):
            img.apply_snapshot("two")
        with pytest.raises(ValueError):
            img.create_snapshot("a\0b")
        img.apply_snapshot("one")
        assert img.read(0, 100) == b"1" * 100
        img.delete_snapshot("1")
        assert img.list_snapshots() == []
