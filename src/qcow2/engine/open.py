"""Opening images: format probing, backing chains and external data files, and the policy that
decides which files an image may make us open.

A crafted image can name any path as its backing or data file (`/etc/shadow`, a device). The
library default, "beside", only follows names that resolve inside the directory of the image
that names them: chains built the usual way keep working, and a hostile image cannot make a
server read arbitrary files. "follow" behaves like QEMU (the CLI uses it, as qemu-img does),
"never" refuses any backing/data file, and a callable decides per path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Literal

from ..errors import BackingChainError, InvalidImageError, Qcow2Error
from ..format import constants as C
from ..io import ByteStore, FileStore
from .device import BlockDevice
from .image import Qcow2Image
from .raw import RawImage

PolicyFn = Callable[[str, str, str], bool]
Policy = Literal["follow", "beside", "never"] | PolicyFn
MAX_BACKING_DEPTH = 64  # QEMU has no limit and recurses until it runs out of descriptors

FORMATS = ("qcow2", "qcow", "raw")


def path_combine(base_path: str, filename: str) -> str:
    """QEMU's path_combine(): a relative name is taken relative to the referring file's dir."""
    if filename.startswith("/") or not filename:
        return filename
    slash = base_path.rfind("/")
    prefix = base_path[:slash + 1] if slash >= 0 else ""
    return prefix + filename


def probe_format(store: ByteStore) -> str:
    head = store.pread(0, 8)
    if head[:4] == C.QCOW_MAGIC_BYTES:
        # QEMU's probes: qcow wants version 1, qcow2 version >= 2 (bytes past the end of a
        # short file read as zeros): anything else, a truncated header included, is raw.
        version = int.from_bytes(head[4:8], "big")
        if version == 1:
            return "qcow"
        if version >= 2:
            return "qcow2"
    return "raw"


def _allowed(policy: Policy, path: str, kind: str, referrer: str) -> bool:
    if callable(policy):
        return bool(policy(path, kind, referrer))
    if policy == "follow":
        return True
    if policy == "never":
        return False
    if policy == "beside":
        base = os.path.dirname(os.path.realpath(referrer))
        target = os.path.realpath(path)
        return os.path.commonpath([base, target]) == base
    raise ValueError(f"unknown backing policy {policy!r}")


def _check_policy(policy: Policy, path: str, kind: str, referrer: str) -> None:
    if not _allowed(policy, path, kind, referrer):
        name = policy if isinstance(policy, str) else "callback"
        raise BackingChainError(
            f"{kind} '{path}' of '{referrer}' refused by the {name!s} policy "
            "(pass backing_policy='follow' to open it like QEMU)")


def open_file(path: str, writable: bool = False) -> FileStore:
    """Open an image file the way QEMU's file/host_device protocols accept it.

    Regular files and block or character devices only: a directory is refused with QEMU's
    message, and a FIFO (on which QEMU blocks forever) is refused before it can block us.
    """
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        raise InvalidImageError(f"'file' driver requires '{path}' to be a regular file")
    return FileStore(path, writable=writable)


def open_image(path: str, fmt: str | None = None, readonly: bool = True, *,
               snapshot: str | None = None, backing_policy: Policy = "beside",
               open_backing: bool = True, data_file: str | None = None,
               l2_cache_size: int | None = None, check_mode: bool = False,
               keep_bitmaps: bool = False, _depth: int = 0,
               _seen: frozenset[str] = frozenset()) -> BlockDevice:
    """Open `path` as qcow2/qcow/raw (probed unless `fmt`), with its backing chain.

    check_mode: open as `qemu-img check` does (BDRV_O_CHECK, inherited by the backing chain):
    qcow2 layers skip the snapshot table and may lack a refcount table (read-only only).
    keep_bitmaps: a writable qcow2 image keeps its persistent bitmaps until the first guest
    write (amend, which writes no guest data, uses it).
    """
    if fmt is not None and fmt not in FORMATS:
        raise InvalidImageError(f"Unknown driver '{fmt}'")
    try:
        store: ByteStore = open_file(path, writable=not readonly)
    except OSError as e:
        if _depth:
            raise BackingChainError(f"Could not open '{path}': {e.strerror}") from None
        raise
    try:
        return _open_store(store, path, fmt, readonly, snapshot=snapshot,
                           backing_policy=backing_policy, open_backing=open_backing,
                           data_file=data_file, l2_cache_size=l2_cache_size, depth=_depth,
                           seen=_seen | {os.path.realpath(path)}, check_mode=check_mode,
                           keep_bitmaps=keep_bitmaps)
    except BaseException:
        store.close()
        raise


def _open_store(store: ByteStore, path: str, fmt: str | None, readonly: bool, *,
                snapshot: str | None, backing_policy: Policy, open_backing: bool,
                data_file: str | None, l2_cache_size: int | None, depth: int,
                seen: frozenset[str], check_mode: bool = False,
                keep_bitmaps: bool = False) -> BlockDevice:
    actual = fmt or probe_format(store)
    dev: BlockDevice
    if actual == "raw":
        if snapshot is not None:
            raise InvalidImageError("Block format 'raw' used by device '' does not support "
                                    "internal snapshots")
        return RawImage(store, path)
    if actual == "qcow":
        from .qcow1 import QcowImage, WritableQcowImage

        dev = QcowImage(store, path) if readonly else WritableQcowImage(store, path)
        backing_name = dev.backing_file
        backing_fmt = None
    else:
        if readonly:
            img = Qcow2Image(store, path, readonly=True, l2_cache_size=l2_cache_size,
                             check_mode=check_mode)
        else:
            from .writer import WritableQcow2Image

            img = WritableQcow2Image(store, path, l2_cache_size=l2_cache_size,
                                     keep_bitmaps=keep_bitmaps)
        dev = img
        backing_name = img.backing_file
        backing_fmt = img.backing_format
        try:
            _attach_data_file(img, path, data_file, backing_policy, readonly)
            if snapshot is not None:
                img.load_snapshot(snapshot)
        except BaseException:
            if img.data_store is not img.store:
                img.data_store.close()
            raise
    if backing_name and open_backing:
        full = path_combine(path, backing_name)
        if os.path.realpath(full) in seen:
            raise BackingChainError(f"Backing file '{full}' creates an infinite loop.")
        if depth + 1 > MAX_BACKING_DEPTH:
            raise BackingChainError(
                f"Backing chain of '{path}' is deeper than {MAX_BACKING_DEPTH} images")
        _check_policy(backing_policy, full, "backing file", path)
        if backing_fmt is not None and backing_fmt not in FORMATS:
            raise BackingChainError(f"Could not open backing file: Unknown driver '{backing_fmt}'")
        try:
            dev.backing = open_image(full, backing_fmt, True, backing_policy=backing_policy,
                                     l2_cache_size=l2_cache_size, check_mode=check_mode,
                                     _depth=depth + 1, _seen=seen)
        except BackingChainError as e:
            msg = str(e)
            dev.close()
            raise BackingChainError(msg if "infinite loop" in msg or "policy" in msg
                                    else f"Could not open backing file: {msg}") from None
        except Qcow2Error as e:
            # a format error names no file, as in QEMU: "...: Image is not in qcow2 format"
            dev.close()
            raise BackingChainError(f"Could not open backing file: {e}") from None
        except OSError as e:
            dev.close()
            reason = e.strerror or str(e)
            raise BackingChainError(
                f"Could not open backing file: Could not open '{full}': {reason}") from None
    return dev


def _attach_data_file(img: Qcow2Image, path: str, data_file: str | None, policy: Policy,
                      readonly: bool) -> None:
    if not img.has_data_file:
        if data_file is not None:
            raise InvalidImageError(
                "'data-file' can only be set for images with an external data file")
        return
    name = data_file if data_file is not None else img.data_file_name
    if not name:
        raise InvalidImageError("'data-file' is required for this image")
    if data_file is None:
        # Only a name taken from the image is the image's choice; an explicit data_file is
        # the caller's. QEMU opens it relative to the current directory, not to the image.
        _check_policy(policy, os.path.abspath(name), "data file", path)
    try:
        img.data_store = open_file(name, writable=not readonly)
    except OSError as e:
        raise BackingChainError(f"Could not open '{name}': {e.strerror}") from None
    except InvalidImageError as e:
        raise BackingChainError(str(e)) from None
