"""`qemu-img check` as a whole-image operation: open like qemu-img, run the check passes.

qemu-img runs one check pass (with the requested repairs) and, if anything was repaired, a
second read-only pass whose counters it reports, carrying over the "fixed" counts of the
first. The passes themselves are engine/check.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.check import CheckResult, Diagnostic, Repair, check_store
from ..errors import Qcow2Error


class CheckNotSupported(Qcow2Error):
    """The format has no consistency check (raw, qcow): qemu-img exits with status 63."""

    def __init__(self, message: str, format_name: str, probed: bool) -> None:
        super().__init__(message)
        self.format_name = format_name
        self.probed = probed


@dataclass(slots=True)
class OpenFailed(Exception):
    """The image could not be opened; `cause` is the underlying error."""

    filename: str
    cause: BaseException


@dataclass(slots=True)
class CheckReport:
    """The result qemu-img reports, plus everything printed on the way."""

    result: CheckResult
    # Diagnostics of every pass, in order; `repaired` is None unless the first pass fixed
    # something (then it holds the first pass's result and a second pass ran).
    messages: list[Diagnostic]
    repaired: CheckResult | None = None


def check(filename: str, fmt: str | None = None, repair: Repair = None) -> CheckReport:
    """Check (and with repair="leaks"/"all", repair) the image at `filename`, as qemu-img.

    Raises OpenFailed when the image (or its backing chain) does not open, and
    CheckNotSupported for formats without a check.
    """
    from ..engine.image import Qcow2Image
    from ..engine.open import open_file, open_image

    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    # Opening the whole chain read-only first gives qemu-img's open errors (backing and data
    # files included) before anything is written.
    try:
        dev = open_image(filename, fmt, True, backing_policy="follow", check_mode=True)
    except (Qcow2Error, OSError) as e:
        raise OpenFailed(filename, e) from None
    try:
        if not isinstance(dev, Qcow2Image):
            raise CheckNotSupported("This image format does not support checks",
                                    dev.format_name, fmt is None)
    finally:
        dev.close()
    store = open_file(filename, writable=repair is not None)
    try:
        first = check_store(store, filename, repair)
        messages = list(first.messages)
        if first.failure is None and repair is not None and (
                first.corruptions_fixed or first.leaks_fixed):
            second = check_store(store, filename, None)
            messages += second.messages
            second.corruptions_fixed = first.corruptions_fixed
            second.leaks_fixed = first.leaks_fixed
            return CheckReport(second, messages, first)
        return CheckReport(first, messages)
    finally:
        store.close()
