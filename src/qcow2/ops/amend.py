"""`qemu-img amend` as an operation: the amend option list (parse, help), and amend(path).

Parsing follows img_amend(): the `-o` string is parsed against the driver's amend options;
if that fails and the create options would have taken it, qemu-img adds the hint "This
option is only supported for image creation". The work itself is engine/amend.py.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..engine.amend import AmendError, AmendOptions, StatusCallback, options_from_kwargs
from ..engine.amend import amend as engine_amend
from .qemu_opts import (
    _FORMAT_OPTS,
    CreateError,
    _opt_number,
    _opt_size,
    _OptDesc,
    _parse_bool,
    _split_opts,
)

if TYPE_CHECKING:
    from ..engine.open import Policy

__all__ = ["AmendError", "AmendOptions", "amend", "amend_image", "amend_option_help",
           "parse_amend_options"]

# qcow2's amend_opts in QEMU 7.2, in its order (the LUKS options, then the common ones).
_COMMON = ("size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
           "lazy_refcounts", "refcount_bits")
_CREATE = {d[0]: d for d in _FORMAT_OPTS["qcow2"]}
AMEND_OPTS: tuple[_OptDesc, ...] = (
    ("encrypt.state", "str", None, "Select new state of affected keyslots (active/inactive)"),
    ("encrypt.keyslot", "num", None, "Select a single keyslot to modify explicitly"),
    ("encrypt.old-secret", "str", None, "Select all keyslots that match this password"),
    ("encrypt.new-secret", "str", None,
     "New secret to set in the matching keyslots. Empty string to erase"),
    _CREATE["encrypt.iter-time"],
    *(_CREATE[name] for name in _COMMON),
)
_KNOWN_FORMATS = ("qcow2", "qcow", "raw")


def amend_option_help(fmt: str) -> str:
    """print_amend_option_help(): qemu-img's `amend -o help` text (AmendError if none)."""
    if fmt not in _KNOWN_FORMATS:
        raise AmendError(f"Unknown file format '{fmt}'")
    if fmt != "qcow2":
        raise AmendError(f"Format driver '{fmt}' does not support option amendment",
                         errno.ENOTSUP)
    types = {"str": "str", "bool": "bool (on/off)", "num": "num", "size": "size"}
    lines = [f"Amend options for '{fmt}':"]
    for name, kind, _default, text in sorted(AMEND_OPTS, key=lambda d: d[0].encode()):
        head = f"  {name}=<{types[kind]}>"
        lines.append(f"{head:<24} - {text}")
    return "\n".join(lines) + "\n"


def _parse(text: str, descs: Mapping[str, _OptDesc]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in _split_opts(text):
        d = descs.get(name)
        if d is None:
            raise CreateError(f"Invalid parameter '{name}'")
        kind = d[1]
        parsed: Any = value
        if kind == "bool":
            parsed = _parse_bool(name, value)
        elif kind == "size":
            parsed = _opt_size(name, value, None)
        elif kind == "num":
            parsed = _opt_number(name, value)
        out.pop(name, None)
        out[name] = parsed
    return out


def parse_amend_options(text: str) -> AmendOptions:
    """qemu_opts_do_parse() of a qcow2 amend `-o` string, with qemu-img's messages."""
    try:
        values = _parse(text, {d[0]: d for d in AMEND_OPTS})
    except CreateError as e:
        hint = ""
        try:
            _parse(text, {d[0]: d for d in _FORMAT_OPTS["qcow2"]})
            hint = "This option is only supported for image creation\n"
        except CreateError:
            pass
        raise AmendError(e.message, hint=e.hint or hint) from None
    opts = AmendOptions()
    encrypt = {k: str(v) for k, v in values.items() if k.startswith("encrypt.")}
    opts.encrypt = encrypt or None
    opts.size = values.get("size")
    opts.compat = values.get("compat")
    opts.backing_file = values.get("backing_file")
    opts.backing_fmt = values.get("backing_fmt")
    opts.data_file = values.get("data_file")
    opts.data_file_raw = values.get("data_file_raw")
    opts.lazy_refcounts = values.get("lazy_refcounts")
    if "refcount_bits" in values:
        # qemu_opt_get_number() is stored into a C int
        bits = values["refcount_bits"] & 0xFFFFFFFF
        opts.refcount_bits = bits - (1 << 32) if bits >> 31 else bits
    return opts


def amend(path: str, fmt: str | None = None, *, force: bool = False,
          status: StatusCallback | None = None, backing_policy: Policy = "follow",
          **options: Any) -> None:
    """Amend the options of the image at `path`, as `qemu-img amend -o ...`, e.g.
    amend("a.qcow2", compat="0.10") or amend("a.qcow2", refcount_bits=64, lazy_refcounts=True).
    """
    from ..engine.open import open_image

    opts = options_from_kwargs(options)
    img = open_image(path, fmt, readonly=False, backing_policy=backing_policy,
                     keep_bitmaps=True)
    try:
        amend_image(img, opts, status=status, force=force)
    finally:
        img.close()


def amend_image(img: Any, opts: AmendOptions, *, status: StatusCallback | None = None,
                force: bool = False) -> None:
    """Amend an image opened read-write (only qcow2 images can be amended)."""
    from ..engine.writer import WritableQcow2Image

    if not isinstance(img, WritableQcow2Image):
        raise AmendError(f"Format driver '{img.format_name}' does not support option "
                         "amendment", errno.ENOTSUP)
    engine_amend(img, opts, status, force)
