"""`commit`: write an image's data into a backing file and empty it (qemu-img 7.2 img_commit).

qemu-img runs QEMU's active-commit (mirror) job: a dirty bitmap of everything allocated above
the base, at a granularity of the base's cluster size clamped to 4..64 KiB, then chunks in
guest order, each copied (data, at most 1 MiB per request), written as zeros (zero ranges
aligned to the base's clusters, with unmap) or copied as zero data (unaligned ones). The base
grows first if the top image is larger. Then, unless the commit drops the top image, it is
emptied as the driver's make_empty does (qcow2: a fresh 3 + L1 clusters file for v3 images
without snapshots, else a full discard of every cluster; qcow: zeroed L1, file truncated).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import Qcow2Error
from ..format import constants as C
from ..format.header import encode_qemu_header
from .rebase import (
    OpenFailed,
    RebaseError,
    allocated_above,
    blk_length,
    chain_status,
)

if TYPE_CHECKING:
    from ..engine.device import BlockDevice
    from ..engine.open import Policy
    from .progress import Progress

MAX_IO_BYTES = 1 << 20
BUF_SIZE = 16 << 20
_DATA = 1
_ZERO = 2


class CommitError(RebaseError):
    """A commit step failed; the message is qemu-img's."""


def find_backing_image(top: BlockDevice, name: str) -> BlockDevice | None:
    """bdrv_find_backing_image(): the layer below `top` that `name` designates, compared with
    the name stored in the layer above it, that name made absolute, or both real paths."""
    from ..engine.open import path_combine

    cur = top
    while cur.backing is not None:
        stored = getattr(cur, "backing_file", None) or ""
        full = path_combine(cur.filename, stored)
        if name in (stored, full):
            return cur.backing
        mine = path_combine(cur.filename, name)
        if os.path.exists(mine) and os.path.exists(full) and \
                os.path.realpath(mine) == os.path.realpath(full):
            return cur.backing
        cur = cur.backing
    return None


def commit(path: str, base: str | None = None, *, drop: bool = False, fmt: str | None = None,
           backing_policy: Policy = "beside", progress: Progress | None = None,
           on_open: Callable[[BlockDevice], None] | None = None) -> None:
    """Commit `path` into `base` (default: its backing file), as qemu-img commit.

    A named base implies drop (the top image is left as it is), as in qemu-img. Raises
    OpenFailed (the image) or CommitError with qemu-img's message.
    """
    from ..engine.open import open_image

    if base is not None:
        drop = True
    try:
        top = open_image(path, fmt, False, backing_policy=backing_policy)
    except (Qcow2Error, OSError) as e:
        raise OpenFailed(path, e) from None
    if on_open is not None:
        on_open(top)
    try:
        if base is not None:
            base_ro = find_backing_image(top, base)
            if base_ro is None:
                raise CommitError(f"Did not find '{base}' in the backing chain of '{path}'")
        else:
            base_ro = top.backing
            if base_ro is None:
                raise CommitError("Image does not have a backing file")
        target = _reopen_writable(top, base_ro, backing_policy)
        _run_commit(top, target, progress)
        if not drop:
            _make_empty(top)
    finally:
        top.close()


def _reopen_writable(top: BlockDevice, base_ro: BlockDevice, policy: Policy) -> BlockDevice:
    """Put a read-write instance of the base in the chain (reads see what was written)."""
    from ..engine.open import open_image

    above = top
    while above.backing is not base_ro:
        assert above.backing is not None
        above = above.backing
    try:
        rw = open_image(base_ro.filename, base_ro.format_name, False, backing_policy=policy)
    except (Qcow2Error, OSError) as e:
        raise CommitError(f"Could not reopen '{base_ro.filename}' read-write: {e}") from None
    base_ro.close()
    above.backing = rw
    return rw


def _granularity(target: BlockDevice) -> int:
    # bdrv_get_default_bitmap_granularity(): the cluster size clamped to 4 KiB..64 KiB; raw
    # reports no cluster size and gets 64 KiB.
    cbits = getattr(target, "cluster_bits", None)
    if target.format_name in ("qcow2", "qcow") and isinstance(cbits, int):
        return min(65536, max(4096, 1 << cbits))
    return 65536


def _target_cluster(target: BlockDevice) -> int:
    cbits = getattr(target, "cluster_bits", None)
    if target.format_name in ("qcow2", "qcow") and isinstance(cbits, int):
        return 1 << cbits
    return 1


def _run_commit(top: BlockDevice, target: BlockDevice, progress: Progress | None) -> None:
    length = blk_length(top)
    if length > blk_length(target):
        _grow(target, length)
    gran = _granularity(target)
    # mirror_dirty_init(): the bitmap of what the layers above the base allocate
    dirty = bytearray((length + gran - 1) // gran)
    offset = 0
    while offset < length:
        alloc, count = allocated_above(top, target, offset, length - offset)
        if alloc:
            for i in range(offset // gran, (offset + count + gran - 1) // gran):
                dirty[i] = 1
        offset += count
    total = sum(dirty) * gran
    done = 0
    tcs = _target_cluster(target)
    chunk = 0
    nchunks = len(dirty)
    while chunk < nchunks:
        if not dirty[chunk]:
            chunk += 1
            continue
        nb = 1
        while chunk + nb < nchunks and dirty[chunk + nb] and (nb * gran) < BUF_SIZE:
            nb += 1
        offset = chunk * gran
        chunk += nb
        while nb > 0 and offset < length:
            st, io_bytes = chain_status(top, offset, min(nb * gran, length - offset))
            if st & _DATA:
                io_bytes = min(io_bytes, MAX_IO_BYTES)
            io_bytes -= io_bytes % gran
            method = "copy"
            if io_bytes < gran:
                io_bytes = gran
            elif not st & _DATA:
                end = offset + io_bytes
                if offset % tcs == 0 and (end % tcs == 0 or end >= blk_length(target)):
                    method = "zero" if st & _ZERO else "discard"
            io_bytes = min(io_bytes, length - offset)
            if method == "copy":
                # mirror_co_read(): one request of at most buf_size
                io_bytes = min(io_bytes, BUF_SIZE)
                _write(target, offset, top.read(offset, io_bytes))
                done += io_bytes
            else:
                if method == "zero":
                    _write_zeroes(target, offset, io_bytes)
                else:
                    discard = getattr(target, "discard", None)
                    if discard is not None:
                        discard(offset, io_bytes)
                # QEMU can allocate the clusters an unmap freed right away; the engine
                # applies refcount decreases on flush, so flush before the next request.
                flush_now = getattr(target, "flush", None)
                if flush_now is not None:
                    flush_now()
            offset += io_bytes
            nb -= (io_bytes + gran - 1) // gran
            if progress is not None and total:
                progress.print(min(100.0, done * 100.0 / total), 0)
    flush = getattr(target, "flush", None)
    if flush is not None:
        flush()


def _grow(target: BlockDevice, length: int) -> None:
    from ..engine.raw import RawImage

    resize = getattr(target, "resize", None)
    if resize is not None:
        resize(length)
    elif isinstance(target, RawImage):
        target.store.truncate(length)
        target.virtual_size = length
    else:
        raise CommitError("Could not resize the base image: Operation not supported")


def _write(target: BlockDevice, offset: int, data: bytes) -> None:
    from ..engine.raw import RawImage

    if isinstance(target, RawImage):
        target.store.pwrite(offset, data)
    else:
        target.write(offset, data)


def _write_zeroes(target: BlockDevice, offset: int, length: int) -> None:
    from ..engine.raw import RawImage

    if isinstance(target, RawImage):
        store = target.store
        end = min(offset + length, store.size())
        if end > offset:
            # BDRV_REQ_MAY_UNMAP on a file: the range becomes a hole
            store.punch_hole(offset, end - offset)
        return
    zero = getattr(target, "write_zeroes", None)
    if zero is None:
        target.write(offset, bytes(length))
    else:
        zero(offset, length, unmap=True)


# ----------------------------------------------------------------------------- make_empty
def _make_empty(top: BlockDevice) -> None:
    if top.format_name == "qcow2":
        _qcow2_make_empty(top)
    elif top.format_name == "qcow":
        _qcow_make_empty(top)
    # other formats: -ENOTSUP, which qemu-img ignores


def _qcow_make_empty(img: BlockDevice) -> None:
    from ..engine.qcow1 import WritableQcowImage

    assert isinstance(img, WritableQcowImage)
    img.flush()
    store = img.store
    l1_len = img.l1_size * 8
    store.pwrite(img.l1_table_offset, bytes(l1_len))
    store.flush()
    store.truncate(img.l1_table_offset + l1_len)


def _qcow2_make_empty(img: BlockDevice) -> None:
    from ..engine.writer import WritableQcow2Image

    assert isinstance(img, WritableQcow2Image)
    h = img.header
    cs = img.cluster_size
    l1_clusters = -(-h.l1_size // (cs // 8))
    refblock_entries = cs * 8 // h.refcount_bits
    if h.version >= 3 and not h.nb_snapshots and 3 + l1_clusters <= refblock_entries \
            and not img.has_data_file and h.crypt_method != C.QCOW_CRYPT_LUKS:
        img.flush()
        _make_completely_empty(img, l1_clusters)
        return
    # discard every cluster (QCOW2_DISCARD_SNAPSHOT, full discard): L2 entries become 0
    size = img.virtual_size
    if size:
        img._guard(img._discard_clusters, 0, size, True)
    img.flush()


def _make_completely_empty(img: BlockDevice, l1_clusters: int) -> None:
    from ..engine.writer import WritableQcow2Image

    assert isinstance(img, WritableQcow2Image)
    h = img.header
    cs = img.cluster_size
    store = img.store
    # Refcounts are about to be wrong: the dirty bit first, as qcow2_mark_dirty() does.
    store.pwrite(72, struct.pack(">Q", h.incompatible_features | C.QCOW2_INCOMPAT_DIRTY))
    store.flush()
    store.pwrite(h.l1_table_offset, bytes(l1_clusters * cs))
    store.pwrite(cs, bytes((2 + l1_clusters) * cs))
    store.pwrite(40, struct.pack(">QQI", 3 * cs, cs, 1))
    store.flush()
    store.pwrite(cs, struct.pack(">Q", 2 * cs))
    store.flush()
    used = 3 + l1_clusters
    bits = h.refcount_bits
    refblock = bytearray(cs)
    for i in range(used):
        _set_refcount(refblock, i, bits)
    store.pwrite(2 * cs, bytes(refblock))
    # qcow2_mark_clean() -> qcow2_update_header() with the new tables, dirty bit clear
    h.l1_table_offset = 3 * cs
    h.refcount_table_offset = cs
    h.refcount_table_clusters = 1
    h.incompatible_features &= ~C.QCOW2_INCOMPAT_DIRTY
    store.pwrite(0, encode_qemu_header(h, img.extensions, img.backing_file))
    store.flush()
    store.truncate(used * cs)
    # The writer's in-memory tables describe the old file: make its close a no-op.
    img.dirty = False
    img.lazy_refcounts = False
    img._dirty_l2.clear()
    img._dirty_l1.clear()
    img._data_dirty = False
    # close() writes nothing back for an image marked corrupt in memory (the file's
    # header says otherwise): the tables it holds belong to the file that no longer exists.
    img.corrupt = True


def _set_refcount(block: bytearray, index: int, bits: int) -> None:
    if bits >= 8:
        width = bits // 8
        block[index * width:(index + 1) * width] = (1).to_bytes(width, "big")
    else:
        per_byte = 8 // bits
        byte = index // per_byte
        shift = (index % per_byte) * bits
        block[byte] |= 1 << shift
