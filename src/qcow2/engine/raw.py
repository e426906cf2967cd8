"""The raw format: guest offset == file offset; holes in the file are zero extents."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import OutOfRangeError, ReadOnlyImageError
from ..io import ByteStore
from .device import STATUS_DATA, STATUS_OFFSET_VALID, STATUS_ZERO, BlockDevice, LayerRun

_ZERO_CHUNK = bytes(1 << 20)


class RawImage(BlockDevice):
    format_name = "raw"

    def __init__(self, store: ByteStore, filename: str) -> None:
        self.store = store
        self.filename = filename
        self.readonly = not store.writable
        self.backing = None
        # QEMU counts the length in 512-byte sectors, rounded up.
        self.virtual_size = (store.size() + 511) & ~511

    def layer_status(self, start: int, length: int) -> Iterator[LayerRun]:
        end = start + length
        pos = start
        fsize = self.store.size()
        while pos < end:
            if pos >= fsize:
                yield LayerRun(pos, end - pos, STATUS_ZERO | STATUS_OFFSET_VALID, pos, self.store)
                return
            data = self.store.next_data(pos)
            if data > pos:
                stop = min(end, data)
                yield LayerRun(pos, stop - pos, STATUS_ZERO | STATUS_OFFSET_VALID, pos,
                               self.store)
                pos = stop
                continue
            hole = self.store.next_hole(pos)
            if hole <= pos:
                hole = fsize
            # With buffered I/O QEMU's file driver has a request alignment of 1: a data run
            # ends exactly at EOF, and the rest of the last (rounded-up) sector is a zero run
            # (the `pos >= fsize` case above).
            hole = min(end, hole)
            yield LayerRun(pos, hole - pos, STATUS_DATA | STATUS_OFFSET_VALID, pos, self.store)
            pos = hole

    def _read_layer(self, offset: int, view: memoryview) -> None:
        self.store.readinto(offset, view)

    # ------------------------------------------------------------------ writes (readonly=False)
    def _writable(self, offset: int, length: int) -> None:
        if self.readonly:
            raise ReadOnlyImageError("image is opened read-only")
        self._check_range(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._writable(offset, len(data))
        self.store.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._writable(offset, length)
        end = offset + length
        fsize = self.store.size()
        if unmap and offset < fsize:
            # a hole reads as zeros; past the punched range the file keeps its size
            self.store.punch_hole(offset, min(end, fsize) - offset)
            if end > fsize:
                self.store.truncate(end)
            return
        pos = offset
        while pos < end:
            n = min(end - pos, len(_ZERO_CHUNK))
            self.store.pwrite(pos, memoryview(_ZERO_CHUNK)[:n])
            pos += n

    def discard(self, offset: int, length: int) -> None:
        self._writable(offset, length)
        fsize = self.store.size()
        if offset < fsize:
            self.store.punch_hole(offset, min(offset + length, fsize) - offset)

    def resize(self, new_size: int) -> None:
        if self.readonly:
            raise ReadOnlyImageError("image is opened read-only")
        if new_size < 0:
            raise OutOfRangeError("negative image size")
        self.store.truncate(new_size)
        self.virtual_size = (new_size + 511) & ~511

    def flush(self) -> None:
        if not self.readonly:
            self.store.flush()

    def close(self) -> None:
        self.store.close()
