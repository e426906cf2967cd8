"""Image targets for convert (-O qcow2 / qcow): create the image like `qemu-img convert` does,
or with -n open an existing one, then write through the engine. The convert pipeline calls
these from one thread, in guest order, so clusters are laid out sequentially as qemu-img lays
them out. With -c, clusters arrive already compressed (write_compressed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from ..engine.device import BlockDevice

SECTOR = 512


class ImageTarget:
    """A qcow2 or qcow image as a convert target.

    A new image reads as zero unless it has a backing file; an existing one (`create=False`)
    only when the user says so (`zero_init`, --target-is-zero).
    """

    def __init__(self, path: str, fmt: str, size: int, options: Mapping[str, str],
                 cache: str = "unsafe", *, create: bool = True, zero_init: bool = False
                 ) -> None:
        from ..engine.open import open_image
        from .create import img_create

        if create:
            # convert calls bdrv_create(), not bdrv_img_create(): the backing file is neither
            # opened nor checked here (opening the new image below does that).
            img_create(path, fmt, dict(options), size, no_backing=True)
        self.path = path
        self.img: BlockDevice = open_image(path, fmt, False, backing_policy="follow")
        backing = self.img.backing
        self.has_zero_init = (create and backing is None) or zero_init
        # The backing file's length in bytes (whole sectors), known for a new image only:
        # qemu-img leaves zeros past it unwritten.
        self.backing_end: int | None = None
        if create and backing is not None:
            self.backing_end = -(-backing.virtual_size // SECTOR) * SECTOR
        if cache == "unsafe":
            # qemu-img convert's default target cache mode never flushes.
            for store in {id(s): s for s in (getattr(self.img, "store", None),
                                             getattr(self.img, "data_store", None))}.values():
                if store is not None and hasattr(store, "fsync_enabled"):
                    store.fsync_enabled = False

    @property
    def length(self) -> int:
        """The virtual size, rounded up to whole sectors as the block layer counts it."""
        return -(-self.img.virtual_size // SECTOR) * SECTOR

    def write(self, offset: int, data: memoryview) -> None:
        self.img.write(offset, data)  # type: ignore[arg-type]
        self._release()

    @property
    def cluster_size(self) -> int:
        return int(getattr(self.img, "cluster_size", 0))

    @property
    def compression_type(self) -> int:
        header = getattr(self.img, "header", None)
        return int(getattr(header, "compression_type", 0) or 0)

    def write_compressed(self, offset: int, data: memoryview,
                         payloads: Sequence[bytes | None]) -> None:
        """Clusters compressed by the pipeline's workers (None: store uncompressed)."""
        img = cast(Any, self.img)
        if self.img.format_name == "qcow2":
            img.write_compressed(offset, data, compressed=payloads)
        else:
            # qcow v1 takes one cluster per compressed write, as QEMU's driver
            cs = self.cluster_size
            for i, payload in enumerate(payloads):
                img.write_compressed(offset + i * cs, data[i * cs:(i + 1) * cs],
                                     compressed=[payload])
        self._release()

    def finish_compressed(self) -> None:
        """qemu-img convert -c's final zero-length compressed write (qcow2 rounds the file up
        to whole sectors; qcow v1 fails it, which the CLI reports as qemu-img does)."""
        if self.img.format_name == "qcow2":
            cast(Any, self.img).write_compressed(0, b"")

    def write_zeroes(self, offset: int, length: int) -> None:
        # BDRV_REQ_MAY_UNMAP: convert opens its target with discard=unmap unless -S 0 (which
        # never writes zeroes this way), so clusters that held data are freed.
        write_zeroes = getattr(self.img, "write_zeroes", None)
        if write_zeroes is not None:
            write_zeroes(offset, length, unmap=True)
        else:
            self.img.write(offset, bytes(length))
        self._release()

    def _release(self) -> None:
        """Make clusters freed by the last write reusable at once.

        The engine defers refcount drops to its next flush (crash safety without QEMU's
        cache dependencies); QEMU drops them right after the L2 update, so the next
        allocation of an existing target (-n) reuses them. A flush does both here.
        """
        refcounts = getattr(self.img, "refcounts", None)
        if refcounts is not None and refcounts.has_pending_decreases:
            cast(Any, self.img).flush()

    def finish(self) -> None:
        flush = getattr(self.img, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        self.img.close()
