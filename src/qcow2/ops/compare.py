"""compare: are two images' guest contents equal, as `qemu-img compare` (7.2) decides it.

qemu-img walks both images with bdrv_block_status_above(): ranges that read as zero on both
sides are skipped, ranges allocated on both sides are read and compared, and where only one
side is allocated that side must read as zero. Mismatches are reported at the first differing
512-byte sector of the 2 MiB piece being compared. Strict mode (-s) also requires equal sizes
and identical block status flags, so `status_runs()` reproduces QEMU's runs exactly, down to
where they split (qcow2: at L2 table boundaries; qcow: per cluster) and the EOF flag.

Data is compared in blocks of up to 8 MiB, vectorised, by worker threads: plain data (raw
files, uncompressed qcow2 clusters) straight from read-only mappings of the files, anything
else read through the engine. The walk decides what to compare, and results are taken in
order, so what is printed is exactly qemu-img's.
"""

from __future__ import annotations

import mmap
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine.device import STATUS_DATA, STATUS_OFFSET_VALID, STATUS_ZERO
from ..errors import Qcow2Error
from .convert import corruption_lines, default_workers, io_reason, map_file
from .progress import Progress, f32

if TYPE_CHECKING:
    from ..engine.device import BlockDevice, LayerRun

SECTOR = 512
IO_BUF_SIZE = 2 << 20       # qemu-img compare's piece size
BLOCK = 8 << 20             # what we read at once

# BDRV_BLOCK_* bits as block_status_above() returns them
DATA = 1
ZERO = 2
OFFSET_VALID = 4
ALLOCATED = 8
EOF = 16
_LAYER_BITS = STATUS_DATA | STATUS_ZERO | STATUS_OFFSET_VALID
assert (STATUS_DATA, STATUS_ZERO, STATUS_OFFSET_VALID) == (DATA, ZERO, OFFSET_VALID)

INT_MAX = (1 << 31) - 1


class CompareError(Qcow2Error):
    """An error that ends `compare` with qemu-img's exit status `code` (3 status, 4 read)."""

    def __init__(self, code: int, message: str, notes: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.notes = notes or []


def qemu_length(dev: BlockDevice) -> int:
    """blk_getlength(): whole sectors (a qcow2 size not a multiple of 512 loses its tail)."""
    return dev.virtual_size & ~(SECTOR - 1)


# ----------------------------------------------------------------------------- block status
def _granularity(dev: BlockDevice) -> int | None:
    """Where QEMU's driver ends a block-status run even if the next part is alike."""
    fmt = dev.format_name
    cbits = getattr(dev, "cluster_bits", None)
    if fmt == "qcow2" and isinstance(cbits, int):
        # qcow2_get_host_offset() stops at the end of the L2 table (slice)
        return 1 << (cbits + int(getattr(dev, "l2_bits", 0)))
    if fmt == "qcow" and isinstance(cbits, int):
        return 1 << cbits   # qcow_co_block_status() answers one cluster at a time
    return None


# A run's bytes as they lie in a local file: (file descriptor, host offset of the run start)
Host = tuple[int, int] | None
HostRun = tuple[int, int, int, Host]


def _layer_runs(dev: BlockDevice, start: int, end: int) -> Iterator[HostRun]:
    """(start, end, status bits, host) of one layer, split as QEMU's driver would answer."""
    if end <= start:
        return
    gran = _granularity(dev)
    run: LayerRun
    for run in dev.layer_status(start, end - start):
        s = run.start
        e = min(run.start + run.length, end)
        st = run.status & _LAYER_BITS
        fd = getattr(run.store, "fd", None)
        origin: Host = None     # (fd, host offset of guest offset 0 of this run)
        if st & DATA and not st & ZERO and st & OFFSET_VALID and isinstance(fd, int) \
                and run.host_offset is not None:
            origin = (fd, run.host_offset - run.start)
        if gran is None:
            yield s, e, st, _shift(origin, s)
            continue
        while s < e:
            cut = min(e, (s // gran + 1) * gran)
            yield s, cut, st, _shift(origin, s)
            s = cut


def status_runs(dev: BlockDevice, start: int = 0) -> Iterator[tuple[int, int, int]]:
    """bdrv_block_status_above(dev, NULL) answered from `start` to the end: (start, end, flags).

    Flags are DATA/ZERO/OFFSET_VALID/ALLOCATED/EOF as QEMU returns them, including its quirks:
    past a shorter backing file the range is ZERO|ALLOCATED, a range unallocated in the whole
    chain keeps the bottom layer's own EOF bit, and EOF is set on the run reaching the end.
    """
    for s, e, f, _ in _host_runs(dev, start):
        yield s, e, f


def _host_runs(dev: BlockDevice, start: int = 0) -> Iterator[HostRun]:
    """status_runs() with where plain data lies in a local file (for reading it mapped)."""
    size = qemu_length(dev)
    for s, e, st, host in _layer_runs(dev, start, size):
        top_eof = e == size
        if st & (DATA | ZERO):
            yield s, e, st | ALLOCATED | (EOF if top_eof else 0), host
        elif dev.backing is None:
            yield s, e, st | ZERO | (EOF if top_eof else 0), None
        else:
            for ss, se, f, h in _below(dev, s, e):
                yield ss, se, f | (EOF if top_eof and se == e else 0), h


def _below(dev: BlockDevice, start: int, end: int) -> Iterator[HostRun]:
    """The backing chain's answer for [start, end), unallocated in `dev` (which has one)."""
    b = dev.backing
    assert b is not None
    bsize = qemu_length(b)
    if start >= bsize:
        # the backing layer answers "nothing at or past my end": zeros, counted as allocated
        yield start, end, ZERO | ALLOCATED, None
        return
    mid = min(end, bsize)
    for s, e, st, host in _layer_runs(b, start, mid):
        if st & (DATA | ZERO):
            yield s, e, st | ALLOCATED, host
        elif b.backing is None:
            yield s, e, st | ZERO | (EOF if e == bsize else 0), None
        else:
            yield from _below(b, s, e)
    if end > mid:
        yield mid, end, ZERO | ALLOCATED, None


# ----------------------------------------------------------------------------- the walk
SKIP, CMP, CHK1, CHK2 = 0, 1, 2, 3


@dataclass(slots=True)
class _Piece:
    offset: int
    length: int
    kind: int
    h1: Host = None     # where image 1's bytes of the piece lie in a local file
    h2: Host = None


class _StatusFailed(Exception):
    def __init__(self, which: int, cause: BaseException) -> None:
        super().__init__()
        self.which = which
        self.cause = cause


def _runs_of(dev: BlockDevice, which: int, start: int = 0) -> Iterator[HostRun]:
    try:
        yield from _host_runs(dev, start)
    except (Qcow2Error, OSError) as e:
        raise _StatusFailed(which, e) from None


def _next_run(it: Iterator[HostRun], which: int) -> HostRun:
    r = next(it, None)
    if r is None:
        raise _StatusFailed(which, Qcow2Error("block status ended before the image end"))
    return r


def _at(run: HostRun, offset: int) -> Host:
    h = run[3]
    return None if h is None else (h[0], h[1] + offset - run[0])


def _shift(h: Host, n: int) -> Host:
    return None if h is None else (h[0], h[1] + n)


def _pieces(kind: int, offset: int, chunk: int, h1: Host, h2: Host) -> Iterator[_Piece]:
    if kind == SKIP:
        yield _Piece(offset, chunk, SKIP)
        return
    end = offset + chunk
    done = 0
    while offset + done < end:
        n = min(IO_BUF_SIZE, end - offset - done)
        yield _Piece(offset + done, n, kind, _shift(h1, done), _shift(h2, done))
        done += n


def _walk_common(dev1: BlockDevice, dev2: BlockDevice, total: int, strict: bool
                 ) -> Iterator[_Piece | str]:
    """Pieces over [0, total); a string is the strict-mode message that ends the walk."""
    it1 = _runs_of(dev1, 1)
    it2 = _runs_of(dev2, 2)
    r1: HostRun = (0, 0, 0, None)
    r2: HostRun = (0, 0, 0, None)
    offset = 0
    while offset < total:
        if r1[1] <= offset:
            r1 = _next_run(it1, 1)
        if r2[1] <= offset:
            r2 = _next_run(it2, 2)
        f1, f2 = r1[2], r2[2]
        chunk = min(r1[1], r2[1]) - offset
        if strict and f1 != f2:
            yield f"Strict mode: Offset {offset} block status mismatch!\n"
            return
        if f1 & ZERO and f2 & ZERO:
            kind = SKIP
        elif (f1 & ALLOCATED) == (f2 & ALLOCATED):
            kind = CMP if f1 & ALLOCATED else SKIP
        else:
            kind = CHK1 if f1 & ALLOCATED else CHK2
        yield from _pieces(kind, offset, chunk, _at(r1, offset), _at(r2, offset))
        offset += chunk


def _walk_over(dev: BlockDevice, which: int, start: int) -> Iterator[_Piece]:
    """The part of the longer image past the shorter one: what is allocated must be zero."""
    kind = CHK1 if which == 1 else CHK2
    for run in _runs_of(dev, which, start):
        s, e, f, h = run
        if f & ALLOCATED and not f & ZERO:
            yield from _pieces(kind, s, e - s, h if which == 1 else None,
                               h if which == 2 else None)
        else:
            yield _Piece(s, e - s, SKIP)


def _follows(a: Host, b: Host, n: int) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a[0] == b[0] and a[1] + n == b[1]


class _Comparer:
    """Checks blocks of pieces in worker threads and consumes the results in order.

    The walk (block status) runs in the calling thread; each block is compared (or checked
    for zeros) by a worker, from file mappings or through the worker's own copy of the images.
    Results, progress and messages are handled strictly in guest order, so the output is the
    one of qemu-img's sequential loop.
    """

    def __init__(self, devs: tuple[BlockDevice, BlockDevice], names: tuple[str, str],
                 progress: Progress, base: int, out: Callable[[str], None],
                 reopen: tuple[Callable[[], BlockDevice], Callable[[], BlockDevice]] | None,
                 workers: int) -> None:
        self.devs = devs
        self.names = names
        self.progress = progress
        self.base = base
        self.out = out
        self.reopen = reopen
        self.workers = max(1, workers)
        self._pool: ThreadPoolExecutor | None = None
        self._mmaps: dict[int, mmap.mmap | None] = {}
        self._lock = threading.Lock()       # the mmap table, the list of opened devices
        self._dev_lock = threading.Lock()   # engine reads on the shared devices (no reopen)
        self._local = threading.local()
        self._opened: list[BlockDevice] = []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        for dev in self._opened:
            dev.close()
        self._opened.clear()
        for mm in self._mmaps.values():
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass    # still referenced from an exception's frame: GC unmaps it
        self._mmaps.clear()

    def advance(self, piece: _Piece) -> None:
        # qemu_progress_print(((float) chunk / progress_base) * 100, 100)
        delta = f32(f32(f32(float(piece.length)) / f32(float(self.base))) * 100)
        self.progress.print(delta, 100)

    # ------------------------------------------------------------------ ordering
    def run(self, pieces: Iterator[_Piece | str]) -> bool:
        """Consume pieces; False (after printing the message) at the first difference."""
        window: deque[tuple[list[_Piece], Future[int] | None, str | None]] = deque()
        try:
            try:
                for block, msg in self._blocks(pieces):
                    if block and block[0].kind != SKIP:
                        window.append((block, self._submit(block), None))
                    else:
                        window.append((block, None, msg))
                    while window and (len(window) > 2 * self.workers or window[0][1] is None
                                      or window[0][1].done()):
                        if not self._settle(*window.popleft()):
                            return False
            except CompareError:
                # a block-status error: what comes before it is still reported first
                while window:
                    if not self._settle(*window.popleft()):
                        return False
                raise
            while window:
                if not self._settle(*window.popleft()):
                    return False
            return True
        finally:
            for _, fut, _ in window:
                if fut is not None:
                    fut.cancel()

    def _settle(self, block: list[_Piece], fut: Future[int] | None, msg: str | None) -> bool:
        if msg is not None:
            self.out(msg)
            return False
        diff = -1 if fut is None else fut.result()
        if diff < 0:
            for p in block:
                self.advance(p)
            return True
        return self._report(block, diff)

    def _blocks(self, pieces: Iterator[_Piece | str]
                ) -> Iterator[tuple[list[_Piece], str | None]]:
        """Group consecutive pieces of one kind (host-contiguous, at most BLOCK bytes)."""
        pending: list[_Piece] = []
        pend_len = 0
        try:
            for p in pieces:
                if isinstance(p, str):
                    if pending:
                        yield pending, None
                    yield [], p
                    return
                last = pending[-1] if pending else None
                if (last is not None and p.kind == last.kind and p.kind != SKIP
                        and p.offset == last.offset + last.length
                        and pend_len + p.length <= BLOCK
                        and _follows(last.h1, p.h1, last.length)
                        and _follows(last.h2, p.h2, last.length)):
                    pending.append(p)
                    pend_len += p.length
                    continue
                if pending:
                    yield pending, None
                pending, pend_len = [p], p.length
        except _StatusFailed as e:
            if pending:
                yield pending, None
            raise CompareError(3, f"Sector allocation test failed for {self.names[e.which - 1]}",
                               corruption_lines(e.cause)) from None
        if pending:
            yield pending, None

    def _submit(self, block: list[_Piece]) -> Future[int]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="compare")
        return self._pool.submit(self._check, block)

    # ------------------------------------------------------------------ workers
    def _check(self, block: list[_Piece]) -> int:
        """The offset in the block of the first byte that differs (or is not zero), or -1."""
        start = block[0].offset
        n = block[-1].offset + block[-1].length - start
        kind = block[0].kind
        views: list[memoryview] = []
        try:
            if kind == CMP:
                views.append(self._view(1, block[0].h1, start, n, block))
                views.append(self._view(2, block[0].h2, start, n, block))
                return _first_difference(views[0], views[1], n)
            which = 1 if kind == CHK1 else 2
            views.append(self._view(which, block[0].h1 if which == 1 else block[0].h2,
                                    start, n, block))
            return _first_nonzero(views[0], n)
        finally:
            for v in views:
                v.release()

    def _view(self, which: int, h: Host, start: int, n: int, block: list[_Piece]
              ) -> memoryview:
        m = self._mapped(h, n)
        return m if m is not None else self._read(which, start, n, block)

    def _mapped(self, h: Host, n: int) -> memoryview | None:
        if h is None:
            return None
        fd, off = h
        try:
            mm = self._mmaps[fd]
        except KeyError:
            with self._lock:
                if fd not in self._mmaps:
                    self._mmaps[fd] = map_file(fd)
                mm = self._mmaps[fd]
        if mm is None or off + n > len(mm):
            return None
        return memoryview(mm)[off:off + n]

    def _device(self, which: int) -> BlockDevice | None:
        """This thread's copy of an image, or None to use the shared one under the lock."""
        if self.reopen is None:
            return None
        devs: dict[int, BlockDevice] | None = getattr(self._local, "devs", None)
        if devs is None:
            devs = self._local.devs = {}
        dev = devs.get(which)
        if dev is None:
            dev = self.reopen[which - 1]()
            devs[which] = dev
            with self._lock:
                self._opened.append(dev)
        return dev

    def _read(self, which: int, start: int, n: int, block: list[_Piece]) -> memoryview:
        bufs: list[bytearray] | None = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = [bytearray(BLOCK), bytearray(BLOCK)]
        view = memoryview(bufs[which - 1])[:n]
        try:
            own = self._device(which)
        except (Qcow2Error, OSError):
            own = None
        try:
            self._readinto(own, which, start, view)
            return view
        except (Qcow2Error, OSError) as e:
            err: BaseException = e
        # qemu-img reads piece by piece: name the piece that fails
        bad = start
        for p in block:
            try:
                self._readinto(own, which, p.offset,
                               view[p.offset - start:p.offset - start + p.length])
            except (Qcow2Error, OSError) as e:
                err, bad = e, p.offset
                break
        view.release()
        raise CompareError(4, f"Error while reading offset {bad} of {self.names[which - 1]}: "
                              f"{io_reason(err)}", corruption_lines(err))

    def _readinto(self, own: BlockDevice | None, which: int, offset: int,
                  view: memoryview) -> None:
        if own is not None:
            own.readinto(offset, view)
            return
        with self._dev_lock:
            self.devs[which - 1].readinto(offset, view)

    def _report(self, block: list[_Piece], diff: int) -> bool:
        pos = block[0].offset + diff
        for p in block:
            if pos < p.offset + p.length:
                # compare_buffers()/find_nonzero(): the first differing sector of the piece
                at = p.offset + (pos - p.offset) // SECTOR * SECTOR
                self.out(f"Content mismatch at offset {at}!\n")
                return False
            self.advance(p)
        raise AssertionError("difference outside the block")


def _first_difference(a: memoryview, b: memoryview, n: int) -> int:
    """Index of the first byte where `a` and `b` differ, -1 if none (vectorised compare)."""
    import numpy as np

    words = n // 8
    x = np.frombuffer(a, dtype=np.uint64, count=words)
    y = np.frombuffer(b, dtype=np.uint64, count=words)
    if np.array_equal(x, y):
        if a[words * 8:n] == b[words * 8:n]:
            return -1
        start = words * 8
    else:
        start = int(np.flatnonzero(x != y)[0]) * 8
    xb = np.frombuffer(a, dtype=np.uint8, count=n)
    yb = np.frombuffer(b, dtype=np.uint8, count=n)
    return start + int(np.flatnonzero(xb[start:start + 8] != yb[start:start + 8])[0])


def _first_nonzero(a: memoryview, n: int) -> int:
    """Index of the first non-zero byte of `a`, -1 if none."""
    import numpy as np

    words = n // 8
    x = np.frombuffer(a, dtype=np.uint64, count=words)
    if not x.any():
        if not any(a[words * 8:n]):
            return -1
        start = words * 8
    else:
        start = int(np.flatnonzero(x)[0]) * 8
    xb = np.frombuffer(a, dtype=np.uint8, count=n)
    return start + int(np.flatnonzero(xb[start:start + 8])[0])


def compare(dev1: BlockDevice, dev2: BlockDevice, names: tuple[str, str], *,
            strict: bool = False, progress: Progress | None = None,
            out: Callable[[str], None] = lambda s: None,
            reopen: tuple[Callable[[], BlockDevice], Callable[[], BlockDevice]] | None = None,
            workers: int = 0) -> int:
    """img_compare() after the images are open: 0 identical, 1 different.

    Messages go to `out` (stdout in qemu-img); CompareError carries the 3/4 error statuses.
    `reopen` opens independent copies of the images, so that worker threads can read through
    the engine in parallel (without it they take turns on `dev1`/`dev2`).
    """
    progress = progress or Progress(False, 2.0, use_signal=False)
    size1 = qemu_length(dev1)
    size2 = qemu_length(dev2)
    total = min(size1, size2)
    base = max(size1, size2)
    progress.print(0, 100)
    if strict and size1 != size2:
        out("Strict mode: Image size mismatch!\n")
        return 1
    cmp = _Comparer((dev1, dev2), names, progress, base, out, reopen,
                    workers or default_workers())
    try:
        if not cmp.run(_walk_common(dev1, dev2, total, strict)):
            return 1
        if size1 != size2:
            out("Warning: Image size mismatch!\n")
            which = 1 if size1 > size2 else 2
            over = dev1 if which == 1 else dev2
            if not cmp.run(_walk_over(over, which, total)):
                return 1
    finally:
        cmp.close()
    out("Images are identical.\n")
    return 0
