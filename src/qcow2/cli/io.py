"""`qcow2 io`: run qemu-io style commands (-c CMD ...) against one image, with qemu-io's
output lines and exit status, so scripts written for qemu-io run unchanged (write -c writes
compressed clusters)."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from ..errors import OutOfRangeError, Qcow2Error
from .common import dump_qobject, fail, open_failure

INT_MAX_LEN = 2147483136  # BDRV_REQUEST_MAX_BYTES: qemu-io refuses longer requests without -n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--format", dest="fmt")
    p.add_argument("-r", "--read-only", action="store_true")
    p.add_argument("-c", "--cmd", action="append", default=[])
    p.add_argument("-U", "--force-share", action="store_true")
    p.add_argument("filename")


def cvtstr(value: float) -> str:
    """qemu-io's cvtstr(): three decimals, '.000' dropped, binary units."""
    suffix = " bytes"
    for name, scale in ((" EiB", 1 << 60), (" PiB", 1 << 50), (" TiB", 1 << 40),
                        (" GiB", 1 << 30), (" MiB", 1 << 20), (" KiB", 1 << 10)):
        if value >= scale:
            value /= scale
            suffix = name
            break
    text = f"{value:.3f}"
    return text[:-4] + suffix if text.endswith(".000") else text + suffix


def _timestr(secs: float) -> str:
    if secs >= 3600:
        h, rem = divmod(secs, 3600)
        return f"{int(h)}:{int(rem // 60):02d}:{rem % 60:05.2f}"
    if secs >= 60:
        return f"{int(secs // 60):02d}:{secs % 60:05.2f}"
    return f"{secs:05.2f} sec"


def _report(verb: str, done: int, total: int, offset: int, secs: float, quiet: bool) -> None:
    if quiet:
        return
    secs = max(secs, 1e-6)
    sys.stdout.write(f"{verb} {done}/{total} bytes at offset {offset}\n")
    sys.stdout.write(f"{cvtstr(total)}, 1 ops; {_timestr(secs)} "
                     f"({cvtstr(total / secs)}/sec and {1 / secs:.4f} ops/sec)\n")


def _num(text: str) -> int:
    from .common import qemu_strtosz

    return qemu_strtosz(text)


class _CmdError(Exception):
    pass


def _opts(args: list[str], flags: str, with_value: str = "") -> tuple[dict[str, Any], list[str]]:
    """getopt-style parsing of a qemu-io command's arguments."""
    got: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1 and not a[1].isdigit():
            for j, ch in enumerate(a[1:]):
                if ch in with_value:
                    val = a[j + 2:] or (args[i + 1] if i + 1 < len(args) else None)
                    if val is None:
                        raise _CmdError(f"option requires an argument -- '{ch}'")
                    if not a[j + 2:]:
                        i += 1
                    got[ch] = val
                    break
                if ch not in flags:
                    raise _CmdError(f"invalid option -- '{ch}'")
                got[ch] = True
        else:
            rest.append(a)
        i += 1
    return got, rest


def _offlen(rest: list[str]) -> tuple[int, int]:
    if len(rest) != 2:
        raise _CmdError("bad number of arguments")
    off = _num(rest[0])
    length = _num(rest[1])
    if length > INT_MAX_LEN:
        raise _CmdError(f"length cannot exceed {INT_MAX_LEN} without -n, given {length}")
    return off, length


def _hexdump(data: bytes, offset: int) -> None:
    for pos in range(0, len(data), 16):
        chunk = data[pos:pos + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        # qemu-io prints only isalnum() characters
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in chunk)
        sys.stdout.write(f"{offset + pos:08x}:  {hexpart}  {text}\n")


def run(args: argparse.Namespace) -> int:
    import qcow2

    try:
        img: Any = qcow2.open(args.filename, args.fmt, readonly=args.read_only,
                              backing_policy="follow")
    except (Qcow2Error, OSError) as e:
        sys.stderr.write(f"qemu-io: can't open device {args.filename}: "
                         f"{open_failure(args.filename, e).split(': ', 1)[1]}\n")
        return 1
    failed = False
    try:
        for line in args.cmd:
            try:
                words = shlex.split(line)
            except ValueError as e:
                fail(str(e))
                failed = True
                continue
            if not words:
                continue
            handler = COMMANDS.get(words[0])
            if handler is None:
                sys.stdout.write(f'command "{words[0]}" not found\n')
                failed = True
                continue
            try:
                if handler(img, words[1:], args) is False:
                    failed = True
            except _CmdError as e:
                sys.stdout.write(f"{words[0]}: {e}\n")
                failed = True
            except (Qcow2Error, OSError) as e:
                # qemu-io prints strerror() of the failed request; the block layer fails a
                # request past the end of the image with EIO
                if isinstance(e, OSError) and e.strerror:
                    msg = e.strerror
                elif isinstance(e, OutOfRangeError):
                    msg = os.strerror(errno.EIO)
                else:
                    msg = str(e)
                sys.stdout.write(f"{words[0]} failed: {msg}\n")
                failed = True
        sys.stdout.flush()
    finally:
        try:
            img.close()
        except (Qcow2Error, OSError) as e:
            fail(str(e))
            failed = True
    return 1 if failed else 0


def _writable(img: Any, args: argparse.Namespace) -> bool:
    if args.read_only or img.readonly:
        sys.stderr.write("qemu-io: Block node is read-only\n")
        return False
    return True


def cmd_read(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    o, rest = _opts(argv, "vqC", "Ps")
    off, length = _offlen(rest)
    t0 = time.perf_counter()
    data = img.read(off, length)
    secs = time.perf_counter() - t0
    ok = True
    if "P" in o:
        pat = int(o["P"], 0) & 0xFF
        if data != bytes([pat]) * length:
            sys.stdout.write(f"Pattern verification failed at offset {off}, {length} bytes\n")
            ok = False
    if o.get("v"):
        _hexdump(data, off)
    _report("read", length, length, off, secs, bool(o.get("q")))
    return ok


def cmd_write(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    o, rest = _opts(argv, "zuqcfnC", "Ps")
    off, length = _offlen(rest)
    if o.get("f") and o.get("c"):
        sys.stdout.write("-f and -b or -c cannot be specified at the same time\n")
        return False
    if not _writable(img, args):
        return False
    t0 = time.perf_counter()
    if o.get("z"):
        img.write_zeroes(off, length, unmap=bool(o.get("u")))
    elif o.get("c"):
        write_compressed = getattr(img, "write_compressed", None)
        if write_compressed is None:
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        write_compressed(off, _write_buffer(o, length))
    else:
        img.write(off, _write_buffer(o, length))
    _report("wrote", length, length, off, time.perf_counter() - t0, bool(o.get("q")))
    return True


def _write_buffer(o: dict[str, str], length: int) -> bytes:
    """-s FILE: the file's bytes, repeated to fill the request (qemu_io_alloc_from_file);
    else -P's pattern byte (0xcd by default)."""
    src = o.get("s")
    if src is not None:
        with open(src, "rb") as f:
            data = f.read(length)
        if not data:
            raise OSError(errno.EIO, f"failed to read {src}")
        return (data * -(-length // len(data)))[:length]
    return bytes([int(o.get("P", "0xcd"), 0) & 0xFF]) * length


def cmd_discard(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    o, rest = _opts(argv, "q")
    off, length = _offlen(rest)
    if not _writable(img, args):
        return False
    t0 = time.perf_counter()
    img.discard(off, length)
    _report("discard", length, length, off, time.perf_counter() - t0, bool(o.get("q")))
    return True


def cmd_flush(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    if not img.readonly:
        img.flush()
    return True


def cmd_alloc(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    _, rest = _opts(argv, "")
    off = _num(rest[0])
    length = _num(rest[1]) if len(rest) > 1 else 512
    allocated = sum(r.length for r in img.layer_status(off, length) if r.status & 3)
    sys.stdout.write(f"{allocated}/{length} bytes allocated at offset {cvtstr(off)}\n")
    return True


def cmd_map(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    # qemu-io's map reports allocation anywhere in the chain (bdrv_is_allocated_above).
    runs: list[list[int]] = []
    for e in img.extents():
        alloc = int(e.present)
        if runs and runs[-1][2] == alloc:
            runs[-1][1] += e.length
        else:
            runs.append([e.start, e.length, alloc])
    for start, length, alloc in runs:
        sys.stdout.write(f"{cvtstr(length)} ({length:#x}) bytes "
                         f"{'   ' if alloc else 'not'} allocated at offset "
                         f"{cvtstr(start)} ({start:#x})\n")
    return True


def cmd_truncate(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    _, rest = _opts(argv, "")
    if len(rest) != 1:
        raise _CmdError("bad number of arguments")
    if not _writable(img, args):
        return False
    resize = getattr(img, "resize", None)
    if resize is None:
        raise _CmdError("Image format driver does not support resize")
    resize(_num(rest[0]))
    return True


def cmd_length(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    sys.stdout.write(cvtstr(img.virtual_size) + "\n")
    return True


def cmd_info(img: Any, argv: list[str], args: argparse.Namespace) -> bool:
    sys.stdout.write(f"format name: {img.format_name}\n")
    cs = getattr(img, "cluster_size", None)
    if cs and img.format_name == "qcow2":
        sys.stdout.write(f"cluster size: {cvtstr(cs)}\n")
        vm_state = img.l2_entries * cs * -(-img.virtual_size // (img.l2_entries * cs))
        sys.stdout.write(f"vm state offset: {cvtstr(vm_state)}\n")
        from ..ops.info import _qcow2_specific

        out: list[str] = ["Format specific information:\n"]
        dump_qobject(1, _qcow2_specific(img), out)
        sys.stdout.write("".join(out))
    return True


COMMANDS: dict[str, Callable[[Any, list[str], argparse.Namespace], bool]] = {
    "read": cmd_read,
    "write": cmd_write,
    "discard": cmd_discard,
    "flush": cmd_flush,
    "alloc": cmd_alloc,
    "map": cmd_map,
    "length": cmd_length,
    "truncate": cmd_truncate,
    "info": cmd_info,
}
