"""Refcounts of a writable qcow2 image: the refcount table and blocks, the cluster allocator,
self-describing refcount blocks and refcount table growth.

Ordering (spec §6.1): a refcount *increase* must be on disk before any L2 entry that uses
the cluster, and a *decrease* only after the L2 update that dropped the reference. So
increases are applied to cached blocks at once and written by `flush()`, which the image
calls before writing L2 tables; decreases are queued and applied by `apply_decreases()`
after the L2 tables are durable. A crash between the two leaves only leaks.
"""

from __future__ import annotations

import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable
from sys import byteorder

from ..errors import CorruptImageError, ImageLimitError, c_hex
from ..format import constants as C
from ..format.refcount import get_refcount, refcount_metadata_size, set_refcount
from ..io import ByteStore

DEFAULT_CACHE_BLOCKS = 64
_ARRAY_CODE = {1: "B", 2: "H", 4: "I", 8: "Q"}


class RefcountOverflowError(ImageLimitError):
    """A refcount would exceed the maximum of its width."""


class Refcounts:
    """Reads and updates refcounts; allocates clusters first-fit like QEMU."""

    def __init__(self, store: ByteStore, cluster_bits: int, refcount_order: int,
                 table_offset: int, table_clusters: int,
                 set_header_reftable: Callable[[int, int], None],
                 cache_blocks: int = DEFAULT_CACHE_BLOCKS) -> None:
        self.store = store
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.refcount_max = (1 << (1 << refcount_order)) - 1
        self.block_bits = cluster_bits + 3 - refcount_order
        self.per_block = 1 << self.block_bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self._set_header_reftable = set_header_reftable
        raw = store.pread(table_offset, table_clusters * self.cluster_size)
        self.table = array("Q")
        self.table.frombytes(raw)
        if byteorder == "little":
            self.table.byteswap()
        for i, e in enumerate(self.table):
            if e & C.REFT_RESERVED_MASK or (e & (self.cluster_size - 1)):
                raise CorruptImageError(
                    f"Refblock offset {c_hex(e & C.REFT_OFFSET_MASK)} unaligned "
                    f"(reftable index: {c_hex(i)})", offset=e)
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._capacity = max(4, cache_blocks)
        self.free_cluster_index = 0
        self._pending_decreases: list[tuple[int, int]] = []
        # told of every new refblock (the writer's metadata overlap set)
        self.on_new_block: Callable[[int], None] | None = None
        # asked before a new refblock or table is written (the writer's metadata overlap check)
        self.overlap_check: Callable[[int, int], None] | None = None

    # ------------------------------------------------------------------ blocks
    def _load(self, block_offset: int) -> bytearray:
        blk = self._blocks.get(block_offset)
        if blk is not None:
            self._blocks.move_to_end(block_offset)
            return blk
        blk = bytearray(self.store.pread(block_offset, self.cluster_size))
        self._insert(block_offset, blk)
        return blk

    def _insert(self, block_offset: int, blk: bytearray) -> None:
        self._blocks[block_offset] = blk
        while len(self._blocks) > self._capacity:
            victim, vblk = next(iter(self._blocks.items()))
            if victim in self._dirty:
                # Evicting a dirty block is a write-back: keep it durable-ordered by syncing.
                self.store.pwrite(victim, vblk)
                self.store.flush()
                self._dirty.discard(victim)
            del self._blocks[victim]

    def _block_offset(self, rt_index: int) -> int:
        if rt_index >= len(self.table):
            return 0
        return self.table[rt_index] & C.REFT_OFFSET_MASK

    def get(self, cluster_index: int) -> int:
        off = self._block_offset(cluster_index >> self.block_bits)
        if not off:
            return 0
        return get_refcount(self._load(off), cluster_index & (self.per_block - 1),
                            self.refcount_order)

    # ------------------------------------------------------------------ allocation
    def _find_free(self, n: int) -> int:
        """First run of n clusters with refcount 0, from the lowest freed index (noref)."""
        start = self.free_cluster_index
        while True:
            run = 0
            i = start
            while run < n:
                if self.get(i + run):
                    start = i + run + 1
                    break
                run += 1
            else:
                break
        if (start + n) << self.cluster_bits > C.QCOW_MAX_CLUSTER_OFFSET:
            raise ImageLimitError("Cannot allocate clusters: image would exceed 2^56 bytes")
        return start

    def alloc_clusters(self, n: int) -> int:
        """Allocate n contiguous clusters (refcount 1); returns the host offset."""
        while True:
            start = self._find_free(n)
            # QEMU moves its free-cluster index past the run before updating its refcounts,
            # so a refblock the update needs lands after the run, not in front of it.
            self.free_cluster_index = start + n
            if self._ensure_blocks(start, n):
                # metadata took space: search again, as QEMU's -EAGAIN, from the run's start
                self.free_cluster_index = min(self.free_cluster_index, start)
                continue
            self._update_range(start, n, 1)
            return start << self.cluster_bits

    def alloc_clusters_at(self, host_offset: int, n: int) -> int:
        """qcow2_alloc_clusters_at(): allocate the free clusters that start exactly at
        `host_offset` (at most n); returns how many (0: the first one is in use).

        Unlike alloc_clusters(), the free-cluster index does not move past the run first: as
        in QEMU's update_refcount(), the clusters before a missing refblock are counted
        before that refblock is placed (so it lands after them, often inside the run), then
        the update is undone (-EAGAIN) and the free clusters are counted again.
        """
        first = host_offset >> self.cluster_bits
        while True:
            k = 0
            while k < n and not self.get(first + k):
                k += 1
            if not k:
                return 0
            missing = next((ci for ci in range(first, first + k, 1)
                            if (ci == first or not ci & (self.per_block - 1))
                            and not self._block_offset(ci >> self.block_bits)), None)
            if missing is None:
                self._update_range(first, k, 1)
                return k
            if missing > first:
                self._update_range(first, missing - first, 1)
            self._create_block(missing >> self.block_bits)
            self.free_cluster_index = min(self.free_cluster_index, first)
            if missing > first:
                self._update_range(first, missing - first, -1)

    def _ensure_blocks(self, start: int, n: int) -> bool:
        """Create missing refblocks covering clusters [start, start+n). True if any was made."""
        made = False
        first = start >> self.block_bits
        last = (start + n - 1) >> self.block_bits
        for rt in range(first, last + 1):
            if not self._block_offset(rt):
                self._create_block(rt)
                made = True
        return made

    def _create_block(self, rt_index: int) -> None:
        """alloc_refcount_block(): the block is placed first (describing itself if it can);
        a refcount table too small for it then grows around it (QEMU's order, which decides
        where the block and the new table land)."""
        new = self._find_free(1)
        # alloc_clusters_noref() leaves the free-cluster index after the block
        self.free_cluster_index = new + 1
        blk = bytearray(self.cluster_size)
        if new >> self.block_bits == rt_index:
            # The block describes itself.
            set_refcount(blk, new & (self.per_block - 1), self.refcount_order, 1)
        else:
            self._ensure_blocks(new, 1)
            if self.get(new):  # a recursive allocation took the cluster: pick again
                self._create_block(rt_index)
                return
            self._update_range(new, 1, 1)
            self.flush_blocks()
        block_offset = new << self.cluster_bits
        if self.overlap_check is not None:
            self.overlap_check(block_offset, self.cluster_size)
        # The block reaches disk before the table entry that points to it.
        self.store.pwrite(block_offset, blk)
        self.store.flush()
        self._insert(block_offset, blk)
        if self.on_new_block is not None:
            self.on_new_block(block_offset)
        if rt_index >= len(self.table):
            self._grow_table(rt_index, block_offset)
            return
        self.store.pwrite(self.table_offset + rt_index * 8, struct.pack(">Q", block_offset))
        self.store.flush()
        self.table[rt_index] = block_offset

    def _grow_table(self, needed_index: int, new_block_offset: int = 0) -> None:
        """Place new self-describing refblocks and a larger table past the covered area."""
        cs = self.cluster_size
        blocks_used = max(needed_index + 1, len(self.table),
                          -(-((new_block_offset >> self.cluster_bits) + 1) // self.per_block))
        start = blocks_used * self.per_block  # first cluster no existing refblock covers
        _, total_blocks = refcount_metadata_size(start, cs, self.refcount_order, True)
        total_blocks = max(total_blocks, needed_index + 1)
        table_size = total_blocks + -(-total_blocks // 2)
        per_cluster = cs // 8
        table_size = -(-table_size // per_cluster) * per_cluster
        if table_size * 8 > C.QCOW_MAX_REFTABLE_SIZE:
            raise ImageLimitError("Reference count table would exceed its 8 MiB limit")
        table_clusters = table_size // per_cluster
        new_table = array("Q", self.table)
        new_table.extend([0] * (table_size - len(new_table)))
        if new_block_offset:
            new_table[needed_index] = new_block_offset
        area_index = start >> self.block_bits
        new_blocks = [i for i in range(area_index, total_blocks) if not new_table[i]]
        table_start = start + len(new_blocks)
        end = table_start + table_clusters
        if (end - 1) >> self.block_bits >= total_blocks:
            # refcount_metadata_size() guarantees the area covers itself.
            raise RuntimeError("refcount area does not cover itself")
        if self.overlap_check is not None:
            self.overlap_check(start << self.cluster_bits, (end - start) << self.cluster_bits)
        for k, i in enumerate(new_blocks):
            new_table[i] = (start + k) << self.cluster_bits
        for i in range(area_index, total_blocks):
            boff = new_table[i] & C.REFT_OFFSET_MASK
            blk = bytearray(cs) if i in new_blocks else self._load(boff)
            first_covered = i << self.block_bits
            lo = max(start, first_covered)
            hi = min(end, first_covered + self.per_block)
            for ci in range(lo, hi):
                set_refcount(blk, ci - first_covered, self.refcount_order, 1)
            self._insert(boff, blk)
            self._dirty.add(boff)
        self.flush_blocks()
        raw = array("Q", new_table)
        if byteorder == "little":
            raw.byteswap()
        new_offset = table_start << self.cluster_bits
        self.store.pwrite(new_offset, raw.tobytes())
        self.store.flush()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self._set_header_reftable(new_offset, table_clusters)
        self.store.flush()
        self.table = new_table
        self.table_offset = new_offset
        self.table_clusters = table_clusters
        self._update_range(old_offset >> self.cluster_bits, old_clusters, -1)
        self.free_cluster_index = min(self.free_cluster_index, old_offset >> self.cluster_bits)

    # ------------------------------------------------------------------ updates
    def _update_range(self, start: int, n: int, addend: int) -> None:
        """Add `addend` to the refcounts of clusters [start, start+n), one block at a time.

        Byte-wide and wider entries are updated as a whole slice (decode, add, check, encode):
        allocating a long run costs a few array operations, not a Python step per cluster.
        """
        order = self.refcount_order
        end = start + n
        ci = start
        while ci < end:
            rt = ci >> self.block_bits
            off = self._block_offset(rt)
            if not off:
                raise CorruptImageError(f"No refcount block for cluster {c_hex(ci)}")
            blk = self._load(off)
            first = ci & (self.per_block - 1)
            count = min(end - ci, self.per_block - first)
            if order >= 3:
                width = 1 << (order - 3)
                vals = array(_ARRAY_CODE[width])
                vals.frombytes(bytes(blk[first * width:(first + count) * width]))
                if width > 1 and byteorder == "little":
                    vals.byteswap()
                lo, hi = min(vals), max(vals)
                if lo + addend < 0:
                    bad = ci + vals.index(lo)
                    raise CorruptImageError(
                        f"Refcount of cluster {c_hex(bad)} would drop below zero", offset=bad)
                if hi + addend > self.refcount_max:
                    bad = ci + vals.index(hi)
                    raise RefcountOverflowError(
                        f"Refcount of cluster {c_hex(bad)} would exceed {self.refcount_max}")
                if addend == 1 and hi == 0:  # fresh allocation: the common case
                    new_vals = array(vals.typecode, [1]) * count
                else:
                    new_vals = array(vals.typecode, [v + addend for v in vals])
                zero_at = new_vals.index(0) if addend < 0 and 0 in new_vals else -1
                if width > 1 and byteorder == "little":
                    new_vals.byteswap()
                blk[first * width:(first + count) * width] = new_vals.tobytes()
                if zero_at >= 0 and ci + zero_at < self.free_cluster_index:
                    self.free_cluster_index = ci + zero_at
            else:
                for k in range(count):
                    idx = first + k
                    cur = get_refcount(blk, idx, order)
                    new = cur + addend
                    if new < 0:
                        raise CorruptImageError(
                            f"Refcount of cluster {c_hex(ci + k)} would drop below zero",
                            offset=ci + k)
                    if new > self.refcount_max:
                        raise RefcountOverflowError(
                            f"Refcount of cluster {c_hex(ci + k)} would exceed "
                            f"{self.refcount_max}")
                    set_refcount(blk, idx, order, new)
                    if new == 0 and ci + k < self.free_cluster_index:
                        self.free_cluster_index = ci + k
            self._dirty.add(off)
            ci += count

    def increase(self, host_offset: int, length: int, addend: int = 1) -> None:
        """Raise refcounts of the clusters spanned by [host_offset, +length)."""
        first = host_offset >> self.cluster_bits
        last = (host_offset + length - 1) >> self.cluster_bits
        while self._ensure_blocks(first, last - first + 1):
            # update_refcount()'s -EAGAIN: the free-cluster search restarts at the range
            self.free_cluster_index = min(self.free_cluster_index, first)
        self._update_range(first, last - first + 1, addend)

    def queue_decrease(self, host_offset: int, length: int) -> None:
        """Drop one reference from the clusters spanned, once the L2 update is durable."""
        self._pending_decreases.append((host_offset, length))

    def apply_decreases(self) -> list[tuple[int, int]]:
        """Apply the queued decreases; returns the host ranges that became free."""
        pending, self._pending_decreases = self._pending_decreases, []
        freed: list[tuple[int, int]] = []
        cs = self.cluster_size
        for off, length in pending:
            first = off >> self.cluster_bits
            last = (off + length - 1) >> self.cluster_bits
            self._update_range(first, last - first + 1, -1)
            for ci in range(first, last + 1):
                if not self.get(ci):
                    if freed and freed[-1][0] + freed[-1][1] == ci * cs:
                        freed[-1] = (freed[-1][0], freed[-1][1] + cs)
                    else:
                        freed.append((ci * cs, cs))
        return freed

    def flush_blocks(self) -> None:
        """Write every dirty refblock, then make them durable."""
        if not self._dirty:
            return
        for off in sorted(self._dirty):
            blk = self._blocks.get(off)
            if blk is not None:
                self.store.pwrite(off, blk)
        self._dirty.clear()
        self.store.flush()

    def shrink_table(self) -> None:
        """qcow2_shrink_reftable(): refblocks that count nothing but themselves leave the
        table (written durably first), then their own cluster is freed. A freed refblock is
        dropped from the cache so that nothing writes it back past a truncated end."""
        cb = self.cluster_bits
        order = self.refcount_order
        new = array("Q", self.table)
        for i, e in enumerate(self.table):
            off = e & C.REFT_OFFSET_MASK
            if not off:
                continue
            blk = self._load(off)
            own = off >> cb
            if own >> self.block_bits == i:
                idx = own & (self.per_block - 1)
                saved = get_refcount(blk, idx, order)
                set_refcount(blk, idx, order, 0)
                unused = blk.count(0) == len(blk)
                set_refcount(blk, idx, order, saved)
            else:
                unused = blk.count(0) == len(blk)
            if unused:
                new[i] = 0
        if new == self.table:
            return
        raw = array("Q", new)
        if byteorder == "little":
            raw.byteswap()
        self.store.pwrite(self.table_offset, raw.tobytes())
        self.store.flush()
        for i, e in enumerate(self.table):
            off = e & C.REFT_OFFSET_MASK
            if off and not new[i]:
                self._update_range(off >> cb, 1, -1)
                self.table[i] = 0
                if not self.get(off >> cb):
                    self._blocks.pop(off, None)
                    self._dirty.discard(off)
        self.flush_blocks()

    @property
    def has_pending_decreases(self) -> bool:
        return bool(self._pending_decreases)

    def highest_allocated_cluster(self) -> int:
        """Index of the last cluster with a non-zero refcount (-1 if none)."""
        for rt in range(len(self.table) - 1, -1, -1):
            off = self._block_offset(rt)
            if not off:
                continue
            blk = self._load(off)
            for idx in range(self.per_block - 1, -1, -1):
                if get_refcount(blk, idx, self.refcount_order):
                    return (rt << self.block_bits) + idx
        return -1
