"""qemu-img's option strings (QemuOpts) for create, amend, convert and measure: the option
tables of each format, `-o` splitting, and the value parsers (sizes, numbers, bools) with
QEMU's messages. Kept apart from ops/create.py so that commands which only parse options
(amend) do not import the image creation machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import Qcow2Error

INT64_MAX = (1 << 63) - 1
_U64 = 1 << 64
DEFAULT_CLUSTER_SIZE = 65536

Warn = Callable[[str], None]


class CreateError(Qcow2Error, ValueError):
    """Image creation refused, with qemu-img's message and hint (text printed after the message
    line exactly as qemu-img prints it, including its final newline or lack of one).

    `prefixed` tells whether qemu-img puts the image name before the message
    (`qemu-img: FILE: msg`): every error of bdrv_img_create() and the drivers is.
    """

    def __init__(self, message: str, hint: str = "", prefixed: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.prefixed = prefixed


# --------------------------------------------------------------------------- option lists
# The create options of each format in QEMU's order (the format's create_opts followed by the
# file protocol's, duplicates dropped): "Formatting" prints them in this order. Each entry is
# (name, type, default printed when unset, help text).
_OptDesc = tuple[str, str, str | None, str]

_CRYPTO_QCOW2: tuple[_OptDesc, ...] = (
    ("encryption", "bool", None,
     "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    ("encrypt.format", "str", None, "Encrypt the image, format choices: 'aes', 'luks'"),
    ("encrypt.key-secret", "str", None, "ID of secret providing qcow AES key or LUKS passphrase"),
    ("encrypt.cipher-alg", "str", None, "Name of encryption cipher algorithm"),
    ("encrypt.cipher-mode", "str", None, "Name of encryption cipher mode"),
    ("encrypt.ivgen-alg", "str", None, "Name of IV generator algorithm"),
    ("encrypt.ivgen-hash-alg", "str", None, "Name of IV generator hash algorithm"),
    ("encrypt.hash-alg", "str", None, "Name of encryption hash algorithm"),
    ("encrypt.iter-time", "num", None, "Time to spend in PBKDF in milliseconds"),
)
_FILE_OPTS: tuple[_OptDesc, ...] = (
    ("size", "size", None, "Virtual disk size"),
    ("preallocation", "str", None, "Preallocation mode (allowed values: off, falloc, full)"),
    ("nocow", "bool", None, "Turn off copy-on-write (valid only on btrfs)"),
    ("extent_size_hint", "size", None, "Extent size hint for the image file, 0 to disable"),
)
_QCOW2_OPTS: tuple[_OptDesc, ...] = (
    *_CRYPTO_QCOW2,
    ("cluster_size", "size", str(DEFAULT_CLUSTER_SIZE), "qcow2 cluster size"),
    ("extended_l2", "bool", "off", "Extended L2 tables"),
    ("preallocation", "str", None, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    ("compression_type", "str", "zlib", "Compression method used for image cluster compression"),
    ("size", "size", None, "Virtual disk size"),
    ("compat", "str", None, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("backing_file", "str", None, "File name of a base image"),
    ("backing_fmt", "str", None, "Image format of the base image"),
    ("data_file", "str", None, "File name of an external data file"),
    ("data_file_raw", "bool", None, "The external data file must stay valid as a raw image"),
    ("lazy_refcounts", "bool", "off", "Postpone refcount updates"),
    ("refcount_bits", "num", "16", "Width of a reference count entry in bits"),
)
_QCOW_OPTS: tuple[_OptDesc, ...] = (
    ("size", "size", None, "Virtual disk size"),
    ("backing_file", "str", None, "File name of a base image"),
    ("backing_fmt", "str", None, "Format of the backing image"),
    ("encryption", "bool", None,
     "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    ("encrypt.format", "str", None, "Encrypt the image, format choices: 'aes'"),
    ("encrypt.key-secret", "str", None, "ID of the secret that provides the AES encryption key"),
)
_RAW_OPTS: tuple[_OptDesc, ...] = (("size", "size", None, "Virtual disk size"),)


def _merged(*lists: tuple[_OptDesc, ...]) -> tuple[_OptDesc, ...]:
    """qemu_opts_append(): later lists add only the names not seen yet."""
    seen: set[str] = set()
    out: list[_OptDesc] = []
    for lst in lists:
        for d in lst:
            if d[0] not in seen:
                seen.add(d[0])
                out.append(d)
    return tuple(out)


_FORMAT_OPTS: dict[str, tuple[_OptDesc, ...]] = {
    "qcow2": _QCOW2_OPTS, "qcow": _QCOW_OPTS, "raw": _RAW_OPTS}
_ALL_OPTS: dict[str, tuple[_OptDesc, ...]] = {
    fmt: _merged(opts, _FILE_OPTS) for fmt, opts in _FORMAT_OPTS.items()}

# QAPI BlockdevDriver in QEMU 7.2 (Debian build): the values `backing_fmt` accepts.
BLOCKDEV_DRIVERS = frozenset((
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "io_uring", "iscsi", "luks", "nbd",
    "nfs", "null-aio", "null-co", "nvme", "nvme-io_uring", "parallels", "preallocate", "qcow",
    "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx",
    "virtio-blk-vfio-pci", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa", "vmdk", "vpc",
    "vvfat"))
PREALLOC_MODES = ("off", "metadata", "falloc", "full")


# --------------------------------------------------------------------------- value parsing
def _strtou64(s: str, pos: int, base: int) -> tuple[int, int, bool]:
    """C strtoull() from `pos`: (value, end, overflowed). end == pos when there are no digits."""
    i, n = pos, len(s)
    while i < n and s[i] in " \t\n\v\f\r":
        i += 1
    neg = False
    if i < n and s[i] in "+-":
        neg = s[i] == "-"
        i += 1
    if base in (0, 16) and s[i:i + 2].lower() == "0x" and i + 2 < n and \
            s[i + 2] in "0123456789abcdefABCDEF":
        i += 2
        base = 16
    elif base == 0:
        base = 8 if s[i:i + 1] == "0" else 10
    digits = "0123456789abcdefABCDEF"[:base + (6 if base == 16 else 0)]
    j = i
    while j < n and s[j] in digits:
        j += 1
    if j == i:
        return 0, pos, False
    val = int(s[i:j], base)
    if val >= _U64:
        return _U64 - 1, j, True
    return (-val % _U64 if neg else val), j, False


def parse_size(text: str, warn: Warn | None = None) -> int:
    """qemu_strtosz() of QEMU 7.2 (util/cutils.c): decimal with an optional fraction (which
    then needs a suffix), or hex; suffixes B K M G T P E, powers of 1024. Raises ValueError
    (invalid) or OverflowError (not below 2^64).

    The CLI has the same parser; ops/ keeps its own so that it does not import from cli/.
    """
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
        j = end + 1
        while j < len(text) and text[j].isdigit():
            j += 1
        if j == end + 1:
            end += 1  # "1.k": no fraction digits, QEMU skips the '.'
        else:
            if text[j:j + 1] in ("e", "E") and text[j + 1:j + 2].lstrip("+-")[:1].isdigit():
                raise ValueError(text)  # strtod would read an exponent: refused
            frac = float(text[end:j])
            end = j
    valf = int(frac * 2.0 ** 64)
    c = text[end:end + 1].upper()
    exp = "BKMGTPE".find(c) if c else -1
    if exp >= 0:
        mul = 1 << (10 * exp)
        if hexa and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        end += 1
    else:
        mul = 1
    if end != len(text):
        raise ValueError(text)
    if mul == 1:
        if valf:
            raise ValueError(text)
        return val
    # 64.64 fixed point times the scale, rounding 0.5 up, as QEMU does.
    prod = val * mul + ((valf * mul) >> 64) + (((valf * mul) >> 63) & 1)
    if prod >= _U64:
        raise OverflowError(text)
    return prod


_BOOL_TRUE = ("on", "yes", "true", "y")
_BOOL_FALSE = ("off", "no", "false", "n")


def _parse_bool(name: str, value: str) -> bool:
    """qapi_bool_parse()."""
    if value in _BOOL_TRUE:
        return True
    if value in _BOOL_FALSE:
        return False
    raise CreateError(f"Parameter '{name}' expects 'on' or 'off'")


def _opt_size(name: str, value: str, warn: Warn | None) -> int:
    try:
        return parse_size(value, warn)
    except OverflowError:
        raise CreateError(f"Value '{value}' is out of range for parameter '{name}'") from None
    except ValueError:
        raise CreateError(
            f"Parameter '{name}' expects a non-negative number below 2^64",
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.\n") from None


def _opt_number(name: str, value: str) -> int:
    """parse_option_number(): strtoull with base 0 (so "010" is 8 and "0x10" is 16)."""
    val, end, overflow = _strtou64(value, 0, 0)
    if end == 0 or end != len(value):
        raise CreateError(f"Parameter '{name}' expects a number")
    if overflow:
        raise CreateError(f"Value '{value}' is too large for parameter '{name}'")
    return val


def _split_opts(text: str) -> Iterator[tuple[str, str]]:
    """QemuOpts syntax: `name=value` items separated by ',', ',,' is a literal comma; a bare
    `name` means name=on and `noname` name=off."""
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        if j < n and text[j] == "=":
            name = text[i:j]
            k = j + 1
            buf: list[str] = []
            while k < n:
                if text[k] == ",":
                    if text[k + 1:k + 2] == ",":
                        buf.append(",")
                        k += 2
                        continue
                    break
                buf.append(text[k])
                k += 1
            yield name, "".join(buf)
            i = k + 1
        else:
            name = text[i:j]
            if name.startswith("no"):
                yield name[2:], "off"
            else:
                yield name, "on"
            i = j + 1


def has_help_option(text: str) -> bool:
    """has_help_option(): any whole item (commas unescaped) equal to "help" or "?"."""
    items: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                buf.append(",")
                i += 2
                continue
            items.append("".join(buf))
            buf = []
        else:
            buf.append(text[i])
        i += 1
    items.append("".join(buf))
    return any(it in ("help", "?") for it in items)


def is_valid_option_list(text: str) -> bool:
    """qemu-img's check of one -o argument: not empty, no leading comma, no unpaired trailing one."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0
