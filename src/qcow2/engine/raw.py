"""The raw format: guest offset == file offset; holes in the file are zero extents."""

from __future__ import annotations

from collections.abc import Iterator

from ..io import ByteStore
from .device import STATUS_DATA, STATUS_OFFSET_VALID, STATUS_ZERO, BlockDevice, LayerRun


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

    def close(self) -> None:
        self.store.close()
