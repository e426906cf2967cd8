"""Persistent dirty bitmap directory entries (spec §1.13)."""

from __future__ import annotations

import struct

from .._record import record
from ..errors import InvalidImageError

_ENTRY = struct.Struct(">QIIBBHI")
assert _ENTRY.size == 24

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_RESERVED_FLAGS = 0xFFFFFFFC
BME_TYPE_DIRTY_TRACKING = 1


@record
class BitmapDirEntry:
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def encode(self) -> bytes:
        name = self.name.encode()
        raw = _ENTRY.pack(self.bitmap_table_offset, self.bitmap_table_size, self.flags,
                          self.type, self.granularity_bits, len(name),
                          len(self.extra_data)) + self.extra_data + name
        return raw + bytes(-len(raw) % 8)


def parse_bitmap_directory(data: bytes, nb_bitmaps: int) -> list[BitmapDirEntry]:
    """Decode the directory; the count must match the header extension's nb_bitmaps."""
    out: list[BitmapDirEntry] = []
    pos = 0
    while pos < len(data):
        if pos + 24 > len(data):
            raise InvalidImageError("Broken bitmap directory")
        (tbl_off, tbl_size, flags, btype, gbits, name_size,
         extra_size) = _ENTRY.unpack_from(data, pos)
        end = pos + 24 + extra_size + name_size
        if end > len(data):
            raise InvalidImageError("Broken bitmap directory")
        extra = bytes(data[pos + 24:pos + 24 + extra_size])
        name = data[pos + 24 + extra_size:end].decode("utf-8", "replace")
        out.append(BitmapDirEntry(tbl_off, tbl_size, flags, btype, gbits, name, extra))
        pos = (end + 7) & ~7
        if len(out) > nb_bitmaps:
            raise InvalidImageError("More bitmaps found than specified in header extension")
    if len(out) < nb_bitmaps:
        raise InvalidImageError("Less bitmaps found than specified in header extension")
    return out
