"""`qcow2 create`: qemu-img 7.2's `create` command line.

    qcow2 create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] FILE [SIZE]

Arguments are parsed like qemu-img's getopt loop (options may follow the file name); everything
else, messages included, is ops.create.img_create(), QEMU's bdrv_img_create().
"""

from __future__ import annotations

import argparse
import sys

from ..ops.create import CreateError, img_create, option_help
from ..ops.qemu_opts import has_help_option, is_valid_option_list
from .common import cvtnum, write_out
from .main import PROG, UsageError, error_line

_TRY = f"Try '{PROG} --help' for more information"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="fmt", default="raw", metavar="FMT",
                        help="image format: qcow2, qcow or raw (default raw)")
    parser.add_argument("-b", dest="backing", metavar="BACKING_FILE",
                        help="backing file (relative names are relative to FILE's directory)")
    parser.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                        help="format of the backing file (required with -b)")
    parser.add_argument("-u", dest="unsafe", action="store_true",
                        help="do not open the backing file (a size is then required)")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="format options as qemu-img's -o; '-o help' lists them")
    parser.add_argument("-q", dest="quiet", action="store_true", help="quiet: no output")
    parser.add_argument("--object", action="append", default=[], metavar="OBJECTDEF",
                        help="accepted for compatibility (secrets are unused: no encryption)")
    parser.add_argument("filename", nargs="?", metavar="FILE")
    parser.add_argument("size", nargs="?", metavar="SIZE",
                        help="virtual size; suffixes k, M, G, T, P, E (powers of 1024)")
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    # getopt permutes: `create x.qcow2 1G -u -F raw` is valid for qemu-img.
    setattr(parser, "parse_args", parser.parse_intermixed_args)  # noqa: B010


def _unrecognized(token: str) -> UsageError:
    return UsageError(f"unrecognized option '{token}'\n{_TRY}")


def run(args: argparse.Namespace) -> int:
    options: str | None = None
    for text in args.options:
        if not is_valid_option_list(text):
            raise UsageError(f"Invalid option list: {text}")
        options = text if options is None else f"{options},{text}"
    filename: str | None = args.filename
    # argparse lets "-5" through as a positional; getopt would have read it as an option.
    for token in (filename, args.size, *args.extra):
        if token is not None and token.startswith("-") and token != "-":
            raise _unrecognized(token)
    if options is not None and has_help_option(options):
        if args.fmt not in ("qcow2", "qcow", "raw"):
            raise UsageError(f"Unknown file format '{args.fmt}'")
        write_out(option_help(args.fmt, with_protocol=filename is not None))
        return 0
    if filename is None:
        raise UsageError(f"Expecting image file name\n{_TRY}")
    size = cvtnum("image size", args.size) if args.size is not None else None
    if args.extra:
        raise UsageError(f"Unexpected argument: {args.extra[0]}\n{_TRY}")

    def out(text: str) -> None:
        write_out(text)
        sys.stdout.flush()

    def warn(text: str) -> None:
        error_line(f"warning: {text}")

    try:
        img_create(filename, args.fmt, options, size, base_filename=args.backing,
                   base_fmt=args.backing_fmt, no_backing=args.unsafe,
                   out=None if args.quiet else out, warn=warn)
    except CreateError as e:
        prefix = f"{filename}: " if e.prefixed else ""
        _stderr(f"{PROG}: {prefix}{e.message}\n{e.hint}")
        return 1
    return 0


def _stderr(text: str) -> None:
    sys.stdout.flush()
    try:
        sys.stderr.write(text)
    except UnicodeEncodeError:
        buf = getattr(sys.stderr, "buffer", None)
        if buf is None:
            raise
        sys.stderr.flush()
        buf.write(text.encode("utf-8", "surrogateescape"))
    sys.stderr.flush()
