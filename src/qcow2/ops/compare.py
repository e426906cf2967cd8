"""compare: are two images' guest contents equal, as `qemu-img compare` (7.2) decides it.

qemu-img walks both images with bdrv_block_status_above(): ranges that read as zero on both
sides are skipped, ranges allocated on both sides are read and compared, and where only one
side is allocated that side must read as zero. Mismatches are reported at the first differing
512-byte sector of the 2 MiB piece being compared. Strict mode (-s) also requires equal sizes
and identical block status flags, so `status_runs()` reproduces QEMU's runs exactly, down to
where they split (qcow2: at L2 table boundaries; qcow: per cluster) and the EOF flag.

Reads are done in blocks of up to 8 MiB (both images at once, the second in a helper thread)
and compared with memcmp; the per-piece walk only decides what to read and what to print.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine.device import STATUS_DATA, STATUS_OFFSET_VALID, STATUS_ZERO
from ..errors import Qcow2Error
from .convert import corruption_lines, io_reason
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


def _layer_runs(dev: BlockDevice, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, status bits) of one layer, split as QEMU's driver would answer."""
    if end <= start:
        return
    gran = _granularity(dev)
    run: LayerRun
    for run in dev.layer_status(start, end - start):
        s = run.start
        e = min(run.start + run.length, end)
        st = run.status & _LAYER_BITS
        if gran is None:
            yield s, e, st
            continue
        while s < e:
            cut = min(e, (s // gran + 1) * gran)
            yield s, cut, st
            s = cut


def status_runs(dev: BlockDevice, start: int = 0) -> Iterator[tuple[int, int, int]]:
    """bdrv_block_status_above(dev, NULL) answered from `start` to the end: (start, end, flags).

    Flags are DATA/ZERO/OFFSET_VALID/ALLOCATED/EOF as QEMU returns them, including its quirks:
    past a shorter backing file the range is ZERO|ALLOCATED, a range unallocated in the whole
    chain keeps the bottom layer's own EOF bit, and EOF is set on the run reaching the end.
    """
    size = qemu_length(dev)
    for s, e, st in _layer_runs(dev, start, size):
        top_eof = e == size
        if st & (DATA | ZERO):
            yield s, e, st | ALLOCATED | (EOF if top_eof else 0)
        elif dev.backing is None:
            yield s, e, st | ZERO | (EOF if top_eof else 0)
        else:
            for ss, se, f in _below(dev, s, e):
                yield ss, se, f | (EOF if top_eof and se == e else 0)


def _below(dev: BlockDevice, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The backing chain's answer for [start, end), unallocated in `dev` (which has one)."""
    b = dev.backing
    assert b is not None
    bsize = qemu_length(b)
    if start >= bsize:
        # the backing layer answers "nothing at or past my end": zeros, counted as allocated
        yield start, end, ZERO | ALLOCATED
        return
    mid = min(end, bsize)
    for s, e, st in _layer_runs(b, start, mid):
        if st & (DATA | ZERO):
            yield s, e, st | ALLOCATED
        elif b.backing is None:
            yield s, e, st | ZERO | (EOF if e == bsize else 0)
        else:
            yield from _below(b, s, e)
    if end > mid:
        yield mid, end, ZERO | ALLOCATED


# ----------------------------------------------------------------------------- the walk
SKIP, CMP, CHK1, CHK2 = 0, 1, 2, 3


@dataclass(slots=True)
class _Piece:
    offset: int
    length: int
    kind: int


class _StatusFailed(Exception):
    def __init__(self, which: int, cause: BaseException) -> None:
        super().__init__()
        self.which = which
        self.cause = cause


def _runs_of(dev: BlockDevice, which: int, start: int = 0) -> Iterator[tuple[int, int, int]]:
    try:
        yield from status_runs(dev, start)
    except (Qcow2Error, OSError) as e:
        raise _StatusFailed(which, e) from None


def _next_run(it: Iterator[tuple[int, int, int]], which: int) -> tuple[int, int, int]:
    r = next(it, None)
    if r is None:
        raise _StatusFailed(which, Qcow2Error("block status ended before the image end"))
    return r


def _pieces(kind: int, offset: int, chunk: int) -> Iterator[_Piece]:
    if kind == SKIP:
        yield _Piece(offset, chunk, SKIP)
        return
    end = offset + chunk
    while offset < end:
        n = min(IO_BUF_SIZE, end - offset)
        yield _Piece(offset, n, kind)
        offset += n


def _walk_common(dev1: BlockDevice, dev2: BlockDevice, total: int, strict: bool
                 ) -> Iterator[_Piece | str]:
    """Pieces over [0, total); a string is the strict-mode message that ends the walk."""
    it1 = _runs_of(dev1, 1)
    it2 = _runs_of(dev2, 2)
    e1 = e2 = 0
    f1 = f2 = 0
    offset = 0
    while offset < total:
        if e1 <= offset:
            _, e1, f1 = _next_run(it1, 1)
        if e2 <= offset:
            _, e2, f2 = _next_run(it2, 2)
        chunk = min(e1, e2) - offset
        if strict and f1 != f2:
            yield f"Strict mode: Offset {offset} block status mismatch!\n"
            return
        if f1 & ZERO and f2 & ZERO:
            kind = SKIP
        elif (f1 & ALLOCATED) == (f2 & ALLOCATED):
            kind = CMP if f1 & ALLOCATED else SKIP
        else:
            kind = CHK1 if f1 & ALLOCATED else CHK2
        yield from _pieces(kind, offset, chunk)
        offset += chunk


def _walk_over(dev: BlockDevice, which: int, start: int) -> Iterator[_Piece]:
    """The part of the longer image past the shorter one: what is allocated must be zero."""
    kind = CHK1 if which == 1 else CHK2
    for s, e, f in _runs_of(dev, which, start):
        if f & ALLOCATED and not f & ZERO:
            yield from _pieces(kind, s, e - s)
        else:
            yield _Piece(s, e - s, SKIP)


class _Comparer:
    def __init__(self, dev1: BlockDevice, dev2: BlockDevice, names: tuple[str, str],
                 progress: Progress, base: int, out: Callable[[str], None]) -> None:
        self.devs = (dev1, dev2)
        self.names = names
        self.progress = progress
        self.base = base
        self.out = out
        self.buf1 = bytearray(BLOCK)
        self.buf2 = bytearray(BLOCK)
        self.zeros = bytes(BLOCK)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def advance(self, piece: _Piece) -> None:
        # qemu_progress_print(((float) chunk / progress_base) * 100, 100)
        delta = f32(f32(f32(float(piece.length)) / f32(float(self.base))) * 100)
        self.progress.print(delta, 100)

    def run(self, pieces: Iterator[_Piece | str]) -> bool:
        """Consume pieces; False (after printing the message) at the first difference."""
        pending: list[_Piece] = []
        pend_len = 0
        try:
            for p in pieces:
                if isinstance(p, str):
                    if not self.flush(pending):
                        return False
                    self.out(p)
                    return False
                if (pending and p.kind == pending[0].kind and p.kind != SKIP
                        and p.offset == pending[-1].offset + pending[-1].length
                        and pend_len + p.length <= BLOCK):
                    pending.append(p)
                    pend_len += p.length
                    continue
                if not self.flush(pending):
                    return False
                if p.kind == SKIP:
                    pending, pend_len = [], 0
                    self.advance(p)
                else:
                    pending, pend_len = [p], p.length
        except _StatusFailed as e:
            if not self.flush(pending):
                return False
            raise CompareError(3, f"Sector allocation test failed for {self.names[e.which - 1]}",
                               corruption_lines(e.cause)) from None
        return self.flush(pending)

    def flush(self, pending: list[_Piece]) -> bool:
        if not pending:
            return True
        start = pending[0].offset
        n = pending[-1].offset + pending[-1].length - start
        kind = pending[0].kind
        if kind == CMP:
            if n >= (1 << 20):
                # read both images at once: the engine releases the GIL in pread/inflate
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="compare")
                fut = self._pool.submit(self._read, 2, start, n, pending)
                try:
                    self._read(1, start, n, pending)
                finally:
                    wait([fut])
                fut.result()
            else:
                self._read(1, start, n, pending)
                self._read(2, start, n, pending)
            a = self.buf1 if n == BLOCK else self.buf1[:n]
            b = self.buf2 if n == BLOCK else self.buf2[:n]
            if a == b:
                for p in pending:
                    self.advance(p)
                return True
            return self._report(pending, _first_difference(a, b, n))
        which = 1 if kind == CHK1 else 2
        self._read(which, start, n, pending)
        buf = self.buf1 if which == 1 else self.buf2
        a = buf if n == BLOCK else buf[:n]
        z = self.zeros if n == BLOCK else self.zeros[:n]
        if a == z:
            for p in pending:
                self.advance(p)
            return True
        return self._report(pending, _first_difference(a, z, n))

    def _read(self, which: int, start: int, n: int, pending: list[_Piece]) -> None:
        dev = self.devs[which - 1]
        buf = self.buf1 if which == 1 else self.buf2
        view = memoryview(buf)
        try:
            dev.readinto(start, view[:n])
            return
        except (Qcow2Error, OSError) as e:
            err: BaseException = e
        # qemu-img reads piece by piece: name the piece that fails
        bad = start
        for p in pending:
            try:
                dev.readinto(p.offset, view[p.offset - start:p.offset - start + p.length])
            except (Qcow2Error, OSError) as e:
                err, bad = e, p.offset
                break
        raise CompareError(4, f"Error while reading offset {bad} of {self.names[which - 1]}: "
                              f"{io_reason(err)}", corruption_lines(err))

    def _report(self, pending: list[_Piece], diff: int) -> bool:
        pos = pending[0].offset + diff
        for p in pending:
            if pos < p.offset + p.length:
                # compare_buffers()/find_nonzero(): the first differing sector of the piece
                at = p.offset + (pos - p.offset) // SECTOR * SECTOR
                self.out(f"Content mismatch at offset {at}!\n")
                return False
            self.advance(p)
        raise AssertionError("difference outside the block")


def _first_difference(a: bytes | bytearray, b: bytes | bytearray, n: int) -> int:
    import numpy as np

    x = np.frombuffer(a, dtype=np.uint8, count=n)
    y = np.frombuffer(b, dtype=np.uint8, count=n)
    return int(np.flatnonzero(x != y)[0])


def compare(dev1: BlockDevice, dev2: BlockDevice, names: tuple[str, str], *,
            strict: bool = False, progress: Progress | None = None,
            out: Callable[[str], None] = lambda s: None) -> int:
    """img_compare() after the images are open: 0 identical, 1 different.

    Messages go to `out` (stdout in qemu-img); CompareError carries the 3/4 error statuses.
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
    cmp = _Comparer(dev1, dev2, names, progress, base, out)
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
