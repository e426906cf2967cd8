"""qcow2: a pure-Python implementation of the QEMU qcow2 and qcow (v1) image formats.

    import qcow2
    with qcow2.open("disk.qcow2") as img:
        data = img.read(0, 4096)
        for e in img.extents():
            ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from .engine.device import BlockDevice, Extent
from .engine.open import Policy, path_combine
from .errors import (
    BackingChainError,
    BadPassphraseError,
    CorruptImageError,
    EncryptionError,
    ImageLimitError,
    InvalidImageError,
    MetadataOverlapError,
    NotFoundError,
    OutOfRangeError,
    Qcow2Error,
    ReadOnlyImageError,
    UnsupportedFeatureError,
)
from .format.snapshot import SnapshotEntry

if TYPE_CHECKING:
    from .engine.check import CheckResult

__version__ = "0.1.0"

__all__ = [
    "BackingChainError",
    "BadPassphraseError",
    "BlockDevice",
    "CheckResult",
    "CorruptImageError",
    "EncryptionError",
    "Extent",
    "ImageLimitError",
    "InvalidImageError",
    "MetadataOverlapError",
    "NotFoundError",
    "OutOfRangeError",
    "Policy",
    "Qcow2Error",
    "ReadOnlyImageError",
    "SnapshotEntry",
    "UnsupportedFeatureError",
    "__version__",
    "amend",
    "check",
    "commit",
    "create",
    "open",
    "path_combine",
    "rebase",
]


def open(path: str, fmt: str | None = None, readonly: bool = True, *,
         snapshot: str | None = None, backing_policy: Policy = "beside",
         open_backing: bool = True, data_file: str | None = None,
         l2_cache_size: int | None = None) -> BlockDevice:
    """Open an image (qcow2, qcow or raw; probed unless `fmt` is given) with its backing chain.

    backing_policy: which backing/data files the image may make us open: "beside" (default:
    only files inside the image's own directory), "follow" (any, like QEMU), "never", or a
    callable (path, kind, referrer) -> bool. open_backing=False ignores the backing file
    (unallocated ranges read as zeros), like qemu-img info. snapshot: read an internal
    snapshot's content instead of the active layer (ID first, then name).
    readonly=False opens a qcow2 or qcow (v1) image for writing (write, write_zeroes,
    discard, flush); close() flushes in crash-safe order.
    """
    from .engine.open import open_image

    return open_image(path, fmt, readonly, snapshot=snapshot, backing_policy=backing_policy,
                      open_backing=open_backing, data_file=data_file,
                      l2_cache_size=l2_cache_size)


def create(path: str, size: int | str | None = None, fmt: str = "qcow2", *,
           open_backing: bool = True, **options: object) -> None:
    """Create an image byte-identical to `qemu-img create -f FMT -o OPTIONS PATH SIZE` (7.2).

    fmt: "qcow2" (default), "qcow" or "raw". Options are named as qemu-img's -o (compat,
    backing_file, backing_fmt, cluster_size, extended_l2, refcount_bits, lazy_refcounts,
    compression_type, data_file, data_file_raw, preallocation) with str, int or bool values.
    Without a size, the backing file's is used (opened relative to `path`, as QEMU does);
    open_backing=False is qemu-img's -u. Raises ops.create.CreateError (a Qcow2Error and
    ValueError) with qemu-img's message.
    """
    from .ops.create import create as _create

    _create(path, size, fmt, open_backing=open_backing, **options)


def check(path: str, repair: Literal["leaks", "all"] | None = None,
          fmt: str | None = None) -> CheckResult:
    """Check a qcow2 image's metadata like `qemu-img check` (7.2); repair with "leaks"/"all".

    Returns the counters qemu-img reports (after a repair: those of its second, read-only
    pass, with the fixed counts of the first) and every diagnostic line of both passes in
    `messages`. `failure` is set if the check could not complete ("Check failed"). Raises
    what qcow2.open() raises when the image does not open, and Qcow2Error for formats
    without a check (raw, qcow).
    """
    from .ops.check import OpenFailed
    from .ops.check import check as _check

    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    try:
        report = _check(path, fmt, repair)
    except OpenFailed as e:
        raise e.cause from None
    report.result.messages = report.messages
    return report.result


def rebase(path: str, backing: str | None, backing_fmt: str | None = None, *,
           unsafe: bool = False, fmt: str | None = None,
           backing_policy: Policy = "beside") -> None:
    """Give `path` a new backing file like `qemu-img rebase -b BACKING -F FMT` (7.2).

    backing "" or None: no backing file. Safe mode (default) first copies into the image
    every range that differs between the old and the new chain; unsafe=True (-u) only
    rewrites the header. A relative `backing` is relative to the image, as in QEMU. Raises
    what qcow2.open() raises if the image does not open, ops.rebase.RebaseError (a
    Qcow2Error) with qemu-img's message otherwise.
    """
    from .ops.rebase import OpenFailed
    from .ops.rebase import rebase as _rebase

    try:
        _rebase(path, backing, backing_fmt, unsafe=unsafe, fmt=fmt,
                backing_policy=backing_policy)
    except OpenFailed as e:
        raise e.cause from None


def commit(path: str, base: str | None = None, drop: bool = False, *, fmt: str | None = None,
           backing_policy: Policy = "beside") -> None:
    """Write `path`'s data into its backing file (or `base`, deeper in the chain) like
    `qemu-img commit` (7.2), then empty `path` unless `drop` (a named base implies drop).

    Raises what qcow2.open() raises if the image does not open, ops.commit.CommitError (a
    Qcow2Error) with qemu-img's message otherwise.
    """
    from .ops.commit import commit as _commit
    from .ops.rebase import OpenFailed

    try:
        _commit(path, base, drop=drop, fmt=fmt, backing_policy=backing_policy)
    except OpenFailed as e:
        raise e.cause from None


def amend(path: str, fmt: str | None = None, *, backing_policy: Policy = "beside",
          **options: Any) -> None:
    """Change an image's qcow2 options in place, like `qemu-img amend -o OPTIONS` (7.2).

    Options are named as qemu-img's: compat ("0.10"/"v2" or "1.1"/"v3"; a downgrade turns
    zero clusters into data or unallocated clusters), refcount_bits (1..64, rebuilding the
    refcount structures; narrowing fails if a refcount does not fit), lazy_refcounts, size,
    data_file (rename; "" removes the name), data_file_raw (off only), backing_file and
    backing_fmt (only to their current values: use rebase). Raises what qcow2.open()
    raises if the image does not open, ops.amend.AmendError (a Qcow2Error) with qemu-img's
    message otherwise.
    """
    from .ops.amend import amend as _amend

    _amend(path, fmt, backing_policy=backing_policy, **options)


def __getattr__(name: str) -> Any:
    # The check engine (and what it imports) loads only when asked for: every command
    # imports this package, and start-up must stay light.
    if name == "CheckResult":
        from .engine.check import CheckResult

        return CheckResult
    raise AttributeError(f"module 'qcow2' has no attribute {name!r}")
