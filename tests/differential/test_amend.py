"""amend against qemu-img 7.2: the same image (built by qemu-img/qemu-io) is copied twice, one
copy amended by qemu-img and the other by us, step by step. After every step both runs must
agree on exit status, stdout (the -p progress lines included) and stderr (program name
aside), the two files must be byte-identical, our file `qemu-img check`-clean, and the guest
view (active layer and every internal snapshot) the one before the amend.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2
from qcow2.errors import Qcow2Error
from tests.conftest import qemu_img, qemu_io

pytestmark = pytest.mark.oracle

OURS = [sys.executable, "-m", "qcow2"]
MiB = 1 << 20


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd)


def _both(args: list[str], q: Path, o: Path) -> subprocess.CompletedProcess[str]:
    rq = _run(["qemu-img", "amend", *args], q)
    ro = _run([*OURS, "amend", *args], o)
    assert ro.returncode == rq.returncode, (args, rq.stderr, ro.stderr)
    assert ro.stderr.replace("qcow2:", "qemu-img:").replace("qcow2 --help", "qemu-img --help") \
        == rq.stderr, args
    assert ro.stdout == rq.stdout, args
    return rq


def _views(path: Path, tmp: Path) -> dict[str, bytes]:
    """The guest view of the active layer and of every snapshot, as qemu-img reads them."""
    out: dict[str, bytes] = {}
    info = json.loads(qemu_img("info", "--output=json", path.name, cwd=path.parent).stdout)
    names = [s["name"] for s in info.get("snapshots", [])]
    for name in [None, *names]:
        raw = tmp / "view.raw"
        extra = ["-l", f"snapshot.name={name}"] if name else []
        qemu_img("convert", *extra, "-O", "raw", path.name, str(raw), cwd=path.parent)
        out[name or ""] = raw.read_bytes()
        raw.unlink()
    return out


def _check_clean(path: Path) -> None:
    r = qemu_img("check", path.name, cwd=path.parent, check=False)
    assert r.returncode == 0, (path, r.stdout, r.stderr)


def _build(d: Path, create: str, setup: list[str], backing: bool) -> Path:
    d.mkdir()
    img = d / "a.qcow2"
    if backing:
        qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "64M", cwd=d)
        qemu_io(d / "base.qcow2", "write -P 9 0 8M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 *(["-o", create] if create else []), "a.qcow2", cwd=d)
    else:
        qemu_img("create", "-q", "-f", "qcow2", *(["-o", create] if create else []),
                 "a.qcow2", "64M", cwd=d)
    for cmd in setup:
        if cmd.startswith("snap:"):
            qemu_img("snapshot", "-c", cmd[5:], "a.qcow2", cwd=d)
        else:
            # in the image's directory: a relative data file name is relative to the cwd
            r = subprocess.run(["qemu-io", "-c", cmd, "a.qcow2"], cwd=d, capture_output=True,
                               text=True)
            assert r.returncode == 0 and "error" not in r.stdout.lower(), (cmd, r.stdout)
    return img


def _pair(tmp: Path, create: str, setup: list[str], backing: bool = False
          ) -> tuple[Path, Path, Path]:
    src = _build(tmp / "src", create, setup, backing)
    q = tmp / "q"
    o = tmp / "o"
    shutil.copytree(src.parent, q)
    shutil.copytree(src.parent, o)
    return src, q, o


DATA = ["write -P 1 0 1M", "write -z 2M 1M", "write -P 2 4M 64k", "write -z 4M 32k"]
SNAPS = ["write -P 1 0 1M", "snap:s1", "write -z 0 64k", "write -P 3 1M 64k", "snap:s2",
         "write -z 512k 128k", "write -z 8M 256k"]

# QEMU walks the old refcounts one cluster at a time over the whole reftable range (up to
# reftable entries x refblock entries, 2^28 for 64 KiB clusters, far more with 1-bit or 2 MiB
# ones): refcount width changes use small clusters so that qemu-img stays quick.
CS4K = "cluster_size=4096"
CASES: list[tuple[str, str, list[str], bool, list[str]]] = [
    # name, create options, setup, backing file, amend -o steps
    ("widths", CS4K, DATA, False, ["refcount_bits=1", "refcount_bits=64", "refcount_bits=2",
                                   "refcount_bits=16"]),
    ("versions", "", DATA, False, ["compat=0.10", "compat=1.1", "compat=v2", "compat=v3"]),
    ("lazy", "", DATA, False, ["lazy_refcounts=on", "lazy_refcounts=off", "size=128M",
                               "size=32M", "lazy_refcounts=on,size=48M", "compat=0.10"]),
    ("combined", CS4K, DATA, False, ["compat=0.10,refcount_bits=16",
                                     "compat=1.1,refcount_bits=8",
                                     "refcount_bits=16,compat=0.10"]),
    ("snapshots", CS4K, SNAPS, False, ["refcount_bits=2", "refcount_bits=1", "refcount_bits=8",
                                       "refcount_bits=64", "refcount_bits=16", "compat=0.10",
                                       "compat=1.1"]),
    ("small-clusters", "cluster_size=512", ["write -P 1 0 3M", "write -z 4M 1M",
                                            "write -P 2 20M 2M"], False,
     ["refcount_bits=64", "refcount_bits=1", "refcount_bits=32", "refcount_bits=16",
      "compat=0.10", "compat=1.1,refcount_bits=4"]),
    ("big-clusters", "cluster_size=2M", ["write -P 1 0 8M", "write -z 10M 4M"], False,
     ["compat=0.10", "compat=1.1"]),
    ("v2-snapshots", "compat=0.10,cluster_size=4096",
     ["write -P 1 0 1M", "snap:s1", "write -P 2 0 64k"], False,
     ["compat=1.1", "refcount_bits=1", "refcount_bits=16,lazy_refcounts=on", "compat=0.10"]),
    ("zstd", "compression_type=zstd,cluster_size=4096",
     ["write -c -P 1 0 64k", "write -z 1M 64k"], False, ["compat=0.10", "refcount_bits=8"]),
    ("zstd-plain", "compression_type=zstd", ["write -P 1 0 64k", "write -z 1M 64k"], False,
     ["compat=0.10"]),
    ("zlib-compressed", CS4K, ["write -c -P 1 0 64k", "write -c -P 2 64k 64k"], False,
     ["refcount_bits=1", "compat=0.10"]),
    ("extended-l2", "extended_l2=on,cluster_size=16384",
     ["write -P 1 0 64k", "write -z 8k 4k"], False, ["compat=0.10", "refcount_bits=8"]),
    ("lazy-image", "lazy_refcounts=on", ["write -P 1 0 1M", "write -z 1M 1M"], False,
     ["compat=0.10", "compat=1.1,lazy_refcounts=on", "lazy_refcounts=off"]),
    ("backing", CS4K, ["write -z 0 1M", "write -P 1 1M 64k", "write -z 1M 64k"], True,
     ["compat=0.10", "compat=1.1", "refcount_bits=8", "backing_file=base.qcow2",
      "backing_file=base.qcow2,backing_fmt=qcow2", "backing_fmt=qcow2", "size=128M"]),
    ("backing-snapshots", "", ["write -z 0 1M", "snap:s1", "write -P 1 1M 64k", "snap:s2",
                               "write -z 4M 256k"], True, ["compat=0.10", "compat=1.1"]),
    ("data-file", "data_file=d.raw,data_file_raw=on,cluster_size=4096", ["write -P 1 0 1M"],
     False, ["size=128M", "size=100000K", "data_file_raw=off", "size=32M", "compat=0.10",
             "refcount_bits=2", "data_file=d.raw", "data_file_raw=on"]),
]


# The one step at which we deliberately differ (see the test of shared zero clusters below).
DIVERGES = ("snapshots", "compat=0.10")


def _same_view(got: dict[str, bytes], want: dict[str, bytes]) -> bool:
    """Equal, except that a resize cuts the active layer or extends it with zeros."""
    if got.keys() != want.keys():
        return False
    for k in got:
        a, b = got[k], want[k]
        n = min(len(a), len(b))
        if a[:n] != b[:n] or a[n:].count(0) != len(a) - n:
            return False
    return True


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_amend_steps_match_qemu_img(tmp_path: Path, case: tuple[str, str, list[str], bool,
                                                                  list[str]]) -> None:
    name, create, setup, backing, steps = case
    src, q, o = _pair(tmp_path, create, setup, backing)
    views = _views(src, tmp_path)
    same_file = True
    for step in steps:
        _both(["-p", "-o", step, "a.qcow2"], q, o)
        if (name, step) == DIVERGES:
            # QEMU zeroes data a snapshot reads; the files differ from here on
            assert not _same_view(_views(q / "a.qcow2", tmp_path), views)
            same_file = False
        if same_file:
            for f in q.iterdir():
                assert (o / f.name).read_bytes() == f.read_bytes(), (step, f.name)
        _check_clean(o / "a.qcow2")
        assert _same_view(_views(o / "a.qcow2", tmp_path), views), step


def test_refcount_narrowing_that_does_not_fit(tmp_path: Path) -> None:
    # a snapshot shares the data: refcount 2 needs 2 bits
    src, q, o = _pair(tmp_path, "", ["write -P 1 0 128k", "snap:s1"])
    before = src.read_bytes()
    r = _both(["-o", "refcount_bits=1", "a.qcow2"], q, o)
    assert r.returncode == 1 and "Cannot decrease refcount entry width to 1 bits" in r.stderr
    assert (o / "a.qcow2").read_bytes() == (q / "a.qcow2").read_bytes() == before
    _check_clean(o / "a.qcow2")


def test_downgrade_keeps_snapshot_data_of_shared_zero_alloc_clusters(tmp_path: Path) -> None:
    """A zero-flagged cluster whose data a snapshot still reads (through another L2 table):
    QEMU 7.2 zeroes it in place and so destroys the snapshot's data (and check then reports
    an OFLAG_COPIED corruption); we give the active entry up instead."""
    for backing in (False, True):
        d = tmp_path / f"b{int(backing)}"
        d.mkdir()
        img = _build(d / "x", "", ["write -P 1 1M 64k", "snap:s2", "write -z 1M 64k"], backing)
        views = _views(img, tmp_path)
        qcow2.amend(str(img), compat="0.10", backing_policy="follow")
        _check_clean(img)
        assert _views(img, tmp_path) == views
        info = json.loads(qemu_img("info", "--output=json", img.name, cwd=img.parent).stdout)
        assert info["format-specific"]["data"]["compat"] == "0.10"


def test_dirty_lazy_image(tmp_path: Path) -> None:
    src, q, o = _pair(tmp_path, "lazy_refcounts=on", [])
    for d in (src.parent, q, o):
        # qemu-io aborts with the dirty bit set and refcounts not written
        subprocess.run(["qemu-io", "-c", "write -P 7 0 512k", "-c", "abort", "a.qcow2"],
                       cwd=d, capture_output=True)
    for step in ["lazy_refcounts=off", "compat=0.10"]:
        _both(["-o", step, "a.qcow2"], q, o)
        assert (o / "a.qcow2").read_bytes() == (q / "a.qcow2").read_bytes(), step
        _check_clean(o / "a.qcow2")
    assert _views(o / "a.qcow2", tmp_path)[""][:512 * 1024] == b"\x07" * (512 * 1024)


ERRORS = [
    ["-o", "cluster_size=4k", "a.qcow2"],
    ["-o", "preallocation=full", "a.qcow2"],
    ["-o", "encrypt.format=luks", "a.qcow2"],
    ["-o", "foo=1", "a.qcow2"],
    ["-o", "nofoo", "a.qcow2"],
    ["-o", "nocow=on", "a.qcow2"],
    ["-o", "compat=2", "a.qcow2"],
    ["-o", "compat=", "a.qcow2"],
    ["-o", "refcount_bits=3", "a.qcow2"],
    ["-o", "refcount_bits=128", "a.qcow2"],
    ["-o", "refcount_bits=0", "a.qcow2"],
    ["-o", "refcount_bits=abc", "a.qcow2"],
    ["-o", "refcount_bits=0x10", "a.qcow2"],
    ["-o", "refcount_bits=4294967312", "a.qcow2"],
    ["-o", "refcount_bits=1,compat=0.10", "a.qcow2"],
    ["-o", "compat=0.10,lazy_refcounts=on", "a.qcow2"],
    ["-o", "lazy_refcounts=maybe", "a.qcow2"],
    ["-o", "size=abc", "a.qcow2"],
    ["-o", "size=1000", "a.qcow2"],
    ["-o", "size=0", "a.qcow2"],
    ["-o", "backing_file=x", "a.qcow2"],
    ["-o", "backing_file=", "a.qcow2"],
    ["-o", "backing_fmt=raw", "a.qcow2"],
    ["-o", "data_file=x", "a.qcow2"],
    ["-o", "data_file=", "a.qcow2"],
    ["-o", "data_file_raw=on", "a.qcow2"],
    ["-o", "data_file_raw=off", "a.qcow2"],
    ["-o", "encrypt.keyslot=1", "a.qcow2"],
    ["-o", "encrypt.new-secret=x", "a.qcow2"],
    ["-o", "help", "a.qcow2"],
    ["-o", "?", "a.qcow2"],
    ["-f", "qcow2", "-o", "help"],
    ["-f", "qcow", "-o", "help"],
    ["-f", "raw", "-o", "help"],
    ["-o", "help"],
    ["-o", "size=2M", "c.qcow"],
    ["-o", "size=2M", "r.img"],
    ["-f", "raw", "-o", "size=2M", "r.img"],
    ["-f", "qcow2", "-o", "size=2M", "r.img"],
    ["-o", "size=2M", "missing.qcow2"],
    ["-o", "compat=1.1", "a.qcow2", "extra"],
    ["-o", ",", "a.qcow2"],
    ["a.qcow2"],
    ["-x", "a.qcow2"],
    ["-o"],
    ["-t", "bogus", "-o", "compat=1.1", "a.qcow2"],
    ["-q", "-p", "-o", "compat=1.1", "a.qcow2"],
    ["-p", "-o", "compat=2", "a.qcow2"],
    ["-p", "-f", "qcow2", "-o", "help"],
    ["-o", "lazy_refcounts=on", "-o", "size=128M", "a.qcow2"],
    ["--force", "-o", "size=32M", "a.qcow2"],
]


def test_cli_errors_and_texts_match_qemu_img(tmp_path: Path) -> None:
    for d in (tmp_path / "q", tmp_path / "o"):
        d.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "64M", cwd=d)
        qemu_img("create", "-q", "-f", "qcow", "c.qcow", "1M", cwd=d)
        qemu_img("create", "-q", "-f", "raw", "r.img", "1M", cwd=d)
    for args in ERRORS:
        _both(args, tmp_path / "q", tmp_path / "o")
        for name in ("a.qcow2", "c.qcow", "r.img"):
            assert (tmp_path / "o" / name).read_bytes() == \
                (tmp_path / "q" / name).read_bytes(), (args, name)


def test_api(tmp_path: Path) -> None:
    path = tmp_path / "api.qcow2"
    qcow2.create(str(path), 64 * MiB)
    with qcow2.open(str(path), readonly=False) as img:
        img.write(0, b"x" * 100000)
        img.amend(refcount_bits=1, lazy_refcounts=True)
        img.write(MiB, b"y" * 100000)
    qcow2.amend(str(path), compat="v2", refcount_bits=16)
    with qcow2.open(str(path)) as img:
        assert img.read(0, 100000) == b"x" * 100000
        assert img.read(MiB, 100000) == b"y" * 100000
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["format-specific"]["data"]["compat"] == "0.10"
    _check_clean(path)
    with pytest.raises(Qcow2Error, match="Invalid parameter 'cluster_size'"):
        qcow2.amend(str(path), cluster_size=512)
    with pytest.raises(Qcow2Error, match=r"compat=0\.10 requires refcount_bits=16"):
        qcow2.amend(str(path), compat="1.1", refcount_bits=8, lazy_refcounts=False)
        qcow2.amend(str(path), compat="0.10")
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(Qcow2Error, match="does not support option amendment"):
        qcow2.amend(str(raw), fmt="raw", size=2 * MiB)


def test_persistent_bitmaps_survive_amend(tmp_path: Path) -> None:
    """Amend writes no guest data, so persistent bitmaps stay (QEMU keeps them too; it also
    moves their directory, which we do not). A resize drops ours (the writer cannot keep
    them up to date) and so does a downgrade (v2 cannot hold them consistently)."""
    def bitmaps(path: Path) -> list[str]:
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]

    src = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", src, "64M")
    qemu_img("bitmap", "--add", src, "b0")
    qemu_io(src, "write 0 64k")
    for opts, kept in [("refcount_bits=8", True), ("lazy_refcounts=on", True),
                       ("compat=1.1", True), ("size=128M", False), ("compat=0.10", False)]:
        p = tmp_path / "o.qcow2"
        shutil.copy(src, p)
        r = subprocess.run([*OURS, "amend", "-o", opts, str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert bitmaps(p) == (["b0"] if kept else []), opts
        _check_clean(p)
