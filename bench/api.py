"""Library-side workloads, run as a fresh process by bench/run.py (so they pay the same
start-up as a CLI command would).

    python bench/api.py read IMG [--chunk 4M]      sequential readinto() of the whole image
    python bench/api.py extents IMG [--json]       list(img.extents()) [printed as map JSON]
    python bench/api.py open IMG                   open + a few header fields (info stand-in)
    python bench/api.py preadv RAW [--chunk 4M]    os.preadv of a plain file (I/O floor)
    python bench/api.py write IMG -s 4K -S STEP -c N [-o 0] [--pattern 0xa5]
                                                   N writes of -s bytes, as `qemu-img bench -w`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _chunk(text: str) -> int:
    text = text.upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def cmd_read(path: str, chunk: int) -> dict[str, float]:
    import qcow2

    buf = bytearray(chunk)
    view = memoryview(buf)
    with qcow2.open(path) as img:
        size = img.virtual_size
        pos = 0
        t0 = time.perf_counter()
        while pos < size:
            n = min(chunk, size - pos)
            img.readinto(pos, view[:n])
            pos += n
        dt = time.perf_counter() - t0
    return {"bytes": size, "seconds": dt, "MiB_per_s": size / dt / (1 << 20)}


def cmd_preadv(path: str, chunk: int) -> dict[str, float]:
    buf = bytearray(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        t0 = time.perf_counter()
        while pos < size:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                break
            pos += n
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return {"bytes": size, "seconds": dt, "MiB_per_s": size / dt / (1 << 20)}


def cmd_extents(path: str, as_json: bool) -> dict[str, float]:
    import qcow2

    with qcow2.open(path) as img:
        t0 = time.perf_counter()
        exts = list(img.extents())
        dt = time.perf_counter() - t0
        if as_json:
            out = sys.stdout
            out.write("[")
            out.write(",\n".join(json.dumps(e.to_map_json()) for e in exts))
            out.write("]\n")
    return {"extents": len(exts), "seconds": dt}


def bench_offsets(size: int, step: int, count: int, offset: int, image_size: int
                  ) -> list[int]:
    """The offsets `qemu-img bench` (7.2) uses: start at -o, then add -S modulo the image size.

    (qemu-img.c bench_cb: `b->offset += b->step; b->offset %= b->image_size;`. Later QEMU
    wraps modulo image_size - bufsize instead; the runs here never reach the end, so both
    rules give the same sequence. A request past the end is an error there, and here too.)
    """
    out = []
    off = offset
    for _ in range(count):
        if off + size > image_size:
            raise SystemExit(f"write at {off} + {size} is past the end ({image_size})")
        out.append(off)
        off = (off + step) % image_size if image_size else 0
    return out


def cmd_write(path: str, size: int, step: int, count: int, offset: int,
              pattern: int) -> dict[str, float]:
    """Like `qemu-img bench -w -d 1 -t writeback`: one write at a time, one flush at the end."""
    import qcow2

    buf = bytes([pattern]) * size
    t0 = time.perf_counter()
    with qcow2.open(path, readonly=False) as img:
        offsets = bench_offsets(size, step, count, offset, img.virtual_size)
        write = img.write
        for off in offsets:
            write(off, buf)
        img.flush()
    dt = time.perf_counter() - t0
    return {"bytes": size * count, "seconds": dt, "MiB_per_s": size * count / dt / (1 << 20),
            "writes_per_s": count / dt}


def cmd_open(path: str) -> dict[str, float]:
    import qcow2

    t0 = time.perf_counter()
    with qcow2.open(path) as img:
        fields = {"virtual_size": img.virtual_size, "format": img.format_name,
                  "file_length": os.stat(path).st_size}
        sys.stdout.write(json.dumps(fields) + "\n")
    return {"seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="library-side benchmark workloads")
    ap.add_argument("op", choices=("read", "extents", "open", "preadv", "write"))
    ap.add_argument("path")
    ap.add_argument("--chunk", default="4M")
    ap.add_argument("--json", action="store_true")
    # write: the qemu-img bench options of the same name
    ap.add_argument("-s", dest="size", default="4K", help="write: buffer size")
    ap.add_argument("-S", dest="step", help="write: step between offsets (default: -s)")
    ap.add_argument("-c", dest="count", type=int, default=75000, help="write: request count")
    ap.add_argument("-o", dest="offset", default="0", help="write: first offset")
    ap.add_argument("--pattern", default="0", help="write: byte value of the buffer")
    ap.add_argument("--stats", help="write timing stats (JSON) to this file")
    a = ap.parse_args(argv)
    if a.op == "read":
        stats = cmd_read(a.path, _chunk(a.chunk))
    elif a.op == "preadv":
        stats = cmd_preadv(a.path, _chunk(a.chunk))
    elif a.op == "write":
        size = _chunk(a.size)
        stats = cmd_write(a.path, size, (_chunk(a.step) if a.step else 0) or size, a.count,
                          _chunk(a.offset), int(a.pattern, 0))
    elif a.op == "extents":
        stats = cmd_extents(a.path, a.json)
    else:
        stats = cmd_open(a.path)
    if a.stats:
        with open(a.stats, "w") as f:
            json.dump(stats, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
