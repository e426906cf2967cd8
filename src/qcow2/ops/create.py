"""Image creation, byte-identical to `qemu-img create` 7.2: qcow2 (every option but encryption),
qcow (version 1) and raw.

The flow mirrors QEMU's, because qemu-img's observable behaviour (which message wins, whether the
file is left behind, what the file looks like) is a product of that order:

1. `bdrv_img_create()` (block.c): parse `-o` as QemuOpts, take the size from the backing file,
   print the "Formatting ..." line. `img_create()` below.
2. The format's `create_opts` callback: create (or truncate) the protocol file, convert the
   options to the QAPI type (the first bad value in schema order fails), then the format's
   `co_create`. For qcow2 any failure from here on deletes the image and the data file.
3. qcow2_co_create(): write a minimal header and a reftable with one refblock, reopen, allocate
   clusters 0..2, rewrite the full header, truncate to the requested size (which allocates the L1
   table and, with preallocation, L2 tables and data clusters), set the backing file.

The qcow2 layout of step 3 is reproduced by `_Qcow2Alloc`, a model of QEMU's cluster allocator
(qcow2-refcount.c: alloc_clusters_noref, update_refcount, alloc_refcount_block,
qcow2_refcount_area; qcow2-cluster.c: qcow2_alloc_host_offset, l2_allocate). It follows the
same first-fit scans, the same -EAGAIN restarts and the same reftable growth, so even the
refblocks and moved reftables of large preallocated images land where QEMU puts them. Only the
final state of each structure is written (plus the stale bytes of freed reftables), which is
what the file holds after QEMU's sequence of writes.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from ..errors import ImageLimitError, Qcow2Error
from ..format import constants as C
from ..format.header import Header, HeaderExtensions, encode_header_cluster, l1_entries_for
from .qemu_opts import (  # noqa: F401  (re-exported: callers import them from here)
    _ALL_OPTS,
    _FORMAT_OPTS,
    BLOCKDEV_DRIVERS,
    PREALLOC_MODES,
    CreateError,
    Warn,
    _opt_number,
    _opt_size,
    _OptDesc,
    _parse_bool,
    _split_opts,
    _strtou64,
    has_help_option,
    is_valid_option_list,
    parse_size,
)

__all__ = [
    "CreateError",
    "CreateLimitError",
    "create",
    "format_line",
    "img_create",
    "option_help",
    "parse_create_options",
]

FORMATS = ("qcow2", "qcow", "raw")
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1
_U64 = 1 << 64
# BDRV_MAX_LENGTH: INT64_MAX aligned down to the block layer's largest alignment (1 GiB).
BDRV_MAX_LENGTH = INT64_MAX - INT64_MAX % (1 << 30)
# BDRV_REQUEST_MAX_BYTES: INT_MAX rounded down to whole sectors.
BDRV_REQUEST_MAX_BYTES = INT_MAX & ~511
DEFAULT_CLUSTER_SIZE = 65536


class CreateLimitError(CreateError, ImageLimitError):
    """The image would exceed a qcow2 limit (QEMU's -EFBIG)."""


class _EFBig(Exception):
    """-EFBIG inside the qcow2 layout model: bdrv_img_create() turns it into its own message."""


class _EAgain(Exception):
    """-EAGAIN from alloc_refcount_block(): the caller restarts its free-cluster search."""


def _descs(fmt: str) -> dict[str, _OptDesc]:
    if fmt not in _ALL_OPTS:
        raise CreateError(f"Unknown file format '{fmt}'")
    return {d[0]: d for d in _ALL_OPTS[fmt]}


def parse_create_options(fmt: str, text: str, warn: Warn | None = None) -> dict[str, str]:
    """Parse a qemu-img `-o` string for `fmt` as qemu_opts_do_parse() does.

    Returns name -> raw value (the last one wins, as with QemuOpts). Unknown names and values
    that are not a valid bool, number or size are refused with QEMU's messages (CreateError).
    """
    descs = _descs(fmt)
    out: dict[str, str] = {}
    if not text:
        return out
    for name, value in _split_opts(text):
        d = descs.get(name)
        if d is None:
            raise CreateError(f"Invalid parameter '{name}'")
        kind = d[1]
        if kind == "bool":
            _parse_bool(name, value)
        elif kind == "size":
            _opt_size(name, value, warn)
        elif kind == "num":
            _opt_number(name, value)
        out.pop(name, None)
        out[name] = value
    return out


def _escaped(value: str) -> str:
    return value.replace(",", ",,")


def format_line(filename: str, fmt: str, opts: Mapping[str, str]) -> str:
    """The line qemu-img create prints: `Formatting 'F', fmt=F opt=value ...` (qemu_opts_print:
    every option in the driver's order, set or with a default; sizes and numbers as int64)."""
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    for name, kind, default, _help in _ALL_OPTS[fmt]:
        value = opts.get(name)
        if value is None:
            if default is None:
                continue
            parts.append(f"{name}={default}")
        elif kind in ("size", "num"):
            num = parse_size(value) if kind == "size" else _opt_number(name, value)
            parts.append(f"{name}={num - _U64 if num > INT64_MAX else num}")
        elif kind == "str":
            parts.append(f"{name}={_escaped(value)}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def option_help(fmt: str, with_protocol: bool = True) -> str:
    """`qemu-img create -f FMT -o help [FILE]`: the options sorted by name."""
    opts = _ALL_OPTS[fmt] if with_protocol else _FORMAT_OPTS[fmt]
    types = {"str": "str", "bool": "bool (on/off)", "num": "num", "size": "size"}
    lines = ["Supported options:" if with_protocol else f"Supported {fmt} options:"]
    for name, kind, _default, text in sorted(opts, key=lambda d: d[0].encode()):
        head = f"  {name}=<{types[kind]}>"
        lines.append(f"{head:<24} - {text}")
    out = "\n".join(lines) + "\n"
    if not with_protocol:
        out += ("\nThe protocol level may support further options.\n"
                "Specify the target filename to include those options.\n")
    return out


# --------------------------------------------------------------------------- the file layer
def _strip_file_protocol(filename: str) -> str:
    """bdrv_find_protocol(): a `proto:` prefix before any '/' names a protocol; only the local
    file protocol is supported."""
    cut = len(filename)
    for ch in ":/":
        k = filename.find(ch)
        if k >= 0:
            cut = min(cut, k)
    if cut < len(filename) and filename[cut] == ":":
        proto = filename[:cut]
        if proto != "file":
            raise CreateError(f"Unknown protocol '{proto}'")
        return filename[cut + 1:]
    return filename


class _File:
    """A file as file-posix creates it: opened with O_CREAT (never O_TRUNC), then truncated."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise CreateError(f"Could not create '{path}': {_strerror(e)}") from None
        self.length = 0
        try:
            os.ftruncate(self.fd, 0)
        except OSError as e:
            self.close()
            raise CreateError(f"Could not resize file: {_strerror(e)}") from None

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:done + (1 << 30)], offset + done)
        self.length = max(self.length, offset + len(view))

    def write_zeroes(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = min(len(chunk), offset + length - pos)
            self.pwrite(pos, chunk[:n])
            pos += n

    def truncate(self, size: int, prealloc: str = "off") -> None:
        """handle_aiocb_truncate() of file-posix for a growing file."""
        current = self.length
        if prealloc == "falloc":
            if size != current:
                try:
                    os.posix_fallocate(self.fd, current, size - current)
                except OSError:
                    # Not every file system can preallocate: zeros read the same.
                    os.ftruncate(self.fd, size)
        elif prealloc == "full":
            os.ftruncate(self.fd, size)
            self.length = size
            if size > current:
                self.write_zeroes(current, size - current)
        elif prealloc == "off":
            os.ftruncate(self.fd, size)
            if current == 0 and size > 0:
                # allocate_first_block(): QEMU writes the first block of a file it grows from
                # empty so that later alignment probing works. It shows up in SEEK_DATA.
                n = 512 if size < 4096 else 4096
                os.pwrite(self.fd, bytes(n), 0)
        else:
            raise CreateError(f"Unsupported preallocation mode: {prealloc}")
        self.length = max(self.length, size) if prealloc != "off" else size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fs_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _strerror(e: OSError) -> str:
    return e.strerror or os.strerror(e.errno or errno.EIO)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _file_prealloc(opts: Mapping[str, str]) -> str:
    """raw_co_create_opts() reads the protocol's preallocation before creating the file."""
    mode = opts.get("preallocation", "off")
    if mode not in PREALLOC_MODES:
        raise CreateError(f"invalid parameter value: {mode}")
    return mode


# --------------------------------------------------------------------------- the request
@dataclass
class _Request:
    filename: str  # as given (printed, and the base of a relative backing file name)
    path: str  # the local path ("file:" stripped)
    fmt: str
    opts: dict[str, str]
    warn: Warn | None = None
    files_created: list[str] = field(default_factory=list)


def img_create(filename: str, fmt: str = "raw", options: Mapping[str, str] | str | None = None,
               size: int | None = None, *, base_filename: str | None = None,
               base_fmt: str | None = None, no_backing: bool = False,
               out: Callable[[str], None] | None = None, warn: Warn | None = None) -> None:
    """bdrv_img_create(): what `qemu-img create` does once its arguments are parsed.

    `options` is the -o text (parsed here, after the format and protocol checks, as QEMU does)
    or already parsed raw values; `size` is the positional size (None when omitted). `out`
    receives the "Formatting" line (None: quiet). Raises CreateError with qemu-img's message.
    """
    descs = _descs(fmt)
    path = _strip_file_protocol(filename)
    if isinstance(options, str):
        opts = parse_create_options(fmt, options, warn)
    else:
        opts = dict(options or {})
    if opts.get("encryption") is not None and _parse_bool("encryption", opts["encryption"]):
        raise CreateError("Encryption is not supported yet (option 'encryption')")
    for name in opts:
        if name.startswith("encrypt."):
            raise CreateError(f"Encryption is not supported yet (option '{name}')")
    if "size" not in opts:
        if size is not None:
            opts["size"] = str(size)
    elif size is not None:
        raise CreateError("The image size must be specified only once")
    if base_filename is not None:
        if "backing_file" not in descs:
            raise CreateError(f"Backing file not supported for file format '{fmt}'")
        opts["backing_file"] = base_filename
    if base_fmt is not None:
        if "backing_fmt" not in descs:
            raise CreateError(f"Backing file format not supported for file format '{fmt}'")
        opts["backing_fmt"] = base_fmt
    backing_file = opts.get("backing_file")
    if backing_file is not None:
        if filename == backing_file:
            raise CreateError(
                "Error: Trying to create an image with the same filename as the backing file")
        if backing_file == "":
            raise CreateError("Expected backing file name, got empty string")
    backing_fmt = opts.get("backing_fmt")
    img_size = parse_size(opts["size"]) if "size" in opts else None
    if img_size == _U64 - 1:
        img_size = None  # QEMU keeps sizes in an int64_t where -1 means "no size"
    if backing_file is not None and not no_backing:
        img_size = _backing_size(filename, backing_file, backing_fmt, img_size, opts)
    elif backing_file is not None and backing_fmt is None:
        raise CreateError("Backing file specified without backing format")
    if img_size is None:
        raise CreateError("Image creation needs a size parameter")
    if out is not None:
        out(format_line(filename, fmt, opts) + "\n")
    req = _Request(filename, path, fmt, opts, warn)
    try:
        if fmt == "qcow2":
            _create_qcow2(req)
        elif fmt == "qcow":
            _create_qcow(req)
        else:
            _create_raw(req)
    except _EFBig:
        hint = " (try using a larger cluster size)" if "cluster_size" in descs else ""
        raise CreateLimitError(
            f"The image size is too large for file format '{fmt}'{hint}") from None


def _backing_size(filename: str, backing_file: str, backing_fmt: str | None,
                  img_size: int | None, opts: dict[str, str]) -> int | None:
    """Open the backing file as bdrv_img_create() does (relative to the new image's directory,
    without its own backing chain); it also supplies the size when none was given."""
    from ..engine.open import open_image, path_combine

    full = path_combine(_strip_file_protocol(filename), _strip_file_protocol(backing_file))
    hint = "Could not open backing image.\n"
    if backing_fmt is not None and backing_fmt not in FORMATS:
        msg = (f"Unknown driver '{backing_fmt}'" if backing_fmt not in BLOCKDEV_DRIVERS else
               f"Could not open '{full}': backing format '{backing_fmt}' is not supported")
        raise CreateError(msg, hint)
    try:
        dev = open_image(full, backing_fmt, True, backing_policy="follow", open_backing=False)
    except OSError as e:
        raise CreateError(f"Could not open '{full}': {_strerror(e)}", hint) from None
    except Qcow2Error as e:
        msg = str(e)
        qcow2_hint = " (try the 'qcow2' driver instead)"
        if msg.endswith(qcow2_hint):
            # QEMU's qcow driver gives this advice as a hint line of its own.
            msg = msg[:-len(qcow2_hint)]
            hint = "Try the 'qcow2' driver instead.\n" + hint
        raise CreateError(msg, hint) from None
    try:
        if backing_fmt is None:
            raise CreateError("Backing file specified without backing format",
                              f"Detected format of {dev.format_name}.")
        if img_size is None:
            img_size = dev.virtual_size
            opts["size"] = str(img_size)
    finally:
        dev.close()
    return img_size


# --------------------------------------------------------------------------- raw
def _create_raw(req: _Request) -> None:
    """raw_co_create() of file-posix (the raw format passes everything to the protocol)."""
    prealloc = _file_prealloc(req.opts)
    size = _round_sector(parse_size(req.opts.get("size", "0")))
    f = _File(req.path)
    try:
        f.truncate(size, prealloc)
    finally:
        f.close()


def _round_sector(size: int) -> int:
    return (size + 511) & ~511 & (_U64 - 1)


# --------------------------------------------------------------------------- qcow (v1)
_QCOW_HEADER = struct.Struct(">IIQIIQBBHIQ")


def _create_qcow(req: _Request) -> None:
    """qcow_co_create_opts() + qcow_co_create() (block/qcow.c)."""
    opts = req.opts
    backing_fmt = opts.get("backing_fmt")
    if backing_fmt is not None and backing_fmt not in BLOCKDEV_DRIVERS:
        raise CreateError(f"unrecognized backing format '{backing_fmt}'")
    prealloc = _file_prealloc(opts)
    f = _File(req.path)  # a qcow error after this point leaves the (empty) file behind
    try:
        if prealloc == "metadata":
            raise CreateError("Unsupported preallocation mode: metadata")
        size = _round_sector(parse_size(opts.get("size", "0"), req.warn))
        if size == 0:
            raise CreateError("Image size is too small, cannot be zero length")
        backing = opts.get("backing_file")
        name = b""
        if backing is not None:
            # "fat:" is vvfat's special backing file: no name is stored, but the geometry
            # for images with a backing file is still used.
            if backing != "fat:":
                name = _fs_bytes(backing)
            cluster_bits, l2_bits = 9, 12  # 512-byte clusters avoid copying unmodified sectors
        else:
            cluster_bits, l2_bits = 12, 9
        header_size = (48 + len(name) + 7) & ~7
        shift = cluster_bits + l2_bits
        l1_size = (size + (1 << shift) - 1) >> shift
        f.pwrite(0, _QCOW_HEADER.pack(C.QCOW_MAGIC, 1, 48 if name else 0, len(name), 0, size,
                                      cluster_bits, l2_bits, 0, 0, header_size))
        if name:
            f.pwrite(48, name)
        # The L1 table is written as zeroed 512-byte sectors.
        f.write_zeroes(header_size, (l1_size * 8 + 511) & ~511)
    finally:
        f.close()


# --------------------------------------------------------------------------- qcow2
@dataclass
class _Qcow2Params:
    size: int
    version: int
    cluster_bits: int
    extended_l2: bool
    prealloc: str
    lazy_refcounts: bool
    refcount_order: int
    compression_type: int
    backing_file: str | None
    backing_fmt: str | None
    data_file: str | None
    data_file_raw: bool


def _qapi_enum(name: str, value: str | None, allowed: tuple[str, ...] | frozenset[str]
               ) -> str | None:
    if value is not None and value not in allowed:
        raise CreateError(f"Parameter '{name}' does not accept value '{value}'")
    return value


def _qcow2_params(opts: Mapping[str, str], warn: Warn | None) -> _Qcow2Params:
    """The QAPI conversion (qcow2_co_create_opts) then qcow2_co_create()'s checks, in order."""
    compat = opts.get("compat")
    compat = {"0.10": "v2", "1.1": "v3"}.get(compat, compat) if compat is not None else None
    # The visitor walks BlockdevCreateOptionsQcow2 in schema order: the first bad member wins.
    data_file_raw = _parse_bool("data-file-raw", opts.get("data_file_raw", "off"))
    extended_l2 = _parse_bool("extended-l2", opts.get("extended_l2", "off"))
    size = _opt_size("size", opts["size"], warn)
    version = _qapi_enum("version", compat, ("v2", "v3"))
    backing_file = opts.get("backing_file")
    backing_fmt = _qapi_enum("backing-fmt", opts.get("backing_fmt"), BLOCKDEV_DRIVERS)
    cluster_size = (_opt_size("cluster-size", opts["cluster_size"], warn)
                    if "cluster_size" in opts else DEFAULT_CLUSTER_SIZE)
    prealloc = _qapi_enum("preallocation", opts.get("preallocation"), PREALLOC_MODES) or "off"
    lazy = _parse_bool("lazy-refcounts", opts.get("lazy_refcounts", "off"))
    rb_text = opts.get("refcount_bits")
    refcount_bits = 16
    if rb_text is not None:
        # The QAPI member is a signed int64 parsed from the text again: "-1" is -1 here.
        refcount_bits = _opt_number("refcount_bits", rb_text.lstrip().lstrip("+-"))
        if rb_text.lstrip().startswith("-"):
            refcount_bits = -refcount_bits
        if not -INT64_MAX - 1 <= refcount_bits <= INT64_MAX:
            raise CreateError("Parameter 'refcount-bits' expects int64")
    ctype = _qapi_enum("compression-type", opts.get("compression_type"), ("zlib", "zstd"))

    # qcow2_co_create(): silently round the size up to whole sectors (in uint64_t).
    size = _round_sector(size)
    ver = 2 if version == "v2" else 3
    if extended_l2 and ver < 3:
        raise CreateError("Extended L2 entries are only supported with compatibility level 1.1 "
                          "and above (use version=v3 or greater)")
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or cluster_size & (cluster_size - 1) or \
            not C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
        raise CreateError("Cluster size must be a power of two between 512 and 2048k")
    min_extl2 = 512 * C.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
    if extended_l2 and cluster_size < min_extl2:
        raise CreateError("Extended L2 entries are only supported with cluster sizes of at "
                          f"least {min_extl2} bytes")
    if backing_file is not None and prealloc != "off" and not extended_l2:
        raise CreateError("Backing file and preallocation can only be used at the same time if "
                          "extended_l2 is on")
    if backing_fmt is not None and backing_file is None:
        raise CreateError("Backing format cannot be used without backing file")
    if ver < 3 and lazy:
        raise CreateError("Lazy refcounts only supported with compatibility level 1.1 and above "
                          "(use version=v3 or greater)")
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
    if ver < 3 and refcount_bits != 16:
        raise CreateError("Different refcount widths than 16 bits require compatibility level "
                          "1.1 or above (use version=v3 or greater)")
    data_file = opts.get("data_file")
    if data_file_raw and data_file is None:
        raise CreateError("data-file-raw requires data-file")
    if data_file_raw and backing_file is not None:
        raise CreateError("Backing file and data-file-raw cannot be used at the same time")
    if data_file_raw and prealloc == "off":
        # The L1/L2 tables must map the data file 1:1, so QEMU preallocates them.
        prealloc = "metadata"
    if data_file is not None and ver < 3:
        raise CreateError("External data files are only supported with compatibility level 1.1 "
                          "and above (use version=v3 or greater)")
    compression_type = C.QCOW2_COMPRESSION_TYPE_ZLIB
    if ctype is not None and ctype != "zlib":
        if ver < 3:
            raise CreateError("Non-zlib compression type is only supported with compatibility "
                              "level 1.1 and above (use version=v3 or greater)")
        compression_type = C.QCOW2_COMPRESSION_TYPE_ZSTD
    return _Qcow2Params(size, ver, cluster_bits, extended_l2, prealloc, lazy,
                        refcount_bits.bit_length() - 1, compression_type, backing_file,
                        backing_fmt, data_file, data_file_raw)


def _create_qcow2(req: _Request) -> None:
    """qcow2_co_create_opts(): create the image and data files, then qcow2_co_create(). Any
    failure from here on deletes both files (bdrv_co_delete_file_noerr), as QEMU does."""
    image = _File(req.path)
    data: _File | None = None
    try:
        data_name = req.opts.get("data_file")
        if data_name is not None:
            data = _File(_strip_file_protocol(data_name))
        params = _qcow2_params(req.opts, req.warn)
        sim = _Qcow2Alloc(params)
        sim.run()
        _write_qcow2(sim, image, data)
    except BaseException:
        image.close()
        _unlink_quietly(image.path)
        if data is not None:
            data.close()
            _unlink_quietly(data.path)
        raise
    image.close()
    if data is not None:
        data.close()


class _Runs:
    """Sorted, disjoint, non-adjacent runs [start, end) of cluster indexes with refcount 1.

    During creation no cluster is ever shared, so a refcount is 0 or 1 and the allocation state
    of a whole image is a handful of runs (holes appear only where QEMU leaves them).
    """

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        i = bisect_left(self.ends, a)
        j = bisect_right(self.starts, b)
        if i < j:
            a = min(a, self.starts[i])
            b = max(b, self.ends[j - 1])
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def remove(self, a: int, b: int) -> None:
        if a >= b:
            return
        i = bisect_right(self.ends, a)
        j = bisect_left(self.starts, b)
        if i >= j:
            return
        ns: list[int] = []
        ne: list[int] = []
        if self.starts[i] < a:
            ns.append(self.starts[i])
            ne.append(a)
        if self.ends[j - 1] > b:
            ns.append(b)
            ne.append(self.ends[j - 1])
        self.starts[i:j] = ns
        self.ends[i:j] = ne

    def used(self, x: int) -> bool:
        i = bisect_right(self.starts, x) - 1
        return i >= 0 and self.ends[i] > x

    def first_free_run(self, start: int, n: int) -> int:
        """The first run of `n` free clusters at or after `start`."""
        while True:
            i = bisect_right(self.starts, start) - 1
            if i >= 0 and self.ends[i] > start:
                start = self.ends[i]
                continue
            if i + 1 < len(self.starts) and self.starts[i + 1] < start + n:
                start = self.ends[i + 1]
                continue
            return start

    def free_count(self, start: int, n: int) -> int:
        """How many of the `n` clusters from `start` are free before the first used one."""
        i = bisect_right(self.starts, start) - 1
        if i >= 0 and self.ends[i] > start:
            return 0
        if i + 1 < len(self.starts):
            return min(n, self.starts[i + 1] - start)
        return n

    def last_used_below(self, limit: int) -> int:
        i = bisect_left(self.starts, limit) - 1
        return min(self.ends[i], limit) - 1 if i >= 0 else -1

    def within(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        i = max(0, bisect_right(self.ends, a))
        while i < len(self.starts) and self.starts[i] < b:
            yield max(a, self.starts[i]), min(b, self.ends[i])
            i += 1


@dataclass
class _L2Meta:
    """One QCowL2Meta of a preallocation: guest clusters mapped to a contiguous host range."""

    guest_offset: int
    host_offset: int
    nb_clusters: int
    cow_end_offset: int
    cow_end_bytes: int


class _Qcow2Alloc:
    """QEMU's qcow2 creation, replayed on a model of the refcount structures.

    Everything is in cluster indexes unless named `_offset`. Only metadata is tracked: data
    clusters are never written (QEMU does not write them either, except the COW tail of a
    partial last cluster).
    """

    def __init__(self, p: _Qcow2Params) -> None:
        self.p = p
        self.cb = p.cluster_bits
        self.cs = 1 << self.cb
        self.rb_bits = self.cb + 3 - p.refcount_order  # log2(refcounts per refblock)
        self.rb_entries = 1 << self.rb_bits
        self.l2_entry_size = 16 if p.extended_l2 else 8
        self.l2_entries = self.cs // self.l2_entry_size
        self.sc_size = self.cs // 32 if p.extended_l2 else self.cs
        self.used = _Runs()
        self.free_index = 0
        # qcow2_co_create() wrote cluster 0 (header), 1 (reftable: entry 0 -> cluster 2), 2.
        self.reftable: list[int] = [2 * self.cs] + [0] * (self.cs // 8 - 1)
        self.reftable_offset = self.cs
        self.reftable_clusters = 1
        self.file_end = 3 * self.cs
        self.stale: list[tuple[int, bytes]] = []  # freed reftables, as they were on disk
        self.l1_size = 0
        self.l1_offset = 0
        self.l1: dict[int, int] = {}  # L1 index -> L2 table offset
        self.l2_runs: dict[int, list[tuple[int, int, int]]] = {}  # (l2 index, count, host)
        self.cow: list[tuple[int, int]] = []  # zero writes (offset, length) of COW tails
        self.data_length = 0  # external data file
        self.data_prealloc: list[tuple[int, str]] = []  # data file truncations (size, mode)
        self.image_prealloc: tuple[int, int, str] | None = None  # (start, end, mode)

    # ---------------------------------------------------------------- refcounts
    def _alloc_noref(self, n: int) -> int:
        """alloc_clusters_noref(): first fit from free_cluster_index."""
        start = self.used.first_free_run(self.free_index, n)
        self.free_index = start + n
        if (self.free_index - 1) > (INT64_MAX >> self.cb):
            raise _EFBig
        return start

    def _decrease(self, a: int, b: int) -> None:
        self.used.remove(a, b)
        if a < b:
            self.free_index = min(self.free_index, a)

    def _update_refcount(self, first: int, n: int) -> None:
        """update_refcount(+1): each refblock on the way is loaded or allocated first. An
        -EAGAIN from a refblock allocation undoes the increments made so far."""
        c, end = first, first + n
        while c < end:
            seg_end = min(end, ((c >> self.rb_bits) + 1) << self.rb_bits)
            try:
                self._alloc_refcount_block(c)
            except _EAgain:
                # "If the caller needs to restart the search for free clusters, try the
                # same ones first to see if they're still free."
                self.free_index = min(self.free_index, first)
                self._decrease(first, c)
                raise
            self.used.add(c, seg_end)
            c = seg_end

    def _alloc_refcount_block(self, cluster: int) -> None:
        index = cluster >> self.rb_bits
        if index < len(self.reftable) and self.reftable[index]:
            return
        new_block = self._alloc_noref(1)
        if new_block >> self.rb_bits == index:
            self.used.add(new_block, new_block + 1)  # the block describes itself
        else:
            # Described by another refblock; may itself need a new one (and fail with EAGAIN,
            # leaving new_block unused, as in QEMU).
            self._update_refcount(new_block, 1)
        self.file_end = max(self.file_end, (new_block + 1) * self.cs)
        if index < len(self.reftable):
            self.reftable[index] = new_block * self.cs
            raise _EAgain
        blocks_used = -(-max(cluster + 1, new_block + 1) // self.rb_entries)
        meta_offset = blocks_used * self.rb_entries * self.cs
        self._refcount_area(meta_offset, 0, False, index, new_block * self.cs)
        raise _EAgain

    def _metadata_size(self, clusters: int, generous: bool) -> int:
        """qcow2_refcount_metadata_size(): the refblock count of the fixed point."""
        per_table = self.cs // 8
        per_block = self.rb_entries
        table = blocks = 0
        n = 0
        while True:
            last = n
            blocks = -(-(clusters + table + blocks) // per_block)
            table = -(-blocks // per_table)
            n = clusters + blocks + table
            if n == last and generous:
                clusters += -(-table // 2)
                n = 0
                generous = False
            if n == last:
                return blocks

    def _refcount_area(self, start_offset: int, additional: int, exact: bool,
                       new_index: int, new_offset: int) -> int:
        """qcow2_refcount_area(): new self-describing refblocks and reftable at start_offset."""
        cs = self.cs
        total = self._metadata_size(start_offset // cs + additional, not exact)
        if total > C.QCOW_MAX_REFTABLE_SIZE:  # QEMU compares a count with a byte limit
            raise _EFBig
        area_index = (start_offset // cs) >> self.rb_bits
        table_size = total if exact else total + -(-total // 2)
        per = cs // 8
        table_size = -(-table_size // per) * per
        table_clusters = table_size * 8 // cs
        if table_size > C.QCOW_MAX_REFTABLE_SIZE:
            raise _EFBig
        old = self.reftable
        # The old entries up to max_refcount_table_index are copied into a zeroed table.
        max_index = max((i for i, e in enumerate(old) if e), default=-1)
        keep = min(max_index + 1, table_size)
        new = old[:keep] + [0] * (table_size - keep)
        if new_offset:
            new[new_index] = new_offset
        additional_blocks = sum(1 for i in range(area_index, total) if not new[i])
        table_offset = start_offset + additional_blocks * cs
        end_offset = table_offset + table_clusters * cs
        block_offset = start_offset
        span = self.rb_entries * cs
        for i in range(area_index, total):
            if not new[i]:
                new[i] = block_offset
                block_offset += cs
            first = i * span
            if first < end_offset:
                a = max(start_offset, first)
                b = min(end_offset, first + span)
                self.used.add(a // cs, b // cs)
        self.file_end = max(self.file_end, end_offset)
        self.stale.append((self.reftable_offset, _encode_u64s(old, self.reftable_clusters * cs)))
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        self.reftable = new
        self.reftable_offset = table_offset
        self.reftable_clusters = table_clusters
        self._decrease(old_offset // cs, old_offset // cs + old_clusters)
        return end_offset

    def alloc_clusters(self, n: int) -> int:
        """qcow2_alloc_clusters() (in clusters): retried until no refblock was added."""
        while True:
            first = self._alloc_noref(n)
            try:
                self._update_refcount(first, n)
                return first
            except _EAgain:
                continue

    def alloc_clusters_at(self, first: int, n: int) -> int:
        """qcow2_alloc_clusters_at(): as many of `n` clusters from `first` as are free."""
        while True:
            count = self.used.free_count(first, n)
            try:
                self._update_refcount(first, count)
                return count
            except _EAgain:
                continue

    # ---------------------------------------------------------------- L1 / L2
    def grow_l1(self, new_size: int) -> None:
        """qcow2_grow_l1_table(exact): the table is written with its exact length."""
        if new_size <= self.l1_size:
            return
        if new_size > INT_MAX // 8 or new_size > C.QCOW_MAX_L1_SIZE // 8:
            raise _EFBig
        nbytes = new_size * 8
        first = self.alloc_clusters(-(-nbytes // self.cs))
        self.l1_offset = first * self.cs
        self.l1_size = new_size
        self.file_end = max(self.file_end, self.l1_offset + nbytes)

    def get_cluster_table(self, guest_offset: int) -> int:
        l1_index = guest_offset >> (self.cb + self.cb - (4 if self.p.extended_l2 else 3))
        if l1_index not in self.l1:
            # l2_allocate(): one cluster, zeroed and flushed at once.
            l2 = self.alloc_clusters(1) * self.cs
            self.l1[l1_index] = l2
            self.l2_runs[l1_index] = []
            self.file_end = max(self.file_end, l2 + self.cs)
        return l1_index

    def link_l2(self, m: _L2Meta) -> None:
        """qcow2_alloc_cluster_link_l2() for a preallocation: COW of the tail, then the
        entries (offset | COPIED; with extended L2 the bitmap stays 0 for preallocation)."""
        if m.cow_end_bytes:
            off = m.host_offset + m.cow_end_offset
            self.cow.append((off, m.cow_end_bytes))
            if self.p.data_file is not None:
                self.data_length = max(self.data_length, off + m.cow_end_bytes)
            else:
                self.file_end = max(self.file_end, off + m.cow_end_bytes)
        guest, host, left = m.guest_offset, m.host_offset, m.nb_clusters
        while left:
            l1_index = self.get_cluster_table(guest)
            l2_index = (guest >> self.cb) & (self.l2_entries - 1)
            n = min(left, self.l2_entries - l2_index)
            self.l2_runs[l1_index].append((l2_index, n, host))
            guest += n * self.cs
            host += n * self.cs
            left -= n

    def _alloc_host_offset(self, offset: int, nbytes: int) -> tuple[int, int, list[_L2Meta]]:
        """qcow2_alloc_host_offset() on unallocated clusters: (host offset, bytes, metas)."""
        cs = self.cs
        start, remaining = offset, nbytes
        cluster_offset: int | None = None
        host: int | None = None
        cur = 0
        metas: list[_L2Meta] = []
        while True:
            if host is None and cluster_offset is not None:
                host = cluster_offset
            start += cur
            remaining -= cur
            if cluster_offset is not None:
                cluster_offset += cur
            if remaining == 0:
                break
            cur = remaining
            # handle_copied() looks up (and so allocates) the L2 table; nothing is allocated.
            self.get_cluster_table(start)
            # handle_alloc(): at most up to the end of the L2 slice (a whole table here).
            in_cluster = start & (cs - 1)
            nb = -(-(in_cluster + cur) // cs)
            l2_index = (start >> self.cb) & (self.l2_entries - 1)
            nb = min(nb, self.l2_entries - l2_index, BDRV_REQUEST_MAX_BYTES >> self.cb)
            if self.p.data_file is not None:
                alloc = start - in_cluster  # host offset == guest offset
            elif cluster_offset is None:
                alloc = self.alloc_clusters(nb) * cs
            else:
                alloc = cluster_offset - (cluster_offset & (cs - 1))
                nb = self.alloc_clusters_at(alloc // cs, nb)
                if nb == 0:
                    # The next L2 table took the cluster the data would have continued at.
                    cur = 0
                    break
            nb_bytes = min(cur + in_cluster, nb * cs)
            cluster_offset = alloc + in_cluster
            cur = min(cur, nb_bytes - in_cluster)
            # calculate_l2_meta(): the last cluster is unallocated, so its tail up to the
            # (sub)cluster boundary is copied on write (from zeros).
            end_from = in_cluster + cur
            end_to = -(-end_from // self.sc_size) * self.sc_size
            metas.append(_L2Meta(start - in_cluster, alloc, -(-end_from // cs), end_from,
                                 end_to - end_from))
        assert host is not None
        return host, nbytes - remaining, metas

    def preallocate(self, new_length: int, mode: str) -> None:
        """preallocate_co(): allocate and map every cluster, then extend the (data) file."""
        offset, left = 0, new_length
        host = cur = 0
        chunk = INT_MAX - INT_MAX % self.cs
        while left:
            cur = min(left, chunk)
            host, cur, metas = self._alloc_host_offset(offset, cur)
            for m in reversed(metas):  # the list is built by prepending
                self.link_l2(m)
            left -= cur
            offset += cur
        if self.p.data_file is not None:
            if host + cur > self.data_length:
                self.data_prealloc.append((host + cur, "off" if mode == "metadata" else mode))
                self.data_length = host + cur
        elif host + cur > self.file_end:
            self.file_end = host + cur

    def _falloc(self, new_length: int, mode: str) -> None:
        """qcow2_co_truncate() with preallocation=falloc|full and no data file."""
        cs = self.cs
        last = self.used.last_used_below(-(-self.file_end // cs))
        old_file_size = (last + 1) * cs if last >= 0 else -(-self.file_end // cs) * cs
        nb_data = -(-new_length // cs)
        nb_l2 = -(-nb_data // self.l2_entries) + 1
        start = self._refcount_area(old_file_size, nb_data + nb_l2, True, 0, 0)
        got = self.alloc_clusters_at(start // cs, nb_data)
        if got != nb_data:
            raise CreateError("Failed to allocate data clusters")
        end = start + nb_data * cs
        self.image_prealloc = (self.file_end, end, mode)
        self.file_end = max(self.file_end, end)
        guest, host, left = 0, start, nb_data
        while left:
            l2_index = (guest >> self.cb) & (self.l2_entries - 1)
            n = min(left, self.l2_entries - l2_index)
            self.link_l2(_L2Meta(guest, host, n, n * cs, 0))
            guest += n * cs
            host += n * cs
            left -= n

    def run(self) -> None:
        p = self.p
        # Reopen and allocate the header, the reftable and the first refblock (clusters 0-2).
        if self.alloc_clusters(3) != 0:
            raise CreateError("Huh, first cluster in empty image is already in use?")
        # blk_co_truncate() to the requested size.
        size = p.size
        if size > INT64_MAX:
            raise CreateError("Could not resize image: Image size cannot be negative")
        if size > BDRV_MAX_LENGTH:
            raise CreateError(f"Could not resize image: offset({size}) exceeds "
                              f"maximum({BDRV_MAX_LENGTH})")
        l2_bits = self.cb - (4 if p.extended_l2 else 3)
        self.grow_l1(l1_entries_for(size, self.cb, l2_bits))
        mode = p.prealloc
        if p.data_file is not None:
            if mode == "off":
                self.data_prealloc.append((size, "off"))
                self.data_length = size
            else:
                self.preallocate(size, mode)
        elif mode == "metadata":
            self.preallocate(size, mode)
        elif mode in ("falloc", "full"):
            self._falloc(size, mode)

    # ---------------------------------------------------------------- output
    def header_cluster(self) -> bytes:
        p = self.p
        incompat = 0
        if p.data_file is not None:
            incompat |= C.QCOW2_INCOMPAT_DATA_FILE
        if p.compression_type != C.QCOW2_COMPRESSION_TYPE_ZLIB:
            incompat |= C.QCOW2_INCOMPAT_COMPRESSION
        if p.extended_l2:
            incompat |= C.QCOW2_INCOMPAT_EXTL2
        h = Header(version=p.version, cluster_bits=self.cb, size=p.size,
                   l1_size=self.l1_size, l1_table_offset=self.l1_offset,
                   refcount_table_offset=self.reftable_offset,
                   refcount_table_clusters=self.reftable_clusters,
                   incompatible_features=incompat,
                   compatible_features=C.QCOW2_COMPAT_LAZY_REFCOUNTS if p.lazy_refcounts else 0,
                   autoclear_features=C.QCOW2_AUTOCLEAR_DATA_FILE_RAW if p.data_file_raw else 0,
                   refcount_order=p.refcount_order, header_length=112,
                   compression_type=p.compression_type)
        # Names are bytes to QEMU: a name that is not UTF-8 (surrogate-escaped from argv) is
        # encoded with ASCII placeholders of the same length, then patched in.
        data_raw = (_fs_bytes(_strip_file_protocol(p.data_file))
                    if p.data_file is not None else None)
        backing_raw = _fs_bytes(p.backing_file) if p.backing_file is not None else None
        exts = HeaderExtensions(backing_format=p.backing_fmt,
                                data_file="x" * len(data_raw) if data_raw is not None else None)
        if backing_raw is not None and len(backing_raw) > 1023:
            raise CreateError(f"Could not assign backing file '{p.backing_file}' with format "
                              f"'{p.backing_fmt}': Invalid argument")
        try:
            out = bytearray(encode_header_cluster(
                h, exts, "x" * len(backing_raw) if backing_raw is not None else None))
        except ImageLimitError:
            if p.backing_file is not None:
                raise CreateError(f"Could not assign backing file '{p.backing_file}' with "
                                  f"format '{p.backing_fmt}': No space left on device") from None
            raise CreateError("Could not update qcow2 header: No space left on device") from None
        if backing_raw:
            out[h.backing_file_offset:h.backing_file_offset + len(backing_raw)] = backing_raw
        if data_raw:
            pos = 72 if p.version == 2 else 112
            while True:
                magic, length = struct.unpack_from(">II", out, pos)
                if magic == C.QCOW2_EXT_MAGIC_DATA_FILE:
                    out[pos + 8:pos + 8 + length] = data_raw
                    break
                pos += 8 + (length + 7) // 8 * 8
        return bytes(out)

    def refblocks(self) -> Iterator[tuple[int, bytes]]:
        for index, offset in enumerate(self.reftable):
            if offset:
                first = index << self.rb_bits
                runs = [(a - first, b - first)
                        for a, b in self.used.within(first, first + self.rb_entries)]
                yield offset, _encode_refblock(runs, self.cs, self.p.refcount_order)

    def l1_table(self) -> bytes:
        table = array("Q", bytes(self.l1_size * 8))
        for index, l2 in self.l1.items():
            table[index] = l2 | C.QCOW_OFLAG_COPIED
        if sys.byteorder == "little":
            table.byteswap()
        return table.tobytes()

    def l2_tables(self) -> Iterator[tuple[int, bytes]]:
        step = 2 if self.p.extended_l2 else 1
        for index, l2 in sorted(self.l1.items()):
            table = array("Q", bytes(self.cs))
            for l2_index, n, host in self.l2_runs[index]:
                first = host | C.QCOW_OFLAG_COPIED
                table[l2_index * step:(l2_index + n) * step:step] = \
                    array("Q", range(first, first + n * self.cs, self.cs))
            if sys.byteorder == "little":
                table.byteswap()
            yield l2, table.tobytes()


def _encode_u64s(values: list[int], nbytes: int) -> bytes:
    table = array("Q", values)
    if sys.byteorder == "little":
        table.byteswap()
    raw = table.tobytes()
    return raw[:nbytes] + bytes(max(0, nbytes - len(raw)))


def _encode_refblock(runs: list[tuple[int, int]], cs: int, order: int) -> bytes:
    """A refblock with refcount 1 for the given runs of entries (LSB-first below 8 bits)."""
    bits = 1 << order
    out = bytearray(cs)
    if bits >= 8:
        width = bits // 8
        one = (1).to_bytes(width, "big")
        for a, b in runs:
            out[a * width:b * width] = one * (b - a)
        return bytes(out)
    per = 8 // bits
    full = sum(1 << (k * bits) for k in range(per))
    for a, b in runs:
        i = a
        while i < b and i % per:
            out[i // per] |= 1 << ((i % per) * bits)
            i += 1
        nfull = (b - i) // per
        out[i // per:i // per + nfull] = bytes([full]) * nfull
        i += nfull * per
        while i < b:
            out[i // per] |= 1 << ((i % per) * bits)
            i += 1
    return bytes(out)


def _write_qcow2(sim: _Qcow2Alloc, image: _File, data: _File | None) -> None:
    """Write the end state of QEMU's sequence: stale bytes first (freed reftables), then every
    live structure with its final content, then the file lengths and preallocated areas."""
    header = sim.header_cluster()
    for offset, raw in sim.stale:
        image.pwrite(offset, raw)
    image.pwrite(0, header)
    image.pwrite(sim.reftable_offset, _encode_u64s(sim.reftable,
                                                   sim.reftable_clusters * sim.cs))
    for offset, raw in sim.refblocks():
        image.pwrite(offset, raw)
    if sim.l1_size:
        image.pwrite(sim.l1_offset, sim.l1_table())
    for offset, raw in sim.l2_tables():
        image.pwrite(offset, raw)
    target = data if (data is not None and sim.p.data_file is not None) else image
    for offset, length in sim.cow:
        target.write_zeroes(offset, length)
    if sim.image_prealloc is not None:
        # The data area QEMU preallocates right after its new refcount structures; the L2
        # tables it links afterwards (already written above) may lie beyond it.
        start, end, mode = sim.image_prealloc
        if mode == "full":
            image.write_zeroes(start, end - start)
        elif end > start:
            try:
                os.posix_fallocate(image.fd, start, end - start)
            except OSError:
                pass  # a file system without fallocate: the length is set below
    if os.fstat(image.fd).st_size < sim.file_end:
        os.ftruncate(image.fd, sim.file_end)
    if data is not None:
        for size, mode in sim.data_prealloc:
            data.truncate(size, mode)


# --------------------------------------------------------------------------- public API
def _option_text(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"option {name!r}: expected str, int or bool, not {type(value).__name__}")


def create(path: str, size: int | str | None = None, fmt: str = "qcow2", *,
           open_backing: bool = True, **options: object) -> None:
    """Create an image exactly as `qemu-img create -f FMT [-o options] PATH [SIZE]` does.

    Options are named as qemu-img's -o: compat, backing_file, backing_fmt, cluster_size,
    extended_l2, refcount_bits, lazy_refcounts, compression_type, data_file, data_file_raw,
    preallocation (plus nocow and extent_size_hint, accepted and ignored). Values may be
    str (parsed as qemu-img parses them), int or bool; None means "not given".

    Without a size the backing file's is used; `open_backing=False` is qemu-img's -u (the
    backing file is not opened, so a size is then required).
    """
    descs = _descs(fmt)
    opts: dict[str, str] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in descs:
            raise CreateError(f"Invalid parameter '{name}'")
        text = _option_text(name, value)
        parse_create_options(fmt, f"{name}={_escaped(text)}")
        opts[name] = text
    img_size: int | None = None
    if isinstance(size, str):
        try:
            img_size = parse_size(size)
        except (ValueError, OverflowError):
            raise CreateError(f"Invalid image size specified: '{size}'", prefixed=False) from None
    elif size is not None:
        img_size = int(size)
    if img_size is not None and not 0 <= img_size <= INT64_MAX:
        raise CreateError("Invalid image size specified. Must be between 0 and "
                          f"{INT64_MAX}.", prefixed=False)
    img_create(path, fmt, opts, img_size, no_backing=not open_backing)
