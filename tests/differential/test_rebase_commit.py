"""rebase and commit against qemu-img 7.2: the same chain (built by qemu-img/qemu-io) is copied
twice, one copy rebased/committed by qemu-img and the other by us. The guest views must be the
original's, every file `qemu-img check`-clean, `info --output=json` equal and every file of the
chain byte-identical to qemu-img's. Error cases compare stderr (program name aside), stdout
and exit status.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2
from tests.conftest import qemu_img, qemu_io

pytestmark = pytest.mark.oracle

OURS = [sys.executable, "-m", "qcow2"]
MiB = 1 << 20


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd)


def _both(cmd: str, args: list[str], q: Path, o: Path) -> tuple[
        subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    rq = _run(["qemu-img", cmd, *args], q)
    ro = _run([*OURS, cmd, *args], o)
    assert ro.returncode == rq.returncode, (args, rq.stderr, ro.stderr)
    assert ro.stderr.replace("qcow2:", "qemu-img:").replace("qcow2 --help", "qemu-img --help") \
        == rq.stderr, args
    assert ro.stdout == rq.stdout, args
    return rq, ro


def _raw(path: Path, tmp: Path) -> bytes:
    out = tmp / "view.raw"
    qemu_img("convert", "-O", "raw", path, out, cwd=path.parent)
    data = out.read_bytes()
    out.unlink()
    return data


def _info(path: Path) -> dict[str, object]:
    info = json.loads(qemu_img("info", "--output=json", path.name, cwd=path.parent).stdout)
    info.pop("actual-size", None)
    return dict(info)


def _layout(path: Path) -> tuple[int, list[list[object]]]:
    """(file size, the map without host offsets). Which host clusters hold data is left out:
    with the allocation order, L2 tables and refblocks land elsewhere too."""
    m = json.loads(qemu_img("map", "--output=json", path.name, cwd=path.parent).stdout)
    runs: list[list[object]] = []
    for e in m:   # merged again without host contiguity, which depends on the order
        key = [e["depth"], e["data"], e["zero"], "offset" in e]
        if runs and runs[-1][2:] == key:
            runs[-1][1] = int(str(runs[-1][1])) + e["length"]
        else:
            runs.append([e["start"], e["length"], *key])
    return path.stat().st_size, runs


def _check_clean(path: Path) -> None:
    r = qemu_img("check", path.name, cwd=path.parent, check=False)
    assert r.returncode == 0, (path, r.stdout, r.stderr)


# ----------------------------------------------------------------------------- chains
def _img(d: Path, *args: str) -> None:
    qemu_img(*args, cwd=d)


def _io(d: Path, name: str, *cmds: str, fmt: str | None = None) -> None:
    qemu_io(d / name, *cmds, fmt=fmt)


def chain_v3(d: Path) -> None:
    _img(d, "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    _io(d, "base.qcow2", "write -P 0x11 0 4M")
    _img(d, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    _io(d, "mid.qcow2", "write -P 0x22 1M 1M", "write -z 3M 64k")
    _img(d, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "6M")
    _io(d, "top.qcow2", "write -P 0x33 100k 8k", "write -z 3200k 256k", "write -P 0x44 5M 4k",
        "write -P 0x55 1500k 1k", "discard 2M 64k")


def chain_v2(d: Path) -> None:
    _img(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "base.qcow2", "4M")
    _io(d, "base.qcow2", "write -P 0x11 0 3M")
    _img(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "-b",
         "base.qcow2", "-F", "qcow2", "mid.qcow2")
    _io(d, "mid.qcow2", "write -P 0x22 1M 300k")
    _img(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "mid.qcow2", "-F",
         "qcow2", "top.qcow2")
    _io(d, "top.qcow2", "write -P 0x33 10k 70k", "write -z 2M 128k", "write -P 0x44 3M 512")


def chain_clusters(d: Path) -> None:
    # different cluster sizes per layer, a 512-byte-cluster top (an L2 table every 32 KiB)
    _img(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "2M")
    _io(d, "base.qcow2", "write -P 0x11 0 2M")
    _img(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "-b", "base.qcow2", "-F",
         "qcow2", "mid.qcow2")
    _io(d, "mid.qcow2", "write -P 0x22 100k 4k")
    _img(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "mid.qcow2", "-F",
         "qcow2", "top.qcow2", "3M")
    _io(d, "top.qcow2", "write -P 0x33 33k 3k", "write -z 64k 32k", "write -P 0x44 2047k 2k")


def chain_raw(d: Path) -> None:
    # raw at the bottom, a shorter middle layer, an extended-L2 top
    _img(d, "create", "-q", "-f", "raw", "base.raw", "3M")
    _io(d, "base.raw", "write -P 0x11 0 3M", fmt="raw")
    _img(d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "1M")
    _io(d, "mid.qcow2", "write -P 0x22 256k 64k")
    _img(d, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F",
         "qcow2", "top.qcow2", "4M")
    _io(d, "top.qcow2", "write -P 0x33 2k 2k", "write -z 128k 4k", "write -P 0x44 2M 100k")


CHAINS: dict[str, Callable[[Path], None]] = {
    "v3": chain_v3, "v2": chain_v2, "clusters": chain_clusters, "raw": chain_raw,
}
BASE = {"raw": "base.raw"}


def _new_backings(d: Path) -> None:
    """nb.qcow2 (shorter, part equal to the old chain), long.qcow2 (longer), nb.raw."""
    _img(d, "create", "-q", "-f", "qcow2", "nb.qcow2", "1M")
    _io(d, "nb.qcow2", "write -P 0x11 0 512k", "write -P 0x66 600k 100k")
    _img(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "long.qcow2", "8M")
    _io(d, "long.qcow2", "write -P 0x77 0 8M", "write -P 0x11 1M 64k")
    _img(d, "create", "-q", "-f", "raw", "nb.raw", "2M")
    _io(d, "nb.raw", "write -P 0x22 1M 1M", fmt="raw")


@pytest.fixture
def pair(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path, str]:
    name = request.param
    q = tmp_path / "q"
    q.mkdir()
    CHAINS[name](q)
    _new_backings(q)
    o = tmp_path / "o"
    shutil.copytree(q, o)
    return q, o, name


# Files whose layout may differ from qemu-img's (none left: the allocator places refblocks
# after the data they cover, and a last partial cluster is filled to its end, as QEMU).
LAYOUT_DIFFERS: set[tuple[str, str]] = set()


def _all_same(q: Path, o: Path, chain: str = "", skip: frozenset[str] = frozenset()) -> None:
    for f in sorted(q.iterdir()):
        if (chain, f.name) in LAYOUT_DIFFERS or f.name in skip:
            continue
        if f.suffix in (".qcow2", ".raw", ".qcow"):
            assert f.read_bytes() == (o / f.name).read_bytes(), f"{f.name} differs from qemu-img's"


# ----------------------------------------------------------------------------- rebase
REBASES = [
    ["-b", "nb.qcow2", "-F", "qcow2"],
    ["-b", "long.qcow2", "-F", "qcow2"],
    ["-b", "nb.raw", "-F", "raw"],
    ["-b", ""],
    ["-b", "base.qcow2", "-F", "qcow2"],            # in the old chain: only layers above
    ["-u", "-b", "nb.qcow2", "-F", "qcow2"],
    ["-u", "-b", ""],
    ["-u"],
    ["-p", "-b", "long.qcow2", "-F", "qcow2"],
]


@pytest.mark.parametrize("pair", list(CHAINS), indirect=True)
@pytest.mark.parametrize("args", REBASES, ids=lambda a: " ".join(a) or "none")
def test_rebase_matches_qemu_img(pair: tuple[Path, Path, str], args: list[str],
                                 tmp_path: Path) -> None:
    q, o, name = pair
    args = [BASE.get(name, a) if a == "base.qcow2" else a for a in args]
    if name == "raw" and "base.raw" in args:
        args[args.index("qcow2")] = "raw"
    before = _raw(q / "top.qcow2", tmp_path)
    _both("rebase", [*args, "top.qcow2"], q, o)
    _check_clean(o / "top.qcow2")
    assert _info(o / "top.qcow2") == _info(q / "top.qcow2")
    if "-u" not in args:
        assert _raw(o / "top.qcow2", tmp_path) == before
        assert _raw(q / "top.qcow2", tmp_path) == before
    _all_same(q, o, name)


@pytest.mark.parametrize("pair", ["v3"], indirect=True)
def test_rebase_api_standalone(pair: tuple[Path, Path, str], tmp_path: Path) -> None:
    q, o, _ = pair
    before = _raw(o / "top.qcow2", tmp_path)
    qcow2.rebase(str(o / "top.qcow2"), "")
    with qcow2.open(str(o / "top.qcow2")) as img:
        assert img.backing is None
        assert img.read(0, img.virtual_size) == before
    qemu_img("rebase", "-b", "", "top.qcow2", cwd=q)
    _all_same(q, o)


def test_rebase_qcow1_not_supported(tmp_path: Path) -> None:
    for d in (tmp_path / "q", tmp_path / "o"):
        d.mkdir()
        _img(d, "create", "-q", "-f", "qcow2", "base.qcow2", "2M")
        _io(d, "base.qcow2", "write -P 0x11 0 2M")
        _img(d, "create", "-q", "-f", "qcow", "-b", "base.qcow2", "-F", "qcow2", "top.qcow")
        _io(d, "top.qcow", "write -P 0x22 4k 4k")
        _img(d, "create", "-q", "-f", "qcow2", "nb.qcow2", "2M")
    q, o = tmp_path / "q", tmp_path / "o"
    for args in (["-b", "nb.qcow2", "-F", "qcow2"], ["-u", "-b", ""], ["-u"]):
        _both("rebase", [*args, "top.qcow"], q, o)
    _all_same(q, o)


REBASE_ERRORS = [
    [],
    ["-F", "qcow2"],
    ["-b", "nb.qcow2"],
    ["-u", "-b", "nb.qcow2"],
    ["-b", "missing.qcow2", "-F", "qcow2"],
    ["-b", "nb.qcow2", "-F", "bogus"],
    ["-u", "-b", "nb.qcow2", "-F", "bogus"],
    ["-b", "nb.raw", "-F", "qcow2"],
    ["-b", "top.qcow2", "-F", "qcow2"],
    ["-f", "raw", "-b", "nb.qcow2", "-F", "qcow2"],
    ["-f", "raw", "-u"],
    ["-t", "bogus", "-b", "nb.qcow2", "-F", "qcow2"],
    ["-T", "bogus", "-b", "nb.qcow2", "-F", "qcow2"],
    ["-p", "-b", "missing.qcow2", "-F", "qcow2"],
]


@pytest.mark.parametrize("pair", ["v3"], indirect=True)
@pytest.mark.parametrize("args", REBASE_ERRORS, ids=lambda a: " ".join(a) or "none")
def test_rebase_errors(pair: tuple[Path, Path, str], args: list[str]) -> None:
    q, o, _ = pair
    rq, _ = _both("rebase", [*args, "top.qcow2"], q, o)
    assert rq.returncode == 1
    _all_same(q, o)


@pytest.mark.parametrize("pair", ["v3"], indirect=True)
def test_rebase_errors_files(pair: tuple[Path, Path, str]) -> None:
    q, o, _ = pair
    for files in ([], ["top.qcow2", "mid.qcow2"], ["missing.qcow2"]):
        rq, _ = _both("rebase", ["-b", "nb.qcow2", "-F", "qcow2", *files], q, o)
        assert rq.returncode == 1
    # the old backing file is missing: the overlay itself does not open
    for d in (q, o):
        (d / "mid.qcow2").rename(d / "gone.qcow2")
    _both("rebase", ["-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"], q, o)
    _both("rebase", ["-u", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"], q, o)
    _all_same(q, o)


# ----------------------------------------------------------------------------- commit
COMMITS = [[], ["-d"], ["-b", "base.qcow2"], ["-b", "mid.qcow2"], ["-p"], ["-q"]]


@pytest.mark.parametrize("pair", list(CHAINS), indirect=True)
@pytest.mark.parametrize("args", COMMITS, ids=lambda a: " ".join(a) or "default")
def test_commit_matches_qemu_img(pair: tuple[Path, Path, str], args: list[str],
                                 tmp_path: Path) -> None:
    q, o, name = pair
    args = [BASE.get(name, a) if a == "base.qcow2" else a for a in args]
    before = _raw(q / "top.qcow2", tmp_path)
    # QEMU's commit job runs up to 16 requests at once: when several copy requests are in
    # flight, the order their clusters are allocated in the base varies from run to run.
    # The base must then be QEMU's up to that order: the same file size and the same map
    # but for host offsets (checked clean, and its guest view, above).
    if "-p" in args:
        # the job's progress lines depend on QEMU's event loop: compare the rest
        rq = _run(["qemu-img", "commit", *args, "top.qcow2"], q)
        ro = _run([*OURS, "commit", *args, "top.qcow2"], o)
        assert (ro.returncode, ro.stderr) == (rq.returncode, rq.stderr) == (0, "")
        # (text mode: "\r" reads as a line end)
        assert ro.stdout.startswith("    (0.00/100%)\n")
        assert ro.stdout.endswith("    (100.00/100%)\nImage committed.\n")
    else:
        _both("commit", [*args, "top.qcow2"], q, o)
    base = args[args.index("-b") + 1] if "-b" in args else "mid.qcow2"
    view = _raw(o / base, tmp_path)
    assert view[:len(before)] == before
    assert not view[len(before):].strip(b"\0")
    for f in o.iterdir():
        if f.suffix == ".qcow2":
            _check_clean(f)
    if "-d" not in args and "-b" not in args:
        assert _info(o / "top.qcow2") == _info(q / "top.qcow2")
        assert _raw(o / "top.qcow2", tmp_path) == before
    _all_same(q, o, name, frozenset({base}))
    if (name, base) not in LAYOUT_DIFFERS:
        assert _layout(q / base) == _layout(o / base)


def test_commit_snapshot_top_discards(tmp_path: Path) -> None:
    # a v3 top with a snapshot is emptied by discarding every cluster, not recreated
    q, o = tmp_path / "q", tmp_path / "o"
    q.mkdir()
    _img(q, "create", "-q", "-f", "qcow2", "base.qcow2", "2M")
    _io(q, "base.qcow2", "write -P 0x11 0 2M")
    _img(q, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    _io(q, "top.qcow2", "write -P 0x22 64k 128k")
    _img(q, "snapshot", "-c", "s1", "top.qcow2")   # (copied: the same timestamp in both)
    _io(q, "top.qcow2", "write -P 0x33 1M 64k")
    shutil.copytree(q, o)
    _both("commit", ["top.qcow2"], q, o)
    _check_clean(o / "top.qcow2")
    _all_same(q, o)


def test_commit_qcow1_top(tmp_path: Path) -> None:
    for d in (tmp_path / "q", tmp_path / "o"):
        d.mkdir()
        _img(d, "create", "-q", "-f", "qcow2", "base.qcow2", "2M")
        _io(d, "base.qcow2", "write -P 0x11 0 2M")
        _img(d, "create", "-q", "-f", "qcow", "-b", "base.qcow2", "-F", "qcow2", "top.qcow")
        _io(d, "top.qcow", "write -P 0x22 4k 8k", "write -P 0x33 1M 512")
    q, o = tmp_path / "q", tmp_path / "o"
    _both("commit", ["top.qcow"], q, o)
    _all_same(q, o)


def test_commit_api(tmp_path: Path) -> None:
    chain_v3(tmp_path)
    before = _raw(tmp_path / "top.qcow2", tmp_path)
    qcow2.commit(str(tmp_path / "top.qcow2"), drop=True)
    assert _raw(tmp_path / "mid.qcow2", tmp_path) == before
    with pytest.raises(qcow2.Qcow2Error, match="Did not find 'x' in the backing chain"):
        qcow2.commit(str(tmp_path / "top.qcow2"), "x")


COMMIT_ERRORS = [
    ["-b", "nothere", "top.qcow2"],
    ["-b", "top.qcow2", "top.qcow2"],
    ["base.qcow2"],
    ["-f", "raw", "top.qcow2"],
    ["missing.qcow2"],
    [],
    ["top.qcow2", "mid.qcow2"],
    ["-r", "x", "top.qcow2"],
    ["-t", "bogus", "top.qcow2"],
    ["-p", "base.qcow2"],
]


@pytest.mark.parametrize("pair", ["v3"], indirect=True)
@pytest.mark.parametrize("args", COMMIT_ERRORS, ids=lambda a: " ".join(a) or "none")
def test_commit_errors(pair: tuple[Path, Path, str], args: list[str]) -> None:
    q, o, _ = pair
    rq, _ = _both("commit", args, q, o)
    assert rq.returncode == 1
    _all_same(q, o)
