"""Prototype: faster reads of compressed clusters (zlib and zstd).

Three independent changes to Qcow2Image._read_layer / _decompress, measured one by one:

  oneshot   zlib.decompress(raw, -12, cs) instead of a new decompressobj per cluster (falling
            back to the streaming path when the stream is unterminated, which QEMU accepts);
            zstd: one cached ZstdDecompressor and decompress(raw, max_output_size=cs) (falling
            back to the engine's frame loop on error) instead of a new decompressor per cluster.
  coalesce  one pread for a series of compressed clusters stored back to back (QEMU writes
            them so), instead of one pread per cluster.
  threads   decompress the clusters of one request in a thread pool (zlib and zstandard
            release the GIL); results are copied in request order.

    python bench/experiments/decompress.py IMG [--chunk 4M] [--repeat 3] [--threads 2]

Every variant's output is compared with the engine's for the whole image.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zstandard

import qcow2
from qcow2.engine.device import zero_fill
from qcow2.engine.image import (
    _COMPRESSED,
    _NORMAL,
    _ZERO_ALLOC,
    _ZERO_PLAIN,
    Qcow2Image,
    _zstd_decompress,
)
from qcow2.format import constants as C

MAX_COALESCE = 4 << 20


def make_decompressor(img: Qcow2Image) -> Callable[[bytes], bytes]:
    cs = img.cluster_size
    if img.header.compression_type == C.QCOW2_COMPRESSION_TYPE_ZSTD:
        local = threading.local()  # a ZstdDecompressor must not be shared between threads

        def zstd_one(raw: bytes) -> bytes:
            dctx = getattr(local, "dctx", None)
            if dctx is None:
                dctx = local.dctx = zstandard.ZstdDecompressor()
            try:
                out = dctx.decompress(raw, max_output_size=cs)
                if len(out) == cs:
                    return out
            except zstandard.ZstdError:
                pass
            return _zstd_decompress(raw, cs)

        return zstd_one

    def zlib_one(raw: bytes) -> bytes:
        try:
            return zlib.decompress(raw, -12, cs)
        except zlib.error:
            try:
                return zlib.decompressobj(-12).decompress(raw, cs)
            except zlib.error:
                return b""

    return zlib_one


def patched_read_layer(img: Qcow2Image, *, oneshot: bool, coalesce: bool,
                       pool: ThreadPoolExecutor | None) -> Callable[[int, memoryview], None]:
    cs = img.cluster_size
    layout = img.compressed_layout
    store = img.store
    if oneshot:
        one = make_decompressor(img)
    else:
        def one(raw: bytes) -> bytes:
            # the engine's _decompress without its pread
            if img.header.compression_type == C.QCOW2_COMPRESSION_TYPE_ZSTD:
                return _zstd_decompress(raw, cs)
            try:
                return zlib.decompressobj(-12).decompress(raw, cs)
            except zlib.error:
                return b""

    def fetch(entries: list[int]) -> list[bytes]:
        spans = [layout.decode(e) for e in entries]
        if not coalesce:
            return [store.pread(o, n) for o, n in spans]
        out: list[bytes] = []
        i = 0
        while i < len(spans):
            o0, n0 = spans[i]
            j = i + 1
            end = o0 + n0
            # back to back (QEMU's compressed clusters may share a sector: allow overlap)
            while (j < len(spans) and end - 512 <= spans[j][0] <= end
                   and spans[j][0] + spans[j][1] - o0 <= MAX_COALESCE):
                end = max(end, spans[j][0] + spans[j][1])
                j += 1
            buf = memoryview(store.pread(o0, end - o0))
            out.extend(bytes(buf[o - o0:o - o0 + n]) for o, n in spans[i:j])
            i = j
        return out

    def read_layer(offset: int, view: memoryview) -> None:
        comp: list[tuple[int, int, int]] = []  # (entry, guest start, length)
        for r_start, r_len, kind, host in img._map_runs(offset, len(view)):
            sub = view[r_start - offset:r_start - offset + r_len]
            if kind == _NORMAL:
                assert host is not None
                img.data_store.readinto(host, sub)
            elif kind in (_ZERO_PLAIN, _ZERO_ALLOC):
                zero_fill(sub)
            elif kind == _COMPRESSED:
                assert host is not None
                comp.append((host, r_start, r_len))
            else:
                img.read_backing_or_zero(r_start, sub)
        if not comp:
            return
        raws = fetch([e for e, _, _ in comp])
        datas = list(pool.map(one, raws)) if pool is not None and len(raws) > 1 else [
            one(r) for r in raws]
        for (_e, r_start, r_len), data in zip(comp, datas, strict=True):
            if len(data) != cs:
                raise qcow2.CorruptImageError("Could not decompress the compressed cluster")
            in_cl = r_start & (cs - 1)
            view[r_start - offset:r_start - offset + r_len] = data[in_cl:in_cl + r_len]

    return read_layer


def read_all(img: Any, chunk: int, sink: list[bytes] | None = None) -> float:
    buf = bytearray(chunk)
    view = memoryview(buf)
    size = img.virtual_size
    t0 = time.perf_counter()
    for pos in range(0, size, chunk):
        n = min(chunk, size - pos)
        img.readinto(pos, view[:n])
        if sink is not None:
            sink.append(bytes(view[:n]))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--chunk", type=int, default=4 << 20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args()
    pool = ThreadPoolExecutor(a.threads)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("engine", {}),
        ("oneshot", {"oneshot": True, "coalesce": False, "pool": None}),
        ("oneshot+coalesce", {"oneshot": True, "coalesce": True, "pool": None}),
        (f"oneshot+coalesce+{a.threads} threads",
         {"oneshot": True, "coalesce": True, "pool": pool}),
        (f"engine decompress+{a.threads} threads",
         {"oneshot": False, "coalesce": False, "pool": pool}),
    ]
    ref: list[bytes] | None = None
    if not a.no_verify:
        ref = []
        with qcow2.open(a.image) as img:
            read_all(img, a.chunk, ref)
    base = None
    for label, kw in variants:
        best = float("inf")
        for _ in range(a.repeat):
            with qcow2.open(a.image) as img:
                if kw:
                    img._read_layer = patched_read_layer(img, **kw)  # type: ignore[method-assign]
                best = min(best, read_all(img, a.chunk))
        ok = ""
        if ref is not None and kw:
            got: list[bytes] = []
            with qcow2.open(a.image) as img:
                img._read_layer = patched_read_layer(img, **kw)  # type: ignore[method-assign]
                read_all(img, a.chunk, got)
            ok = "identical" if got == ref else "DIFFERENT"
        base = base or best
        with qcow2.open(a.image) as img:
            size = img.virtual_size
        print(f"{label:36} {best:7.3f} s  {size / best / (1 << 20):7.0f} MiB/s  "
              f"x{base / best:4.2f}  {ok}")
    pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
