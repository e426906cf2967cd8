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
