"""`measure`: how large a new image would be (qemu-img 7.2's qcow2_measure and raw_measure).

`required` is what a conversion (or a fresh image of `--size`) needs at least, `fully-allocated`
what it needs with every cluster allocated; `bitmaps` the space persistent bitmaps copied from
a qcow2 v3 source would take. The numbers are QEMU's formulas, not an estimate of our own: the
metadata of a fully allocated image is always counted, and the source's data counts per target
cluster touched by any data extent of the whole backing chain.
"""

from __future__ import annotations

from collections.abc import Mapping

from .._record import record
from ..engine.device import BlockDevice
from ..errors import Qcow2Error
from ..format import constants as C

DEFAULT_CLUSTER_SIZE = 65536
PREALLOC_MODES = ("off", "metadata", "falloc", "full")


class MeasureError(Qcow2Error, ValueError):
    """Measuring refused, with qemu-img's message (possibly several lines)."""


@record
class MeasureInfo:
    """QAPI BlockMeasureInfo."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def to_json(self) -> dict[str, int]:
        out = {"required": self.required, "fully-allocated": self.fully_allocated}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        return out


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous: bool = False) -> int:
    """Bytes of refcount table and blocks needed to cover `clusters` plus themselves."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
            continue
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:
    """File size of a fully allocated image: header, every L2 table, the L1, refcounts, data."""
    aligned = -(-total_size // cluster_size) * cluster_size
    l2e_size = 16 if extended_l2 else 8
    meta = cluster_size
    nl2e = aligned // cluster_size
    nl2e = -(-nl2e // (cluster_size // l2e_size)) * (cluster_size // l2e_size)
    meta += nl2e * l2e_size
    nl1e = nl2e * l2e_size // cluster_size
    nl1e = -(-nl1e // (cluster_size // 8)) * (cluster_size // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


def _qcow2_options(opts: Mapping[str, str]) -> tuple[int, int, int, bool, str]:
    """The creation options qcow2_measure reads, checked in its order with its messages."""
    from .qemu_opts import _opt_number, _parse_bool, parse_size

    extended_l2 = _parse_bool("extended_l2", opts.get("extended_l2", "off"))
    cluster_size = (parse_size(opts["cluster_size"]) if "cluster_size" in opts
                    else DEFAULT_CLUSTER_SIZE)
    cbits = cluster_size.bit_length() - 1
    if cluster_size & (cluster_size - 1) or not C.MIN_CLUSTER_BITS <= cbits <= C.MAX_CLUSTER_BITS:
        raise MeasureError("Cluster size must be a power of two between 512 and 2048k")
    min_extl2 = 512 * C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
    if extended_l2 and cluster_size < min_extl2:
        raise MeasureError("Extended L2 entries are only supported with cluster sizes of at "
                           f"least {min_extl2} bytes")
    compat = opts.get("compat")
    if compat is None or compat == "1.1":
        version = 3
    elif compat == "0.10":
        version = 2
    else:
        raise MeasureError(f"Invalid compatibility level: '{compat}'")
    refcount_bits = _opt_number("refcount_bits", opts["refcount_bits"]) \
        if "refcount_bits" in opts else 16
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise MeasureError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise MeasureError("Different refcount widths than 16 bits require compatibility level "
                           "1.1 or above (use compat=1.1 or greater)")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in PREALLOC_MODES:
        raise MeasureError(f"invalid parameter value: {prealloc}")
    return cluster_size, version, refcount_bits.bit_length() - 1, extended_l2, prealloc


def _data_bytes(dev: BlockDevice, size: int, cluster_size: int) -> int:
    """Bytes of the target clusters that hold data of the source chain (zeros are skipped).

    QEMU walks block status and, after each data run, resumes at the next cluster boundary:
    every target cluster touched by a data run is counted once.
    """
    total = 0
    counted_to = 0
    for e in dev.extents(0, size):
        if e.zero or not (e.data and e.present):
            continue
        end = e.start + e.length
        if end <= counted_to:
            continue
        first = max(counted_to, e.start - e.start % cluster_size)
        counted_to = -(-end // cluster_size) * cluster_size
        total += counted_to - first
    return total


def _bitmaps_size(dev: BlockDevice, size: int, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size(): each bitmap fully allocated, its table, and
    the directory, each rounded up to whole clusters."""
    total = 0
    dir_bytes = 0
    for bm in getattr(dev, "bitmaps", ()):
        gran = 1 << min(bm.granularity_bits, 63)
        bits = -(-size // gran)
        nbytes = -(-bits // 8)
        nclusters = -(-nbytes // cluster_size)
        total += nclusters * cluster_size
        total += -(-(nclusters * 8) // cluster_size) * cluster_size
        dir_bytes += (24 + len(bm.name.encode("utf-8", "surrogateescape")) + 7) & ~7
    return total + -(-dir_bytes // cluster_size) * cluster_size


def measure(out_fmt: str, opts: Mapping[str, str], size: int | None,
            source: BlockDevice | None) -> MeasureInfo:
    """Measure a new `out_fmt` image of `size` bytes, or converted from `source`.

    `opts` are the target's creation options, already parsed (ops.create.parse_create_options).
    """
    if out_fmt == "raw":
        # unallocated sectors take space in a raw file too
        req = source.virtual_size if source is not None else -(-(size or 0) // 512) * 512
        return MeasureInfo(req, req)
    if out_fmt != "qcow2":
        raise MeasureError(f"Block driver '{out_fmt}' does not support size measurement")
    cluster_size, version, refcount_order, extended_l2, prealloc = _qcow2_options(opts)
    has_backing = "backing_file" in opts
    if opts.get("encrypt.format") == "luks":
        secret = opts.get("encrypt.key-secret")
        if secret is None:
            raise MeasureError("Parameter 'encrypt.key-secret' is required for cipher")
        raise MeasureError(f"No secret with id '{secret}' found")
    if size is None:
        from .qemu_opts import parse_size

        size = parse_size(opts["size"]) if "size" in opts else 0
    virtual_size = -(-size // cluster_size) * cluster_size
    l2e_size = 16 if extended_l2 else 8
    l2_tables = -(-(virtual_size // cluster_size) // (cluster_size // l2e_size))
    if l2_tables * 8 > C.QCOW_MAX_L1_SIZE:
        raise MeasureError("The image size is too large (try using a larger cluster size)")
    required = 0
    if source is not None:
        ssize = source.virtual_size
        virtual_size = -(-ssize // cluster_size) * cluster_size
        # With a backing file, the new backing file may share nothing with the source:
        # every cluster counts.
        required = virtual_size if has_backing else _data_bytes(source, ssize, cluster_size)
    if prealloc in ("full", "falloc"):
        required = virtual_size
    fully = prealloc_size(virtual_size, cluster_size, refcount_order, extended_l2)
    info = MeasureInfo(fully - virtual_size + required, fully)
    if version >= 3 and source is not None and _supports_bitmaps(source):
        info.bitmaps = _bitmaps_size(source, source.virtual_size, cluster_size)
    return info


def _supports_bitmaps(dev: BlockDevice) -> bool:
    from ..engine.image import Qcow2Image

    return isinstance(dev, Qcow2Image) and dev.header.version >= 3
