"""`qcow2 compare`: qemu-img compare (7.2). Exit 0 identical, 1 different, 2 open error,
3 block-status error, 4 read error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .common import fail, open_failure, write_out
from .main import PROG, UsageError, error_line

if TYPE_CHECKING:
    from ..engine.device import BlockDevice
    from ..ops.progress import Progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="fmt1", metavar="fmt", help="format of the first image")
    parser.add_argument("-F", dest="fmt2", metavar="fmt", help="format of the second image")
    parser.add_argument("-s", dest="strict", action="store_true",
                        help="strict mode: sizes and allocation must match too")
    parser.add_argument("-p", dest="progress", action="store_true", help="show progress")
    parser.add_argument("-q", dest="quiet", action="store_true", help="quiet mode")
    parser.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                        help="open read-only without locking (always the case here)")
    parser.add_argument("-T", dest="cache", metavar="src_cache", default="writeback",
                        help="cache mode of the images")
    parser.add_argument("--object", dest="objects", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--image-opts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", metavar="filename", help="the two images")
    # qemu-img (getopt) accepts options after the file names
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    if args.objects or args.image_opts:
        return fail("compare option " + ("--object" if args.objects else "--image-opts")
                    + " is not supported yet")
    if len(args.files) != 2:
        raise UsageError("Expecting two image file names\n"
                         f"Try '{PROG} --help' for more information")
    from ..ops.convert import CACHE_MODES
    from ..ops.progress import Progress

    quiet: bool = args.quiet
    progress = Progress(args.progress and not quiet, 2.0)
    try:
        if args.cache not in CACHE_MODES:
            error_line(f"Invalid source cache option: {args.cache}")
            return 2
        return _compare(args, progress, quiet)
    finally:
        progress.end()


def _compare(args: argparse.Namespace, progress: Progress, quiet: bool) -> int:
    from ..engine.open import open_image
    from ..errors import Qcow2Error
    from ..ops.compare import CompareError, compare

    names: tuple[str, str] = (args.files[0], args.files[1])
    devs: list[BlockDevice] = []
    try:
        for name, fmt in zip(names, (args.fmt1, args.fmt2), strict=True):
            try:
                devs.append(open_image(name, fmt, True, backing_policy="follow"))
            except (Qcow2Error, OSError) as e:
                fail(open_failure(name, e))
                return 2

        def out(text: str) -> None:
            if not quiet:
                write_out(text)
                sys.stdout.flush()

        fmts: tuple[str | None, str | None] = (args.fmt1, args.fmt2)

        def reopener(i: int) -> Callable[[], BlockDevice]:
            return lambda: open_image(names[i], fmts[i], True, backing_policy="follow")

        try:
            return compare(devs[0], devs[1], names, strict=args.strict, progress=progress,
                           out=out, reopen=(reopener(0), reopener(1)))
        except CompareError as e:
            for line in e.notes:
                sys.stderr.write(line + "\n")
            fail(str(e))
            return e.code
    finally:
        for d in devs:
            d.close()
