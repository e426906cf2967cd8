"""Consistency check and repair of a qcow2 image's metadata, as `qemu-img check` (QEMU 7.2).

This module owns one check pass (QEMU's `bdrv_check` on a qcow2 node): the snapshot table
check, the in-memory refcount table (IMRT) built from every reference the metadata makes
(header, active and snapshot L1/L2 tables, data and compressed clusters, snapshot table,
refcount table and blocks, bitmap directory, tables and data), its comparison with the
refcounts stored on disk, the COPIED flag check, and the repairs QEMU makes with
`-r leaks` / `-r all` (refcount fixes, COPIED fixes, zeroing unaligned preallocated entries,
growing the file for a refblock past EOF, rebuilding the whole refcount structure, clearing
the dirty and corrupt bits). Counters, classification and diagnostic lines follow QEMU's
`qcow2_check_refcounts()` and friends; `ops/check.py` runs the passes the way `qemu-img check`
does (a second, read-only pass after a repair).

Whole-table work uses numpy (imported lazily): an L2 table without anything to report is
classified and counted with a few vector operations, and only tables with an anomaly are
walked entry by entry, so that diagnostics come out in QEMU's order.

Crash safety of repairs: refcount increases and the new refcount structure are made durable
before anything points at them (the header switch to a rebuilt structure comes after a
flush), decreases only drop references nothing uses, and the dirty/corrupt bits are cleared
last, after everything else is durable. A repair never changes what the guest reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ..errors import ImageLimitError, Qcow2Error
from ..format import constants as C
from ..format.header import Header

if TYPE_CHECKING:
    from ..format.snapshot import SnapshotEntry
    from ..io import ByteStore
    from .refcount import Refcounts

Repair = Literal["leaks", "all"] | None

FIX_LEAKS = 1
FIX_ERRORS = 2
INT_MAX = (1 << 31) - 1
# References of L2 tables remembered for their next visit (8 bytes each): 32 MiB at most.
_L2_REFS_CACHE_MAX = 4 << 20
# The largest offset + length the block layer accepts (BDRV_MAX_LENGTH): INT64_MAX aligned
# down to BDRV_MAX_ALIGNMENT (1 GiB).
BDRV_MAX_LENGTH = C.INT64_MAX & ~((1 << 30) - 1)

# Bitmap limits and masks (block/qcow2-bitmap.c).
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MAX_GRANULARITY_BITS = 31
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_NAME_SIZE = 1023
BME_RESERVED_FLAGS = 0xFFFFFFFC
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * C.QCOW_MAX_SNAPSHOTS

_COMP = C.QCOW_OFLAG_COMPRESSED
_COPIED = C.QCOW_OFLAG_COPIED
_ZERO = C.QCOW_OFLAG_ZERO
_OFFMASK = C.L2E_OFFSET_MASK
_ALL_ALLOC = C.QCOW_L2_BITMAP_ALL_ALLOC

# How many pending references (fast-path L2 tables) are folded into the IMRT at once.
_PENDING_FLUSH = 1 << 20


def c_x(value: int) -> str:
    """C's `%#x` (zero prints as `0`)."""
    return f"{value:#x}" if value else "0"


class Diagnostic(NamedTuple):
    """One line QEMU prints on stderr during a check.

    `reported` lines go through QEMU's error_report() and carry the program-name prefix
    ("qemu-img: "); the others are plain fprintf lines.
    """

    text: str
    reported: bool = False

    def __str__(self) -> str:
        return self.text


@dataclass(slots=True)
class CheckResult:
    """The counters of `qemu-img check --output=json` and the diagnostics of one check.

    `failure` is set when the check could not complete (QEMU's "Check failed: <reason>");
    the counters are then partial and qemu-img prints none of them.
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[Diagnostic] = field(default_factory=list)
    failure: str | None = None

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors or self.failure)

    def to_qapi(self) -> dict[str, Any]:
        """The ImageCheck QAPI object: optional counters only when non-zero, in QAPI order."""
        out: dict[str, Any] = {"filename": self.filename, "format": self.format,
                               "check-errors": self.check_errors}
        for key, val in (("image-end-offset", self.image_end_offset),
                         ("corruptions", self.corruptions), ("leaks", self.leaks),
                         ("corruptions-fixed", self.corruptions_fixed),
                         ("leaks-fixed", self.leaks_fixed),
                         ("total-clusters", self.total_clusters),
                         ("allocated-clusters", self.allocated_clusters),
                         ("fragmented-clusters", self.fragmented_clusters),
                         ("compressed-clusters", self.compressed_clusters)):
            if val:
                out[key] = val
        return out


@dataclass(slots=True)
class _Res:
    """BdrvCheckResult: the counters one check function adds to."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def copy(self) -> _Res:
        return _Res(self.corruptions, self.leaks, self.check_errors, self.corruptions_fixed,
                    self.leaks_fixed, self.image_end_offset, self.total_clusters,
                    self.allocated_clusters, self.fragmented_clusters, self.compressed_clusters)

    def assign(self, other: _Res) -> None:
        for name in _Res.__slots__:
            setattr(self, name, getattr(other, name))


class _Fail(Exception):
    """A check function returned -errno: the check stops ("Check failed: <strerror>")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


EIO = "Input/output error"
EAGAIN = "Resource temporarily unavailable"
EINVAL = "Invalid argument"
EFBIG = "File too large"
ENOMEM = "Cannot allocate memory"
# Bounds against hostile images (QEMU has none): the in-memory refcount table may take up to
# 4 GiB (1 Gi clusters: a 64 TiB file of 64 KiB clusters), and a
# repair grows the file by at most its size or 1 GiB to reach a refblock past its end.
MAX_IMRT_BYTES = 4 << 30
MAX_REPAIR_GROWTH = 1 << 30


@dataclass(slots=True)
class _Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    extra_data_size: int


def _snapshot_entry(hdr: bytes, extra: bytes, id_b: bytes, name_b: bytes,
                    virtual_size: int) -> SnapshotEntry:
    """A snapshot table entry as QEMU holds it in memory after reading it (and rewrites it):
    the names cut at their first NUL, the extra data (at most 1024 bytes kept) with its known
    fields, every entry given at least the 16 bytes of extra data a v3 image needs."""
    from ..format.snapshot import SnapshotEntry

    l1_off, l1_size, _, _, dsec, dnsec, vmclock, vmsize, _ = struct.unpack(">QIHHIIQII", hdr)
    e = SnapshotEntry(l1_table_offset=l1_off, l1_size=l1_size,
                      id_str=id_b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
                      name=name_b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
                      date_sec=dsec, date_nsec=dnsec, vm_clock_nsec=vmclock,
                      vm_state_size=vmsize, extra_data_size=max(16, len(extra)))
    e.vm_state_size_large = int.from_bytes(extra[0:8], "big") if len(extra) >= 8 else vmsize
    e.disk_size = int.from_bytes(extra[8:16], "big") if len(extra) >= 16 else virtual_size
    if len(extra) >= 24:
        ic = int.from_bytes(extra[16:24], "big")
        e.icount = ic - (1 << 64) if ic >> 63 else ic
        e.unknown_extra_data = bytes(extra[24:])
    else:
        e.icount = None
    return e


class _Window:
    """Reads through a 1 MiB window: a snapshot table is read as many small pieces."""

    SIZE = 1 << 20

    def __init__(self, store: ByteStore) -> None:
        self.store = store
        self.start = 0
        self.buf = b""

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (offset + length <= BDRV_MAX_LENGTH)."""
        if not self.start <= offset <= offset + length <= self.start + len(self.buf):
            self.buf = self.store.pread(offset, min(max(length, self.SIZE),
                                                    BDRV_MAX_LENGTH - offset))
            self.start = offset
        return self.buf[offset - self.start:offset - self.start + length]


# ---------------------------------------------------------------------- refcount width codecs
def _np_dtype(np: Any, refcount_order: int) -> Any:
    return {0: np.uint8, 1: np.uint8, 2: np.uint8, 3: np.uint8, 4: np.uint16,
            5: np.uint32, 6: np.uint64}[refcount_order]


def decode_refblock_np(np: Any, raw: bytes, refcount_order: int) -> Any:
    """Every refcount of a refblock as a numpy array (sub-byte widths packed LSB-first)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    if refcount_order == 0:
        return np.unpackbits(a, bitorder="little")
    if refcount_order == 1:
        return np.stack([(a >> s) & 3 for s in (0, 2, 4, 6)], axis=1).ravel()
    if refcount_order == 2:
        return np.stack([a & 15, a >> 4], axis=1).ravel()
    if refcount_order == 3:
        return a.copy()
    be = {4: ">u2", 5: ">u4", 6: ">u8"}[refcount_order]
    return np.frombuffer(raw, dtype=be).astype(_np_dtype(np, refcount_order))


def encode_refblock_np(np: Any, values: Any, refcount_order: int) -> bytes:
    """The on-disk bytes of a refblock holding `values` (a full block of entries)."""
    if refcount_order == 0:
        return bytes(np.packbits(values.astype(np.uint8), bitorder="little").tobytes())
    if refcount_order in (1, 2):
        bits = 1 << refcount_order
        per = 8 // bits
        v = values.astype(np.uint8).reshape(-1, per)
        out = np.zeros(v.shape[0], dtype=np.uint8)
        for i in range(per):
            out |= v[:, i] << np.uint8(i * bits)
        return bytes(out.tobytes())
    if refcount_order == 3:
        return bytes(values.astype(np.uint8).tobytes())
    be = {4: ">u2", 5: ">u4", 6: ">u8"}[refcount_order]
    return bytes(values.astype(be).tobytes())


class _DiskRefcounts:
    """The refcounts stored on disk (QEMU's qcow2_get_refcount / update_refcount).

    Refblocks are decoded whole into numpy arrays and cached; updates change the cached
    block and are written by `flush()`. An unaligned refblock offset makes every refcount
    it covers unreadable (None), as QEMU signals corruption and fails with EIO.
    """

    def __init__(self, np: Any, store: ByteStore, h: Header, table_offset: int,
                 table_entries: int) -> None:
        self.np = np
        self.store = store
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self.order = h.refcount_order
        self.block_bits = h.cluster_bits + 3 - h.refcount_order
        self.per_block = 1 << self.block_bits
        self.dtype = _np_dtype(np, h.refcount_order)
        raw = store.pread(table_offset, table_entries * 8) if table_entries else b""
        self.table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self._blocks: dict[int, Any] = {}
        self._dirty: set[int] = set()
        self.freed: list[int] = []          # clusters whose refcount dropped to 0
        self.corruption_signalled = False
        self.signal_messages: list[str] = []

    def block_offset(self, rt_index: int) -> int:
        if rt_index >= len(self.table):
            return 0
        return int(self.table[rt_index]) & C.REFT_OFFSET_MASK

    def block(self, rt_index: int) -> Any:
        """The decoded refblock, None for no block (all zero), or False if unreadable."""
        blk = self._blocks.get(rt_index)
        if blk is not None:
            return blk
        off = self.block_offset(rt_index)
        if not off:
            return None
        if off & (self.cluster_size - 1):
            if not self.corruption_signalled:
                self.corruption_signalled = True
                self.signal_messages.append(
                    f"Refblock offset {c_x(off)} unaligned (reftable index: {c_x(rt_index)})")
            return False
        try:
            raw = self.store.pread(off, self.cluster_size)
        except OSError:
            return False   # e.g. an offset past INT64_MAX: QEMU's read fails (a check error)
        blk = decode_refblock_np(self.np, raw, self.order)
        self._blocks[rt_index] = blk
        return blk

    def get(self, cluster: int) -> int | None:
        blk = self.block(cluster >> self.block_bits)
        if blk is None:
            return 0
        if blk is False:
            return None
        return int(blk[cluster & (self.per_block - 1)])

    def dense(self, n: int) -> tuple[Any, Any]:
        """(refcounts of clusters [0, n), mask of unreadable ones or None)."""
        np = self.np
        nblocks = (n + self.per_block - 1) >> self.block_bits
        out = np.zeros(nblocks * self.per_block, dtype=self.dtype)
        bad = None
        for rt in range(nblocks):
            blk = self.block(rt)
            if blk is None:
                continue
            lo = rt << self.block_bits
            if blk is False:
                if bad is None:
                    bad = np.zeros(len(out), dtype=bool)
                bad[lo:lo + self.per_block] = True
                continue
            out[lo:lo + self.per_block] = blk
        return out[:n], (bad[:n] if bad is not None else None)

    def set(self, cluster: int, value: int) -> None:
        rt = cluster >> self.block_bits
        blk = self.block(rt)
        if blk is None or blk is False:
            raise _Fail(EIO)
        blk[cluster & (self.per_block - 1)] = value
        self._dirty.add(rt)
        if value == 0:
            self.freed.append(cluster)

    def flush(self) -> None:
        if not self._dirty:
            return
        for rt in sorted(self._dirty):
            self.store.pwrite(self.block_offset(rt),
                              encode_refblock_np(self.np, self._blocks[rt], self.order))
        self._dirty.clear()
        self.store.flush()
        # QCOW2_DISCARD_ALWAYS: freed clusters are given back to the file system once the
        # refcount drop is durable.
        cs = self.cluster_size
        for start, count in _runs(sorted(set(self.freed))):
            if self.get(start) == 0:
                self.store.punch_hole(start * cs, count * cs)
        self.freed.clear()


def _runs(sorted_idx: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted_idx:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


# ---------------------------------------------------------------------- the check pass
class _Checker:
    """One `bdrv_check()` of a qcow2 image with BdrvCheckMode `fix`."""

    def __init__(self, store: ByteStore, fix: int, exact: bool = False) -> None:
        import numpy as np

        self.np = np
        self.store = store
        self.fix = fix
        self.exact = exact
        self.messages: list[Diagnostic] = []
        first = store.pread(0, 4096)
        cbits = int.from_bytes(first[20:24], "big")
        if C.MIN_CLUSTER_BITS <= cbits <= C.MAX_CLUSTER_BITS and cbits > 12:
            first = store.pread(0, 1 << cbits)
        h = Header.parse(first)
        h.validate(check_mode=True)
        self.h = h
        self.cbits = h.cluster_bits
        self.cs = h.cluster_size
        self.order = h.refcount_order
        self.refcount_max = (1 << (1 << h.refcount_order)) - 1
        self.ext_l2 = h.extended_l2
        self.l2_entry_size = 16 if self.ext_l2 else 8
        self.l2_size = self.cs // self.l2_entry_size
        self.has_data_file = bool(h.incompatible_features & C.QCOW2_INCOMPAT_DATA_FILE)
        self.virtual_size = h.size & ~511
        self.csize_shift = 62 - (self.cbits - 8)
        self.csize_mask = (1 << (self.cbits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        self.rt_entries = h.refcount_table_clusters * self.cs // 8
        self.snapshots: list[_Snapshot] = []
        self._l2_refs: dict[int, list[Any]] = {}
        self._l2_refs_n = 0
        # The raw entries as read (header, kept extra data, ID, name): QEMU's in-memory table.
        self._snapshot_entries: list[tuple[bytes, bytes, bytes, bytes]] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.nb_snapshots = 0
        # The active L1 as QEMU holds it in memory (only non-zero entries matter).
        self.l1_table = dict(self._nonzero_u64(h.l1_table_offset, h.l1_size))
        self.file_len = store.size()
        self.wrote = False
        self.dead = False   # a write hit metadata: the image is marked corrupt, as bs->drv=NULL
        self.disk = _DiskRefcounts(np, store, h, h.refcount_table_offset, self.rt_entries)
        self.bitmaps_ext = self._bitmaps_extension(first)

    # ------------------------------------------------------------------ helpers
    def say(self, text: str, reported: bool = False) -> None:
        self.messages.append(Diagnostic(text, reported))

    def fixing(self, flag: int) -> str:
        return "Repairing" if self.fix & flag else "ERROR"

    def _nonzero_u64(self, offset: int, count: int) -> list[tuple[int, int]]:
        """(index, value) of the non-zero entries of a u64 table (an L1 table has millions
        of entries, most of them zero)."""
        if count <= 0:
            return []
        np = self.np
        t = np.frombuffer(self.store.pread(offset, count * 8), dtype=">u8")
        idx = np.flatnonzero(t)
        return list(zip(idx.tolist(), t[idx].astype(np.uint64).tolist(), strict=True))

    def _bitmaps_extension(self, cluster0: bytes) -> tuple[int, int, int] | None:
        """(nb_bitmaps, directory size, directory offset) when QEMU would use the bitmaps."""
        from ..format.header import parse_extensions

        h = self.h
        try:
            exts = parse_extensions(self.store.pread(0, self.cs), h)
        except Qcow2Error:
            return None
        bm = exts.bitmaps
        if bm is None:
            return None
        return bm.nb_bitmaps, bm.bitmap_directory_size, bm.bitmap_directory_offset

    def _signal_corruption_messages(self) -> None:
        # qcow2_signal_corruption(): printed once per open; a read-only check reports it as
        # non-fatal, a repairing one marks the image corrupt (we only report it).
        for msg in self.disk.signal_messages:
            if self.fix:
                self.say(f"qcow2: Marking image as corrupt: {msg}; further corruption events "
                         "will be suppressed")
            else:
                self.say(f"qcow2: Image is corrupt: {msg}; further non-fatal corruption events "
                         "will be suppressed")
        self.disk.signal_messages.clear()

    # ------------------------------------------------------------------ overlap check
    def overlap(self, offset: int, size: int, ign: str = "") -> str | None:
        """qcow2_check_metadata_overlap() with QEMU's default "cached" template: the name of
        the first metadata structure [offset, +size) would hit, else None.

        Uses the state QEMU has in memory during the check (the old refcount table while a
        rebuild is under way). `ign` names one structure not to check.
        """
        np = self.np
        if not size:
            return None
        if offset < self.cs:
            return "qcow2_header"
        cs = self.cs
        size = -(-((offset & (cs - 1)) + size) // cs) * cs
        offset &= ~(cs - 1)

        def hit(ofs: int, sz: int) -> bool:
            return offset < ofs + sz and ofs < offset + size

        h = self.h
        if ign != "active L1 table" and h.l1_size and hit(h.l1_table_offset, h.l1_size * 8):
            return "active L1 table"
        if self.rt_entries and hit(h.refcount_table_offset, self.rt_entries * 8):
            return "refcount table"
        if self.snapshots_size and hit(self.snapshots_offset, self.snapshots_size):
            return "snapshot table"
        for sn in self.snapshots:
            if sn.l1_size and hit(sn.l1_table_offset, sn.l1_size * 8):
                return "inactive L1 table"

        def any_hit(offsets: Any) -> bool:
            offsets = offsets[offsets != 0]
            return bool(((offsets < u(offset + size)) &
                         (offsets + u(cs) > u(offset))).any())

        u = np.uint64
        if ign != "active L2 table" and self.l1_table:
            l2s = np.array(list(self.l1_table.values()), dtype=np.uint64) & u(C.L1E_OFFSET_MASK)
            if any_hit(l2s):
                return "active L2 table"
        if any_hit(self.disk.table & u(C.REFT_OFFSET_MASK)):
            return "refcount block"
        if self.bitmaps_ext is not None:
            _, dir_size, dir_offset = self.bitmaps_ext
            if hit(dir_offset, dir_size):
                return "bitmap directory"
        return None

    def prevent_overlap(self, offset: int, size: int, ign: str = "") -> bool:
        """qcow2_pre_write_overlap_check(): True if the write may go ahead. A hit is a fatal
        corruption: the image is marked corrupt and nothing more is written."""
        name = self.overlap(offset, size, ign)
        if name is None:
            return True
        msg = f"Preventing invalid write on metadata (overlaps with {name})"
        if not self.disk.corruption_signalled:
            self.disk.corruption_signalled = True
            self.say(f"qcow2: Marking image as corrupt: {msg}; further corruption events "
                     "will be suppressed")
        self.h.incompatible_features |= C.QCOW2_INCOMPAT_CORRUPT
        self.store.pwrite(72, struct.pack(">Q", self.h.incompatible_features))
        self.store.flush()
        self.dead = True
        return False

    # ------------------------------------------------------------------ top level
    def run(self) -> _Res:
        """qcow2_co_check_locked()."""
        result = _Res()
        snapshot_res = _Res()
        try:
            self.check_read_snapshot_table(snapshot_res)
        except _Fail:
            _add(result, snapshot_res, False)
            raise
        refcount_res = _Res()
        try:
            self.check_refcounts(refcount_res)
        except _Fail:
            _add(result, refcount_res, True)
            _add(result, snapshot_res, False)
            raise
        _add(result, refcount_res, True)
        self.check_fix_snapshot_table(snapshot_res)
        _add(result, snapshot_res, False)
        if self.fix and result.check_errors == 0 and result.corruptions == 0:
            self.mark_clean_and_consistent()
        return result

    def mark_clean_and_consistent(self) -> None:
        h = self.h
        bits = C.QCOW2_INCOMPAT_DIRTY | C.QCOW2_INCOMPAT_CORRUPT
        if h.incompatible_features & bits:
            # Everything the repair changed is durable before the bits go.
            self.disk.flush()
            self.store.flush()
            h.incompatible_features &= ~bits
            self.store.pwrite(72, struct.pack(">Q", h.incompatible_features))
            self.store.flush()

    # ------------------------------------------------------------------ snapshot table
    def check_read_snapshot_table(self, res: _Res) -> None:
        """qcow2_check_read_snapshot_table()."""
        h = self.h
        self.snapshots_offset = h.snapshots_offset
        nb = h.nb_snapshots
        reduced = 0
        dropped = 0
        if nb > C.QCOW_MAX_SNAPSHOTS and self.fix & FIX_ERRORS:
            self.say(f"Discarding {nb - C.QCOW_MAX_SNAPSHOTS} overhanging snapshots")
            reduced += nb - C.QCOW_MAX_SNAPSHOTS
            nb = C.QCOW_MAX_SNAPSHOTS
        err = None
        if nb > C.QCOW_MAX_SNAPSHOTS:
            err, reason = "snapshot table too large", EFBIG
        elif (C.INT64_MAX - nb * 40 < self.snapshots_offset
              or self.snapshots_offset & (self.cs - 1)):
            err, reason = "snapshot table offset invalid", EINVAL
        if err is not None:
            res.check_errors += 1
            self.say(f"ERROR {err}", reported=True)
            if nb > C.QCOW_MAX_SNAPSHOTS:
                self.say(f"You can force-remove all {nb - C.QCOW_MAX_SNAPSHOTS} overhanging "
                         "snapshots with qemu-img check -r all")
            self.snapshots_offset = 0
            raise _Fail(reason)
        repair = bool(self.fix & FIX_ERRORS)
        offset = self.snapshots_offset
        table_length = 0
        snaps: list[_Snapshot] = []
        entries: list[tuple[bytes, bytes, bytes, bytes]] = []
        i = 0

        window = _Window(self.store)

        def read(offset: int, length: int) -> bytes:
            # bdrv_pread() refuses requests past BDRV_MAX_LENGTH; past EOF reads zeros.
            if offset > BDRV_MAX_LENGTH or length > BDRV_MAX_LENGTH - offset:
                res.check_errors += 1
                self.say("ERROR failed to read the snapshot table: Failed to read snapshot "
                         f"table: {EIO}", reported=True)
                self.snapshots_offset = 0
                raise _Fail(EIO)
            return window.read(offset, length)

        while i < nb:
            pre = offset
            table_length = (table_length + 7) & ~7
            offset = (offset + 7) & ~7
            hdr = read(offset, 40)
            offset += 40
            l1_off, l1_size, id_size, name_size = struct.unpack_from(">QIHH", hdr, 0)
            extra_size = struct.unpack_from(">I", hdr, 36)[0]
            # What QEMU keeps in memory: the known fields, then at most
            # QCOW_MAX_SNAPSHOT_EXTRA_DATA bytes in all (more fails the read unless
            # repairing, which truncates).
            extra = read(offset, min(24, extra_size))
            truncate = False
            if extra_size > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                if not repair:
                    res.check_errors += 1
                    self.say("ERROR failed to read the snapshot table: Too much extra metadata "
                             f"in snapshot table entry {i}", reported=True)
                    self.say("You can force-remove this extra metadata with qemu-img check "
                             "-r all")
                    raise _Fail(EFBIG)
                self.say(f"Discarding too much extra metadata in snapshot table entry {i} "
                         f"({extra_size} > {C.QCOW_MAX_SNAPSHOT_EXTRA_DATA})")
                dropped += 1
                truncate = True
            offset += min(24, extra_size)
            kept_extra = extra_size
            if extra_size > 24:
                extra_end = offset + extra_size - 24
                if truncate:
                    kept_extra = C.QCOW_MAX_SNAPSHOT_EXTRA_DATA
                extra += read(offset, kept_extra - 24)
                offset = extra_end
            strings = read(offset, id_size) + read(offset + id_size, name_size)
            offset += id_size + name_size
            id_str = strings[:id_size].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = strings[id_size:].split(b"\0", 1)[0].decode("utf-8", "replace")
            table_length += 40 + kept_extra + id_size + name_size
            if table_length > QCOW_MAX_SNAPSHOTS_SIZE or offset - self.snapshots_offset > INT_MAX:
                if not repair:
                    res.check_errors += 1
                    self.say("ERROR failed to read the snapshot table: Snapshot table is too big",
                             reported=True)
                    self.say(f"You can force-remove all {nb - i} overhanging snapshots with "
                             "qemu-img check -r all")
                    raise _Fail(EFBIG)
                self.say(f"Discarding {nb - i} overhanging snapshots (snapshot table is too "
                         "big)")
                reduced += nb - i
                nb = i
                offset = pre
                break
            snaps.append(_Snapshot(l1_off, l1_size, id_str, name, kept_extra))
            entries.append((hdr, extra, strings[:id_size], strings[id_size:]))
            i += 1
        self.snapshots = snaps
        self._snapshot_entries = entries
        self.nb_snapshots = len(snaps)
        self.snapshots_size = offset - self.snapshots_offset if snaps else 0
        res.corruptions += reduced + dropped
        if reduced:
            self.store.pwrite(60, struct.pack(">I", len(snaps)))
            self.store.flush()
            self.h.nb_snapshots = len(snaps)
            res.corruptions_fixed += reduced
            res.corruptions -= reduced
        if h.version >= 3:
            for k, sn in enumerate(snaps):
                if sn.extra_data_size < 16:
                    res.corruptions += 1
                    self.say(f"{self.fixing(FIX_ERRORS)} snapshot table entry {k} is "
                             "incomplete")

    def check_fix_snapshot_table(self, res: _Res) -> None:
        """qcow2_check_fix_snapshot_table(): rewrite the table when it had fixable faults."""
        if res.corruptions and self.fix & FIX_ERRORS:
            try:
                self._rewrite_snapshot_table()
            except (Qcow2Error, OSError, _Fail) as e:
                reason = e.reason if isinstance(e, _Fail) else EIO
                if isinstance(e, OSError) and e.strerror:
                    reason = e.strerror
                res.check_errors += 1
                self.say(f"ERROR failed to update snapshot table: {reason}")
                raise _Fail(reason) from None
            res.corruptions_fixed += res.corruptions
            res.corruptions = 0

    def _rewrite_snapshot_table(self) -> None:
        """qcow2_write_snapshots(): a complete table at a new place, then the header, then
        the old table is freed (every entry with at least 16 bytes of extra data)."""
        from ..format.snapshot import encode_snapshot_table
        from .refcount import Refcounts

        self.disk.flush()
        h = self.h

        def set_reftable(off: int, clusters: int) -> None:
            h.refcount_table_offset = off
            h.refcount_table_clusters = clusters
            self.store.pwrite(48, struct.pack(">QI", off, clusters))

        rc = Refcounts(self.store, h.cluster_bits, h.refcount_order, h.refcount_table_offset,
                       h.refcount_table_clusters, set_reftable)
        # The table as read by the check (the old one may have been discarded meanwhile: a
        # table the check found unreferenced is freed as a leak).
        entries = [_snapshot_entry(*raw, self.virtual_size) for raw in self._snapshot_entries]
        probe = encode_snapshot_table(entries, 0)
        if len(probe) > QCOW_MAX_SNAPSHOTS_SIZE:
            # every entry is written with at least 24 bytes of extra data: it may outgrow
            # the limit the table was read with
            raise _Fail(EFBIG)
        nclusters = -(-len(probe) // self.cs)
        if nclusters:
            new_off = rc.alloc_clusters(nclusters)
            rc.flush_blocks()
        else:
            # qcow2_alloc_clusters(0) allocates nothing and returns the free cluster index
            # (0 here: the check has not allocated anything): an empty table there.
            new_off = rc.free_cluster_index << self.cbits
        data = encode_snapshot_table(entries, new_off)
        # The new clusters must be free; they are not when the check did not count the old
        # table (it runs past the end of the file) and the allocation landed in it.
        if not self.prevent_overlap(new_off, len(data)):
            # QEMU frees the new clusters again (QCOW2_DISCARD_ALWAYS): the refcount drop
            # stays in its cache of a node it no longer writes, but the discard happens.
            self.store.punch_hole(new_off, nclusters * self.cs)
            raise _Fail(EIO)
        self.store.pwrite(new_off, data)
        self.store.flush()
        self.store.pwrite(60, struct.pack(">IQ", len(entries), new_off))
        self.store.flush()
        if self.snapshots_size:
            self._free_old_snapshot_table(rc)
        self.snapshots_offset = new_off
        self.snapshots_size = len(data)
        self.wrote = True

    def _free_old_snapshot_table(self, rc: Refcounts) -> None:
        """qcow2_free_clusters() of the old table, which may fail without failing the rewrite.

        QEMU's update_refcount() goes cluster by cluster. A cluster without a refblock gets
        one allocated (alloc_refcount_block()), and the update stops with EAGAIN; a refcount
        that would drop below zero (an old table the check did not count, one past the end
        of the file, and freed as leaked) stops it with EINVAL. Either way what was done is
        undone, nothing is discarded, and only a message is printed.
        """
        first = self.snapshots_offset >> self.cbits
        last = (self.snapshots_offset + self.snapshots_size - 1) >> self.cbits
        for ci in range(first, last + 1):
            if not rc._block_offset(ci >> rc.block_bits):
                try:
                    self._alloc_refcount_block(rc, ci)
                    reason = EAGAIN
                except ImageLimitError:
                    reason = EFBIG
                except OSError as e:
                    reason = e.strerror or EIO
                self.say(f"qcow2_free_clusters failed: {reason}")
                return
            if rc.get(ci) == 0:
                self.say(f"qcow2_free_clusters failed: {EINVAL}")
                return
        rc.queue_decrease(self.snapshots_offset, self.snapshots_size)
        freed = rc.apply_decreases()
        rc.flush_blocks()
        # QCOW2_DISCARD_SNAPSHOT: the old table's clusters go back to the file system.
        for off, length in freed:
            self.store.punch_hole(off, length)

    def _alloc_refcount_block(self, rc: Refcounts, cluster: int) -> None:
        """alloc_refcount_block() for a cluster no refblock covers, in QEMU's order.

        Within the refcount table, Refcounts creates the block as QEMU does. Past its end,
        QEMU first allocates the refblock (refcount 1, written empty), then grows the table
        with the block hooked in; a table that cannot grow leaves that cluster leaked.
        """
        rt = cluster >> rc.block_bits
        if rt < len(rc.table):
            rc._ensure_blocks(cluster, 1)
            rc.flush_blocks()
            return
        block = rc.alloc_clusters(1)
        rc.flush_blocks()
        self.store.pwrite(block, bytes(self.cs))
        self.store.flush()
        rc._grow_table(rt)
        rc.table[rt] = block
        self.store.pwrite(rc.table_offset + rt * 8, struct.pack(">Q", block))
        self.store.flush()
        rc.flush_blocks()   # the old table's clusters freed

    # ------------------------------------------------------------------ refcounts
    def check_refcounts(self, res: _Res) -> None:
        """qcow2_check_refcounts()."""
        nb_clusters = (self.file_len + self.cs - 1) >> self.cbits
        if nb_clusters > INT_MAX:
            res.check_errors += 1
            raise _Fail(EFBIG)
        res.total_clusters = (self.virtual_size + self.cs - 1) >> self.cbits
        rebuild = self.calculate_refcounts(res, self.fix, nb_clusters)
        pre_compare = res.copy()
        highest, rebuild = self.compare_refcounts(res, 0, rebuild)
        if rebuild and self.fix & FIX_ERRORS:
            old = res.copy()
            fresh_leaks = 0
            self.say("Rebuilding refcount structure")
            self.rebuild_refcount_structure(res)
            res.corruptions = 0
            res.leaks = 0
            rebuild = self.calculate_refcounts(res, 0, (self.file_len + self.cs - 1) >> self.cbits,
                                               keep_size=True)
            if self.fix & FIX_LEAKS:
                saved = res.copy()
                res.assign(_Res())
                highest, rebuild = self.compare_refcounts(res, FIX_LEAKS, False)
                if rebuild:
                    self.say("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = res.leaks
                res.assign(saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif self.fix:
            if rebuild:
                self.say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Fail(EIO)
            if res.leaks or res.corruptions:
                res.assign(pre_compare)
                highest, rebuild = self.compare_refcounts(res, self.fix, rebuild)
        self.disk.flush()
        self.check_oflag_copied(res)
        res.image_end_offset = (highest + 1) * self.cs

    # ---- IMRT ---------------------------------------------------------------
    def _imrt_dtype(self) -> Any:
        # Wide enough to count past refcount_max (overflows must be seen): 32 bits for
        # refcounts of up to 16 bits, 64 bits above (QEMU's IMRT has the image's width).
        return self.np.uint32 if self.order <= 4 else self.np.uint64

    def _imrt_reset(self, n: int) -> None:
        np = self.np
        if n * np.dtype(self._imrt_dtype()).itemsize > MAX_IMRT_BYTES:
            raise _Fail(ENOMEM)
        self.imrt = np.zeros(max(n, 1), dtype=self._imrt_dtype())
        self.imrt_size = n
        self._pending: list[Any] = []
        self._pending_n = 0

    def _imrt_grow(self, n: int) -> None:
        if n * self.imrt.itemsize > MAX_IMRT_BYTES:
            raise _Fail(ENOMEM)
        if n > len(self.imrt):
            np = self.np
            new = np.zeros(max(n, len(self.imrt) * 2), dtype=self._imrt_dtype())
            new[:len(self.imrt)] = self.imrt
            self.imrt = new
        if n > self.imrt_size:
            self.imrt_size = n

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        np = self.np
        idx = np.concatenate(self._pending)
        self._pending = []
        self._pending_n = 0
        if not len(idx):
            return
        top = int(idx.max()) + 1
        self._imrt_grow(top)
        # Only the clusters referenced in this batch are touched (a bincount over the whole
        # range would cost 8 bytes per cluster of the image each time). Additions saturate so
        # that a count past the refcount limit stays visible as an overflow.
        uniq, counts = np.unique(idx, return_counts=True)
        cap = np.iinfo(self.imrt.dtype).max
        new = np.minimum(self.imrt[uniq].astype(np.uint64) + counts.astype(np.uint64),
                         np.uint64(cap))
        self.imrt[uniq] = new.astype(self.imrt.dtype)

    def _defer(self, idx: Any) -> None:
        self._pending.append(idx)
        self._pending_n += len(idx)
        if self._pending_n >= _PENDING_FLUSH:
            self._flush_pending()

    def inc_refcounts(self, res: _Res, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt()."""
        if size <= 0:
            return
        # QEMU's offset is an int64_t: a snapshot's L1 offset of 2^63 or more is negative
        # there, passes this test, and then sizes the IMRT (which fails, ENOMEM)
        signed = offset - (1 << 64) if offset >> 63 else offset
        if signed + size - self.file_len >= self.cs:
            self.say("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {c_x(offset)} size {c_x(size)}")
            res.corruptions += 1
            return
        first = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        self._imrt_grow(last + 1)
        if not self.exact:
            self.imrt[first:last + 1] += 1
            return
        for k in range(first, last + 1):
            if int(self.imrt[k]) >= self.refcount_max:
                self.say(f"ERROR: overflow cluster offset={c_x(k << self.cbits)}")
                self.say("Use qemu-img amend to increase the refcount entry width or qemu-img "
                         "convert to create a clean copy if the image cannot be opened for "
                         "writing")
                res.corruptions += 1
                continue
            self.imrt[k] += 1

    def calculate_refcounts(self, res: _Res, fix: int, nb_clusters: int,
                            keep_size: bool = False) -> bool:
        """calculate_refcounts(); returns whether a rebuild is needed.

        Without `exact`, references are counted in bulk and the refcount limit is checked at
        the end; if some cluster overflowed and nothing was written yet, the calculation is
        redone reference by reference so that the overflow reports come in QEMU's order.
        """
        start_res = res.copy()
        start_msgs = len(self.messages)
        start_wrote = self.wrote
        while True:
            if keep_size and hasattr(self, "imrt"):
                n = max(nb_clusters, self.imrt_size)
            else:
                n = nb_clusters
            self._imrt_reset(n)
            self._l2_refs = {}
            self._l2_refs_n = 0
            rebuild = self._calculate(res, fix)
            self._flush_pending()
            if self.exact:
                return rebuild
            over = self.imrt[:self.imrt_size] > self.refcount_max
            if not bool(over.any()):
                return rebuild
            if self.wrote == start_wrote:
                self.exact = True
                res.assign(start_res)
                del self.messages[start_msgs:]
                continue
            # A repair already happened in this pass: count the overflows without their
            # original order rather than repeat the repair.
            np = self.np
            excess = self.imrt[:self.imrt_size] - self.refcount_max
            for k in np.flatnonzero(over).tolist():
                for _ in range(int(excess[k])):
                    self.say(f"ERROR: overflow cluster offset={c_x(k << self.cbits)}")
                    self.say("Use qemu-img amend to increase the refcount entry width or "
                             "qemu-img convert to create a clean copy if the image cannot be "
                             "opened for writing")
                    res.corruptions += 1
            self.imrt[:self.imrt_size] = np.minimum(self.imrt[:self.imrt_size],
                                                    self.refcount_max)
            return rebuild

    def _calculate(self, res: _Res, fix: int) -> bool:
        h = self.h
        self.inc_refcounts(res, 0, self.cs)
        self.check_refcounts_l1(res, h.l1_table_offset, h.l1_size, True, fix, True)
        if self.has_data_file and self.nb_snapshots:
            self.say(f"ERROR {self.nb_snapshots} snapshots in image with data file")
            res.corruptions += 1
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.say(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset="
                         f"{c_x(sn.l1_table_offset)}: L1 table is not cluster aligned; "
                         "snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
                self.say(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={c_x(sn.l1_size)}: "
                         "L1 table is too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            self.check_refcounts_l1(res, sn.l1_table_offset, sn.l1_size, False, fix, False)
        self.inc_refcounts(res, self.snapshots_offset, self.snapshots_size)
        self.inc_refcounts(res, h.refcount_table_offset, self.rt_entries * 8)
        self.check_bitmaps_refcounts(res)
        return self.check_refblocks(res, fix)

    # ---- L1 / L2 ------------------------------------------------------------
    def check_refcounts_l1(self, res: _Res, l1_offset: int, l1_size: int, frag: bool,
                           fix: int, active: bool) -> None:
        if not l1_size:
            return
        self.inc_refcounts(res, l1_offset, l1_size * 8)
        if l1_offset > BDRV_MAX_LENGTH or l1_size * 8 > BDRV_MAX_LENGTH - l1_offset:
            # a snapshot's L1 table out of the block layer's reach: bdrv_pread() fails
            self.say("ERROR: I/O error in check_refcounts_l1")
            res.check_errors += 1
            raise _Fail(EIO)
        for _, entry in self._nonzero_u64(l1_offset, l1_size):
            if entry & C.L1E_RESERVED_MASK:
                self.say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & C.L1E_OFFSET_MASK
            self.inc_refcounts(res, l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.say(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                res.corruptions += 1
            self.check_refcounts_l2(res, l2_offset, frag, fix, active)

    def check_refcounts_l2(self, res: _Res, l2_offset: int, frag: bool, fix: int,
                           active: bool) -> None:
        # An L2 table shared by several snapshots is visited once per tree that uses it;
        # when a visit found nothing to report, the later ones only count its references
        # again. (Only the active tree's visit, with frag, has more to count.)
        cached = None if frag else self._l2_refs.get(l2_offset)
        if cached is not None:
            for r in cached:
                self._defer(r)
            return
        raw = self.store.pread(l2_offset, self.cs)
        if self.exact or not self._l2_fast(res, raw, frag, l2_offset):
            self._l2_slow(res, raw, l2_offset, frag, fix, active)

    def _l2_fast(self, res: _Res, raw: bytes, frag: bool, l2_offset: int = -1) -> bool:
        """Count an L2 table that has nothing to report with vector operations.

        Returns False (nothing counted) when any entry needs a diagnostic or a repair: the
        caller then walks the table entry by entry.
        """
        np = self.np
        t = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        if self.ext_l2:
            e = t[0::2]
            bm = t[1::2]
        else:
            e = t
            bm = None
        if not e.any():
            return bm is None or not bool((bm & np.uint64(_ALL_ALLOC)).any())
        u = np.uint64
        comp = (e & u(_COMP)) != 0
        off = e & u(_OFFMASK)
        has_off = off != 0
        # The zero flag is bit 0 only in standard L2 entries.
        zero = np.zeros(len(e), dtype=bool) if self.ext_l2 else ((e & u(_ZERO)) != 0) & ~comp
        if self.has_data_file:
            normal = ~comp & ~zero & (has_off | ((e & u(_COPIED)) != 0))
        else:
            normal = ~comp & ~zero & has_off
        alloc = normal | (zero & has_off)
        if bool((~comp & ((e & u(C.L2E_STD_RESERVED_MASK)) != 0)).any()):
            return False
        if bool((alloc & ((off & u(self.cs - 1)) != 0)).any()):
            return False
        if bm is not None:
            if bool((alloc & (((bm >> u(32)) & bm) != 0)).any()):
                return False
            unalloc = ~comp & ~alloc
            if bool((unalloc & ((bm & u(_ALL_ALLOC)) != 0)).any()):
                return False
        ncomp = int(comp.sum())
        refs = []
        if ncomp:
            if self.has_data_file or bool((comp & ((e & u(_COPIED)) != 0)).any()):
                return False
            if bm is not None and bool((comp & (bm != 0)).any()):
                return False
            ce = e[comp]
            coff = ce & u(self.cluster_offset_mask)
            nsec = ((ce >> u(self.csize_shift)) & u(self.csize_mask)) + u(1)
            csize = nsec * u(512) - (coff & u(511))
            end = coff + csize
            if bool((end.astype(np.int64) - self.file_len >= self.cs).any()):
                return False
            first = (coff >> u(self.cbits)).astype(np.int64)
            last = ((end - u(1)) >> u(self.cbits)).astype(np.int64)
            refs.append(first)
            span = last - first
            for extra in (1, 2):
                more = span >= extra
                if bool(more.any()):
                    refs.append(first[more] + extra)
        aoff = off[alloc]
        if len(aoff) and not self.has_data_file:   # data file clusters have no refcount
            if bool((aoff >= u(self.file_len)).any()):
                return False
            refs.append((aoff >> u(self.cbits)).astype(np.int64))
        if frag:
            na = len(aoff)
            res.allocated_clusters += na + ncomp
            res.compressed_clusters += ncomp
            res.fragmented_clusters += ncomp
            if na > 1:
                res.fragmented_clusters += int((aoff[1:] != aoff[:-1] + u(self.cs)).sum())
        for r in refs:
            self._defer(r)
        n = sum(len(r) for r in refs)
        if l2_offset >= 0 and self._l2_refs_n + n <= _L2_REFS_CACHE_MAX:
            self._l2_refs[l2_offset] = refs
            self._l2_refs_n += n
        return True

    def _l2_slow(self, res: _Res, raw: bytes, l2_offset: int, frag: bool, fix: int,
                 active: bool) -> None:
        """check_refcounts_l2(), entry by entry."""
        vals = struct.unpack(f">{len(raw) // 8}Q", raw)
        ext = self.ext_l2
        cs = self.cs
        next_contiguous = 0
        step = 2 if ext else 1
        for i in range(self.l2_size):
            entry = vals[i * step]
            bitmap = vals[i * step + 1] if ext else 0
            ctype = self._cluster_type(entry)
            if ctype != 4 and entry & C.L2E_STD_RESERVED_MASK:
                self.say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if ctype == 4:  # compressed
                if entry & _COPIED:
                    self.say(f"ERROR: coffset={c_x(entry & self.cluster_offset_mask)}: copied "
                             "flag must never be set for compressed clusters")
                    entry &= ~_COPIED
                    res.corruptions += 1
                if self.has_data_file:
                    self.say(f"ERROR compressed cluster {i} with data file, entry={c_x(entry)}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.say(f"ERROR compressed cluster {i} with non-zero subcluster "
                             f"allocation bitmap, entry={c_x(entry)}")
                    res.corruptions += 1
                    continue
                coffset = entry & self.cluster_offset_mask
                nsec = ((entry >> self.csize_shift) & self.csize_mask) + 1
                self.inc_refcounts(res, coffset, nsec * 512 - (coffset & 511))
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif ctype in (2, 3):  # zero-alloc, normal
                offset = entry & _OFFMASK
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self.say(f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                             "subcluster allocation bitmap")
                if offset & (cs - 1):
                    res.corruptions += 1
                    contains_data = bool(bitmap & _ALL_ALLOC) if ext else not entry & _ZERO
                    if not contains_data:
                        self.say(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} "
                                 f"offset={offset:x}: Preallocated cluster is not properly "
                                 "aligned; L2 entry corrupted.")
                        if fix & FIX_ERRORS:
                            self._fix_l2_entry_by_zero(res, l2_offset, raw, i, active)
                            continue
                    else:
                        self.say(f"ERROR offset={offset:x}: Data cluster is not properly "
                                 "aligned; L2 entry corrupted.")
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                if not self.has_data_file:
                    self.inc_refcounts(res, offset, cs)
            elif ctype == 0 and bitmap & _ALL_ALLOC:
                res.corruptions += 1
                self.say("ERROR: Unallocated cluster has non-zero subcluster allocation map")

    def _cluster_type(self, entry: int) -> int:
        """0 unallocated, 1 zero-plain, 2 zero-alloc, 3 normal, 4 compressed."""
        if entry & _COMP:
            return 4
        if entry & _ZERO and not self.ext_l2:
            return 2 if entry & _OFFMASK else 1
        if not entry & _OFFMASK:
            return 3 if self.has_data_file and entry & _COPIED else 0
        return 3

    def _fix_l2_entry_by_zero(self, res: _Res, l2_offset: int, raw: bytes, index: int,
                              active: bool) -> None:
        """fix_l2_entry_by_zero(): the entry becomes zero-plain (its data was zeros anyway)."""
        if self.ext_l2:
            bitmap = int.from_bytes(raw[index * 16 + 8:index * 16 + 16], "big")
            bitmap |= bitmap << 32
            bitmap &= C.QCOW_L2_BITMAP_ALL_ZEROES
            data = struct.pack(">QQ", 0, bitmap)
        else:
            data = struct.pack(">Q", _ZERO)
        if not self.prevent_overlap(l2_offset + index * self.l2_entry_size, len(data),
                                    "active L2 table" if active else "inactive L2 table"):
            self.say("ERROR: Overlap check failed")
            res.check_errors += 1
            raise _Fail(EIO)
        self.store.pwrite(l2_offset + index * self.l2_entry_size, data)
        self.store.flush()
        self.wrote = True
        res.corruptions -= 1
        res.corruptions_fixed += 1

    # ---- bitmaps ------------------------------------------------------------
    def check_bitmaps_refcounts(self, res: _Res) -> None:
        """qcow2_check_bitmaps_refcounts()."""
        if self.bitmaps_ext is None:
            return
        nb_bitmaps, dir_size, dir_offset = self.bitmaps_ext
        if nb_bitmaps == 0:
            return
        self.inc_refcounts(res, dir_offset, dir_size)
        tables = self._bitmap_list_load(nb_bitmaps, dir_offset, dir_size)
        if tables is None:
            res.corruptions += 1
            raise _Fail(EINVAL)
        for tbl_offset, tbl_size in tables:
            self.inc_refcounts(res, tbl_offset, tbl_size * 8)
            # Validated above: tbl_size * cluster_size <= 512 MiB, so the table is small.
            for _, entry in self._nonzero_u64(tbl_offset, tbl_size):
                off = entry & BME_TABLE_ENTRY_OFFSET_MASK
                if entry & BME_TABLE_ENTRY_RESERVED_MASK or (
                        off and (entry & BME_TABLE_ENTRY_FLAG_ALL_ONES or off % self.cs)):
                    res.corruptions += 1
                    continue
                if off:
                    self.inc_refcounts(res, off, self.cs)

    def _bitmap_list_load(self, nb_bitmaps: int, offset: int, size: int
                          ) -> list[tuple[int, int]] | None:
        """bitmap_list_load(): the (table offset, table size) of every valid entry, or None."""
        if size == 0 or size > C.QCOW_MAX_BITMAP_DIRECTORY_SIZE:
            return None
        data = self.store.pread(offset, size)
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            if pos + 24 > size:
                return None
            if len(out) + 1 > nb_bitmaps:
                return None
            (tbl_off, tbl_size, flags, btype, gbits, name_size,
             extra_size) = struct.unpack_from(">QIIBBHI", data, pos)
            nxt = pos + ((24 + name_size + extra_size + 7) & ~7)
            if nxt > size or extra_size:
                return None
            bad = (tbl_size == 0 or tbl_off == 0 or tbl_off % self.cs
                   or tbl_size > BME_MAX_TABLE_SIZE or gbits > BME_MAX_GRANULARITY_BITS
                   or gbits < BME_MIN_GRANULARITY_BITS or flags & BME_RESERVED_FLAGS
                   or name_size > BME_MAX_NAME_SIZE or btype != 1)
            if bad:
                return None
            phys = tbl_size * self.cs
            if phys > BME_MAX_PHYS_SIZE or self.virtual_size > ((phys * 8) << gbits):
                return None
            out.append((tbl_off, tbl_size))
            pos = nxt
        if len(out) != nb_bitmaps or pos != size:
            return None
        return out

    # ---- refblocks ----------------------------------------------------------
    def check_refblocks(self, res: _Res, fix: int) -> bool:
        """check_refblocks(); returns whether a rebuild is needed."""
        np = self.np
        rebuild = False
        table = self.disk.table
        for i in np.flatnonzero(table).tolist():
            raw_entry = int(table[i])
            offset = raw_entry & C.REFT_OFFSET_MASK
            cluster = offset >> self.cbits
            if raw_entry & C.REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (self.cs - 1):
                self.say(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            self._flush_pending()
            if cluster >= self.imrt_size:
                res.corruptions += 1
                self.say(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} "
                         "is outside image")
                if fix & FIX_ERRORS:
                    if offset > C.INT64_MAX - self.cs:
                        rebuild = True
                        self.say(f"ERROR could not resize image: {EINVAL}")
                        continue
                    if offset + self.cs > self.file_len + max(self.file_len, MAX_REPAIR_GROWTH):
                        # QEMU would grow the file (and its in-memory refcount table) to any
                        # crafted offset: a hostile image could make a repair allocate
                        # gigabytes. A refblock just past the end (a truncated file) is fine.
                        rebuild = True
                        self.say(f"ERROR could not resize image: {EFBIG}")
                        continue
                    self.store.truncate(offset + self.cs)
                    self.wrote = True
                    self.file_len = self.store.size()
                    self._imrt_grow((self.file_len + self.cs - 1) >> self.cbits)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc_refcounts(res, offset, self.cs)
                continue
            if offset:
                self.inc_refcounts(res, offset, self.cs)
                if int(self.imrt[cluster]) != 1:
                    self.say(f"ERROR refcount block {i} refcount={int(self.imrt[cluster])}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def compare_refcounts(self, res: _Res, fix: int, rebuild: bool) -> tuple[int, bool]:
        """compare_refcounts(); returns (highest cluster in use, rebuild)."""
        np = self.np
        n = self.imrt_size
        imrt = self.imrt[:n]
        disk, bad = self.disk.dense(n)
        self._signal_corruption_messages()
        diff = disk != imrt
        if bad is not None:
            diff |= bad
        used = (disk != 0) | (imrt != 0)
        if bad is not None:
            used &= ~bad
        highest = n - 1 - int(np.argmax(used[::-1])) if bool(used.any()) else 0
        for i in np.flatnonzero(diff).tolist():
            if bad is not None and bad[i]:
                self.say(f"Can't get refcount for cluster {i}: {EIO}")
                res.check_errors += 1
                continue
            r1 = int(disk[i])
            r2 = int(imrt[i])
            target = None
            if r1 == 0:
                rebuild = True
            elif r1 > r2 and fix & FIX_LEAKS:
                target = "leaks"
            elif r1 < r2 and fix & FIX_ERRORS:
                target = "corruptions"
            word = "Repairing" if target else ("ERROR" if r1 < r2 else "Leaked")
            self.say(f"{word} cluster {i} refcount={r1} reference={r2}")
            if target:
                self.disk.set(i, r2)
                self.wrote = True
                if target == "leaks":
                    res.leaks_fixed += 1
                else:
                    res.corruptions_fixed += 1
                continue
            if r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
        return highest, rebuild

    # ---- COPIED -------------------------------------------------------------
    def check_oflag_copied(self, res: _Res) -> None:
        """check_oflag_copied(): COPIED set exactly when the refcount is 1 (active tables)."""
        np = self.np
        fix = self.fix
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        n = self.imrt_size
        disk, bad = self.disk.dense(n)
        self._signal_corruption_messages()
        cb = self.cbits
        u = np.uint64
        for i, l1_entry in sorted(self.l1_table.items()):
            l2_offset = l1_entry & C.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self._refcount_at(l2_offset >> cb, disk, bad, n)
            if refcount is None:
                continue
            if (refcount == 1) != bool(l1_entry & _COPIED):
                res.corruptions += 1
                self.say(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                         f"refcount={refcount}")
                if repair:
                    new = l1_entry | _COPIED if refcount == 1 else l1_entry & ~_COPIED
                    self.l1_table[i] = new
                    if not self.prevent_overlap(self.h.l1_table_offset + 8 * i, 8,
                                                "active L1 table"):
                        res.check_errors += 1
                        raise _Fail(EIO)
                    self.store.pwrite(self.h.l1_table_offset + 8 * i, struct.pack(">Q", new))
                    self.store.flush()
                    self.wrote = True
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = bytearray(self.store.pread(l2_offset, self.cs))
            t = np.frombuffer(bytes(raw), dtype=">u8").astype(np.uint64)
            e = t[0::2] if self.ext_l2 else t
            comp = (e & u(_COMP)) != 0
            off = e & u(_OFFMASK)
            zero = (np.zeros(len(e), dtype=bool) if self.ext_l2
                    else ((e & u(_ZERO)) != 0) & ~comp)
            if self.has_data_file:
                alloc = ~comp & ((off != 0) | (~zero & ((e & u(_COPIED)) != 0)))
            else:
                alloc = ~comp & (off != 0)
            idx = np.flatnonzero(alloc)
            if not len(idx):
                continue
            copied = (e[idx] & u(_COPIED)) != 0
            if self.has_data_file:
                rc = np.ones(len(idx), dtype=np.int64)
                ok = np.ones(len(idx), dtype=bool)
            else:
                clusters = (off[idx] >> u(cb)).astype(np.int64)
                inside = clusters < n
                rc = np.zeros(len(idx), dtype=np.int64)
                ok = np.ones(len(idx), dtype=bool)
                rc[inside] = disk[clusters[inside]]
                if bad is not None:
                    ok[inside] = ~bad[clusters[inside]]
                for k in np.flatnonzero(~inside).tolist():
                    v = self.disk.get(int(clusters[k]))
                    self._signal_corruption_messages()
                    if v is None:
                        ok[k] = False
                    else:
                        rc[k] = v
            mism = ok & ((rc == 1) != copied)
            dirty = 0
            for k in np.flatnonzero(mism).tolist():
                j = int(idx[k])
                entry = int(e[j])
                refcount = int(rc[k])
                res.corruptions += 1
                self.say(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                         f"refcount={refcount}")
                if repair:
                    new = entry | _COPIED if refcount == 1 else entry & ~_COPIED
                    pos = j * self.l2_entry_size
                    raw[pos:pos + 8] = struct.pack(">Q", new)
                    dirty += 1
            if dirty:
                if not self.prevent_overlap(l2_offset, self.cs, "active L2 table"):
                    self.say("ERROR: Could not write L2 table; metadata overlap check failed: "
                             f"{EIO}")
                    res.check_errors += 1
                    raise _Fail(EIO)
                self.store.pwrite(l2_offset, bytes(raw))
                self.store.flush()
                self.wrote = True
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    def _refcount_at(self, cluster: int, disk: Any, bad: Any, n: int) -> int | None:
        if cluster < n:
            if bad is not None and bad[cluster]:
                return None
            return int(disk[cluster])
        v = self.disk.get(cluster)
        self._signal_corruption_messages()
        return v

    # ---- rebuild ------------------------------------------------------------
    def _alloc_imrt(self, count: int, first_free: list[int]) -> int:
        """alloc_clusters_imrt(): first fit of `count` free clusters at or after first_free[0]."""
        np = self.np
        start = first_free[0]
        n = self.imrt_size
        cluster = start
        contiguous = 0
        first_gap = True
        chunk = 1 << 16
        while cluster < n and contiguous < count:
            end = min(n, cluster + chunk)
            free = self.imrt[cluster:end] == 0
            if contiguous == 0 and count == 1:
                hits = np.flatnonzero(free)
                if len(hits):
                    cluster += int(hits[0])
                    if first_gap:
                        first_free[0] = cluster
                        first_gap = False
                    contiguous = 1
                    cluster += 1
                    break
                cluster = end
                continue
            for v in free.tolist():
                if v:
                    contiguous += 1
                    if first_gap:
                        first_free[0] = cluster
                        first_gap = False
                elif contiguous:
                    contiguous = 0
                cluster += 1
                if contiguous >= count:
                    break
        if contiguous < count:
            self._imrt_grow(cluster + count - contiguous)
            cluster += count - contiguous
            contiguous = count
        cluster -= contiguous
        self.imrt[cluster:cluster + count] = 1
        return cluster << self.cbits

    def _next_used(self, cluster: int, end: int) -> int:
        np = self.np
        chunk = 1 << 20
        while cluster < end:
            stop = min(end, cluster + chunk)
            hits = np.flatnonzero(self.imrt[cluster:stop])
            if len(hits):
                return cluster + int(hits[0])
            cluster = stop
        return end

    def _write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """rebuild_refcounts_write_refblocks(); returns whether the reftable grew."""
        np = self.np
        pb = 1 << (self.cbits + 3 - self.order)
        bb = self.cbits + 3 - self.order
        first_free = [0]
        grown = False
        cluster = first
        dtype = _np_dtype(np, self.order)
        while True:
            cluster = self._next_used(cluster, min(end, self.imrt_size))
            if cluster >= min(end, self.imrt_size):
                break
            rb_index = cluster >> bb
            rb_start = rb_index << bb
            if len(reftable) > rb_index and reftable[rb_index]:
                rb_offset = reftable[rb_index]
            else:
                first_free[0] = max(first_free[0], rb_start)
                rb_offset = self._alloc_imrt(1, first_free)
                if rb_offset >> self.cbits >= end:
                    end = (rb_offset >> self.cbits) + 1
                if len(reftable) <= rb_index:
                    per = self.cs // 8
                    entries = -(-(rb_index + 1) // per) * per
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[rb_index] = rb_offset
            vals = np.zeros(pb, dtype=dtype)
            part = self.imrt[rb_start:min(rb_start + pb, self.imrt_size)]
            vals[:len(part)] = part
            if not self.prevent_overlap(rb_offset, self.cs):
                self.say(f"ERROR writing refblock: {EIO}", reported=True)
                raise _Fail(EIO)
            self.store.pwrite(rb_offset, encode_refblock_np(np, vals, self.order))
            cluster = rb_start + pb
        return grown

    def rebuild_refcount_structure(self, res: _Res) -> None:
        """rebuild_refcount_structure(): new refblocks and reftable from the IMRT.

        The old structure stays valid until the header points at the new one, and the new
        one is durable before that; the old clusters then show up as leaks (fixed by the
        caller's second comparison).
        """
        reftable: list[int] = []
        try:
            self._write_refblocks(0, self.imrt_size, reftable)
            while True:
                length = len(reftable) * 8
                clusters = -(-length // self.cs)
                first_free = [0]
                rt_offset = self._alloc_imrt(clusters, first_free)
                start = rt_offset >> self.cbits
                if not self._write_refblocks(start, start + clusters, reftable):
                    break
        except _Fail:
            res.check_errors += 1
            raise
        data = struct.pack(f">{len(reftable)}Q", *reftable)
        if not self.prevent_overlap(rt_offset, len(data)):
            self.say(f"ERROR writing reftable: {EIO}", reported=True)
            raise _Fail(EIO)
        self.store.pwrite(rt_offset, data)
        # Refblocks and table must be durable before the header switches to them.
        self.store.flush()
        self.store.pwrite(48, struct.pack(">QI", rt_offset, clusters))
        self.store.flush()
        self.wrote = True
        self.h.refcount_table_offset = rt_offset
        self.h.refcount_table_clusters = clusters
        self.rt_entries = len(reftable)
        self.file_len = self.store.size()
        self.disk = _DiskRefcounts(self.np, self.store, self.h, rt_offset, len(reftable))


def _add(out: _Res, src: _Res, allocation_info: bool) -> None:
    """qcow2_add_check_result()."""
    out.corruptions += src.corruptions
    out.leaks += src.leaks
    out.check_errors += src.check_errors
    out.corruptions_fixed += src.corruptions_fixed
    out.leaks_fixed += src.leaks_fixed
    if allocation_info:
        out.image_end_offset = src.image_end_offset
        out.total_clusters = src.total_clusters
        out.allocated_clusters = src.allocated_clusters
        out.fragmented_clusters = src.fragmented_clusters
        out.compressed_clusters = src.compressed_clusters


def check_store(store: ByteStore, filename: str, repair: Repair = None) -> CheckResult:
    """One check pass over a qcow2 image in `store` (QEMU's bdrv_check()).

    repair: None (report only), "leaks" (BDRV_FIX_LEAKS) or "all" (also BDRV_FIX_ERRORS).
    The store must be writable when repairing. Diagnostics are collected, not printed.
    """
    fix = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}[repair]
    checker = _Checker(store, fix)
    out = CheckResult(filename)
    try:
        res = checker.run()
    except _Fail as e:
        out.failure = e.reason
        out.messages = checker.messages
        return out
    finally:
        # After a prevented metadata overlap QEMU drops the node: nothing more is written.
        if fix and not checker.dead:
            checker.disk.flush()
            store.flush()
    for name in _Res.__slots__:
        setattr(out, name, getattr(res, name))
    out.messages = checker.messages
    return out
