"""Compressed clusters against qemu-img/qemu-io 7.2: `convert -c` output byte-identical to
qemu-img's (zlib and zstd, 4 KiB / 64 KiB / 2 MiB clusters, incompressible, compressible,
zero and mixed data, partial last cluster, -B backing, several sources, qcow v1), qemu-io
`write -c` scripts giving identical files through qemu-io, the API and `qcow2 io`, and
overwrite/discard/zero of compressed clusters (ours and QEMU's) keeping check clean."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import qcow2
from qcow2.ops.convert import ConvertOptions, Source, convert
from qcow2.ops.convert_target import ImageTarget
from tests.conftest import qemu_img, qemu_io, qemu_raw

pytestmark = pytest.mark.oracle

OURS = [sys.executable, "-m", "qcow2"]
KiB = 1024
MiB = 1024 * KiB


def _data(kind: str, n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    if kind == "random":
        return rnd.randbytes(n)
    if kind == "text":
        words = [b"qcow2", b"cluster", b"refcount", b"deflate", b"zstd", b"sector", b"L2"]
        out = bytearray()
        while len(out) < n:
            out += rnd.choice(words) + b" "
        return bytes(out[:n])
    if kind == "zero":
        return bytes(n)
    if kind == "fill":
        return bytes([seed % 251 + 1]) * n
    raise AssertionError(kind)


def _mixed(cs: int, nclusters: int, seed: int = 1, tail: int = 0) -> bytes:
    """Clusters of every kind, some half-zero (a partial status run), and a short tail."""
    kinds = ["random", "text", "zero", "fill", "text", "random", "zero", "zero"]
    parts = []
    for i in range(nclusters):
        k = kinds[i % len(kinds)]
        d = _data(k, cs, seed + i)
        if i % 5 == 4:
            d = d[:cs // 2] + bytes(cs - cs // 2)
        parts.append(d)
    if tail:
        parts.append(_data("text", tail, seed + 99))
    return b"".join(parts)


def _ours(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OURS, *map(str, argv)], capture_output=True, text=True)


def _check_json(path: Path) -> dict[str, object]:
    p = qemu_img("check", "--output=json", path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    res: dict[str, object] = json.loads(p.stdout)
    return res


def _assert_same_file(a: Path, b: Path) -> None:
    assert a.stat().st_size == b.stat().st_size
    assert a.read_bytes() == b.read_bytes(), "files differ"


# ----------------------------------------------------------------------------- convert -c
CASES = [(t, cs) for t in ("zlib", "zstd") for cs in (4 * KiB, 64 * KiB, 2 * MiB)]


@pytest.mark.parametrize("ctype,cs", CASES, ids=[f"{t}-{cs // KiB}k" for t, cs in CASES])
def test_convert_c_identical_to_qemu(tmp_path: Path, ctype: str, cs: int) -> None:
    n = 24 if cs < 2 * MiB else 6
    src = tmp_path / "src.raw"
    src.write_bytes(_mixed(cs, n, tail=3 * 512))
    opts = f"cluster_size={cs},compression_type={ctype}"
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", opts, src, a)
    r = _ours("convert", "-c", "-O", "qcow2", "-o", opts, src, b)
    assert r.returncode == 0 and not r.stderr, r.stderr
    _assert_same_file(a, b)
    res = _check_json(b)
    assert res["compressed-clusters"] and res["allocated-clusters"]
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", src, b).returncode == 0


@pytest.mark.parametrize("kind", ["random", "text", "zero", "fill"])
def test_convert_c_uniform_data(tmp_path: Path, kind: str) -> None:
    """All incompressible (stored as normal clusters), all compressible, all zero."""
    src = tmp_path / "src.raw"
    src.write_bytes(_data(kind, 3 * MiB, 7))
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, a)
    assert _ours("convert", "-c", "-O", "qcow2", src, b).returncode == 0
    _assert_same_file(a, b)
    res = _check_json(b)
    if kind == "random":
        assert not res.get("compressed-clusters")
    elif kind != "zero":
        assert res["compressed-clusters"] == res["allocated-clusters"]


def test_convert_c_qcow2_source_with_backing_B(tmp_path: Path) -> None:
    """-B: only what the source's top layer allocates is written, compressed, partial
    clusters read through the whole chain; same file as qemu-img's."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 1 0 8M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base.name,
             "-F", "qcow2", top)
    qemu_io(top, "write -P 2 0 64k", "write -P 3 100k 3k", "write -z 1M 128k",
            "write -P 4 3M 1M", "write -c -P 5 5M 4k")
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    for out, cmd in ((a, ["qemu-img"]), (b, OURS)):
        subprocess.run([*cmd, "convert", "-c", "-O", "qcow2", "-B", base.name, "-F", "qcow2",
                        str(top), str(out)], check=True, cwd=tmp_path)
    _assert_same_file(a, b)
    _check_json(b)
    assert qemu_img("compare", top, b).returncode == 0


def test_convert_c_sources_concatenated_and_qcow2_source(tmp_path: Path) -> None:
    """A cluster straddling two sources is read across them (convert_co_read)."""
    s1 = tmp_path / "s1.raw"
    s1.write_bytes(_mixed(4096, 7, seed=3, tail=1024))
    s2 = tmp_path / "s2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", s2, "3M")
    qemu_io(s2, "write -P 9 0 100k", "write -c -P 8 1M 64k", "write -z 2M 64k")
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", s1, s2, a)
    assert _ours("convert", "-c", "-O", "qcow2", s1, s2, b).returncode == 0
    _assert_same_file(a, b)
    _check_json(b)


@pytest.mark.parametrize("sparse", ["0", "64k"])
def test_convert_c_sparse_option(tmp_path: Path, sparse: str) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(_mixed(65536, 16, seed=5))
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    qemu_img("convert", "-c", "-S", sparse, "-O", "qcow2", src, a)
    assert _ours("convert", "-c", "-S", sparse, "-O", "qcow2", src, b).returncode == 0
    _assert_same_file(a, b)


def test_convert_c_existing_target_n(tmp_path: Path) -> None:
    """-n into an image that holds data: zero clusters are zero writes (unmap), data
    clusters must land on unallocated clusters (a fresh image)."""
    src = tmp_path / "src.raw"
    src.write_bytes(_mixed(65536, 12, seed=11))
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    for p in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", p, str(12 * 65536))
    qemu_img("convert", "-n", "-c", "-O", "qcow2", src, a)
    assert _ours("convert", "-n", "-c", "-O", "qcow2", src, b).returncode == 0
    _assert_same_file(a, b)


def test_convert_c_progress_like_qemu(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(_mixed(65536, 40, seed=13))
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    pa = qemu_img("convert", "-p", "-c", "-O", "qcow2", src, a)
    pb = _ours("convert", "-p", "-c", "-O", "qcow2", src, b)
    assert pb.returncode == 0
    assert pb.stdout == pa.stdout
    assert "100.00/100%" in pb.stdout


def test_convert_c_parallel_output_is_deterministic(tmp_path: Path) -> None:
    """Compression runs in worker threads, linking in guest order: 1 and 4 workers, and
    tiny batches, give qemu-img's file."""
    src = tmp_path / "src.raw"
    src.write_bytes(_mixed(65536, 64, seed=17, tail=512))
    ref = tmp_path / "qemu.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, ref)
    for workers, batch in ((1, 8 * MiB), (4, 8 * MiB), (4, 65536), (3, 3 * 65536)):
        out = tmp_path / f"ours-{workers}-{batch}.qcow2"
        sources = [Source(qcow2.open(src), lambda: qcow2.open(src), str(src))]
        target = ImageTarget(str(out), "qcow2", sources[0].length, {})
        try:
            convert(sources, target, ConvertOptions(workers=workers, batch_bytes=batch,
                                                    compress=True))
        finally:
            target.close()
            sources[0].device.close()
        _assert_same_file(ref, out)


def test_compression_level_option(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(_mixed(65536, 16, seed=19))
    sizes = {}
    for level in ("1", "9"):
        out = tmp_path / f"l{level}.qcow2"
        r = _ours("convert", "-c", "--compression-level", level, "-O", "qcow2", src, out)
        assert r.returncode == 0, r.stderr
        _check_json(out)
        assert qemu_img("compare", "-f", "raw", src, out).returncode == 0
        sizes[level] = out.stat().st_size
    assert sizes["9"] <= sizes["1"]
    r = _ours("convert", "-c", "--compression-level", "12", "-O", "qcow2", src,
              tmp_path / "bad.qcow2")
    assert r.returncode == 1
    assert r.stderr == "qcow2: zlib compression level must be between 0 and 9\n"
    r = _ours("convert", "-c", "--compression-level", "19", "-O", "qcow2",
              "-o", "compression_type=zstd", src, tmp_path / "z.qcow2")
    assert r.returncode == 0, r.stderr
    assert qemu_img("compare", "-f", "raw", src, tmp_path / "z.qcow2").returncode == 0


# ----------------------------------------------------------------------------- messages
@pytest.mark.parametrize("argv,message", [
    (["-O", "raw"], "Compression not supported for this file format"),
    (["-O", "qcow2", "-o", "preallocation=metadata"],
     "Compression and preallocation not supported at the same time"),
    (["-O", "qcow", "-o", "preallocation=falloc"],
     "Compression and preallocation not supported at the same time"),
    (["-C", "-O", "qcow2"], "Cannot enable copy offloading when -c is used"),
    (["-O", "qcow2", "-o", "data_file=out.data"],
     "error while writing at byte 0: Operation not supported"),
])
def test_convert_c_messages_like_qemu(tmp_path: Path, argv: list[str], message: str) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(_data("text", 256 * KiB, 1))
    q = subprocess.run(["qemu-img", "convert", "-c", *argv, "src.raw", "q.out"],
                       capture_output=True, text=True, cwd=tmp_path)
    o = subprocess.run([*OURS, "convert", "-c", *argv, "src.raw", "o.out"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert q.stderr == f"qemu-img: {message}\n"
    assert (o.returncode, o.stderr.replace("qcow2: ", "qemu-img: ")) == (q.returncode, q.stderr)


def test_convert_c_existing_raw_target(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(_data("text", 256 * KiB, 1))
    t = tmp_path / "t.raw"
    t.write_bytes(bytes(256 * KiB))
    q = qemu_img("convert", "-n", "-c", "-O", "raw", src, t, check=False)
    o = _ours("convert", "-n", "-c", "-O", "raw", src, t)
    assert (o.returncode, o.stderr.replace("qcow2: ", "qemu-img: ")) == (
        q.returncode, q.stderr) == (
        1, "qemu-img: Compression not supported for this file format\n")


# ----------------------------------------------------------------------------- qcow v1
def test_convert_c_qcow1_identical_and_exit_quirk(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(_mixed(4096, 300, seed=23, tail=2048))
    a, b = tmp_path / "qemu.qcow", tmp_path / "ours.qcow"
    q = qemu_img("convert", "-c", "-O", "qcow", src, a, check=False)
    o = _ours("convert", "-c", "-O", "qcow", src, b)
    assert (o.returncode, o.stdout, o.stderr) == (q.returncode, q.stdout, q.stderr) == (1, "", "")
    _assert_same_file(a, b)
    assert qemu_raw(b, tmp_path) == src.read_bytes()


def test_qcow1_write_compressed_api(tmp_path: Path) -> None:
    img_path = tmp_path / "v1.qcow"
    qemu_img("create", "-q", "-f", "qcow", img_path, "1M")
    model = bytearray(1 * MiB)
    with qcow2.open(img_path, readonly=False) as img:
        for i, kind in enumerate(["text", "random", "fill", "text"]):
            d = _data(kind, 4096, i)
            img.write_compressed(i * 8192, d)
            model[i * 8192:i * 8192 + 4096] = d
        with pytest.raises(OSError) as ei:
            img.write_compressed(0, _data("text", 4096, 5))
        assert ei.value.strerror == "Input/output error"
        # a partial write into a compressed cluster rewrites it as a normal cluster
        img.write(100, b"xyz")
        model[100:103] = b"xyz"
    assert qemu_raw(img_path, tmp_path) == bytes(model)


# ----------------------------------------------------------------------------- write -c
SCRIPT = ["write -c -P 1 0 64k", "write -c -P 2 128k 64k", "write -c -P 0 192k 64k",
          "write -c -P 3 64k 64k", "write -P 4 320k 64k", "write -c -P 5 256k 64k",
          "write -z 448k 64k", "write -c -P 6 448k 64k", "write -c -P 7 960k 64k"]


@pytest.mark.parametrize("opts", ["", "compression_type=zstd", "extended_l2=on",
                                  "cluster_size=4096", "refcount_bits=1", "compat=0.10"])
def test_write_c_script_qemu_io_api_and_cli(tmp_path: Path, opts: str) -> None:
    """One-cluster compressed writes (qemu-io runs longer ones as parallel tasks, which
    allocate in completion order): the same file through qemu-io, `qcow2 io` and the API."""
    cs = 4096 if "4096" in opts else 65536
    script = [c.replace("64k", str(cs)) if "-c" in c else c for c in SCRIPT]
    if "compat=0.10" in opts:
        script = [c for c in script if "-z" not in c]
    paths = [tmp_path / f"{n}.qcow2" for n in ("qemu", "cli", "api")]
    for p in paths:
        qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), p, "1M")
    qemu_io(paths[0], *script)
    argv = [x for c in script for x in ("-c", c)]
    r = _ours("io", *argv, paths[1])
    assert r.returncode == 0, r.stdout + r.stderr
    with qcow2.open(paths[2], readonly=False) as img:
        for c in script:
            words = c.split()
            off, n = int(words[-2].rstrip("k")) * (1024 if words[-2].endswith("k") else 1), \
                int(words[-1].rstrip("k")) * (1024 if words[-1].endswith("k") else 1)
            if "-z" in words:
                img.write_zeroes(off, n)
                continue
            data = bytes([int(words[words.index("-P") + 1])]) * n
            if "-c" in words:
                img.write_compressed(off, data)
            else:
                img.write(off, data)
    _assert_same_file(paths[0], paths[1])
    _assert_same_file(paths[0], paths[2])
    res = _check_json(paths[2])
    assert res["compressed-clusters"]


def test_write_c_errors_like_qemu_io(tmp_path: Path) -> None:
    cmds = ["write -c 0 64k", "write -c 0 64k", "write -c 1k 64k", "write -c 64k 1k",
            "write -c 1000k 24k", "write -c -f 0 64k", "write -c 2M 64k",
            "write -c -P 9 960k 64k"]
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    argv = [x for c in cmds for x in ("-c", c)]
    q = subprocess.run(["qemu-io", *argv, str(a)], capture_output=True, text=True)
    o = _ours("io", *argv, b)

    def lines(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if " ops; " not in ln]

    assert lines(o.stdout) == lines(q.stdout)
    assert o.returncode == q.returncode
    _assert_same_file(a, b)
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(64 * KiB))
    for prog in (["qemu-io", "-f", "raw"], [*OURS, "io", "-f", "raw"]):
        p = subprocess.run([*prog, "-c", "write -c 0 64k", str(raw)], capture_output=True,
                           text=True)
        assert p.stdout == "write failed: Operation not supported\n"


# ----------------------------------------------------------------------------- rewriting
def _compressed_image(tmp: Path, who: str, opts: str) -> tuple[Path, bytearray]:
    p = tmp / f"{who}.qcow2"
    src = tmp / f"{who}.raw"
    data = _mixed(65536 if "cluster_size" not in opts else 4096, 32, seed=29)
    src.write_bytes(data)
    extra = ["-o", opts] if opts else []
    if who == "qemu":
        qemu_img("convert", "-c", "-O", "qcow2", *extra, src, p)
    else:
        assert _ours("convert", "-c", "-O", "qcow2", *extra, src, p).returncode == 0
    return p, bytearray(data)


@pytest.mark.parametrize("who", ["qemu", "ours"])
@pytest.mark.parametrize("opts", ["", "cluster_size=4096", "extended_l2=on", "compat=0.10",
                                  "compression_type=zstd"])
def test_rewrite_compressed_clusters(tmp_path: Path, who: str, opts: str) -> None:
    """Partial and whole overwrites (COW into a fresh cluster, the compressed reference
    released), discard and zero writes over compressed clusters: check stays clean and the
    content equals a model."""
    p, model = _compressed_image(tmp_path, who, opts)
    cs = 4096 if "cluster_size" in opts else 65536
    rnd = random.Random(31)
    with qcow2.open(p, readonly=False) as img:
        for step in range(40):
            op = step % 5
            cl = rnd.randrange(len(model) // cs)
            off = cl * cs + rnd.randrange(cs // 2)
            n = rnd.randrange(1, cs)
            if op == 0:
                d = rnd.randbytes(n)
                img.write(off, d)
                model[off:off + n] = d
            elif op == 1:
                d = _data("text", cs, step)
                img.write(cl * cs, d)
                model[cl * cs:(cl + 1) * cs] = d
            elif op == 2:
                img.discard(cl * cs, cs)
                model[cl * cs:(cl + 1) * cs] = bytes(cs)
            elif op == 3:
                img.write_zeroes(cl * cs, cs, unmap=bool(step & 1))
                model[cl * cs:(cl + 1) * cs] = bytes(cs)
            else:
                img.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
    _check_json(p)
    assert qemu_raw(p, tmp_path) == bytes(model)
    with qcow2.open(p) as img:
        assert img.read(0, len(model)) == bytes(model)


def test_compressed_write_fills_discarded_cluster(tmp_path: Path) -> None:
    """After a discard (v3: zero-plain entry) a compressed write is allowed again, as QEMU."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    cmds = ["write -c -P 1 0 64k", "discard 0 64k", "write -c -P 2 0 64k",
            "write -c -P 3 64k 64k"]
    for p in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    qemu_io(a, *cmds)
    r = _ours("io", *[x for c in cmds for x in ("-c", c)], b)
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout
    _assert_same_file(a, b)
    assert os.path.getsize(b) == os.path.getsize(a)


def test_zlib_output_of_exactly_cluster_size_minus_one_is_stored_plain(tmp_path: Path) -> None:
    # deflate into QEMU's cs - 1 buffer says Z_OK (not Z_STREAM_END) when the stream fills it
    # exactly: qemu-io stores that cluster uncompressed, and so must we (found in a real
    # ext4 image: one cluster of 5622 differed).
    rnd = random.Random(0)
    body = bytes(rnd.randrange(240) for _ in range(4096))
    c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
    assert len(c.compress(body) + c.flush()) == 4095
    src = tmp_path / "cluster.bin"
    src.write_bytes(body)
    files = []
    for tool in ("qemu", "ours"):
        p = tmp_path / f"{tool}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "64k")
        cmd = f"write -c -s {src} 0 4096"
        if tool == "qemu":
            qemu_io(p, cmd, fmt="qcow2")
        else:
            with qcow2.open(str(p), readonly=False) as img:
                img.write_compressed(0, body)  # type: ignore[attr-defined]
        files.append(p.read_bytes())
    assert files[0] == files[1]
