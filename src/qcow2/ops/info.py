"""`info`: QEMU's ImageInfo (7.2) for one image or a whole backing chain.

Images are opened without their backing files, as qemu-img info does (BDRV_O_NO_BACKING), so
a missing backing file does not stop it; `collect_info_list(chain=True)` then walks the chain
itself. Results are plain dicts keyed by the QAPI member names, with members inserted in the
QAPI schema order (a QDict's output order depends on it for keys sharing a hash bucket).
"""

from __future__ import annotations

from typing import Any

from ..engine.device import BlockDevice
from ..errors import BackingChainError, Qcow2Error

ImageInfo = dict[str, Any]

# QEMU itself never stops walking a looping chain whose names keep changing; we do.
MAX_CHAIN = 1024


class OpenFailed(Qcow2Error):
    """An image of the chain could not be opened: `filename` and the original `cause`."""

    def __init__(self, filename: str, cause: BaseException) -> None:
        super().__init__(f"Could not open '{filename}': {cause}")
        self.filename = filename
        self.cause = cause


def qemu_length(dev: BlockDevice) -> int:
    """The image length the QEMU block layer reports: whole 512-byte sectors.

    qcow2 and qcow keep `size / 512` sectors (a crafted size that is not a multiple of 512
    loses its tail); raw files are already rounded up.
    """
    return dev.virtual_size & ~511


def path_has_protocol(path: str) -> bool:
    """QEMU's path_has_protocol(): a `proto:` prefix before any '/'."""
    for ch in path:
        if ch == "/":
            return False
        if ch == ":":
            return True
    return False


def full_backing_filename(image_filename: str, backing: str) -> str:
    """bdrv_make_absolute_filename(): relative names are taken from the image's directory."""
    if not backing or path_has_protocol(backing) or backing.startswith("/"):
        return backing
    slash = image_filename.rfind("/")
    return image_filename[:slash + 1] + backing


def _snapshot_list(dev: BlockDevice) -> list[dict[str, Any]]:
    out = []
    for sn in getattr(dev, "snapshots", None) or []:
        clock = sn.vm_clock_nsec
        d: dict[str, Any] = {
            "id": sn.id_str,
            "name": sn.name,
            "vm-state-size": _s64(sn.effective_vm_state_size),
            "date-sec": sn.date_sec,
            "date-nsec": sn.date_nsec,
            "vm-clock-sec": _s64(clock // 1_000_000_000),
            "vm-clock-nsec": clock % 1_000_000_000,
        }
        # icount == -1 (or extra data too short to hold it) means "not recorded".
        if sn.icount is not None and sn.icount != -1:
            d["icount"] = sn.icount
        out.append(d)
    return out


def _s64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _bitmap_flags(flags: int) -> list[str]:
    out = []
    if flags & 1:
        out.append("in-use")
    if flags & 2:
        out.append("auto")
    return out


def _qcow2_specific(dev: Any) -> dict[str, Any]:
    from ..format import constants as C

    h = dev.header
    ctype = C.COMPRESSION_TYPE_NAMES.get(h.compression_type, str(h.compression_type))
    if h.version < 3:
        return {"compat": "0.10", "refcount-bits": h.refcount_bits, "compression-type": ctype}
    data: dict[str, Any] = {
        "compat": "1.1",
        "data-file": None,
        "data-file-raw": None,
        "extended-l2": bool(h.extended_l2),
        "lazy-refcounts": bool(h.compatible_features & C.QCOW2_COMPAT_LAZY_REFCOUNTS),
        "corrupt": bool(h.incompatible_features & C.QCOW2_INCOMPAT_CORRUPT),
        "refcount-bits": h.refcount_bits,
        "bitmaps": None,
        "compression-type": ctype,
    }
    if dev.data_file_name is not None:
        data["data-file"] = dev.data_file_name
    if dev.has_data_file:
        data["data-file-raw"] = bool(dev.data_file_raw)
    if dev.bitmaps:
        data["bitmaps"] = [{"flags": _bitmap_flags(b.flags), "name": b.name,
                            "granularity": b.granularity} for b in dev.bitmaps]
    return {k: v for k, v in data.items() if v is not None}


def image_info(dev: BlockDevice, filename: str) -> ImageInfo:
    """bdrv_query_image_info() for an opened image (its backing file is not needed)."""
    fmt = dev.format_name
    store = getattr(dev, "store", None)
    info: ImageInfo = {"filename": filename, "format": fmt}
    if fmt in ("qcow2", "qcow", "raw"):
        # bdrv_get_info() succeeds for these three; only qcow2 can be dirty.
        info["dirty-flag"] = bool(getattr(dev, "dirty", False))
    if store is not None:
        info["actual-size"] = store.allocated_size()
    info["virtual-size"] = qemu_length(dev)
    cs = getattr(dev, "cluster_size", 0)
    if cs:
        info["cluster-size"] = cs
    if getattr(dev, "encrypted", False):
        info["encrypted"] = True
    backing = getattr(dev, "backing_file", None)
    if backing:
        info["backing-filename"] = backing
        info["full-backing-filename"] = full_backing_filename(filename, backing)
        bfmt = getattr(dev, "backing_format", None)
        if bfmt:
            info["backing-filename-format"] = bfmt
    snaps = _snapshot_list(dev)
    if snaps:
        info["snapshots"] = snaps
    if fmt == "qcow2":
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(dev)}
    return info


def check_regular_file(path: str) -> None:
    """QEMU's file driver refuses directories and devices before looking at the content."""
    import os
    import stat

    from ..errors import InvalidImageError

    try:
        st = os.stat(path)
    except OSError:
        return  # the open itself reports it
    if not stat.S_ISREG(st.st_mode):
        raise InvalidImageError(f"'file' driver requires '{path}' to be a regular file")


def open_for_info(filename: str, fmt: str | None) -> BlockDevice:
    """Open one image like qemu-img info (BDRV_O_NO_BACKING | BDRV_O_NO_IO): read-only, and
    without its backing file or external data file (QEMU >= 7.2.12 does not open the data
    file without I/O, so info works when it is missing)."""
    from ..engine.image import Qcow2Image
    from ..engine.open import probe_format
    from ..engine.raw import RawImage
    from ..io import FileStore

    check_regular_file(filename)
    store = FileStore(filename)
    try:
        actual = fmt or probe_format(store)
        if actual == "qcow2":
            return Qcow2Image(store, filename, readonly=True)
        if actual == "qcow":
            from ..engine.qcow1 import QcowImage

            return QcowImage(store, filename, readonly=True)
        return RawImage(store, filename)
    except BaseException:
        store.close()
        raise


def collect_info_list(filename: str, fmt: str | None = None, chain: bool = False
                      ) -> list[ImageInfo]:
    """ImageInfo of `filename`, and with `chain` of every image below it (top first).

    Raises OpenFailed when an image cannot be opened and BackingChainError for a loop.
    """
    from ..engine.open import FORMATS

    out: list[ImageInfo] = []
    seen: set[str] = set()
    name: str | None = filename
    while name is not None:
        if name in seen or len(out) >= MAX_CHAIN:
            raise BackingChainError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        if fmt is not None and fmt not in FORMATS:
            raise OpenFailed(name, Qcow2Error(f"Unknown driver '{fmt}'"))
        try:
            dev = open_for_info(name, fmt)
        except (Qcow2Error, OSError) as e:
            raise OpenFailed(name, e) from None
        try:
            info = image_info(dev, name)
        finally:
            dev.close()
        out.append(info)
        name = fmt = None
        if chain:
            name = info.get("full-backing-filename")
            fmt = info.get("backing-filename-format")
    return out
