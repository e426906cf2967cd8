"""Library-side workloads, run as a fresh process by bench/run.py (so they pay the same
start-up as a CLI command would).

    python bench/api.py read IMG [--chunk 4M]      sequential readinto() of the whole image
    python bench/api.py extents IMG [--json]       list(img.extents()) [printed as map JSON]
    python bench/api.py open IMG                   open + a few header fields (info stand-in)
    python bench/api.py preadv RAW [--chunk 4M]    os.preadv of a plain file (I/O floor)
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
    ap.add_argument("op", choices=("read", "extents", "open", "preadv"))
    ap.add_argument("path")
    ap.add_argument("--chunk", default="4M")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stats", help="write timing stats (JSON) to this file")
    a = ap.parse_args(argv)
    if a.op == "read":
        stats = cmd_read(a.path, _chunk(a.chunk))
    elif a.op == "preadv":
        stats = cmd_preadv(a.path, _chunk(a.chunk))
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
