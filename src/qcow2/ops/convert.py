"""convert: copy the guest content of one or more images (concatenated) into a target, as
`qemu-img convert` does.

The pipeline, with the qemu-img 7.2 function each stage follows:

1. plan: the source extents become status runs, then requests (`convert_iteration_sectors`):
   zero/unallocated runs are BLK_ZERO, everything else BLK_DATA, cut into 2 MiB requests;
2. read: each BLK_DATA request is read into a pooled buffer, or seen in place through a
   read-only mapping of the host file when the data lies there unchanged;
3. zero detection: the buffer is scanned for zero sectors and split into runs to write and
   holes to skip (`is_allocated_sectors_min`, vectorised with numpy);
4. write: the target writes data runs; holes and BLK_ZERO cost nothing when the target reads
   as zero after creation (`has_zero_init`), else they are zero writes; with -S 0 they are
   written as zero buffers. For a target with a backing file (-B) only the sources' top
   layers are asked, and what they leave unallocated is not written (BLK_BACKING_FILE).

Stages 2-3 run in worker threads, each with its own opened copy of every source (the engine's
caches are per image), so that decompression and zero detection overlap with the writes:
pread, zlib, zstd and numpy release the GIL. Stage 4 runs in the calling thread, in guest
order. A `Target` is a small class: raw here, qcow2/qcow in convert_target.py.

With -c (`ConvertOptions.compress`) requests are whole target clusters, cut as qemu-img cuts
them (`compressed_requests`): a status run shorter than a cluster makes the whole cluster
data, a cluster that reads as zero is treated as a zero request. The workers compress the
clusters (stage 3), the calling thread links them in guest order, so the output is the same
byte for byte on every run and matches `qemu-img convert -c` (which writes in order unless -W).
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..errors import CorruptImageError, Qcow2Error
from ..io import _punch

if TYPE_CHECKING:
    from ..engine.device import BlockDevice
    from .progress import Progress

SECTOR = 512
BUF_BYTES = 2 << 20          # qemu-img's IO_BUF_SIZE / buf_sectors (4096 sectors)
BATCH_BYTES = 8 << 20        # what a worker reads at once: fewer, larger reads and writes
MAX_BUF_SECTORS = 32768      # the largest -S qemu-img accepts (16 MiB)
DEFAULT_MIN_SPARSE = 8       # -S 4k, in sectors
MAX_ALIGN = 4096             # file-posix MAX_BLOCKSIZE, used by allocate_first_block()
_ZERO_BUF = bytes(BUF_BYTES)


class ConvertError(Qcow2Error):
    """A failed conversion; the message is the line qemu-img prints (without its prefix).

    `notes` are lines a QEMU driver prints before it, verbatim (e.g. the qcow2 corruption
    report).
    """

    def __init__(self, message: str, notes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.notes = list(notes)


# ----------------------------------------------------------------------------- sources
@dataclass(slots=True)
class Source:
    """One input image. `reopen` opens an independent copy of it for a worker thread."""

    device: BlockDevice
    reopen: Callable[[], BlockDevice] | None = None
    name: str = ""

    @property
    def length(self) -> int:
        # The block layer counts whole sectors: a qcow2 size that is not a multiple of 512
        # loses its tail, raw files are already rounded up.
        return self.device.virtual_size & ~(SECTOR - 1)

    def host_files(self) -> dict[str, int]:
        """File descriptors of the local files the chain reads from, by name (as extents
        name them): data found there can be read through a mapping of the very same file."""
        out: dict[str, int] = {}
        for layer in self.device.chain():
            for attr in ("store", "data_store"):
                store = getattr(layer, attr, None)
                fd = getattr(store, "fd", None)
                name = getattr(store, "name", None)
                if isinstance(fd, int) and fd >= 0 and isinstance(name, str):
                    out.setdefault(name, fd)
        return out

    @property
    def alignment(self) -> int:
        """qemu-img's src_alignment in bytes: the cluster size, or one sector for raw."""
        cs = getattr(self.device, "cluster_size", SECTOR)
        return cs if isinstance(cs, int) and cs >= SECTOR else SECTOR


@dataclass(slots=True, frozen=True)
class Run:
    """A status run of one source, placed in the target: BLK_DATA if `data`, else BLK_ZERO."""

    src: int
    src_offset: int
    offset: int
    length: int
    data: bool
    # where the bytes lie unchanged in a host file (raw, uncompressed qcow2 data): read them
    # through a shared mapping instead of the engine
    host_fd: int | None = None
    host_offset: int = 0


def _status_error(src_offset: int, e: BaseException) -> ConvertError:
    return ConvertError(f"error while reading block status at offset {src_offset}: "
                        f"{io_reason(e)}", corruption_lines(e))


def io_reason(e: BaseException) -> str:
    """What qemu-img prints after an I/O error: strerror, EIO for a driver-level failure."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return "Input/output error"


def corruption_lines(e: BaseException) -> list[str]:
    """The line qcow2_signal_corruption() prints when a read-only image turns out corrupt.

    Only metadata corruption is signalled so (the engine marks it fatal); a compressed cluster
    that does not inflate is a plain EIO in QEMU.
    """
    if isinstance(e, CorruptImageError) and e.fatal:
        return [f"qcow2: Image is corrupt: {e}; further non-fatal corruption events will be "
                "suppressed"]
    return []


def plan_runs(sources: Sequence[Source], *, top_only: bool = False,
              backing_end: int | None = None) -> list[Run]:
    """The status runs of all sources, as convert_iteration_sectors() walks them.

    qemu-img works in whole sectors: a run ending inside a sector (a raw file's end, a short
    backing file) is rounded up, and the next status query starts at that sector boundary.

    `top_only` is for a target with a backing file (-B): only the sources' top layers are
    asked (bdrv_block_status), and what they leave unallocated (BLK_BACKING_FILE) is not
    written, so that the target's backing file shows through. `backing_end` is then the
    length of that backing file in bytes, when known: queries stop there, and zeros beyond
    it need no write either, since an unallocated target range past its backing file's end
    reads as zero.
    """
    runs: list[Run] = []
    base = 0
    for i, src in enumerate(sources):
        length = src.length
        align = src.alignment
        files = src.host_files()
        pos = 0
        try:
            for e_start, e_end, kind, h_off, fname in _statuses(src.device, length, top_only,
                                                                  backing_end, base):
                e_end = min(e_end, length)
                if e_end <= pos:
                    continue
                end = min(length, -(-e_end // SECTOR) * SECTOR)
                data = kind == _DATA
                skip = kind == _BACKING or (kind == _ZERO and backing_end is not None
                                            and base + pos >= backing_end)
                host: tuple[int, int] | None = None
                if data and h_off is not None and fname in files and end <= e_end:
                    host = (files[fname], h_off - e_start)
                # qemu-img shortens a run that ends inside a cluster to the cluster boundary
                # and queries the rest separately: the request grid restarts there.
                cut = end - end % align
                if pos < cut < end:
                    if not skip:
                        _add_run(runs, i, pos, base, cut - pos, data, host)
                    pos = cut
                if not skip:
                    _add_run(runs, i, pos, base, end - pos, data, host)
                pos = end
        except (Qcow2Error, OSError) as exc:
            at = _failing_offset(src.device, pos, length, align)
            raise _with_cause(_status_error(at, exc), exc) from None
        base += length
    return runs


_DATA, _ZERO, _BACKING = range(3)
_Status = tuple[int, int, int, int | None, str | None]   # start, end, kind, host, file name


def _statuses(dev: BlockDevice, length: int, top_only: bool, backing_end: int | None,
              base: int) -> Iterator[_Status]:
    """(start, end, kind, host offset, host file) runs of one source.

    The whole chain as `qemu-img map` sees it, or with `top_only` the top layer alone; split
    at `backing_end` (a guest offset of the concatenated target, hence `base`), where
    qemu-img splits its status queries.
    """
    if not length:
        return
    cut = None if backing_end is None else backing_end - base
    pieces = [(0, length)]
    if cut is not None and 0 < cut < length:
        pieces = [(0, cut), (cut, length - cut)]
    for start, n in pieces:
        if not top_only:
            for e in dev.extents(start, n):
                yield (e.start, e.start + e.length, _ZERO if e.zero else _DATA,
                       e.host_offset, e.filename)
        else:
            yield from _top_statuses(dev, start, n)


def _top_statuses(dev: BlockDevice, start: int, length: int) -> Iterator[_Status]:
    """bdrv_block_status() of the top layer alone.

    Zero and data are as the layer says. An unallocated stretch reads as zero when there is
    no backing file or it starts past the backing file's end (the block layer decides by
    where the run starts); otherwise it is the backing file's. Runs of one kind are merged,
    data runs only while contiguous in one host file, as the chain-wide extents are.
    """
    from ..engine.device import STATUS_DATA, STATUS_OFFSET_VALID, STATUS_ZERO

    backing = dev.backing

    def resolved(c: list[Any]) -> _Status:
        kind = c[2]
        if kind == _BACKING and (backing is None or c[0] >= backing.virtual_size):
            kind = _ZERO
        return (c[0], c[1], kind, c[3], c[4])

    cur: list[Any] | None = None    # start, end, kind, host offset, host file
    for run in dev.layer_status(start, length):
        if run.status & STATUS_ZERO:
            kind = _ZERO
        elif run.status & STATUS_DATA:
            kind = _DATA
        else:
            kind = _BACKING
        off = run.host_offset if kind == _DATA and run.status & STATUS_OFFSET_VALID else None
        fname = run.store.name if off is not None and run.store is not None else None
        end = run.start + run.length
        if cur is not None and cur[2] == kind and (
                kind != _DATA or (cur[3] is None and off is None)
                or (cur[3] is not None and off is not None and cur[4] == fname
                    and cur[3] + (cur[1] - cur[0]) == off)):
            cur[1] = end
            continue
        if cur is not None:
            yield resolved(cur)
        cur = [run.start, end, kind, off, fname]
    if cur is not None:
        yield resolved(cur)


def _failing_offset(dev: BlockDevice, start: int, end: int, align: int) -> int:
    """Where qemu-img's block-status query fails: the start of the first bad cluster.

    The extent walk looks ahead to merge runs, so it fails before yielding the runs in front
    of the bad cluster; find the shortest failing range from `start` by bisection instead.
    """
    def fails(stop: int) -> bool:
        if stop <= start:
            return False
        try:
            for _ in dev.extents(start, stop - start):
                pass
        except (Qcow2Error, OSError):
            return True
        return False

    lo = start // align     # clusters [start, lo * align) are known good
    hi = -(-end // align)
    if not fails(min(end, hi * align)):
        return start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(min(end, mid * align)):
            hi = mid
        else:
            lo = mid
    return max(start, lo * align)


def _add_run(runs: list[Run], src: int, start: int, base: int, length: int, data: bool,
             host: tuple[int, int] | None) -> None:
    if host is None:
        runs.append(Run(src, start, base + start, length, data))
    else:
        runs.append(Run(src, start, base + start, length, data, host[0], host[1] + start))


def _with_cause(err: ConvertError, cause: BaseException) -> ConvertError:
    err.__cause__ = cause
    return err


@dataclass(slots=True, frozen=True)
class Batch:
    """Consecutive requests of one status run, handled by one worker with one read.

    `parts` are the lengths of qemu-img's requests (at most 2 MiB each): zero detection runs
    per request, as in qemu-img, so that the holes are the same whatever the batch size.
    A BLK_ZERO batch is only written when the target is not zero-initialised.
    """

    src: int
    src_offset: int
    offset: int
    length: int
    data: bool
    parts: tuple[int, ...]
    host_fd: int | None = None
    host_offset: int = 0
    # -c: one part per target cluster, read across sources (`offset` is what counts);
    # `zero_fill`: a BLK_ZERO request that -S 0 turns into a zero buffer to compress
    compressed: bool = False
    zero_fill: bool = False


def iter_batches(runs: Sequence[Run], buf_bytes: int, batch_bytes: int, zeros_too: bool
                 ) -> Iterator[Batch]:
    """Cut status runs into requests of at most `buf_bytes` (data, and zeros with -S 0) and
    group them into batches of at most `batch_bytes`."""
    per_batch = max(1, batch_bytes // buf_bytes)
    for r in runs:
        if not r.data and not zeros_too:
            yield Batch(r.src, r.src_offset, r.offset, r.length, False, (r.length,))
            continue
        done = 0
        while done < r.length:
            parts: list[int] = []
            n = 0
            while len(parts) < per_batch and done + n < r.length:
                k = min(buf_bytes, r.length - done - n)
                parts.append(k)
                n += k
            yield Batch(r.src, r.src_offset + done, r.offset + done, n, r.data, tuple(parts),
                        r.host_fd, r.host_offset + done)
            done += n


_REQ_DATA, _REQ_ZERO, _REQ_BACKING = range(3)


def compressed_requests(runs: Sequence[Run], total: int, cluster_bytes: int
                        ) -> Iterator[tuple[int, int, int]]:
    """(offset, length, kind) of the requests convert_iteration_sectors() makes with -c.

    Data requests are one cluster each (the buffer holds one cluster); zero and backing
    stretches are whole clusters, aligned down; anything shorter than a cluster, whatever its
    status, becomes a data request for the whole cluster (or the image's tail). Runs are
    in target offsets; the gaps between them are BLK_BACKING_FILE.
    """
    cs = cluster_bytes
    i = 0
    pos = 0
    while pos < total:
        while i < len(runs) and runs[i].offset + runs[i].length <= pos:
            i += 1
        if i < len(runs) and runs[i].offset <= pos:
            end = runs[i].offset + runs[i].length
            kind = _REQ_DATA if runs[i].data else _REQ_ZERO
        else:
            end = runs[i].offset if i < len(runs) else total
            kind = _REQ_BACKING
        n = end - pos
        if kind == _REQ_DATA:
            n = min(n, cs)
        if n < cs:
            n = min(cs, total - pos)
            kind = _REQ_DATA
        else:
            n -= n % cs
        yield pos, n, kind
        pos += n


def iter_compressed_batches(runs: Sequence[Run], total: int, cluster_bytes: int,
                            batch_bytes: int, zeros_too: bool) -> Iterator[Batch]:
    """Group consecutive data requests (one cluster each) into batches for the workers.

    With -S 0 (`zeros_too`) a zero stretch is one zero-filled data request per cluster, as
    qemu-img caps it to its one-cluster buffer; backing stretches are left out.
    """
    per_batch = max(1, batch_bytes // cluster_bytes)
    pending: list[int] = []
    start = 0
    fill = False

    def flush() -> Batch:
        return Batch(-1, start, start, sum(pending), True, tuple(pending), compressed=True,
                     zero_fill=fill)

    for off, n, kind in compressed_requests(runs, total, cluster_bytes):
        if kind == _REQ_BACKING:
            continue
        if kind == _REQ_ZERO and not zeros_too:
            if pending:
                yield flush()
                pending = []
            yield Batch(-1, off, off, n, False, (n,), compressed=True)
            continue
        is_fill = kind == _REQ_ZERO
        parts = [cluster_bytes] * (n // cluster_bytes) if is_fill else [n]
        for part in parts:
            if pending and (fill != is_fill or len(pending) >= per_batch
                            or off != start + sum(pending)):
                yield flush()
                pending = []
            if not pending:
                start = off
                fill = is_fill
            pending.append(part)
            off += part
    if pending:
        yield flush()


# ----------------------------------------------------------------------------- zero detection
def sector_flags(buf: Any, nsectors: int) -> Any:
    """numpy bool array: True for each 512-byte sector of `buf` holding a non-zero byte."""
    import numpy as np

    a = np.frombuffer(buf, dtype=np.uint64, count=nsectors * (SECTOR // 8))
    a = a.reshape(nsectors, SECTOR // 8)
    # Most data sectors have a non-zero first word: test that first (an eighth of the memory
    # traffic), and scan whole sectors only for the candidates.
    nz = a[:, 0] != 0
    cand = np.flatnonzero(~nz)
    if cand.size == 0:
        return nz
    if cand.size * 8 > nsectors:
        return np.bitwise_or.reduce(a, axis=1) != 0
    nz[cand] = np.bitwise_or.reduce(a[cand], axis=1) != 0
    return nz


def allocated_ranges(flags: Any, sector_num: int, min_sparse: int, alignment: int
                     ) -> list[tuple[int, int]]:
    """The (first sector, count) ranges, relative to the request, that qemu-img writes.

    `flags[i]` says whether sector i is non-zero. This is convert_co_write()'s loop over
    is_allocated_sectors_min(): zero runs of at least `min_sparse` sectors become holes, the
    ends of data runs are aligned up to `alignment` sectors (absolute, from `sector_num`).
    """
    import numpy as np

    n = len(flags)
    if n == 0:
        return []
    first = bool(flags[0])
    changes = np.flatnonzero(flags[1:] != flags[:-1])
    if changes.size == 0:
        return [(0, n)] if first else []
    # run boundaries: change[k] is the first sector of the (k+1)-th run
    bounds: list[int] = (changes + 1).tolist()
    bounds.append(n)
    mask = alignment - 1

    def is_allocated(pos: int) -> tuple[int, bool]:
        # is_allocated_sectors(buf + pos, n - pos); runs alternate, the first one is `first`
        k = bisect_right(bounds, pos)
        is_zero = first == bool(k & 1)
        run_end = bounds[k]
        i = run_end - pos
        if run_end == n:
            return i, not is_zero
        tail = (sector_num + pos + i) & mask
        if tail:
            if is_zero and i <= tail:
                is_zero = False
            if not is_zero:
                i = min(i + alignment - tail, n - pos)
            else:
                i -= tail
        return i, not is_zero

    out: list[tuple[int, int]] = []
    pos = 0
    while pos < n:
        smin = min(min_sparse, n - pos)
        i, ret = is_allocated(pos)
        if not ret:
            pos += i
            continue
        used = checked = i
        p = pos + i
        while p < n:
            k, r = is_allocated(p)
            p += k
            checked += k
            if r:
                used = checked
            elif k >= smin:
                break
        if out and out[-1][0] + out[-1][1] == pos:
            out[-1] = (out[-1][0], out[-1][1] + used)
        else:
            out.append((pos, used))
        pos += used
    return out


# ----------------------------------------------------------------------------- targets
class Target(Protocol):
    """Where converted data goes. Offsets are guest offsets of the target image."""

    has_zero_init: bool     # reads as zero after creation: holes need no write

    # Targets that take compressed clusters (-c) also have `cluster_size`,
    # `compression_type` and write_compressed(offset, data, payloads).
    def write(self, offset: int, data: memoryview) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")


class RawTarget:
    """A raw file created like QEMU's file driver does (bdrv_create for `raw`), or with
    `create=False` (-n) an existing file or device, written in place; `zero_init` then says
    whether it may be assumed to read as zero (--target-is-zero)."""

    def __init__(self, path: str, size: int, *, cache: str = "unsafe", create: bool = True,
                 zero_init: bool = True) -> None:
        self.path = path
        self.size = size
        self.flush_on_close = cache != "unsafe"
        # convert opens an existing target with BDRV_O_UNMAP, so the file driver punches
        # holes for zero writes; a new file reads as zero and is never asked to.
        self.punch = not create
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        if create:
            try:
                self.fd = os.open(path, flags | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConvertError(f"{path}: error while converting raw: Could not create "
                                   f"'{path}': {io_reason(e)}") from None
            try:
                self.has_zero_init = self._create(size) and zero_init
            except BaseException:
                os.close(self.fd)
                raise
        else:
            try:
                self.fd = os.open(path, flags)
            except OSError as e:
                # the file protocol's own "Could not open" follows the block layer's
                raise ConvertError(f"Could not open '{path}': Could not open '{path}': "
                                   f"{io_reason(e)}") from None
            self.has_zero_init = zero_init

    @property
    def length(self) -> int:
        """The current length in bytes, rounded up to whole sectors as the block layer does."""
        end = os.lseek(self.fd, 0, os.SEEK_END)
        return -(-end // SECTOR) * SECTOR

    def _create(self, size: int) -> bool:
        """raw_co_create(): clear and resize a regular file; True if it then reads as zero."""
        path = self.path
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                # a device keeps its size and content: it only has to be big enough
                if os.lseek(self.fd, 0, os.SEEK_END) < size:
                    raise ConvertError(f"{path}: error while converting raw: Cannot grow "
                                       "device files")
                return False
            # Clear, resize, then allocate the first block as QEMU's file driver does (it
            # speeds up QEMU's alignment probing; we keep it for identical sparseness).
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, size)
            if size:
                n = SECTOR if size < MAX_ALIGN else MAX_ALIGN
                os.pwrite(self.fd, bytes(n), 0)
        except OSError as e:
            raise ConvertError(f"{path}: error while converting raw: Could not resize file: "
                               f"{io_reason(e)}") from None
        return True

    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        n = len(data)
        while done < n:
            done += os.pwrite(self.fd, data[done:], offset + done)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.punch and _punch(self.fd, offset, length):
            return
        while length > 0:
            n = min(length, len(_ZERO_BUF))
            self.write(offset, memoryview(_ZERO_BUF)[:n])
            offset += n
            length -= n

    def finish(self) -> None:
        if self.flush_on_close:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ----------------------------------------------------------------------------- the copy
@dataclass
class ConvertOptions:
    min_sparse: int = DEFAULT_MIN_SPARSE   # sectors; 0 writes everything (-S 0)
    buf_bytes: int = BUF_BYTES             # qemu-img's request size
    batch_bytes: int = BATCH_BYTES         # bytes read at once by a worker
    workers: int = 0                       # 0: choose from the CPU count
    progress: Progress | None = None
    # The target has a backing file (-B): ranges the sources' top layers leave unallocated
    # are not written. `backing_end`: that file's length in bytes, when the target is new.
    target_has_backing: bool = False
    backing_end: int | None = None
    # -c: every cluster written compressed (the target must have write_compressed);
    # compression_level None is QEMU's (zlib 6, zstd 3)
    compress: bool = False
    compression_level: int | None = None


@dataclass
class _Scanned:
    """A batch after reading and zero detection: what to write, and the buffer to give back."""

    batch: Batch
    writes: list[tuple[int, memoryview]]
    zeroes: list[tuple[int, int]]
    buf: bytearray | None = None
    mapped: memoryview | None = None
    # -c: runs of consecutive clusters with their compressed payloads (None: uncompressible)
    cwrites: list[tuple[int, memoryview, list[bytes | None]]] | None = None


class _Copier:
    """Reads and scans batches (in worker threads) and writes them (in the calling thread).

    All target writes happen in one thread, in guest order: writes to one file serialise in
    the kernel anyway (concurrent writers only spin on the inode lock), and a qcow2 writer
    allocates clusters in guest order as QEMU does.
    """

    def __init__(self, sources: Sequence[Source], target: Target, opts: ConvertOptions,
                 threaded: bool) -> None:
        self.sources = sources
        self.target = target
        self.opts = opts
        self.threaded = threaded
        self.alignment = max(_pow2floor(opts.min_sparse), 1)
        self._local = threading.local()
        self._opened: list[BlockDevice] = []
        self._lock = threading.Lock()
        self._mmaps: dict[int, mmap.mmap | None] = {}
        self._free: list[bytearray] = []
        # convert_do_copy(): zero initialisation is only relied on when holes are wanted.
        self.zero_init = (target.has_zero_init and opts.min_sparse != 0
                          and not opts.target_has_backing)
        self.bases: list[int] = []
        base = 0
        for src in sources:
            self.bases.append(base)
            base += src.length
        self.cluster_bytes = int(getattr(target, "cluster_size", 0) or 0)
        self.compression_type = int(getattr(target, "compression_type", 0) or 0)

    # ------------------------------------------------------------------ worker side
    def _device(self, src: int) -> BlockDevice:
        if not self.threaded:
            return self.sources[src].device
        devices: dict[int, BlockDevice] | None = getattr(self._local, "devices", None)
        if devices is None:
            devices = self._local.devices = {}
        dev = devices.get(src)
        if dev is None:
            reopen = self.sources[src].reopen
            assert reopen is not None
            dev = reopen()
            devices[src] = dev
            with self._lock:
                self._opened.append(dev)
        return dev

    def _take_buffer(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(max(self.opts.batch_bytes, self.opts.buf_bytes, self.cluster_bytes))

    def scan(self, b: Batch) -> _Scanned:
        """Read a batch and find what to write (no target I/O here)."""
        if b.compressed:
            return self._scan_compressed(b)
        if not b.data:
            if not self.opts.min_sparse:
                # -S 0: qemu-img writes zero buffers, which allocate like any data
                res = _Scanned(b, [], [])
                pos = 0
                while pos < b.length:
                    n = min(b.length - pos, len(_ZERO_BUF))
                    res.writes.append((b.offset + pos, memoryview(_ZERO_BUF)[:n]))
                    pos += n
                return res
            zeroes = [] if self.zero_init else [(b.offset, b.length)]
            return _Scanned(b, [], zeroes)
        buf: bytearray | None = None
        mapped = self._mapped(b) if b.host_fd is not None else None
        if mapped is not None:
            view = mapped
        else:
            buf = self._take_buffer()
            view = memoryview(buf)[:b.length]
            try:
                self._read(b, view)
            except BaseException:
                self.give_back(buf)
                raise
        res = _Scanned(b, [], [], buf, mapped)
        min_sparse = self.opts.min_sparse
        if not min_sparse:
            res.writes.append((b.offset, view))
            return res
        nsec = b.length // SECTOR
        flags = sector_flags(view, nsec)
        ranges: list[tuple[int, int]] = []
        first_sec = 0
        for part in b.parts:
            k = part // SECTOR
            # Runs are not merged across requests: qemu-img writes each request on its own,
            # and where a request ends decides how a qcow2 target allocates (a request's
            # clusters are allocated together, so a refblock lands after them).
            in_part = len(ranges)
            for first, count in allocated_ranges(flags[first_sec:first_sec + k],
                                                 (b.offset // SECTOR) + first_sec,
                                                 min_sparse, self.alignment):
                first += first_sec
                if len(ranges) > in_part and ranges[-1][0] + ranges[-1][1] == first:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + count)
                else:
                    ranges.append((first, count))
            first_sec += k
        for first, count in ranges:
            a = first * SECTOR
            res.writes.append((b.offset + a, view[a:a + count * SECTOR]))
        if not self.zero_init:
            pos = 0
            for first, count in [*ranges, (nsec, 0)]:
                if first > pos:
                    res.zeroes.append((b.offset + pos * SECTOR, (first - pos) * SECTOR))
                pos = first + count
        return res

    def _scan_compressed(self, b: Batch) -> _Scanned:
        """-c: read whole clusters, skip the ones that read as zero, compress the others."""
        from ..engine.compress import compress_cluster

        if not b.data:
            return _Scanned(b, [], [] if self.zero_init else [(b.offset, b.length)])
        buf = self._take_buffer()
        view = memoryview(buf)[:b.length]
        try:
            if b.zero_fill:
                view[:] = _ZERO_BUF[:b.length] if b.length <= len(_ZERO_BUF) else bytes(b.length)
            else:
                self._read_span(b, view)
        except BaseException:
            self.give_back(buf)
            raise
        res = _Scanned(b, [], [], buf, cwrites=[])
        assert res.cwrites is not None
        cs = self.cluster_bytes
        level = self.opts.compression_level
        pos = 0
        for part in b.parts:
            chunk = view[pos:pos + part]
            off = b.offset + pos
            pos += part
            # qemu-img can only skip a compressed cluster when all of it is zero.
            if self.opts.min_sparse and not _any_nonzero(chunk):
                if not self.zero_init:
                    res.zeroes.append((off, part))
                continue
            payload = compress_cluster(chunk, cs, self.compression_type, level)
            last = res.cwrites[-1] if res.cwrites else None
            if last is not None and last[0] + len(last[1]) == off:
                res.cwrites[-1] = (last[0], view[last[0] - b.offset:pos], [*last[2], payload])
            else:
                res.cwrites.append((off, chunk, [payload]))
        return res

    def _read_span(self, b: Batch, view: memoryview) -> None:
        """Read target range [b.offset, +len) from the concatenated sources; a failure is
        reported at the start of the failing request (cluster), as qemu-img does."""
        pos = 0
        for part in b.parts:
            try:
                self._read_target(b.offset + pos, view[pos:pos + part])
            except (Qcow2Error, OSError) as e:
                msg = f"error while reading at byte {b.offset + pos}: {io_reason(e)}"
                raise _with_cause(ConvertError(msg, corruption_lines(e)), e) from None
            pos += part

    def _read_target(self, offset: int, view: memoryview) -> None:
        # A cluster may straddle two sources (convert_co_read() reads across them).
        i = bisect_right(self.bases, offset) - 1
        done = 0
        while done < len(view):
            while i + 1 < len(self.bases) and self.bases[i + 1] <= offset + done:
                i += 1
            src_off = offset + done - self.bases[i]
            n = min(len(view) - done, self.sources[i].length - src_off)
            if n <= 0:
                view[done:] = bytes(len(view) - done)   # past the last source: zeros
                return
            self._device(i).readinto(src_off, view[done:done + n])
            done += n

    def _mapped(self, b: Batch) -> memoryview | None:
        """The batch's bytes in a read-only mapping of their host file, if they are there.

        Data that lies unchanged in a host file (raw images, uncompressed qcow2 clusters) is
        then scanned and written straight from the page cache: no copy into a buffer, no
        engine work per read. Ranges past the end of the file read as zeros through the engine.
        """
        fd = b.host_fd
        assert fd is not None
        try:
            mm = self._mmaps[fd]
        except KeyError:
            with self._lock:
                if fd not in self._mmaps:
                    self._mmaps[fd] = map_file(fd)
                mm = self._mmaps[fd]
        if mm is None or b.host_offset + b.length > len(mm):
            return None
        return memoryview(mm)[b.host_offset:b.host_offset + b.length]

    def _read(self, b: Batch, view: memoryview) -> None:
        try:
            self._device(b.src).readinto(b.src_offset, view)
            return
        except (Qcow2Error, OSError) as e:
            err: BaseException = e
        # Report the failing request as qemu-img does: retry the requests one by one.
        pos = 0
        bad = b.offset
        for part in b.parts:
            try:
                self._device(b.src).readinto(b.src_offset + pos, view[pos:pos + part])
            except (Qcow2Error, OSError) as e:
                err, bad = e, b.offset + pos
                break
            pos += part
        msg = f"error while reading at byte {bad}: {io_reason(err)}"
        raise _with_cause(ConvertError(msg, corruption_lines(err)), err) from None

    # ------------------------------------------------------------------ writer side
    def write(self, res: _Scanned) -> None:
        """Write a scanned batch to the target (the calling thread only)."""
        target = self.target
        offset = res.batch.offset
        try:
            if res.cwrites is not None:
                cops: list[tuple[int, Any, Any]] = [*res.cwrites,
                                                    *((o, n, None) for o, n in res.zeroes)]
                cops.sort(key=lambda op: op[0])
                write_compressed = cast(Any, target).write_compressed
                for offset, what, payloads in cops:
                    if payloads is None:
                        target.write_zeroes(offset, what)
                    else:
                        write_compressed(offset, what, payloads)
                return
            if not res.zeroes:
                for offset, view in res.writes:
                    target.write(offset, view)
            else:
                # In guest order, as convert_co_write() goes: where a zero write allocates
                # (a partial cluster over backing data, qcow v1) the layout depends on it.
                ops: list[tuple[int, memoryview | int]] = [*res.writes, *res.zeroes]
                ops.sort(key=lambda op: op[0])
                for offset, what in ops:
                    if isinstance(what, int):
                        target.write_zeroes(offset, what)
                    else:
                        target.write(offset, what)
        except OSError as e:
            raise _with_cause(ConvertError(
                f"error while writing at byte {offset}: {io_reason(e)}"), e) from None
        finally:
            self.discard(res)

    def discard(self, res: _Scanned) -> None:
        for _, view in res.writes:
            view.release()
        res.writes.clear()
        if res.cwrites:
            for _, view, _ in res.cwrites:
                view.release()
            res.cwrites.clear()
        if res.mapped is not None:
            res.mapped.release()
            res.mapped = None
        if res.buf is not None:
            self.give_back(res.buf)
            res.buf = None

    def give_back(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        for dev in self._opened:
            dev.close()
        self._opened.clear()
        for mm in self._mmaps.values():
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass    # a view is still referenced (an exception's frame): GC unmaps it
        self._mmaps.clear()


def map_file(fd: int) -> mmap.mmap | None:
    """A read-only shared mapping of a regular file, or None if it cannot be mapped."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        # mmap keeps its own duplicate of the descriptor
        return mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
    except (OSError, ValueError, OverflowError):
        return None


def _any_nonzero(view: memoryview) -> bool:
    import numpy as np

    if len(view) % 8:
        return any(view)
    return bool(np.frombuffer(view, dtype=np.uint64).any())


def _pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def convert(sources: Sequence[Source], target: Target, opts: ConvertOptions | None = None
            ) -> None:
    """Copy the concatenated guest content of `sources` into `target`.

    Raises ConvertError with qemu-img's message on a read, block-status or write failure.
    """
    opts = opts or ConvertOptions()
    progress = opts.progress
    runs = plan_runs(sources, top_only=opts.target_has_backing, backing_end=opts.backing_end)
    zeros_too = not opts.min_sparse
    total = sum(s.length for s in sources)
    cluster_bytes = int(getattr(target, "cluster_size", 0) or 0)
    if opts.compress and not (cluster_bytes and hasattr(target, "write_compressed")):
        raise ConvertError("Compression not supported for this file format")
    # convert_do_copy() counts the sectors it will copy first: the progress denominator.
    if opts.compress:
        allocated = sum(n for _, n, kind in compressed_requests(runs, total, cluster_bytes)
                        if kind == _REQ_DATA or (zeros_too and kind == _REQ_ZERO))
    else:
        allocated = sum(r.length for r in runs if r.data or zeros_too)
    workers = opts.workers or default_workers()
    threaded = workers > 1 and all(s.reopen is not None for s in sources) and allocated > 0
    copier = _Copier(sources, target, opts, threaded)
    done = 0

    def report(b: Batch) -> None:
        # qemu-img prints once per request, in order
        nonlocal done
        if progress is not None and (b.data or zeros_too):
            for part in b.parts:
                done += part
                progress.print(100.0 * done / allocated, 0)

    try:
        if opts.compress:
            batches = iter_compressed_batches(runs, total, cluster_bytes, opts.batch_bytes,
                                              zeros_too)
        else:
            batches = iter_batches(runs, opts.buf_bytes, opts.batch_bytes, zeros_too)
        if not threaded:
            for b in batches:
                report(b)
                copier.write(copier.scan(b))
        else:
            _run_threaded(copier, batches, workers, report)
        if opts.compress:
            cast(Any, target).finish_compressed()
        target.finish()
    finally:
        copier.close()


def _run_threaded(copier: _Copier, batches: Iterator[Batch], workers: int,
                  report: Callable[[Batch], None]) -> None:
    """Workers scan ahead (a bounded window); this thread writes the results in order."""
    window: deque[Future[_Scanned]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as pool:
        try:
            for b in batches:
                window.append(pool.submit(copier.scan, b))
                while len(window) > 2 * workers or (window and window[0].done()):
                    res = window.popleft().result()
                    report(res.batch)
                    copier.write(res)
            while window:
                res = window.popleft().result()
                report(res.batch)
                copier.write(res)
        except BaseException:
            for fut in window:
                fut.cancel()
            for fut in window:
                if not fut.cancelled():
                    try:
                        copier.discard(fut.result())
                    except BaseException:
                        pass
            raise
