"""L1/L2 entries (standard and extended), cluster and subcluster types, compressed descriptors."""

from __future__ import annotations

from enum import IntEnum

from . import constants as C


class ClusterType(IntEnum):
    """qcow2_get_cluster_type() results, in QEMU's names."""

    UNALLOCATED = 0
    ZERO_PLAIN = 1
    ZERO_ALLOC = 2
    NORMAL = 3
    COMPRESSED = 4


class SubclusterType(IntEnum):
    """qcow2_get_subcluster_type() results, in QEMU's names."""

    UNALLOCATED_PLAIN = 0
    UNALLOCATED_ALLOC = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    NORMAL = 4
    COMPRESSED = 5
    INVALID = 6


def cluster_type(entry: int, extended_l2: bool, has_data_file: bool = False) -> ClusterType:
    """Decode an L2 entry's cluster type (first u64 for extended L2)."""
    if entry & C.QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & C.QCOW_OFLAG_ZERO and not extended_l2:
        if entry & C.L2E_OFFSET_MASK:
            return ClusterType.ZERO_ALLOC
        return ClusterType.ZERO_PLAIN
    if not entry & C.L2E_OFFSET_MASK:
        # With an external data file, guest offset 0 maps to host offset 0: COPIED marks it.
        if has_data_file and entry & C.QCOW_OFLAG_COPIED:
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED
    return ClusterType.NORMAL


def subcluster_type(ctype: ClusterType, bitmap: int, sc_index: int) -> SubclusterType:
    """qcow2_get_subcluster_type() for one subcluster of an extended L2 entry."""
    alloc = (bitmap >> sc_index) & 1
    zero = (bitmap >> (32 + sc_index)) & 1
    if ctype == ClusterType.COMPRESSED:
        return SubclusterType.INVALID if bitmap else SubclusterType.COMPRESSED
    if ctype == ClusterType.NORMAL:
        if alloc and zero:
            return SubclusterType.INVALID
        if zero:
            return SubclusterType.ZERO_ALLOC
        if alloc:
            return SubclusterType.NORMAL
        return SubclusterType.UNALLOCATED_ALLOC
    if ctype == ClusterType.UNALLOCATED:
        if bitmap & C.QCOW_L2_BITMAP_ALL_ALLOC:
            return SubclusterType.INVALID
        if zero:
            return SubclusterType.ZERO_PLAIN
        return SubclusterType.UNALLOCATED_PLAIN
    return SubclusterType.INVALID  # ZERO_* cannot occur with extended L2


def standard_subcluster_type(ctype: ClusterType) -> SubclusterType:
    """The single 'subcluster' of a standard L2 entry."""
    return _STD_SC[ctype]


_STD_SC = {
    ClusterType.UNALLOCATED: SubclusterType.UNALLOCATED_PLAIN,
    ClusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC: SubclusterType.ZERO_ALLOC,
    ClusterType.NORMAL: SubclusterType.NORMAL,
    ClusterType.COMPRESSED: SubclusterType.COMPRESSED,
}


class CompressedLayout:
    """The compressed-descriptor bit split for one cluster size (spec §1.8)."""

    __slots__ = ("cluster_bits", "csize_mask", "csize_shift", "offset_mask")

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.offset_mask = (1 << self.csize_shift) - 1

    def decode(self, entry: int) -> tuple[int, int]:
        """(host byte offset, bytes to read) of a compressed L2 entry."""
        coffset = entry & self.offset_mask
        nsectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nsectors * 512 - (coffset & 511)

    def encode(self, coffset: int, clen: int) -> int:
        """The L2 entry QEMU writes for `clen` compressed bytes at host byte `coffset`."""
        nb_csectors = (coffset + clen - 1) // 512 - coffset // 512
        if coffset & ~self.offset_mask or nb_csectors > self.csize_mask:
            raise ValueError("compressed cluster descriptor out of range")
        return C.QCOW_OFLAG_COMPRESSED | (nb_csectors << self.csize_shift) | coffset
