"""Writing to qcow2 images: allocation, copy-on-write, L2/L1 linking, zero and discard, flush.

Crash safety follows QEMU's ordering (spec §6.1), enforced in `flush()`:
  1. guest data is made durable before any L2 entry points at it;
  2. refcount increases are made durable before the L2/L1 entries that use the clusters;
  3. L2 tables are written before the L1 entries that point at them;
  4. refcount decreases (COW of shared/compressed clusters, freed tables) come last.
A crash anywhere leaves at worst leaked clusters. Dirty metadata is bounded: when too many
L2 tables are dirty, the whole sequence runs early.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence
from sys import byteorder
from typing import TYPE_CHECKING, Any, cast

from ..errors import (
    CorruptImageError,
    ImageLimitError,
    MetadataOverlapError,
    OutOfRangeError,
    UnsupportedFeatureError,
    c_hex,
)
from ..format import constants as C
from ..format.header import encode_header_cluster, l1_entries_for
from ..format.snapshot import SnapshotEntry
from ..io import ByteStore
from .image import Qcow2Image
from .refcount import Refcounts

if TYPE_CHECKING:
    from .check import CheckResult, Repair

MAX_DIRTY_L2 = 256
# Autoclear bits we keep: data-file-raw. Unknown ones are cleared on a writable open, as QEMU
# does. Persistent bitmaps are dropped (their clusters freed) because we do not track writes
# in them: a stale bitmap would make an incremental backup miss data.
KEPT_AUTOCLEAR = C.QCOW2_AUTOCLEAR_DATA_FILE_RAW


class WritableQcow2Image(Qcow2Image):
    """A qcow2 layer opened read-write."""

    def __init__(self, store: ByteStore, filename: str, *, l2_cache_size: int | None = None,
                 keep_bitmaps: bool = False) -> None:
        super().__init__(store, filename, readonly=False, l2_cache_size=l2_cache_size)
        # --- dirty open (engine/check.py) -------------------------------------------------
        # A dirty image (lazy refcounts, not closed cleanly) has refcounts that may be too
        # low: QEMU repairs it (check with fix-errors|fix-leaks) on every read-write open and
        # refuses the open if that fails. The repair may rewrite the refcount structure, L1/L2
        # entries and the header, so everything read from the image is read again.
        self.repair_result: CheckResult | None = None
        if self.dirty:
            from .check import check_store

            res = check_store(store, filename, "all")
            if res.failure is not None or res.check_errors:
                raise CorruptImageError(
                    f"Could not repair dirty image: {res.failure or 'Input/output error'}",
                    fatal=False)
            super().__init__(store, filename, readonly=False, l2_cache_size=l2_cache_size)
            self.repair_result = res
        # --- end of dirty open ------------------------------------------------------------
        h = self.header
        if self.loaded_snapshot is not None:
            raise UnsupportedFeatureError("cannot write to a loaded snapshot")
        self.refcounts = Refcounts(store, h.cluster_bits, h.refcount_order,
                                   h.refcount_table_offset, h.refcount_table_clusters,
                                   self._set_header_reftable)
        self.refcounts.on_new_block = self._note_refblock
        self.refcounts.overlap_check = self._check_metadata_write
        self._dirty_l2: dict[int, array[int]] = {}
        self._dirty_l1: set[int] = set()
        self._data_dirty = False
        self._meta_clusters: set[int] | None = None
        self._meta_non_l2: set[int] = set()
        # qcow2_alloc_bytes()'s free_byte_offset: where the next compressed cluster is packed
        self.free_byte_offset = 0
        # host offset after the last cluster the current write request used (_write_impl)
        self._alloc_hint: int | None = None
        self.lazy_refcounts = bool(h.compatible_features & C.QCOW2_COMPAT_LAZY_REFCOUNTS)
        # keep_bitmaps (amend): bitmaps stay until the first guest write or resize, which
        # drops them as any writable open does.
        has_bitmaps = bool(self.bitmaps or self.extensions.bitmaps is not None)
        self._bitmaps_kept = has_bitmaps and keep_bitmaps
        kept = KEPT_AUTOCLEAR | (C.QCOW2_AUTOCLEAR_BITMAPS if self._bitmaps_kept else 0)
        if has_bitmaps and not keep_bitmaps:
            self._drop_bitmaps()
        elif h.autoclear_features & ~kept:
            h.autoclear_features &= kept
            self.store.pwrite(88, struct.pack(">Q", h.autoclear_features))
            self.store.flush()

    def _drop_bitmaps(self) -> None:
        """Remove the bitmaps extension (header rewritten first), then free its clusters."""
        cs = self.cluster_size
        spans: list[tuple[int, int]] = []
        ext = self.extensions.bitmaps
        if ext is not None:
            spans.append((ext.bitmap_directory_offset, ext.bitmap_directory_size))
        for bm in self.bitmaps:
            if bm.bitmap_table_size > (512 << 20) // 8:
                raise CorruptImageError(f"Bitmap '{bm.name}' table too large")
            spans.append((bm.bitmap_table_offset, bm.bitmap_table_size * 8))
            raw = self.store.pread(bm.bitmap_table_offset, bm.bitmap_table_size * 8)
            for (e,) in struct.iter_unpack(">Q", raw):
                if e & C.L1E_OFFSET_MASK:
                    spans.append((e & C.L1E_OFFSET_MASK, cs))
        h = self.header
        h.autoclear_features &= KEPT_AUTOCLEAR
        self.extensions.bitmaps = None
        self._bitmaps_kept = False
        cluster0 = encode_header_cluster(h, self.extensions, self.backing_file)
        self.store.pwrite(0, cluster0)
        self.store.flush()
        self.bitmaps = []
        for off, length in spans:
            if off and length and not off & (cs - 1):
                self.refcounts.queue_decrease(off, length)
        self.refcounts.apply_decreases()
        self.refcounts.flush_blocks()


    def check(self, repair: str | None = None) -> CheckResult:
        """Check, and with repair="leaks"/"all" repair, this open image as `qemu-img check`.

        Pending writes are flushed first. After a repair the image state is read again from
        disk (as after a dirty open) and a second, read-only pass gives the result, with the
        first pass's fixed counts and both passes' diagnostics.
        """
        from .check import check_store

        if repair not in (None, "leaks", "all"):
            raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
        self.flush()
        first = check_store(self.store, self.filename, cast("Repair", repair))
        if first.failure is not None or not (first.corruptions_fixed or first.leaks_fixed):
            if repair is not None and first.failure is None:
                self._reload()
            return first
        self._reload()
        second = check_store(self.store, self.filename, None)
        second.corruptions_fixed = first.corruptions_fixed
        second.leaks_fixed = first.leaks_fixed
        second.messages[:0] = first.messages
        return second

    def _reload(self) -> None:
        # The repair may have rewritten the header, refcounts, L1 and L2 entries: read every
        # piece of state again, keeping what open() attached (backing chain, data file).
        keep = (self.backing, self.data_store, self.data_file_name)
        cache_bytes = self.l2_cache.capacity * self.cluster_size
        WritableQcow2Image.__init__(self, self.store, self.filename, l2_cache_size=cache_bytes)
        self.backing, self.data_store, self.data_file_name = keep

    # ------------------------------------------------------------------ public mutators
    # Each runs under _guard(): metadata corruption found while writing marks the image
    # corrupt (incompatible bit 1) so nothing writes to it again, as QEMU does.
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes at any offset and length."""
        self._guard(self._write_impl, offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make [offset, +length) read as zeros, with metadata where QEMU would (spec §1.11)."""
        self._guard(self._write_zeroes_impl, offset, length, unmap)

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview, *,
                         level: int | None = None,
                         compressed: Sequence[bytes | None] | None = None) -> None:
        """Write whole clusters compressed, as QEMU's compressed writes (engine/compress.py).

        `compressed` gives the already compressed clusters (None: store it uncompressed).
        """
        from .compress import write_compressed_qcow2

        self._guard(write_compressed_qcow2, self, offset, data, level, compressed)

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters (partial ones are ignored, as QEMU does)."""
        self._guard(self._discard_impl, offset, length)

    def resize(self, new_size: int) -> None:
        """Grow or shrink the virtual disk."""
        self._guard(self._resize_impl, new_size)

    # Internal snapshots: the logic lives in engine/snapshot.py. (`snapshots` itself is the
    # list attribute every reader uses, hence `list_snapshots()`.)
    def list_snapshots(self) -> list[SnapshotEntry]:
        """The snapshot table entries, in table order."""
        return list(self.snapshots)

    def create_snapshot(self, name: str, **fields: Any) -> SnapshotEntry:
        """Create an internal snapshot of the active state (qemu-img snapshot -c)."""
        from .snapshot import create_snapshot

        return create_snapshot(self, name, **fields)

    def apply_snapshot(self, name_or_id: str) -> SnapshotEntry:
        """Revert the active state to a snapshot, ID first, then name (qemu-img snapshot -a)."""
        from .snapshot import apply_snapshot

        return apply_snapshot(self, name_or_id)

    def delete_snapshot(self, name_or_id: str | None = None, *, snapshot_id: str | None = None,
                        name: str | None = None) -> SnapshotEntry:
        """Delete a snapshot by ID-or-name, or by exact ID and/or name."""
        from .snapshot import delete_snapshot

        return delete_snapshot(self, name_or_id, snapshot_id=snapshot_id, name=name)

    def amend(self, **options: Any) -> None:
        """Change qcow2 options in place, as `qemu-img amend -o` (see qcow2.amend)."""
        from .amend import amend, options_from_kwargs

        amend(self, options_from_kwargs(options))

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        if self.corrupt:
            raise CorruptImageError("Image is corrupt; cannot be written to", fatal=False)
        if self._bitmaps_kept:
            self._drop_bitmaps()
        if self.lazy_refcounts and not self.dirty:
            self._mark_dirty()
        try:
            fn(*args)
        except CorruptImageError as e:
            if e.fatal and not self.corrupt:
                self._mark_corrupt()
            raise

    def _mark_dirty(self) -> None:
        # Lazy refcounts: the dirty bit is durable before any metadata that relies on it.
        self.header.incompatible_features |= C.QCOW2_INCOMPAT_DIRTY
        self.store.pwrite(72, struct.pack(">Q", self.header.incompatible_features))
        self.store.flush()
        self.dirty = True

    def _mark_corrupt(self) -> None:
        self.corrupt = True
        self.header.incompatible_features |= C.QCOW2_INCOMPAT_CORRUPT
        try:
            self.store.pwrite(72, struct.pack(">Q", self.header.incompatible_features))
            self.store.flush()
        except OSError:
            pass

    # ------------------------------------------------------------------ header helpers
    def _set_header_reftable(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self.store.pwrite(48, struct.pack(">QI", offset, clusters))
        self._meta_clusters = None

    # ------------------------------------------------------------------ L2 access
    def _load_l2(self, l2_offset: int) -> array[int]:
        t = self._dirty_l2.get(l2_offset)
        if t is not None:
            return t
        return super()._load_l2(l2_offset)

    def _l2_table_len(self) -> int:
        return self.l2_entries * (2 if self.extended_l2 else 1)

    def _l2_for_write(self, l1_index: int) -> tuple[int, array[int]]:
        """The L2 table for l1_index, allocated or copied (COW) so that it may be modified."""
        if l1_index >= self.l1_size:
            raise OutOfRangeError("write beyond the L1 table")
        entry = self.l1_table[l1_index]
        old = entry & C.L1E_OFFSET_MASK
        if old and old & (self.cluster_size - 1):
            raise CorruptImageError(
                f"L2 table offset {c_hex(old)} unaligned (L1 index: {c_hex(l1_index)})", offset=old)
        if old and entry & C.QCOW_OFLAG_COPIED:
            self._check_l2_target(old)
            return old, self.l2_cache.get(old)
        new = self.refcounts.alloc_clusters(1)
        self._check_metadata_write(new, self.cluster_size)
        if old:
            t = array("Q", self.l2_cache.get(old))
            self.refcounts.queue_decrease(old, self.cluster_size)
        else:
            t = array("Q", bytes(8 * self._l2_table_len()))
        self._dirty_l2[new] = t
        self.l2_cache.put(new, t)
        self.l1_table[l1_index] = new | C.QCOW_OFLAG_COPIED
        self._dirty_l1.add(l1_index)
        # The overlap set grows by the new table rather than being rebuilt from every table
        # (a rebuild per new L2 table made allocation quadratic). A COW-replaced table stays
        # in it: it is still referenced by a snapshot, so no data can be written there.
        self._note_metadata(new)
        self._ensure_file_covers(new + self.cluster_size)
        return new, t

    def _note_metadata(self, host_offset: int, l2: bool = True) -> None:
        if self._meta_clusters is not None:
            self._meta_clusters.add(host_offset >> self.cluster_bits)
            if not l2:
                self._meta_non_l2.add(host_offset >> self.cluster_bits)

    def _note_refblock(self, host_offset: int) -> None:
        self._note_metadata(host_offset, l2=False)

    def _ensure_file_covers(self, end: int) -> None:
        if self.store.size() < end:
            self.store.truncate(end)

    # ------------------------------------------------------------------ overlap check
    def _metadata(self) -> set[int]:
        """Host cluster indices holding metadata (QEMU's overlap-check=cached template)."""
        if self._meta_clusters is not None:
            return self._meta_clusters
        cb = self.cluster_bits
        h = self.header
        s = {0}

        def span(off: int, length: int) -> None:
            if length > 0:
                s.update(range(off >> cb, ((off + length - 1) >> cb) + 1))

        span(h.l1_table_offset, self.l1_size * 8)
        span(self.refcounts.table_offset, self.refcounts.table_clusters << cb)
        for e in self.refcounts.table:
            if e & C.REFT_OFFSET_MASK:
                s.add((e & C.REFT_OFFSET_MASK) >> cb)
        if h.nb_snapshots:
            span(h.snapshots_offset, self._snapshot_table_bytes())
            for sn in self.snapshots:
                span(sn.l1_table_offset, sn.l1_size * 8)
        # everything but the active L2 tables: what an L2 table write must not hit
        self._meta_non_l2 = set(s)
        for e in self.l1_table:
            if e & C.L1E_OFFSET_MASK:
                s.add((e & C.L1E_OFFSET_MASK) >> cb)
        self._meta_clusters = s
        return s

    def _snapshot_table_bytes(self) -> int:
        """The on-disk size of the snapshot table, walked from its entries' own size fields
        (parsed names and IDs are cut at NUL bytes, so re-encoding could be shorter)."""
        h = self.header
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            raw = self.store.pread(pos, 40)
            id_len, name_len = struct.unpack_from(">HH", raw, 12)
            (extra,) = struct.unpack_from(">I", raw, 36)
            pos += (40 + extra + id_len + name_len + 7) & ~7
        return pos - h.snapshots_offset

    def _check_l2_target(self, l2_offset: int) -> None:
        # An existing L2 table is updated in place: the L1 must not make it another table
        # (QEMU's cache write-back overlap check ignores only the active L2 tables).
        self._metadata()
        if l2_offset >> self.cluster_bits in self._meta_non_l2:
            raise MetadataOverlapError(
                "Preventing invalid write on metadata (overlaps with cluster "
                f"{c_hex(l2_offset >> self.cluster_bits)})", offset=l2_offset)

    def _check_overlap(self, host: int, length: int) -> None:
        """Before a guest data write (data files hold no metadata)."""
        if not self.has_data_file:
            self._check_metadata_write(host, length)

    def _check_metadata_write(self, host: int, length: int) -> None:
        """Before writing a new table into the image file: a crafted image whose refcounts
        do not cover its own header or tables would otherwise get them overwritten (QEMU's
        overlap check refuses and marks the image corrupt)."""
        meta = self._metadata()
        cb = self.cluster_bits
        for ci in range((host >> cb), ((host + length - 1) >> cb) + 1):
            if ci in meta:
                raise MetadataOverlapError(
                    f"Preventing invalid write on metadata (overlaps with cluster {c_hex(ci)})",
                    offset=ci << cb)

    # ------------------------------------------------------------------ write
    def _write_impl(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes at any offset and length."""
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if not len(view):
            return
        self._zlib_cache_key = None
        cb = self.cluster_bits
        span = 1 << (cb + self.l2_bits)
        pos = offset
        end = offset + len(view)
        # Within one request QEMU first tries to allocate right after the host cluster it
        # used last (qcow2_alloc_clusters_at()), and searches for free space only when that
        # fails: where the request's clusters land depends on it.
        self._alloc_hint = None
        while pos < end:
            chunk_end = min(end, (pos // span + 1) * span)
            self._write_in_table(pos, view[pos - offset:chunk_end - offset])
            pos = chunk_end
        self._maybe_flush()

    def _write_in_table(self, offset: int, view: memoryview) -> None:
        """A write within one L2 table's range."""
        cs = self.cluster_size
        cb = self.cluster_bits
        l1_index = offset >> (cb + self.l2_bits)
        l2_off, table = self._l2_for_write(l1_index)
        mask = self.l2_entries - 1
        end = offset + len(view)
        pos = offset
        while pos < end:
            cl = pos >> cb
            idx = cl & mask
            e = table[2 * idx if self.extended_l2 else idx]
            n = min(end, (cl + 1) << cb) - pos
            if self._can_write_in_place(e, table, idx, pos, n):
                # A run of in-place clusters that are host-contiguous: one pwrite.
                host = (e & C.L2E_OFFSET_MASK) + (pos & (cs - 1))
                run_end = pos + n
                while run_end < end:
                    ncl = run_end >> cb
                    ne = table[2 * (ncl & mask) if self.extended_l2 else ncl & mask]
                    nn = min(end, (ncl + 1) << cb) - run_end
                    if (ncl & mask) == 0 or not self._can_write_in_place(
                            ne, table, ncl & mask, run_end, nn) or (
                            ne & C.L2E_OFFSET_MASK) != host + (run_end - pos):
                        break
                    run_end += nn
                self._write_data(host, view[pos - offset:run_end - offset])
                self._alloc_hint = (((host + (run_end - pos) - 1) >> cb) + 1) << cb
                for c in range(pos >> cb, ((run_end - 1) >> cb) + 1):
                    if self.extended_l2:
                        lo = max(pos, c << cb)
                        hi = min(run_end, (c + 1) << cb)
                        if self._mark_subclusters_written(table, c & mask, lo, hi):
                            self._dirty_l2[l2_off] = table
                    elif table[c & mask] & C.QCOW_OFLAG_ZERO:
                        table[c & mask] &= ~C.QCOW_OFLAG_ZERO
                        self._dirty_l2[l2_off] = table
                pos = run_end
                continue
            if not self.extended_l2 and _is_zero_alloc_copied(e):
                # QEMU keeps a ZERO_ALLOC cluster with COPIED and writes the rest as zeros.
                host = e & C.L2E_OFFSET_MASK
                buf = bytearray(cs)
                buf[pos & (cs - 1):(pos & (cs - 1)) + n] = view[pos - offset:pos - offset + n]
                self._write_data(host, memoryview(buf))
                self._alloc_hint = host + cs
                table[idx] = e & ~C.QCOW_OFLAG_ZERO
                self._dirty_l2[l2_off] = table
                pos += n
                continue
            # Clusters needing allocation: gather a run and allocate it at once.
            run_end = pos + n
            while run_end < end:
                ncl = run_end >> cb
                if (ncl & mask) == 0:
                    break
                ne = table[2 * (ncl & mask) if self.extended_l2 else ncl & mask]
                nn = min(end, (ncl + 1) << cb) - run_end
                if self._can_write_in_place(ne, table, ncl & mask, run_end, nn) or (
                        not self.extended_l2 and _is_zero_alloc_copied(ne)):
                    break
                run_end += nn
            at: int | None = None
            hint = self._alloc_hint
            if hint is not None and not self.extended_l2 and not self.has_data_file:
                ncl = ((run_end - 1) >> cb) - (pos >> cb) + 1
                k = self.refcounts.alloc_clusters_at(hint, ncl)
                if k:
                    at = hint
                    run_end = min(run_end, ((pos >> cb) + k) << cb)
            self._allocating_write(table, pos, view[pos - offset:run_end - offset], at)
            self._dirty_l2[l2_off] = table
            pos = run_end

    def _can_write_in_place(self, e: int, table: array[int], idx: int, pos: int, n: int) -> bool:
        if e & C.QCOW_OFLAG_COMPRESSED or not e & C.QCOW_OFLAG_COPIED:
            return False
        off = e & C.L2E_OFFSET_MASK
        if not off and not self.has_data_file:
            return False
        if off & (self.cluster_size - 1):
            raise CorruptImageError(f"Cluster allocation offset {c_hex(off)} unaligned", offset=off)
        if not self.extended_l2:
            # ZERO_ALLOC with COPIED: in place only if the whole cluster is overwritten.
            return not (e & C.QCOW_OFLAG_ZERO) or n == self.cluster_size
        # Extended L2: partially written subclusters that are not allocated need COW data
        # (backing or zeros), which the allocating path handles per subcluster.
        bitmap = table[2 * idx + 1]
        sc_bits = self.subcluster_bits
        base = (pos >> self.cluster_bits) << self.cluster_bits
        first = (pos - base) >> sc_bits
        last = (pos + n - 1 - base) >> sc_bits
        for sc in (first, last):
            lo = base + (sc << sc_bits)
            hi = lo + self.subcluster_size
            partial = pos > lo or pos + n < hi
            if partial and not (bitmap >> sc) & 1:
                return False
        return True

    def _mark_subclusters_written(self, table: array[int], idx: int, lo: int, hi: int) -> bool:
        """Set the allocation bits of the subclusters [lo, hi) covers; True if changed."""
        base = (lo >> self.cluster_bits) << self.cluster_bits
        first = (lo - base) >> self.subcluster_bits
        last = (hi - 1 - base) >> self.subcluster_bits
        bits = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
        new = (table[2 * idx + 1] | bits) & ~(bits << 32)
        if new == table[2 * idx + 1]:
            return False
        table[2 * idx + 1] = new
        return True

    def _write_data(self, host: int, data: memoryview) -> None:
        self._check_overlap(host, len(data))
        self.data_store.pwrite(host, data)
        self._data_dirty = True

    def _write_cow(self, host: int, buf: bytearray) -> None:
        """Write a copy-on-write piece; zeros at or past the end of the file are allocated
        instead of written (QEMU zeroes such COW regions with an efficient write-zeroes):
        a file system then records unwritten extents rather than writing the zeros, and the
        file still holds the space, so `map`'s preallocation heuristics see what QEMU's
        files show."""
        store = self.data_store
        n = len(buf)
        if n >= 4096 and host >= store.size() and buf == _zeros(n):
            self._check_overlap(host, n)
            if store.allocate(host, n):
                self._data_dirty = True
                return
        self._write_data(host, memoryview(buf))

    def _allocating_write(self, table: array[int], offset: int, view: memoryview,
                          host: int | None = None) -> None:
        """Allocate host clusters for the clusters touched by [offset, +len) and write them,
        copying the untouched parts from what the guest currently sees (COW)."""
        cs = self.cluster_size
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        first_cl = offset >> cb
        last_cl = (offset + len(view) - 1) >> cb
        ncl = last_cl - first_cl + 1
        base = first_cl << cb
        if self.extended_l2:
            self._allocating_write_ext(table, offset, view)
            return
        if self.has_data_file:
            host = base  # guest offset == host offset in the data file
            self._ensure_data_file_covers(base + ncl * cs)
        elif host is None:
            host = self.refcounts.alloc_clusters(ncl)
        self._alloc_hint = host + ncl * cs
        head = offset - base
        tail_start = offset + len(view)
        # QEMU's COW fills the whole last cluster, also past the end of the virtual disk
        # (with zeros there): the file then always ends on a cluster boundary.
        tail_end = (last_cl + 1) << cb
        # COW only the partial head and tail; the guest data is written from the caller's
        # buffer without a copy (one pwrite per piece, all before the L2 update).
        if head:
            hbuf = bytearray(head)
            self._read_layer(base, memoryview(hbuf))
            self._write_cow(host, hbuf)
        self._write_data(host + head, view)
        if tail_start < tail_end:
            tbuf = bytearray(tail_end - tail_start)
            inside = max(0, min(tail_end, self.virtual_size) - tail_start)
            if inside:
                self._read_layer(tail_start, memoryview(tbuf)[:inside])
            self._write_cow(host + (tail_start - base), tbuf)
        for i in range(ncl):
            idx = (first_cl + i) & mask
            old = table[idx]
            table[idx] = (host + i * cs) | C.QCOW_OFLAG_COPIED
            self._release_entry(old)

    def _reusable_ext(self, old: int) -> bool:
        return bool(old & C.QCOW_OFLAG_COPIED and not old & C.QCOW_OFLAG_COMPRESSED and
                    (old & C.L2E_OFFSET_MASK or self.has_data_file))

    def _allocating_write_ext(self, table: array[int], offset: int, view: memoryview) -> None:
        cs = self.cluster_size
        cb = self.cluster_bits
        scs = self.subcluster_size
        mask = self.l2_entries - 1
        end = offset + len(view)
        # Clusters already allocated to us (COPIED) are reused; the others get one
        # contiguous run of new host clusters.
        fresh = sum(1 for cl in range(offset >> cb, ((end - 1) >> cb) + 1)
                    if not self._reusable_ext(table[2 * (cl & mask)]))
        if self.has_data_file:
            self._ensure_data_file_covers(((end - 1) >> cb << cb) + cs)
            hc = 0
        else:
            hc = self.refcounts.alloc_clusters(fresh) if fresh else 0
        pos = offset
        while pos < end:
            cl = pos >> cb
            base = cl << cb
            idx = cl & mask
            old = table[2 * idx]
            bitmap = table[2 * idx + 1]
            n = min(end, base + cs) - pos
            reuse = self._reusable_ext(old)
            if self.has_data_file:
                target = base
            elif reuse:
                target = old & C.L2E_OFFSET_MASK
            else:
                target = hc
                hc += cs
            # Subcluster-aligned window around the write; COW only its partial edges. A
            # compressed cluster has no subclusters: all of it is rewritten.
            compressed = bool(old & C.QCOW_OFLAG_COMPRESSED)
            lo = base if compressed else base + ((pos - base) // scs) * scs
            hi = base + cs if compressed else base + -(-(pos + n - base) // scs) * scs
            hi = min(hi, max(self.virtual_size, pos + n))
            buf = bytearray(hi - lo)
            bv = memoryview(buf)
            if pos > lo:
                self._read_layer(lo, bv[:pos - lo])
            if pos + n < hi:
                self._read_layer(pos + n, bv[pos + n - lo:])
            bv[pos - lo:pos - lo + n] = view[pos - offset:pos - offset + n]
            # An allocated cluster without COPIED is shared (a snapshot holds it): its
            # subclusters outside the window keep their data, so the whole cluster is copied.
            shared = not (reuse or compressed or self.has_data_file) and bool(
                old & C.L2E_OFFSET_MASK)
            if shared:
                whole = bytearray(cs)
                got = self.data_store.pread(old & C.L2E_OFFSET_MASK, cs)
                whole[:len(got)] = got
                whole[lo - base:hi - base] = bv
                self._write_data(target, memoryview(whole))
            else:
                self._write_data(target + (lo - base), bv)
            if not self.has_data_file:
                self._ensure_file_covers(target + cs)
            new_bitmap = bitmap
            first = (lo - base) // scs
            last = (hi - 1 - base) // scs
            bits = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
            if not reuse and not shared:
                # A previously unallocated cluster: its other subclusters keep their state
                # (zero bits stay zero, unallocated stays unallocated -> backing).
                new_bitmap = 0 if compressed else bitmap & ~C.QCOW_L2_BITMAP_ALL_ALLOC
            new_bitmap = (new_bitmap | bits) & ~(bits << 32)
            table[2 * idx] = target | C.QCOW_OFLAG_COPIED
            table[2 * idx + 1] = new_bitmap
            if not reuse:
                self._release_entry(old)
            pos += n

    def _ensure_data_file_covers(self, end: int) -> None:
        if self.data_store.size() < end:
            self.data_store.truncate(end)

    def _release_entry(self, old: int) -> None:
        """Drop the reference an overwritten L2 entry held (after the L2 update is durable)."""
        if self.has_data_file:
            return
        if old & C.QCOW_OFLAG_COMPRESSED:
            # The clusters spanned by the sector-rounded compressed data, as QEMU frees them.
            coff, csize = self.compressed_layout.decode(old)
            self.refcounts.queue_decrease(coff, csize)
            return
        off = old & C.L2E_OFFSET_MASK
        if off:
            self.refcounts.queue_decrease(off, self.cluster_size)

    # ------------------------------------------------------------------ zero / discard
    def _write_zeroes_impl(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make [offset, +length) read as zeros, with metadata where QEMU would (spec §1.11)."""
        self._check_range(offset, length)
        if not length:
            return
        self._zlib_cache_key = None
        scs = self.subcluster_size
        end = offset + length
        head_end = min(end, -(-offset // scs) * scs)
        tail_start = max(head_end, end // scs * scs)
        if end == self.virtual_size:
            tail_start = end  # the partial subcluster at the image end counts as whole
        for lo, hi in ((offset, head_end), (tail_start, end)):
            if lo < hi and not self._zero_partial(lo, hi, unmap):
                self.write(lo, bytes(hi - lo))
        if head_end < tail_start and not self._zeroize(head_end, tail_start, unmap):
            pos = head_end
            while pos < tail_start:  # v2 with a backing file: real zeros
                n = min(tail_start - pos, 1 << 22)
                self.write(pos, bytes(n))
                pos += n
        self._maybe_flush()

    def _zero_partial(self, lo: int, hi: int, unmap: bool) -> bool:
        """A piece inside one subcluster: zeroize the whole subcluster if the rest of it
        already reads as zero and it holds no data (QEMU's rule); else the caller writes."""
        scs = self.subcluster_size
        s_lo = lo // scs * scs
        s_hi = min(s_lo + scs, self.virtual_size)
        if not (self._reads_zero(s_lo, lo) and self._reads_zero(hi, s_hi)):
            return False
        kinds = {k for _, _, k, _ in self._map_runs(s_lo, s_hi - s_lo)}
        if not kinds <= {0, 1, 2, 3}:  # UNALLOCATED_* and ZERO_* only
            return False
        return self._zeroize(s_lo, s_hi, unmap)

    def _reads_zero(self, lo: int, hi: int) -> bool:
        if lo >= hi:
            return True
        return all(e.zero for e in self.extents(lo, hi - lo))

    def _zeroize(self, lo: int, hi: int, unmap: bool) -> bool:
        """qcow2_subcluster_zeroize for a subcluster-aligned range. False: not possible."""
        if self.data_file_raw:
            # The raw data file must read like the guest: zero it as well.
            pos = lo
            while pos < hi:
                n = min(hi - pos, 1 << 22)
                self.data_store.pwrite(pos, bytes(n))
                pos += n
            self._data_dirty = True
        if self.header.version < 3:
            if self.backing is not None:
                return False
            self._discard_clusters(lo, hi, full=True)
            return True
        cb = self.cluster_bits
        cs = self.cluster_size
        c_lo = -(-lo // cs) * cs
        c_hi = hi if hi == self.virtual_size else hi // cs * cs
        c_hi = max(c_lo, c_hi)
        if lo < min(c_lo, hi):
            self._zero_subclusters(lo, min(c_lo, hi))
        pos = c_lo
        while pos < c_hi:
            span = 1 << (cb + self.l2_bits)
            chunk_end = min(c_hi, (pos // span + 1) * span)
            self._zero_clusters(pos, chunk_end, unmap)
            pos = chunk_end
        if max(c_hi, c_lo) < hi:
            self._zero_subclusters(max(c_hi, c_lo), hi)
        return True

    def _zero_clusters(self, lo: int, hi: int, unmap: bool) -> None:
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        l2_off, table = self._l2_for_write(lo >> (cb + self.l2_bits))
        for cl in range(lo >> cb, ((hi - 1) >> cb) + 1):
            idx = cl & mask
            if self.extended_l2:
                old, old_bm = table[2 * idx], table[2 * idx + 1]
            else:
                old, old_bm = table[idx], 0
            allocated = bool(old & C.QCOW_OFLAG_COMPRESSED or old & C.L2E_OFFSET_MASK or
                             (self.has_data_file and old & C.QCOW_OFLAG_COPIED))
            drop = bool(old & C.QCOW_OFLAG_COMPRESSED) or (unmap and allocated)
            new = 0 if drop else old
            if self.extended_l2:
                new_bm = C.QCOW_L2_BITMAP_ALL_ZEROES
                if new == old and new_bm == old_bm:
                    continue
                table[2 * idx], table[2 * idx + 1] = new, new_bm
            else:
                new |= C.QCOW_OFLAG_ZERO
                if new == old:
                    continue
                table[idx] = new
            self._dirty_l2[l2_off] = table
            if drop:
                self._release_entry(old)

    def _zero_subclusters(self, lo: int, hi: int) -> None:
        cb = self.cluster_bits
        l2_off, table = self._l2_for_write(lo >> (cb + self.l2_bits))
        idx = (lo >> cb) & (self.l2_entries - 1)
        e = table[2 * idx]
        if e & C.QCOW_OFLAG_COMPRESSED:
            # A compressed cluster cannot hold zero subclusters: rewrite it with real zeros.
            self.write(lo, bytes(hi - lo))
            return
        base = (lo >> cb) << cb
        first = (lo - base) >> self.subcluster_bits
        last = (hi - 1 - base) >> self.subcluster_bits
        bits = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
        bm = (table[2 * idx + 1] | (bits << 32)) & ~bits
        if bm != table[2 * idx + 1]:
            table[2 * idx + 1] = bm
            self._dirty_l2[l2_off] = table

    def _discard_impl(self, offset: int, length: int) -> None:
        """Drop whole clusters (partial ones are ignored, as QEMU does); v3 makes them read
        as zero when they held data or a backing file exists, v2 only without backing."""
        self._check_range(offset, length)
        if not length:
            return
        cs = self.cluster_size
        lo = -(-offset // cs) * cs
        end = offset + length
        hi = end if end == self.virtual_size else end // cs * cs
        if lo >= hi:
            return
        if self.header.version < 3 and self.backing is not None:
            return
        self._zlib_cache_key = None
        self._discard_clusters(lo, hi, full=False)
        self._maybe_flush()

    def _discard_clusters(self, lo: int, hi: int, full: bool) -> None:
        cb = self.cluster_bits
        span = 1 << (cb + self.l2_bits)
        pos = lo
        while pos < hi:
            chunk_end = min(hi, (pos // span + 1) * span)
            # Even where there is no L2 table (nothing to drop), QEMU's discard_in_l2_slice()
            # gets one through get_cluster_table(), which allocates it: so do we, for the
            # same file layout.
            self._discard_in_table(pos, chunk_end, full)
            pos = chunk_end

    def _discard_in_table(self, lo: int, hi: int, full: bool) -> None:
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        l2_off, table = self._l2_for_write(lo >> (cb + self.l2_bits))
        v3 = self.header.version >= 3
        for cl in range(lo >> cb, ((hi - 1) >> cb) + 1):
            idx = cl & mask
            if self.extended_l2:
                old, old_bm = table[2 * idx], table[2 * idx + 1]
            else:
                old, old_bm = table[idx], 0
            allocated = bool(old & C.QCOW_OFLAG_COMPRESSED or old & C.L2E_OFFSET_MASK or
                             (self.has_data_file and old & C.QCOW_OFLAG_COPIED))
            new, new_bm = old, old_bm
            if full:
                new = new_bm = 0
            elif self.backing is not None or allocated:
                if self.extended_l2:
                    new, new_bm = 0, C.QCOW_L2_BITMAP_ALL_ZEROES
                else:
                    new = C.QCOW_OFLAG_ZERO if v3 else 0
            if new == old and new_bm == old_bm:
                continue
            if self.extended_l2:
                table[2 * idx], table[2 * idx + 1] = new, new_bm
            else:
                table[idx] = new
            self._dirty_l2[l2_off] = table
            self._release_entry(old)

    # ------------------------------------------------------------------ resize
    def _resize_impl(self, new_size: int) -> None:
        """Grow or shrink the virtual disk (qcow2_co_truncate, exact L1 size).

        Growing over a longer backing file zeroes the new area so the backing data does not
        show through. Shrinking drops every cluster past the end, the L2 tables past the new
        L1 size, and the file tail no cluster uses any more.
        """
        if new_size < 0 or new_size % 512:
            raise OutOfRangeError("The new size must be a multiple of 512")
        if self.header.version < 3 and self.snapshots:
            raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots")
        old = self.virtual_size
        if new_size == old:
            return
        h = self.header
        new_l1 = l1_entries_for(new_size, h.cluster_bits, self.l2_bits)
        if new_l1 > C.QCOW_MAX_L1_SIZE // 8:
            raise ImageLimitError("The image size is too large for file format 'qcow2' "
                                  "(try using a larger cluster size)")
        self.flush()
        self._zlib_cache_key = None
        cs = self.cluster_size
        if new_size < old:
            # Deliberately unlike QEMU 7.2: the rest of a partial last cluster is zeroed, so
            # growing the image again cannot bring "deleted" data back.
            tail_end = min(old, -(-new_size // cs) * cs)
            if tail_end > new_size:
                self._write_zeroes_impl(new_size, tail_end - new_size, False)
            self._discard_clusters(-(-new_size // cs) * cs, old, full=True)
            self.flush()
            self._shrink_l1(new_l1)
            self.refcounts.shrink_table()
            self._meta_clusters = None
            if self.has_data_file and self.data_store.size() > new_size:
                # QEMU truncates an external data file with the image
                self.data_store.truncate(new_size)
                self.data_store.flush()
            self._write_size(new_size)
            self._truncate_file_tail()
            return
        if new_l1 > self.l1_size:
            self._grow_l1(new_l1)
        self._write_size(new_size)
        if self.has_data_file and self.data_store.size() < new_size:
            self.data_store.truncate(new_size)
            self._data_dirty = True
        if self.data_file_raw:
            self._map_raw_data_file(old, new_size)
        if self.backing is not None and self.backing.virtual_size > old:
            zero_start = -(-old // self.subcluster_size) * self.subcluster_size
            if zero_start > old:
                self.write(old, bytes(min(zero_start, new_size) - old))
            if new_size > zero_start and not self._zeroize(zero_start, new_size, False):
                pos = zero_start
                while pos < new_size:
                    n = min(new_size - pos, 1 << 22)
                    self.write(pos, bytes(n))
                    pos += n
            self.flush()

    def _map_raw_data_file(self, start: int, end: int) -> None:
        """A data-file-raw image that grows maps the new clusters to themselves in the data
        file, which grows to the new size, as QEMU does (it preallocates their metadata): the
        raw file must stay the guest's view and every cluster of it stays allocated."""
        cs, cb = self.cluster_size, self.cluster_bits
        span = 1 << (cb + self.l2_bits)
        scs = self.subcluster_size
        pos = -(-start // cs) * cs
        data_end = -(-end // scs) * scs
        if self.data_store.size() < data_end:
            self.data_store.truncate(data_end)
            self._data_dirty = True
        while pos < end:
            chunk_end = min(end, (pos // span + 1) * span)
            l2_off, table = self._l2_for_write(pos >> (cb + self.l2_bits))
            for cl in range(pos >> cb, ((chunk_end - 1) >> cb) + 1):
                idx = cl & (self.l2_entries - 1)
                entry = (cl << cb) | C.QCOW_OFLAG_COPIED
                if self.extended_l2:
                    if table[2 * idx] or table[2 * idx + 1]:
                        continue
                    # mapped, its subclusters unallocated (QEMU's preallocation)
                    table[2 * idx] = entry
                elif not table[idx]:
                    table[idx] = entry
            self._dirty_l2[l2_off] = table
            pos = chunk_end
        self.flush()

    def _write_size(self, new_size: int) -> None:
        self.store.pwrite(24, struct.pack(">Q", new_size))
        self.store.flush()
        self.header.size = new_size
        self.virtual_size = new_size

    def _grow_l1(self, new_l1: int) -> None:
        """A new, larger L1 table: written, then the header points to it, then the old is freed."""
        h = self.header
        nbytes = new_l1 * 8
        new_off = self.refcounts.alloc_clusters(-(-nbytes // self.cluster_size))
        self.refcounts.flush_blocks()
        table = array("Q", self.l1_table)
        table.extend([0] * (new_l1 - len(table)))
        raw = array("Q", table)
        if byteorder == "little":
            raw.byteswap()
        # QEMU writes exactly the table's bytes, so the file may end mid-cluster.
        self.store.pwrite(new_off, raw.tobytes())
        self.store.flush()
        self.store.pwrite(36, struct.pack(">IQ", new_l1, new_off))
        self.store.flush()
        old_off, old_size = h.l1_table_offset, self.l1_size
        h.l1_table_offset, h.l1_size = new_off, new_l1
        self.l1_table, self.l1_size = table, new_l1
        self._meta_clusters = None
        if old_off and old_size:
            self.refcounts.queue_decrease(old_off, old_size * 8)
            self.refcounts.apply_decreases()
            self.refcounts.flush_blocks()

    def _shrink_l1(self, new_l1: int) -> None:
        """Clear L1 entries past `new_l1` on disk first, then free their L2 tables."""
        h = self.header
        if new_l1 >= self.l1_size:
            return
        self.store.pwrite(h.l1_table_offset + new_l1 * 8, bytes((self.l1_size - new_l1) * 8))
        self.store.flush()
        for i in range(new_l1, self.l1_size):
            off = self.l1_table[i] & C.L1E_OFFSET_MASK
            self.l1_table[i] = 0
            if off:
                self.refcounts.queue_decrease(off, self.cluster_size)
        self.refcounts.apply_decreases()
        self.refcounts.flush_blocks()
        self.l2_cache.clear()
        self._meta_clusters = None

    def _truncate_file_tail(self) -> None:
        last = self.refcounts.highest_allocated_cluster()
        end = (last + 1) * self.cluster_size
        if end < self.store.size():
            self.store.truncate(end)

    # ------------------------------------------------------------------ flush
    def _maybe_flush(self) -> None:
        if len(self._dirty_l2) > MAX_DIRTY_L2:
            self.flush()

    def flush(self) -> None:
        """Make everything written so far durable, in crash-safe order."""
        if self._data_dirty:
            self.data_store.flush()
            self._data_dirty = False
        self.refcounts.flush_blocks()
        if self._dirty_l2:
            for off in sorted(self._dirty_l2):
                t = self._dirty_l2[off]
                raw = array("Q", t)
                if byteorder == "little":
                    raw.byteswap()
                self.store.pwrite(off, raw.tobytes())
            self._dirty_l2.clear()
            self.store.flush()
        if self._dirty_l1:
            for i in sorted(self._dirty_l1):
                self.store.pwrite(self.header.l1_table_offset + 8 * i,
                                  struct.pack(">Q", self.l1_table[i]))
            self._dirty_l1.clear()
            self.store.flush()
        if self.refcounts.has_pending_decreases:
            freed = self.refcounts.apply_decreases()
            self.refcounts.flush_blocks()
            # Only now, with the drop durable, can the space go back to the file system.
            # A freed cluster may end past the end of the file (the last compressed
            # cluster's host cluster): QEMU discards it anyway, punching what exists.
            size = self.store.size()
            for off, length in freed:
                if off < size:
                    self.store.punch_hole(off, min(length, size - off))

    def close(self) -> None:
        if not self._closed:
            try:
                if not self.corrupt:
                    self.flush()
                    if self.dirty:
                        # Clean close of a lazy-refcount image: everything is flushed, so
                        # the refcounts are exact again.
                        self.header.incompatible_features &= ~C.QCOW2_INCOMPAT_DIRTY
                        self.store.pwrite(72, struct.pack(">Q",
                                                          self.header.incompatible_features))
                        self.store.flush()
                        self.dirty = False
            finally:
                super().close()


_ZEROS = bytes(1 << 16)


def _zeros(n: int) -> bytes:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)


def _is_zero_alloc_copied(e: int) -> bool:
    return bool(e & C.QCOW_OFLAG_ZERO and e & C.QCOW_OFLAG_COPIED and e & C.L2E_OFFSET_MASK
                and not e & C.QCOW_OFLAG_COMPRESSED)
