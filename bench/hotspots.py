"""cProfile our side of the slow benchmark rows and name the hot functions.

    .venv/bin/python bench/hotspots.py [--quick] [--only extents,read] [--huge-bytes 512G]

Writes bench/results/profile-<workload>.txt (top functions by own time and by cumulative
time) and bench/results/hotspots.md (a summary: the top functions of each workload with their
share of the run). Workloads run in-process on the corpus of bench/corpus.py:

    extents-huge   list(img.extents(0, N)) on the metadata-preallocated image (N: --huge-bytes,
                   default the first 512 GiB: the cost is linear in N)
    read-<kind>    img.readinto() of the whole plain / zlib / zstd image in 4 MiB chunks
    convert-<kind> `qcow2 convert -m 1 -O raw` via qcow2.cli.main.main() (one worker thread:
                   cProfile only sees the thread that enabled it)
    convert-raw-to-qcow2  `qcow2 convert -m 1 -O qcow2` of the raw ext4 image
    map-huge       `qcow2 map --output=json -l N` (N as for extents-huge), stdout discarded
    write-<n>k-<mode>  the write rows of run.py: img.write() of 4 KiB / 64 KiB buffers at the
                   offsets `qemu-img bench -w` uses, then flush; "alloc" into a fresh empty
                   image (made by qemu-img create in the untimed setup step), "inplace" into
                   a metadata-preallocated image that a first run has already written
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
sys.path.insert(0, str(BENCH_DIR))

import api  # noqa: E402
import corpus as corpus_mod  # noqa: E402
import qcow2  # noqa: E402
import run as run_mod  # noqa: E402


def _has_cli(cmd: str) -> bool:
    try:
        return importlib.util.find_spec(f"qcow2.cli.{cmd}") is not None
    except ImportError:
        return False


def w_extents(path: Path, nbytes: int) -> Callable[[], object]:
    def run() -> object:
        with qcow2.open(str(path)) as img:
            n = min(nbytes, img.virtual_size)
            return sum(1 for _ in img.extents(0, n))
    return run


def w_read(path: Path, chunk: int = 4 << 20) -> Callable[[], object]:
    def run() -> object:
        buf = bytearray(chunk)
        view = memoryview(buf)
        with qcow2.open(str(path)) as img:
            size = img.virtual_size
            for pos in range(0, size, chunk):
                img.readinto(pos, view[:min(chunk, size - pos)])
        return size
    return run


def w_cli(argv: list[str]) -> Callable[[], object]:
    def run() -> object:
        from qcow2.cli.main import main

        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return main(argv)
    return run


def w_write(path: Path, size: int, step: int, count: int) -> Callable[[], object]:
    def run() -> object:
        return api.cmd_write(str(path), size, step, count, 0, int(run_mod.WRITE_PATTERN, 0))
    return run


def creator(path: Path, vsize: int, *opts: str) -> Callable[[], None]:
    """Setup step: a fresh image, as qemu-img creates it (not timed)."""
    def setup() -> None:
        path.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path),
                        str(vsize)], check=True)
    return setup


def remover(path: Path) -> Callable[[], None]:
    """Setup step: delete the previous output (freeing its pages is not what we measure)."""
    return lambda: path.unlink(missing_ok=True)


def profile(name: str, fn: Callable[[], object], setup: Callable[[], None] | None = None,
            top: int = 25) -> dict[str, object]:
    setup = setup or (lambda: None)
    setup()
    fn()  # warm: page cache, imports
    setup()
    t0 = time.perf_counter()
    fn()
    plain = time.perf_counter() - t0
    setup()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    fn()
    pr.disable()
    profiled = time.perf_counter() - t0
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(15)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile-{name}.txt").write_text(
        f"# {name}: {plain:.3f} s unprofiled, {profiled:.3f} s under cProfile\n" + s.getvalue())
    raw = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    hot = sorted(raw.items(), key=lambda kv: -kv[1][2])[:6]
    rows = []
    for (fname, line, func), (_cc, nc, tt, _ct, _callers) in hot:
        short = fname
        if "/src/qcow2/" in fname:
            short = "qcow2/" + fname.split("/src/qcow2/", 1)[1]
        elif fname == "~":
            short = ""
        where = f"{short}:{line} " if short else ""
        rows.append((f"{where}{func}", nc, tt, tt / total))
    return {"name": name, "plain": plain, "profiled": profiled, "hot": rows}


def render(results: list[dict[str, object]]) -> str:
    out = ["## Hot spots (cProfile, own time)", ""]
    for r in results:
        out.append(f"### {r['name']}: {float(r['plain']):.2f} s "  # type: ignore[arg-type]
                   f"({float(r['profiled']):.2f} s under cProfile)")  # type: ignore[arg-type]
        out += ["", "| function | calls | own s | share |", "|---|---:|---:|---:|"]
        for func, nc, tt, share in r["hot"]:  # type: ignore[attr-defined]
            out.append(f"| `{func}` | {nc} | {tt:.3f} | {share:.0%} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    corpus_mod.add_size_args(ap)
    ap.add_argument("--only", help="comma-separated workload prefixes")
    ap.add_argument("--huge-bytes", default="512G",
                    help="guest bytes of the huge image to scan (default 512G)")
    a = ap.parse_args(argv)
    params = corpus_mod.params_from("quick" if a.quick else "full", a.vsize, a.files, a.huge)
    c = corpus_mod.ensure(params)
    Work = tuple[str, Callable[[], object], Callable[[], None] | None]
    work: list[Work] = [
        ("extents-huge", w_extents(c.huge, corpus_mod.parse_size(a.huge_bytes)), None),
        ("read-plain", w_read(c.plain), None),
        ("read-zlib", w_read(c.zlib), None),
        ("read-zstd", w_read(c.zstd), None),
    ]
    tmpdir = tempfile.mkdtemp(prefix="qcow2-hot-", dir="/dev/shm" if os.path.isdir(
        "/dev/shm") else None)
    if _has_cli("convert"):
        for kind in ("plain", "zlib", "zstd"):
            # -m 1: one worker, so that cProfile (main thread only) sees all the work
            work.append((f"convert-{kind}", w_cli(
                ["convert", "-m", "1", "-O", "raw", str(getattr(c, kind)),
                 f"{tmpdir}/out.raw"]), remover(Path(tmpdir, "out.raw"))))
        if c.raw is not None:
            work.append(("convert-raw-to-qcow2", w_cli(
                ["convert", "-m", "1", "-O", "qcow2", str(c.raw), f"{tmpdir}/out.qcow2"]),
                remover(Path(tmpdir, "out.qcow2"))))
    if _has_cli("map"):
        work.append(("map-huge", w_cli(["map", "--output=json", "-l",
                                        str(corpus_mod.parse_size(a.huge_bytes)),
                                        str(c.huge)]), None))
    vsize = run_mod.virtual_size(c.plain)
    step = run_mod.spread_step(vsize)
    count = min(vsize // run_mod.CLUSTER, run_mod.WRITE_COUNT_CAP)
    wimg, pimg = Path(tmpdir, "w.qcow2"), Path(tmpdir, "p.qcow2")
    for size in (4 << 10, 64 << 10):
        work.append((f"write-{size >> 10}k-alloc", w_write(wimg, size, step, count),
                     creator(wimg, vsize)))
        # in place: the first (warm) run writes every offset; profile() reruns it
        work.append((f"write-{size >> 10}k-inplace", w_write(pimg, size, step, count),
                     None))
    made_p = False
    if a.only:
        pre = tuple(a.only.split(","))
        work = [w for w in work if w[0].startswith(pre)]
    results = []
    try:
        for name, fn, setup in work:
            print(f"[hotspots] {name} ...", file=sys.stderr, flush=True)
            if "inplace" in name and not made_p:
                creator(pimg, vsize, "-o", "preallocation=metadata")()
                made_p = True
            results.append(profile(name, fn, setup))
    finally:
        for f in Path(tmpdir).iterdir():
            f.unlink()
        os.rmdir(tmpdir)
    text = render(results)
    print(text)
    (RESULTS / "hotspots.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
