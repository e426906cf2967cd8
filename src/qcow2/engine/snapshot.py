"""Internal snapshots of a writable qcow2 image: create, apply (goto) and delete, with QEMU
7.2's semantics (block/qcow2-snapshot.c) and in a crash-safe order (spec §1.12, §6.1).

This module owns the snapshot table rewrite and the refcount walk over a snapshot tree
(`_tree_refs` + `_apply_refs` + `_recompute_copied` together are QEMU's
qcow2_update_snapshot_refcount()). The reading side (parsing the table, loading a snapshot
read-only) stays in image.py and format/snapshot.py.

Crash safety. On disk, a refcount may exceed the real number of references (a leak) but
never fall below it, and COPIED may be set only where the cluster is really referenced once.
A refcount change and the COPIED flags that follow from it live in different clusters, so
every operation has short windows in which `qemu-img check` reports an OFLAG_COPIED
mismatch (QEMU has the same windows); the orders below keep those windows harmless: either
COPIED is clear (a write then copies needlessly), or COPIED is set on a cluster whose extra
refcount is a leak, never a real second reference.
"""

from __future__ import annotations

import errno
import struct
import time
from array import array
from collections.abc import Callable, Iterable
from sys import byteorder
from typing import TYPE_CHECKING, TypeVar

from ..errors import (
    CorruptImageError,
    ImageLimitError,
    InvalidImageError,
    NotFoundError,
    Qcow2Error,
    UnsupportedFeatureError,
    c_hex,
)
from ..format import constants as C
from ..format.snapshot import SnapshotEntry, encode_snapshot_table

if TYPE_CHECKING:
    from .writer import WritableQcow2Image

T = TypeVar("T")

QCOW_MAX_SNAPSHOTS = 65536
# QEMUSnapshotInfo keeps the name in char[256] and the ID in char[128]: qemu-img truncates a
# longer name (pstrcpy) before it reaches the driver.
SNAPSHOT_NAME_MAX_BYTES = 255
_COPIED = C.QCOW_OFLAG_COPIED
_COMPRESSED = C.QCOW_OFLAG_COMPRESSED


class SnapshotError(Qcow2Error):
    """A snapshot operation failed where QEMU fails; `errno` is the code QEMU returns (the CLI
    prints its strerror) and `reports` the lines QEMU prints first with error_report()."""

    def __init__(self, message: str, code: int, reports: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.errno = code
        self.reports = reports


class SnapshotNotFoundError(NotFoundError):
    """No snapshot has the given ID or name (ENOENT)."""

    errno = errno.ENOENT


def error_code(exc: BaseException) -> int:
    """The errno QEMU would return for an exception raised by a snapshot operation."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code:
        return code
    if isinstance(exc, CorruptImageError):
        return errno.EIO
    if isinstance(exc, UnsupportedFeatureError):
        return errno.ENOTSUP
    if isinstance(exc, ImageLimitError):
        # RefcountOverflowError included: QEMU's update_refcount() returns EINVAL there.
        from .refcount import RefcountOverflowError

        return errno.EINVAL if isinstance(exc, RefcountOverflowError) else errno.EFBIG
    return errno.EINVAL


# ----------------------------------------------------------------------------- lookups
def find_by_id_or_name(snapshots: list[SnapshotEntry], id_or_name: str) -> SnapshotEntry:
    """find_snapshot_by_id_or_name(): an ID match anywhere wins over a name match."""
    for sn in snapshots:
        if sn.id_str == id_or_name:
            return sn
    for sn in snapshots:
        if sn.name == id_or_name:
            return sn
    raise SnapshotNotFoundError(f"Can't find snapshot '{id_or_name}'")


def find_by_id_and_name(snapshots: list[SnapshotEntry], snapshot_id: str | None,
                        name: str | None) -> SnapshotEntry:
    """find_snapshot_by_id_and_name(): both must match when both are given."""
    for sn in snapshots:
        if (snapshot_id is None or sn.id_str == snapshot_id) and (
                name is None or sn.name == name) and (snapshot_id, name) != (None, None):
            return sn
    raise SnapshotNotFoundError("Can't find the snapshot")


def find_by_name(snapshots: list[SnapshotEntry], name: str) -> SnapshotEntry:
    """bdrv_snapshot_find(), what `qemu-img snapshot -d` uses: the name only, never the ID."""
    for sn in snapshots:
        if sn.name == name:
            return sn
    raise SnapshotNotFoundError(f"Can't find snapshot '{name}'")


def _new_id(snapshots: list[SnapshotEntry]) -> str:
    """find_new_snapshot_id(): 1 + the largest strtoul() of the existing IDs."""
    top = 0
    for sn in snapshots:
        top = max(top, _strtoul(sn.id_str))
    return str(top + 1)


def _strtoul(text: str) -> int:
    s = text.lstrip(" \t\n\v\f\r")
    neg = s[:1] == "-"
    if s[:1] in "+-":
        s = s[1:]
    digits = ""
    for ch in s:
        if not "0" <= ch <= "9":
            break
        digits += ch
    if not digits:
        return 0
    val = int(digits)
    if val >= 1 << 64:
        return (1 << 64) - 1
    return (-val) % (1 << 64) if neg else val


# ----------------------------------------------------------------------------- table I/O
def _be(table: Iterable[int]) -> bytes:
    raw = array("Q", table)
    if byteorder == "little":
        raw.byteswap()
    return raw.tobytes()


def _validate_l1(img: WritableQcow2Image, sn: SnapshotEntry) -> None:
    """qcow2_validate_table() for a snapshot's L1 table, before its size drives a read."""
    if sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
        raise SnapshotError("Snapshot L1 table too large", errno.EFBIG)
    if C.INT64_MAX - sn.l1_size * 8 < sn.l1_table_offset or \
            sn.l1_table_offset & (img.cluster_size - 1):
        raise SnapshotError("Snapshot L1 table offset invalid", errno.EINVAL)


def _read_l1(img: WritableQcow2Image, sn: SnapshotEntry) -> array[int]:
    _validate_l1(img, sn)
    if not sn.l1_size:
        return array("Q")
    raw = img.store.pread(sn.l1_table_offset, sn.l1_size * 8)
    t = array("Q")
    t.frombytes(raw + bytes(sn.l1_size * 8 - len(raw)))
    if byteorder == "little":
        t.byteswap()
    return t


def _table_length(img: WritableQcow2Image) -> int:
    """Byte length of the snapshot table on disk (QEMU's snapshots_size), entry by entry, so
    that names shortened at a NUL byte still free the whole old table."""
    h = img.header
    pos = 0
    for _ in range(h.nb_snapshots):
        pos = (pos + 7) & ~7
        hdr = img.store.pread(h.snapshots_offset + pos, 40)
        if len(hdr) < 40:
            raise InvalidImageError("Snapshot table is truncated")
        id_size, name_size = struct.unpack_from(">HH", hdr, 12)
        (extra_size,) = struct.unpack_from(">I", hdr, 36)
        if extra_size > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise ImageLimitError("Too much extra metadata in snapshot table entry")
        pos += 40 + extra_size + id_size + name_size
    return pos


def _free(img: WritableQcow2Image, host_offset: int, length: int) -> list[tuple[int, int]]:
    """Drop one reference from the clusters of [host_offset, +length); returns freed ranges."""
    if length <= 0:
        return []
    rc = img.refcounts
    cb = img.cluster_bits
    first = host_offset >> cb
    last = (host_offset + length - 1) >> cb
    for ci in range(first, last + 1):
        if rc.get(ci) < 1:
            raise SnapshotError(f"Refcount of cluster {c_hex(ci)} would drop below zero",
                                errno.EINVAL)
    rc.increase(first << cb, (last - first + 1) << cb, -1)
    return _zero_runs(img, range(first, last + 1))


def _zero_runs(img: WritableQcow2Image, clusters: Iterable[int]) -> list[tuple[int, int]]:
    rc = img.refcounts
    cs = img.cluster_size
    out: list[tuple[int, int]] = []
    for ci in sorted(clusters):
        if rc.get(ci):
            continue
        if out and out[-1][0] + out[-1][1] == ci * cs:
            out[-1] = (out[-1][0], out[-1][1] + cs)
        else:
            out.append((ci * cs, cs))
    return out


def _punch(img: WritableQcow2Image, freed: list[tuple[int, int]]) -> None:
    # Only once the refcount drop is durable may the space go back to the file system (the
    # writer's rule for every free).
    size = img.store.size()
    for off, length in freed:
        if off + length <= size:
            img.store.punch_hole(off, length)


def _write_table(img: WritableQcow2Image, entries: list[SnapshotEntry]) -> None:
    """qcow2_write_snapshots(): the whole table goes to a new area, then the header points
    to it, then the old area is freed; a crash in between only leaks one of the two."""
    h = img.header
    rc = img.refcounts
    cs = img.cluster_size
    data = encode_snapshot_table(entries, 0)  # a cluster-aligned table aligns like offset 0
    if len(data) > C.QCOW_MAX_SNAPSHOTS_TABLE_BYTES:
        raise SnapshotError("Snapshot table is too big", errno.EFBIG)
    old_offset, old_length = h.snapshots_offset, _table_length(img)
    if data:
        new_offset = rc.alloc_clusters(-(-len(data) // cs))
    else:
        # QEMU "allocates" zero bytes: the offset of the next free-cluster search, nothing
        # is reserved (often 0 once the last snapshot is gone).
        new_offset = rc.free_cluster_index << img.cluster_bits
    rc.flush_blocks()
    if data:
        img._check_overlap(new_offset, len(data))
        # Exactly the table's bytes, as QEMU writes them: the file may end mid-cluster.
        img.store.pwrite(new_offset, data)
        img.store.flush()
    img.store.pwrite(60, struct.pack(">IQ", len(entries), new_offset))
    img.store.flush()
    h.nb_snapshots, h.snapshots_offset = len(entries), new_offset
    img.snapshots = entries
    img._meta_clusters = None
    if old_length:
        freed = _free(img, old_offset, old_length)
        rc.flush_blocks()
        _punch(img, freed)


def _write_l2_tables(img: WritableQcow2Image, tables: dict[int, array[int]]) -> None:
    if not tables:
        return
    for off in sorted(tables):
        img.store.pwrite(off, _be(tables[off]))
    img.store.flush()


def _write_l1(img: WritableQcow2Image, offset: int, l1: array[int]) -> None:
    if len(l1):
        img.store.pwrite(offset, _be(l1))
        img.store.flush()


# ----------------------------------------------------------------------------- refcount walk
def _tree_refs(img: WritableQcow2Image, l1: array[int]) -> dict[int, int]:
    """How many references the tree of `l1` holds on each host cluster (its L2 tables, data
    clusters, and the clusters compressed data spans). Offsets are validated here, before
    anything is changed, with the messages QEMU signals corruption with."""
    cs = img.cluster_size
    cb = img.cluster_bits
    step = 2 if img.extended_l2 else 1
    layout = img.compressed_layout
    counts: dict[int, int] = {}
    get = counts.get
    for i, e in enumerate(l1):
        l2 = e & C.L1E_OFFSET_MASK
        if not l2:
            continue
        if l2 & (cs - 1):
            raise CorruptImageError(
                f"L2 table offset {c_hex(l2)} unaligned (L1 index: {c_hex(i)})", offset=l2)
        table = img.l2_cache.get(l2)
        for j in range(0, len(table), step):
            ent = table[j]
            if not ent:
                continue
            if ent & _COMPRESSED:
                coff, csize = layout.decode(ent)
                for ci in range(coff >> cb, ((coff + csize - 1) >> cb) + 1):
                    counts[ci] = get(ci, 0) + 1
                continue
            off = ent & C.L2E_OFFSET_MASK
            if not off:
                continue  # unallocated or ZERO_PLAIN
            if off & (cs - 1):
                raise CorruptImageError(
                    f"Cluster allocation offset {c_hex(off)} unaligned (L2 offset: "
                    f"{c_hex(l2)}, L2 index: {c_hex(j // step)})", offset=off)
            counts[off >> cb] = get(off >> cb, 0) + 1
        counts[l2 >> cb] = get(l2 >> cb, 0) + 1
    return counts


def _check_refs(img: WritableQcow2Image, *changes: tuple[dict[int, int], int]) -> None:
    """Refuse before touching anything if applying the changes in order would overflow a
    refcount or drop one below zero (QEMU fails midway with EINVAL and leaves the clusters it
    already counted leaked)."""
    from .refcount import RefcountOverflowError

    rc = img.refcounts
    current: dict[int, int] = {}
    for counts, addend in changes:
        for ci, n in counts.items():
            cur = current.get(ci)
            if cur is None:
                cur = rc.get(ci)
            new = cur + addend * n
            if new > rc.refcount_max:
                raise RefcountOverflowError(
                    f"Refcount of cluster {c_hex(ci)} would exceed {rc.refcount_max}")
            if new < 0:
                raise SnapshotError(
                    f"Refcount of cluster {c_hex(ci)} would drop below zero", errno.EINVAL)
            current[ci] = new


def _apply_refs(img: WritableQcow2Image, counts: dict[int, int], addend: int
                ) -> list[tuple[int, int]]:
    """Add addend x count to every counted cluster, in runs; returns the ranges freed."""
    rc = img.refcounts
    cb = img.cluster_bits
    keys = sorted(counts)
    i = 0
    while i < len(keys):
        start = keys[i]
        n = counts[start]
        j = i + 1
        while j < len(keys) and keys[j] == start + (j - i) and counts[keys[j]] == n:
            j += 1
        rc.increase(start << cb, (j - i) << cb, addend * n)
        i = j
    return _zero_runs(img, keys) if addend < 0 else []


def _recompute_copied(img: WritableQcow2Image, l1: array[int]
                      ) -> tuple[bool, dict[int, array[int]]]:
    """COPIED := (refcount == 1) on every L1 and L2 entry of the tree, as QEMU's walk does
    (compressed, zero-plain and unallocated entries lose it). Returns whether the L1 changed
    and the L2 tables that changed and are still in use (a freed table is not written)."""
    rc = img.refcounts
    cb = img.cluster_bits
    step = 2 if img.extended_l2 else 1
    dirty: dict[int, array[int]] = {}
    l1_modified = False
    for i, e in enumerate(l1):
        l2 = e & C.L1E_OFFSET_MASK
        if not l2:
            continue
        l2_refs = rc.get(l2 >> cb)
        table = img.l2_cache.get(l2)
        changed = False
        for j in range(0, len(table), step):
            ent = table[j]
            if not ent:
                continue
            new = ent & ~_COPIED
            if not new & _COMPRESSED:
                off = new & C.L2E_OFFSET_MASK
                if off and rc.get(off >> cb) == 1:
                    new |= _COPIED
            if new != ent:
                table[j] = new
                changed = True
        if changed and l2_refs:
            dirty[l2] = table
        new_e = l2 | (_COPIED if l2_refs == 1 else 0)
        if new_e != e:
            l1[i] = new_e
            l1_modified = True
    return l1_modified, dirty


# ----------------------------------------------------------------------------- operations
def _run(img: WritableQcow2Image, fn: Callable[[], T]) -> T:
    """Run an operation on a consistent image: everything pending is made durable first, and
    metadata corruption found on the way marks the image corrupt, as the writer does."""
    if img.corrupt:
        raise CorruptImageError("Image is corrupt; cannot be written to", fatal=False)
    img.flush()
    try:
        return fn()
    except CorruptImageError as e:
        if e.fatal and not img.corrupt:
            img._mark_corrupt()
        raise
    finally:
        # Tables may have been freed and their clusters will be reused: nothing cached about
        # them may survive.
        img.l2_cache.clear()
        img._meta_clusters = None
        img._zlib_cache_key = None


def _no_data_file(img: WritableQcow2Image) -> None:
    if img.has_data_file:
        raise SnapshotError("internal snapshots are not supported with an external data file",
                            errno.ENOTSUP)


def create_snapshot(img: WritableQcow2Image, name: str, *, date_sec: int | None = None,
                    date_nsec: int | None = None, vm_clock_nsec: int = 0,
                    icount: int | None = 0) -> SnapshotEntry:
    """qcow2_snapshot_create() as `qemu-img snapshot -c` calls it (no VM state).

    The new snapshot gets the next free ID; names need not be unique. Dates default to now
    at microsecond resolution, as qemu-img records them; icount 0 is what qemu-img writes
    (None means "not recorded", stored as -1).
    """
    raw_name = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw_name:
        raise ValueError("a snapshot name cannot contain a NUL byte")
    if len(raw_name) > SNAPSHOT_NAME_MAX_BYTES:
        raise ImageLimitError(
            f"snapshot names are limited to {SNAPSHOT_NAME_MAX_BYTES} bytes (QEMU's buffer)")
    if date_sec is None or date_nsec is None:
        now_us = time.time_ns() // 1000
        date_sec = now_us // 1_000_000 if date_sec is None else date_sec
        date_nsec = (now_us % 1_000_000) * 1000 if date_nsec is None else date_nsec
    if not (0 <= date_sec <= 0xFFFFFFFF and 0 <= date_nsec <= 0xFFFFFFFF
            and 0 <= vm_clock_nsec < 1 << 64):
        raise ValueError("snapshot date or VM clock out of range")
    sec, nsec = date_sec, date_nsec

    def op() -> SnapshotEntry:
        _no_data_file(img)
        if len(img.snapshots) >= QCOW_MAX_SNAPSHOTS:
            raise SnapshotError("Too many snapshots", errno.EFBIG)
        rc = img.refcounts
        l1 = img.l1_table
        counts = _tree_refs(img, l1)
        _check_refs(img, (counts, 1))
        nbytes = img.l1_size * 8
        if nbytes:
            l1_offset = rc.alloc_clusters(-(-nbytes // img.cluster_size))
            img._check_overlap(l1_offset, nbytes)
            # The copy keeps the active entries' COPIED bits, byte for byte as QEMU's.
            img.store.pwrite(l1_offset, _be(l1))
        else:
            l1_offset = rc.free_cluster_index << img.cluster_bits
        # The tree's refcounts are durable before the entries lose COPIED, and both before
        # the table entry that makes the second reference real.
        _apply_refs(img, counts, 1)
        rc.flush_blocks()
        l1_modified, dirty = _recompute_copied(img, l1)
        _write_l2_tables(img, dirty)
        if l1_modified:
            _write_l1(img, img.header.l1_table_offset, l1)
        sn = SnapshotEntry(l1_table_offset=l1_offset, l1_size=img.l1_size,
                           id_str=_new_id(img.snapshots), name=name, date_sec=sec,
                           date_nsec=nsec, vm_clock_nsec=vm_clock_nsec, vm_state_size=0,
                           extra_data_size=24, vm_state_size_large=0,
                           disk_size=img.virtual_size,
                           icount=-1 if icount is None else icount)
        _write_table(img, [*_complete(img, img.snapshots), sn])
        return sn

    return _run(img, op)


def _complete(img: WritableQcow2Image, entries: list[SnapshotEntry]) -> list[SnapshotEntry]:
    """Entries as QEMU rewrites them: the fields an old, short extra-data area lacks get the
    values QEMU assumed when reading (disk size = current size, icount = -1)."""
    for e in entries:
        if e.disk_size is None:
            e.disk_size = img.virtual_size
        if e.vm_state_size_large is None:
            e.vm_state_size_large = e.vm_state_size
    return list(entries)


def apply_snapshot(img: WritableQcow2Image, name_or_id: str) -> SnapshotEntry:
    """qcow2_snapshot_goto(): the active L1 becomes a copy of the snapshot's (the ID is tried
    first, then the name), and the virtual size the one recorded in the snapshot."""

    def op() -> SnapshotEntry:
        _no_data_file(img)
        sn = find_by_id_or_name(img.snapshots, name_or_id)
        _validate_l1(img, sn)
        disk_size = img.virtual_size if sn.disk_size is None else sn.disk_size
        if disk_size != img.virtual_size:
            try:
                img.resize(disk_size)
            except (Qcow2Error, ValueError) as e:
                code = error_code(e)
                raise SnapshotError(str(e), code, reports=(str(e),)) from e
            img.flush()
        if sn.l1_size > img.l1_size:
            img._grow_l1(sn.l1_size)
        sn_l1 = _read_l1(img, sn)
        old_l1 = img.l1_table
        new_l1 = array("Q", sn_l1)
        new_l1.extend([0] * (img.l1_size - len(new_l1)))
        new_counts = _tree_refs(img, new_l1)
        old_counts = _tree_refs(img, old_l1)
        _check_refs(img, (new_counts, 1), (old_counts, -1))
        rc = img.refcounts
        # 1. The snapshot's tree gains the active reference before the active L1 points to
        #    it; its tables' COPIED flags are recomputed (and its L1 rewritten) as QEMU does.
        _apply_refs(img, new_counts, 1)
        rc.flush_blocks()
        sn_modified, dirty = _recompute_copied(img, sn_l1)
        _write_l2_tables(img, dirty)
        if sn_modified:
            _write_l1(img, sn.l1_table_offset, sn_l1)
        # 2. The active L1 is overwritten in place. Unlike QEMU, which copies the snapshot's
        #    stale COPIED bits here and fixes them only at the end, every COPIED is cleared:
        #    a crash before step 4 then cannot leave an in-place write into a shared table.
        for i, entry in enumerate(new_l1):
            new_l1[i] = entry & ~_COPIED
        _write_l1(img, img.header.l1_table_offset, new_l1)
        img.l1_table = new_l1
        # 3. The old tree loses the active reference; what nothing else uses is freed.
        freed = _apply_refs(img, old_counts, -1)
        rc.flush_blocks()
        _punch(img, freed)
        _, dirty = _recompute_copied(img, old_l1)
        _write_l2_tables(img, dirty)
        # 4. COPIED of the new active tree, once the refcounts it follows are durable.
        _fix_active_copied(img)
        return sn

    return _run(img, op)


def _fix_active_copied(img: WritableQcow2Image) -> None:
    l1_modified, dirty = _recompute_copied(img, img.l1_table)
    _write_l2_tables(img, dirty)
    if l1_modified:
        _write_l1(img, img.header.l1_table_offset, img.l1_table)


def delete_snapshot(img: WritableQcow2Image, name_or_id: str | None = None, *,
                    snapshot_id: str | None = None, name: str | None = None
                    ) -> SnapshotEntry:
    """qcow2_snapshot_delete(). `name_or_id` matches an ID first, then a name; `snapshot_id`
    and/or `name` match exactly (both when both are given). `qemu-img snapshot -d X` is
    `name=X` (it never matches IDs)."""
    if name_or_id is None and snapshot_id is None and name is None:
        raise ValueError("snapshot_id and name are both NULL")

    def op() -> SnapshotEntry:
        _no_data_file(img)
        if name_or_id is not None:
            sn = find_by_id_or_name(img.snapshots, name_or_id)
        else:
            sn = find_by_id_and_name(img.snapshots, snapshot_id, name)
        sn_l1 = _read_l1(img, sn)
        counts = _tree_refs(img, sn_l1)
        l1_clusters: dict[int, int] = {}
        if sn.l1_size:
            cb = img.cluster_bits
            first = sn.l1_table_offset >> cb
            last = (sn.l1_table_offset + sn.l1_size * 8 - 1) >> cb
            l1_clusters = dict.fromkeys(range(first, last + 1), 1)
        _check_refs(img, (counts, -1), (l1_clusters, -1))
        rc = img.refcounts
        # 1. The table without the entry: from here on the snapshot's tree is only leaked.
        _write_table(img, _complete(img, [s for s in img.snapshots if s is not sn]))
        # 2. Its references go; clusters now used once get COPIED only after the drop is
        #    durable (QEMU writes the flags first; either order is harmless at this point).
        freed = _apply_refs(img, counts, -1)
        rc.flush_blocks()
        _punch(img, freed)
        _, dirty = _recompute_copied(img, sn_l1)
        _write_l2_tables(img, dirty)
        # 3. Its L1 table.
        freed = _free(img, sn.l1_table_offset, sn.l1_size * 8)
        rc.flush_blocks()
        _punch(img, freed)
        # 4. The active tree's COPIED flags.
        _fix_active_copied(img)
        return sn

    return _run(img, op)
