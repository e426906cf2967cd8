"""`qcow2 measure` against `qemu-img measure`: the same numbers, text, JSON and errors, for
new images of every size and option combination and for every image of the read matrix."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from qcow2.cli.main import main
from qcow2.ops.measure import prealloc_size, refcount_metadata_size
from tests.conftest import qemu_img
from tests.differential.conftest import CASE_NAMES, MatrixImage

pytestmark = pytest.mark.oracle


def ours(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["measure", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def theirs(*argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
    p = qemu_img("measure", *argv, check=False, cwd=cwd)
    return p.returncode, p.stdout, p.stderr.replace("qemu-img: ", "qcow2: ")


SIZES = ["0", "1", "1000", "64k", "1M", "100M", "1G", "17G", "1T", "64T", "1P", "8E"]
OPTION_SETS = [
    "", "cluster_size=512", "cluster_size=4k", "cluster_size=2M", "compat=0.10",
    "refcount_bits=1", "refcount_bits=8", "refcount_bits=64", "extended_l2=on",
    "extended_l2=on,cluster_size=16k", "extended_l2=on,cluster_size=2M",
    "preallocation=metadata", "preallocation=falloc", "preallocation=full",
    "backing_file=b.qcow2", "lazy_refcounts=on", "compression_type=zstd",
    "cluster_size=512,refcount_bits=64", "cluster_size=2M,refcount_bits=1,preallocation=full",
]


@pytest.mark.parametrize(("size", "opts"), list(itertools.product(SIZES, OPTION_SETS)))
def test_new_image_sizes(capsys: pytest.CaptureFixture[str], size: str, opts: str) -> None:
    argv = ["-O", "qcow2", "--size", size, "--output=json"] + (["-o", opts] if opts else [])
    exp = theirs(*argv)
    got = ours(capsys, *argv)
    assert got == exp


@pytest.mark.parametrize("size", ["0", "1", "511", "513", "1G", "1E"])
@pytest.mark.parametrize("output", ["human", "json"])
def test_raw_target(capsys: pytest.CaptureFixture[str], size: str, output: str) -> None:
    argv = ["--size", size, f"--output={output}"]
    assert ours(capsys, *argv) == theirs(*argv)


ERRORS = [
    [], ["--size", "1G", "x.qcow2"], ["-f", "qcow2"], ["-l", "s"], ["--size", "-1"],
    ["--size", "1x"], ["--size", "1G", "--output=xml"], ["a", "b"],
    ["--size", "1G", "-O", "qcow"], ["--size", "1G", "-O", "vmdk"], ["--size", "1G", "-O", "foo"],
    ["--size", "1G", "-O", "bochs"], ["--size", "1G", "-O", "luks"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1x"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=8k,extended_l2=on"],
    ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=maybe"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=v2"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"],
    ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
    ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=0"],
    ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=x"],
    ["--size", "1G", "-O", "qcow2", "-o", "preallocation=foo"],
    ["--size", "1G", "-O", "qcow2", "-o", "bogus=1"],
    ["--size", "1G", "-O", "qcow2", "-o", "encrypt.format=luks"],
    ["--size", "1G", "-O", "qcow2", "-o", "encrypt.format=aes"],
    ["--size", "1G", "-O", "qcow", "-o", "bogus=1"],
    ["--size", "1G", "-O", "raw", "-o", "cluster_size=4k"],
    ["--size", "1G", "-O", "qcow2", "-o", ",cluster_size=4k"],
    ["--size", "1G", "-O", "qcow2", "-o", "help"],
    ["-O", "qcow2", "-o", "size=5G"],
    ["--size", "1T", "-O", "qcow2", "-o", "cluster_size=512"],
    ["-O", "qcow2", "missing.qcow2"],
]


@pytest.mark.parametrize("argv", ERRORS, ids=[" ".join(a) or "none" for a in ERRORS])
def test_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert ours(capsys, *argv) == theirs(*argv)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("target", ["-o cluster_size=64k", "-o cluster_size=4k,refcount_bits=1",
                                    "-o cluster_size=2M,extended_l2=on", "-o compat=0.10",
                                    "-o backing_file=x", "-o preallocation=full"])
def test_matrix_sources(matrix: dict[str, MatrixImage], capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch, name: str, target: str) -> None:
    case = matrix[name]
    monkeypatch.chdir(case.path.parent)
    argv = ["-O", "qcow2", *target.split(), "--output=json", case.path.name]
    if case.snapshot is not None:
        argv[:0] = ["-l", case.snapshot]
    exp = theirs(*argv, cwd=case.path.parent)
    got = ours(capsys, *argv)
    assert got == exp
    if exp[0] == 0:
        assert json.loads(got[1])["required"] <= json.loads(got[1])["fully-allocated"] or \
            "backing_file" in target


def test_raw_and_human_source(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        for off in (0, 70000, 5 << 20, (9 << 20) - 100):
            f.seek(off)
            f.write(os.urandom(3000))
        f.truncate(16 << 20)
    for argv in (["-O", "qcow2", "src.raw"], ["-O", "qcow2", "-o", "cluster_size=512", "src.raw"],
                 ["src.raw"], ["-f", "raw", "-O", "qcow2", "--output=json", "src.raw"]):
        assert ours(capsys, *argv) == theirs(*argv, cwd=tmp_path)


def test_formulas_match_qemu_for_odd_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    # the helpers themselves, checked against the oracle beyond the size list above
    for size in (12345, 3 << 30, (1 << 40) + 1):
        for cs, order in ((512, 0), (65536, 4), (1 << 21, 6)):
            rc, out, _ = theirs("-O", "qcow2", "--size", str(size), "-o",
                                f"cluster_size={cs},refcount_bits={1 << order}", "--output=json")
            if rc == 0:   # 1 TiB in 512-byte clusters is over the L1 limit
                assert prealloc_size(size, cs, order, False) == json.loads(out)["fully-allocated"]
    assert refcount_metadata_size(0, 65536, 4) == 0
    assert refcount_metadata_size(1, 65536, 4) == 2 * 65536
