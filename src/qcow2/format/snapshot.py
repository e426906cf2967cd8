"""Internal snapshot table entries (spec §1.12), extra data included and unknown bytes kept."""

from __future__ import annotations

import struct

from .._record import record
from ..errors import ImageLimitError, InvalidImageError
from . import constants as C

_HDR = struct.Struct(">QIHHIIQII")
assert _HDR.size == 40
_EXTRA = struct.Struct(">QQQ")  # vm_state_size_large, disk_size, icount


@record
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    extra_data_size: int = 24
    # From the extra data; None when the entry's extra data does not cover the field.
    vm_state_size_large: int | None = None
    disk_size: int | None = None
    icount: int | None = None
    unknown_extra_data: bytes = b""

    @property
    def effective_vm_state_size(self) -> int:
        if self.vm_state_size_large is not None:
            return self.vm_state_size_large
        return self.vm_state_size

    def encode(self) -> bytes:
        """The entry bytes (no alignment padding)."""
        extra_size = max(self.extra_data_size, 24)
        extra = _EXTRA.pack(self.effective_vm_state_size, self.disk_size or 0,
                            (self.icount if self.icount is not None else -1) & (2**64 - 1))
        extra += self.unknown_extra_data
        extra = extra[:extra_size] + bytes(max(0, extra_size - len(extra)))
        vm32 = self.effective_vm_state_size
        vm32 = 0 if vm32 > 0xFFFFFFFF else vm32
        # Names come from disk or argv and may hold bytes that are not UTF-8: they were
        # decoded with surrogateescape and go back byte-exact.
        id_b = self.id_str.encode("utf-8", "surrogateescape")
        name_b = self.name.encode("utf-8", "surrogateescape")
        return _HDR.pack(self.l1_table_offset, self.l1_size, len(id_b), len(name_b),
                         self.date_sec, self.date_nsec, self.vm_clock_nsec, vm32,
                         extra_size) + extra + id_b + name_b


def parse_snapshot_table(data: bytes, nb_snapshots: int, table_offset: int
                         ) -> list[SnapshotEntry]:
    """Decode `nb_snapshots` entries from `data`, which starts at file offset `table_offset`.

    Entries are 8-byte aligned relative to the file, as QEMU lays them out.
    """
    out: list[SnapshotEntry] = []
    pos = 0
    for i in range(nb_snapshots):
        pos = ((table_offset + pos + 7) & ~7) - table_offset
        if pos + 40 > len(data):
            raise InvalidImageError("Snapshot table is truncated")
        (l1_off, l1_size, id_size, name_size, dsec, dnsec, vmclock, vmsize,
         extra_size) = _HDR.unpack_from(data, pos)
        pos += 40
        if extra_size > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise ImageLimitError(f"Too much extra metadata in snapshot table entry {i}")
        if pos + extra_size + id_size + name_size > len(data):
            raise InvalidImageError("Snapshot table is truncated")
        extra = data[pos:pos + extra_size]
        pos += extra_size
        e = SnapshotEntry(l1_table_offset=l1_off, l1_size=l1_size, id_str="", name="",
                          date_sec=dsec, date_nsec=dnsec, vm_clock_nsec=vmclock,
                          vm_state_size=vmsize, extra_data_size=extra_size)
        if extra_size >= 8:
            e.vm_state_size_large = int.from_bytes(extra[0:8], "big")
        if extra_size >= 16:
            e.disk_size = int.from_bytes(extra[8:16], "big")
        if extra_size >= 24:
            ic = int.from_bytes(extra[16:24], "big")
            e.icount = ic - (1 << 64) if ic >> 63 else ic
        e.unknown_extra_data = bytes(extra[24:])
        e.id_str = data[pos:pos + id_size].decode("utf-8", "surrogateescape")
        pos += id_size
        e.name = data[pos:pos + name_size].decode("utf-8", "surrogateescape")
        pos += name_size
        if pos > C.QCOW_MAX_SNAPSHOTS_TABLE_BYTES:
            raise ImageLimitError("Snapshot table is too big")
        out.append(e)
    return out


def encode_snapshot_table(entries: list[SnapshotEntry], table_offset: int) -> bytes:
    out = bytearray()
    for e in entries:
        pad = ((table_offset + len(out) + 7) & ~7) - (table_offset + len(out))
        out += bytes(pad)
        out += e.encode()
    return bytes(out)
