"""Compressed cluster writes (QEMU's BDRV_REQ_WRITE_COMPRESSED) for qcow2 and qcow v1.

This module owns three things:

- the codecs exactly as QEMU calls them (block/qcow2-threads.c, block/qcow.c): zlib as raw
  deflate with window bits -12 and memLevel 9, zstd as one complete frame with the content
  size (one ZSTD_compressStream2(ZSTD_e_end) call); a cluster is only stored compressed when
  the result fits in cluster_size - 1 bytes, otherwise it is written as a normal cluster;
- qcow2's byte-granular packing (qcow2_alloc_bytes): a "free byte offset" continues inside the
  last host cluster used for compressed data, spilling into the next cluster only when that
  one is the next free cluster; each compressed cluster raises the refcount of every host
  cluster it touches by one;
- the qcow2 and qcow v1 write paths that link a compressed cluster into the L2 table.

`compress_cluster()` holds no image state and is thread-safe, so convert compresses in its
worker threads (zlib and zstandard release the GIL) and hands the results to
`write_compressed(..., compressed=[...])` in the writing thread.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CorruptImageError, ImageLimitError
from ..format import constants as C

if TYPE_CHECKING:
    from .qcow1 import WritableQcowImage
    from .writer import WritableQcow2Image

ZLIB = C.QCOW2_COMPRESSION_TYPE_ZLIB
ZSTD = C.QCOW2_COMPRESSION_TYPE_ZSTD
# QEMU's levels: deflateInit2(Z_DEFAULT_COMPRESSION) is level 6, a fresh ZSTD_CCtx level 3.
DEFAULT_LEVEL = {ZLIB: 6, ZSTD: 3}
LEVEL_RANGE = {ZLIB: (0, 9), ZSTD: (1, 22)}

_tls = threading.local()

Payloads = Sequence[bytes | None]


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class _LibZstd:
    """The system libzstd through ctypes, called exactly as qcow2_zstd_compress() calls it.

    zstd's output differs between library versions; QEMU links the system libzstd, so using
    the same library (rather than the one bundled with the `zstandard` package) keeps the
    compressed clusters byte-identical to QEMU's on the same system. ctypes releases the GIL
    during the call, so worker threads compress in parallel.
    """

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("zstd") or "libzstd.so.1"
        lib = ctypes.CDLL(name)
        self._ct = ctypes

        class Buffer(ctypes.Structure):
            _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t),
                        ("pos", ctypes.c_size_t)]

        self.Buffer = Buffer
        lib.ZSTD_createCCtx.restype = ctypes.c_void_p
        lib.ZSTD_createCCtx.argtypes = []
        lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_CCtx_reset.restype = ctypes.c_size_t
        lib.ZSTD_CCtx_reset.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_compressStream2.restype = ctypes.c_size_t
        lib.ZSTD_compressStream2.argtypes = [ctypes.c_void_p, ctypes.POINTER(Buffer),
                                             ctypes.POINTER(Buffer), ctypes.c_int]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        self.lib = lib

    def compress(self, data: bytes | bytearray | memoryview, dest_size: int,
                 level: int | None) -> bytes | None:
        ct = self._ct
        lib = self.lib
        cctx = getattr(_tls, "zstd_cctx", None)
        if cctx is None:
            cctx = _tls.zstd_cctx = lib.ZSTD_createCCtx()
            if not cctx:
                raise MemoryError("ZSTD_createCCtx failed")
        # A fresh context, as QEMU creates one per cluster: session and parameters reset.
        lib.ZSTD_CCtx_reset(cctx, 3)
        if level is not None and level != DEFAULT_LEVEL[ZSTD]:
            lib.ZSTD_CCtx_setParameter(cctx, 100, level)   # ZSTD_c_compressionLevel
        src = data if isinstance(data, bytes) else bytes(data)
        out = ct.create_string_buffer(max(dest_size, 1))
        inb = self.Buffer(ct.cast(ct.c_char_p(src), ct.c_void_p), len(src), 0)
        outb = self.Buffer(ct.cast(out, ct.c_void_p), dest_size, 0)
        ret = lib.ZSTD_compressStream2(cctx, ct.byref(outb), ct.byref(inb), 2)  # ZSTD_e_end
        if lib.ZSTD_isError(ret):
            # QEMU fails the write with EIO; storing the cluster uncompressed is safer.
            return None
        if ret > outb.size - outb.pos:
            return None     # QEMU's -ENOMEM: the frame is not complete
        raw: bytes = out.raw
        return raw[:outb.pos]


_libzstd: _LibZstd | None = None
_libzstd_failed = False
_libzstd_lock = threading.Lock()


def _system_zstd() -> _LibZstd | None:
    global _libzstd, _libzstd_failed
    if _libzstd is None and not _libzstd_failed:
        with _libzstd_lock:
            if _libzstd is None and not _libzstd_failed:
                try:
                    _libzstd = _LibZstd()
                except (OSError, AttributeError):
                    _libzstd_failed = True
    return _libzstd


def _zstd_compressor(level: int) -> Any:
    # One compressor per thread and level: zstandard's compressors are not thread-safe.
    cache: dict[int, Any] | None = getattr(_tls, "zstd", None)
    if cache is None:
        cache = _tls.zstd = {}
    cctx = cache.get(level)
    if cctx is None:
        import zstandard

        # write_content_size: QEMU's single ZSTD_e_end call pledges the source size, so the
        # frame header carries it (single-segment frame); no checksum, no dictionary id.
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                       write_checksum=False)
    return cctx


def compress_cluster(data: bytes | bytearray | memoryview, cluster_size: int,
                     compression_type: int = ZLIB, level: int | None = None) -> bytes | None:
    """One cluster compressed as QEMU does, or None when it must be stored uncompressed.

    A short `data` (the image's partial last cluster) is zero-padded to a whole cluster, as
    QEMU pads it. None means the output would not fit in cluster_size - 1 bytes: QEMU's
    output buffer has that size, and an overflow (ENOMEM) makes it write a normal cluster.
    """
    if len(data) < cluster_size:
        buf = bytearray(cluster_size)
        buf[:len(data)] = data
        data = buf
    if compression_type == ZSTD:
        lib = _system_zstd()
        if lib is not None:
            return lib.compress(data, cluster_size - 1, level)
        out: bytes = _zstd_compressor(DEFAULT_LEVEL[ZSTD] if level is None else level
                                      ).compress(data)
    else:
        c = zlib.compressobj(DEFAULT_LEVEL[ZLIB] if level is None else level, zlib.DEFLATED,
                             -12, 9, zlib.Z_DEFAULT_STRATEGY)
        out = c.compress(data) + c.flush()
        # QEMU's one deflate(Z_FINISH) call into a cluster_size - 1 buffer returns Z_OK, not
        # Z_STREAM_END, when the last block exactly fills the buffer (zlib reports
        # "finish started" whenever avail_out reaches 0): such a cluster is stored plain.
        return out if len(out) < cluster_size - 1 else None
    return out if len(out) <= cluster_size - 1 else None


def compress_clusters(data: bytes | bytearray | memoryview, cluster_size: int,
                      compression_type: int = ZLIB, level: int | None = None
                      ) -> list[bytes | None]:
    """compress_cluster() for each cluster of `data` (the last one may be partial)."""
    view = memoryview(data).cast("B")
    return [compress_cluster(view[i:i + cluster_size], cluster_size, compression_type, level)
            for i in range(0, len(view), cluster_size)]


def check_level(compression_type: int, level: int | None) -> None:
    if level is None:
        return
    lo, hi = LEVEL_RANGE[compression_type]
    if not lo <= level <= hi:
        name = "zstd" if compression_type == ZSTD else "zlib"
        raise ValueError(f"{name} compression level must be between {lo} and {hi}")


def _check_request(offset: int, length: int, cluster_size: int, virtual_size: int,
                   aligned_offset: bool) -> None:
    """QEMU's EINVAL rules: whole clusters, or a shorter tail that ends the image."""
    if aligned_offset and offset & (cluster_size - 1):
        raise _os_error(errno.EINVAL)
    # The end is compared with total_sectors << 9, the size rounded up to whole sectors.
    if length & (cluster_size - 1) and offset + length != -(-virtual_size // 512) * 512:
        raise _os_error(errno.EINVAL)


def _payloads(view: memoryview, cluster_size: int, compression_type: int, level: int | None,
              compressed: Payloads | None) -> Payloads:
    if compressed is None:
        return compress_clusters(view, cluster_size, compression_type, level)
    if len(compressed) != -(-len(view) // cluster_size):
        raise ValueError("one compressed payload (or None) is needed per cluster")
    return compressed


# ----------------------------------------------------------------------------- qcow2
def write_compressed_qcow2(img: WritableQcow2Image, offset: int,
                           data: bytes | bytearray | memoryview, level: int | None,
                           compressed: Payloads | None) -> None:
    """qcow2_co_pwritev_compressed_part(): cluster by cluster, in guest order.

    QEMU runs the clusters of one request as parallel tasks, which allocate in the order
    their compression finishes; we allocate in guest order (what qemu-img convert's
    one-cluster requests produce).
    """
    view = memoryview(data).cast("B")
    img._check_range(offset, len(view))
    if img.has_data_file:
        raise _os_error(errno.ENOTSUP)
    if not len(view):
        # qemu-img's final call "aligns the end of the file to a sector boundary": it
        # truncates the file to bdrv_getlength(), which counts whole sectors.
        end = img.store.size()
        if end % 512:
            img.store.truncate(end + 512 - end % 512)
        return
    cs = img.cluster_size
    _check_request(offset, len(view), cs, img.virtual_size, True)
    img._zlib_cache_key = None
    if img.refcounts.has_pending_decreases:
        # QEMU drops references right after the L2 update, so a freed cluster (even the
        # one free_byte_offset points into) is free before this allocation; our drops wait
        # for a flush, which is what makes them durable in the right order.
        img.flush()
    payloads = _payloads(view, cs, img.header.compression_type, level, compressed)
    for i, payload in enumerate(payloads):
        pos = offset + i * cs
        chunk = view[i * cs:(i + 1) * cs]
        if payload is None:
            img._write_impl(pos, chunk)
        else:
            _store_qcow2(img, pos, payload)
    img._maybe_flush()


def _store_qcow2(img: WritableQcow2Image, pos: int, payload: bytes) -> None:
    """qcow2_alloc_compressed_cluster_offset() and the data write."""
    cb = img.cluster_bits
    # The L2 table is allocated (or copied) before the bytes, as get_cluster_table() does.
    l2_off, table = img._l2_for_write(pos >> (cb + img.l2_bits))
    idx = (pos >> cb) & (img.l2_entries - 1)
    ti = 2 * idx if img.extended_l2 else idx
    # "Compression can't overwrite anything": any entry with host offset bits (normal,
    # ZERO_ALLOC, compressed) fails with EIO; unallocated and zero-plain entries are replaced.
    if table[ti] & C.L2E_OFFSET_MASK:
        raise _os_error(errno.EIO)
    coffset = _alloc_bytes(img, len(payload))
    entry = img.compressed_layout.encode(coffset, len(payload))
    img._check_overlap(coffset, len(payload))
    img.store.pwrite(coffset, payload)
    img._data_dirty = True
    table[ti] = entry
    if img.extended_l2:
        table[ti + 1] = 0  # compressed clusters have no subcluster bits
    img._dirty_l2[l2_off] = table


def _alloc_bytes(img: WritableQcow2Image, size: int) -> int:
    """qcow2_alloc_bytes(): `size` bytes for compressed data, packed after the previous ones."""
    rc = img.refcounts
    cb = img.cluster_bits
    cs = img.cluster_size
    offset = img.free_byte_offset
    # A host cluster holding refcount_max compressed clusters cannot take one more.
    if offset and rc.get(offset >> cb) == rc.refcount_max:
        offset = 0
    free_in_cluster = cs - (offset & (cs - 1))
    limit = min(img.compressed_layout.offset_mask + 1, C.QCOW_MAX_CLUSTER_OFFSET)
    while True:
        if not offset or free_in_cluster < size:
            new = rc._find_free(1) << cb    # alloc_clusters_noref()
            if new + cs > limit:
                raise ImageLimitError("Cannot allocate a compressed cluster: the image would "
                                      "exceed the compressed descriptor's offset range")
            if new == 0:
                raise CorruptImageError(
                    "Preventing invalid allocation of compressed cluster at offset 0")
            if not offset or -(-offset // cs) * cs != new:
                offset = new
                free_in_cluster = cs
            else:
                free_in_cluster += cs   # the next cluster is free: spill into it
            # alloc_clusters_noref() leaves its scan index past the cluster it found, so a
            # refblock created next lands after that cluster.
            rc.free_cluster_index = (new >> cb) + 1
        first = offset >> cb
        count = ((offset + size - 1) >> cb) - first + 1
        if rc._ensure_blocks(first, count):
            # A new refblock took space (QEMU's -EAGAIN): update_refcount() rewinds the scan
            # to the start of the range ("try the same ones first"), and qcow2_alloc_bytes()
            # starts over in a fresh cluster.
            rc.free_cluster_index = min(rc.free_cluster_index, first)
            offset = 0
            continue
        rc._update_range(first, count, 1)
        break
    img.free_byte_offset = (offset + size) if (offset + size) & (cs - 1) else 0
    return offset


# ----------------------------------------------------------------------------- qcow v1
def write_compressed_qcow1(img: WritableQcowImage, offset: int,
                           data: bytes | bytearray | memoryview, level: int | None,
                           compressed: Payloads | None) -> None:
    """qcow_co_pwritev_compressed(): exactly one cluster (or the image's tail).

    The compressed bytes go at the end of the file rounded up to a sector (bdrv_getlength()
    counts whole sectors), so compressed clusters are packed at sector granularity.
    Unlike QEMU, a compressed write over an allocated cluster fails with EIO: QEMU writes the
    compressed bytes over the old cluster's data without updating its L2 entry, which
    corrupts the guest's view. An unaligned offset is EINVAL here (QEMU would compress the
    bytes into the cluster containing the offset).
    """
    view = memoryview(data).cast("B")
    img._check_range(offset, len(view))
    cs = img.cluster_size
    n = len(view)
    if n > cs or (n != cs and offset + n != -(-img.virtual_size // 512) * 512):
        raise _os_error(errno.EINVAL)   # includes QEMU's 0-byte "align" call
    _check_request(offset, n, cs, img.virtual_size, True)
    payloads = _payloads(view, cs, ZLIB, level, compressed)
    payload = payloads[0]
    if payload is None:
        img.write(offset, view)
        return
    img._zlib_cache_key = None
    cb = img.cluster_bits
    l2_offset = img._l2_for_write(offset >> (cb + img.l2_bits))
    table = img.l2_cache.get(l2_offset)
    idx = (offset >> cb) & (img.l2_entries - 1)
    if table[idx]:
        raise _os_error(errno.EIO)
    from ..format.qcow1 import encode_compressed_entry

    host = -(-img.store.size() // 512) * 512
    entry = encode_compressed_entry(host, len(payload), cb)
    # Data first, then the L2 entry (QEMU links first; the finished file is the same).
    img.store.pwrite(host, payload)
    img.store.flush()
    table[idx] = entry
    img.store.pwrite(l2_offset + idx * 8, struct.pack(">Q", entry))
    img.store.flush()
