"""Crash tests for snapshot create, apply and delete: every prefix of the recorded write log
(and a shuffled part of the last unflushed batch) must leave an image in which

- `qemu-img check` finds no corruption except OFLAG_COPIED mismatches of the harmless kind
  (QEMU's own snapshot code has these windows, see engine/snapshot.py): COPIED clear on a
  cluster used once, or COPIED set where the extra refcount is a leak (reference=1);
- the active disk reads as before or after the operation in progress, and every snapshot
  the table lists reads as it was taken.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2.engine.image import Qcow2Image
from qcow2.engine.writer import WritableQcow2Image
from qcow2.io import FileStore
from tests.conftest import qemu_img, qemu_io
from tests.crash.test_crash_replay import RecordingStore, _apply

pytestmark = pytest.mark.oracle

SIZE = 4 << 20
_COPIED_RE = re.compile(r"ERROR OFLAG_COPIED (?:data|L2) cluster: .*?_entry=([0-9a-f]+) "
                        r"refcount=(\d+)")
_LEAK_RE = re.compile(r"Leaked cluster (\d+) refcount=\d+ reference=(\d+)")


def _check(path: Path, cluster_bits: int, where: object) -> None:
    r = qemu_img("check", "--output=json", path, check=False)
    assert r.returncode in (0, 2, 3), (where, r.stdout, r.stderr)
    res = json.loads(r.stdout)
    assert res.get("check-errors", 0) == 0, (where, r.stderr)
    once = {int(m[1]) for m in _LEAK_RE.finditer(r.stderr) if m[2] == "1"}
    harmless = 0
    for m in _COPIED_RE.finditer(r.stderr):
        entry = int(m[1], 16)
        if entry >> 63:  # COPIED set: only safe if nothing but a leak shares the cluster
            cluster = (entry & 0x00FFFFFFFFFFFE00) >> cluster_bits
            assert cluster in once, (where, m[0], r.stderr)
        harmless += 1
    assert "ERROR cluster" not in r.stderr, (where, r.stderr)
    assert res.get("corruptions", 0) == harmless, (where, r.stderr)


def _contents(path: Path) -> tuple[bytes, dict[str, bytes]]:
    with Qcow2Image(FileStore(str(path)), str(path)) as img:
        active = img.read(0, SIZE)
        ids = [s.id_str for s in img.snapshots]
    snaps = {}
    for sid in ids:
        with Qcow2Image(FileStore(str(path)), str(path)) as img:
            img.load_snapshot(sid)
            snaps[sid] = img.read(0, SIZE)
    return active, snaps


Op = Callable[[WritableQcow2Image], object]


@pytest.mark.parametrize("opts", ["cluster_size=4096", "compat=0.10,cluster_size=4096",
                                  "extended_l2=on,cluster_size=16384", "refcount_bits=64"])
def test_snapshot_operations_every_prefix(tmp_path: Path, opts: str) -> None:
    p = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, str(SIZE))
    qemu_io(p, "write -P 1 0 96k", "write -P 2 3M 40k")
    qemu_img("snapshot", "-c", "old", p)
    qemu_io(p, "write -P 3 32k 64k", "write -P 4 2M 8k")
    base = p.read_bytes()
    store = RecordingStore(base, str(p))
    img = WritableQcow2Image(store, str(p))
    cb = img.cluster_bits

    ops: list[tuple[str, Op]] = [
        ("create", lambda i: i.create_snapshot("new")),
        # Guest writes after a snapshot copy on write (one L2 table each: atomic enough).
        ("write", lambda i: i.write(20000, b"\x05" * 70000)),
        ("write", lambda i: i.write(3 << 20, b"\x06" * 5000)),
        ("apply", lambda i: i.apply_snapshot("old")),
        ("delete", lambda i: i.delete_snapshot(name="new")),
        ("delete-last", lambda i: i.delete_snapshot(name="old")),
    ]
    # (log position, active content, snapshot contents by ID) before and after each op
    states: list[tuple[int, bytes, dict[str, bytes]]] = []
    out = tmp_path / "crash.qcow2"
    out.write_bytes(base)
    act, snaps = _contents(out)
    states.append((len(store.log), act, snaps))
    for _, op in ops:
        op(img)
        img.flush()
        out.write_bytes(_apply(base, store.log))
        act, snaps = _contents(out)
        states.append((len(store.log), act, snaps))
    img.close()
    log = store.log
    rnd = random.Random(opts)
    for k, (name, _) in enumerate(ops):
        lo, before, snaps_before = states[k]
        hi, after, snaps_after = states[k + 1]
        known = {**snaps_before, **snaps_after}
        step = max(1, (hi - lo) // 40)
        for cut in sorted(set(range(lo, hi + 1, step)) | {hi}):
            last_flush = max(i for i in range(cut + 1) if i == 0 or log[i - 1][0] == "f")
            batch = log[last_flush:cut]
            keep = [op for op in batch if rnd.random() < 0.5]
            rnd.shuffle(keep)
            for variant in (log[:cut], log[:last_flush] + keep):
                out.write_bytes(_apply(base, variant))
                where = (name, cut)
                _check(out, cb, where)
                active, listed = _contents(out)
                assert active in (before, after), where
                for sid, content in listed.items():
                    assert content == known[sid], (where, sid)
