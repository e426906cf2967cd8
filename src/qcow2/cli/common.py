"""Helpers shared by the subcommands: qemu's size parsing and printing, QEMU-style JSON, errors.

Output must match qemu-img 7.2 byte for byte, so the rules below follow QEMU's C code:
`qemu_strtosz()` and `size_to_str()` (util/cutils.c), the QDict hash order and the pretty
JSON writer (qobject/qdict.c, qobject/json-writer.c), and the human dump of QAPI objects
(block/qapi.c).
"""

from __future__ import annotations

import errno
import math
import os
import sys
from collections.abc import Iterable
from typing import Any

from .main import PROG, UsageError

INT64_MAX = (1 << 63) - 1
_U64 = 1 << 64


# --------------------------------------------------------------------------- sizes
def _suffix_mul(c: str, unit: int = 1024) -> int:
    exp = "BKMGTPE".find(c.upper()) if c else -1
    return unit ** exp if exp >= 0 else -1


def _strtou64(s: str, pos: int, base: int) -> tuple[int, int, bool]:
    """C strtoull() from `pos`: (value, end position, overflowed); end == pos if no digits."""
    i = pos
    n = len(s)
    while i < n and s[i] in " \t\n\v\f\r":
        i += 1
    neg = False
    if i < n and s[i] in "+-":
        neg = s[i] == "-"
        i += 1
    if base == 16 and s[i:i + 2].lower() == "0x" and i + 2 < n and \
            s[i + 2] in "0123456789abcdefABCDEF":
        i += 2
    digits = "0123456789" if base == 10 else "0123456789abcdefABCDEF"
    j = i
    while j < n and s[j] in digits:
        j += 1
    if j == i:
        return 0, pos, False
    val = int(s[i:j], base)
    if val >= _U64:
        return _U64 - 1, j, True
    return (-val % _U64 if neg else val), j, False


def qemu_strtosz(text: str) -> int:
    """QEMU 7.2's qemu_strtosz(): decimal (fractions need a suffix) or hex, suffixes B K M G T
    P E (powers of 1024). Raises ValueError (invalid) or OverflowError (out of range)."""
    val, end, overflow = _strtou64(text, 0, 10)
    if end == 0:
        raise ValueError(text)
    if overflow:
        raise OverflowError(text)
    if "-" in text[:end]:
        raise ValueError(text)
    frac = 0.0
    hexa = False
    if val == 0 and text[end:end + 1] in ("x", "X"):
        val, end, overflow = _strtou64(text, 0, 16)
        if overflow:
            raise OverflowError(text)
        if text[end:end + 1] == ".":
            raise ValueError(text)
        hexa = True
    elif text[end:end + 1] == ".":
        f_end = _strtod_end(text, end)
        if f_end <= end:
            end += 1  # "1.k": no fraction digits, the '.' is just skipped
        else:
            part = text[end:f_end]
            if "e" in part.lower():
                raise ValueError(text)
            frac = float(part)
            end = f_end
    valf = int(frac * 2.0 ** 64)
    mul = _suffix_mul(text[end:end + 1])
    if mul > 0:
        if hexa:
            fail(f"warning: Using a multiplier suffix on hex numbers is deprecated: {text}")
        end += 1
    else:
        mul = 1
    if end != len(text):
        raise ValueError(text)
    if mul == 1:
        if valf:
            raise ValueError(text)
        return val
    prod = val * mul + ((valf * mul) >> 64) + (((valf * mul) >> 63) & 1)
    if prod >= _U64:
        raise OverflowError(text)
    return prod


def _strtod_end(s: str, pos: int) -> int:
    """End of the decimal floating-point number strtod() would parse at `pos` (pos if none)."""
    i = pos
    n = len(s)
    j = i
    while j < n and s[j].isdigit():
        j += 1
    if j < n and s[j] == ".":
        j += 1
        while j < n and s[j].isdigit():
            j += 1
    if not any(c.isdigit() for c in s[i:j]):
        return pos
    if j < n and s[j] in "eE":
        k = j + 1
        if k < n and s[k] in "+-":
            k += 1
        if k < n and s[k].isdigit():
            while k < n and s[k].isdigit():
                k += 1
            j = k
    return j


def cvtnum(name: str, value: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """qemu-img's cvtnum_full(): a size option with QEMU's two error messages."""
    try:
        res = qemu_strtosz(value)
    except OverflowError:
        res = -1
    except ValueError:
        raise UsageError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n"
            f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if res < minimum or res > maximum:
        raise UsageError(f"Invalid {name} specified. Must be between {minimum} and {maximum}.")
    return res


def size_to_str(val: int) -> str:
    """QEMU's size_to_str(): "388 KiB", "64 MiB", "1.5 GiB", "0 B"."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    # frexp(val / (1000/1024)) exponent, minus one, divided by ten: switch units at >= 1000.
    x = val / (1000.0 / 1024.0)
    e = math.frexp(x)[1]
    i = (e - 1) // 10 if e > 0 else 0
    i = min(i, len(suffixes) - 1)
    return "%0.3g %sB" % (val / float(1 << (i * 10)), suffixes[i])  # noqa: UP031


# --------------------------------------------------------------------------- QDict / JSON
def _tdb_hash(key: bytes) -> int:
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, c in enumerate(key):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: Iterable[str]) -> list[str]:
    """The iteration order of a QEMU QDict whose keys were inserted in `keys` order.

    QDict has 512 hash buckets walked in index order; each bucket is a list with the newest
    entry first.
    """
    ks = list(keys)
    pos = {k: i for i, k in enumerate(ks)}
    return sorted(ks, key=lambda k: (_tdb_hash(k.encode("utf-8", "surrogateescape")) % 512,
                                     -pos[k]))


def json_quote(s: str) -> str:
    """A JSON string as QEMU's json-writer quotes it: \\uXXXX for everything outside ASCII."""
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append("\\uFFFD")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json_pretty(obj: Any) -> str:
    """qobject_to_json_pretty(): 4-space indent, dict keys in QDict order, `[\\n    ]` if empty."""
    parts: list[str] = []
    _json(obj, 0, parts)
    return "".join(parts)


def _json(obj: Any, depth: int, out: list[str]) -> None:
    if isinstance(obj, bool):
        out.append("true" if obj else "false")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, str):
        out.append(json_quote(obj))
    elif isinstance(obj, dict):
        out.append("{")
        first = True
        for k in qdict_order(obj):
            out.append("\n" if first else ",\n")
            first = False
            out.append("    " * (depth + 1) + json_quote(k) + ": ")
            _json(obj[k], depth + 1, out)
        out.append("\n" + "    " * depth + "}")
    elif isinstance(obj, list):
        out.append("[")
        first = True
        for v in obj:
            out.append("\n" if first else ",\n")
            first = False
            out.append("    " * (depth + 1))
            _json(v, depth + 1, out)
        out.append("\n" + "    " * depth + "]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__}")


def dump_qobject(indent: int, obj: Any, out: list[str]) -> None:
    """block/qapi.c dump_qobject(): the human form of format-specific information."""
    if isinstance(obj, bool):
        out.append("true" if obj else "false")
    elif isinstance(obj, int | str):
        out.append(str(obj))
    elif isinstance(obj, dict):
        for k in qdict_order(obj):
            v = obj[k]
            composite = isinstance(v, dict | list)
            out.append(" " * (indent * 4) + k.replace("-", " ") + (":\n" if composite else ": "))
            dump_qobject(indent + 1, v, out)
            if not composite:
                out.append("\n")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            composite = isinstance(v, dict | list)
            out.append(" " * (indent * 4) + f"[{i}]:" + ("\n" if composite else " "))
            dump_qobject(indent + 1, v, out)
            if not composite:
                out.append("\n")
    else:
        raise TypeError(f"cannot dump {type(obj).__name__}")


# --------------------------------------------------------------------------- output & errors
def _write(stream: Any, text: str) -> None:
    # Names from argv or from an image may hold bytes that are not UTF-8 (surrogate escapes):
    # they go out as the original bytes, as qemu-img prints them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        buf = getattr(stream, "buffer", None)
        if buf is not None:
            stream.flush()
            buf.write(text.encode("utf-8", "surrogateescape"))
            buf.flush()
            return
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    stream.write(text)


def write_out(text: str) -> None:
    """Write to stdout."""
    _write(sys.stdout, text)


def fail(message: str) -> int:
    """Print `qcow2: message` on stderr; qemu-img's exit status for a failed command."""
    _write(sys.stderr, f"{PROG}: {message}\n")
    return 1


def os_reason(exc: OSError) -> str:
    return exc.strerror or os.strerror(exc.errno or errno.EIO)


def open_failure(filename: str, exc: BaseException) -> str:
    """The text qemu-img prints when an image cannot be opened: `Could not open 'F': reason`."""
    if isinstance(exc, OSError):
        # The file protocol adds its own "Could not open" for errors of open(2).
        if exc.filename is not None:
            return f"Could not open '{filename}': Could not open '{exc.filename}': " \
                   f"{os_reason(exc)}"
        return f"Could not open '{filename}': {os_reason(exc)}"
    return f"Could not open '{filename}': {exc}"


def report_dirty_repair(img: object) -> None:
    """QEMU repairs a dirty (lazy refcounts) image when it opens it read-write and prints
    the check's diagnostics on stderr as it goes: print ours the same way."""
    res = getattr(img, "repair_result", None)
    if res is None:
        return
    for m in res.messages:
        sys.stderr.write(f"{PROG}: {m.text}\n" if m.reported else f"{m.text}\n")
