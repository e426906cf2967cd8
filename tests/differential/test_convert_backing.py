"""convert -B/-F (a target with a backing file), -n (an existing target) and --target-is-zero,
against qemu-img 7.2: the output files equal qemu-img's byte for byte (QEMU writes in guest
order here, so its layout is deterministic), holes in raw targets included, and the error
messages and exit statuses are qemu-img's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import data_map, qemu_img, qemu_io

pytestmark = pytest.mark.oracle

OURS = [sys.executable, "-m", "qcow2"]
MiB = 1 << 20


def ours(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OURS, "convert", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd)


def theirs(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return qemu_img("convert", *argv, check=False, cwd=cwd)



def qmap(path: Path, cwd: Path) -> list[dict[str, Any]]:
    out = qemu_img("map", "--output=json", path.name, cwd=cwd).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base.qcow2 (10M) <- top.qcow2 (10M), short.qcow2 (6M) <- long.qcow2 (10M), a standalone
    solo.qcow2 and a sparse raw file; the top layers mix data, zero clusters, zero-filled data,
    unaligned pieces (over backing data and over nothing) and a compressed cluster."""
    t = tmp_path
    qemu_img("create", "-q", "-f", "qcow2", t / "base.qcow2", "10M")
    qemu_io(t / "base.qcow2", "write -P 1 0 4M", "write -P 2 6M 2M", "write -P 6 9M 5000")
    for name, back, size in (("top", "base", "10M"), ("long", "short", "10M")):
        if back == "short":
            qemu_img("create", "-q", "-f", "qcow2", t / "short.qcow2", "6M")
            qemu_io(t / "short.qcow2", "write -P 1 0 6M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", f"{back}.qcow2", "-F", "qcow2",
                 t / f"{name}.qcow2", size, cwd=t)
        qemu_io(t / f"{name}.qcow2", "write -P 3 1M 1M", "write -z 2M 1M",
                "write -P 0 7M 64k", "write -P 4 3M 5000", "write -P 0 3200k 8k",
                "write -P 5 4200k 3000", "write -c -P 7 5M 64k", "write -P 8 8M 2M")
    qemu_img("create", "-q", "-f", "qcow2", t / "solo.qcow2", "10M")
    qemu_io(t / "solo.qcow2", "write -P 7 1M 1M", "write -P 9 3M 4000", "write -z 4M 64k")
    with open(t / "sparse.raw", "wb") as f:
        f.truncate(10 * MiB)
        f.seek(MiB)
        f.write(b"r" * 70000)
        f.seek(5 * MiB)
        f.write(bytes(8192) + b"s" * 9000)
    return t


def _as_qemu(stderr: str) -> str:
    return "".join("qemu-img: " + line[7:] if line.startswith("qcow2: ") else line
                   for line in stderr.splitlines(keepends=True))


def _same(t: Path, a: str, b: str) -> None:
    assert (t / a).read_bytes() == (t / b).read_bytes()


def _both(t: Path, *argv: str, out: str = "out.qcow2") -> None:
    """Run qemu-img and us with the same arguments; the last one names the output."""
    q = theirs(*argv, f"qemu-{out}", cwd=t)
    assert q.returncode == 0, q.stderr
    o = ours(*argv, f"ours-{out}", cwd=t)
    assert (o.returncode, o.stderr, o.stdout) == (0, "", q.stdout)


# ----------------------------------------------------------------------------- -B / -F
@pytest.mark.parametrize("oopts", ["", "cluster_size=4096", "cluster_size=512", "compat=0.10",
                                   "extended_l2=on", "cluster_size=2M"])
@pytest.mark.parametrize("src,base", [("top", "base"), ("long", "short"), ("solo", "base"),
                                      ("sparse.raw", "base"), ("top", "short")])
def test_backing_qcow2_identical(chain: Path, src: str, base: str, oopts: str) -> None:
    srcf = src if "." in src else f"{src}.qcow2"
    extra = ["-o", oopts] if oopts else []
    _both(chain, "-O", "qcow2", *extra, "-B", f"{base}.qcow2", "-F", "qcow2", srcf)
    out = chain / "ours-out.qcow2"
    assert qemu_img("check", out.name, check=False, cwd=chain).returncode == 0
    if (src, base) in (("top", "base"), ("long", "short")):
        # the same backing file: the guest content is the source's
        assert qemu_img("compare", srcf, out.name, check=False, cwd=chain).returncode == 0
    qa, qb = (chain / "qemu-out.qcow2").read_bytes(), out.read_bytes()
    qm, om = qmap(chain / "qemu-out.qcow2", chain), qmap(out, chain)
    if oopts == "cluster_size=512":
        # The engine lays out 512-byte-cluster images differently from QEMU even without a
        # backing file (refcount structures): the same mapping, other host offsets.
        assert [{k: v for k, v in e.items() if k != "offset"} for e in om] == \
            [{k: v for k, v in e.items() if k != "offset"} for e in qm]
        return
    assert om == qm
    if oopts == "extended_l2=on" and len(qb) > len(qa):
        # The engine extends the file to the end of a cluster whose first subclusters only
        # are written; QEMU leaves the unallocated subclusters past the end of the file.
        assert not any(qb[len(qa):]) and len(qb) - len(qa) < 65536
        qb = qb[:len(qa)]
    assert qa == qb


@pytest.mark.parametrize("src", ["top", "long"])
def test_backing_qcow_identical(chain: Path, src: str) -> None:
    base = "base" if src == "top" else "short"
    _both(chain, "-O", "qcow", "-B", f"{base}.qcow2", "-F", "qcow2", f"{src}.qcow2",
          out="out.qcow")
    assert qemu_img("compare", f"{src}.qcow2", "ours-out.qcow", check=False,
                    cwd=chain).returncode == 0
    _same(chain, "qemu-out.qcow", "ours-out.qcow")


@pytest.mark.parametrize("how", [
    ["-o", "backing_file=base.qcow2,backing_fmt=qcow2"],
    ["-o", "backing_file=other.qcow2,backing_fmt=raw", "-B", "base.qcow2", "-F", "qcow2"],
    ["-B", "base.qcow2", "-o", "backing_fmt=qcow2"],
    ["-o", "backing_file=base.qcow2,backing_fmt=qcow2", "-F", "raw"],
    ["-B", "base.qcow2", "-F", "qcow2", "-S", "0"],
    ["-B", "base.qcow2", "-F", "qcow2", "-S", "64k", "-m", "1"],
])
def test_backing_option_forms(chain: Path, how: list[str]) -> None:
    _both(chain, "-O", "qcow2", *how, "top.qcow2")
    _same(chain, "qemu-out.qcow2", "ours-out.qcow2")


def test_backing_name_is_relative_to_the_target(chain: Path) -> None:
    (chain / "d").mkdir()
    shutil.copy(chain / "base.qcow2", chain / "d" / "b.qcow2")
    argv = ["-O", "qcow2", "-B", "b.qcow2", "-F", "qcow2", "top.qcow2"]
    q = theirs(*argv, "d/qemu.qcow2", cwd=chain)
    o = ours(*argv, "d/ours.qcow2", cwd=chain)
    assert (o.returncode, o.stderr) == (q.returncode, q.stderr) == (0, "")
    _same(chain, "d/qemu.qcow2", "d/ours.qcow2")


def test_sparse_zero_fully_allocates_qcow2(chain: Path) -> None:
    """-S 0: zero areas are written as zero data (allocated clusters), not zero clusters."""
    _both(chain, "-O", "qcow2", "-S", "0", "solo.qcow2")
    _same(chain, "qemu-out.qcow2", "ours-out.qcow2")


# ----------------------------------------------------------------------------- -n
def _fill(path: Path, size: int, byte: int = 0xAA) -> None:
    with open(path, "wb") as f:
        f.write(bytes([byte]) * size)


def _pair(t: Path, make: Callable[[Path], None], name: str) -> tuple[str, str]:
    """Two identical targets made by `make(path)`, for qemu-img and for us."""
    a, b = f"qemu-{name}", f"ours-{name}"
    make(t / a)
    make(t / b)
    return a, b


@pytest.mark.parametrize("flags", [[], ["--target-is-zero"], ["-B", "base.qcow2"],
                                   ["-B", "base.qcow2", "-F", "qcow2"], ["-S", "0"],
                                   ["-S", "0", "--target-is-zero"]])
@pytest.mark.parametrize("src", ["top.qcow2", "solo.qcow2", "sparse.raw"])
def test_no_create_raw(chain: Path, src: str, flags: list[str]) -> None:
    a, b = _pair(chain, lambda p: _fill(p, 12 * MiB), "t.raw")
    fmt = ["-f", "raw"] if src.endswith(".raw") else []
    q = theirs("-n", *fmt, *flags, src, a, cwd=chain)
    o = ours("-n", *fmt, *flags, src, b, cwd=chain)
    assert (o.returncode, o.stderr) == (q.returncode, q.stderr) == (0, "")
    _same(chain, a, b)
    assert data_map(chain / a) == data_map(chain / b)


@pytest.mark.parametrize("flags", [[], ["--target-is-zero"], ["-B", "base.qcow2"],
                                   ["-S", "0"]])
@pytest.mark.parametrize("tgt", ["filled", "backed", "empty", "big", "v2"])
def test_no_create_qcow2(chain: Path, tgt: str, flags: list[str]) -> None:
    def make(p: Path) -> None:
        if tgt == "backed":
            qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p.name,
                     cwd=chain)
        else:
            qemu_img("create", "-q", "-f", "qcow2",
                     *(["-o", "compat=0.10"] if tgt == "v2" else []),
                     p, "16M" if tgt == "big" else "10M")
        if tgt != "empty":
            qemu_io(p, "write -P 9 0 3M", "write -P 10 4M 5M", "write -c -P 11 9M 64k")

    a, b = _pair(chain, make, "t.qcow2")
    q = theirs("-n", "-O", "qcow2", *flags, "top.qcow2", a, cwd=chain)
    o = ours("-n", "-O", "qcow2", *flags, "top.qcow2", b, cwd=chain)
    assert (o.returncode, o.stderr) == (q.returncode, q.stderr) == (0, "")
    assert qemu_img("check", b, check=False, cwd=chain).returncode == 0
    assert qmap(chain / b, chain) == qmap(chain / a, chain)
    # Identical but for clusters freed during the conversion: QEMU leaves the bytes of a
    # rewritten compressed cluster there (it passes only discard requests down to the file),
    # the engine punches every range it frees.
    qa, qb = (chain / a).read_bytes(), (chain / b).read_bytes()
    assert len(qa) == len(qb)
    cs = 65536
    used = {(e["offset"] + k) // cs for e in qmap(chain / a, chain) if "offset" in e
            for k in range(0, e["length"], cs)}
    for i in range(0, len(qa), cs):
        if qa[i:i + cs] != qb[i:i + cs]:
            assert tgt != "empty" and i // cs not in used and not any(qb[i:i + cs]), i


@pytest.mark.parametrize("flags", [[], ["--target-is-zero"], ["-B", "base.qcow2"]])
def test_no_create_qcow(chain: Path, flags: list[str]) -> None:
    def make(p: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow", p, "10M")
        qemu_io(p, "write -P 9 0 3M", "write -P 10 4M 5M", fmt="qcow")

    a, b = _pair(chain, make, "t.qcow")
    q = theirs("-n", "-O", "qcow", *flags, "top.qcow2", a, cwd=chain)
    o = ours("-n", "-O", "qcow", *flags, "top.qcow2", b, cwd=chain)
    assert (o.returncode, o.stderr) == (q.returncode, q.stderr) == (0, "")
    _same(chain, a, b)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv", [
    ["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "e.qcow2"],
    ["-O", "qcow", "-B", "base.qcow2", "top.qcow2", "e.qcow"],
    ["-O", "qcow2", "-o", "backing_file=base.qcow2", "top.qcow2", "e.qcow2"],
    ["-O", "raw", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "e.raw"],
    ["-B", "base.qcow2", "top.qcow2", "e.raw"],
    ["-O", "raw", "-F", "qcow2", "top.qcow2", "e.raw"],
    ["-O", "qcow2", "-F", "qcow2", "top.qcow2", "e.qcow2"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "bogus", "top.qcow2", "e.qcow2"],
    ["-O", "qcow2", "-B", "nonexist.qcow2", "-F", "qcow2", "top.qcow2", "e.qcow2"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "solo.qcow2", "e.qcow2"],
    ["-n", "-B", "base.qcow2", "top.qcow2", "solo.qcow2", "small.raw"],
    ["-O", "qcow2", "--target-is-zero", "top.qcow2", "e.qcow2"],
    ["--target-is-zero", "top.qcow2"],
    ["-n", "--target-is-zero", "top.qcow2"],
    ["-n", "-o", "cluster_size=4k", "top.qcow2", "e.qcow2"],
    ["-n", "-O", "qcow2", "--target-is-zero", "-B", "x", "top.qcow2", "nonexist"],
    ["-p", "-n", "--target-is-zero", "-B", "x", "top.qcow2", "nonexist"],
    ["-n", "top.qcow2", "nonexist.raw"],
    ["-n", "-O", "qcow2", "top.qcow2", "nonexist.qcow2"],
    ["-n", "-O", "qcow", "top.qcow2", "nonexist.qcow"],
    ["-n", "-O", "bogus", "top.qcow2", "small.raw"],
    ["-n", "-O", "qcow2", "top.qcow2", "small.raw"],
    ["-n", "top.qcow2", "small.raw"],
    ["-n", "-O", "qcow2", "top.qcow2", "small.qcow2"],
    ["-n", "-O", "qcow2", "-t", "bogus", "top.qcow2", "small.qcow2"],
    ["-n", "-F", "qcow2", "top.qcow2", "small.raw"],
    ["-n", "top.qcow2", "top.qcow2"],
    ["-n", "-O", "qcow2", "top.qcow2", "base.qcow2"],
])
def test_errors_like_qemu(chain: Path, argv: list[str]) -> None:
    for d in ("qemu", "ours"):
        w = chain / d
        w.mkdir()
        for f in chain.iterdir():
            if f.is_file():
                shutil.copy(f, w / f.name)
        _fill(w / "small.raw", MiB)
        qemu_img("create", "-q", "-f", "qcow2", w / "small.qcow2", "1M")
    q = theirs(*argv, cwd=chain / "qemu")
    o = ours(*argv, cwd=chain / "ours")
    assert o.returncode == q.returncode
    assert _as_qemu(o.stderr) == q.stderr
    assert o.stdout == q.stdout
    for f in sorted((chain / "qemu").iterdir()):
        mine = chain / "ours" / f.name
        assert mine.exists() == f.exists(), f.name
        if f.name.startswith("e."):
            assert mine.stat().st_size == f.stat().st_size, f.name


def test_backing_is_the_target_itself(chain: Path) -> None:
    # QEMU creates the image, then cannot open it as its own backing file (its lock); we
    # give the same message without creating it first.
    argv = ["-O", "qcow2", "-B", "self.qcow2", "-F", "qcow2", "top.qcow2", "self.qcow2"]
    q = theirs(*argv, cwd=chain)
    (chain / "self.qcow2").unlink()
    o = ours(*argv, cwd=chain)
    assert (o.returncode, _as_qemu(o.stderr)) == (q.returncode, q.stderr) == (1, q.stderr)


def test_backing_raw_file(chain: Path) -> None:
    qemu_img("convert", "-O", "raw", "base.qcow2", "base.raw", cwd=chain)
    _both(chain, "-O", "qcow2", "-B", "base.raw", "-F", "raw", "top.qcow2")
    _same(chain, "qemu-out.qcow2", "ours-out.qcow2")


def test_no_create_concatenated(chain: Path) -> None:
    a, b = _pair(chain, lambda p: _fill(p, 32 * MiB), "t.raw")
    argv = ["-n", "solo.qcow2", "top.qcow2", "solo.qcow2"]
    q = theirs(*argv, a, cwd=chain)
    o = ours(*argv, b, cwd=chain)
    assert (o.returncode, o.stderr) == (q.returncode, q.stderr) == (0, "")
    _same(chain, a, b)
    assert data_map(chain / a) == data_map(chain / b)
