"""A new L2 table placed in the cluster of a freed one is what later reads see."""

from __future__ import annotations

from array import array
from pathlib import Path

import qcow2
from qcow2.engine.writer import WritableQcow2Image


def test_new_l2_table_replaces_a_stale_cached_one(tmp_path: Path) -> None:
    p = tmp_path / "img.qcow2"
    qcow2.create(str(p), 64 << 20, cluster_size=4096)
    with qcow2.open(str(p), readonly=False) as img:
        assert isinstance(img, WritableQcow2Image)
        img.write(0, b"x")
        img.flush()
        nxt = img.refcounts._find_free(1) << img.cluster_bits
        # a table that once lived in that cluster (freed since) is still cached
        img.l2_cache.put(nxt, array("Q", [(7 << 20) | (1 << 63)]) * 512)
        img.write(3 << 21, b"new")          # allocates the L2 table at `nxt`
        assert img.l1_table[3] & ~(1 << 63) == nxt
        assert img.read(3 << 21, 3) == b"new"
        assert img.read((3 << 21) + 4096, 4096) == bytes(4096)
