"""QcowImage: the read driver for legacy qcow (version 1) images.

One mapping walk, `_map_runs()`, translates a guest range through L1 -> L2 into runs of one
kind (unallocated, plain data, compressed), merging host-contiguous clusters so that a read is
one pread per run. `layer_status()` reports those runs as QEMU's qcow_co_block_status() does
(compressed clusters are data without an offset), and `_read_layer()` fills a buffer from them.
"""

from __future__ import annotations

import re
import zlib
from array import array
from collections.abc import Iterator
from sys import byteorder

from ..errors import CorruptImageError, EncryptionError, InvalidImageError, ReadOnlyImageError
from ..format.qcow1 import (
    MAX_HOST_OFFSET,
    QCOW_CRYPT_AES,
    QCOW_HEADER_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QcowHeader,
    parse_compressed_entry,
)
from ..io import ByteStore
from .cache import TableCache
from .device import STATUS_DATA, STATUS_OFFSET_VALID, BlockDevice, LayerRun

DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024
# The L1 is loaded lazily in slices: a header may declare an L1 of up to 2 GiB, and legitimate
# large images only ever touch the slices their reads reach.
L1_SLICE_ENTRIES = 8192
L1_CACHE_BYTES = 8 * 1024 * 1024

_UNALLOCATED = 0
_NORMAL = 1
_COMPRESSED = 2

Run = tuple[int, int, int, int]  # guest start, length, kind, host offset or compressed entry

_NONZERO_BYTE = re.compile(rb"[^\x00]")


def _u64_table(data: bytes) -> array[int]:
    t = array("Q")
    t.frombytes(data)
    if byteorder == "little":
        t.byteswap()
    return t


def _zero_entries(table: array[int], index: int, limit: int) -> int:
    """How many entries of table[index:limit] are zero before the first non-zero one.

    Sparse images are mostly zero entries: the scan runs in C over the table's own buffer,
    without copying it, and stops at the first non-zero byte.
    """
    m = _NONZERO_BYTE.search(memoryview(table).cast("B"), index * 8, limit * 8)
    return ((m.start() if m else limit * 8) - index * 8) // 8


class QcowImage(BlockDevice):
    """One qcow v1 layer. Create it with qcow2.open(), which also opens the backing chain."""

    format_name = "qcow"

    def __init__(self, store: ByteStore, filename: str, *, readonly: bool = True,
                 l2_cache_size: int | None = None) -> None:
        if not readonly:
            raise ReadOnlyImageError(
                "qcow (v1) images can only be opened read-only (writing is not implemented)")
        self.store = store
        self.filename = filename
        self.readonly = True
        self.backing: BlockDevice | None = None
        self._closed = False
        h = QcowHeader.parse(store.pread(0, QCOW_HEADER_SIZE))
        h.validate_fields()
        if h.crypt_method == QCOW_CRYPT_AES:
            raise EncryptionError(
                "AES-encrypted qcow images are not supported (encryption not supported yet)")
        h.validate_layout()
        self.header = h
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.l2_bits = h.l2_bits
        self.l2_entries = h.l2_entries
        self.l1_size = h.l1_size
        self.l1_table_offset = h.l1_table_offset
        self.virtual_size = h.virtual_size
        self.encrypted = False
        self.backing_file: str | None = self._read_backing_name()
        self.l2_cache = TableCache(self.l2_entries * 8, l2_cache_size or DEFAULT_L2_CACHE_BYTES,
                                   self._load_l2)
        self._l1_cache = TableCache(L1_SLICE_ENTRIES * 8, L1_CACHE_BYTES, self._load_l1_slice)
        self._zlib_cache_key: int | None = None
        self._zlib_cache_val = b""

    # ------------------------------------------------------------------ open helpers
    def _read_backing_name(self) -> str | None:
        h = self.header
        if not h.backing_file_offset:
            return None
        n = h.backing_file_size
        if h.backing_file_offset + n > self.store.size():
            raise InvalidImageError(
                f"Backing file name ({n} bytes at offset {h.backing_file_offset:#x}) extends "
                "past the end of the image file")
        raw = self.store.pread(h.backing_file_offset, n)
        # QEMU keeps the name as a C string: anything after a NUL byte is not part of it.
        name = raw.split(b"\0", 1)[0]
        return name.decode("utf-8", "replace") or None

    def _load_l1_slice(self, slice_index: int) -> array[int]:
        first = slice_index * L1_SLICE_ENTRIES
        count = min(L1_SLICE_ENTRIES, self.l1_size - first)
        # Entries past the end of the file read as zero, as the block layer reads them.
        return _u64_table(self.store.pread(self.l1_table_offset + first * 8, count * 8))

    def _load_l2(self, l2_offset: int) -> array[int]:
        return _u64_table(self.store.pread(l2_offset, self.l2_entries * 8))

    def _l2_offset(self, l1_index: int, want: int) -> tuple[int, int]:
        """(L2 table offset, L1 entries covered): a run of up to `want` zero entries is one
        answer (0, n), so unallocated stretches of huge sparse images cost one step each."""
        if l1_index >= self.l1_size:
            return 0, want
        table = self._l1_cache.get(l1_index // L1_SLICE_ENTRIES)
        in_slice = l1_index % L1_SLICE_ENTRIES
        l2_offset = table[in_slice]
        if not l2_offset:
            return 0, _zero_entries(table, in_slice, min(len(table), in_slice + want))
        # QEMU uses the L1 entry as is (no mask, no alignment); only an offset the block layer
        # cannot read makes it fail.
        if l2_offset > MAX_HOST_OFFSET - self.l2_entries * 8:
            raise CorruptImageError(
                f"L2 table offset {l2_offset:#x} is beyond the maximum file size "
                f"(L1 index: {l1_index:#x})", offset=self.l1_table_offset + l1_index * 8)
        return l2_offset, 1

    # ------------------------------------------------------------------ mapping core
    def _map_runs(self, start: int, length: int, for_status: bool) -> Iterator[Run]:
        """Runs of [start, start+length): unallocated, plain data (merged while host-contiguous)
        or compressed (one run per cluster for reads, merged for status).

        For status the host offset is QEMU's `cluster_offset | offset_in_cluster`, which differs
        from the sum only for an entry that is not cluster-aligned (QEMU never writes one).
        """
        shift = self.cluster_bits + self.l2_bits
        end = start + length
        pos = start
        p_start = p_len = p_val = 0
        p_kind = -1
        while pos < end:
            l1_index = pos >> shift
            l2_offset, covered = self._l2_offset(l1_index, ((end - 1) >> shift) - l1_index + 1)
            chunk_end = min(end, (l1_index + covered) << shift)
            runs: Iterator[Run] | tuple[Run, ...]
            if l2_offset:
                runs = self._l2_runs(l2_offset, pos, chunk_end, for_status)
            else:
                runs = ((pos, chunk_end - pos, _UNALLOCATED, 0),)
            for r_start, r_len, kind, val in runs:
                if kind == p_kind and (kind == _UNALLOCATED
                                       or (kind == _NORMAL and val == p_val + p_len)
                                       or (kind == _COMPRESSED and for_status)):
                    p_len += r_len
                    continue
                if p_kind >= 0:
                    yield p_start, p_len, p_kind, p_val
                p_start, p_len, p_kind, p_val = r_start, r_len, kind, val
            pos = chunk_end
        if p_kind >= 0:
            yield p_start, p_len, p_kind, p_val

    def _l2_runs(self, l2_offset: int, pos: int, chunk_end: int, for_status: bool
                 ) -> Iterator[Run]:
        cbits = self.cluster_bits
        in_cluster_mask = self.cluster_size - 1
        index_mask = self.l2_entries - 1
        table = self.l2_cache.get(l2_offset)
        last_index = ((chunk_end - 1) >> cbits) & index_mask
        while pos < chunk_end:
            cluster = pos >> cbits
            index = cluster & index_mask
            entry = table[index]
            if not entry:
                zeros = _zero_entries(table, index, last_index + 1)
                stop = min(chunk_end, (cluster + zeros) << cbits)
                yield pos, stop - pos, _UNALLOCATED, 0
                pos = stop
                continue
            n = min(chunk_end, (cluster + 1) << cbits) - pos
            if entry & QCOW_OFLAG_COMPRESSED:
                yield pos, n, _COMPRESSED, entry
            elif for_status:
                yield pos, n, _NORMAL, entry | (pos & in_cluster_mask)
            else:
                host = entry + (pos & in_cluster_mask)
                # QEMU fails such reads with EIO.
                if entry & 511 or host > MAX_HOST_OFFSET - n:
                    raise CorruptImageError(
                        f"Invalid data cluster offset {entry:#x} (L2 offset: {l2_offset:#x}, "
                        f"L2 index: {index:#x})", offset=l2_offset)
                yield pos, n, _NORMAL, host
            pos += n

    # ------------------------------------------------------------------ BlockDevice
    def layer_status(self, start: int, length: int) -> Iterator[LayerRun]:
        for r_start, r_len, kind, val in self._map_runs(start, length, True):
            if kind == _NORMAL:
                yield LayerRun(r_start, r_len, STATUS_DATA | STATUS_OFFSET_VALID, val,
                               self.store)
            elif kind == _COMPRESSED:
                yield LayerRun(r_start, r_len, STATUS_DATA)
            else:
                yield LayerRun(r_start, r_len, 0)

    def _read_layer(self, offset: int, view: memoryview) -> None:
        in_cluster_mask = self.cluster_size - 1
        for r_start, r_len, kind, val in self._map_runs(offset, len(view), False):
            sub = view[r_start - offset:r_start - offset + r_len]
            if kind == _NORMAL:
                self.store.readinto(val, sub)
            elif kind == _COMPRESSED:
                in_cluster = r_start & in_cluster_mask
                sub[:] = memoryview(self._decompress(val))[in_cluster:in_cluster + r_len]
            else:
                self.read_backing_or_zero(r_start, sub)

    def _decompress(self, entry: int) -> bytes:
        if entry == self._zlib_cache_key:
            return self._zlib_cache_val
        cs = self.cluster_size
        coffset, csize = parse_compressed_entry(entry, self.cluster_bits)
        out = b""
        if csize and coffset <= MAX_HOST_OFFSET - csize:
            raw = self.store.pread(coffset, csize)
            try:
                # QEMU inflates with Z_FINISH into exactly one cluster: trailing input is
                # ignored, and anything short of a full cluster is an error.
                out = zlib.decompressobj(-12).decompress(raw, cs)
            except zlib.error:
                out = b""
        if len(out) != cs:
            raise CorruptImageError(
                f"Compressed cluster at host offset {coffset:#x} ({csize} bytes) does not "
                f"inflate to a full {cs}-byte cluster", offset=coffset, size=csize, fatal=False)
        self._zlib_cache_key = entry
        self._zlib_cache_val = out
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.store.close()
        super().close()

    @property
    def actual_size(self) -> int:
        return self.store.allocated_size()
