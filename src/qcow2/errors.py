"""The exception tree of the package: every error the library raises on bad input is a Qcow2Error."""

from __future__ import annotations


class Qcow2Error(Exception):
    """Base of every error raised for a bad image, a bad argument or an unsupported feature."""


class InvalidImageError(Qcow2Error, ValueError):
    """Not an image of the expected format, or a header that QEMU would refuse."""


class UnsupportedFeatureError(InvalidImageError):
    """The image uses a feature this implementation (or QEMU) cannot handle."""


class CorruptImageError(Qcow2Error):
    """Metadata is inconsistent (QEMU would signal corruption)."""

    def __init__(self, message: str, offset: int | None = None, size: int | None = None,
                 fatal: bool = True) -> None:
        super().__init__(message)
        self.offset = offset
        self.size = size
        self.fatal = fatal


class MetadataOverlapError(CorruptImageError):
    """A data write would hit metadata."""


class ImageLimitError(Qcow2Error, ValueError):
    """A table, snapshot list or extension exceeds QEMU's limits; refused before allocating."""


class ReadOnlyImageError(Qcow2Error, PermissionError):
    """A write was attempted on an image opened read-only."""


class OutOfRangeError(Qcow2Error, ValueError):
    """An offset or length lies outside the image."""


class NotFoundError(Qcow2Error, KeyError):
    """A snapshot or bitmap that does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class BackingChainError(Qcow2Error):
    """A backing or data file is missing, refused by policy, loops, or is too deep."""


class EncryptionError(Qcow2Error):
    """Encryption is unsupported or misconfigured."""


class BadPassphraseError(EncryptionError):
    """No key slot accepts the passphrase."""


def c_hex(value: int) -> str:
    """C's `%#x`, which QEMU's messages use: zero prints as `0`, not `0x0`."""
    return f"{value:#x}" if value else "0"
