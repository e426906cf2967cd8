"""QcowImage: the read driver for legacy qcow (version 1) images.

One mapping walk, `_map_runs()`, translates a guest range through L1 -> L2 into runs of one
kind (unallocated, plain data, compressed), merging host-contiguous clusters so that a read is
one pread per run. `layer_status()` reports those runs as QEMU's qcow_co_block_status() does
(compressed clusters are data without an offset), and `_read_layer()` fills a buffer from them.

`WritableQcowImage` adds writes with QEMU's append-only allocation (spec §2): every new L2
table and data cluster goes at the end of the file rounded up to a cluster, in guest order, so
the file comes out byte-identical to what QEMU's block/qcow.c writes for the same requests.
"""

from __future__ import annotations

import re
import struct
import zlib
from array import array
from collections.abc import Iterator, Sequence
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
from .device import STATUS_DATA, STATUS_OFFSET_VALID, ZERO_CHUNK, BlockDevice, LayerRun

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
    # Only the subclass that implements writes may be constructed read-write.
    _supports_write = False

    def __init__(self, store: ByteStore, filename: str, *, readonly: bool = True,
                 l2_cache_size: int | None = None) -> None:
        if not readonly and not self._supports_write:
            raise ReadOnlyImageError(
                "QcowImage is the read-only driver: open with qcow2.open(..., readonly=False) "
                "(WritableQcowImage) to write")
        self.store = store
        self.filename = filename
        self.readonly = readonly
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


# A run of clusters allocated together is written with one pwrite and linked with one L2
# write; the cap bounds the copy-on-write buffer, not the layout (allocation stays sequential).
MAX_ALLOC_BATCH_BYTES = 8 * 1024 * 1024


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class WritableQcowImage(QcowImage):
    """A qcow v1 layer opened read-write (qcow2.open(path, readonly=False)).

    Allocation is QEMU's (block/qcow.c get_cluster_offset()): append-only, no refcounts, never
    freed. The order makes a crash leave at worst unreferenced space at the end of the file:
    a new L2 table is written zeroed and synced before the L1 entry that points at it, and new
    data is written and synced before the L2 entries that point at it. (QEMU itself links
    first and writes afterwards; the bytes of the finished file are the same.)

    One deliberate difference from QEMU: a partial write into a new cluster copies the rest
    of the cluster from the backing file. QEMU does not (it leaves zeros), which loses backing
    data whenever clusters are larger than the 512 bytes qemu-img gives every qcow image with a
    backing file; with those 512-byte clusters, writes of whole sectors never need the copy and
    QEMU's block layer completes sub-sector writes from the backing file too, so the files
    stay identical.
    """

    _supports_write = True

    def __init__(self, store: ByteStore, filename: str, *, l2_cache_size: int | None = None
                 ) -> None:
        if not store.writable:
            raise ReadOnlyImageError(f"'{filename}' is not opened for writing")
        super().__init__(store, filename, readonly=False, l2_cache_size=l2_cache_size)

    # ------------------------------------------------------------------ public mutators
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes at any offset and length."""
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if len(view):
            self._write(offset, view, False)

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview, *,
                         level: int | None = None,
                         compressed: Sequence[bytes | None] | None = None) -> None:
        """Write one cluster (or the image's tail) compressed, as QEMU (engine/compress.py)."""
        from .compress import write_compressed_qcow1

        write_compressed_qcow1(self, offset, data, level, compressed)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make [offset, +length) read as zeros.

        qcow v1 has no zero clusters and QEMU's driver no write-zeroes hook: the block layer
        falls back to writing zero buffers, which allocates data clusters like any write
        (`unmap` changes nothing). We do the same, minus writing the zeros into clusters that
        are fresh from extending the file.
        """
        self._check_range(offset, length)
        pos = offset
        end = offset + length
        zeros = memoryview(ZERO_CHUNK)
        while pos < end:
            # Chunks end on cluster boundaries (ZERO_CHUNK is a multiple of any cluster size),
            # so no cluster is allocated by one chunk and then patched by the next.
            n = min(end - pos, len(zeros) - (pos & (self.cluster_size - 1)))
            self._write(pos, zeros[:n], True)
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """A no-op, as in QEMU: the qcow driver has no discard, and the block layer then
        reports success without touching the image."""
        self._check_range(offset, length)

    def flush(self) -> None:
        # Every metadata update is already durable (written and synced as it happens).
        self.store.flush()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            super().close()

    # ------------------------------------------------------------------ write path
    def _write(self, offset: int, view: memoryview, zeroes: bool) -> None:
        # A crafted image may map a plain cluster onto bytes it also uses as compressed data:
        # drop the inflated copy on every write, as QEMU does.
        self._zlib_cache_key = None
        shift = self.cluster_bits + self.l2_bits
        end = offset + len(view)
        pos = offset
        while pos < end:
            l1_index = pos >> shift
            chunk_end = min(end, (l1_index + 1) << shift)
            l2_offset = self._l2_for_write(l1_index)
            self._write_in_table(l2_offset, pos, view[pos - offset:chunk_end - offset], zeroes)
            pos = chunk_end

    def _l2_for_write(self, l1_index: int) -> int:
        """The L2 table of l1_index, appended at the end of the file if there is none."""
        l2_offset, _ = self._l2_offset(l1_index, 1)
        if l2_offset:
            return l2_offset
        l2_offset = _round_up(self.store.size(), self.cluster_size)
        self.store.pwrite(l2_offset, bytes(self.l2_entries * 8))
        self.store.flush()
        self.store.pwrite(self.l1_table_offset + l1_index * 8, struct.pack(">Q", l2_offset))
        self.store.flush()
        self._l1_cache.get(l1_index // L1_SLICE_ENTRIES)[l1_index % L1_SLICE_ENTRIES] = l2_offset
        return l2_offset

    def _write_in_table(self, l2_offset: int, pos: int, view: memoryview, zeroes: bool) -> None:
        """Write `view` at guest `pos`, all within the L2 table at l2_offset, cluster runs in
        guest order: in place where a plain cluster exists, else allocating."""
        cbits = self.cluster_bits
        cs = self.cluster_size
        index_mask = self.l2_entries - 1
        table = self.l2_cache.get(l2_offset)
        end = pos + len(view)
        max_batch = max(1, MAX_ALLOC_BATCH_BYTES >> cbits)
        while pos < end:
            first = pos >> cbits
            last = (end - 1) >> cbits
            entry = table[first & index_mask]
            if entry and not entry & QCOW_OFLAG_COMPRESSED:
                # Plain clusters: one pwrite per host-contiguous run.
                c = first + 1
                while c <= last and table[c & index_mask] == entry + ((c - first) << cbits):
                    c += 1
                stop = min(end, c << cbits)
                n = stop - pos
                host = entry + (pos & (cs - 1))
                # QEMU fails such writes with EIO.
                if entry & 511 or host > MAX_HOST_OFFSET - n:
                    raise CorruptImageError(
                        f"Invalid data cluster offset {entry:#x} (L2 offset: {l2_offset:#x}, "
                        f"L2 index: {first & index_mask:#x})", offset=l2_offset)
                self.store.pwrite(host, view[:n])
            else:
                c = first + 1
                while (c <= last and c - first < max_batch
                       and (not table[c & index_mask]
                            or table[c & index_mask] & QCOW_OFLAG_COMPRESSED)):
                    c += 1
                stop = min(end, c << cbits)
                n = stop - pos
                self._allocating_write(l2_offset, table, pos, view[:n], zeroes)
            view = view[n:]
            pos += n

    def _allocating_write(self, l2_offset: int, table: array[int], pos: int, view: memoryview,
                          zeroes: bool) -> None:
        """New clusters for guest [pos, +len(view)): each is unallocated or compressed.

        QEMU appends one cluster after the other at the end of the file; with nothing else
        allocated in between they are contiguous, so the run is one write and one L2 update.
        """
        cbits = self.cluster_bits
        cs = self.cluster_size
        index_mask = self.l2_entries - 1
        first = pos >> cbits
        count = ((pos + len(view) - 1) >> cbits) - first + 1
        host = _round_up(self.store.size(), cs)
        if host > MAX_HOST_OFFSET - count * cs:
            raise CorruptImageError(
                f"cannot allocate {count} clusters at {host:#x}: beyond the maximum file size",
                offset=host, fatal=False)
        in_first = pos & (cs - 1)
        buf: bytearray | None = None
        for i in range(count):
            cstart = (first + i) << cbits
            lo = max(pos, cstart)
            hi = min(pos + len(view), cstart + cs)
            if hi - lo == cs:
                continue
            base = self._cow_base(table[(first + i) & index_mask], cstart)
            if base is None:
                continue
            if buf is None:
                buf = bytearray(count * cs)
            buf[i * cs:i * cs + len(base)] = base
        if buf is not None:
            buf[in_first:in_first + len(view)] = view
            self.store.pwrite(host, buf)
        else:
            # The new clusters lie beyond the old end of the file: extending it zero-fills
            # them, so only the guest data needs writing (and none for a zero write).
            self.store.truncate(host + count * cs)
            if not zeroes:
                self.store.pwrite(host + in_first, view)
        self.store.flush()
        entries = array("Q", range(host, host + count * cs, cs))
        for i, e in enumerate(entries):
            table[(first + i) & index_mask] = e
        if byteorder == "little":
            entries.byteswap()
        self.store.pwrite(l2_offset + (first & index_mask) * 8, entries.tobytes())
        self.store.flush()

    def _cow_base(self, entry: int, cstart: int) -> bytes | None:
        """What a partially written new cluster holds outside the write: the inflated cluster
        it replaces, the backing file's data, or None for zeros."""
        if entry & QCOW_OFLAG_COMPRESSED:
            return self._decompress(entry)
        backing = self.backing
        if backing is None or cstart >= backing.virtual_size:
            return None
        # Only the guest part of a last, partial cluster: QEMU never writes past the end.
        n = min(self.cluster_size, self.virtual_size - cstart)
        out = bytearray(n)
        self.read_backing_or_zero(cstart, memoryview(out))
        return bytes(out)
