"""`qcow2 dd`: qemu-img 7.2's dd.

    qcow2 dd [-U] [-f fmt] [-O output_fmt] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS]
             if=INPUT of=OUTPUT

Like img_dd() in qemu-img.c: the output is (re)created with the input's size (or count*bs,
minus skip*bs) in the -O format (raw by default), then written block by block, zeros
included, so a qcow/qcow2 output comes out fully allocated. Messages and exit statuses are
qemu-img's, including its quirks: with count and skip, count limits the input end (so only
count-skip blocks are copied), and skipping past the end only warns and leaves an empty output.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..errors import CorruptImageError, Qcow2Error
from .common import INT64_MAX, cvtnum, fail, open_failure, os_reason
from .main import PROG, UsageError

if TYPE_CHECKING:
    from ..engine.device import BlockDevice

INT_MAX = (1 << 31) - 1
_TRY = f"Try '{PROG} --help' for more information"
OUTPUT_FORMATS = ("raw", "qcow2", "qcow")
# qemu-img 7.2 format drivers we cannot write yet, and those that cannot create images at all.
_CREATABLE_ELSEWHERE = ("qed", "vdi", "vhdx", "vmdk", "vpc", "parallels", "luks")
_NO_CREATE = ("bochs", "cloop", "dmg", "vvfat", "blkdebug", "blklogwrites", "blkverify",
              "compress", "copy-before-write", "copy-on-read", "null-aio", "null-co",
              "preallocate", "quorum", "replication", "snapshot-access", "throttle")
# getopt_long(":hf:O:U") plus the long options of img_dd(); True: takes an argument.
_LONG_OPTS = {"help": False, "object": True, "image-opts": False, "force-share": False}

USAGE = f"""usage: {PROG} dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size]
          [count=blocks] [skip=blocks] if=input of=output

Copy input to output, converting formats. The output is created (or truncated) with the
input's size, or count*bs if smaller, minus skip*bs, and is written in full.

  -f fmt         input format (probed if absent)
  -O output_fmt  output format: raw (default), qcow2 or qcow
  -U             open the input with force-share (always the case here)
  bs=N           block size in bytes (default 512; k, M, G suffixes)
  count=N        copy only N input blocks
  skip=N         skip N input blocks
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # dd's operands (bs=..., if=...) and getopt's rules (options anywhere, clusters such as
    # -Uf, `--` ends options, long-option prefixes) are parsed by hand, with qemu-img's
    # messages for bad options.
    setattr(parser, "parse_args", _getopt)  # noqa: B010


def _unrecognized(token: str) -> UsageError:
    return UsageError(f"unrecognized option '{token}'\n{_TRY}")


def _missing(token: str) -> UsageError:
    return UsageError(f"missing argument for option '{token}'\n{_TRY}")


def _getopt(argv: list[str] | None = None) -> argparse.Namespace:
    args = list(argv or [])
    ns = argparse.Namespace(fmt=None, out_fmt="raw", force_share=False, image_opts=False,
                            objects=[], help=False, operands=[])
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            ns.operands += args[i:]
            break
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            keys = [name] if name in _LONG_OPTS else [k for k in _LONG_OPTS if k.startswith(name)]
            if len(keys) != 1 or not name:
                raise _unrecognized(a)
            key = keys[0]
            if _LONG_OPTS[key]:
                if not eq:
                    if i >= len(args):
                        raise _missing(a)
                    val = args[i]
                    i += 1
            elif eq:
                raise _unrecognized(a)
            if key == "help":
                ns.help = True
                return ns
            if key == "object":
                ns.objects.append(val)
            elif key == "image-opts":
                ns.image_opts = True
            else:
                ns.force_share = True
            continue
        if not a.startswith("-") or a == "-":
            ns.operands.append(a)
            continue
        j = 1
        while j < len(a):
            ch = a[j]
            j += 1
            if ch in "fO":
                val = a[j:]
                if not val:
                    if i >= len(args):
                        raise _missing(a)
                    val = args[i]
                    i += 1
                if ch == "f":
                    ns.fmt = val
                else:
                    ns.out_fmt = val
                break
            if ch == "h":
                ns.help = True
                return ns
            if ch == "U":
                ns.force_share = True
                continue
            raise _unrecognized(a)
    return ns


class _Operands:
    def __init__(self) -> None:
        self.bs = 512
        self.count: int | None = None
        self.skip: int | None = None
        self.infile: str | None = None
        self.outfile: str | None = None


def _parse_operands(operands: list[str]) -> _Operands:
    """img_dd()'s operand loop: in order, the first bad one stops everything."""
    o = _Operands()
    for text in operands:
        name, eq, value = text.partition("=")
        if not eq or name not in ("bs", "count", "if", "of", "skip"):
            raise UsageError(f"unrecognized operand {name}")
        if name == "bs":
            o.bs = cvtnum("bs", value, 1, INT_MAX)
        elif name == "count":
            o.count = cvtnum("count", value)
        elif name == "skip":
            o.skip = cvtnum("skip", value)
        elif name == "if":
            o.infile = value
        else:
            o.outfile = value
    return o


def _io_reason(e: BaseException) -> str:
    """strerror of the failed request; a driver-level failure is EIO in QEMU."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return "Input/output error"


def run(args: argparse.Namespace) -> int:
    if args.help:
        sys.stdout.write(USAGE)
        return 0
    o = _parse_operands(args.operands)
    if o.infile is None or o.outfile is None:
        return fail("Must specify both input and output files")
    if args.image_opts:
        return fail("dd option --image-opts is not supported yet")
    # --object definitions (secrets) are accepted and unused: no format here is encrypted.
    if not o.infile:
        # QEMU's file protocol refuses an empty name before trying to open it.
        return fail("Could not open '': The 'file' block driver requires a file name")
    import qcow2

    try:
        src = qcow2.open(o.infile, args.fmt, backing_policy="follow")
    except (Qcow2Error, OSError) as e:
        return fail(open_failure(o.infile, e))
    try:
        return _copy(src, o, args.out_fmt)
    finally:
        src.close()


def _copy(src: BlockDevice, o: _Operands, out_fmt: str) -> int:
    import qcow2

    from ..ops.create import CreateError

    assert o.infile is not None and o.outfile is not None
    if out_fmt not in OUTPUT_FORMATS:
        if out_fmt in _CREATABLE_ELSEWHERE:
            return fail(f"dd -O {out_fmt} is not supported (output formats: raw, qcow2, qcow)")
        if out_fmt in _NO_CREATE:
            return fail(f"Format driver '{out_fmt}' does not support image creation")
        return fail("Unknown file format")
    bs = o.bs
    size = src.virtual_size
    if o.count is not None and o.count <= INT64_MAX // bs and o.count * bs < size:
        size = o.count * bs
    # Skipping past the end makes an empty output (after a warning), as dd(1) does.
    skip_past_end = o.skip is not None and (o.skip > INT64_MAX // bs or size < o.skip * bs)
    out_size = 0 if skip_past_end else size - bs * (o.skip or 0)
    try:
        qcow2.create(o.outfile, out_size, out_fmt)
    except CreateError as e:
        return fail(f"{o.outfile}: error while creating output image: {e.message}")
    except OSError as e:
        return fail(f"{o.outfile}: error while creating output image: {os_reason(e)}")
    try:
        writer = _open_output(o.outfile, out_fmt)
    except (Qcow2Error, OSError) as e:
        return fail(open_failure(o.outfile, e))
    try:
        if skip_past_end:
            fail(f"{o.infile}: cannot skip to specified offset")
            in_pos = size
        else:
            in_pos = (o.skip or 0) * bs
        rc = _transfer(src, writer, in_pos, size, bs)
    except BaseException:
        try:
            writer.close()
        except (Qcow2Error, OSError):
            pass
        raise
    try:
        writer.close()
    except (Qcow2Error, OSError) as e:
        if rc == 0:
            return fail(f"error while writing to output image file: {_io_reason(e)}")
    return rc


def _transfer(src: BlockDevice, writer: _RawOutput | BlockDevice, in_pos: int, size: int,
              bs: int) -> int:
    """img_dd()'s copy loop: read a block, write it, stop at the first error."""
    out_pos = 0
    while in_pos < size:
        n = min(bs, size - in_pos)
        try:
            data = src.read(in_pos, n)
        except (Qcow2Error, OSError) as e:
            if isinstance(e, CorruptImageError) and e.fatal:
                fail(f"qcow2: Image is corrupt: {e}; further non-fatal corruption events "
                     "will be suppressed")
            return fail(f"error while reading from input image file: {_io_reason(e)}")
        in_pos += n
        try:
            writer.write(out_pos, data)
        except (Qcow2Error, OSError) as e:
            return fail(f"error while writing to output image file: {_io_reason(e)}")
        out_pos += n
    return 0


class _RawOutput:
    """A raw output file: guest offset == file offset. Closing flushes, as QEMU's close does
    for the default writeback cache."""

    def __init__(self, path: str) -> None:
        from ..io import FileStore

        self.store = FileStore(path, writable=True)

    def write(self, offset: int, data: bytes) -> None:
        self.store.pwrite(offset, data)

    def close(self) -> None:
        try:
            self.store.flush()
        finally:
            self.store.close()


def _open_output(path: str, out_fmt: str) -> _RawOutput | BlockDevice:
    import qcow2

    from ..engine.open import open_file

    if out_fmt == "raw":
        open_file(path).close()  # QEMU's checks on what the file is (regular file or device)
        return _RawOutput(path)
    return qcow2.open(path, out_fmt, readonly=False, backing_policy="follow")

