"""Fuzz harness: mutated real images through open, read, map, info, check and write.

A case fails when the library raises anything outside its error tree (`Qcow2Error`; an
`OSError` from the file system, such as EFBIG for a write at a crafted 2^56 offset, is also
part of the contract: it passes through, as QEMU reports -errno), takes
longer than `TIME_LIMIT` seconds, or allocates more than `MEMORY_LIMIT` bytes of Python
memory (tracemalloc also sees numpy's buffers). Both bounds are generous for the tiny seed
images: a crafted header that sizes an allocation or a loop from an unchecked field trips them.

Run the short bounded campaign with the test suite (tests/fuzz/test_fuzz.py); a longer one:

    QCOW2_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/fuzz -p no:cacheprovider
"""

from __future__ import annotations

import os
import shutil
import signal
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import qcow2

OK_ERRORS = (qcow2.Qcow2Error, OSError)
TIME_LIMIT = 10.0
MEMORY_LIMIT = 256 << 20


class Hang(Exception):
    """A case ran past TIME_LIMIT."""


class MemoryBlowUp(Exception):
    """A case allocated more than MEMORY_LIMIT."""


@contextmanager
def bounded(seconds: float = TIME_LIMIT, memory: int = MEMORY_LIMIT) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if peak > memory:
        raise MemoryBlowUp(f"peak Python memory {peak >> 20} MiB")


def make_seeds(root: Path) -> dict[str, bytes]:
    """Small images of every layout, written through the library itself (no oracle needed)."""
    seeds: dict[str, bytes] = {}
    variants: dict[str, dict[str, Any]] = {
        "v3": {},
        "v2": {"compat": "0.10"},
        "c512": {"cluster_size": 512},
        "c4k-rc1": {"cluster_size": 4096, "refcount_bits": 1},
        "rc64": {"refcount_bits": 64},
        "extl2": {"extended_l2": True, "cluster_size": 16384},
        "zstd": {"compression_type": "zstd"},
        "lazy": {"lazy_refcounts": True},
        "meta": {"preallocation": "metadata"},
    }
    for name, opts in variants.items():
        p = root / f"{name}.qcow2"
        qcow2.create(str(p), 4 << 20, **opts)
        with qcow2.open(str(p), readonly=False) as img:
            img.write(0, b"\x11" * 70000)
            img.write(3 << 20, os.urandom(5000))
            if name != "v2":
                img.write_zeroes(1 << 20, 1 << 16)
            img.discard(3 << 20, 1 << 16)
        seeds[name] = p.read_bytes()
    p = root / "qcow1.qcow"
    qcow2.create(str(p), 4 << 20, fmt="qcow")
    with qcow2.open(str(p), readonly=False) as img:
        img.write(512, b"\x22" * 9000)
    seeds["qcow1"] = p.read_bytes()
    return seeds


def run_case(data: bytes, workdir: Path) -> None:
    """Everything a user might do with an untrusted image; only Qcow2Error may escape."""
    path = workdir / "case.img"
    path.write_bytes(data)
    try:
        img = qcow2.open(str(path), backing_policy="never", open_backing=False)
    except OK_ERRORS:
        return
    try:
        size = img.virtual_size
        for off, n in ((0, 4096), (size // 2, 70000), (max(0, size - 1000), 1000)):
            n = max(0, min(n, size - off))
            try:
                img.read(off, n)
            except OK_ERRORS:
                pass
        try:
            for k, _ in enumerate(img.extents(0, min(size, 1 << 40))):
                if k > 100000:
                    break
        except OK_ERRORS:
            pass
        from qcow2.ops.info import image_info

        try:
            image_info(img, str(path))
        except OK_ERRORS:
            pass
    finally:
        img.close()
    try:
        qcow2.check(str(path))
    except OK_ERRORS:
        pass
    rw = workdir / "case-rw.img"
    shutil.copyfile(path, rw)
    try:
        qcow2.check(str(rw), repair="all")
    except OK_ERRORS:
        pass
    shutil.copyfile(path, rw)
    try:
        w = qcow2.open(str(rw), readonly=False, backing_policy="never", open_backing=False)
    except OK_ERRORS:
        return
    try:
        try:
            if w.virtual_size:
                w.write(min(w.virtual_size - 1, 12345), b"\x5a")
            w.flush()
        except OK_ERRORS:
            pass
    finally:
        try:
            w.close()
        except OK_ERRORS:
            pass
