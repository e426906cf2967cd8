"""`qcow2 convert`: qemu-img convert (7.2) to raw, qcow2 or qcow (new or, with -n, existing
targets; -B for a backing file; -c compressed, with --compression-level); the sources may be
any format."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .common import cvtnum, fail, open_failure
from .main import PROG, UsageError, error_line

if TYPE_CHECKING:
    from ..engine.device import BlockDevice
    from ..ops.convert import Source
    from ..ops.progress import Progress

MAX_COROUTINES = 16
# qemu-img 7.2 format drivers: ones that can create images (not written here yet), and ones
# that cannot create at all.
_CREATABLE_LATER = ("qcow2", "qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "parallels", "luks")
_NO_CREATE = ("bochs", "cloop", "dmg", "vvfat", "blkdebug", "blklogwrites", "blkverify",
              "compress", "copy-before-write", "copy-on-read", "null-aio", "null-co",
              "preallocate", "quorum", "replication", "snapshot-access", "throttle")
_UNSUPPORTED_FLAGS = (
    ("copy_range", "-C"), ("rate", "-r"), ("objects", "--object"),
    ("image_opts", "--image-opts"), ("target_image_opts", "--target-image-opts"),
    ("bitmaps", "--bitmaps"), ("skip_broken", "--skip-broken-bitmaps"),
    ("salvage", "--salvage"),
)
SNAPSHOT_OPT_BASE = "snapshot."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="fmt", metavar="fmt", help="source format (probed if absent)")
    parser.add_argument("-O", dest="out_fmt", metavar="output_fmt", default="raw",
                        help="output format (raw)")
    parser.add_argument("-S", dest="sparse", metavar="sparse_size",
                        help="zero runs of at least this size become holes (default 4k, 0: none)")
    parser.add_argument("-l", dest="snapshot", metavar="snapshot_param",
                        help="snapshot.id=ID,snapshot.name=NAME or ID_OR_NAME")
    parser.add_argument("-p", dest="progress", action="store_true", help="show progress")
    parser.add_argument("-q", dest="quiet", action="store_true", help="quiet mode")
    parser.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                        help="open read-only without locking (always the case here)")
    parser.add_argument("-m", dest="coroutines", metavar="num_coroutines",
                        help="parallel requests (1-16)")
    parser.add_argument("-W", dest="out_of_order", action="store_true",
                        help="allow out-of-order writes (always the case here)")
    parser.add_argument("-t", dest="cache", metavar="cache", default="unsafe",
                        help="target cache mode (default unsafe: no flush)")
    parser.add_argument("-T", dest="src_cache", metavar="src_cache", default="writeback",
                        help="source cache mode")
    parser.add_argument("-n", dest="no_create", action="store_true",
                        help="write into an existing output image (not created)")
    parser.add_argument("-B", dest="backing", metavar="backing_file",
                        help="the output image's backing file: what the source's top layer "
                             "leaves unallocated is not written")
    parser.add_argument("-F", dest="backing_fmt", metavar="backing_fmt",
                        help="the backing file's format")
    parser.add_argument("--target-is-zero", action="store_true",
                        help="with -n: the output reads as zero, zero areas need no write")
    parser.add_argument("-o", dest="options", action="append", metavar="options",
                        help="output image creation options")
    parser.add_argument("-c", dest="compress", action="store_true",
                        help="write every cluster compressed (qcow2 and qcow targets)")
    parser.add_argument("--compression-level", dest="compression_level", metavar="level",
                        help="with -c: zlib 0-9 (default 6), zstd 1-22 (default 3), as QEMU")
    # qemu-img options that are not implemented yet: refused with a clear message.
    parser.add_argument("-C", dest="copy_range", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-r", dest="rate", help=argparse.SUPPRESS)
    parser.add_argument("--object", dest="objects", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--image-opts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target-image-opts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bitmaps", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-broken-bitmaps", dest="skip_broken", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--salvage", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", metavar="filename",
                        help="source image(s), then the output file")
    # qemu-img (getopt) accepts options after the file names: `convert a.qcow2 -O raw b.raw`.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- option parsing
def parse_coroutines(text: str) -> int:
    """qemu_strtol(base 0) in [1, 16], else qemu-img's message."""
    t = text.strip()
    sign = -1 if t.startswith("-") else 1
    body = t[1:] if t[:1] in "+-" else t
    try:
        if body[:2].lower() == "0x":
            val = int(body[2:], 16)
        elif len(body) > 1 and body.startswith("0"):
            val = int(body[1:], 8)
        else:
            val = int(body, 10)
    except ValueError:
        val = 0
    val *= sign
    if not 1 <= val <= MAX_COROUTINES:
        raise UsageError("Invalid number of coroutines. Allowed number of coroutines is "
                         f"between 1 and {MAX_COROUTINES}")
    return val


def parse_sparse(text: str | None) -> int:
    """-S in bytes -> min_sparse in sectors."""
    from ..ops.convert import DEFAULT_MIN_SPARSE, MAX_BUF_SECTORS, SECTOR

    if text is None:
        return DEFAULT_MIN_SPARSE
    sval = cvtnum("buffer size for sparse output", text)
    if sval % SECTOR or sval // SECTOR > MAX_BUF_SECTORS:
        raise UsageError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
            f"{SECTOR} up to {MAX_BUF_SECTORS * SECTOR}. Select 0 to disable sparse detection "
            "(fully allocates output).")
    return sval // SECTOR


def _split_opts(text: str) -> list[str]:
    """QemuOpts' comma split: ',,' is a literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_snapshot_param(text: str) -> tuple[str | None, str | None]:
    """`snapshot.id=X,snapshot.name=Y` (either key optional) -> (id, name), as QemuOpts."""
    sid: str | None = None
    name: str | None = None
    for part in _split_opts(text):
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
        else:
            key = part[2:] if part.startswith("no") else part
            value = "off" if part.startswith("no") else "on"
            if key in ("snapshot.id", "snapshot.name"):
                error_line(f"warning: short-form boolean option '{key}' deprecated")
                sys.stderr.write(f"Please use {key}={value} instead\n")
        if key == "snapshot.id":
            sid = value
        elif key == "snapshot.name":
            name = value
        else:
            raise UsageError(f"Invalid parameter '{key}'\n"
                             f"{PROG}: Failed in parsing snapshot param '{text}'")
    return sid, name


def check_cache(mode: str) -> bool:
    from ..ops.convert import CACHE_MODES

    return mode in CACHE_MODES


# ----------------------------------------------------------------------------- snapshots
class SnapshotFailed(Exception):
    pass


Snapshot = tuple[str | None, str | None, bool]   # id, name, "ID_OR_NAME" (a bare -l value)


def load_snapshot(dev: BlockDevice, snap: Snapshot) -> None:
    """bdrv_snapshot_load_tmp(): by id and/or name, or by ID_OR_NAME (the id first)."""
    from ..engine.image import Qcow2Image
    from ..errors import Qcow2Error

    if not isinstance(dev, Qcow2Image):
        raise SnapshotFailed(f"Block format '{dev.format_name}' used by device '' does not "
                             "support temporarily loading internal snapshots")
    sid, name, either = snap
    if either:
        cands = [s for s in dev.snapshots if s.id_str == sid] or \
                [s for s in dev.snapshots if s.name == sid]
    else:
        cands = [s for s in dev.snapshots
                 if (sid is None or s.id_str == sid) and (name is None or s.name == name)]
    if not cands:
        raise SnapshotFailed("Can't find snapshot")
    try:
        dev.load_snapshot(cands[0].id_str)
    except Qcow2Error as e:
        raise SnapshotFailed(str(e)) from None


# ----------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    if args.compress and args.copy_range:
        return fail("Cannot enable copy offloading when -c is used")
    for attr, flag in _UNSUPPORTED_FLAGS:
        if getattr(args, attr):
            return fail(f"convert option {flag} is not supported yet")
    min_sparse = parse_sparse(args.sparse)
    if args.compression_level is not None:
        if not args.compress:
            return fail("--compression-level requires -c")
        try:
            args.level = int(args.compression_level, 10)
        except ValueError:
            return fail(f"Invalid compression level '{args.compression_level}'")
    else:
        args.level = None
    workers_cap = parse_coroutines(args.coroutines) if args.coroutines is not None else None
    sn_opts: Snapshot | None = None
    snapshot_name: str | None = None
    if args.snapshot is not None:
        if args.snapshot.startswith(SNAPSHOT_OPT_BASE):
            sn_opts = (*parse_snapshot_param(args.snapshot), False)
        else:
            snapshot_name = args.snapshot
    if args.no_create and args.options:
        return fail("-o has no effect when skipping image creation")
    if args.target_is_zero and not args.no_create:
        return fail("--target-is-zero requires use of -n flag")
    if len(args.files) < 2:
        raise UsageError("Must specify image file name")
    if not check_cache(args.src_cache):
        return fail(f"Invalid source cache option: {args.src_cache}")

    from ..ops.progress import Progress

    progress = Progress(args.progress and not args.quiet, 1.0)
    progress.print(0, 100)
    ok = False
    try:
        ok = _convert(args, min_sparse, workers_cap, sn_opts, snapshot_name, progress)
    finally:
        if ok:
            progress.print(100, 0)
        progress.end()
    return 0 if ok else 1


def _convert(args: argparse.Namespace, min_sparse: int, workers_cap: int | None,
             sn_opts: Snapshot | None, snapshot_name: str | None, progress: Progress) -> bool:
    from ..engine.open import open_image
    from ..errors import Qcow2Error
    from ..ops.convert import ConvertError, ConvertOptions, Source, convert

    src_names: list[str] = args.files[:-1]
    out_name: str = args.files[-1]
    fmt: str | None = args.fmt
    sources: list[Source] = []
    try:
        for name in src_names:
            try:
                dev = open_image(name, fmt, True, backing_policy="follow")
            except (Qcow2Error, OSError) as e:
                fail(open_failure(name, e))
                return False
            sources.append(Source(dev, None, name))

        snap: Snapshot | None = None
        if sn_opts is not None:
            snap = sn_opts
        elif snapshot_name is not None:
            if len(sources) > 1:
                fail("No support for concatenating multiple snapshot")
                return False
            snap = (snapshot_name, snapshot_name, True)
        if snap is not None:
            try:
                load_snapshot(sources[0].device, snap)
            except SnapshotFailed as e:
                fail(f"Failed to load snapshot: {e}")
                return False
        for i, src in enumerate(sources):
            src.reopen = _reopener(src.name, fmt, snap if i == 0 else None)

        out_fmt: str = args.out_fmt
        total = sum(s.length for s in sources)
        target: Any
        if args.no_create:
            res = _open_existing(args, out_name, out_fmt, sources, total)
            if isinstance(res, bool):
                return res
            target = res
        else:
            made = _create_target(args, out_name, out_fmt, sources, total)
            if made is None:
                return False
            target = made
        try:
            if not args.no_create and not check_cache(args.cache):
                # qemu-img checks the target cache mode only after creating the target.
                fail(f"Invalid cache option: {args.cache}")
                return False
            from ..ops.convert import default_workers

            workers = default_workers()
            if workers_cap is not None:
                workers = min(workers, workers_cap)
            if args.compress:
                if not hasattr(target, "write_compressed"):
                    fail("Compression not supported for this file format")
                    return False
                from ..engine.compress import check_level

                try:
                    check_level(target.compression_type, args.level)
                except ValueError as e:
                    fail(str(e))
                    return False
            opts = ConvertOptions(min_sparse=min_sparse, workers=workers,
                                  progress=progress,
                                  target_has_backing=_backing_name(args) is not None,
                                  backing_end=getattr(target, "backing_end", None),
                                  compress=args.compress, compression_level=args.level)
            try:
                convert(sources, target, opts)
            except ConvertError as e:
                for line in e.notes:
                    sys.stderr.write(line + "\n")
                fail(str(e))
                return False
            except OSError as e:
                fail(f"error while writing: {e.strerror or e}")
                return False
        finally:
            target.close()
        # qemu-img 7.2 quirk: the final zero-length compressed write that "aligns the end of
        # the file" is EINVAL for qcow v1, and convert then exits 1 without a message (the
        # image itself is complete and correct).
        return not (args.compress and out_fmt == "qcow")
    finally:
        for s in sources:
            s.device.close()


def _backing_name(args: argparse.Namespace) -> str | None:
    """qemu-img's out_baseimg: -B, or when creating, -o backing_file (after -B is merged into
    the creation options by _create_target)."""
    if args.no_create:
        return args.backing  # type: ignore[no-any-return]
    return getattr(args, "create_backing", None)


def _backing_checks(args: argparse.Namespace, sources: list[Source]) -> bool | None:
    """The checks qemu-img makes once it knows whether the target has a backing file.

    None: carry on. A bool: stop with that success value, since qemu-img 7.2 reports
    --target-is-zero with a backing file but still exits with status 0 (the error path
    keeps the return value of the last successful step).
    """
    backing = _backing_name(args)
    if args.target_is_zero and backing is not None:
        fail("Cannot use --target-is-zero when the destination image has a backing file")
        return True
    if len(sources) > 1 and backing is not None:
        fail("Having a backing file for the target makes no sense when concatenating "
             "multiple input images")
        return False
    return None


def _create_target(args: argparse.Namespace, out_name: str, out_fmt: str,
                   sources: list[Source], total: int) -> Any:
    """Create the target as qemu-img does (None after an error message)."""
    from ..errors import Qcow2Error
    from ..ops.convert import ConvertError, RawTarget

    image_out = out_fmt in ("qcow2", "qcow")
    if out_fmt not in ("raw", "file") and not image_out:
        if out_fmt in _CREATABLE_LATER:
            fail(f"convert -O {out_fmt} is not supported yet (raw, qcow2 and qcow only)")
        elif out_fmt in _NO_CREATE:
            fail(f"Format driver '{out_fmt}' does not support image creation")
        else:
            fail(f"Unknown file format '{out_fmt}'")
        return None
    create_opts: dict[str, str] = {}
    if args.options:
        if not image_out:
            fail(f"convert -o with -O {out_fmt} is not supported yet")
            return None
        from ..ops.create import CreateError, parse_create_options

        try:
            # qemu-img joins repeated -o options with commas.
            create_opts = parse_create_options(out_fmt, ",".join(args.options))
        except CreateError as e:
            fail(e.message)
            return None
    # add_old_style_options(): -B and -F override -o backing_file and backing_fmt.
    if args.backing is not None:
        if not image_out:
            fail(f"Backing file not supported for file format '{out_fmt}'")
            return None
        create_opts["backing_file"] = args.backing
    if args.backing_fmt is not None:
        if not image_out:
            fail(f"Backing file format not supported for file format '{out_fmt}'")
            return None
        create_opts["backing_fmt"] = args.backing_fmt
    args.create_backing = create_opts.get("backing_file")
    stop = _backing_checks(args, sources)
    if stop is not None:
        return None
    if args.create_backing is not None and "backing_fmt" not in create_opts:
        fail("Use of backing file requires explicit backing format")
        return None
    if args.compress:
        if not image_out:
            fail("Compression not supported for this file format")
            return None
        if create_opts.get("encryption", "off") not in ("off", "false", "no") or \
                "encrypt.format" in create_opts:
            fail("Compression and encryption not supported at the same time")
            return None
        if create_opts.get("preallocation", "off") != "off":
            fail("Compression and preallocation not supported at the same time")
            return None

    if _is_source_file(out_name, sources):
        # QEMU's image locking refuses this; without it the source would be destroyed
        fail(f"{out_name}: error while converting {out_fmt}: Failed to get \"write\" lock\n"
             f"Is another process using the image [{out_name}]?")
        return None
    if args.create_backing:
        import os

        from ..engine.open import path_combine

        full = path_combine(out_name, args.create_backing)
        if os.path.realpath(full) == os.path.realpath(out_name):
            # QEMU creates the image, then its own lock stops it opening itself as backing.
            fail(f"Could not open '{out_name}': Could not open backing file: Failed to get "
                 f"shared \"write\" lock\nIs another process using the image [{full}]?")
            return None
    try:
        if image_out:
            from ..ops.convert_target import ImageTarget
            from ..ops.create import CreateError

            try:
                return ImageTarget(out_name, out_fmt, total, create_opts, args.cache)
            except CreateError as e:
                fail(f"{out_name}: error while converting {out_fmt}: {e.message}"
                     if e.prefixed else e.message)
                return None
            except (Qcow2Error, OSError) as e:
                fail(open_failure(out_name, e))
                return None
        return RawTarget(out_name, total, cache=args.cache)
    except ConvertError as e:
        fail(str(e))
        return None


def _open_existing(args: argparse.Namespace, out_name: str, out_fmt: str,
                   sources: list[Source], total: int) -> Any:
    """-n: open the existing target as `out_fmt` (never probed). A bool: stop with that
    success value (after a message)."""
    from ..errors import Qcow2Error
    from ..ops.convert import ConvertError, RawTarget

    stop = _backing_checks(args, sources)
    if stop is not None:
        return stop
    if not check_cache(args.cache):
        fail(f"Invalid cache option: {args.cache}")
        return False
    if out_fmt not in ("qcow2", "qcow") and (out_fmt in _CREATABLE_LATER or out_fmt in _NO_CREATE):
        fail(f"convert -n -O {out_fmt} is not supported yet (raw, qcow2 and qcow only)")
        return False
    if out_fmt not in ("raw", "file", "qcow2", "qcow"):
        fail(f"Could not open '{out_name}': Unknown driver '{out_fmt}'")
        return False
    if _is_source_file(out_name, sources):
        fail(f"Could not open '{out_name}': Failed to get \"write\" lock\n"
             f"Is another process using the image [{out_name}]?")
        return False
    target: Any
    try:
        if out_fmt in ("qcow2", "qcow"):
            from ..ops.convert_target import ImageTarget

            target = ImageTarget(out_name, out_fmt, total, {}, args.cache, create=False,
                                 zero_init=args.target_is_zero)
        else:
            target = RawTarget(out_name, total, cache=args.cache, create=False,
                               zero_init=args.target_is_zero)
    except ConvertError as e:
        fail(str(e))
        return False
    except (Qcow2Error, OSError) as e:
        fail(open_failure(out_name, e))
        return False
    if target.length < total:
        target.close()
        fail("output file is smaller than input file")
        return False
    return target


def _is_source_file(path: str, sources: list[Source]) -> bool:
    """Whether `path` is one of the files the sources read (an image, backing or data file)."""
    import os

    try:
        st = os.stat(path)
    except OSError:
        return False
    for src in sources:
        for fd in src.host_files().values():
            try:
                other = os.fstat(fd)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


def _reopener(name: str, fmt: str | None, snap: Snapshot | None) -> Callable[[], BlockDevice]:
    def reopen() -> BlockDevice:
        from ..engine.open import open_image

        dev = open_image(name, fmt, True, backing_policy="follow")
        if snap is not None:
            try:
                load_snapshot(dev, snap)
            except BaseException:
                dev.close()
                raise
        return dev

    return reopen
