"""The metadata overlap set is kept up to date as tables are allocated (not only rebuilt)."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2
from qcow2.engine.writer import WritableQcow2Image
from qcow2.errors import MetadataOverlapError
from qcow2.format import constants as C


def test_new_l2_tables_and_refblocks_are_protected(tmp_path: Path) -> None:
    p = tmp_path / "img.qcow2"
    qcow2.create(str(p), 1 << 40, cluster_size=4096, refcount_bits=64)
    with qcow2.open(str(p), readonly=False) as img:
        assert isinstance(img, WritableQcow2Image)
        img.write(0, b"a" * 4096)
        img._metadata()   # build the set once; later tables must be added to it
        span = img.l2_entries * img.cluster_size
        for i in range(1, 40):   # new L2 tables, and new refblocks (64-bit refcounts)
            img.write(i * span, b"b" * 4096)
        l2 = [e & C.L1E_OFFSET_MASK for e in img.l1_table if e]
        blocks = [e & C.REFT_OFFSET_MASK for e in img.refcounts.table if e]
        assert len(l2) == 40 and len(blocks) > 1
        for off in (*l2, *blocks):
            with pytest.raises(MetadataOverlapError):
                img._check_overlap(off, 512)
        img._check_overlap(img.refcounts.alloc_clusters(1), 4096)   # plain data is fine
