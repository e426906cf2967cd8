"""Prototype: numpy-vectorised L2 classification for Qcow2Image._map_runs (standard L2 only).

The engine classifies one cluster per generator step (`_std_runs`) and merges runs in
`_map_runs`: ~0.6 µs per cluster, i.e. ~40 s for the 64 Mi clusters of a 4 TiB image. Here a
whole L2 slice is classified at once with numpy and only run *boundaries* reach Python.
Any entry that would raise (compressed with a data file, zero flag in v2, unaligned or
mismatching data-file offsets) sends the slice back to the engine's own loop, which raises
exactly as before.

    python bench/experiments/fast_runs.py check IMG...          # identical runs, many windows
    python bench/experiments/fast_runs.py time IMG [--chunk N]  # extents()/read speed, before/after
    python bench/experiments/fast_runs.py crossover             # Python vs numpy per slice size
    python bench/experiments/fast_runs.py cli map --output=json IMG   # the qcow2 CLI, patched

Nothing in src/ is changed: the patch is applied to one open image via `patch(img)`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import types
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np

import qcow2
from qcow2.engine.image import Qcow2Image
from qcow2.format import constants as C
from qcow2.format.entries import SubclusterType as SC

UNALLOC_PLAIN = int(SC.UNALLOCATED_PLAIN)
ZERO_PLAIN = int(SC.ZERO_PLAIN)
ZERO_ALLOC = int(SC.ZERO_ALLOC)
NORMAL = int(SC.NORMAL)
COMPRESSED = int(SC.COMPRESSED)

F_COMP = np.uint64(C.QCOW_OFLAG_COMPRESSED)
F_ZERO = np.uint64(C.QCOW_OFLAG_ZERO)
F_COPIED = np.uint64(C.QCOW_OFLAG_COPIED)
M_OFF = np.uint64(C.L2E_OFFSET_MASK)

FAST_CONTIGUOUS = True  # the two-pass check for a fully contiguous slice
NUMPY_MIN_CLUSTERS = 32  # below this the Python loop wins (see `crossover`)

Run = tuple[int, int, int, int | None]
_ENGINE_STD_RUNS = Qcow2Image._std_runs


def std_runs_np(self: Qcow2Image, table: array[int], l2_off: int, pos: int, chunk_end: int,
                has_df: bool, v2: bool) -> Iterator[Run]:
    """Same runs as Qcow2Image._std_runs after merging, for one L2 table's slice."""
    cbits = self.cluster_bits
    cs = self.cluster_size
    cl0 = pos >> cbits
    ncl = ((chunk_end - 1) >> cbits) + 1 - cl0
    if ncl < NUMPY_MIN_CLUSTERS:
        return _ENGINE_STD_RUNS(self, table, l2_off, pos, chunk_end, has_df, v2)
    i0 = cl0 & (self.l2_entries - 1)
    t = np.frombuffer(table, dtype=np.uint64, count=ncl, offset=i0 * 8)
    if FAST_CONTIGUOUS and not has_df:
        # One host-contiguous run of normal clusters (the usual case for allocated images):
        # two passes instead of a dozen.
        first = int(t[0])
        off0 = first & C.L2E_OFFSET_MASK
        if (off0 and not first & (C.QCOW_OFLAG_COMPRESSED | C.QCOW_OFLAG_ZERO)
                and not off0 & (cs - 1)
                and (int(t[-1]) & C.L2E_OFFSET_MASK) - off0 == (ncl - 1) * cs
                and bool((np.diff(t) == np.uint64(cs)).all())):
            return iter(((pos, chunk_end - pos, NORMAL, off0 + (pos - (cl0 << cbits))),))
    comp = (t & F_COMP) != 0
    zero = ((t & F_ZERO) != 0) & ~comp
    off = t & M_OFF
    has_off = off != 0
    alloc = has_off | ((t & F_COPIED) != 0) if has_df else has_off
    normal = ~comp & ~zero & alloc
    # Anything the engine would reject: let it walk the slice and raise at the right entry.
    bad = (comp.any() if has_df else False) or (v2 and bool(zero.any())) or bool(
        (normal & ((off & np.uint64(cs - 1)) != 0)).any())
    if not bad and has_df:
        expect = (np.arange(cl0, cl0 + ncl, dtype=np.uint64) << np.uint64(cbits))
        bad = bool((normal & (off != expect)).any())
    if bad:
        return _ENGINE_STD_RUNS(self, table, l2_off, pos, chunk_end, has_df, v2)
    kind = np.full(ncl, UNALLOC_PLAIN, dtype=np.int8)
    kind[normal] = NORMAL
    kind[zero & has_off] = ZERO_ALLOC
    kind[zero & ~has_off] = ZERO_PLAIN
    kind[comp] = COMPRESSED
    brk = np.empty(ncl, dtype=bool)
    brk[0] = True
    brk[1:] = kind[1:] != kind[:-1]
    hostk = normal | (zero & has_off)
    brk[1:] |= hostk[1:] & (off[1:] != off[:-1] + np.uint64(cs))
    brk |= comp
    starts = np.flatnonzero(brk)
    return _emit(starts.tolist(), kind[starts].tolist(), off[starts].tolist(),
                 t[starts].tolist(), ncl, cl0, cbits, pos, chunk_end)


def _emit(starts: list[int], kinds: list[int], offs: list[int], entries: list[int], ncl: int,
          cl0: int, cbits: int, pos: int, chunk_end: int) -> Iterator[Run]:
    starts.append(ncl)
    for j, kind in enumerate(kinds):
        g0 = (cl0 + starts[j]) << cbits
        g_start = max(pos, g0)
        g_end = min(chunk_end, (cl0 + starts[j + 1]) << cbits)
        if kind in (NORMAL, ZERO_ALLOC):
            host: int | None = offs[j] + (g_start - g0)
        elif kind == COMPRESSED:
            host = entries[j]
        else:
            host = None
        yield g_start, g_end - g_start, kind, host


def patch(img: Any) -> Any:
    """Make this one open image use the vectorised classifier."""
    if isinstance(img, Qcow2Image) and not img.extended_l2:
        img._std_runs = types.MethodType(std_runs_np, img)
    return img


# --------------------------------------------------------------------------- checks
def _merged(runs: Iterator[Run]) -> list[Run]:
    out: list[Run] = []
    for s, n, k, h in runs:
        if out:
            ps, pn, pk, ph = out[-1]
            if pk == k and k != COMPRESSED and (h is None if ph is None else h == ph + pn):
                out[-1] = (ps, pn + n, pk, ph)
                continue
        out.append((s, n, k, h))
    return out


def check_image(path: str, windows: int, seed: int) -> int:
    rnd = random.Random(seed)
    ref = qcow2.open(path)
    new = patch(qcow2.open(path))
    size = ref.virtual_size
    cs = ref.cluster_size  # type: ignore[attr-defined]
    cases = [(0, size)]
    for _ in range(windows):
        a = rnd.randrange(0, size)
        n = rnd.choice([1, 512, cs - 1, cs, 3 * cs + 7, 64 * cs, 1 << 22, 1 << 26, size])
        a = rnd.choice([a, a - a % cs])
        cases.append((a, min(n, size - a)))
    bad = 0
    for a, n in cases:
        if n <= 0:
            continue
        r = _merged(ref._map_runs(a, n))  # type: ignore[attr-defined]
        m = _merged(new._map_runs(a, n))  # type: ignore[attr-defined]
        if r != m:
            bad += 1
            print(f"MISMATCH {path} [{a}, +{n})", file=sys.stderr)
    e1 = list(ref.extents())
    e2 = list(new.extents())
    if e1 != e2:
        bad += 1
        print(f"MISMATCH extents {path}", file=sys.stderr)
    if size <= 1 << 31:  # full read comparison on the small corpus images
        b1 = bytearray(1 << 22)
        b2 = bytearray(1 << 22)
        for pos in range(0, size, 1 << 22):
            k = min(1 << 22, size - pos)
            ref.readinto(pos, memoryview(b1)[:k])
            new.readinto(pos, memoryview(b2)[:k])
            if b1[:k] != b2[:k]:
                bad += 1
                print(f"MISMATCH read {path} @{pos}", file=sys.stderr)
                break
    print(f"{path}: {len(cases)} windows, {'OK' if not bad else f'{bad} mismatches'}")
    return bad


def check_synthetic(trials: int, seed: int) -> int:
    """Random standard L2 tables (every entry kind, runs and breaks) through both paths."""
    rnd = random.Random(seed)
    bad = 0
    for trial in range(trials):
        cbits = rnd.choice([9, 12, 16, 21])
        cs = 1 << cbits
        l2_entries = cs // 8
        fake = types.SimpleNamespace(cluster_bits=cbits, cluster_size=cs, l2_entries=l2_entries,
                                     _bad_entry=lambda msg, a, b: ValueError(msg))
        tab = array("Q", [0]) * l2_entries
        host = rnd.randrange(1, 1 << 20) * cs
        i = 0
        while i < l2_entries:
            n = rnd.choice([1, 1, 2, 5, 50, 300])
            kind = rnd.choice("nnnzZuc")
            for j in range(i, min(l2_entries, i + n)):
                if kind == "n":
                    tab[j] = host | (C.QCOW_OFLAG_COPIED if rnd.random() < .9 else 0)
                    host += cs if rnd.random() < .97 else 2 * cs
                elif kind == "z":
                    tab[j] = C.QCOW_OFLAG_ZERO
                elif kind == "Z":
                    tab[j] = host | C.QCOW_OFLAG_ZERO
                    host += cs
                elif kind == "c":
                    tab[j] = C.QCOW_OFLAG_COMPRESSED | rnd.randrange(1 << 40)
                else:
                    tab[j] = 0
            i += n
        if trial % 3 == 0:
            # contiguous tables (the fast path), sometimes with one odd entry to reject it
            start = rnd.randrange(1, 1 << 20) * cs
            for j in range(l2_entries):
                tab[j] = (start + j * cs) | C.QCOW_OFLAG_COPIED
            if trial % 2:
                j = rnd.randrange(l2_entries)
                tab[j] = rnd.choice([0, C.QCOW_OFLAG_ZERO, tab[j] | C.QCOW_OFLAG_ZERO,
                                     C.QCOW_OFLAG_COMPRESSED | 12345, tab[j] + cs,
                                     tab[j] & ~C.QCOW_OFLAG_COPIED])
        base = rnd.randrange(0, 1 << 10) * (l2_entries * cs)
        for _ in range(20):
            a = base + rnd.randrange(0, l2_entries * cs)
            e = min(base + l2_entries * cs, a + rnd.choice([1, cs, 100 * cs, 1 << 40]))
            r = _merged(Qcow2Image._std_runs(fake, tab, 0, a, e, False, False))  # type: ignore[arg-type]
            m = _merged(std_runs_np(fake, tab, 0, a, e, False, False))  # type: ignore[arg-type]
            if r != m:
                bad += 1
                print(f"MISMATCH synthetic trial {trial} cbits {cbits} [{a}, {e})",
                      file=sys.stderr)
                break
    print(f"synthetic: {trials} tables, {'OK' if not bad else f'{bad} mismatches'}")
    return bad


# --------------------------------------------------------------------------- timing
def time_extents(path: str, length: int | None, repeat: int, skip_engine: bool = False
                 ) -> None:
    def patch_full(img: Any) -> Any:
        global FAST_CONTIGUOUS
        FAST_CONTIGUOUS = False
        return patch(img)

    def patch_fast(img: Any) -> Any:
        global FAST_CONTIGUOUS
        FAST_CONTIGUOUS = True
        return patch(img)

    variants = [("numpy", patch_full), ("numpy+contiguous fast path", patch_fast)]
    if not skip_engine:
        variants.insert(0, ("engine", lambda i: i))
    for label, fn in variants:
        best = float("inf")
        n = 0
        for _ in range(repeat):
            with fn(qcow2.open(path)) as img:
                ln = length or img.virtual_size
                t0 = time.perf_counter()
                n = sum(1 for _ in img.extents(0, min(ln, img.virtual_size)))
                best = min(best, time.perf_counter() - t0)
        print(f"extents {label:28}: {best:8.3f} s  ({n} extents)")


def time_read(path: str, chunk: int, repeat: int) -> None:
    buf = bytearray(chunk)
    view = memoryview(buf)
    for label, fn in (("engine", lambda i: i), ("numpy", patch)):
        best = float("inf")
        for _ in range(repeat):
            with fn(qcow2.open(path)) as img:
                size = img.virtual_size
                t0 = time.perf_counter()
                for pos in range(0, size, chunk):
                    img.readinto(pos, view[:min(chunk, size - pos)])
                best = min(best, time.perf_counter() - t0)
        print(f"read {chunk >> 10} KiB {label:6}: {best:8.3f} s  "
              f"({size / best / (1 << 20):.0f} MiB/s)")


def crossover() -> None:
    """Cost per call of classifying n contiguous normal clusters: engine loop vs numpy."""
    cbits = 16
    cs = 1 << cbits
    fake = types.SimpleNamespace(cluster_bits=cbits, cluster_size=cs, l2_entries=cs // 8,
                                 _bad_entry=None)
    tab = array("Q", [(1 << 40) + i * cs | C.QCOW_OFLAG_COPIED for i in range(cs // 8)])
    for n in (1, 4, 16, 32, 48, 64, 128, 1024, 8192):
        res = []
        for fn in (Qcow2Image._std_runs, std_runs_np):
            reps = max(20, 200_000 // n)
            t0 = time.perf_counter()
            for _ in range(reps):
                for _r in _merged(fn(fake, tab, 0, 0, n * cs, False, False)):  # type: ignore[arg-type]
                    pass
            res.append((time.perf_counter() - t0) / reps * 1e6)
        print(f"{n:5} clusters: engine {res[0]:9.1f} µs   numpy {res[1]:9.1f} µs")


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("images", nargs="*")
    c.add_argument("--windows", type=int, default=300)
    c.add_argument("--synthetic", type=int, default=300)
    t = sub.add_parser("time")
    t.add_argument("image")
    t.add_argument("--length", type=int, help="only the first LENGTH bytes for extents")
    t.add_argument("--chunk", type=int, default=4 << 20)
    t.add_argument("--repeat", type=int, default=3)
    t.add_argument("--what", choices=("extents", "read", "both"), default="both")
    t.add_argument("--skip-engine", action="store_true", help="extents: numpy variants only")
    sub.add_parser("crossover")
    if len(sys.argv) > 1 and sys.argv[1] == "cli":
        # every image the command opens uses the vectorised classifier
        from qcow2.cli.main import main as cli_main

        Qcow2Image._std_runs = std_runs_np  # type: ignore[assignment,method-assign]
        return cli_main(sys.argv[2:])
    a = ap.parse_args()
    if a.cmd == "check":
        bad = check_synthetic(a.synthetic, 1)
        for p in a.images:
            bad += check_image(p, a.windows, 2)
        return 1 if bad else 0
    if a.cmd == "time":
        if a.what in ("extents", "both"):
            time_extents(a.image, a.length, a.repeat, a.skip_engine)
        if a.what in ("read", "both"):
            time_read(a.image, a.chunk, a.repeat)
        return 0
    global NUMPY_MIN_CLUSTERS
    saved, NUMPY_MIN_CLUSTERS = NUMPY_MIN_CLUSTERS, 1
    crossover()
    NUMPY_MIN_CLUSTERS = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
