"""The qcow2 header (v2 and v3) and its extensions: parse, validate against QEMU's limits, encode.

Encoding follows QEMU's qcow2_update_header(): one zeroed cluster holding the header, the
extensions in QEMU's fixed order, the end marker and the backing file name right after it.
"""

from __future__ import annotations

import struct

from .._record import field, record
from ..errors import ImageLimitError, InvalidImageError, UnsupportedFeatureError
from . import constants as C

_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # the 72-byte version 2 header
_V3 = struct.Struct(">QQQII")  # features, refcount_order, header_length: bytes 72..104
assert _V2.size == 72 and _V3.size == 32

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
QEMU_HEADER_LENGTH = 112  # sizeof(QCowHeader): what QEMU writes for images it creates
SNAPSHOT_HEADER_SIZE = 40


@record
class Header:
    """Every field of the qcow2 header, by its spec name."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = QEMU_HEADER_LENGTH
    compression_type: int = 0
    # Bytes 105..header_length (padding and fields this version does not know), kept verbatim.
    tail_bytes: bytes = b""
    magic: int = C.QCOW_MAGIC

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.QCOW2_INCOMPAT_EXTL2)

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """Decode the header from the start of the image (at least 72 bytes; 104+ for v3).

        Only the structural checks needed to decode are made here; QEMU's open-time limits are
        in validate().
        """
        if len(data) < 8 or data[:4] != C.QCOW_MAGIC_BYTES:
            raise InvalidImageError("Image is not in qcow2 format")
        version = struct.unpack_from(">I", data, 4)[0]
        if version not in (2, 3):
            raise UnsupportedFeatureError(f"Unsupported qcow2 version {version}")
        if len(data) < V2_HEADER_LENGTH:
            raise InvalidImageError("Could not read qcow2 header: file too short")
        (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = _V2.unpack_from(data, 0)
        h = cls(version=version, backing_file_offset=bfo, backing_file_size=bfs,
                cluster_bits=cbits, size=size, crypt_method=crypt, l1_size=l1_size,
                l1_table_offset=l1_off, refcount_table_offset=rt_off,
                refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
                snapshots_offset=snap_off, magic=magic)
        if version == 2:
            h.header_length = V2_HEADER_LENGTH
            h.refcount_order = 4
            return h
        if len(data) < V3_MIN_HEADER_LENGTH:
            raise InvalidImageError("Could not read qcow2 header: file too short")
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(data, 72)
        if h.header_length < V3_MIN_HEADER_LENGTH:
            raise InvalidImageError("qcow2 header too short")
        if h.header_length > (1 << min(max(cbits, 0), 63)) or h.header_length > len(data):
            raise InvalidImageError("qcow2 header exceeds cluster size")
        if h.header_length > 104:
            h.compression_type = data[104]
            h.tail_bytes = bytes(data[105:h.header_length])
        return h

    def encode(self) -> bytes:
        """The header bytes as QEMU writes them (72 bytes for v2, header_length for v3)."""
        out = bytearray(_V2.pack(
            self.magic, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
            self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
            self.snapshots_offset))
        if self.version == 2:
            return bytes(out)
        out += _V3.pack(self.incompatible_features, self.compatible_features,
                        self.autoclear_features, self.refcount_order, self.header_length)
        if self.header_length > 104:
            out.append(self.compression_type)
            out += self.tail_bytes
            want = self.header_length
            if len(out) < want:
                out += bytes(want - len(out))
            del out[want:]
        return bytes(out)

    def validate(self, check_mode: bool = False) -> None:
        """Apply QEMU's open-time checks (qcow2_do_open), in QEMU's order, with its messages.

        Runs before any field sizes an allocation or a loop. `check_mode` relaxes what
        `qemu-img check` tolerates (no refcount table, any snapshot count).
        """
        if not C.MIN_CLUSTER_BITS <= self.cluster_bits <= C.MAX_CLUSTER_BITS:
            raise InvalidImageError(f"Unsupported cluster size: 2^{self.cluster_bits}")
        cs = self.cluster_size
        if self.version >= 3 and self.header_length > cs:
            raise InvalidImageError("qcow2 header exceeds cluster size")
        if self.backing_file_offset > cs:
            raise InvalidImageError("Invalid backing file offset")
        if self.extended_l2 and cs // C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER < 512:
            raise InvalidImageError(
                f"Unsupported subcluster size: {cs // C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER}")
        if self.refcount_order > 6:
            raise InvalidImageError(
                "Reference count entry width too large; may not exceed 64 bits")
        # validate_compression_type(): an unknown type first, then the bit must match.
        ct = self.compression_type
        if ct not in C.COMPRESSION_TYPE_NAMES:
            raise InvalidImageError(f"qcow2: unknown compression type: {ct}")
        if ct != C.QCOW2_COMPRESSION_TYPE_ZLIB:
            if not self.incompatible_features & C.QCOW2_INCOMPAT_COMPRESSION:
                raise InvalidImageError(
                    "qcow2: Compression type incompatible feature bit must be set")
        elif self.incompatible_features & C.QCOW2_INCOMPAT_COMPRESSION:
            raise InvalidImageError(
                "qcow2: Compression type incompatible feature bit must not be set")
        if self.crypt_method > C.QCOW_CRYPT_LUKS:
            raise InvalidImageError(f"Unsupported encryption method {self.crypt_method}")
        if self.refcount_table_clusters == 0 and not check_mode:
            raise InvalidImageError("Image does not contain a reference count table")
        _validate_table(self, self.refcount_table_offset, self.refcount_table_clusters, cs,
                        C.QCOW_MAX_REFTABLE_SIZE, "Reference count table")
        if not check_mode:
            _validate_table(self, self.snapshots_offset, self.nb_snapshots,
                            SNAPSHOT_HEADER_SIZE, SNAPSHOT_HEADER_SIZE * C.QCOW_MAX_SNAPSHOTS,
                            "Snapshot table")
        _validate_table(self, self.l1_table_offset, self.l1_size, 8, C.QCOW_MAX_L1_SIZE,
                        "Active L1 table")
        if self.size > C.INT64_MAX:
            raise ImageLimitError("Image is too big")
        vm_state_index = l1_entries_for(self.size, self.cluster_bits, self.l2_bits)
        if vm_state_index > 0x7FFFFFFF:
            raise ImageLimitError("Image is too big")
        if self.l1_size < vm_state_index:
            raise InvalidImageError("L1 table is too small")

    @property
    def l2_bits(self) -> int:
        """log2 of the number of L2 entries per cluster."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)


def l1_entries_for(size: int, cluster_bits: int, l2_bits: int) -> int:
    """size_to_l1(): L1 entries needed to map `size` guest bytes."""
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def _validate_table(h: Header, offset: int, entries: int, entry_len: int, max_bytes: int,
                    name: str) -> None:
    if entries > max_bytes // entry_len:
        raise ImageLimitError(f"{name} too large")
    if C.INT64_MAX - entries * entry_len < offset or offset & (h.cluster_size - 1):
        raise InvalidImageError(f"{name} offset invalid")


# --------------------------------------------------------------------------- extensions

@record
class Extension:
    """One header extension: magic and raw payload (padding excluded)."""

    magic: int
    data: bytes


@record
class BitmapsExtension:
    nb_bitmaps: int
    reserved32: int
    bitmap_directory_size: int
    bitmap_directory_offset: int

    _S = struct.Struct(">IIQQ")

    @classmethod
    def parse(cls, data: bytes) -> BitmapsExtension:
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.nb_bitmaps, self.reserved32, self.bitmap_directory_size,
                            self.bitmap_directory_offset)


@record
class CryptoExtension:
    offset: int
    length: int

    _S = struct.Struct(">QQ")

    @classmethod
    def parse(cls, data: bytes) -> CryptoExtension:
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.offset, self.length)


def parse_feature_table(data: bytes) -> list[tuple[int, int, str]]:
    """Feature name table entries as (type, bit, name)."""
    out = []
    for i in range(len(data) // 48):
        entry = data[i * 48:(i + 1) * 48]
        name = entry[2:].split(b"\0", 1)[0].decode("utf-8", "replace")
        out.append((entry[0], entry[1], name))
    return out


def encode_feature_table(entries: tuple[tuple[int, int, str], ...] | list[tuple[int, int, str]]
                         ) -> bytes:
    out = bytearray()
    for ftype, bit, name in entries:
        raw = name.encode()[:46]
        out += bytes([ftype, bit]) + raw + bytes(46 - len(raw))
    return bytes(out)


@record
class HeaderExtensions:
    """The decoded extension area. `unknown` keeps foreign extensions byte-exact, in file order."""

    backing_format: str | None = None
    feature_table: list[tuple[int, int, str]] | None = None
    bitmaps: BitmapsExtension | None = None
    crypto: CryptoExtension | None = None
    data_file: str | None = None
    unknown: list[Extension] = field(default_factory=list)
    # Every extension in file order (known ones included), for exact round trips.
    raw: list[Extension] = field(default_factory=list)


def parse_extensions(cluster0: bytes, h: Header, *, strict: bool = True) -> HeaderExtensions:
    """Walk the extension list as qcow2_read_extensions() does.

    The area runs from the end of the header to backing_file_offset (if set) or the cluster end.
    `strict=False` only collects the feature table (used to name unknown features).
    """
    start = h.header_length
    end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    end = min(end, len(cluster0)) if not strict else end
    exts = HeaderExtensions()
    off = start
    while off < end:
        if off + 8 > len(cluster0):
            raise InvalidImageError("Header extension too large")
        magic, length = struct.unpack_from(">II", cluster0, off)
        off += 8
        if off > end or length > end - off:
            raise InvalidImageError("Header extension too large")
        data = bytes(cluster0[off:off + length])
        if magic == C.QCOW2_EXT_MAGIC_END:
            break
        exts.raw.append(Extension(magic, data))
        if magic == C.QCOW2_EXT_MAGIC_FEATURE_TABLE:
            exts.feature_table = parse_feature_table(data)
        elif not strict:
            pass
        elif magic == C.QCOW2_EXT_MAGIC_BACKING_FORMAT:
            if length > C.QCOW_MAX_BACKING_FMT_NAME:
                raise InvalidImageError(
                    f"ERROR: ext_backing_format: len={length} too large (>=16)")
            exts.backing_format = data.decode("utf-8", "replace")
        elif magic == C.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
            if h.crypt_method != C.QCOW_CRYPT_LUKS:
                raise InvalidImageError(
                    "CRYPTO header extension only expected with LUKS encryption method")
            if length != 16:
                raise InvalidImageError(
                    f"CRYPTO header extension size {length}, but expected size 16")
            exts.crypto = CryptoExtension.parse(data)
        elif magic == C.QCOW2_EXT_MAGIC_BITMAPS:
            if length != 24:
                raise InvalidImageError("bitmaps_ext: Invalid extension length")
            bm = BitmapsExtension.parse(data)
            if h.autoclear_features & C.QCOW2_AUTOCLEAR_BITMAPS:
                _validate_bitmaps_ext(bm, h)
                exts.bitmaps = bm
        elif magic == C.QCOW2_EXT_MAGIC_DATA_FILE:
            exts.data_file = data.decode("utf-8", "replace")
        else:
            exts.unknown.append(Extension(magic, data))
        off += (length + 7) & ~7
    return exts


def _validate_bitmaps_ext(bm: BitmapsExtension, h: Header) -> None:
    if bm.reserved32 != 0:
        raise InvalidImageError("bitmaps_ext: Reserved field is not zero")
    if bm.nb_bitmaps > C.QCOW_MAX_BITMAPS:
        raise ImageLimitError(
            f"bitmaps_ext: Image has {bm.nb_bitmaps} bitmaps, exceeding the QEMU supported "
            f"maximum of {C.QCOW_MAX_BITMAPS}")
    if bm.nb_bitmaps == 0:
        raise InvalidImageError("found bitmaps extension with zero bitmaps")
    if bm.bitmap_directory_offset & (h.cluster_size - 1):
        raise InvalidImageError("bitmaps_ext: invalid bitmap directory offset")
    if bm.bitmap_directory_size > C.QCOW_MAX_BITMAP_DIRECTORY_SIZE:
        raise ImageLimitError(
            f"bitmaps_ext: bitmap directory size ({bm.bitmap_directory_size}) exceeds the "
            f"maximum supported size ({C.QCOW_MAX_BITMAP_DIRECTORY_SIZE})")


def unsupported_features_message(incompatible: int,
                                 table: list[tuple[int, int, str]] | None) -> str:
    """QEMU's report_unsupported_feature() text for unknown incompatible bits."""
    mask = incompatible & ~C.QCOW2_INCOMPAT_MASK
    names = []
    for ftype, bit, name in table or []:
        if ftype == C.FEAT_TYPE_INCOMPATIBLE and bit < 64 and mask & (1 << bit):
            names.append(name)
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def encode_header_cluster(h: Header, exts: HeaderExtensions, backing_file: str | None) -> bytes:
    """The whole first cluster as qcow2_update_header() builds it.

    Extension order: backing format, data file, crypto, feature table (v3 and cs > 4 KiB),
    bitmaps, unknown ones (QEMU re-emits these reversed), end marker, then the backing name.
    `h.backing_file_offset/size` are set here.
    """
    cs = h.cluster_size
    out = bytearray(h.encode())
    if h.version >= 3 and len(out) < h.header_length:
        out += bytes(h.header_length - len(out))

    def put(magic: int, data: bytes) -> None:
        out.extend(struct.pack(">II", magic, len(data)))
        out.extend(_pad8(data))

    if exts.backing_format:
        put(C.QCOW2_EXT_MAGIC_BACKING_FORMAT, exts.backing_format.encode())
    if exts.data_file:
        put(C.QCOW2_EXT_MAGIC_DATA_FILE, exts.data_file.encode())
    if exts.crypto is not None:
        put(C.QCOW2_EXT_MAGIC_CRYPTO_HEADER, exts.crypto.encode())
    if h.version >= 3 and cs > 4096:
        put(C.QCOW2_EXT_MAGIC_FEATURE_TABLE, encode_feature_table(C.QEMU_FEATURE_TABLE))
    if exts.bitmaps is not None:
        put(C.QCOW2_EXT_MAGIC_BITMAPS, exts.bitmaps.encode())
    for ext in reversed(exts.unknown):
        put(ext.magic, ext.data)
    put(C.QCOW2_EXT_MAGIC_END, b"")
    if backing_file:
        name = backing_file.encode()
        h.backing_file_offset = len(out)
        h.backing_file_size = len(name)
        out += name
    else:
        h.backing_file_offset = 0
        h.backing_file_size = 0
    if len(out) > cs:
        raise ImageLimitError("Header, extensions and backing file name do not fit in one cluster")
    out[:len(h.encode())] = h.encode()
    return bytes(out) + bytes(cs - len(out))


def encode_qemu_header(h: Header, exts: HeaderExtensions, backing_file: str | None) -> bytes:
    """qcow2_update_header(): the whole first cluster from the in-memory state.

    QEMU writes header_length = sizeof(QCowHeader) + the unknown fields it read, so a v3
    header of 104 bytes comes back as 112, and the padding after compression_type is zeroed.
    """
    if h.version >= 3 and h.header_length < QEMU_HEADER_LENGTH:
        h.header_length = QEMU_HEADER_LENGTH
        h.tail_bytes = bytes(QEMU_HEADER_LENGTH - 105)
    elif h.version >= 3:
        pad = QEMU_HEADER_LENGTH - 105
        h.tail_bytes = bytes(pad) + h.tail_bytes[pad:]
    return encode_header_cluster(h, exts, backing_file)
