"""`qcow2 commit`: write an image's data into its backing file, as `qemu-img commit` (7.2).

-b names a deeper base in the chain (and implies -d); -d keeps the top image's data, else it
is emptied. Messages and the exit status (1 for every failure) are qemu-img's.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .common import cvtnum, fail, open_failure, report_dirty_repair
from .main import PROG, UsageError
from .rebase import CACHE_MODES

if TYPE_CHECKING:
    from ..engine.device import BlockDevice


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", dest="fmt", metavar="fmt", help="image format (probed if absent)")
    p.add_argument("-t", dest="cache", default="writeback", metavar="cache",
                   help="cache mode (checked, otherwise ignored)")
    p.add_argument("-b", dest="base", metavar="base", help="commit into this backing file")
    p.add_argument("-r", dest="rate", metavar="rate_limit",
                   help="rate limit in bytes per second (checked, otherwise ignored)")
    p.add_argument("-d", dest="drop", action="store_true", help="do not empty the image")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename", nargs="*", help="image file")


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.commit import commit
    from ..ops.progress import Progress
    from ..ops.rebase import OpenFailed

    if args.rate is not None:
        cvtnum("rate limit", args.rate)
    if len(args.filename) != 1:
        raise UsageError(f"Expecting one image file name\n"
                         f"Try '{PROG} --help' for more information")
    if args.cache not in CACHE_MODES:
        return fail(f"Invalid cache option: {args.cache}")
    progress = Progress(args.progress and not args.quiet, 1.0)
    started = False

    def opened(img: BlockDevice) -> None:
        nonlocal started
        report_dirty_repair(img)
        started = True
        progress.print(0, 100)

    try:
        commit(args.filename[0], args.base, drop=args.drop, fmt=args.fmt,
               backing_policy="follow", progress=progress, on_open=opened)
    except OpenFailed as e:
        return fail(open_failure(e.filename, e.cause))
    except (Qcow2Error, OSError) as e:
        if started:
            progress.end()
            started = False
        return fail(str(e))
    finally:
        if started:
            progress.print(100, 0)
            progress.end()
    if not args.quiet:
        sys.stdout.write("Image committed.\n")
    return 0
