"""`qcow2 convert -B/-F, -n, --target-is-zero` in-process (no oracle): what reaches the
target, and the messages and exit statuses (the texts were taken from qemu-img 7.2; the
differential tests compare them with it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qcow2.cli.main import main
from qcow2.engine.open import open_image
from qcow2.format.builder import ZERO, ImageSpec, build_image

CS = 65536
MiB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """base.qcow2 (4 MiB of 0x01) <- top.qcow2: data in cluster 1, a zero cluster 2, zeros
    written as data in cluster 3, the rest unallocated."""
    monkeypatch.chdir(tmp_path)
    base: dict[int, object] = {i: b"\x01" * CS for i in range(64)}
    Path("base.qcow2").write_bytes(build_image(ImageSpec(size=4 * MiB, clusters=base)))
    top = ImageSpec(size=4 * MiB, backing_file="base.qcow2", backing_format="qcow2",
                    clusters={1: b"\x02" * CS, 2: ZERO, 3: bytes(CS)})
    Path("top.qcow2").write_bytes(build_image(top))
    Path("solo.qcow2").write_bytes(build_image(ImageSpec(size=4 * MiB,
                                                         clusters={1: b"\x03" * CS})))
    return tmp_path


def _layers(path: str) -> list[tuple[int, int, int, bool, bool]]:
    with open_image(path, "qcow2", True, backing_policy="follow") as dev:
        return [(e.start, e.length, e.depth, e.data, e.zero) for e in dev.extents()]


def test_backing_target_gets_the_top_layer_only(chain: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
               "top.qcow2", "out.qcow2") == (0, "", "")
    with open_image("out.qcow2", "qcow2", True, backing_policy="follow") as out, \
            open_image("top.qcow2", "qcow2", True, backing_policy="follow") as top:
        assert out.backing is not None and out.backing.filename == "base.qcow2"
        assert out.read(0, 4 * MiB) == top.read(0, 4 * MiB)
    # unallocated in the top layer: left to the backing file (depth 1); zeros, including the
    # zero-filled data cluster, are zero clusters (the backing file would show otherwise)
    assert _layers("out.qcow2") == [(0, CS, 1, True, False), (CS, CS, 0, True, False),
                                    (2 * CS, 2 * CS, 0, False, True),
                                    (4 * CS, 4 * MiB - 4 * CS, 1, True, False)]


def test_backing_target_of_a_standalone_source(chain: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # without a backing file the unallocated areas read as zero: they must hide the new one
    assert run(capsys, "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
               "solo.qcow2", "out.qcow2") == (0, "", "")
    assert _layers("out.qcow2") == [(0, CS, 0, False, True), (CS, CS, 0, True, False),
                                    (2 * CS, 4 * MiB - 2 * CS, 0, False, True)]


def test_no_create_raw_writes_in_place(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("t.raw").write_bytes(b"\xaa" * (5 * MiB))
    assert run(capsys, "convert", "-n", "solo.qcow2", "t.raw") == (0, "", "")
    data = Path("t.raw").read_bytes()
    # zeros are written (as holes), what lies past the source is kept
    assert data == bytes(CS) + b"\x03" * CS + bytes(4 * MiB - 2 * CS) + b"\xaa" * MiB
    Path("t.raw").write_bytes(b"\xaa" * (5 * MiB))
    assert run(capsys, "convert", "-n", "--target-is-zero", "solo.qcow2", "t.raw") == (0, "", "")
    assert Path("t.raw").read_bytes() == b"\xaa" * CS + b"\x03" * CS + b"\xaa" * (5 * MiB - 2 * CS)
    Path("t.raw").write_bytes(b"\xaa" * (4 * MiB))
    assert run(capsys, "convert", "-n", "-B", "base.qcow2", "top.qcow2", "t.raw") == (0, "", "")
    assert Path("t.raw").read_bytes() == (b"\xaa" * CS + b"\x02" * CS + bytes(2 * CS)
                                          + b"\xaa" * (4 * MiB - 4 * CS))


def test_no_create_qcow2(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full: dict[int, object] = {i: b"\x09" * CS for i in range(64)}
    Path("t.qcow2").write_bytes(build_image(ImageSpec(size=4 * MiB, clusters=full)))
    assert run(capsys, "convert", "-n", "-O", "qcow2", "top.qcow2", "t.qcow2") == (0, "", "")
    with open_image("t.qcow2", "qcow2", True) as t, \
            open_image("top.qcow2", "qcow2", True, backing_policy="follow") as top:
        assert t.read(0, 4 * MiB) == top.read(0, 4 * MiB)
    # the zero clusters were unmapped
    assert [e for e in _layers("t.qcow2") if e[4]] == [(2 * CS, 2 * CS, 0, False, True)]


@pytest.mark.parametrize("argv,rc,message", [
    (["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "o.qcow2"], 1,
     "Use of backing file requires explicit backing format"),
    (["-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "o.raw"], 1,
     "Backing file not supported for file format 'raw'"),
    (["-F", "qcow2", "top.qcow2", "o.raw"], 1,
     "Backing file format not supported for file format 'raw'"),
    (["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "top.qcow2", "o.qcow2"],
     1, "Having a backing file for the target makes no sense when concatenating multiple "
        "input images"),
    (["--target-is-zero", "top.qcow2", "o.raw"], 1, "--target-is-zero requires use of -n flag"),
    (["-n", "-o", "cluster_size=4k", "top.qcow2", "o.raw"], 1,
     "-o has no effect when skipping image creation"),
    # qemu-img 7.2 prints this one but exits with status 0
    (["-n", "--target-is-zero", "-B", "base.qcow2", "top.qcow2", "small.raw"], 0,
     "Cannot use --target-is-zero when the destination image has a backing file"),
    (["-n", "top.qcow2", "small.raw"], 1, "output file is smaller than input file"),
    (["-n", "top.qcow2", "nope.raw"], 1,
     "Could not open 'nope.raw': Could not open 'nope.raw': No such file or directory"),
    (["-n", "-O", "qcow2", "top.qcow2", "small.raw"], 1,
     "Could not open 'small.raw': Image is not in qcow2 format"),
    (["-n", "-O", "foo", "top.qcow2", "small.raw"], 1,
     "Could not open 'small.raw': Unknown driver 'foo'"),
    (["-n", "top.qcow2", "top.qcow2"], 1,
     "Could not open 'top.qcow2': Failed to get \"write\" lock\n"
     "Is another process using the image [top.qcow2]?"),
])
def test_errors(chain: Path, capsys: pytest.CaptureFixture[str], argv: list[str], rc: int,
                message: str) -> None:
    Path("small.raw").write_bytes(bytes(4096))
    before = Path("small.raw").read_bytes()
    assert run(capsys, "convert", *argv) == (rc, "", f"qcow2: {message}\n")
    assert not os.path.exists("o.qcow2") and not os.path.exists("o.raw")
    assert Path("small.raw").read_bytes() == before
