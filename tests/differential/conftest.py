"""The read-path matrix: images made by qemu-img/qemu-io covering every on-disk feature we read.

Every image is built once per session (in parallel: each build is a handful of subprocesses)
together with the oracle's view of it: `qemu-img convert -O raw` (kept as a sparse file, so
the 1 TiB image costs nothing) and `qemu-img map --output=json`, for the whole image and a
few --start-offset/--max-length windows. Tests compare our engine against those.

All oracle commands run with the image's directory as the current directory, because QEMU
resolves a relative external data file name against the current directory (not against the
image), and the data-file cases use relative names on purpose.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _missing_oracle

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
SEED = 20240607


@dataclass
class MatrixImage:
    """One matrix entry: what to open, how, and what QEMU says about it."""

    name: str
    path: Path
    size: int
    open_kwargs: dict[str, Any] = field(default_factory=dict)
    snapshot: str | None = None
    full_read: bool = True          # False: too big to read whole (the 1 TiB image)
    raw: Path | None = None          # qemu-img convert -O raw output
    map_json: list[dict[str, Any]] | None = None
    windows: list[tuple[int, int, list[dict[str, Any]]]] = field(default_factory=list)
    notes: str = ""

    def read_oracle(self, offset: int, length: int) -> bytes:
        assert self.raw is not None
        with open(self.raw, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return data + bytes(length - len(data))


# ----------------------------------------------------------------------------- commands
class Builder:
    """Runs qemu-img/qemu-io in one case directory."""

    def __init__(self, root: Path, name: str, src: dict[str, Path]) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.src = src

    def run(self, *argv: str | os.PathLike[str], ok_codes: tuple[int, ...] = (0,)) -> str:
        p = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                           cwd=self.dir)
        if p.returncode not in ok_codes:
            raise AssertionError(f"{' '.join(map(str, argv))} -> {p.returncode}\n"
                                 f"{p.stderr}{p.stdout}")
        # qemu-io reports failed requests on stdout and still exits 0
        if argv[0] == "qemu-io" and ("error" in p.stdout.lower() or "failed" in p.stdout):
            raise AssertionError(f"{' '.join(map(str, argv))}\n{p.stdout}{p.stderr}")
        return p.stdout

    def img(self, *args: str) -> str:
        return self.run("qemu-img", *args)

    def create(self, name: str, size: int | str, *opts: str, backing: str | None = None,
               backing_fmt: str = "qcow2") -> Path:
        argv = ["create", "-q", "-f", "qcow2"]
        if opts:
            argv += ["-o", ",".join(opts)]
        if backing is not None:
            argv += ["-b", backing, "-F", backing_fmt]
        self.img(*argv, name, str(size))
        return self.dir / name

    def io(self, name: str | Path, *cmds: str, fmt: str | None = "qcow2",
           extra: tuple[str, ...] = ()) -> None:
        argv: list[str] = ["qemu-io"]
        if fmt:
            argv += ["-f", fmt]
        argv += list(extra)
        for c in cmds:
            argv += ["-c", c]
        argv.append(str(name))
        self.run(*argv)

    def rand(self) -> str:
        return str(self.src["rand"])

    def text(self) -> str:
        return str(self.src["text"])


BuildFn = Callable[[Builder], list[MatrixImage]]
BUILDERS: dict[str, BuildFn] = {}
CASE_NAMES: list[str] = []
SNAPSHOT_CASES: set[str] = set()


def builder(*names: str, snapshots: tuple[str, ...] = ()) -> Callable[[BuildFn], BuildFn]:
    """Register a build function producing the listed case names (the first is its dir)."""

    def deco(fn: BuildFn) -> BuildFn:
        BUILDERS[names[0]] = fn
        CASE_NAMES.extend(names)
        SNAPSHOT_CASES.update(snapshots)
        return fn

    return deco


def _one(b: Builder, path: Path, size: int, **kw: Any) -> list[MatrixImage]:
    return [MatrixImage(b.dir.name, path, size, **kw)]


# The same mix of writes, used on many layouts: unaligned data, a straddling pattern write,
# zero writes with and without unmap (partial and whole clusters), discards.
def _mixed_ops(size: int, cs: int) -> list[str]:
    cs = min(cs, size // 16)   # with 2 MiB clusters the ops become partial-cluster ones
    return [
        f"write -s {{rand}} 0 {min(size, 3 * cs + 1000)}",
        f"write -P 0x11 {cs + 333} {cs + 777}",
        f"write -z {cs} {cs}",
        f"write -s {{text}} {size // 2 + 100} {min(size // 4, 5 * cs + 12345)}",
        f"write -z -u {size // 2 + cs} {2 * cs + 1024}",
        f"discard {size // 2 + 4 * cs} {cs}",
        f"write -P 0x7e {size - 3 * cs - 1} {2 * cs + cs // 2}",
        f"write -z {size - cs - 200} 100",
        f"discard {2 * cs + 512} 512",
        f"write -P 0x5a {size - 1024} 1024",
    ]


def _apply(b: Builder, name: str | Path, ops: list[str], fmt: str | None = "qcow2") -> None:
    b.io(name, *(o.format(rand=b.rand(), text=b.text()) for o in ops), fmt=fmt)


# ----------------------------------------------------------------------------- layouts
def _layout(compat: str, cs: int, size: int, *extra: str) -> BuildFn:
    def build(b: Builder) -> list[MatrixImage]:
        p = b.create("img.qcow2", size, f"compat={compat}", f"cluster_size={cs}", *extra)
        ops = _mixed_ops(size, cs)
        if cs > size // 16:
            # whole-cluster zero writes and discards on big clusters
            ops += [f"write -P 0x66 {cs} {cs}", f"write -z {cs} {cs // 2}",
                    f"write -z {cs} {cs}", f"discard {2 * cs} {cs}"]
        _apply(b, p, ops)
        return _one(b, p, size)
    return build


builder("v2_64k")(_layout("0.10", 64 * KiB, 4 * MiB))
builder("v3_64k")(_layout("1.1", 64 * KiB, 4 * MiB))
builder("v3_512")(_layout("1.1", 512, 2 * MiB))
builder("v2_512")(_layout("0.10", 512, 1 * MiB))
builder("v3_4k")(_layout("1.1", 4 * KiB, 4 * MiB))
# A virtual size that is not a multiple of the cluster size (the last cluster is partial).
builder("v3_2M")(_layout("1.1", 2 * MiB, 6 * MiB + 3 * 512))
builder("extl2_64k")(_layout("1.1", 64 * KiB, 4 * MiB, "extended_l2=on"))
builder("extl2_2M")(_layout("1.1", 2 * MiB, 6 * MiB, "extended_l2=on"))
builder("extl2_16k")(_layout("1.1", 16 * KiB, 2 * MiB + 512, "extended_l2=on"))
builder("refcount1")(_layout("1.1", 4 * KiB, 2 * MiB, "refcount_bits=1"))
builder("refcount64")(_layout("1.1", 64 * KiB, 4 * MiB, "refcount_bits=64"))


@builder("extl2_subclusters")
def _extl2_subclusters(b: Builder) -> list[MatrixImage]:
    # Subcluster-granular writes, zero writes and discards inside single clusters.
    size = 2 * MiB
    p = b.create("img.qcow2", size, "extended_l2=on", "cluster_size=64k")
    _apply(b, p, [
        "write -P 1 4096 2048", "write -P 2 10000 100", "write -z 12288 4096",
        "write -s {rand} 65536 65536", "write -z 69632 2048", "discard 73728 4096",
        "write -z -u 81920 6144", "write -P 3 131072 65536", "write -z -u 131072 65536",
        "write -P 4 196608 65536", "write -z 196608 65536", "discard 262144 65536",
        "write -P 5 300000 1", "write -c -P 6 393216 65536", "write -z 458752 2048",
        "write -s {text} 600000 70000",
    ])
    return _one(b, p, size)


# ----------------------------------------------------------------------------- compression
def _compressed_convert(ctype: str, cs: int, size: int) -> BuildFn:
    def build(b: Builder) -> list[MatrixImage]:
        raw = b.dir / "src.raw"
        text = Path(b.text()).read_bytes()
        rnd = Path(b.rand()).read_bytes()
        with open(raw, "wb") as f:
            f.truncate(size)
            # compressible data, incompressible data (stored uncompressed), zeros, holes
            f.seek(0)
            f.write(text[:size // 3 + 777])
            f.seek(size // 2 + 5)
            f.write(rnd[:3 * cs + 999])
            f.write(bytes(2 * cs))
            f.write(text[1000:1000 + size // 5])
            f.truncate(size)
        p = b.dir / "img.qcow2"
        b.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
              f"compression_type={ctype},cluster_size={cs}", str(raw), str(p))
        raw.unlink()
        return _one(b, p, size)
    return build


builder("zlib_convert")(_compressed_convert("zlib", 64 * KiB, 4 * MiB))
builder("zstd_convert")(_compressed_convert("zstd", 64 * KiB, 4 * MiB))
builder("zlib_convert_512")(_compressed_convert("zlib", 512, 1 * MiB))
builder("zstd_convert_2M")(_compressed_convert("zstd", 2 * MiB, 6 * MiB))
builder("zlib_convert_4k_odd")(_compressed_convert("zlib", 4 * KiB, 1 * MiB + 1536))


def _compressed_io(ctype: str, cs: int, size: int, *extra: str) -> BuildFn:
    def build(b: Builder) -> list[MatrixImage]:
        p = b.create("img.qcow2", size, f"compression_type={ctype}", f"cluster_size={cs}",
                     *extra)
        ops = []
        # Many small compressed clusters packed byte-granularly into shared host clusters.
        for i in range(min(12, size // cs - 1)):
            ops.append(f"write -c -s {{text}} {i * cs} {cs}" if i % 3 else
                       f"write -c -P {0x20 + i} {i * cs} {cs}")
        tail = size - size % cs if size % cs else size - cs
        ops += [
            f"write -c -s {{text}} {tail} {size - tail}",       # the (partial) last cluster
            f"write -P 0x44 {2 * cs + 100} 300",                # COW out of a compressed cluster
            f"write -z {4 * cs} {cs}",                          # zero over compressed
            f"discard {5 * cs} {cs}",                           # discard a compressed cluster
            f"write -z {7 * cs + 512} 1024",                    # partial zero -> rewritten
            f"write -c -s {{rand}} {20 * cs} {cs}",             # incompressible -> normal
        ]
        _apply(b, p, [o for o in ops if int(o.split()[-2]) < size])
        return _one(b, p, size)
    return build


builder("zlib_io_4k")(_compressed_io("zlib", 4 * KiB, 1 * MiB + 2048))
builder("zstd_io_4k")(_compressed_io("zstd", 4 * KiB, 1 * MiB))
builder("zlib_io_64k")(_compressed_io("zlib", 64 * KiB, 2 * MiB))
builder("zstd_io_64k")(_compressed_io("zstd", 64 * KiB, 2 * MiB + 512))
builder("zlib_io_512")(_compressed_io("zlib", 512, 256 * KiB))
builder("zlib_io_refcount1")(_compressed_io("zlib", 4 * KiB, 1 * MiB, "refcount_bits=1"))
builder("zstd_io_extl2")(_compressed_io("zstd", 32 * KiB, 2 * MiB, "extended_l2=on"))
builder("zlib_io_2M")(_compressed_io("zlib", 2 * MiB, 8 * MiB))


# ----------------------------------------------------------------------------- chains
@builder("chain3_top", "chain3_mid")
def _chain3(b: Builder) -> list[MatrixImage]:
    size = 4 * MiB
    base = b.create("base.qcow2", size, "cluster_size=64k")
    _apply(b, base, [f"write -s {{rand}} 0 {size}", "write -z -u 1048576 65536"])
    mid = b.create("mid.qcow2", size, "cluster_size=4k", backing="base.qcow2")
    _apply(b, mid, ["write -P 0x21 100000 50000", "write -z 500000 70000",
                    "discard 700000 8192", "write -c -P 0x23 2097152 4096",
                    "write -P 0x24 3000000 5"])
    top = b.create("top.qcow2", size, "cluster_size=64k", backing="mid.qcow2")
    _apply(b, top, ["write -z 0 65536", "write -z 196608 131072", "write -z -u 393216 65536",
                    "write -P 0x31 450000 70000", "discard 2162688 65536",
                    "write -z 3000000 100", "write -c -P 0x33 3145728 65536",
                    "write -z 3276800 1000"])
    return [MatrixImage("chain3_top", top, size), MatrixImage("chain3_mid", mid, size)]


@builder("extl2_backing")
def _extl2_backing(b: Builder) -> list[MatrixImage]:
    size = 4 * MiB
    base = b.create("base.qcow2", size)
    _apply(b, base, [f"write -s {{rand}} 0 {size}"])
    top = b.create("top.qcow2", size, "extended_l2=on", "cluster_size=64k", backing="base.qcow2")
    _apply(b, top, ["write -P 1 4096 2048", "write -P 2 10000 100", "write -z 12288 4096",
                    "discard 65536 4096", "write -z 131072 65536", "write -z -u 196608 65536",
                    "discard 262144 65536", "write -z 300000 3000", "write -P 3 400000 1",
                    "write -c -P 4 524288 65536", "write -P 5 1048570 20"])
    return _one(b, top, size)


@builder("extl2_2M_backing")
def _extl2_2m_backing(b: Builder) -> list[MatrixImage]:
    size = 6 * MiB
    base = b.create("base.qcow2", size)
    _apply(b, base, [f"write -s {{rand}} 0 {4 * MiB}", f"write -P 9 {5 * MiB} 4096"])
    top = b.create("top.qcow2", size, "extended_l2=on", "cluster_size=2M", backing="base.qcow2")
    _apply(b, top, ["write -P 1 70000 1000", "write -z 131072 65536", "discard 262144 131072",
                    "write -z -u 2097152 65536", "write -P 2 4194304 65536",
                    "write -z 4325376 100", f"discard {5 * MiB} 65536"])
    return _one(b, top, size)


@builder("raw_backing")
def _raw_backing(b: Builder) -> list[MatrixImage]:
    # A sparse raw backing file whose length is not a multiple of 512 (QEMU rounds it up).
    base = b.dir / "base.raw"
    rnd = Path(b.rand()).read_bytes()
    with open(base, "wb") as f:
        f.write(rnd[:200000])
        f.seek(1 * MiB)
        f.write(rnd[200000:300000])
        f.seek(3 * MiB - 100)
        f.write(rnd[:1000])   # ends at 3 MiB + 900
    size = 4 * MiB
    top = b.create("top.qcow2", size, backing="base.raw", backing_fmt="raw")
    _apply(b, top, ["write -P 1 65536 1000", "write -z 131072 65536", "discard 1048576 65536",
                    "write -P 2 3145728 70000"])
    return _one(b, top, size)


@builder("short_backing")
def _short_backing(b: Builder) -> list[MatrixImage]:
    base = b.create("base.qcow2", 1 * MiB + 512, "cluster_size=4k")
    _apply(b, base, [f"write -s {{rand}} 0 {1 * MiB + 512}"])
    size = 4 * MiB
    top = b.create("top.qcow2", size, "cluster_size=64k", backing="base.qcow2")
    # A partial write straddling the backing end: COW reads past the backing's end.
    _apply(b, top, ["write -P 1 1040000 20000", "write -z 0 4096", "write -P 2 3000000 10"])
    return _one(b, top, size)


@builder("short_backing_raw")
def _short_backing_raw(b: Builder) -> list[MatrixImage]:
    base = b.dir / "base.raw"
    base.write_bytes(Path(b.rand()).read_bytes()[:777777])
    size = 2 * MiB
    top = b.create("top.qcow2", size, "cluster_size=4k", backing="base.raw", backing_fmt="raw")
    _apply(b, top, ["write -P 1 4096 4096", "write -P 2 1000000 10"])
    return _one(b, top, size)


@builder("v2_backing")
def _v2_backing(b: Builder) -> list[MatrixImage]:
    size = 2 * MiB
    base = b.create("base.qcow2", size, "compat=0.10")
    _apply(b, base, [f"write -s {{rand}} 0 {size}"])
    top = b.create("top.qcow2", size, "compat=0.10", backing="base.qcow2")
    # v2 has no zero flag: with a backing file zero writes write real zeros, discards are refused
    _apply(b, top, ["write -z 0 65536", "write -z -u 131072 65536", "discard 262144 65536",
                    "write -P 3 400000 7"])
    return _one(b, top, size)


@builder("small_top_big_base")
def _small_top(b: Builder) -> list[MatrixImage]:
    base = b.create("base.qcow2", 4 * MiB)
    _apply(b, base, [f"write -s {{rand}} 0 {4 * MiB}"])
    size = 1 * MiB + 1024
    top = b.create("top.qcow2", size, backing="base.qcow2")
    _apply(b, top, ["write -P 1 1000 1000"])
    return _one(b, top, size)


# ----------------------------------------------------------------------------- data files
@builder("data_file")
def _data_file(b: Builder) -> list[MatrixImage]:
    size = 4 * MiB
    p = b.create("img.qcow2", size, "data_file=img.data")
    _apply(b, p, _mixed_ops(size, 64 * KiB))
    return _one(b, p, size, open_kwargs={"data_file": str(b.dir / "img.data")})


@builder("data_file_raw")
def _data_file_raw(b: Builder) -> list[MatrixImage]:
    size = 4 * MiB
    p = b.create("img.qcow2", size, "data_file=img.data", "data_file_raw=on")
    _apply(b, p, _mixed_ops(size, 64 * KiB))
    return _one(b, p, size, open_kwargs={"data_file": str(b.dir / "img.data")})


@builder("data_file_extl2")
def _data_file_extl2(b: Builder) -> list[MatrixImage]:
    size = 2 * MiB
    p = b.create("img.qcow2", size, f"data_file={b.dir / 'img.data'}", "extended_l2=on")
    _apply(b, p, ["write -P 1 4096 2048", "write -z 8192 4096", "write -s {rand} 65536 100000",
                  "discard 131072 4096", "write -z -u 0 65536"])
    return _one(b, p, size)   # absolute data file name: no override needed


# ----------------------------------------------------------------------------- misc states
@builder("dirty_lazy")
def _dirty_lazy(b: Builder) -> list[MatrixImage]:
    size = 4 * MiB
    p = b.create("img.qcow2", size, "lazy_refcounts=on")
    _apply(b, p, ["write -P 1 0 100000"])
    # abort leaves the dirty bit set and refcounts stale
    b.run("qemu-io", "-f", "qcow2", "-c", "write -s " + b.text() + " 200000 300000",
          "-c", "write -z 1048576 65536", "-c", "abort", str(p), ok_codes=(-6, 134))
    assert p.read_bytes()[79] & 1, "dirty bit not set"
    return _one(b, p, size)


def _prealloc(mode: str) -> BuildFn:
    def build(b: Builder) -> list[MatrixImage]:
        size = 4 * MiB
        p = b.create("img.qcow2", size, f"preallocation={mode}")
        _apply(b, p, ["write -P 1 100000 70000", "write -z 1048576 65536",
                      "write -z -u 2097152 65536", "discard 3145728 65536"])
        return _one(b, p, size)
    return build


builder("prealloc_metadata")(_prealloc("metadata"))
builder("prealloc_falloc")(_prealloc("falloc"))
builder("prealloc_full")(_prealloc("full"))


@builder("prealloc_metadata_extl2")
def _prealloc_extl2(b: Builder) -> list[MatrixImage]:
    size = 2 * MiB
    base = b.create("base.qcow2", size)
    _apply(b, base, [f"write -s {{rand}} 0 {size}"])
    # extended_l2 is the only way QEMU allows preallocation together with a backing file
    p = b.create("img.qcow2", size, "extended_l2=on", "preallocation=metadata",
                 backing="base.qcow2")
    _apply(b, p, ["write -P 1 4096 2048", "write -z 65536 65536"])
    return _one(b, p, size)


@builder("snap_active", "snap_s1", "snap_id2", "snap_s3",
         snapshots=("snap_s1", "snap_id2", "snap_s3"))
def _snapshots(b: Builder) -> list[MatrixImage]:
    p = b.create("img.qcow2", 2 * MiB, "cluster_size=4k")
    _apply(b, p, ["write -s {rand} 0 1000000", "write -c -P 9 1048576 4096"])
    b.img("snapshot", "-c", "s1", str(p))
    _apply(b, p, ["write -P 1 5000 10000", "write -z 100000 8192", "discard 200000 4096",
                  "write -z -u 1048576 4096"])
    b.img("snapshot", "-c", "second", str(p))
    # A snapshot taken before a resize has a shorter L1 than the active layer.
    b.img("resize", str(p), str(4 * MiB))
    _apply(b, p, ["write -P 2 3000000 5000", "write -P 3 0 512", "discard 4096 4096"])
    b.img("snapshot", "-c", "s3", str(p))
    _apply(b, p, ["write -P 4 3500000 5000"])
    size = 4 * MiB
    return [MatrixImage("snap_active", p, size),
            MatrixImage("snap_s1", p, size, snapshot="s1"),
            MatrixImage("snap_id2", p, size, snapshot="2"),
            MatrixImage("snap_s3", p, size, snapshot="s3")]


@builder("snap_v2_active", "snap_v2_a", snapshots=("snap_v2_a",))
def _snapshots_v2(b: Builder) -> list[MatrixImage]:
    size = 2 * MiB
    p = b.create("img.qcow2", size, "compat=0.10", "cluster_size=16k")
    _apply(b, p, ["write -s {rand} 0 700000", "write -c -P 9 1048576 16384"])
    b.img("snapshot", "-c", "a", str(p))
    _apply(b, p, ["write -P 1 5000 10000", "write -z 100000 32768", "discard 200000 16384",
                  "write -z 1048576 16384"])
    return [MatrixImage("snap_v2_active", p, size),
            MatrixImage("snap_v2_a", p, size, snapshot="a")]


@builder("shrunk")
def _shrunk(b: Builder) -> list[MatrixImage]:
    p = b.create("img.qcow2", 8 * MiB, "cluster_size=4k")
    _apply(b, p, ["write -s {rand} 0 3000000", f"write -P 1 {7 * MiB} 65536",
                  "write -z 1000000 100000"])
    size = 2 * MiB + 1536
    b.img("resize", "--shrink", str(p), str(size))
    return _one(b, p, size)


@builder("grown")
def _grown(b: Builder) -> list[MatrixImage]:
    p = b.create("img.qcow2", 1 * MiB, "cluster_size=512")
    _apply(b, p, ["write -s {rand} 0 1048576"])
    size = 3 * MiB
    b.img("resize", str(p), str(size))
    _apply(b, p, ["write -P 1 2000000 5000"])
    return _one(b, p, size)


def _truncate_file(path: Path, cut: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size - cut)


@builder("truncated_prealloc")
def _truncated_prealloc(b: Builder) -> list[MatrixImage]:
    # With metadata preallocation QEMU asks the file which parts of a data run exist: the
    # last data cluster ends mid-sector at EOF, the rest reads (and maps) as zero.
    size = 1 * MiB
    p = b.create("img.qcow2", size, "preallocation=metadata")
    _apply(b, p, [f"write -s {{rand}} {size - 65536} 65536"])
    _truncate_file(p, 65536 - 1001)
    return _one(b, p, size)


@builder("truncated_plain")
def _truncated_plain(b: Builder) -> list[MatrixImage]:
    size = 1 * MiB
    p = b.create("img.qcow2", size, "cluster_size=4k")
    _apply(b, p, ["write -s {rand} 0 20000", "write -P 1 500000 8192"])
    _truncate_file(p, 4096 + 333)
    return _one(b, p, size)


@builder("chain_subdir")
def _chain_subdir(b: Builder) -> list[MatrixImage]:
    # Relative backing names are resolved against the directory of the image naming them.
    size = 2 * MiB
    (b.dir / "sub").mkdir()
    base = b.create("sub/base.qcow2", size)
    _apply(b, base, ["write -s {rand} 0 2097152"])
    mid = b.create("sub/mid.qcow2", size, backing="base.qcow2")
    _apply(b, mid, ["write -P 1 65536 65536"])
    top = b.create("top.qcow2", size, backing="sub/mid.qcow2")
    _apply(b, top, ["write -P 2 131072 1000"])
    _ = mid
    return _one(b, top, size)


@builder("probed_backing")
def _probed_backing(b: Builder) -> list[MatrixImage]:
    # No backing format extension: the backing file's format is probed (here: raw).
    size = 1 * MiB
    (b.dir / "base.img").write_bytes(Path(b.rand()).read_bytes()[:size])
    p = b.create("top.qcow2", size, backing="base.img", backing_fmt="raw")
    _apply(b, p, ["write -P 1 0 1000"])
    data = bytearray(p.read_bytes())
    magic = (0xE2792ACA).to_bytes(4, "big")
    at = data.index(magic, 0, 4096)
    data[at:at + 4] = (0x0EADBEEF).to_bytes(4, "big")   # an unknown extension now
    p.write_bytes(bytes(data))
    return _one(b, p, size)


def _poke_size(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.seek(24)
        f.write(size.to_bytes(8, "big"))


@builder("odd_header_size")
def _odd_header_size(b: Builder) -> list[MatrixImage]:
    # A header size that is not a multiple of 512: QEMU drops the partial last sector.
    p = b.create("img.qcow2", 1 * MiB, "cluster_size=4k")
    _apply(b, p, ["write -s {rand} 0 1048576"])
    _poke_size(p, 1 * MiB - 4096 + 1000)
    return _one(b, p, 1 * MiB - 4096 + 512)


@builder("odd_size_backing")
def _odd_size_backing(b: Builder) -> list[MatrixImage]:
    base = b.create("base.qcow2", 1 * MiB, "cluster_size=4k")
    _apply(b, base, ["write -s {rand} 0 1048576"])
    _poke_size(base, 1 * MiB - 4096 + 1000)
    size = 2 * MiB
    top = b.create("top.qcow2", size, "cluster_size=64k", backing="base.qcow2")
    _apply(b, top, ["write -P 1 1200000 10"])
    return _one(b, top, size)


@builder("short_backing_extl2")
def _short_backing_extl2(b: Builder) -> list[MatrixImage]:
    # Extended L2 over a short backing file: allocated clusters with unallocated subclusters
    # (UNALLOCATED_ALLOC, which carry a host offset) straddle the backing file's end.
    base = b.create("base.qcow2", 1 * MiB + 8192, "cluster_size=4k")
    _apply(b, base, [f"write -s {{rand}} 0 {1 * MiB + 8192}"])
    size = 3 * MiB
    top = b.create("top.qcow2", size, "extended_l2=on", "cluster_size=64k", backing="base.qcow2")
    _apply(b, top, ["write -P 1 1050000 100", "write -P 2 1064960 2048",
                    "write -z 1120000 5000", "write -P 3 2000000 10"])
    return _one(b, top, size)


@builder("snap_overlay_active", "snap_overlay_s", snapshots=("snap_overlay_s",))
def _snap_overlay(b: Builder) -> list[MatrixImage]:
    size = 2 * MiB
    base = b.create("base.qcow2", size)
    _apply(b, base, ["write -s {rand} 0 2097152"])
    top = b.create("top.qcow2", size, "cluster_size=16k", backing="base.qcow2")
    _apply(b, top, ["write -P 1 100000 50000", "write -z 300000 40000"])
    b.img("snapshot", "-c", "s", str(top))
    _apply(b, top, ["write -P 2 0 1000000", "discard 500000 100000"])
    return [MatrixImage("snap_overlay_active", top, size),
            MatrixImage("snap_overlay_s", top, size, snapshot="s")]


@builder("snap_name_is_other_id", snapshots=("snap_name_is_other_id",))
def _snap_name_is_other_id(b: Builder) -> list[MatrixImage]:
    # Snapshot ID 1 is named "2"; "2" must select ID 2 (IDs are tried before names).
    size = 1 * MiB
    p = b.create("img.qcow2", size)
    _apply(b, p, ["write -P 1 0 65536"])
    b.img("snapshot", "-c", "2", str(p))
    _apply(b, p, ["write -P 2 0 65536"])
    b.img("snapshot", "-c", "x", str(p))
    _apply(b, p, ["write -P 3 0 65536"])
    return _one(b, p, size, snapshot="2")


@builder("with_bitmap")
def _with_bitmap(b: Builder) -> list[MatrixImage]:
    size = 2 * MiB
    p = b.create("img.qcow2", size)
    b.img("bitmap", "--add", str(p), "b0")
    _apply(b, p, ["write -P 1 100000 300000"])
    b.img("bitmap", "--add", "-g", "512k", str(p), "b1")
    return _one(b, p, size)


@builder("abs_backing")
def _abs_backing(b: Builder) -> list[MatrixImage]:
    size = 1 * MiB
    base = b.create("base.qcow2", size)
    _apply(b, base, ["write -s {rand} 0 1048576"])
    top = b.create("top.qcow2", size, backing=str(base))
    _apply(b, top, ["write -P 1 4096 4096"])
    return _one(b, top, size)


@builder("corrupt_bit")
def _corrupt_bit(b: Builder) -> list[MatrixImage]:
    # The corrupt bit forbids read-write opens only; reads work as usual.
    size = 1 * MiB
    p = b.create("img.qcow2", size)
    _apply(b, p, ["write -s {rand} 0 300000"])
    with open(p, "r+b") as f:
        f.seek(72)
        f.write((2).to_bytes(8, "big"))
    return _one(b, p, size)


@builder("snap_truncated_table", "snap_table_past_eof",
         snapshots=("snap_truncated_table",))
def _snap_truncated(b: Builder) -> list[MatrixImage]:
    # The snapshot table is the last thing in the file; cutting its end makes QEMU read zeros
    # for the rest of the name, which is then lost at the first NUL ("snapname" -> "snap").
    size = 1 * MiB
    p = b.create("img.qcow2", size)
    _apply(b, p, ["write -P 1 0 65536"])
    b.img("snapshot", "-c", "snapname", str(p))
    q = b.dir / "past.qcow2"
    q.write_bytes(p.read_bytes())
    _truncate_file(p, 4)
    # and a table entirely past EOF: all-zero entries (empty ID and name, no L1)
    with open(q, "r+b") as f:
        f.seek(64)
        f.write((64 * MiB).to_bytes(8, "big"))
    return [MatrixImage("snap_truncated_table", p, size, snapshot="snap"),
            MatrixImage("snap_table_past_eof", q, size)]


@builder("sparse_1t")
def _sparse_1t(b: Builder) -> list[MatrixImage]:
    size = 1 * TiB
    p = b.create("img.qcow2", "1T")
    _apply(b, p, [f"write -s {{rand}} {size - 65536 - 1000} 3000",
                  f"write -P 7 {size - 512} 512", f"write -P 8 {size // 2 + 12345} 100000",
                  f"write -z {size - 3 * 65536} 65536"])
    return _one(b, p, size, full_read=False)


@builder("raw_image")
def _raw_image(b: Builder) -> list[MatrixImage]:
    p = b.dir / "img.raw"
    rnd = Path(b.rand()).read_bytes()
    with open(p, "wb") as f:
        f.write(rnd[:100000])
        f.seek(1 * MiB + 7)
        f.write(rnd[:5000])
        f.seek(2 * MiB - 1)
        f.write(b"\x01")
        f.seek(3 * MiB + 123)
        f.write(rnd[:10])   # a length that is not a multiple of 512
    size = (3 * MiB + 133 + 511) & ~511
    return _one(b, p, size)


# ----------------------------------------------------------------------------- oracle
def _windows(case: MatrixImage) -> list[tuple[int, int]]:
    rng = random.Random(f"{SEED}-{case.name}")
    size = case.size
    span = min(size, 8 * MiB)
    base = size - span
    out = [(base + rng.randrange(span), rng.randrange(1, span // 2 + 2)),
           (base + rng.randrange(span), rng.randrange(1, 4096)),
           (size - rng.randrange(1, 70000), 1 << 20),   # runs past the end: clamped
           (0, rng.randrange(1, span))]
    return out


def _dig_holes(path: Path) -> None:
    """Turn the file's zero blocks, and so its unwritten extents, into real holes.

    QEMU zeroes COW areas with fallocate, which leaves unwritten extents on ext4. Whether
    SEEK_DATA calls those data depends on what the page cache holds at that moment (and a
    read of the header with an 8 MiB readahead can pull in the whole file), so
    `qemu-img map` of a metadata-preallocated image would change from one run to the
    next. Holes are answered from the extent tree alone: both tools see the same thing.
    """
    if not shutil.which("fallocate"):
        return
    # Read it first: fallocate skips what SEEK_DATA calls a hole, which uncached unwritten
    # extents are. Twice, as punching can leave a last unwritten piece behind.
    for _ in range(2):
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        subprocess.run(["fallocate", "--dig-holes", str(path)], check=False,
                       capture_output=True)


def drop_page_cache(case: MatrixImage) -> None:
    """Evict the case's files from the page cache before asking where their holes are.

    On ext4 a range QEMU zeroed with fallocate is an unwritten extent, and SEEK_DATA reports
    it as data once its pages were read into the cache (a read, or readahead next to one).
    qemu-img map (with metadata preallocation) and our extents both ask SEEK_DATA, so they
    must look at the same, cache-independent, state.
    """
    for p in case.path.parent.rglob("*"):
        if p.is_file() and not p.name.endswith(".oracle.raw"):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _oracle(b: Builder, case: MatrixImage) -> None:
    if case.snapshot is None:   # qemu-img map has no snapshot option
        drop_page_cache(case)
        case.map_json = json.loads(b.img("map", "--output=json", str(case.path)))
        for s, n in _windows(case):
            got = json.loads(b.img("map", "--output=json", f"--start-offset={s}",
                                   f"--max-length={n}", str(case.path)))
            case.windows.append((s, n, got))
    raw = b.dir / f"{case.name}.oracle.raw"
    argv: list[str] = ["convert"]
    if case.snapshot is not None:
        argv += ["-l", case.snapshot]
    b.img(*argv, "-O", "raw", str(case.path), str(raw))
    case.raw = raw


def _build_all(root: Path) -> dict[str, MatrixImage]:
    rng = random.Random(SEED)
    src = {"rand": root / "rand.bin", "text": root / "text.bin"}
    src["rand"].write_bytes(rng.randbytes(4 * MiB))
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randrange(2, 9)))
             for _ in range(300)]
    text = bytearray()
    while len(text) < 4 * MiB:
        text += b" ".join(rng.choices(words, k=64)) + b"\n"
    src["text"].write_bytes(bytes(text[:4 * MiB]))

    def build(item: tuple[str, BuildFn]) -> tuple[Builder, list[MatrixImage]]:
        b = Builder(root, item[0], src)
        return b, item[1](b)

    def oracle(item: tuple[Builder, list[MatrixImage]]) -> list[MatrixImage]:
        for c in item[1]:
            _oracle(item[0], c)
        return item[1]

    out: dict[str, MatrixImage] = {}
    with ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2) * 2)) as pool:
        built = list(pool.map(build, BUILDERS.items()))
        files = [p for p in root.rglob("*") if p.is_file() and p.parent != root]
        os.sync()   # dirty pages still being written back would escape the digging
        list(pool.map(_dig_holes, files))
        # qcow2's metadata-preallocation heuristic (which changes what map reports) reads the
        # file's allocated size; let delayed allocation settle so that QEMU now and we later
        # see the same st_blocks.
        os.sync()
        for cases in pool.map(oracle, built):
            for c in cases:
                out[c.name] = c
    assert sorted(out) == sorted(CASE_NAMES)
    return out


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MatrixImage]]:
    """All matrix images with their oracle outputs, built once per session."""
    missing = _missing_oracle()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"oracle missing in CI: {', '.join(missing)}")
        pytest.skip(f"oracle missing: {', '.join(missing)}")
    root = tmp_path_factory.mktemp("read-matrix")
    yield _build_all(root)


@pytest.fixture(params=["python", "numpy"])
def l2_classifier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with the Python L2 loop only and once with the numpy classifier.

    Which one a process uses otherwise depends on what it has done before (numpy is only
    imported once a scan is long enough), so the matrix pins each explicitly.
    """
    from qcow2.engine import image as image_mod

    if request.param == "numpy":
        import numpy

        monkeypatch.setattr(image_mod, "_np_module", numpy)
    else:
        monkeypatch.setattr(image_mod, "_np_module", None)
        monkeypatch.setattr(image_mod, "_loaded_numpy", lambda: None)
        monkeypatch.setattr(image_mod, "NUMPY_IMPORT_AFTER", 1 << 62)
    return str(request.param)
