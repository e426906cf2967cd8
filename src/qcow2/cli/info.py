"""`qcow2 info`: qemu-img info (7.2), human or JSON, optionally for the whole backing chain."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import dump_qobject, fail, open_failure, size_to_str, to_json_pretty, write_out
from .main import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", dest="fmt", metavar="fmt", help="image format (probed if absent)")
    parser.add_argument("--output", default="human", metavar="human|json",
                        help="output format")
    parser.add_argument("--backing-chain", action="store_true",
                        help="show every image of the backing chain")
    parser.add_argument("-U", "--force-share", action="store_true",
                        help="open read-only without locking (always the case here)")
    parser.add_argument("filename", nargs="*", help="image file")


def output_format(value: str) -> str:
    if value not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    return value


def one_filename(names: list[str]) -> str:
    if len(names) != 1:
        raise UsageError("Expecting one image file name")
    return names[0]


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.info import OpenFailed, collect_info_list

    fmt_out = output_format(args.output)
    filename = one_filename(args.filename)
    try:
        infos = collect_info_list(filename, args.fmt, chain=args.backing_chain)
    except OpenFailed as e:
        return fail(open_failure(e.filename, e.cause))
    except (Qcow2Error, OSError) as e:
        return fail(str(e))
    if fmt_out == "json":
        write_out(to_json_pretty(infos if args.backing_chain else infos[0]) + "\n")
    else:
        write_out("\n".join(human_info(i) for i in infos))
    return 0


def _blen(s: str) -> int:
    return len(s.encode("utf-8", "surrogateescape"))


def _ljust(s: str, width: int) -> str:
    return s + " " * max(0, width - _blen(s))


def _rjust(s: str, width: int) -> str:
    return " " * max(0, width - _blen(s)) + s


def _cstr(s: str, size: int) -> str:
    """pstrcpy() into a char[size]: at most size-1 bytes."""
    raw = s.encode("utf-8", "surrogateescape")
    if len(raw) < size:
        return s
    return raw[:size - 1].decode("utf-8", "surrogateescape")


def _c_int(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def snapshot_header() -> str:
    return (_ljust("ID", 10) + _ljust("TAG", 17) + _rjust("VM SIZE", 8) + _rjust("DATE", 20)
            + _rjust("VM CLOCK", 13) + _rjust("ICOUNT", 11))


def snapshot_line(sn: dict[str, Any]) -> str:
    """bdrv_snapshot_dump() of one snapshot."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    clock_nsec = (sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]) % (1 << 64)
    secs = clock_nsec // 1_000_000_000
    if secs >> 63:
        secs -= 1 << 64
    clock = "%02d:%02d:%02d.%03d" % (  # noqa: UP031
        _c_int(int(secs / 3600)), _c_int(int(secs / 60) % 60),
        _c_int(int(secs % 60)), _c_int((clock_nsec // 1_000_000) % 1000))
    icount = str(sn["icount"]) if "icount" in sn else ""
    return (_ljust(_cstr(sn["id"], 128), 9) + " " + _ljust(_cstr(sn["name"], 256), 16) + " "
            + _rjust(size_to_str(sn["vm-state-size"] % (1 << 64)), 8) + _rjust(date, 20)
            + _rjust(clock, 13) + _rjust(icount, 11))


def human_info(info: dict[str, Any]) -> str:
    """bdrv_image_info_dump() (block/qapi.c, 7.2)."""
    out = []
    actual = info.get("actual-size")
    disk = size_to_str(actual) if actual is not None else "unavailable"
    vsize = info["virtual-size"]
    out.append(f"image: {info['filename']}\n"
               f"file format: {info['format']}\n"
               f"virtual size: {size_to_str(vsize)} ({vsize} bytes)\n"
               f"disk size: {disk}\n")
    if info.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        out.append(line + "\n")
        if "backing-filename-format" in info:
            out.append(f"backing file format: {info['backing-filename-format']}\n")
    if "snapshots" in info:
        out.append("Snapshot list:\n" + snapshot_header() + "\n")
        for sn in info["snapshots"]:
            out.append(snapshot_line(sn) + "\n")
    if "format-specific" in info:
        out.append("Format specific information:\n")
        dump_qobject(1, info["format-specific"]["data"], out)
    return "".join(out)
