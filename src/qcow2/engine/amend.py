"""Amending the options of a writable qcow2 image in place, as `qemu-img amend` does
(qcow2_amend_options of QEMU 7.2): version upgrade and downgrade (with zero-cluster
expansion), a new refcount width (every refcount structure rebuilt), lazy refcounts, the
external data file name and data-file-raw, and the virtual size.

The order of operations is QEMU's: upgrade first (other features may need v3), then the
refcount width, the data file fields and a header rewrite, the backing file check, lazy
refcounts, the size, and the downgrade last (so that the rest can be undone before it).

Crash safety. The refcount width change builds the new structures beside the old ones: the
new refblocks and table are allocated (and so counted) in the old structures, written and
made durable, and only then does one header write switch to them; the old structures are
freed afterwards in the new ones. A crash before the switch leaks the new clusters, after it
the old ones. Zero-cluster expansion writes the zeros and the refcounts of new clusters and
makes them durable before the L2 entry that uses them.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Callable, Mapping
from sys import byteorder
from typing import TYPE_CHECKING, Any

from .._record import record
from ..errors import CorruptImageError, Qcow2Error, c_hex
from ..format import constants as C
from ..format.header import QEMU_HEADER_LENGTH, encode_qemu_header
from .refcount import Refcounts

if TYPE_CHECKING:
    from .writer import WritableQcow2Image

# (offset done, total work) of the operation in progress, as QEMU's BlockDriverAmendStatusCB
StatusCallback = Callable[[int, int], None]

_NO_OP, _UPGRADING, _REFCOUNT_ORDER, _DOWNGRADING = range(4)


class AmendError(Qcow2Error):
    """An amend refused or failed where qemu-img's fails: `message` is its error line,
    `hint` the text it prints after it (with its newline), `errno` QEMU's return code."""

    def __init__(self, message: str, code: int = errno.EINVAL, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.errno = code
        self.hint = hint


@record
class AmendOptions:
    """The amendable options, as `qemu-img amend -o` names them; None: not given.

    `compat` is "0.10"/"v2" or "1.1"/"v3"; an empty `data_file` removes the name from the
    header; `encrypt` holds the encrypt.* options (only LUKS images accept them)."""

    size: int | None = None
    compat: str | None = None
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool | None = None
    lazy_refcounts: bool | None = None
    refcount_bits: int | None = None
    encrypt: dict[str, str] | None = None


def options_from_kwargs(options: Mapping[str, Any]) -> AmendOptions:
    """API keywords (qemu-img's option names, '-' or '_') to AmendOptions."""
    opts = AmendOptions()
    known = {"size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
             "lazy_refcounts", "refcount_bits"}
    encrypt: dict[str, str] = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name.startswith("encrypt."):
            encrypt[name] = str(value)
        elif name in known:
            if name == "compat" and value is not None:
                value = str(value)
            setattr(opts, name, value)
        else:
            raise AmendError(f"Invalid parameter '{key}'")
    opts.encrypt = encrypt or None
    return opts


class _Helper:
    """qcow2_amend_helper_cb: one 0..total progress over every operation of the amend."""

    def __init__(self, cb: StatusCallback | None, total_operations: int) -> None:
        self.cb = cb
        self.total = total_operations
        self.current = _NO_OP
        self.last = _NO_OP
        self.done_ops = 0
        self.offset_completed = 0
        self.last_work = 0

    def __call__(self, offset: int, work: int) -> None:
        if self.cb is None:
            return
        if self.current != self.last:
            if self.last != _NO_OP:
                self.offset_completed += self.last_work
                self.done_ops += 1
            self.last = self.current
        self.last_work = work
        current_work = self.offset_completed + work
        projected = current_work * (self.total - self.done_ops - 1) // (self.done_ops + 1)
        self.cb(self.offset_completed + offset, current_work + projected)


# ----------------------------------------------------------------------------- entry point
def amend(img: WritableQcow2Image, opts: AmendOptions, status: StatusCallback | None = None,
          force: bool = False) -> None:
    """Apply `opts` to the open image (qcow2_amend_options). Raises AmendError with
    qemu-img's message; what was done before the failing step stays done, as in QEMU."""
    from .snapshot import _run

    # the snapshot operations' frame: pending writes flushed first, metadata corruption
    # found on the way marks the image corrupt, no cached table survives
    _run(img, lambda: _amend(img, opts, status, force))


def _amend(img: WritableQcow2Image, opts: AmendOptions, status: StatusCallback | None,
           force: bool) -> None:
    h = img.header
    old_version = new_version = h.version
    # The checks of QEMU's option loop, in the order of its option list.
    if opts.encrypt:
        # Only LUKS images have amendable encryption options, and we open none.
        raise AmendError("Can't amend encryption options - encryption not present")
    if opts.compat is not None:
        if opts.compat in ("0.10", "v2"):
            new_version = 2
        elif opts.compat in ("1.1", "v3"):
            new_version = 3
        else:
            raise AmendError(f"Unknown compatibility level {opts.compat}")
    if opts.data_file is not None and not img.has_data_file:
        raise AmendError("data-file can only be set for images that use an external data file")
    data_file_raw = img.data_file_raw
    if opts.data_file_raw is not None:
        data_file_raw = opts.data_file_raw
        if data_file_raw and not img.data_file_raw:
            raise AmendError("data-file-raw cannot be set on existing images")
    refcount_bits = h.refcount_bits
    if opts.refcount_bits is not None:
        refcount_bits = opts.refcount_bits
        if not 0 < refcount_bits <= 64 or refcount_bits & (refcount_bits - 1):
            raise AmendError("Refcount width must be a power of two and may not exceed 64 bits")
    lazy = img.lazy_refcounts if opts.lazy_refcounts is None else opts.lazy_refcounts

    helper = _Helper(status, (new_version != old_version) + (refcount_bits != h.refcount_bits))

    if new_version > old_version:
        helper.current = _UPGRADING
        _upgrade(img, helper)

    if refcount_bits != h.refcount_bits:
        if new_version < 3 and refcount_bits != 16:
            raise AmendError("Refcount widths other than 16 bits require compatibility level "
                             "1.1 or above (use compat=1.1 or greater)")
        helper.current = _REFCOUNT_ORDER
        change_refcount_order(img, refcount_bits.bit_length() - 1,
                              helper if status is not None else None)

    # data-file-raw blocks backing files, so it is cleared before anything else.
    if data_file_raw:
        h.autoclear_features |= C.QCOW2_AUTOCLEAR_DATA_FILE_RAW
    else:
        h.autoclear_features &= ~C.QCOW2_AUTOCLEAR_DATA_FILE_RAW
    img.data_file_raw = data_file_raw
    if opts.data_file is not None:
        img.data_file_name = opts.data_file or None
        img.extensions.data_file = opts.data_file or None
    update_header(img)

    given = opts.backing_file is not None or opts.backing_fmt is not None
    if given and (opts.backing_file != img.backing_file or
                  opts.backing_fmt != img.backing_format):
        raise AmendError("Cannot amend the backing file",
                             hint="You can use 'qemu-img rebase' instead.\n")

    if lazy != img.lazy_refcounts:
        if lazy:
            if new_version < 3:
                raise AmendError("Lazy refcounts only supported with compatibility level 1.1 "
                                 "and above (use compat=1.1 or greater)")
            h.compatible_features |= C.QCOW2_COMPAT_LAZY_REFCOUNTS
            update_header(img)
            img.lazy_refcounts = True
        else:
            mark_clean(img)
            h.compatible_features &= ~C.QCOW2_COMPAT_LAZY_REFCOUNTS
            update_header(img)
            img.lazy_refcounts = False

    if opts.size:
        # Amending makes the image exactly the size given (an exact truncate).
        img._guard(img._resize_impl, opts.size)
        img.flush()

    if new_version < old_version:
        helper.current = _DOWNGRADING
        if img._bitmaps_kept:
            # QEMU leaves them in a v2 image, where they can only be inconsistent
            img._drop_bitmaps()
        _downgrade(img, helper)


# ----------------------------------------------------------------------------- header
def update_header(img: WritableQcow2Image) -> None:
    """qcow2_update_header(): the whole first cluster rewritten from the in-memory state."""
    img.store.pwrite(0, encode_qemu_header(img.header, img.extensions, img.backing_file))
    img.store.flush()
    img._meta_clusters = None


def mark_clean(img: WritableQcow2Image) -> None:
    """qcow2_mark_clean(): with everything flushed, the dirty bit can go."""
    if img.header.incompatible_features & C.QCOW2_INCOMPAT_DIRTY:
        img.header.incompatible_features &= ~C.QCOW2_INCOMPAT_DIRTY
        img.flush()
        update_header(img)
        img.dirty = False


# ----------------------------------------------------------------------------- versions
def _upgrade(img: WritableQcow2Image, status: Callable[[int, int], None]) -> None:
    """compat 0.10 -> 1.1: snapshots get the extra data v3 requires, then the header."""
    from .snapshot import _complete, _write_table

    status(0, 2)
    if any(sn.extra_data_size < 16 for sn in img.snapshots):
        entries = _complete(img, list(img.snapshots))
        for e in entries:
            if e.icount is None:
                e.icount = -1
        _write_table(img, entries)
    status(1, 2)
    h = img.header
    h.version = 3
    h.header_length = QEMU_HEADER_LENGTH
    h.tail_bytes = bytes(QEMU_HEADER_LENGTH - 105)
    h.compression_type = C.QCOW2_COMPRESSION_TYPE_ZLIB
    h.incompatible_features = h.compatible_features = 0
    h.autoclear_features = 0
    h.refcount_order = 4
    update_header(img)
    status(2, 2)


def _downgrade(img: WritableQcow2Image, status: Callable[[int, int], None]) -> None:
    """compat 1.1 -> 0.10 (qcow2_downgrade)."""
    h = img.header
    if h.refcount_order != 4:
        raise AmendError("compat=0.10 requires refcount_bits=16", errno.ENOTSUP)
    if img.has_data_file:
        raise AmendError("Cannot downgrade an image with a data file", errno.ENOTSUP)
    # Other v2 programs would not know that these snapshots differ from the image.
    for sn in img.snapshots:
        disk_size = sn.disk_size if sn.disk_size is not None else img.virtual_size
        if sn.effective_vm_state_size > 0xFFFFFFFF or disk_size != img.virtual_size:
            raise AmendError("Internal snapshots prevent downgrade of image", errno.ENOTSUP)
    if h.incompatible_features & C.QCOW2_INCOMPAT_DIRTY:
        mark_clean(img)
    other = h.incompatible_features & ~C.QCOW2_INCOMPAT_COMPRESSION
    if other:
        raise AmendError(f"Cannot downgrade an image with incompatible features {other:#x} set",
                         errno.ENOTSUP)
    h.compatible_features = 0
    h.autoclear_features = 0
    img.lazy_refcounts = False
    expand_zero_clusters(img, status)
    if h.incompatible_features & C.QCOW2_INCOMPAT_COMPRESSION:
        if _has_compressed_clusters(img):
            raise AmendError("Cannot downgrade an image with zstd compression type and "
                             "existing compressed clusters", errno.ENOTSUP)
        h.incompatible_features &= ~C.QCOW2_INCOMPAT_COMPRESSION
        h.compression_type = C.QCOW2_COMPRESSION_TYPE_ZLIB
    h.version = 2
    h.header_length = 72
    h.tail_bytes = b""
    update_header(img)


def _has_compressed_clusters(img: WritableQcow2Image) -> bool:
    """Whether the active layer maps any compressed cluster (the snapshots are not looked at)."""
    from .image import _COMPRESSED

    return any(kind == _COMPRESSED for _, _, kind, _ in img._map_runs(0, img.virtual_size))


# ----------------------------------------------------------------------------- zero clusters
def expand_zero_clusters(img: WritableQcow2Image, status: Callable[[int, int], None]) -> None:
    """qcow2_expand_zero_clusters(): v2 has no zero flag, so every zero cluster of the active
    and the snapshot L2 tables becomes unallocated (no backing file: reads zeros anyway) or a
    data cluster full of zeros (its own one if it had none)."""
    total = img.l1_size + sum(sn.l1_size for sn in img.snapshots)
    visited = [0]
    img.l2_cache.clear()
    _expand_in_l1(img, img.l1_table, visited, total, status)
    from .snapshot import _read_l1

    for sn in list(img.snapshots):
        l1 = _read_l1(img, sn)
        _expand_in_l1(img, l1, visited, total, status)
    img.store.flush()


def _expand_in_l1(img: WritableQcow2Image, l1: array[int], visited: list[int], total: int,
                  status: Callable[[int, int], None]) -> None:
    cs = img.cluster_size
    rc = img.refcounts
    for i, l1e in enumerate(l1):
        l2_offset = l1e & C.L1E_OFFSET_MASK
        if l2_offset:
            if l2_offset & (cs - 1):
                raise CorruptImageError(f"L2 table offset {c_hex(l2_offset)} unaligned "
                                        f"(L1 index: {c_hex(i)})", offset=l2_offset)
            _expand_in_l2(img, l2_offset, rc.get(l2_offset >> img.cluster_bits))
        visited[0] += 1
        status(visited[0], total)


def _expand_in_l2(img: WritableQcow2Image, l2_offset: int, l2_refcount: int) -> None:
    cs = img.cluster_size
    rc = img.refcounts
    raw = img.store.pread(l2_offset, cs)
    table = array("Q")
    table.frombytes(raw + bytes(cs - len(raw)))
    if byteorder == "little":
        table.byteswap()
    changed = False
    dropped: list[int] = []
    for j, e in enumerate(table):
        if not e & C.QCOW_OFLAG_ZERO or e & C.QCOW_OFLAG_COMPRESSED:
            continue
        offset = e & C.L2E_OFFSET_MASK
        if offset & (cs - 1):
            raise CorruptImageError(
                f"Cluster allocation offset {c_hex(offset)} unaligned (L2 offset: "
                f"{c_hex(l2_offset)}, L2 index: {c_hex(j)})", offset=offset)
        if offset and rc.get(offset >> img.cluster_bits) > l2_refcount:
            # Deliberately unlike QEMU 7.2, which zeroes such a cluster in place: another
            # L2 table (a snapshot's) still reads its data, so this entry lets go of it and
            # is expanded as if it had no cluster. (Through a table shared by l2_refcount
            # L1 tables, the cluster's refcount is l2_refcount without any other user.)
            dropped.append(offset)
            offset = 0
        if not offset:  # ZERO_PLAIN
            if img.backing is None:
                table[j] = 0
                changed = True
                continue
            offset = rc.alloc_clusters(1)
            if l2_refcount > 1:
                # a shared L2 table: every table referring to it now uses the cluster
                rc.increase(offset, cs, l2_refcount - 1)
        img._check_metadata_write(offset, cs)
        img._ensure_file_covers(offset + cs)
        img.store.pwrite(offset, bytes(cs))
        table[j] = offset | (C.QCOW_OFLAG_COPIED if l2_refcount == 1 else 0)
        changed = True
    if not changed:
        return
    # zeros and refcounts first, then the L2 table that points at them
    rc.flush_blocks()
    img.store.flush()
    img._check_l2_target(l2_offset)
    out = array("Q", table)
    if byteorder == "little":
        out.byteswap()
    img.store.pwrite(l2_offset, out.tobytes())
    img.store.flush()
    # the references this table let go of, only now that it no longer uses them
    for offset in dropped:
        rc.increase(offset, cs, -l2_refcount)
    if dropped:
        rc.flush_blocks()


# ----------------------------------------------------------------------------- refcount width
def change_refcount_order(img: WritableQcow2Image, new_order: int,
                          status: Callable[[int, int], None] | None = None) -> None:
    """qcow2_change_refcount_order(): new refblocks and table of the new width, allocated in
    the old structures (repeated until an allocation pass allocates nothing more), written,
    then switched to with one header write; the old structures are freed last."""
    rc = img.refcounts
    cs = img.cluster_size
    walker = _Walker(img, new_order, status)
    new_rt_offset = 0
    allocated_rt_entries = 0
    walk_index = 0
    try:
        while True:
            walker.allocated = False
            total_walks = max(walk_index + 2, 3)
            walker.walk(False, walk_index, total_walks)
            walk_index += 1
            if not walker.allocated:
                break
            if new_rt_offset:
                rc.increase(new_rt_offset, allocated_rt_entries * 8, -1)
            new_rt_offset = rc.alloc_clusters(-(-len(walker.table) * 8 // cs))
            allocated_rt_entries = len(walker.table)
        walker.walk(True, walk_index, walk_index + 1)
        table = array("Q", walker.table)
        if byteorder == "little":
            table.byteswap()
        img._check_metadata_write(new_rt_offset, len(walker.table) * 8)
        img.store.pwrite(new_rt_offset, table.tobytes())
        rc.flush_blocks()
        img.store.flush()
    except BaseException:
        # Nothing points at the new structures yet: give their clusters back.
        try:
            for off in walker.table:
                if off:
                    rc.increase(off, cs, -1)
            if new_rt_offset:
                rc.increase(new_rt_offset, allocated_rt_entries * 8, -1)
            rc.flush_blocks()
        except (Qcow2Error, OSError):
            pass  # only leaks are left behind
        raise
    h = img.header
    old_table = array("Q", rc.table)
    old_rt_offset, old_rt_clusters = rc.table_offset, rc.table_clusters
    h.refcount_order = new_order
    h.refcount_table_offset = new_rt_offset
    h.refcount_table_clusters = len(walker.table) * 8 // cs
    update_header(img)
    new_rc = Refcounts(img.store, img.cluster_bits, new_order, new_rt_offset,
                       h.refcount_table_clusters, img._set_header_reftable)
    new_rc.free_cluster_index = rc.free_cluster_index
    new_rc.on_new_block = rc.on_new_block
    new_rc.overlap_check = rc.overlap_check
    img.refcounts = new_rc
    img._meta_clusters = None
    for e in old_table:
        off = e & C.REFT_OFFSET_MASK
        if off:
            new_rc.increase(off, cs, -1)
    new_rc.increase(old_rt_offset, old_rt_clusters * cs, -1)
    new_rc.flush_blocks()


class _Walker:
    """walk_over_reftable(): the old refcounts in order, cut into blocks of the new width.

    QEMU steps cluster by cluster and calls the per-block operation just before the first
    cluster of the next block (or at the end); allocations made by that operation change
    refcounts the walk reads later. Here the steps are runs that never cross an old or a new
    block boundary, which is the same thing: nothing changes inside such a run.
    """

    def __init__(self, img: WritableQcow2Image, new_order: int,
                 status: Callable[[int, int], None] | None) -> None:
        import numpy

        from .check import decode_refblock_np, encode_refblock_np

        self.img = img
        self.np = numpy
        self.decode = decode_refblock_np
        self.encode = encode_refblock_np
        self.new_order = new_order
        self.new_bits = 1 << new_order
        self.new_per_block = 1 << (img.cluster_bits + 3 - new_order)
        self.status = status
        self.table: list[int] = []
        self.allocated = False
        self.values: Any = None
        self.index = 0
        self.filled = 0
        self.empty = True
        self._decoded: tuple[int, int, Any] | None = None  # (block offset, generation, values)
        self._generation = 0

    def _old_values(self, block_offset: int) -> Any:
        d = self._decoded
        if d is not None and d[0] == block_offset and d[1] == self._generation:
            return d[2]
        rc = self.img.refcounts
        vals = self.decode(self.np, bytes(rc._load(block_offset)), rc.refcount_order)
        self._decoded = (block_offset, self._generation, vals)
        return vals

    def _finish(self, write: bool, index: int, empty: bool) -> None:
        if write:
            self._flush_block(index, empty)
        else:
            self._alloc_block(index, empty)

    def _alloc_block(self, index: int, empty: bool) -> None:
        if empty:
            return
        cs = self.img.cluster_size
        if index >= len(self.table):
            per = cs // 8
            size = -(-(index + 1) // per) * per
            if size > C.QCOW_MAX_REFTABLE_SIZE // 8:
                raise AmendError("This operation would make the refcount table grow beyond the "
                                 "maximum size supported by QEMU, aborting", errno.ENOTSUP)
            self.table.extend([0] * (size - len(self.table)))
        if not self.table[index]:
            self.table[index] = self.img.refcounts.alloc_clusters(1)
            self.allocated = True
            self._generation += 1

    def _flush_block(self, index: int, empty: bool) -> None:
        if index < len(self.table) and self.table[index]:
            offset = self.table[index]
            self.img._check_metadata_write(offset, self.img.cluster_size)
            self.img.store.pwrite(offset, self.encode(self.np, self.values, self.new_order))
        elif not empty:
            raise AmendError("Refcount block allocation changed while rewriting refcounts",
                             errno.EIO)

    def _next_block(self, write: bool) -> None:
        """The block being filled is complete: run the operation, start the next one."""
        self._finish(write, self.index, self.empty)
        self.index += 1
        self.filled = 0
        if write and not self.empty:
            self.values[:] = 0
        self.empty = True

    def _skip_zeros(self, write: bool, count: int) -> None:
        """`count` clusters whose refcount is 0 (no old refblock): whole empty new blocks
        are passed over arithmetically, as their operations do nothing (an allocation pass
        allocates nothing for them; a write pass still writes one that has a block)."""
        new_pb = self.new_per_block
        if self.filled >= new_pb:
            self._next_block(write)
        take = min(count, new_pb - self.filled)
        self.filled += take
        count -= take
        if not count:
            return
        self._next_block(write)
        full, rem = divmod(count, new_pb)
        first = self.index
        last = self.index + full if rem else self.index + full - 1  # the block left open
        if write:
            for k in range(first, min(last, len(self.table))):
                if self.table[k]:
                    self._flush_block(k, True)
        self.index = last
        self.filled = rem if rem else new_pb

    def walk(self, write: bool, walk_index: int, total_walks: int) -> None:
        img = self.img
        np = self.np
        cs = img.cluster_size
        new_pb = self.new_per_block
        status = self.status
        self._generation += 1  # refcounts changed between walks
        if write:
            self.values = np.zeros(new_pb, dtype=np.uint64)
        self.index = 0      # the new block being filled
        self.filled = 0     # entries of it done
        self.empty = True
        i = 0
        while True:
            rc = img.refcounts
            table = rc.table
            rt_size = len(table)  # may grow while the walk allocates
            if i >= rt_size:
                break
            old_pb = rc.per_block
            block_offset = table[i] & C.REFT_OFFSET_MASK
            if not block_offset:
                run = 1
                if status is None:
                    while i + run < rt_size and not table[i + run] & C.REFT_OFFSET_MASK:
                        run += 1
                else:
                    status(walk_index * rt_size + i, total_walks * rt_size)
                self._skip_zeros(write, run * old_pb)
                i += run
                continue
            if status is not None:
                status(walk_index * rt_size + i, total_walks * rt_size)
            if block_offset & (cs - 1):
                img._mark_corrupt()
                raise AmendError("Image is corrupt (unaligned refblock offset)", errno.EIO)
            pos = 0
            while pos < old_pb:
                if self.filled >= new_pb:
                    self._next_block(write)
                take = min(old_pb - pos, new_pb - self.filled)
                vals = self._old_values(block_offset)[pos:pos + take]
                if self.new_bits < 64:
                    over = np.flatnonzero(vals >> np.uint64(self.new_bits))
                    if len(over):
                        k = int(over[0])
                        cluster = (i << rc.block_bits) + pos + k
                        raise AmendError(
                            f"Cannot decrease refcount entry width to {self.new_bits} "
                            f"bits: Cluster at offset {c_hex(cluster << img.cluster_bits)} "
                            f"has a refcount of {int(vals[k])}")
                if vals.any():
                    self.empty = False
                    if write:
                        self.values[self.filled:self.filled + take] = vals
                self.filled += take
                pos += take
            i += 1
        if self.filled > 0:
            self._finish(write, self.index, self.empty)
            self.index += 1
        if status is not None:
            rt_size = len(img.refcounts.table)
            status((walk_index + 1) * rt_size, total_walks * rt_size)
