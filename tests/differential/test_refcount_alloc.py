"""The refcount allocator against qemu-img check: clusters we allocate but do not reference
are exactly the leaks qemu-img finds, never corruptions, across refblock creation and
refcount table growth, for every refcount width."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from qcow2.engine.refcount import Refcounts
from qcow2.format.builder import ImageSpec, build_image
from qcow2.io import FileStore
from tests.conftest import qemu_img

pytestmark = pytest.mark.oracle


def _check(path: Path) -> dict[str, int]:
    r = qemu_img("check", "--output=json", path, check=False)
    assert r.returncode in (0, 3), r.stderr + r.stdout
    out: dict[str, int] = json.loads(r.stdout)
    return out


@pytest.mark.parametrize(("cluster_bits", "order", "count"), [
    (9, 4, 40000),    # 512 B clusters: several refblocks and a reftable growth
    (9, 0, 9000),     # 1-bit refcounts: 4096 per block
    (9, 6, 3000),     # 64-bit refcounts: 64 per block, table grows repeatedly
    (12, 3, 5000),
    (16, 4, 300),
])
def test_allocations_are_exact_leaks(tmp_path: Path, cluster_bits: int, order: int,
                                     count: int) -> None:
    p = tmp_path / "a.qcow2"
    p.write_bytes(build_image(ImageSpec(size=1 << 20, cluster_bits=cluster_bits,
                                        refcount_order=order, clusters={0: b"x"})))
    store = FileStore(str(p), writable=True)
    cs = 1 << cluster_bits

    def set_header(offset: int, clusters: int) -> None:
        store.pwrite(48, struct.pack(">QI", offset, clusters))

    rc = Refcounts(store, cluster_bits, order, cs, 1, set_header)
    offsets = set()
    for i in range(count):
        n = 1 + (i % 3 == 0) * 2  # runs of 1 and 3 clusters
        off = rc.alloc_clusters(n)
        for k in range(n):
            assert off + k * cs not in offsets
            offsets.add(off + k * cs)
        if i % 7 == 0:
            store.truncate(max(store.size(), off + n * cs))
    rc.flush_blocks()
    store.truncate(max(store.size(), max(offsets) + cs))
    store.close()
    res = _check(p)
    assert res.get("corruptions", 0) == 0
    assert res["leaks"] == len(offsets)
    r = qemu_img("check", "-r", "leaks", "--output=json", p, check=False)
    assert r.returncode == 0, r.stdout


def _sparse_source(path: Path, size: int, seed: int) -> None:
    """Random data runs of odd lengths with holes and zero gaps between them: qemu-img
    convert then issues unaligned requests that start in clusters already allocated."""
    import os
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = rnd.choice([4096, 65536, 1 << 20, 3 << 20, 12345 * 4])
            if rnd.random() < 0.6:
                f.seek(pos)
                f.write(os.urandom(min(n, size - pos)))
            pos += n + rnd.choice([0, 0, 4096, 65536, 2 << 20])


@pytest.mark.parametrize("opts", ["cluster_size=512", "cluster_size=1024",
                                  "cluster_size=4096", "cluster_size=16384,refcount_bits=64",
                                  "cluster_size=2048,refcount_bits=32"])
def test_convert_layout_across_refblocks_matches_qemu_img(tmp_path: Path, opts: str) -> None:
    """Where refblocks, a grown refcount table and the data land: qemu-img's allocator
    continues a request right after the cluster it used last (qcow2_alloc_clusters_at), places
    a missing refblock before growing the table around it, and frees the old table; the
    files must be byte-identical."""
    import subprocess
    import sys

    src = tmp_path / "src.raw"
    _sparse_source(src, 40 << 20, 5)
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", opts, src, q)
    r = subprocess.run([sys.executable, "-m", "qcow2", "convert", "-O", "qcow2", "-o", opts,
                        str(src), str(o)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert o.read_bytes() == q.read_bytes()
