"""`map`: the allocation map of an image and its backing chain, as qemu-img map (7.2) reports it.

qemu-img map asks the block layer for the status of up to 1 GiB at a time and merges
consecutive answers when they have the same flags, depth and file and their host offsets
are contiguous. Chunk boundaries therefore never show in its output, and the merged stream
of `BlockDevice.extents()` is the same list; only the range and the empty case are set here.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..engine.device import BlockDevice, Extent
from .info import check_regular_file, qemu_length


def open_for_map(filename: str, fmt: str | None) -> BlockDevice:
    """Open an image with its whole backing chain, following any backing name like QEMU."""
    from ..engine.open import open_image

    check_regular_file(filename)
    return open_image(filename, fmt, True, backing_policy="follow")


def map_entries(dev: BlockDevice, start: int = 0, max_length: int | None = None
                ) -> Iterator[Extent]:
    """The entries of `qemu-img map [--start-offset] [--max-length]`, merged as it merges them.

    When the range is empty, qemu-img still prints its initial, empty entry at `start`.
    """
    end = qemu_length(dev)
    if max_length is not None:
        end = min(start + max_length, end)
    if start >= end:
        yield Extent(start, 0, False, False, False, 0)
        return
    yield from dev.extents(start, end - start)
