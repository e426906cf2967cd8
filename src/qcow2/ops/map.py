"""`map`: the allocation map of an image and its backing chain, as qemu-img map (7.2) reports it.

qemu-img map asks the block layer for the status of up to 1 GiB at a time and merges
consecutive answers when they have the same flags, depth and file and their host offsets
are contiguous. Chunk boundaries therefore never show in its output, and the merged stream
of `BlockDevice.extents()` is the same list; only the range, the empty case and the output
before a metadata error are set here.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..engine.device import BlockDevice, Extent
from ..errors import Qcow2Error
from .info import check_regular_file, qemu_length

# Granularity of the search for the first unreadable offset (the block layer's sector).
SECTOR = 512


class MapReadError(Qcow2Error):
    """The metadata of some range could not be read; `cause` is the engine's error."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def open_for_map(filename: str, fmt: str | None) -> BlockDevice:
    """Open an image with its whole backing chain, following any backing name like QEMU."""
    from ..engine.open import open_image

    check_regular_file(filename)
    return open_image(filename, fmt, True, backing_policy="follow")


def map_entries(dev: BlockDevice, start: int = 0, max_length: int | None = None
                ) -> Iterator[Extent]:
    """The entries of `qemu-img map [--start-offset] [--max-length]`, merged as it merges them.

    When the range is empty, qemu-img still prints its initial, empty entry at `start`.
    An entry is yielded once the next one is known, as qemu-img prints them; if the metadata
    of some range cannot be read, the entries qemu-img would have printed before failing are
    yielded and MapReadError is raised.
    """
    end = qemu_length(dev)
    if max_length is not None:
        end = min(start + max_length, end)
    if start >= end:
        yield Extent(start, 0, False, False, False, 0)
        return
    done = start  # everything before this offset has been yielded
    pending: Extent | None = None
    try:
        for e in dev.extents(start, end - start):
            if pending is not None:
                yield pending
                done = pending.start + pending.length
            pending = e
    except (Qcow2Error, OSError) as exc:
        # qemu-img queries offset by offset and fails at the first unreadable one: every
        # entry before it was printed except the last, which was still being merged.
        good = _readable_prefix(dev, done, end)
        yield from list(dev.extents(done, good - done))[:-1] if good > done else []
        raise MapReadError(exc) from None
    if pending is not None:
        yield pending


def _readable_prefix(dev: BlockDevice, lo: int, hi: int) -> int:
    """The largest sector boundary E in [lo, hi) such that [lo, E) maps without an error."""
    def ok(e: int) -> bool:
        try:
            for _ in dev.extents(lo, e - lo):
                pass
        except (Qcow2Error, OSError):
            return False
        return True

    # invariant: ok(good) and not ok(bad); candidates are lo and the sector boundaries after it
    good = lo
    bad = hi
    while True:
        mid = ((good + bad) // 2) // SECTOR * SECTOR
        if mid <= good:
            mid = (good // SECTOR + 1) * SECTOR
        if mid >= bad:
            return good
        if ok(mid):
            good = mid
        else:
            bad = mid
