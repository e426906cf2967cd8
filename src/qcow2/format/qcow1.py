"""The legacy qcow (version 1) format: the 48-byte header, QEMU's open-time checks on it, the
derived L1 geometry, and the L2 entry encoding (plain host offsets and compressed descriptors).

Pure: bytes in, records out. The image is untrusted, so every field that later sizes an
allocation or a loop is checked here, with QEMU's own messages (block/qcow.c, qcow_open()).
"""

from __future__ import annotations

import struct

from .._record import record
from ..errors import ImageLimitError, InvalidImageError, UnsupportedFeatureError
from . import constants as C

QCOW_VERSION = 1
QCOW_HEADER_SIZE = 48

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1

QCOW_OFLAG_COMPRESSED = 1 << 63

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 16
# l2_bits counts 8-byte entries: 2^6..2^13 entries are 512 bytes..64 KiB tables.
MIN_L2_BITS = MIN_CLUSTER_BITS - 3
MAX_L2_BITS = MAX_CLUSTER_BITS - 3
MAX_BACKING_FILE_NAME = 1023

UINT64_MAX = (1 << 64) - 1
INT_MAX = (1 << 31) - 1
# The block layer refuses any request ending past BDRV_MAX_LENGTH (INT64_MAX rounded down to
# its 1 GiB maximum alignment) with EIO: no host offset of a valid image can reach it.
MAX_HOST_OFFSET = C.INT64_MAX - (C.INT64_MAX % (1 << 30))

_HEADER = struct.Struct(">IIQIIQBBHIQ")
assert _HEADER.size == QCOW_HEADER_SIZE


@record
class QcowHeader:
    """Every field of the qcow v1 header, by its spec name."""

    magic: int = C.QCOW_MAGIC
    version: int = QCOW_VERSION
    backing_file_offset: int = 0
    backing_file_size: int = 0
    mtime: int = 0
    size: int = 0
    cluster_bits: int = 12
    l2_bits: int = 9
    padding: int = 0
    crypt_method: int = QCOW_CRYPT_NONE
    l1_table_offset: int = 0

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> QcowHeader:
        """Decode the header at the start of `data`; refuses only what cannot be qcow v1.

        QEMU's remaining open-time checks are in validate().
        """
        if len(data) < QCOW_HEADER_SIZE:
            raise InvalidImageError("Image not in qcow format (header truncated)")
        h = cls(*_HEADER.unpack_from(data, 0))
        if h.magic != C.QCOW_MAGIC:
            raise InvalidImageError("Image not in qcow format")
        if h.version != QCOW_VERSION:
            hint = " (try the 'qcow2' driver instead)" if h.version in (2, 3) else ""
            raise UnsupportedFeatureError(
                f"qcow (v{QCOW_VERSION}) does not support qcow version {h.version}{hint}")
        return h

    def encode(self) -> bytes:
        """The 48 header bytes, as QEMU writes them."""
        return _HEADER.pack(self.magic, self.version, self.backing_file_offset,
                            self.backing_file_size, self.mtime, self.size, self.cluster_bits,
                            self.l2_bits, self.padding, self.crypt_method, self.l1_table_offset)

    def validate(self) -> None:
        """QEMU's qcow_open() checks, in its order, plus bounds on every host offset.

        An AES-encrypted header is valid here; whether it can be read is the engine's business
        (QEMU sets up decryption between validate_fields() and validate_layout()).
        """
        self.validate_fields()
        self.validate_layout()

    def validate_fields(self) -> None:
        """The checks on single fields: size, cluster and L2 sizes, encryption method."""
        if self.size <= 1:
            raise InvalidImageError("Image size is too small (must be at least 2 bytes)")
        if not MIN_CLUSTER_BITS <= self.cluster_bits <= MAX_CLUSTER_BITS:
            raise InvalidImageError("Cluster size must be between 512 and 64k")
        if not MIN_L2_BITS <= self.l2_bits <= MAX_L2_BITS:
            raise InvalidImageError("L2 table size must be between 512 and 64k")
        if self.crypt_method not in (QCOW_CRYPT_NONE, QCOW_CRYPT_AES):
            raise InvalidImageError("invalid encryption method in qcow header")

    def validate_layout(self) -> None:
        """The L1 geometry and the host offsets of the L1 table and the backing file name."""
        l1_bytes = self.l1_size * 8
        # QEMU reads the whole L1 at open: an L1 the block layer cannot address fails (EIO).
        if self.l1_table_offset > MAX_HOST_OFFSET - l1_bytes:
            raise InvalidImageError(
                f"L1 table offset {self.l1_table_offset:#x} is beyond the maximum file size")
        if self.backing_file_offset:
            if self.backing_file_size > MAX_BACKING_FILE_NAME:
                raise InvalidImageError("Backing file name too long")
            if self.backing_file_offset > MAX_HOST_OFFSET - self.backing_file_size:
                raise InvalidImageError(
                    f"Backing file name offset {self.backing_file_offset:#x} is beyond the "
                    "maximum file size")

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def l1_size(self) -> int:
        """Entries of the L1 table (not stored: derived from the size), with QEMU's limits."""
        return l1_entries_for(self.size, self.cluster_bits, self.l2_bits)

    @property
    def virtual_size(self) -> int:
        """The guest size: QEMU counts whole 512-byte sectors and drops the remainder."""
        return self.size // 512 * 512


def l1_entries_for(size: int, cluster_bits: int, l2_bits: int) -> int:
    """ceil(size / 2^(cluster_bits+l2_bits)), refused as QEMU does when it would overflow."""
    shift = cluster_bits + l2_bits
    # QEMU computes in uint64: the rounding addition must not wrap, and the table size in
    # bytes must fit an int.
    if size > UINT64_MAX - (1 << shift):
        raise ImageLimitError("Image too large")
    l1_size = (size + (1 << shift) - 1) >> shift
    if l1_size > INT_MAX // 8:
        raise ImageLimitError("Image too large")
    return l1_size


def compressed_offset_mask(cluster_bits: int) -> int:
    """The host byte offset bits of a compressed entry: 0..62-cluster_bits."""
    return (1 << (63 - cluster_bits)) - 1


def parse_compressed_entry(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, compressed size in bytes) of an L2 entry with bit 63 set."""
    shift = 63 - cluster_bits
    coffset = entry & ((1 << shift) - 1)
    csize = (entry >> shift) & ((1 << cluster_bits) - 1)
    return coffset, csize


def encode_compressed_entry(coffset: int, csize: int, cluster_bits: int) -> int:
    """The L2 entry QEMU writes for `csize` compressed bytes at host byte `coffset`."""
    shift = 63 - cluster_bits
    # QEMU stores a compressed cluster only when it is smaller than a cluster.
    if not 0 < csize < (1 << cluster_bits) or coffset >> shift:
        raise ValueError("compressed cluster descriptor out of range")
    return QCOW_OFLAG_COMPRESSED | (csize << shift) | coffset
