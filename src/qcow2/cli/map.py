"""`qcow2 map`: qemu-img map (7.2) with its exact JSON and human layouts."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from ..engine.device import Extent
from ..ops.map import MapReadError
from .common import cvtnum, fail, open_failure, os_reason, write_out
from .info import one_filename, output_format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="fmt", metavar="fmt", help="image format (probed if absent)")
    parser.add_argument("--output", default="human", metavar="human|json",
                        help="output format")
    parser.add_argument("-s", "--start-offset", metavar="offset",
                        help="first guest byte to map (size suffixes allowed)")
    parser.add_argument("-l", "--max-length", metavar="length",
                        help="map at most this many bytes (size suffixes allowed)")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open read-only without locking (always the case here)")
    parser.add_argument("filename", nargs="*", help="image file")


def json_entry(e: Extent) -> str:
    """One entry exactly as qemu-img 7.2's dump_map_entry() prints it."""
    s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth},'
         f' "present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
    if e.host_offset is not None:
        s += f', "offset": {e.host_offset}'
    return s + "}"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _hex(v: int) -> str:
    # printf("%#-16" PRIx64): the '#' flag adds no "0x" to zero.
    return f"{v:#x}" if v else "0"


HUMAN_HEADER = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"
UNMAPPABLE = "File contains external, encrypted or compressed clusters."


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.map import map_entries, open_for_map

    fmt_out = output_format(args.output)
    start = 0 if args.start_offset is None else cvtnum("start offset", args.start_offset)
    max_length = None if args.max_length is None else cvtnum("max length", args.max_length)
    filename = one_filename(args.filename)
    try:
        dev = open_for_map(filename, args.fmt)
    except (Qcow2Error, OSError) as e:
        return fail(open_failure(filename, e))
    with dev:
        if fmt_out == "json":
            return _run_json(map_entries(dev, start, max_length))
        return _run_human(map_entries(dev, start, max_length))


def _run_json(entries: Iterable[Extent]) -> int:
    out = ["["]
    try:
        first = True
        for e in entries:
            if not first:
                out.append(",\n")
            first = False
            out.append(json_entry(e))
    except MapReadError as exc:
        # qemu-img had printed each entry with the separator that follows it
        write_out("".join(out) + ("" if first else ",\n"))
        return _read_error(exc)
    out.append("]\n")
    write_out("".join(out))
    return 0


def _run_human(entries: Iterable[Extent]) -> int:
    out = [HUMAN_HEADER]
    try:
        for e in entries:
            if e.data and e.host_offset is None:
                write_out("".join(out))
                return fail(UNMAPPABLE)
            # Only data that reads from a file is listed: zeroes and holes are not.
            if e.data and not e.zero:
                out.append(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.host_offset or 0):<16}"
                           f"{e.filename or ''}\n")
    except MapReadError as exc:
        write_out("".join(out))
        return _read_error(exc)
    write_out("".join(out))
    return 0


def _read_error(exc: MapReadError) -> int:
    """qemu-img's report of a failed block-status query (stderr, exit 1)."""
    from ..errors import CorruptImageError

    cause = exc.cause
    if isinstance(cause, CorruptImageError):
        # what qcow2_signal_corruption() prints for an image opened read-only; the query
        # then fails with EIO
        fail(f"Image is corrupt: {cause}; further non-fatal corruption events will be "
             "suppressed")
        return fail("Could not read file metadata: Input/output error")
    if isinstance(cause, OSError):
        return fail(f"Could not read file metadata: {os_reason(cause)}")
    return fail(f"Could not read file metadata: {cause}")
