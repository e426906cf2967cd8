"""`qcow2 resize`: grow or shrink an image, as `qemu-img resize` (messages, --shrink rule)."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import Qcow2Error
from .common import fail, open_failure, qemu_strtosz, report_dirty_repair

SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken "
                  "image's end. Before performing such an operation, make sure there is no "
                  "important data there.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", dest="fmt")
    p.add_argument("-q", action="store_true")
    p.add_argument("--shrink", action="store_true")
    p.add_argument("--preallocation", default="off")
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename")
    p.add_argument("size")


def fix_argv(argv: list[str]) -> list[str]:
    """A size like '-2G' is a relative size, not an option (qemu-img's getopt stops there)."""
    if argv and argv[-1][:1] == "-" and argv[-1][1:2].isdigit() and "--" not in argv:
        return [*argv[:-1], "--", argv[-1]]
    return argv


def run(args: argparse.Namespace) -> int:
    import qcow2

    text = args.size
    sign = text[:1] if text[:1] in "+-" else ""
    try:
        amount = qemu_strtosz(text[1:] if sign else text)
    except ValueError:
        return fail("Parameter 'size' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                    "peta-\nand exabytes, respectively.")
    if args.preallocation != "off":
        return fail(f"Preallocation mode '{args.preallocation}' is not supported yet")
    try:
        img = qcow2.open(args.filename, args.fmt, readonly=False, backing_policy="follow")
    except (Qcow2Error, OSError) as e:
        return fail(open_failure(args.filename, e))
    try:
        report_dirty_repair(img)
        current = img.virtual_size
        new = current + amount if sign == "+" else current - amount if sign == "-" else amount
        if new <= 0:
            return fail("New image size must be positive")
        if new < current:
            if not args.shrink:
                return fail("Use the --shrink option to perform a shrink operation.")
            sys.stderr.write(f"qcow2: {SHRINK_WARNING}\n")
        resize = getattr(img, "resize", None)
        if img.format_name == "raw":
            img.close()
            os.truncate(args.filename, new)
        elif resize is None:
            return fail("Image format driver does not support resize")
        else:
            resize(new)
    except (Qcow2Error, OSError) as e:
        return fail(str(e))
    finally:
        img.close()
    if not args.q:
        sys.stdout.write("Image resized.\n")
    return 0
