"""Crash tests: a recording store keeps every write and flush of a workload; replaying every
prefix of the log (and random subsets of the last unflushed batch, as a disk may persist
them in any order) must leave an image that qemu-img check finds free of corruption (leaks
are allowed) and in which every byte that was flushed before the cut reads back intact."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from qcow2.engine.writer import WritableQcow2Image
from qcow2.io import FileStore, MemoryStore
from tests.conftest import qemu_img

pytestmark = pytest.mark.oracle

SIZE = 4 << 20


class RecordingStore(MemoryStore):
    """A MemoryStore that logs ('w', offset, data), ('t', size) and ('f',) operations."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data, name=name, writable=True)
        self.log: list[tuple[Any, ...]] = []

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.log.append(("w", offset, bytes(data)))
        super().pwrite(offset, data)

    def truncate(self, size: int) -> None:
        self.log.append(("t", size))
        super().truncate(size)

    def punch_hole(self, offset: int, length: int) -> None:
        # A punched range reads as zeros: replay it as a zero write.
        self.pwrite(offset, bytes(min(length, max(0, len(self.buf) - offset))))

    def flush(self) -> None:
        self.log.append(("f",))


def _apply(base: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(base)
    for op in ops:
        if op[0] == "w":
            _, off, data = op
            if off + len(data) > len(buf):
                buf.extend(bytes(off + len(data) - len(buf)))
            buf[off:off + len(data)] = data
        elif op[0] == "t":
            del buf[op[1]:]
            buf.extend(bytes(op[1] - len(buf)))
    return bytes(buf)


def _workload(img: WritableQcow2Image, rnd: random.Random, model: bytearray,
              snapshots: list[tuple[int, bytes, list[tuple[int, int]]]],
              store: RecordingStore) -> None:
    cs = img.cluster_size
    for i in range(40):
        off = rnd.randrange(0, SIZE - 3 * cs)
        n = rnd.choice([rnd.randrange(1, 3000), cs, 2 * cs + 100])
        kind = rnd.random()
        if kind < 0.15:
            img.write_zeroes(off, n, unmap=rnd.random() < 0.5)
            model[off:off + n] = bytes(n)
        elif kind < 0.25:
            img.discard(off, n)
            lo = -(-off // cs) * cs
            hi = (off + n) // cs * cs
            if lo < hi:
                model[lo:hi] = bytes(hi - lo)
        else:
            data = bytes([i + 1]) * n
            img.write(off, data)
            model[off:off + n] = data
        # Ranges written since the newest flush are not protected by it.
        snapshots[-1][2].append((off, off + n))
        if rnd.random() < 0.3:
            img.flush()
            snapshots.append((len(store.log), bytes(model), []))
    img.flush()
    snapshots.append((len(store.log), bytes(model), []))


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=4096,refcount_bits=1",
                                  "compat=0.10", "extended_l2=on"])
def test_every_prefix_is_consistent(tmp_path: Path, opts: str) -> None:
    p = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, str(SIZE))
    base = p.read_bytes()
    store = RecordingStore(base, str(p))
    img = WritableQcow2Image(store, str(p))
    rnd = random.Random(opts)
    model = bytearray(SIZE)
    flushed: list[tuple[int, bytes, list[tuple[int, int]]]] = [(0, bytes(SIZE), [])]
    _workload(img, rnd, model, flushed, store)
    img.close()
    log = store.log
    cuts = sorted(set(range(0, len(log) + 1, max(1, len(log) // 60))) | {len(log)})
    out = tmp_path / "crash.qcow2"
    checked = 0
    for cut in cuts:
        last_flush = max(i for i in range(cut + 1) if i == 0 or log[i - 1][0] == "f")
        variants = [log[:cut]]
        batch = log[last_flush:cut]
        for _ in range(2):  # the unflushed batch persisted partially, in any order
            keep = [op for op in batch if rnd.random() < 0.5]
            rnd.shuffle(keep)
            variants.append(log[:last_flush] + keep)
        # The newest flush whose log position is at or before the cut protects its model.
        ref_len, ref_model, _ = max((s for s in flushed if s[0] <= last_flush),
                                    key=lambda s: s[0])
        touched = bytearray(SIZE)
        for s in flushed:
            if s[0] >= ref_len:
                for lo, hi in s[2]:
                    touched[lo:hi] = b"\x01" * (hi - lo)
        for ops in variants:
            out.write_bytes(_apply(base, ops))
            r = qemu_img("check", "--output=json", out, check=False)
            res = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
            assert r.returncode in (0, 3), (cut, r.stdout, r.stderr)
            assert res.get("corruptions", 0) == 0 and res.get("check-errors", 0) == 0
            with WritableQcow2Image.__mro__[1](FileStore(str(out)), str(out)) as ro:
                got = ro.read(0, SIZE)
            # Every byte not written after the protecting flush equals the flushed model.
            for pos in range(0, SIZE, 4096):
                seg = slice(pos, pos + 4096)
                if not any(touched[seg]):
                    assert got[seg] == ref_model[seg], (cut, pos)
            checked += 1
    assert checked >= len(cuts)
