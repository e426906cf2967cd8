"""Crash tests for amend (engine/amend.py): a new refcount width, a compat=0.10 downgrade
(zero clusters expanded in the active and the snapshot L2 tables, with and without a backing
file) and a compat=1.1 upgrade (the snapshot table rewritten with v3 extra data first).
Every prefix of the recorded write log (and a shuffled part of the last unflushed batch,
or its newest write alone, as a disk may persist that batch in any order) must leave an
image that

- `qemu-img check` finds free of corruption and check errors (leaks are allowed, except
  once the amend has completed);
- our reader opens;
- reads, on the active layer and in every snapshot, exactly as before the amend (amend never
  changes guest content).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import qcow2
from qcow2.engine.image import Qcow2Image
from qcow2.engine.writer import WritableQcow2Image
from qcow2.io import FileStore
from tests.conftest import qemu_img, qemu_io
from tests.crash.test_crash_replay import RecordingStore, _apply

pytestmark = pytest.mark.oracle

SIZE = 4 << 20
MAX_CUTS = 30  # evenly spread cut points per amend
FLUSH_CUTS = 10  # flushes whose neighbourhood (just before/after) is replayed as well

Log = list[tuple[Any, ...]]


def _check(path: Path, where: object) -> dict[str, Any]:
    r = qemu_img("check", "--output=json", path, check=False)
    assert r.returncode in (0, 3), (where, r.returncode, r.stdout, r.stderr)
    res: dict[str, Any] = json.loads(r.stdout)
    assert res.get("corruptions", 0) == 0, (where, r.stderr)
    assert res.get("check-errors", 0) == 0, (where, r.stderr)
    return res


def _open(path: Path, backing: Path | None) -> Qcow2Image:
    img = Qcow2Image(FileStore(str(path)), str(path))
    if backing is not None:
        img.backing = qcow2.open(str(backing))
    return img


def _contents(path: Path, backing: Path | None) -> tuple[int, bytes, dict[str, bytes]]:
    """(header version, active content, content of every snapshot by ID)"""
    with closing(_open(path, backing)) as img:
        version = img.header.version
        active = img.read(0, SIZE)
        ids = [s.id_str for s in img.snapshots]
    snaps = {}
    for sid in ids:
        with closing(_open(path, backing)) as img:
            img.load_snapshot(sid)
            snaps[sid] = img.read(0, SIZE)
    return version, active, snaps


def _cuts(log: Log) -> list[int]:
    """Evenly spread log positions, plus the neighbourhood of some flushes (the last ones,
    where the header switches, and a spread of the others): a crash right before a flush,
    right after it, and after the first write that follows it."""
    n = len(log)
    cuts = set(range(0, n + 1, -(-n // MAX_CUTS) or 1)) | {n}
    flushes = [i for i, op in enumerate(log) if op[0] == "f"]
    chosen = set(flushes[-4:])
    chosen |= set(flushes[::-(-len(flushes) // (FLUSH_CUTS - 4)) or 1])
    for f in chosen:
        cuts |= {c for c in (f, f + 1, f + 2) if c <= n}
    return sorted(cuts)


def _replay(p: Path, backing: Path | None, amend: Callable[[WritableQcow2Image], object],
            expect_version: int, expect_refcount_bits: int, snapshots: bool = True,
            done_check: Callable[[Qcow2Image], object] | None = None) -> None:
    base = p.read_bytes()
    version0, active0, snaps0 = _contents(p, backing)
    assert bool(snaps0) == snapshots
    store = RecordingStore(base, str(p))
    img = WritableQcow2Image(store, str(p))
    if backing is not None:
        img.backing = qcow2.open(str(backing))
    amend(img)
    img.close()
    log = store.log
    assert any(op[0] == "w" for op in log)

    out = p.with_name("crash.qcow2")
    # The completed amend did what it was asked, and left nothing behind.
    out.write_bytes(_apply(base, log))
    res = _check(out, "final")
    assert res.get("leaks", 0) == 0, res
    with closing(_open(out, backing)) as done:
        assert done.header.version == expect_version
        assert done.header.refcount_bits == expect_refcount_bits
        if done_check is not None:
            done_check(done)
    assert _contents(out, backing)[1:] == (active0, snaps0)

    rnd = random.Random(p.name)
    for cut in _cuts(log):
        last_flush = max(i for i in range(cut + 1) if i == 0 or log[i - 1][0] == "f")
        batch = log[last_flush:cut]
        variants = [log[:cut]]
        if len(batch) > 1:
            # the unflushed batch persisted in part, in any order: a random part, and its
            # newest write alone (what a missing flush before a commit write looks like)
            keep = [op for op in batch if rnd.random() < 0.5]
            rnd.shuffle(keep)
            variants += [log[:last_flush] + keep, log[:last_flush] + batch[-1:]]
        for k, variant in enumerate(variants):
            out.write_bytes(_apply(base, variant))
            where = (cut, len(log), k)
            _check(out, where)
            version, active, snaps = _contents(out, backing)
            assert version in (version0, expect_version), where
            assert active == active0, where
            assert snaps == snaps0, where


# ----------------------------------------------------------------------------- images
def _data_and_snapshot(p: Path, opts: str, *, snapshot: bool = True) -> None:
    """About 3 MiB of data (many refblocks with small clusters), zero clusters of both
    kinds on v3, a snapshot sharing all of it, then writes after the snapshot."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, str(SIZE))
    v3 = "compat=0.10" not in opts
    qemu_io(p, "write -P 1 0 320k", "write -P 2 1M 2M", "write -P 3 3M 64k")
    if v3:
        qemu_io(p, "write -z 64k 32k", "write -z 3584k 64k")  # zero-alloc, zero-plain
    if snapshot:
        qemu_img("snapshot", "-c", "snap1", p)
        qemu_io(p, "write -P 4 128k 64k", "write -P 5 1536k 16k", "write -P 6 3200k 8k")
        if v3:
            qemu_io(p, "write -z 1600k 32k", "write -z 3712k 16k")


@pytest.mark.parametrize(("opts", "bits", "snapshot"), [
    ("cluster_size=1024", 2, True),
    ("cluster_size=512", 64, True),  # the new reftable spans several clusters
    ("cluster_size=512", 8, True),
    ("cluster_size=1024,refcount_bits=64", 1, False),  # refcount 2 does not fit in 1 bit
], ids=["16to2", "16to64-512", "16to8-512", "64to1-nosnap"])
def test_amend_refcount_bits_every_prefix(tmp_path: Path, opts: str, bits: int,
                                          snapshot: bool) -> None:
    p = tmp_path / "img.qcow2"
    _data_and_snapshot(p, opts, snapshot=snapshot)
    _replay(p, None, lambda i: i.amend(refcount_bits=bits), 3, bits, snapshots=snapshot)


def _zero_clusters(p: Path) -> None:
    """Zero clusters for the downgrade: zero-plain over unallocated (or backed) ranges and
    zero-alloc over data, before and after a snapshot; after it also over data the snapshot
    shares (refcount 2), while the second L2 table (2M..4M) stays shared with the snapshot
    (its zero-alloc clusters have refcount 2 through the shared table alone)."""
    qemu_io(p, "write -P 1 0 256k", "write -P 2 1M 512k", "write -P 3 2304k 64k",
            "write -P 7 3584k 64k",
            "write -z 512k 64k", "write -z 32k 16k", "write -z 2320k 16k",
            "write -z 2560k 32k")
    qemu_img("snapshot", "-c", "snap1", p)
    # after it, in the first L2 table only: zero-alloc over shared data, zero-plain over
    # unallocated, new data then zeroed, zero-alloc over data copied on write
    qemu_io(p, "write -z 1088k 32k", "write -z 768k 16k", "write -P 8 1800k 16k",
            "write -z 1800k 8k", "write -P 11 128k 16k", "write -z 128k 8k")


@pytest.mark.parametrize("with_backing", [False, True], ids=["standalone", "backing"])
def test_amend_downgrade_every_prefix(tmp_path: Path, with_backing: bool) -> None:
    p = tmp_path / "top.qcow2"
    backing = None
    if with_backing:
        backing = tmp_path / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", backing, str(SIZE))
        qemu_io(backing, "write -P 9 0 4M")  # every zero-plain cluster hides backing data
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", backing,
                 "-F", "qcow2", p)
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, str(SIZE))
    _zero_clusters(p)
    _replay(p, backing, lambda i: i.amend(compat="0.10"), 2, 16)


def _strip_snapshot_extra_data(p: Path) -> None:
    """Rewrite the snapshot table in place without extra data, as QEMU before 1.7 (or
    another v2 writer) left it: the upgrade must then rewrite the table first."""
    data = bytearray(p.read_bytes())
    nb, offset = struct.unpack_from(">IQ", data, 60)
    entries = []
    pos = offset
    for _ in range(nb):
        id_len, name_len = struct.unpack_from(">HH", data, pos + 12)
        extra = struct.unpack_from(">I", data, pos + 36)[0]
        names = data[pos + 40 + extra:pos + 40 + extra + id_len + name_len]
        entry = data[pos:pos + 36] + bytes(4) + names
        entries.append(entry + bytes(-len(entry) % 8))
        pos += 40 + extra + id_len + name_len
        pos += -(pos - offset) % 8
    table = b"".join(entries)
    data[offset:pos] = table + bytes(pos - offset - len(table))
    p.write_bytes(bytes(data))
    with closing(Qcow2Image(FileStore(str(p)), str(p))) as img:
        assert [sn.extra_data_size for sn in img.snapshots] == [0] * nb


@pytest.mark.parametrize("bits", [None, 4], ids=["v3", "v3-refcount4"])
def test_amend_upgrade_every_prefix(tmp_path: Path, bits: int | None) -> None:
    p = tmp_path / "v2.qcow2"
    _data_and_snapshot(p, "compat=0.10,cluster_size=4096")
    qemu_img("snapshot", "-c", "snap2", p)
    qemu_io(p, "write -P 10 0 8k")
    _strip_snapshot_extra_data(p)
    r = qemu_img("check", p, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    kw: dict[str, Any] = {"compat": "1.1"}
    if bits is not None:
        kw["refcount_bits"] = bits

    def extra_data_written(done: Qcow2Image) -> None:
        assert [sn.extra_data_size for sn in done.snapshots] == [24, 24]

    _replay(p, None, lambda i: i.amend(**kw), 3, bits or 16, done_check=extra_data_written)
