"""Qcow2Image: open and validate a qcow2 image, translate guest ranges to host runs, read.

The mapping core `_map_runs()` walks L1 -> L2 and yields runs of one subcluster type, merging
host-contiguous clusters so that reads become one pread per run. `layer_status()` (map,
extents) and `_read_layer()` (reads) are both built on it.
"""

from __future__ import annotations

import os
import threading
import zlib
from array import array
from collections.abc import Iterator
from sys import byteorder
from typing import TYPE_CHECKING, Any

from ..errors import (
    CorruptImageError,
    EncryptionError,
    ImageLimitError,
    InvalidImageError,
    NotFoundError,
    ReadOnlyImageError,
    UnsupportedFeatureError,
    c_hex,
)
from ..format import constants as C
from ..format.bitmap import BitmapDirEntry, parse_bitmap_directory
from ..format.entries import CompressedLayout, SubclusterType
from ..format.header import Header, HeaderExtensions, parse_extensions, unsupported_features_message
from ..format.refcount import get_refcount
from ..format.snapshot import SnapshotEntry, parse_snapshot_table
from ..io import ByteStore
from .cache import TableCache
from .device import (
    STATUS_DATA,
    STATUS_OFFSET_VALID,
    STATUS_ZERO,
    BlockDevice,
    LayerRun,
    zero_fill,
)

if TYPE_CHECKING:
    from .check import CheckResult

DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024

SC = SubclusterType
_UNALLOC_PLAIN = int(SC.UNALLOCATED_PLAIN)
_UNALLOC_ALLOC = int(SC.UNALLOCATED_ALLOC)
_ZERO_PLAIN = int(SC.ZERO_PLAIN)
_ZERO_ALLOC = int(SC.ZERO_ALLOC)
_NORMAL = int(SC.NORMAL)
_COMPRESSED = int(SC.COMPRESSED)
_HOST_KINDS = (_NORMAL, _ZERO_ALLOC, _UNALLOC_ALLOC)


def _u64_table(data: bytes) -> array[int]:
    t = array("Q")
    t.frombytes(data)
    if byteorder == "little":
        t.byteswap()
    return t


class Qcow2Image(BlockDevice):
    """One qcow2 layer. Create it with qcow2.open(), which also opens backing and data files."""

    format_name = "qcow2"

    def __init__(self, store: ByteStore, filename: str, *, readonly: bool = True,
                 l2_cache_size: int | None = None, check_mode: bool = False) -> None:
        self.store = store
        self.filename = filename
        self.readonly = readonly
        self.backing: BlockDevice | None = None
        self.data_store: ByteStore = store
        self.data_file_name: str | None = None  # from the header extension
        self._closed = False
        first = store.pread(0, 4096)
        cbits = int.from_bytes(first[20:24], "big")
        if C.MIN_CLUSTER_BITS <= cbits <= C.MAX_CLUSTER_BITS and cbits > 12:
            first = store.pread(0, 1 << cbits)
        h = Header.parse(first)
        self.header = h
        # Unknown incompatible features are reported before any other check, with names
        # taken from the feature table when the image has one.
        if h.incompatible_features & ~C.QCOW2_INCOMPAT_MASK:
            cs_guess = 1 << h.cluster_bits if C.MIN_CLUSTER_BITS <= h.cluster_bits <= 21 else 0
            table = None
            if cs_guess:
                try:
                    table = parse_extensions(store.pread(0, cs_guess), h, strict=False).feature_table
                except InvalidImageError:
                    table = None
            raise UnsupportedFeatureError(
                unsupported_features_message(h.incompatible_features, table))
        # qemu-img check opens with BDRV_O_CHECK: the snapshot table is neither validated nor
        # read (the check reads it itself) and a missing refcount table is accepted.
        h.validate(check_mode=check_mode)
        if h.incompatible_features & C.QCOW2_INCOMPAT_CORRUPT and not readonly and not check_mode:
            raise ReadOnlyImageError("qcow2: Image is corrupt; cannot be opened read/write")
        cs = h.cluster_size
        self.cluster_size = cs
        self.cluster_bits = h.cluster_bits
        self.extended_l2 = h.extended_l2
        self.l2_bits = h.l2_bits
        self.l2_entries = 1 << h.l2_bits
        self.subclusters_per_cluster = C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER if h.extended_l2 else 1
        self.subcluster_bits = h.cluster_bits - (5 if h.extended_l2 else 0)
        self.subcluster_size = 1 << self.subcluster_bits
        # QEMU counts whole 512-byte sectors (total_sectors = size / 512): a crafted size that
        # is not a multiple of 512 loses its partial last sector, as qemu-img info shows.
        self.virtual_size = h.size & ~511
        self.compressed_layout = CompressedLayout(h.cluster_bits)
        self.cluster0 = store.pread(0, cs)
        self.extensions: HeaderExtensions = parse_extensions(self.cluster0, h)
        if h.crypt_method:
            method = "AES" if h.crypt_method == C.QCOW_CRYPT_AES else "LUKS"
            raise EncryptionError(
                f"{method}-encrypted images are not supported yet (encryption not supported yet)")
        self.backing_file: str | None = None
        if h.backing_file_offset:
            n = h.backing_file_size
            if n > min(C.QCOW_MAX_BACKING_FILE_NAME, cs - h.backing_file_offset):
                raise InvalidImageError("Backing file name too long")
            raw = self.cluster0[h.backing_file_offset:h.backing_file_offset + n]
            self.backing_file = raw.decode("utf-8", "replace")
        self.backing_format = self.extensions.backing_format
        self.has_data_file = bool(h.incompatible_features & C.QCOW2_INCOMPAT_DATA_FILE)
        self.data_file_raw = bool(h.autoclear_features & C.QCOW2_AUTOCLEAR_DATA_FILE_RAW)
        if self.data_file_raw and not self.has_data_file:
            raise InvalidImageError("data-file-raw requires a data file")
        self.data_file_name = self.extensions.data_file
        self.dirty = bool(h.incompatible_features & C.QCOW2_INCOMPAT_DIRTY)
        self.corrupt = bool(h.incompatible_features & C.QCOW2_INCOMPAT_CORRUPT)
        self.l1_table = self._read_l1(h.l1_table_offset, h.l1_size)
        self.l1_size = h.l1_size
        self.l2_cache = TableCache(cs, l2_cache_size or DEFAULT_L2_CACHE_BYTES, self._load_l2)
        self._zlib_cache_key: int | None = None
        self._zlib_cache_val = b""
        self.snapshots: list[SnapshotEntry] = [] if check_mode else self._read_snapshots()
        self.bitmaps: list[BitmapDirEntry] = self._read_bitmaps()
        self._refblock_cache: dict[int, bytes] = {}
        self._metadata_prealloc: bool | None = None
        self.loaded_snapshot: SnapshotEntry | None = None

    # ------------------------------------------------------------------ open helpers
    def _read_l1(self, offset: int, size: int) -> array[int]:
        if size == 0:
            return array("Q")
        return _u64_table(self.store.pread(offset, size * 8))

    def _read_snapshots(self) -> list[SnapshotEntry]:
        h = self.header
        if not h.nb_snapshots:
            return []
        # Read a little and grow until every entry fits: the table is usually tiny, and
        # reading QEMU's 64 MiB limit at every open would be slow. Past EOF the store reads
        # zeros, as QEMU's file driver does. The last size covers the 64 MiB limit plus one
        # maximal entry and the alignment padding of every entry.
        limit = (C.QCOW_MAX_SNAPSHOTS_TABLE_BYTES + 8 * h.nb_snapshots + 40 +
                 C.QCOW_MAX_SNAPSHOT_EXTRA_DATA + 2 * 65535)
        want = min(limit, 64 * 1024 + 128 * h.nb_snapshots)
        while True:
            data = self.store.pread(h.snapshots_offset, want)
            try:
                entries = parse_snapshot_table(data, h.nb_snapshots, h.snapshots_offset)
            except InvalidImageError:
                if want >= limit:
                    raise
                want = min(limit, want * 4)
                continue
            # QEMU keeps IDs and names as C strings: everything from a NUL byte on is lost
            # (for lookups, listings and when it rewrites the table).
            for e in entries:
                e.id_str = e.id_str.split("\0", 1)[0]
                e.name = e.name.split("\0", 1)[0]
            return entries

    def _read_bitmaps(self) -> list[BitmapDirEntry]:
        bm = self.extensions.bitmaps
        if bm is None:
            return []
        data = self.store.pread(bm.bitmap_directory_offset, bm.bitmap_directory_size)
        return parse_bitmap_directory(data, bm.nb_bitmaps)

    def _load_l2(self, l2_offset: int) -> array[int]:
        return _u64_table(self.store.pread(l2_offset, self.cluster_size))

    def load_snapshot(self, name_or_id: str) -> None:
        """Make reads see an internal snapshot (read-only), like `qemu-img convert -l`.

        The ID is tried first, then the name; the virtual size stays the current one.
        """
        sn = self.find_snapshot(name_or_id)
        if not self.readonly:
            raise ReadOnlyImageError("a snapshot can only be loaded into a read-only image")
        if sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
            raise ImageLimitError("Snapshot L1 table too large")
        if sn.l1_table_offset & (self.cluster_size - 1) or (
                C.INT64_MAX - sn.l1_size * 8 < sn.l1_table_offset):
            raise InvalidImageError("Snapshot L1 table offset invalid")
        self.l1_table = self._read_l1(sn.l1_table_offset, sn.l1_size)
        self.l1_size = sn.l1_size
        self.l2_cache.clear()
        self.loaded_snapshot = sn

    def find_snapshot(self, name_or_id: str) -> SnapshotEntry:
        for sn in self.snapshots:
            if sn.id_str == name_or_id:
                return sn
        for sn in self.snapshots:
            if sn.name == name_or_id:
                return sn
        raise NotFoundError(f"Can't find snapshot '{name_or_id}'")

    # ------------------------------------------------------------------ refcounts (read)
    def get_refcount(self, cluster_index: int) -> int:
        h = self.header
        per_block_bits = h.cluster_bits + 3 - h.refcount_order
        rt_index = cluster_index >> per_block_bits
        if rt_index >= h.refcount_table_clusters * self.cluster_size // 8:
            return 0
        block = self._refblock_cache.get(rt_index)
        if block is None:
            raw = self.store.pread(h.refcount_table_offset + rt_index * 8, 8)
            entry = int.from_bytes(raw, "big") & C.REFT_OFFSET_MASK
            block = self.store.pread(entry, self.cluster_size) if entry else b""
            if len(self._refblock_cache) > 64:
                self._refblock_cache.clear()
            self._refblock_cache[rt_index] = block
        if not block:
            return 0
        return get_refcount(block, cluster_index & ((1 << per_block_bits) - 1), h.refcount_order)

    def _detect_metadata_preallocation(self) -> bool:
        # qcow2_detect_metadata_preallocation(): many more refcounted clusters than the file
        # physically holds means the L2 tables map clusters that were never written. Only
        # the result `count >= threshold` matters, so whole refblocks are counted at once.
        h = self.header
        cs = self.cluster_size
        file_length = self.store.size()
        real_clusters = self.store.allocated_size() // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = (file_length + cs - 1) // cs
        per_block_bits = h.cluster_bits + 3 - h.refcount_order
        rt_entries = h.refcount_table_clusters * cs // 8
        n_blocks = min(rt_entries, (end_cluster + (1 << per_block_bits) - 1) >> per_block_bits)
        if n_blocks <= 0:
            return False
        try:
            return self._count_refcounted(n_blocks, per_block_bits, end_cluster, threshold)
        except OSError:
            return False   # QEMU: a failed detection counts as "not preallocated"

    def _count_refcounted(self, n_blocks: int, per_block_bits: int, end_cluster: int,
                          threshold: int) -> bool:
        h = self.header
        cs = self.cluster_size
        reftable = _u64_table(self.store.pread(h.refcount_table_offset, n_blocks * 8))
        count = 0
        for rt_index, entry in enumerate(reftable):
            block_off = entry & C.REFT_OFFSET_MASK
            if not block_off:
                continue
            if block_off & (cs - 1):
                # QEMU signals corruption; the failed detection counts as "not preallocated"
                return False
            n = min(1 << per_block_bits, end_cluster - (rt_index << per_block_bits))
            count += _count_nonzero_refcounts(self.store.pread(block_off, cs), n,
                                              h.refcount_order)
            if count >= threshold:
                return True
        return False

    # ------------------------------------------------------------------ mapping core
    def _l2_offset(self, l1_index: int) -> int:
        if l1_index >= self.l1_size:
            return 0
        entry = self.l1_table[l1_index]
        off = entry & C.L1E_OFFSET_MASK
        if off and off & (self.cluster_size - 1):
            raise CorruptImageError(
                f"L2 table offset {c_hex(off)} unaligned (L1 index: {c_hex(l1_index)})", offset=off)
        return off

    def _bad_entry(self, msg: str, l2_off: int, idx: int) -> CorruptImageError:
        return CorruptImageError(f"{msg} (L2 offset: {c_hex(l2_off)}, L2 index: {c_hex(idx)})",
                                 offset=l2_off)

    def _map_runs(self, start: int, length: int) -> Iterator[tuple[int, int, int, int | None]]:
        """(guest_start, length, SubclusterType, host offset or compressed L2 entry) runs."""
        cbits = self.cluster_bits
        l2_bits = self.l2_bits
        ext = self.extended_l2
        has_df = self.has_data_file
        v2 = self.header.version < 3
        end = start + length
        pos = start
        p_start = p_len = 0
        p_kind = -1
        p_host: int | None = None
        while pos < end:
            cluster = pos >> cbits
            l1_index = cluster >> l2_bits
            chunk_end = min(end, (l1_index + 1) << (l2_bits + cbits))
            l2_off = self._l2_offset(l1_index)
            if not l2_off:
                runs: Any = ((pos, chunk_end - pos, _UNALLOC_PLAIN, None),)
            else:
                table = self.l2_cache.get(l2_off)
                if ext:
                    runs = self._ext_runs(table, l2_off, pos, chunk_end)
                else:
                    runs = self._std_runs(table, l2_off, pos, chunk_end, has_df, v2)
            for r_start, r_len, kind, host in runs:
                if (kind == p_kind and kind != _COMPRESSED and
                        (host is None if p_host is None else host == p_host + p_len)):
                    p_len += r_len
                    continue
                if p_kind >= 0:
                    yield p_start, p_len, p_kind, p_host
                p_start, p_len, p_kind, p_host = r_start, r_len, kind, host
            pos = chunk_end
        if p_kind >= 0:
            yield p_start, p_len, p_kind, p_host

    def _std_runs(self, table: array[int], l2_off: int, pos: int, chunk_end: int,
                  has_df: bool, v2: bool) -> Iterator[tuple[int, int, int, int | None]]:
        """Runs of one standard L2 table's slice: numpy for long slices, else a Python loop.

        numpy costs ~140 ms to import, so a process only imports it for this once it has
        classified about that much work in Python (or when numpy is already loaded): small
        images and short-lived commands never pay for it, whole-image scans switch early.
        """
        ncl = ((chunk_end - 1) >> self.cluster_bits) + 1 - (pos >> self.cluster_bits)
        if ncl >= NUMPY_MIN_CLUSTERS:
            np = _numpy_if_worth(ncl)
            if np is not None:
                runs = _std_runs_np(np, self, table, pos, chunk_end, has_df, v2)
                if runs is not None:
                    return runs
        return self._std_runs_py(table, l2_off, pos, chunk_end, has_df, v2)

    def _std_runs_py(self, table: array[int], l2_off: int, pos: int, chunk_end: int,
                     has_df: bool, v2: bool) -> Iterator[tuple[int, int, int, int | None]]:
        cbits = self.cluster_bits
        cs = self.cluster_size
        mask = self.l2_entries - 1
        while pos < chunk_end:
            cl = pos >> cbits
            idx = cl & mask
            n = min(chunk_end, (cl + 1) << cbits) - pos
            e = table[idx]
            off = e & C.L2E_OFFSET_MASK
            if e & C.QCOW_OFLAG_COMPRESSED:
                if has_df:
                    raise self._bad_entry("Compressed cluster entry found in image with "
                                          "external data file", l2_off, idx)
                yield pos, n, _COMPRESSED, e
            elif e & C.QCOW_OFLAG_ZERO:
                if v2:
                    raise self._bad_entry("Zero cluster entry found in pre-v3 image", l2_off, idx)
                if off:
                    yield pos, n, _ZERO_ALLOC, off + (pos & (cs - 1))
                else:
                    yield pos, n, _ZERO_PLAIN, None
            elif off or (has_df and e & C.QCOW_OFLAG_COPIED):
                if off & (cs - 1):
                    raise self._bad_entry(f"Cluster allocation offset {c_hex(off)} unaligned",
                                          l2_off, idx)
                if has_df and off != cl << cbits:
                    raise self._bad_entry(
                        f"External data file host cluster offset {c_hex(off)} does not match "
                        f"guest cluster offset: {c_hex(cl << cbits)}", l2_off, idx)
                yield pos, n, _NORMAL, off + (pos & (cs - 1))
            else:
                yield pos, n, _UNALLOC_PLAIN, None
            pos += n

    def _ext_runs(self, table: array[int], l2_off: int, pos: int, chunk_end: int
                  ) -> Iterator[tuple[int, int, int, int | None]]:
        cbits = self.cluster_bits
        cs = self.cluster_size
        scbits = self.subcluster_bits
        mask = self.l2_entries - 1
        has_df = self.has_data_file
        while pos < chunk_end:
            cl = pos >> cbits
            idx = cl & mask
            cl_end = min(chunk_end, (cl + 1) << cbits)
            e = table[2 * idx]
            bitmap = table[2 * idx + 1]
            off = e & C.L2E_OFFSET_MASK
            if e & C.QCOW_OFLAG_COMPRESSED:
                if bitmap:
                    raise self._bad_entry("Invalid cluster entry found", l2_off, idx)
                yield pos, cl_end - pos, _COMPRESSED, e
                pos = cl_end
                continue
            allocated = bool(off) or bool(has_df and e & C.QCOW_OFLAG_COPIED)
            if allocated and off & (cs - 1):
                raise self._bad_entry(f"Cluster allocation offset {c_hex(off)} unaligned",
                                      l2_off, idx)
            if allocated and has_df and off != cl << cbits:
                raise self._bad_entry(
                    f"External data file host cluster offset {c_hex(off)} does not match "
                    f"guest cluster offset: {c_hex(cl << cbits)}", l2_off, idx)
            alloc_bits = bitmap & 0xFFFFFFFF
            zero_bits = bitmap >> 32
            if alloc_bits & zero_bits or (not allocated and alloc_bits):
                raise self._bad_entry("Invalid cluster entry found", l2_off, idx)
            base = cl << cbits
            while pos < cl_end:
                sc = (pos - base) >> scbits
                z = (zero_bits >> sc) & 1
                a = (alloc_bits >> sc) & 1
                if z:
                    kind = _ZERO_ALLOC if allocated else _ZERO_PLAIN
                elif a:
                    kind = _NORMAL
                else:
                    kind = _UNALLOC_ALLOC if allocated else _UNALLOC_PLAIN
                # The run of same-kind subclusters ends at the first bit (at or above sc) where
                # either bitmap differs from subcluster sc: found with bit arithmetic, not a loop.
                diff = ((zero_bits ^ (0xFFFFFFFF if z else 0)) |
                        (alloc_bits ^ (0xFFFFFFFF if a else 0))) >> sc
                sc_end = sc + (diff & -diff).bit_length() - 1 if diff else 32
                stop = min(cl_end, base + (sc_end << scbits))
                host = off + (pos - base) if (allocated and kind in _HOST_KINDS) else None
                yield pos, stop - pos, kind, host
                pos = stop

    # ------------------------------------------------------------------ BlockDevice
    def layer_status(self, start: int, length: int) -> Iterator[LayerRun]:
        store = self.data_store
        recurse = False
        if self._metadata_prealloc is None:
            self._metadata_prealloc = self._detect_metadata_preallocation()
        recurse = self._metadata_prealloc
        for r_start, r_len, kind, host in self._map_runs(start, length):
            if kind == _NORMAL:
                assert host is not None
                if recurse:
                    yield from self._recurse_status(r_start, r_len, host)
                else:
                    yield LayerRun(r_start, r_len, STATUS_DATA | STATUS_OFFSET_VALID, host, store)
            elif kind == _COMPRESSED:
                yield LayerRun(r_start, r_len, STATUS_DATA)
            elif kind == _ZERO_ALLOC:
                yield LayerRun(r_start, r_len, STATUS_ZERO | STATUS_OFFSET_VALID, host, store)
            elif kind == _ZERO_PLAIN:
                yield LayerRun(r_start, r_len, STATUS_ZERO)
            elif kind == _UNALLOC_ALLOC:
                yield LayerRun(r_start, r_len, STATUS_OFFSET_VALID, host, store)
            else:
                yield LayerRun(r_start, r_len, 0)

    def _recurse_status(self, start: int, length: int, host: int) -> Iterator[LayerRun]:
        # BDRV_BLOCK_RECURSE: ask the host file which parts of a preallocated run are holes.
        store = self.data_store
        fsize = store.size()
        pos = 0
        while pos < length:
            h = host + pos
            if h >= fsize:
                yield LayerRun(start + pos, length - pos,
                               STATUS_DATA | STATUS_ZERO | STATUS_OFFSET_VALID, h, store)
                return
            nd = store.next_data(h)
            if nd > h:
                n = min(length - pos, nd - h)
                yield LayerRun(start + pos, n, STATUS_DATA | STATUS_ZERO | STATUS_OFFSET_VALID,
                               h, store)
            else:
                nh = store.next_hole(h)
                if nh <= h:
                    nh = fsize
                # request alignment 1 (buffered I/O): a data run ends exactly at EOF
                n = min(length - pos, nh - h)
                yield LayerRun(start + pos, n, STATUS_DATA | STATUS_OFFSET_VALID, h, store)
            pos += n

    def _read_layer(self, offset: int, view: memoryview) -> None:
        cs = self.cluster_size
        compressed: list[tuple[memoryview, int, int]] = []
        for r_start, r_len, kind, host in self._map_runs(offset, len(view)):
            sub = view[r_start - offset:r_start - offset + r_len]
            if kind == _NORMAL:
                assert host is not None
                self.data_store.readinto(host, sub)
            elif kind in (_ZERO_PLAIN, _ZERO_ALLOC):
                zero_fill(sub)
            elif kind == _COMPRESSED:
                assert host is not None
                compressed.append((sub, host, r_start & (cs - 1)))
            else:
                self.read_backing_or_zero(r_start, sub)
        if len(compressed) >= PARALLEL_MIN_CLUSTERS and _decompress_workers() > 1:
            self._inflate_parallel(compressed)
            return
        for sub, entry, in_cl in compressed:
            sub[:] = self._decompress(entry)[in_cl:in_cl + len(sub)]

    def _inflate_parallel(self, items: list[tuple[memoryview, int, int]]) -> None:
        # zlib and zstandard release the GIL: a long read's compressed clusters are inflated
        # on every core (QEMU also splits a request into parallel cluster tasks). Each task
        # is a contiguous share of the clusters; errors surface in guest order.
        pool = _decompress_pool()
        n = _decompress_workers()
        step = -(-len(items) // n)

        def work(part: list[tuple[memoryview, int, int]]) -> None:
            for sub, entry, in_cl in part:
                sub[:] = self._inflate(entry)[in_cl:in_cl + len(sub)]

        futures = [pool.submit(work, items[i:i + step]) for i in range(0, len(items), step)]
        for f in futures:
            f.result()

    def _decompress(self, entry: int) -> bytes:
        if entry == self._zlib_cache_key:
            return self._zlib_cache_val
        out = self._inflate(entry)
        self._zlib_cache_key = entry
        self._zlib_cache_val = out
        return out

    def _inflate(self, entry: int) -> bytes:
        """One compressed cluster, decoded (thread-safe: no shared state is touched)."""
        coffset, csize = self.compressed_layout.decode(entry)
        cs = self.cluster_size
        raw = self.store.pread(coffset, csize)
        if self.header.compression_type == C.QCOW2_COMPRESSION_TYPE_ZSTD:
            out = _zstd_one_frame(raw, cs)
        else:
            try:
                d = zlib.decompressobj(-12)
                out = d.decompress(raw, cs)
            except zlib.error:
                out = b""
        if len(out) != cs:
            raise CorruptImageError(
                f"Could not decompress the compressed cluster at host offset {c_hex(coffset)}",
                offset=coffset, fatal=False)
        return out

    def check(self, repair: str | None = None) -> CheckResult:
        """`qemu-img check` of this image's metadata (engine/check.py); read-only here.

        Repairing needs the image opened read-write (WritableQcow2Image.check), or use
        qcow2.check(path, repair=...) on a closed image.
        """
        from .check import check_store

        if repair is not None:
            raise ReadOnlyImageError("repairing an image needs it opened read-write")
        return check_store(self.store, self.filename, None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.data_store is not self.store:
            self.data_store.close()
        self.store.close()
        super().close()

    @property
    def actual_size(self) -> int:
        return self.store.allocated_size()

    def is_v3(self) -> bool:
        return self.header.version >= 3

    def file_length(self) -> int:
        return os.fstat(self.store.fd).st_size if hasattr(self.store, "fd") else self.store.size()


# ---------------------------------------------------------------------- vectorised mapping
NUMPY_MIN_CLUSTERS = 32        # below this a Python loop is faster than numpy's call overhead
NUMPY_IMPORT_AFTER = 1 << 18   # clusters classified in Python (~0.15 s) before importing numpy
_py_classified = 0
_np_module: Any = None


def _numpy_if_worth(ncl: int) -> Any:
    """numpy if it is loaded or has become worth loading, else None (the caller loops)."""
    global _py_classified, _np_module
    if _np_module is not None:
        return _np_module
    mod = _loaded_numpy()
    if mod is None and _py_classified + ncl < NUMPY_IMPORT_AFTER:
        _py_classified += ncl
        return None
    if mod is None:
        import numpy as mod
    _np_module = mod
    return mod


def _loaded_numpy() -> Any:
    import sys

    return sys.modules.get("numpy")


_F_COMP = C.QCOW_OFLAG_COMPRESSED
_F_ZERO = C.QCOW_OFLAG_ZERO


def _std_runs_np(np: Any, img: Qcow2Image, table: array[int], pos: int, chunk_end: int,
                 has_df: bool, v2: bool) -> Iterator[tuple[int, int, int, int | None]] | None:
    """The runs `_std_runs_py` yields (after merging), classified for a whole slice at once.

    Returns None when the slice holds an entry the engine rejects (compressed with a data
    file, the zero flag in v2, unaligned or mismatching data-file offsets): the Python loop
    then raises exactly as it always does, at the right entry.
    """
    cbits = img.cluster_bits
    cs = img.cluster_size
    cl0 = pos >> cbits
    ncl = ((chunk_end - 1) >> cbits) + 1 - cl0
    i0 = cl0 & (img.l2_entries - 1)
    if i0 + ncl > len(table):
        return None
    t = np.frombuffer(table, dtype=np.uint64, count=ncl, offset=i0 * 8)
    first = int(t[0])
    off0 = first & C.L2E_OFFSET_MASK
    if (not has_df and off0 and not first & (_F_COMP | _F_ZERO) and not off0 & (cs - 1)
            and (int(t[-1]) & C.L2E_OFFSET_MASK) - off0 == (ncl - 1) * cs
            and bool((np.diff(t) == np.uint64(cs)).all())):
        # One host-contiguous run of normal clusters, the usual allocated layout. A constant
        # step of cs from a flag-free first entry keeps every flag and offset bit equal, so
        # no entry can be compressed, zero or unaligned: two passes instead of a dozen.
        return iter(((pos, chunk_end - pos, _NORMAL, off0 + (pos - (cl0 << cbits))),))
    comp = (t & np.uint64(_F_COMP)) != 0
    zero = ((t & np.uint64(_F_ZERO)) != 0) & ~comp
    off = t & np.uint64(C.L2E_OFFSET_MASK)
    has_off = off != 0
    alloc = (has_off | ((t & np.uint64(C.QCOW_OFLAG_COPIED)) != 0)) if has_df else has_off
    normal = ~comp & ~zero & alloc
    if (has_df and bool(comp.any())) or (v2 and bool(zero.any())) or bool(
            (normal & ((off & np.uint64(cs - 1)) != 0)).any()):
        return None
    if has_df:
        expect = np.arange(cl0, cl0 + ncl, dtype=np.uint64) << np.uint64(cbits)
        if bool((normal & (off != expect)).any()):
            return None
    kind = np.full(ncl, _UNALLOC_PLAIN, dtype=np.int8)
    kind[normal] = _NORMAL
    kind[zero & has_off] = _ZERO_ALLOC
    kind[zero & ~has_off] = _ZERO_PLAIN
    kind[comp] = _COMPRESSED
    brk = np.empty(ncl, dtype=bool)
    brk[0] = True
    brk[1:] = kind[1:] != kind[:-1]
    hostk = normal | (zero & has_off)
    brk[1:] |= hostk[1:] & (off[1:] != off[:-1] + np.uint64(cs))
    brk |= comp   # every compressed cluster is a run of its own
    starts = np.flatnonzero(brk)
    return _emit_runs(starts.tolist(), kind[starts].tolist(), off[starts].tolist(),
                      t[starts].tolist(), ncl, cl0, cbits, pos, chunk_end)


def _emit_runs(starts: list[int], kinds: list[int], offs: list[int], entries: list[int],
               ncl: int, cl0: int, cbits: int, pos: int, chunk_end: int
               ) -> Iterator[tuple[int, int, int, int | None]]:
    starts.append(ncl)
    for j, kind in enumerate(kinds):
        g0 = (cl0 + starts[j]) << cbits
        g_start = max(pos, g0)
        g_end = min(chunk_end, (cl0 + starts[j + 1]) << cbits)
        host: int | None
        if kind in (_NORMAL, _ZERO_ALLOC):
            host = offs[j] + (g_start - g0)
        elif kind == _COMPRESSED:
            host = entries[j]
        else:
            host = None
        yield g_start, g_end - g_start, kind, host


# ---------------------------------------------------------------------- decompression
PARALLEL_MIN_CLUSTERS = 8      # fewer compressed clusters in one read: inflate them inline
_tls = threading.local()
_pool: Any = None
_pool_lock = threading.Lock()


def _decompress_workers() -> int:
    return min(8, os.cpu_count() or 1)


def _decompress_pool() -> Any:
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(max_workers=_decompress_workers(),
                                       thread_name_prefix="qcow2-inflate")
        return _pool


def _zstd_one_frame(raw: bytes, cs: int) -> bytes:
    # QEMU writes one frame that declares exactly one cluster: decode it in one call with a
    # decompressor kept per thread (they are not thread-safe). Anything else takes the
    # general frame loop, which has QEMU's exact semantics.
    import zstandard

    try:
        declared = zstandard.get_frame_parameters(raw).content_size
    except zstandard.ZstdError:
        return b""
    if declared == cs:
        dctx = getattr(_tls, "zstd_dctx", None)
        if dctx is None:
            dctx = _tls.zstd_dctx = zstandard.ZstdDecompressor()
        try:
            out: bytes = dctx.decompress(raw, max_output_size=cs)
        except zstandard.ZstdError:
            out = b""
        if len(out) == cs:
            return out
    return _zstd_decompress(raw, cs)


def _zstd_decompress(data: bytes, cluster_size: int) -> bytes:
    """QEMU's qcow2_zstd_decompress(): decode frames until exactly one cluster is produced.

    Several frames, and any bytes after the frame that completes the cluster, are accepted.
    A frame still unfinished when the cluster is full (it would produce more), too little
    output or a decoding error give b"" (the caller reports the cluster as corrupt). Memory
    stays bounded by the cluster size whatever a hostile frame header claims.
    """
    import zstandard

    unknown = zstandard.CONTENTSIZE_UNKNOWN
    dctx = zstandard.ZstdDecompressor()
    out = bytearray()
    rest = data
    while len(out) < cluster_size:
        need = cluster_size - len(out)
        try:
            declared = zstandard.get_frame_parameters(rest).content_size
            if declared != unknown and declared > need:
                return b""
            if declared == unknown:
                # no size in the header: decode at most one byte too many to find out
                with dctx.stream_reader(rest, read_across_frames=False) as reader:
                    if len(reader.read(need + 1)) > need:
                        return b""
            obj = dctx.decompressobj()
            chunk = obj.decompress(rest)
        except zstandard.ZstdError:
            return b""
        if not obj.eof or (not chunk and len(obj.unused_data) >= len(rest)):
            return b""   # truncated frame, or no progress
        out += chunk
        rest = obj.unused_data
    return bytes(out)


def _count_nonzero_refcounts(block: bytes, n: int, refcount_order: int) -> int:
    """How many of the first `n` refcounts of a refblock are non-zero.

    C-level counting (array.count, int.bit_count) instead of a loop per entry, and without
    importing numpy just to open an image.
    """
    bits = 1 << refcount_order
    if bits >= 8:
        width = bits // 8
        data = block[:n * width]
        if width == 1:
            return n - data.count(0)
        t = array({2: "H", 4: "I" if array("I").itemsize == 4 else "L", 8: "Q"}[width])
        t.frombytes(data)   # byte order does not matter for a test against zero
        return n - t.count(0)
    # Sub-byte refcounts are packed LSB-first: fold every field onto its lowest bit.
    x = int.from_bytes(block[:(n * bits + 7) // 8], "little") & ((1 << (n * bits)) - 1)
    if bits >= 2:
        x |= x >> 1
    if bits == 4:
        x |= x >> 2
    low_bits = int.from_bytes(bytes([{1: 0xFF, 2: 0x55, 4: 0x11}[bits]]) * ((n * bits + 7) // 8),
                              "little")
    return (x & low_bits).bit_count()
