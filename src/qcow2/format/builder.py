"""Build small, complete qcow2 images in memory from a description of their guest clusters.

Used by the demo and by tests that need crafted images (including hostile ones, by poking the
result). The layout is QEMU's: header, refcount table, refcount block, L1, then L2 tables and
data; refcounts are exact so `qemu-img check` finds nothing to report.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from . import constants as C
from .entries import CompressedLayout
from .header import Header, HeaderExtensions, encode_header_cluster, l1_entries_for
from .refcount import encode_refblock, refcounts_per_block

ZERO = "zero"


@dataclass
class ImageSpec:
    size: int
    cluster_bits: int = 16
    version: int = 3
    refcount_order: int = 4
    backing_file: str | None = None
    backing_format: str | None = None
    # guest cluster index -> bytes (normal data), ZERO, or ("compressed", bytes)
    clusters: dict[int, object] = field(default_factory=dict)


def deflate_cluster(data: bytes) -> bytes:
    """Raw deflate with QEMU's parameters (level 6, window bits -12, memLevel 9)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(data) + c.flush()


def build_image(spec: ImageSpec) -> bytes:
    cs = 1 << spec.cluster_bits
    h = Header(version=spec.version, cluster_bits=spec.cluster_bits, size=spec.size,
               refcount_order=spec.refcount_order if spec.version >= 3 else 4,
               header_length=112 if spec.version >= 3 else 72)
    l2_entries = cs // 8
    l1_size = l1_entries_for(spec.size, spec.cluster_bits, spec.cluster_bits - 3)
    l1_clusters = max(1, (l1_size * 8 + cs - 1) // cs)
    need_l2 = sorted({gc // l2_entries for gc in spec.clusters})
    next_cluster = 3 + l1_clusters
    l2_host: dict[int, int] = {}
    for l1i in need_l2:
        l2_host[l1i] = next_cluster * cs
        next_cluster += 1
    data_area = bytearray()
    data_start = next_cluster * cs
    layout = CompressedLayout(spec.cluster_bits)
    entries: dict[int, int] = {}
    refcounts: dict[int, int] = {}
    for gc in sorted(spec.clusters):
        item = spec.clusters[gc]
        if item == ZERO:
            if spec.version < 3:
                raise ValueError("zero clusters need version 3")
            entries[gc] = C.QCOW_OFLAG_ZERO
        elif isinstance(item, tuple) and item[0] == "compressed":
            raw = bytes(item[1]).ljust(cs, b"\0")
            comp = deflate_cluster(raw)
            # Compressed clusters are packed back to back at byte granularity, as QEMU does.
            coff = data_start + len(data_area)
            entries[gc] = layout.encode(coff, len(comp))
            data_area += comp
            for hc in range(coff // cs, (coff + len(comp) - 1) // cs + 1):
                refcounts[hc] = refcounts.get(hc, 0) + 1
        else:
            data_area += bytes(-len(data_area) % cs)
            host = data_start + len(data_area)
            entries[gc] = host | C.QCOW_OFLAG_COPIED
            assert isinstance(item, bytes | bytearray), f"cluster {gc}: {item!r}"
            data_area += bytes(item).ljust(cs, b"\0")[:cs]
            refcounts[host // cs] = 1
    data_area += bytes(-len(data_area) % cs)
    total_clusters = data_start // cs + len(data_area) // cs
    for i in range(data_start // cs):
        refcounts[i] = 1
    per_block = refcounts_per_block(spec.cluster_bits, h.refcount_order)
    if total_clusters > per_block:
        raise ValueError("image too large for the builder's single refcount block")
    h.refcount_table_offset = cs
    h.refcount_table_clusters = 1
    h.l1_size = l1_size
    h.l1_table_offset = 3 * cs
    exts = HeaderExtensions(backing_format=spec.backing_format)
    out = bytearray(encode_header_cluster(h, exts, spec.backing_file))
    out += struct.pack(">Q", 2 * cs) + bytes(cs - 8)
    values = [refcounts.get(i, 0) for i in range(per_block)]
    out += encode_refblock(values, h.refcount_order)
    l1 = bytearray(l1_clusters * cs)
    for l1i, host in l2_host.items():
        struct.pack_into(">Q", l1, l1i * 8, host | C.QCOW_OFLAG_COPIED)
    out += l1
    for l1i in need_l2:
        l2 = bytearray(cs)
        for gc, e in entries.items():
            if gc // l2_entries == l1i:
                struct.pack_into(">Q", l2, (gc % l2_entries) * 8, e)
        out += l2
    out += data_area
    return bytes(out)
