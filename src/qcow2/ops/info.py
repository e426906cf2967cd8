"""`info`: QEMU's ImageInfo (7.2) for one image or a whole backing chain.

Images are opened without their backing files, as qemu-img info does (BDRV_O_NO_BACKING), so
a missing backing file does not stop it; `collect_info_list(chain=True)` then walks the chain
itself. Results are plain dicts keyed by the QAPI member names, with members inserted in the
QAPI schema order (a QDict's output order depends on it for keys sharing a hash bucket).
"""

from __future__ import annotations

import struct
from typing import Any

from ..engine.device import BlockDevice
from ..errors import BackingChainError, InvalidImageError, Qcow2Error, UnsupportedFeatureError
from ..format import constants as C
from ..format.bitmap import BitmapDirEntry, parse_bitmap_directory
from ..format.header import Header, parse_extensions, unsupported_features_message
from ..format.snapshot import SnapshotEntry, parse_snapshot_table
from ..io import ByteStore

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
    h = dev.header
    ctype = C.COMPRESSION_TYPE_NAMES.get(h.compression_type, str(h.compression_type))
    encrypt = getattr(dev, "encrypt", None)
    if h.version < 3:
        v2: dict[str, Any] = {"compat": "0.10", "refcount-bits": h.refcount_bits}
        if encrypt is not None:
            v2["encrypt"] = encrypt
        v2["compression-type"] = ctype
        return v2
    data: dict[str, Any] = {
        "compat": "1.1",
        "data-file": None,
        "data-file-raw": None,
        "extended-l2": bool(h.extended_l2),
        "lazy-refcounts": bool(h.compatible_features & C.QCOW2_COMPAT_LAZY_REFCOUNTS),
        "corrupt": bool(h.incompatible_features & C.QCOW2_INCOMPAT_CORRUPT),
        "refcount-bits": h.refcount_bits,
        "encrypt": encrypt,
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


def _backing_name(dev: BlockDevice) -> str | None:
    """The backing file name as QEMU keeps it: a C string (cut at a NUL byte), and any bytes
    that are not UTF-8 kept as they are (surrogate escapes, like file names from argv)."""
    name: str | None = getattr(dev, "backing_file", None)
    h = getattr(dev, "header", None)
    store = getattr(dev, "store", None)
    offset = getattr(h, "backing_file_offset", 0)
    if not name or not offset or store is None:
        return name
    raw: bytes = store.pread(offset, getattr(h, "backing_file_size", 0))
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


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
    backing = _backing_name(dev)
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
    from ..errors import EncryptionError
    from ..io import FileStore

    check_regular_file(filename)
    store = FileStore(filename)
    try:
        actual = fmt or probe_format(store)
        if actual == "qcow2":
            try:
                return Qcow2Image(store, filename, readonly=True)
            except EncryptionError:
                # the engine reads no encrypted image yet; info needs no key and no data
                return EncryptedQcow2(store, filename)
        if actual == "qcow":
            from ..engine.qcow1 import QcowImage

            try:
                return QcowImage(store, filename, readonly=True)
            except EncryptionError:
                return EncryptedQcow(store, filename)
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


# --------------------------------------------------------------------------- encrypted images
# The engine does not open encrypted images yet. qemu-img info opens them without a key
# (BDRV_O_NO_IO): it reads the header, snapshots and bitmaps, and for LUKS the LUKS header
# (crypto/block-luks.c, qcrypto_block_luks_get_info), but no data. EncryptedQcow2 and
# EncryptedQcow carry what image_info() reads, read with the format layer alone.

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_SECTOR = 512
LUKS_SLOTS = 8
LUKS_STRIPES = 4000
LUKS_SLOT_ENABLED = 0x00AC71F3
_LUKS = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _LUKS.size == 208 and _SLOT.size == 48

# cipher name -> {key bytes: QAPI QCryptoCipherAlgorithm}
_CIPHERS = {
    "aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"},
    "cast5": {16: "cast5-128"},
    "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
    "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"},
    "sm4": {16: "sm4"},
}
_MODES = ("ecb", "cbc", "xts", "ctr")
_IVGENS = ("plain", "plain64", "essiv")
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _hash(name: str) -> str:
    if name not in _HASHES:
        raise InvalidImageError(f"Unsupported hash algorithm {name}")
    return name


def luks_info(header: bytes) -> dict[str, Any]:
    """The `encrypt` member of qcow2 format-specific info for a LUKS header (QAPI order)."""
    if len(header) < _LUKS.size + LUKS_SLOTS * _SLOT.size:
        raise InvalidImageError("Request for data outside of extension header")
    (magic, version, cipher_name, cipher_mode, hash_spec, payload_sector, key_bytes, _digest,
     _salt, mk_iters, uuid) = _LUKS.unpack_from(header, 0)
    if magic != LUKS_MAGIC:
        raise InvalidImageError("Volume is not in LUKS format")
    if version != 1:
        raise InvalidImageError(f"Unsupported LUKS version {version}")
    mode_spec = _cstr(cipher_mode)
    mode, sep, ivgen = mode_spec.partition("-")
    if not sep:
        raise InvalidImageError(f"Unexpected cipher mode string format '{mode_spec}'")
    ivgen, colon, ivhash = ivgen.partition(":")
    if mode not in _MODES:
        raise InvalidImageError(f"Unsupported cipher mode {mode}")
    name = _cstr(cipher_name)
    key = key_bytes // 2 if mode == "xts" else key_bytes
    alg = _CIPHERS.get(name, {}).get(key)
    if alg is None:
        raise InvalidImageError(f"Algorithm '{name}' with key size {key} unsupported")
    if ivgen not in _IVGENS:
        raise InvalidImageError(f"Unsupported IV generator {ivgen}")
    info: dict[str, Any] = {"format": "luks", "cipher-alg": alg, "cipher-mode": mode,
                            "ivgen-alg": ivgen}
    if ivgen == "essiv":
        if not colon:
            raise InvalidImageError("Missing IV generator hash specification")
        info["ivgen-hash-alg"] = _hash(ivhash)
    info["hash-alg"] = _hash(_cstr(hash_spec))
    info["payload-offset"] = payload_sector * LUKS_SECTOR
    info["master-key-iters"] = mk_iters
    info["uuid"] = _cstr(uuid)
    slots = []
    for i in range(LUKS_SLOTS):
        active, iters, _s, key_sector, stripes = _SLOT.unpack_from(
            header, _LUKS.size + i * _SLOT.size)
        if stripes != LUKS_STRIPES:
            raise InvalidImageError(
                f"Keyslot {i} is corrupted (stripes {stripes} != {LUKS_STRIPES})")
        slot: dict[str, Any] = {"active": active == LUKS_SLOT_ENABLED}
        if slot["active"]:
            slot["iters"] = iters
            slot["stripes"] = stripes
        slot["key-offset"] = key_sector * LUKS_SECTOR
        slots.append(slot)
    info["slots"] = slots
    return info


class EncryptedQcow2(BlockDevice):
    """An encrypted qcow2 image's metadata: header, extensions, snapshots, bitmaps, LUKS header.

    A BlockDevice for info only: it maps and reads nothing.
    """

    format_name = "qcow2"
    encrypted = True

    def __init__(self, store: ByteStore, filename: str) -> None:
        self.store = store
        self.filename = filename
        first = store.pread(0, 4096)
        cbits = int.from_bytes(first[20:24], "big")
        if C.MIN_CLUSTER_BITS <= cbits <= C.MAX_CLUSTER_BITS and cbits > 12:
            first = store.pread(0, 1 << cbits)
        h = Header.parse(first)
        if h.incompatible_features & ~C.QCOW2_INCOMPAT_MASK:
            raise UnsupportedFeatureError(
                unsupported_features_message(h.incompatible_features, None))
        h.validate()
        self.header = h
        cs = h.cluster_size
        self.cluster_size = cs
        self.virtual_size = h.size & ~511
        cluster0 = store.pread(0, cs)
        self.extensions = exts = parse_extensions(cluster0, h)
        self.backing_file: str | None = None
        if h.backing_file_offset:
            n = h.backing_file_size
            if n > min(C.QCOW_MAX_BACKING_FILE_NAME, cs - h.backing_file_offset):
                raise InvalidImageError("Backing file name too long")
            raw = cluster0[h.backing_file_offset:h.backing_file_offset + n]
            self.backing_file = raw.decode("utf-8", "replace")
        self.backing_format = exts.backing_format
        self.has_data_file = bool(h.incompatible_features & C.QCOW2_INCOMPAT_DATA_FILE)
        self.data_file_raw = bool(h.autoclear_features & C.QCOW2_AUTOCLEAR_DATA_FILE_RAW)
        self.data_file_name = exts.data_file
        self.dirty = bool(h.incompatible_features & C.QCOW2_INCOMPAT_DIRTY)
        self.snapshots: list[SnapshotEntry] = []
        if h.nb_snapshots:
            want = min(max(0, store.size() - h.snapshots_offset),
                       C.QCOW_MAX_SNAPSHOTS_TABLE_BYTES + 8 * h.nb_snapshots)
            self.snapshots = parse_snapshot_table(store.pread(h.snapshots_offset, want),
                                                  h.nb_snapshots, h.snapshots_offset)
            for sn in self.snapshots:  # C strings in QEMU
                sn.id_str = sn.id_str.split("\0", 1)[0]
                sn.name = sn.name.split("\0", 1)[0]
        self.bitmaps: list[BitmapDirEntry] = []
        if exts.bitmaps is not None:
            bm = exts.bitmaps
            self.bitmaps = parse_bitmap_directory(
                store.pread(bm.bitmap_directory_offset, bm.bitmap_directory_size),
                bm.nb_bitmaps)
        if h.crypt_method == C.QCOW_CRYPT_LUKS:
            ext = exts.crypto
            if ext is None:
                raise InvalidImageError("Request for data outside of extension header")
            self.encrypt: dict[str, Any] = luks_info(store.pread(ext.offset, ext.length))
        else:
            self.encrypt = {"format": "aes"}

    def close(self) -> None:
        self.store.close()
        super().close()


class EncryptedQcow(BlockDevice):
    """An AES-encrypted qcow (v1) image's metadata (for info only, like EncryptedQcow2)."""

    format_name = "qcow"
    encrypted = True
    dirty = False

    def __init__(self, store: ByteStore, filename: str) -> None:
        from ..format.qcow1 import QCOW_HEADER_SIZE, QcowHeader

        self.store = store
        self.filename = filename
        h = QcowHeader.parse(store.pread(0, QCOW_HEADER_SIZE))
        h.validate_fields()
        h.validate_layout()
        self.cluster_size = h.cluster_size
        self.virtual_size = h.virtual_size & ~511
        self.backing_file: str | None = None
        if h.backing_file_offset:
            raw = store.pread(h.backing_file_offset, h.backing_file_size)
            self.backing_file = raw.split(b"\0", 1)[0].decode("utf-8", "replace") or None

    def close(self) -> None:
        self.store.close()
        super().close()
