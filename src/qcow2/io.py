"""Byte stores: the only place that touches files. A local file (pread/pwrite/fsync, hole queries)
and an in-memory store for tests share one small interface."""

from __future__ import annotations

import errno
import os
from typing import Any, Protocol

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


class ByteStore(Protocol):
    """Random-access bytes: what an image file is to the engine."""

    name: str
    writable: bool

    def size(self) -> int: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def readinto(self, offset: int, buf: memoryview) -> int: ...
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def truncate(self, size: int) -> None: ...
    def flush(self) -> None: ...
    def allocated_size(self) -> int: ...
    def punch_hole(self, offset: int, length: int) -> None: ...
    def allocate(self, offset: int, length: int) -> bool: ...
    def next_data(self, offset: int) -> int: ...
    def next_hole(self, offset: int) -> int: ...
    def close(self) -> None: ...


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def _punch(fd: int, offset: int, length: int) -> bool:
    """fallocate(PUNCH_HOLE | KEEP_SIZE); False where the OS or file system cannot."""
    # ctypes is imported here, not at the top: it pulls in shutil/subprocess and costs
    # several ms of every command's start-up, and only hole punching needs it. CDLL(None)
    # is the process's own symbol table (libc included) without find_library's ldconfig run.
    import ctypes

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "fallocate", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return int(fn(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)) == 0


_INT64_MAX = (1 << 63) - 1


def _check_request(offset: int, length: int) -> None:
    """Offsets from a crafted image can exceed what the OS takes (an OverflowError in
    os.pread): refuse them as QEMU's bdrv_check_request() does, with an I/O error."""
    if offset < 0 or length < 0 or offset > _INT64_MAX - length:
        raise OSError(errno.EINVAL, f"Invalid argument (request at offset {offset:#x})")


class FileStore:
    """A local file accessed with positional I/O (no shared file position, thread-safe reads)."""

    def __init__(self, path: str, writable: bool = False, create: bool = False) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        flags |= getattr(os, "O_CLOEXEC", 0)
        self.fd: int = os.open(path, flags, 0o644)
        self.name = path
        self.writable = writable
        # False for QEMU's cache=unsafe (convert's default target mode): flushes are no-ops.
        self.fsync_enabled = True
        self._closed = False

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        _check_request(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # Short reads past EOF read as zeros, like QEMU's file driver.
            data += bytes(length - len(data))
        return data

    def readinto(self, offset: int, buf: memoryview) -> int:
        want = len(buf)
        _check_request(offset, want)
        done = 0
        while done < want:
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                buf[done:] = bytes(want - done)
                break
            done += n
        return want

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        _check_request(offset, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def flush(self) -> None:
        if self.fsync_enabled:
            os.fsync(self.fd)

    def allocated_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def punch_hole(self, offset: int, length: int) -> None:
        """Give the space back to the file system; the range then reads as zeros."""
        _punch(self.fd, offset, length)  # best effort: the clusters are free either way

    def allocate(self, offset: int, length: int) -> bool:
        """Reserve [offset, +length) as zeros (extending the file) without writing them.

        False where the file system cannot, and the caller writes the zeros instead.
        """
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError:
            return False
        return True

    def next_data(self, offset: int) -> int:
        """First data offset at or after `offset`; the file size if none (or unsupported: offset)."""
        try:
            return os.lseek(self.fd, offset, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return self.size()
            return offset

    def next_hole(self, offset: int) -> int:
        try:
            return os.lseek(self.fd, offset, SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return max(offset, self.size())
            return self.size()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class MemoryStore:
    """An in-memory byte store (tests, crafted images)."""

    def __init__(self, data: bytes | bytearray = b"", name: str = "<memory>",
                 writable: bool = True) -> None:
        self.buf = bytearray(data)
        self.name = name
        self.writable = writable

    def size(self) -> int:
        return len(self.buf)

    def pread(self, offset: int, length: int) -> bytes:
        chunk = bytes(self.buf[offset:offset + length])
        if len(chunk) < length:
            chunk += bytes(length - len(chunk))
        return chunk

    def readinto(self, offset: int, buf: memoryview) -> int:
        data = self.pread(offset, len(buf))
        buf[:] = data
        return len(buf)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    def truncate(self, size: int) -> None:
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))

    def flush(self) -> None:
        pass

    def allocated_size(self) -> int:
        return len(self.buf)

    def punch_hole(self, offset: int, length: int) -> None:
        end = min(len(self.buf), offset + length)
        if offset < end:
            self.buf[offset:end] = bytes(end - offset)

    def allocate(self, offset: int, length: int) -> bool:
        if offset >= len(self.buf):
            self.truncate(offset + length)   # through truncate: recording stores log it
            return True
        return False

    def next_data(self, offset: int) -> int:
        return offset if offset < len(self.buf) else len(self.buf)

    def next_hole(self, offset: int) -> int:
        return max(offset, len(self.buf))

    def close(self) -> None:
        pass
