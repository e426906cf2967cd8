"""The BlockDevice base every format implements, and the chain-wide extent engine.

A driver answers one question for its own layer, `layer_status(start, length)`: which runs of
this range hold data, read as zero, or are unallocated (ask the backing layer). Everything
else (whole-chain extents as `qemu-img map` reports them, reads through backing layers,
the file-like view) is built here on top of that and the driver's `_read_layer`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .._record import record
from ..errors import OutOfRangeError, ReadOnlyImageError

if TYPE_CHECKING:
    from ..io import ByteStore

# Status bits of one layer's run, modelled on QEMU's BDRV_BLOCK_* flags.
STATUS_DATA = 1
STATUS_ZERO = 2
STATUS_OFFSET_VALID = 4

ZERO_CHUNK = bytes(1 << 20)


@record
class LayerRun:
    """A run of one layer's guest range with the same status (no backing resolution)."""

    start: int
    length: int
    status: int
    host_offset: int | None = None
    store: ByteStore | None = None


@record(frozen=True)
class Extent:
    """A merged run of the whole chain, as one entry of `qemu-img map --output=json`."""

    start: int
    length: int
    data: bool
    zero: bool
    present: bool
    depth: int
    host_offset: int | None = None
    filename: str | None = None

    def to_map_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data}
        if self.host_offset is not None:
            d["offset"] = self.host_offset
        return d


def zero_fill(view: memoryview) -> None:
    n = len(view)
    pos = 0
    while pos < n:
        step = min(n - pos, len(ZERO_CHUNK))
        view[pos:pos + step] = ZERO_CHUNK[:step]
        pos += step


class BlockDevice:
    """A guest-visible disk: reads at any offset, and the chain-wide extent map."""

    format_name: str = ""
    filename: str = ""
    virtual_size: int = 0
    backing: BlockDevice | None = None
    readonly: bool = True

    # ----------------------------------------------------------------- driver interface
    def layer_status(self, start: int, length: int) -> Iterator[LayerRun]:
        """This layer's runs covering [start, start+length): status bits and host offsets."""
        raise NotImplementedError

    def _read_layer(self, offset: int, view: memoryview) -> None:
        """Fill `view` with the guest bytes at `offset` (backing layers included)."""
        raise NotImplementedError

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()

    # ----------------------------------------------------------------- public API
    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise OutOfRangeError(
                f"range [{offset}, {offset + length}) outside the image "
                f"(virtual size {self.virtual_size})")

    def read(self, offset: int, length: int) -> bytes:
        """The guest bytes [offset, offset+length)."""
        self._check_range(offset, length)
        buf = bytearray(length)
        if length:
            self._read_layer(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        self._check_range(offset, len(view))
        if len(view):
            self._read_layer(offset, view)
        return len(view)

    def read_backing_or_zero(self, offset: int, view: memoryview) -> None:
        """What an unallocated range of this layer reads as: the backing layer, zeros past its end."""
        if self.backing is None:
            zero_fill(view)
            return
        bsize = self.backing.virtual_size
        n = len(view)
        inside = max(0, min(n, bsize - offset))
        if inside:
            self.backing._read_layer(offset, view[:inside])
        if inside < n:
            zero_fill(view[inside:])

    # Mutators of a device opened read-only (or of a format that cannot write): writable
    # devices override them.
    def write(self, offset: int, data: bytes) -> None:
        raise ReadOnlyImageError("image is opened read-only")

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        raise ReadOnlyImageError("image is opened read-only")

    def discard(self, offset: int, length: int) -> None:
        raise ReadOnlyImageError("image is opened read-only")

    def resize(self, new_size: int) -> None:
        raise ReadOnlyImageError("image is opened read-only")

    def flush(self) -> None:
        """Make written data durable (nothing to do for a read-only device)."""

    def extents(self, start: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Merged runs of the whole chain, exactly as `qemu-img map` groups them.

        Like `qemu-img map --start-offset --max-length`, a range running past the end of the
        image is clipped to it (nothing is yielded from a start at or past the end).
        """
        if length is None:
            length = max(0, self.virtual_size - start)
        if start < 0 or length < 0:
            self._check_range(start, length)
        length = max(0, min(length, self.virtual_size - start))
        cur: Extent | None = None
        for e in self._chain_status(start, length, 0):
            if cur is None:
                cur = e
            elif _mergeable(cur, e):
                cur = Extent(cur.start, cur.length + e.length, cur.data, cur.zero, cur.present,
                             cur.depth, cur.host_offset, cur.filename)
            else:
                yield cur
                cur = e
        if cur is not None:
            yield cur

    def _chain_status(self, start: int, length: int, depth: int) -> Iterator[Extent]:
        # Mirrors qemu-img's get_block_status(): descend while a layer reports neither data
        # nor zero; an unallocated range past the backing file's end reads as zero here.
        for run in self.layer_status(start, length):
            off = run.host_offset if run.status & STATUS_OFFSET_VALID else None
            fname = run.store.name if (off is not None and run.store is not None) else None
            if run.status & (STATUS_DATA | STATUS_ZERO):
                yield Extent(run.start, run.length, bool(run.status & STATUS_DATA),
                             bool(run.status & STATUS_ZERO), True, depth, off, fname)
                continue
            backing = self.backing
            if backing is None:
                yield Extent(run.start, run.length, False, True, False, depth, off, fname)
                continue
            end = run.start + run.length
            bsize = backing.virtual_size
            if run.start < bsize:
                yield from backing._chain_status(run.start, min(end, bsize) - run.start,
                                                 depth + 1)
            if end > bsize:
                s = max(run.start, bsize)
                o = None if off is None else off + (s - run.start)
                yield Extent(s, end - s, False, True, False, depth, o, fname)

    def as_file(self) -> Qcow2File:
        return Qcow2File(self)

    def chain(self) -> list[BlockDevice]:
        out: list[BlockDevice] = []
        layer: BlockDevice | None = self
        while layer is not None:
            out.append(layer)
            layer = layer.backing
        return out


def _mergeable(a: Extent, b: Extent) -> bool:
    if (a.data, a.zero, a.present, a.depth, a.filename) != (
            b.data, b.zero, b.present, b.depth, b.filename):
        return False
    if (a.host_offset is None) != (b.host_offset is None):
        return False
    return a.host_offset is None or a.host_offset + a.length == b.host_offset


class Qcow2File(io.RawIOBase):
    """A seekable file view of a BlockDevice (read-only unless the device is writable)."""

    def __init__(self, dev: BlockDevice) -> None:
        super().__init__()
        self._dev = dev
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._dev.readonly

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = pos
        elif whence == io.SEEK_CUR:
            new = self._pos + pos
        elif whence == io.SEEK_END:
            new = self._dev.virtual_size + pos
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError("negative seek position")
        self._pos = new
        return new

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self._dev.virtual_size - self._pos))
        if n:
            self._dev.readinto(self._pos, view[:n])
        self._pos += n
        return n

    def readall(self) -> bytes:
        # RawIOBase.readall() would loop in 8 KiB steps, each one a walk of the mapping.
        n = max(0, self._dev.virtual_size - self._pos)
        data = self._dev.read(self._pos, n) if n else b""
        self._pos += n
        return data

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._dev.write(self._pos, data)
        self._pos += len(data)
        return len(data)
