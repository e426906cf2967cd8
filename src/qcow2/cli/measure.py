"""`qcow2 measure`: qemu-img 7.2's `measure` command line.

    qcow2 measure [--output=human|json] [-O fmt] [-o options]
                  [--size N | [--image-opts] [-f fmt] [-l snapshot_param] [-U] FILE]

Checks run in qemu-img's order with its messages; the numbers come from ops.measure.
"""

from __future__ import annotations

import argparse

from .common import cvtnum, fail, open_failure, to_json_pretty, write_out
from .main import UsageError

# Formats qemu-img knows but cannot create (measure needs creation options).
_NO_CREATE = ("bochs", "cloop", "dmg", "vvfat", "blkdebug", "blklogwrites", "blkverify",
              "compress", "copy-before-write", "copy-on-read", "null-aio", "null-co",
              "preallocate", "quorum", "replication", "snapshot-access", "throttle")
_NO_MEASURE = ("qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "parallels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", dest="output", default="human", metavar="FORMAT",
                        help="human (default) or json")
    parser.add_argument("-f", dest="fmt", metavar="fmt", help="source format (probed if absent)")
    parser.add_argument("-O", dest="out_fmt", default="raw", metavar="output_fmt",
                        help="format to measure for (default raw)")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="options",
                        help="creation options of the output format, as qemu-img's -o")
    parser.add_argument("-l", dest="snapshot", metavar="snapshot_param",
                        help="measure an internal snapshot of the source")
    parser.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                        help="open the source without locking (accepted; we never lock)")
    parser.add_argument("--size", dest="size", metavar="N", help="measure a new image of N bytes")
    parser.add_argument("--image-opts", dest="image_opts", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--object", dest="objects", action="append", default=[],
                        help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", metavar="FILE")
    setattr(parser, "parse_args", parser.parse_intermixed_args)  # noqa: B010


def run(args: argparse.Namespace) -> int:
    from ..ops.qemu_opts import is_valid_option_list

    if args.output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    size = cvtnum("image size", args.size) if args.size is not None else None
    options: str | None = None
    for text in args.options:
        if not is_valid_option_list(text):
            raise UsageError(f"Invalid option list: {text}")
        options = text if options is None else f"{options},{text}"
    if args.objects:
        return fail("--object is not supported (no secrets are needed without encryption)")
    if args.image_opts:
        return fail("--image-opts is not supported yet")
    if len(args.files) > 1:
        return fail("At most one filename argument is allowed.")
    filename: str | None = args.files[0] if args.files else None
    if filename is None and (args.fmt or args.snapshot is not None):
        return fail("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and size is not None:
        return fail("--size N cannot be used together with a filename.")
    if filename is None and size is None:
        return fail("Either --size N or one filename must be specified.")

    from ..engine.open import open_image
    from ..errors import Qcow2Error

    source = None
    try:
        if filename is not None:
            try:
                source = open_image(filename, args.fmt, True, backing_policy="follow")
            except (Qcow2Error, OSError) as e:
                return fail(open_failure(filename, e))
            if args.snapshot is not None:
                from .convert import SNAPSHOT_OPT_BASE, SnapshotFailed, load_snapshot
                from .convert import parse_snapshot_param as parse_sn

                if args.snapshot.startswith(SNAPSHOT_OPT_BASE):
                    snap = (*parse_sn(args.snapshot), False)
                else:
                    snap = (args.snapshot, args.snapshot, True)
                try:
                    load_snapshot(source, snap)
                except SnapshotFailed as e:
                    return fail(f"Failed to load snapshot: {e}")
        return _measure(args, options, size, source)
    except (Qcow2Error, OSError) as e:
        # a failed block-status query of the source (qcow2_measure's wording)
        from ..errors import CorruptImageError
        from .common import os_reason

        if isinstance(e, CorruptImageError):
            fail(f"Image is corrupt: {e}; further non-fatal corruption events will be "
                 "suppressed")
            return fail("Unable to get block status: Input/output error")
        reason = os_reason(e) if isinstance(e, OSError) else str(e)
        return fail(f"Unable to get block status: {reason}")
    finally:
        if source is not None:
            source.close()


def _measure(args: argparse.Namespace, options: str | None, size: int | None,
             source: object) -> int:
    from ..ops.create import CreateError, parse_create_options
    from ..ops.measure import MeasureError, measure

    out_fmt: str = args.out_fmt
    if out_fmt in _NO_CREATE:
        return fail(f"Format driver '{out_fmt}' does not support image creation")
    if out_fmt not in ("qcow2", "raw", "qcow", "luks", *_NO_MEASURE):
        return fail(f"Unknown file format '{out_fmt}'")
    opts: dict[str, str] = {}
    if out_fmt in ("qcow2", "raw", "qcow"):
        try:
            opts = parse_create_options(out_fmt, options or "")
        except CreateError as e:
            fail(e.message + ("\n" + e.hint.rstrip("\n") if e.hint else ""))
            return fail(f"Invalid options for file format '{out_fmt}'")
    if out_fmt == "luks":
        return fail("Parameter 'key-secret' is required for cipher")
    try:
        info = measure(out_fmt, opts, size, source)  # type: ignore[arg-type]
    except (MeasureError, CreateError) as e:
        return fail(getattr(e, "message", str(e)))
    if args.output == "json":
        write_out(to_json_pretty(info.to_json()) + "\n")
    else:
        lines = [f"required size: {info.required}",
                 f"fully allocated size: {info.fully_allocated}"]
        if info.bitmaps is not None:
            lines.append(f"bitmaps size: {info.bitmaps}")
        write_out("\n".join(lines) + "\n")
    return 0
