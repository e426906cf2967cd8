"""`qcow2 rebase`: change an image's backing file, as `qemu-img rebase` (7.2).

Safe mode (the default) first copies into the image whatever differs between the old and the
new backing chain; -u only rewrites the header. Messages, their order and the exit status
(1 for every failure) are qemu-img's.
"""

from __future__ import annotations

import argparse

from .common import fail, open_failure, report_dirty_repair
from .main import PROG, UsageError

CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", dest="fmt", metavar="fmt", help="image format (probed if absent)")
    p.add_argument("-t", dest="cache", default="writeback", metavar="cache",
                   help="cache mode of the image (checked, otherwise ignored)")
    p.add_argument("-T", dest="src_cache", default="writeback", metavar="src_cache",
                   help="cache mode of the backing files (checked, otherwise ignored)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="unsafe: only rewrite the backing file name and format")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locking (always the case here)")
    p.add_argument("-b", dest="backing", metavar="backing_file",
                   help="new backing file (\"\" for none)")
    p.add_argument("-F", dest="backing_fmt", metavar="backing_fmt",
                   help="format of the new backing file")
    p.add_argument("filename", nargs="*", help="image file")


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.progress import Progress
    from ..ops.rebase import OpenFailed, rebase

    if len(args.filename) != 1:
        raise UsageError(f"Expecting one image file name\n"
                         f"Try '{PROG} --help' for more information")
    if not args.unsafe and args.backing is None:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)\n"
                         f"Try '{PROG} --help' for more information")
    progress = Progress(args.progress and not args.quiet, 2.0)
    progress.print(0, 100)
    try:
        if args.cache not in CACHE_MODES:
            return fail(f"Invalid cache option: {args.cache}")
        if args.src_cache not in CACHE_MODES:
            return fail(f"Invalid source cache option: {args.src_cache}")
        try:
            rebase(args.filename[0], args.backing, args.backing_fmt, unsafe=args.unsafe,
                   fmt=args.fmt, backing_policy="follow", progress=progress,
                   on_open=report_dirty_repair)
        except OpenFailed as e:
            return fail(open_failure(e.filename, e.cause))
        except (Qcow2Error, OSError) as e:
            return fail(str(e))
        progress.print(100, 0)
        return 0
    finally:
        progress.end()
