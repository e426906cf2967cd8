"""`qcow2 snapshot`: qemu-img snapshot (7.2): list, create, apply and delete internal
snapshots, with qemu-img's option parsing (getopt "la:c:d:hqU"), texts and exit statuses."""

from __future__ import annotations

import argparse
import getopt
import os
import sys
from typing import Any

from .common import fail, open_failure, report_dirty_repair, write_out
from .main import PROG, UsageError

RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")
HELP = (f"usage: {PROG} snapshot [--object objectdef] [--image-opts] [-U] [-q] "
        "[-l | -a snapshot | -c snapshot | -d snapshot] filename\n")
_TRY = f"\nTry '{PROG} --help' for more information"
_MIX = "Cannot mix '-l', '-a', '-c', '-d'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # getopt, not argparse: qemu-img's messages for bad options and its "Cannot mix" rule
    # depend on the order options come in.
    parser.parse_args = _parse  # type: ignore[method-assign, assignment]


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = list(argv or [])
    ns = argparse.Namespace(action=None, name=None, quiet=False, force_share=False,
                            help=False, filename=None)
    try:
        opts, rest = getopt.gnu_getopt(args, "la:c:d:hqU",
                                       ["help", "object=", "image-opts", "force-share"])
    except getopt.GetoptError as e:
        opt = e.opt
        word = _offending(args, opt)
        if "requires argument" in e.msg:
            raise UsageError(f"missing argument for option '{word}'{_TRY}") from None
        raise UsageError(f"unrecognized option '{word}'{_TRY}") from None
    for o, v in opts:
        if o in ("-h", "--help"):
            ns.help = True
            return ns
        if o in ("-l", "-a", "-c", "-d"):
            if ns.action is not None:
                raise UsageError(_MIX + _TRY)
            ns.action = o[1]
            ns.name = v if o != "-l" else None
        elif o == "-q":
            ns.quiet = True
        elif o in ("-U", "--force-share"):
            ns.force_share = True
        elif o == "--object":
            raise UsageError("snapshot option --object is not supported yet")
        elif o == "--image-opts":
            raise UsageError("snapshot option --image-opts is not supported yet")
    if len(rest) != 1:
        raise UsageError("Expecting one image file name" + _TRY)
    ns.filename = rest[0]
    return ns


def _offending(args: list[str], opt: str) -> str:
    """argv[optind - 1] as qemu-img reports it: the word that holds the bad option."""
    for w in args:
        if w == "--":
            break
        if len(opt) > 1 and w.startswith("--" + opt):
            return w
        if len(opt) == 1 and w.startswith("-") and not w.startswith("--") and opt in w[1:]:
            return w
    return f"-{opt}" if len(opt) == 1 else f"--{opt}"


def run(args: argparse.Namespace) -> int:
    if args.help:
        write_out(HELP)
        return 0
    import qcow2

    from ..errors import Qcow2Error

    filename: str = args.filename
    readonly = args.action == "l"  # qemu-img opens read-write unless listing
    if args.force_share and not readonly:
        return fail(f"Could not open '{filename}': force-share=on can only be used with "
                    "read-only images")
    if args.action == "a":
        # QEMU refuses to revert an image with (persistent) dirty bitmaps; the read-write
        # open below would drop them first, so look before.
        try:
            with qcow2.open(filename, readonly=True, backing_policy="follow") as probe:
                has_bitmaps = bool(getattr(probe, "bitmaps", None))
        except (Qcow2Error, OSError) as e:
            return fail(open_failure(filename, e))
        if has_bitmaps:
            return fail(f"Could not apply snapshot '{args.name}': Device has active dirty "
                        "bitmaps")
    try:
        img = qcow2.open(filename, readonly=readonly, backing_policy="follow")
    except (Qcow2Error, OSError) as e:
        return fail(open_failure(filename, e))
    try:
        report_dirty_repair(img)
        # The format is always probed (qemu-img snapshot has no -f).
        if not readonly and img.format_name == "raw":
            sys.stderr.write(RAW_PROBE_WARNING.format(filename))
            if args.action == "a":
                # QEMU closes the raw node to try the snapshot on its file child and opens
                # it again, which warns a second time.
                sys.stderr.write(RAW_PROBE_WARNING.format(filename))
        if args.action == "l":
            _list(img)
            return 0
        if args.action == "c":
            return _create(img, args.name)
        if args.action == "a":
            return _apply(img, args.name)
        if args.action == "d":
            return _delete(img, args.name)
        return 0
    finally:
        try:
            img.close()
        except (Qcow2Error, OSError) as e:
            fail(str(e))


def _snapshot_dicts(img: Any) -> list[dict[str, Any]]:
    out = []
    for sn in getattr(img, "snapshots", None) or []:
        clock = sn.vm_clock_nsec
        d: dict[str, Any] = {
            "id": sn.id_str, "name": sn.name, "vm-state-size": sn.effective_vm_state_size,
            "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
            "vm-clock-sec": clock // 1_000_000_000, "vm-clock-nsec": clock % 1_000_000_000,
        }
        if sn.icount is not None and sn.icount != -1:
            d["icount"] = sn.icount
        out.append(d)
    return out


def _list(img: Any) -> None:
    """dump_snapshots(): nothing at all without snapshots (or with a data file, where QEMU's
    list fails)."""
    from .info import snapshot_header, snapshot_line

    if img.format_name != "qcow2" or getattr(img, "has_data_file", False):
        return
    sns = _snapshot_dicts(img)
    if not sns:
        return
    write_out("Snapshot list:\n" + snapshot_header() + "\n"
              + "".join(snapshot_line(d) + "\n" for d in sns))


def _strerror(code: int) -> str:
    return os.strerror(code)


def _create(img: Any, name: str) -> int:
    import errno

    from ..engine.snapshot import SNAPSHOT_NAME_MAX_BYTES, error_code
    from ..errors import Qcow2Error

    if img.format_name != "qcow2":
        code = errno.ENOTSUP
        return fail(f"Could not create snapshot '{name}': -{code} ({_strerror(code)})")
    raw = name.encode("utf-8", "surrogateescape")[:SNAPSHOT_NAME_MAX_BYTES]
    stored = raw.decode("utf-8", "surrogateescape")
    try:
        img.create_snapshot(stored)
    except (Qcow2Error, OSError, ValueError) as e:
        code = error_code(e)
        return fail(f"Could not create snapshot '{name}': -{code} ({_strerror(code)})")
    return 0


def _apply(img: Any, name: str) -> int:
    from ..engine.snapshot import SnapshotError, error_code
    from ..errors import Qcow2Error

    if img.format_name != "qcow2":
        return fail(f"Could not apply snapshot '{name}': Block driver does not support "
                    "snapshots")
    try:
        img.apply_snapshot(name)
    except (Qcow2Error, OSError, ValueError) as e:
        if isinstance(e, SnapshotError):
            for line in e.reports:
                fail(line)
        return fail(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                    f"{_strerror(error_code(e))}")
    return 0


def _delete(img: Any, name: str) -> int:
    from ..engine.snapshot import SnapshotError
    from ..errors import Qcow2Error

    sns = getattr(img, "snapshots", None) or []
    match = None
    if img.format_name == "qcow2" and not getattr(img, "has_data_file", False):
        match = next((s for s in sns if s.name == name), None)
    if match is None:
        return fail(f"Could not delete snapshot '{name}': snapshot not found")
    try:
        img.delete_snapshot(snapshot_id=match.id_str, name=match.name)
    except SnapshotError as e:
        return fail(f"Could not delete snapshot '{name}': {e}")
    except (Qcow2Error, OSError, ValueError) as e:
        from ..engine.snapshot import error_code

        return fail(f"Could not delete snapshot '{name}': Failed to free the cluster and L1 "
                    f"table: {_strerror(error_code(e))}")
    return 0
