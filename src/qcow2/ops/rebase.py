"""`rebase`: give an image a new backing file (qemu-img 7.2's img_rebase).

Safe mode copies into the overlay every range whose content differs between the old and
the new backing chain, so the guest view stays the same, then rewrites the header with the
new backing file name and format (qcow2_change_backing_file -> qcow2_update_header). Unsafe
mode (-u) only rewrites the header. Also owns the pieces commit shares: QEMU's per-layer
block status answers and the header rewrite.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ..errors import BackingChainError, ImageLimitError, Qcow2Error
from ..format import constants as C
from ..format.header import encode_qemu_header

if TYPE_CHECKING:
    from ..engine.device import BlockDevice
    from ..engine.image import Qcow2Image
    from ..engine.open import Policy
    from .progress import Progress

IO_BUF_SIZE = 2 << 20
SECTOR = 512
_DATA = 1   # engine.device.STATUS_DATA
_ZERO = 2   # engine.device.STATUS_ZERO

# `qemu-img --help` of 7.2 (Debian): every name bdrv_find_format() knows. -F is checked
# against this list even with -u, where the backing file is never opened.
QEMU_FORMATS = frozenset(
    ["blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "iser", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat"])


class RebaseError(Qcow2Error):
    """A rebase (or commit) step failed; the message is qemu-img's."""


class OpenFailed(Qcow2Error):
    """The image itself could not be opened: shown as `Could not open 'F': <cause>`."""

    def __init__(self, filename: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.filename = filename
        self.cause = cause


class ChangeBackingError(RebaseError):
    """bdrv_change_backing_file() failed with `errno_value`."""

    def __init__(self, errno_value: int) -> None:
        super().__init__(os.strerror(errno_value))
        self.errno_value = errno_value


def open_reason(exc: BaseException) -> str:
    """What QEMU appends to "Could not open new backing file 'X': "."""
    if isinstance(exc, OSError):
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
        return f"Could not open '{exc.filename}': {reason}" if exc.filename else reason
    return str(exc)


# ----------------------------------------------------------------------------- block status
def blk_length(dev: BlockDevice) -> int:
    """blk_getlength(): qcow2/qcow sizes in whole sectors (raw is already rounded up)."""
    return dev.virtual_size & ~(SECTOR - 1)


def _driver_span(dev: BlockDevice) -> int | None:
    # qcow2_get_host_offset() stops at the end of an L2 table; qcow answers per cluster.
    cbits = getattr(dev, "cluster_bits", None)
    if not isinstance(cbits, int):
        return None
    if dev.format_name == "qcow2":
        return 1 << (cbits + int(getattr(dev, "l2_bits", 0)))
    if dev.format_name == "qcow":
        return 1 << cbits
    return None


def layer_first(dev: BlockDevice, offset: int, length: int) -> tuple[int, int]:
    """One bdrv_co_block_status() answer of `dev` alone: (status bits, bytes)."""
    length = min(length, dev.virtual_size - offset)
    span = _driver_span(dev)
    if span is not None:
        length = min(length, (offset // span + 1) * span - offset)
    for run in dev.layer_status(offset, length):
        return run.status, max(1, min(run.length, length))
    return 0, length


def allocated_above(top: BlockDevice, stop: BlockDevice | None, offset: int,
                    length: int) -> tuple[bool, int]:
    """bdrv_is_allocated_above(top, stop, include_base=false): allocated in a layer from
    `top` down to (not including) `stop`, and for how many bytes the answer holds."""
    layer: BlockDevice | None = top
    while layer is not None and layer is not stop:
        if offset >= blk_length(layer):
            # A short layer: what lies past its end reads as zeros "allocated" there.
            return True, length
        st, n = layer_first(layer, offset, length)
        if st & (_DATA | _ZERO):
            return True, n
        length = n
        layer = layer.backing
    return False, length


def chain_status(dev: BlockDevice, offset: int, length: int) -> tuple[int, int]:
    """bdrv_block_status_above(dev, NULL): status bits of the first run through the chain."""
    layer: BlockDevice = dev
    while True:
        if layer is not dev and offset >= blk_length(layer):
            return _ZERO, length
        st, n = layer_first(layer, offset, length)
        if st & (_DATA | _ZERO):
            return st, n
        length = n
        if layer.backing is None:
            return st | _ZERO, n
        layer = layer.backing


def compare_sectors(a: memoryview, b: memoryview) -> tuple[bool, int]:
    """qemu-img's compare_buffers(): whether the first 512 bytes differ, and how many bytes
    from the start (in whole sectors relative to the buffer) share that answer."""
    n = len(a)
    i = min(n, SECTOR)
    if a[:i] != b[:i]:
        while i < n and a[i:i + SECTOR] != b[i:i + SECTOR]:
            i += SECTOR
        return True, min(i, n)
    if a[i:] == b[i:]:
        return False, n
    step = 64 * SECTOR
    while i < n:
        end = min(n, i + step)
        if a[i:end] == b[i:end]:
            i = end
        elif step == SECTOR:
            break
        else:
            step = max(SECTOR, step // 8)
    return False, i


# ----------------------------------------------------------------------------- header
def rewrite_header(img: Qcow2Image) -> None:
    img.store.pwrite(0, encode_qemu_header(img.header, img.extensions, img.backing_file))
    img.store.flush()


def change_backing_file(img: BlockDevice, backing: str | None, backing_fmt: str | None,
                        require: bool) -> None:
    """bdrv_change_backing_file(): raise ChangeBackingError(errno) as QEMU returns it."""
    if backing_fmt and not backing:
        raise ChangeBackingError(errno.EINVAL)
    if require and backing and not backing_fmt:
        raise ChangeBackingError(errno.EINVAL)
    if img.format_name != "qcow2":
        raise ChangeBackingError(errno.ENOTSUP)
    from ..engine.writer import WritableQcow2Image

    assert isinstance(img, WritableQcow2Image)
    raw_data_file = bool(img.header.autoclear_features & C.QCOW2_AUTOCLEAR_DATA_FILE_RAW)
    if backing and (raw_data_file or len(backing.encode("utf-8", "surrogateescape")) > 1023):
        raise ChangeBackingError(errno.EINVAL)
    img.flush()
    old = (img.backing_file, img.backing_format, img.extensions.backing_format)
    img.backing_file = backing or None
    # bs->backing_format is a 16-byte buffer: pstrcpy() keeps 15 characters.
    fmt = backing_fmt[:15] if backing_fmt else None
    img.backing_format = fmt
    img.extensions.backing_format = fmt
    try:
        rewrite_header(img)
    except ImageLimitError:
        img.backing_file, img.backing_format, img.extensions.backing_format = old
        raise ChangeBackingError(errno.ENOSPC) from None


def change_failure_message(exc: ChangeBackingError, backing: str | None,
                           backing_fmt: str | None) -> str:
    shown = "(null)" if backing is None else backing
    if exc.errno_value == errno.ENOSPC:
        reason = "No space left in the file header"
    elif exc.errno_value == errno.EINVAL and backing is not None and not backing_fmt:
        reason = "backing format must be specified"
    else:
        reason = os.strerror(exc.errno_value)
    return f"Could not change the backing file to '{shown}': {reason}"


# ----------------------------------------------------------------------------- rebase
def _find_in_chain(top: BlockDevice, full: str) -> BlockDevice | None:
    """bdrv_find_backing_image(): a layer below `top` that is the file `full` names."""
    try:
        want = os.path.realpath(full)
    except (OSError, ValueError):
        return None
    layer = top.backing
    while layer is not None:
        if os.path.realpath(layer.filename) == want:
            return layer
        layer = layer.backing
    return None


def _read(dev: BlockDevice, offset: int, n: int) -> bytearray:
    buf = bytearray(n)
    inside = max(0, min(n, dev.virtual_size - offset))
    if inside:
        dev.readinto(offset, memoryview(buf)[:inside])
    return buf


def rebase(path: str, backing: str | None, backing_fmt: str | None = None, *,
           unsafe: bool = False, fmt: str | None = None, backing_policy: Policy = "beside",
           progress: Progress | None = None,
           on_open: Callable[[BlockDevice], None] | None = None) -> None:
    """Rebase `path` onto `backing` ("" or None: no backing file), as qemu-img rebase.

    Raises OpenFailed (the image), RebaseError with qemu-img's message otherwise.
    """
    from ..engine.open import open_image, path_combine

    if backing is None and not unsafe:
        raise RebaseError("Must specify backing file (-b) or use unsafe mode (-u)")
    try:
        img = open_image(path, fmt, False, backing_policy=backing_policy,
                         open_backing=not unsafe)
    except (Qcow2Error, OSError) as e:
        raise OpenFailed(path, e) from None
    if on_open is not None:
        on_open(img)
    new: BlockDevice | None = None
    opened_new = False
    try:
        if backing_fmt is not None and backing_fmt not in QEMU_FORMATS:
            raise RebaseError(f"Invalid format name: '{backing_fmt}'")
        if not unsafe:
            if backing:
                full = path_combine(path, backing)
                new = _find_in_chain(img, full)
                if new is None:
                    new = _open_new_backing(img, full, backing, backing_fmt, backing_policy)
                    opened_new = True
            _copy_differences(img, new, progress)
        try:
            if backing:
                change_backing_file(img, backing, backing_fmt, True)
            else:
                change_backing_file(img, None, None, False)
        except ChangeBackingError as e:
            raise RebaseError(change_failure_message(e, backing, backing_fmt)) from None
    finally:
        try:
            if opened_new and new is not None:
                new.close()
        finally:
            img.close()


def _open_new_backing(img: BlockDevice, full: str, shown: str, backing_fmt: str | None,
                      policy: Policy) -> BlockDevice:
    from ..engine.open import open_image

    prefix = f"Could not open new backing file '{shown}': "
    if os.path.exists(full) and os.path.realpath(full) == os.path.realpath(img.filename):
        # The overlay is open read-write: QEMU's image locking refuses a second open.
        raise RebaseError(prefix + "Failed to get shared \"write\" lock\n"
                          f"Is another process using the image [{full}]?")
    if backing_fmt is not None and backing_fmt not in ("qcow2", "qcow", "raw"):
        raise RebaseError(prefix + f"Unknown driver '{backing_fmt}'")
    try:
        return open_image(full, backing_fmt, True, backing_policy=policy)
    except BackingChainError as e:
        raise RebaseError(prefix + str(e)) from None
    except (Qcow2Error, OSError) as e:
        raise RebaseError(prefix + open_reason(e)) from None


def _copy_differences(img: BlockDevice, new: BlockDevice | None,
                      progress: Progress | None) -> None:
    """img_rebase's safe-mode loop: 2 MiB requests cut where the overlay's allocation (or,
    when the new backing is in the old chain, the layers above it) changes, and at the
    backing files' ends; sectors that differ are written with the old chain's content."""
    size = blk_length(img)
    old = img.backing
    old_size = blk_length(old) if old is not None else 0
    new_size = blk_length(new) if new is not None else 0
    prefix = new if new is not None and _is_below(img, new) else None
    local = 100.0 / (size // min(size, IO_BUF_SIZE)) if size else 0.0
    # the base class types data as bytes; every writable driver takes a memoryview
    write = cast(Callable[[int, memoryview], None], img.write)
    zero_write = getattr(img, "write_zeroes", None)
    offset = 0
    while offset < size:
        n = min(IO_BUF_SIZE, size - offset)
        if img.format_name == "raw":
            # raw answers "allocated" everywhere (its protocol layer reports data or zeros)
            offset += n
            continue
        allocated, n = allocated_above(img, old, offset, n)
        if allocated:
            offset += n
            continue
        if prefix is not None and old is not None:
            allocated, n = allocated_above(old, prefix, offset, n)
            if not allocated:
                offset += n
                continue
        old_zero = offset >= old_size or old is None
        if old_zero:
            buf_old = bytearray(n)
        else:
            n = min(n, old_size - offset)
            assert old is not None
            buf_old = _read(old, offset, n)
        if offset >= new_size or new is None:
            buf_new = bytearray(n)
        else:
            n = min(n, new_size - offset)
            buf_new = _read(new, offset, n)
        va = memoryview(buf_old)[:n]
        vb = memoryview(buf_new)[:n]
        done = 0
        while done < n:
            differ, pnum = compare_sectors(va[done:], vb[done:])
            if differ:
                if old_zero and zero_write is not None:
                    zero_write(offset + done, pnum)
                else:
                    write(offset + done, va[done:done + pnum])
            done += pnum
        if progress is not None:
            progress.print(local, 100)
        offset += n
    flush = getattr(img, "flush", None)
    if flush is not None:
        flush()


def _is_below(top: BlockDevice, layer: BlockDevice) -> bool:
    cur = top.backing
    while cur is not None:
        if cur is layer:
            return True
        cur = cur.backing
    return False
