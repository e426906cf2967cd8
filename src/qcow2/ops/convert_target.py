"""Image targets for convert (-O qcow2 / qcow): create the image like `qemu-img create`
would, then write through the engine. The convert pipeline calls these from one thread, in
guest order, so clusters are laid out sequentially as qemu-img lays them out."""

from __future__ import annotations

from collections.abc import Mapping

from ..engine.device import BlockDevice


class ImageTarget:
    """A new qcow2 or qcow image as a convert target (zero-initialised)."""

    def __init__(self, path: str, fmt: str, size: int, options: Mapping[str, str],
                 cache: str = "unsafe") -> None:
        from ..engine.open import open_image
        from .create import img_create

        img_create(path, fmt, dict(options), size)
        self.path = path
        self.img: BlockDevice = open_image(path, fmt, False, backing_policy="follow")
        self.has_zero_init = True
        if cache == "unsafe":
            # qemu-img convert's default target cache mode never flushes.
            for store in {id(s): s for s in (getattr(self.img, "store", None),
                                             getattr(self.img, "data_store", None))}.values():
                if store is not None and hasattr(store, "fsync_enabled"):
                    store.fsync_enabled = False

    def write(self, offset: int, data: memoryview) -> None:
        self.img.write(offset, data)  # type: ignore[arg-type]

    def write_zeroes(self, offset: int, length: int) -> None:
        write_zeroes = getattr(self.img, "write_zeroes", None)
        if write_zeroes is not None:
            write_zeroes(offset, length)
        else:
            self.img.write(offset, bytes(length))

    def finish(self) -> None:
        flush = getattr(self.img, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        self.img.close()
