"""`qcow2 check`: qemu-img check (7.2): human or JSON report, repairs, exit statuses.

Exit statuses as qemu-img: 0 clean, 1 the check failed (open error, internal error, check
errors), 2 corruptions remain, 3 only leaks remain, 63 the format has no check.
"""

from __future__ import annotations

import argparse
import sys

from .common import fail, open_failure, to_json_pretty, write_out
from .main import PROG, UsageError

RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", dest="fmt", metavar="fmt", help="image format (probed if absent)")
    p.add_argument("--output", default="human", metavar="human|json", help="output format")
    p.add_argument("-r", dest="repair", metavar="leaks|all",
                   help="repair leaked clusters, or all inconsistencies")
    p.add_argument("-q", action="store_true", help="quiet: print nothing on stdout")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open without locking (always the case here)")
    p.add_argument("-T", dest="cache", metavar="src_cache", help="accepted, ignored")
    p.add_argument("filename", nargs="*", help="image file")


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.check import CheckNotSupported, OpenFailed, check

    if args.repair is not None and args.repair not in ("leaks", "all"):
        raise UsageError("Unknown option value for -r (expecting 'leaks' or 'all'): "
                         f"{args.repair}")
    if args.output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    if len(args.filename) != 1:
        raise UsageError("Expecting one image file name")
    filename = args.filename[0]
    try:
        report = check(filename, args.fmt, args.repair)
    except OpenFailed as e:
        return fail(open_failure(e.filename, e.cause))
    except CheckNotSupported as e:
        if args.repair is not None and e.probed and e.format_name == "raw":
            sys.stderr.write(RAW_PROBE_WARNING.format(filename))
        fail(str(e))
        return 63
    except (Qcow2Error, OSError) as e:
        return fail(str(e))
    for m in report.messages:
        sys.stderr.write(f"{PROG}: {m.text}\n" if m.reported else f"{m.text}\n")
    res = report.result
    if res.failure is not None:
        return fail(f"Check failed: {res.failure}")
    out: list[str] = []
    if report.repaired is not None and args.output == "human":
        out.append("The following inconsistencies were found and repaired:\n\n"
                   f"    {res.leaks_fixed} leaked clusters\n"
                   f"    {res.corruptions_fixed} corruptions\n\n"
                   "Double checking the fixed image now...\n")
    if args.output == "json":
        out.append(to_json_pretty(res.to_qapi()) + "\n")
    else:
        out.append(human_check(res))
    if not args.q:
        write_out("".join(out))
    if res.check_errors:
        return fail("Check failed")
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0


def human_check(res: object) -> str:
    """dump_human_image_check() of qemu-img.c."""
    from ..engine.check import CheckResult

    assert isinstance(res, CheckResult)
    lines: list[str] = []
    if not (res.corruptions or res.leaks or res.check_errors):
        lines.append("No errors were found on the image.\n")
    else:
        if res.corruptions:
            lines.append(f"\n{res.corruptions} errors were found on the image.\n"
                         "Data may be corrupted, or further writes to the image may corrupt "
                         "it.\n")
        if res.leaks:
            lines.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                         "This means waste of disk space, but no harm to data.\n")
        if res.check_errors:
            lines.append(f"\n{res.check_errors} internal errors have occurred during the "
                         "check.\n")
    if res.total_clusters and res.allocated_clusters:
        a = res.allocated_clusters
        lines.append(f"{a}/{res.total_clusters} = {a * 100.0 / res.total_clusters:0.2f}% "
                     f"allocated, {res.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                     f"{res.compressed_clusters * 100.0 / a:0.2f}% compressed clusters\n")
    if res.image_end_offset:
        lines.append(f"Image end offset: {res.image_end_offset}\n")
    return "".join(lines)
