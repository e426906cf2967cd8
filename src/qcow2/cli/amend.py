"""`qcow2 amend`: qemu-img 7.2's amend (img_amend): getopt ":ho:f:t:pq" plus --force,
`-o help`, the open, the amend option parsing and its messages; exit status 1 on any error.
The work is ops/amend.py and engine/amend.py."""

from __future__ import annotations

import argparse
import getopt
import sys
from typing import TYPE_CHECKING

from .common import fail, open_failure, report_dirty_repair, write_out
from .main import PROG, UsageError
from .rebase import CACHE_MODES
from .snapshot import RAW_PROBE_WARNING, _offending

if TYPE_CHECKING:
    from ..ops.progress import Progress

HELP = (f"usage: {PROG} amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] "
        "[-t cache] [--force] -o options filename\n")
_TRY = f"\nTry '{PROG} --help' for more information"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # getopt, not argparse: several -o accumulate, and qemu-img checks them in order.
    parser.parse_args = _parse  # type: ignore[method-assign, assignment]


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    from ..ops.qemu_opts import is_valid_option_list

    args = list(argv or [])
    ns = argparse.Namespace(help=False, options=None, fmt=None, cache="writeback",
                            progress=False, quiet=False, force=False, filenames=[],
                            bad_list=None)
    try:
        opts, rest = getopt.gnu_getopt(args, "ho:f:t:pq",
                                       ["help", "object=", "image-opts", "force"])
    except getopt.GetoptError as e:
        word = _offending(args, e.opt)
        if "requires argument" in e.msg:
            raise UsageError(f"missing argument for option '{word}'{_TRY}") from None
        raise UsageError(f"unrecognized option '{word}'{_TRY}") from None
    for o, v in opts:
        if o in ("-h", "--help"):
            ns.help = True
            return ns
        if o == "-o":
            if not is_valid_option_list(v):
                ns.bad_list = v
                return ns
            ns.options = v if ns.options is None else f"{ns.options},{v}"
        elif o == "-f":
            ns.fmt = v
        elif o == "-t":
            ns.cache = v
        elif o == "-p":
            ns.progress = True
        elif o == "-q":
            ns.quiet = True
        elif o == "--force":
            ns.force = True
        elif o == "--object":
            raise UsageError("amend option --object is not supported yet")
        elif o == "--image-opts":
            raise UsageError("amend option --image-opts is not supported yet")
    ns.filenames = rest
    return ns


def run(args: argparse.Namespace) -> int:
    if args.help:
        write_out(HELP)
        return 0
    if args.bad_list is not None:
        return fail(f"Invalid option list: {args.bad_list}")
    if args.options is None:
        raise UsageError("Must specify options (-o)" + _TRY)
    from ..ops.progress import Progress

    progress = Progress(args.progress and not args.quiet, 1.0)
    try:
        return _run(args, progress)
    finally:
        progress.end()


def _run(args: argparse.Namespace, progress: Progress) -> int:
    from ..engine.open import open_image
    from ..errors import Qcow2Error
    from ..ops.amend import AmendError, amend_image, parse_amend_options
    from ..ops.progress import f32
    from ..ops.qemu_opts import has_help_option

    options: str = args.options
    filename = args.filenames[0] if len(args.filenames) == 1 else None
    if args.fmt and has_help_option(options):
        return _help(args.fmt)
    if filename is None:
        return fail("Expecting one image file name")
    if args.cache not in CACHE_MODES:
        return fail(f"Invalid cache option: {args.cache}")
    try:
        # Amend writes no guest data: persistent bitmaps stay valid (as in QEMU).
        img = open_image(filename, args.fmt, readonly=False, backing_policy="follow",
                         keep_bitmaps=True)
    except (Qcow2Error, OSError) as e:
        return fail(open_failure(filename, e))
    try:
        report_dirty_repair(img)
        if img.format_name == "raw" and not args.fmt:
            sys.stderr.write(RAW_PROBE_WARNING.format(filename))
        if has_help_option(options):
            return _help(img.format_name)
        if img.format_name != "qcow2":
            return fail(f"Format driver '{img.format_name}' does not support option amendment")
        try:
            opts = parse_amend_options(options)
        except AmendError as e:
            return _amend_failed(e)

        def status(offset: int, total: int) -> None:
            if total > 0:
                pct = f32(f32(100.0 * f32(offset)) / f32(total))
                progress.print(pct, 0)

        progress.print(0, 0)
        try:
            amend_image(img, opts, status=status if progress.enabled else None,
                        force=args.force)
        except AmendError as e:
            progress.print(100, 0)  # qemu-img reports 100% before the error
            return _amend_failed(e)
        except (Qcow2Error, OSError) as e:
            progress.print(100, 0)
            return fail(str(e))
        progress.print(100, 0)
        return 0
    finally:
        try:
            img.close()
        except (Qcow2Error, OSError) as e:
            fail(str(e))


def _help(fmt: str) -> int:
    from ..ops.amend import AmendError, amend_option_help

    try:
        write_out(amend_option_help(fmt))
    except AmendError as e:
        return fail(e.message)
    return 0


def _amend_failed(e: Exception) -> int:
    from ..ops.amend import AmendError

    assert isinstance(e, AmendError)
    fail(e.message)
    if e.hint:
        sys.stderr.write(e.hint)
    return 1
