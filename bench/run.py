"""Benchmarks: our `qcow2` tool and library against qemu-img on one generated corpus.

    .venv/bin/python bench/run.py                 # full corpus (built on first use, ~4 GiB)
    .venv/bin/python bench/run.py --quick         # small corpus, a minute or so
    .venv/bin/python bench/run.py --only convert,read --repeat 5 --profile

Every command runs as a fresh process. Each row is warmed once per tool (untimed: page cache,
binaries, .pyc files), then the two tools alternate for --repeat rounds and the best wall-clock
time of each is kept. Ratio = ours / qemu (lower is better; 1.0 = parity). Output files go to a
tmpfs directory when one is big enough, so disk write-back does not blur the numbers.

The table goes to stdout and bench/results/latest.md (+ latest.json); --profile also writes
cProfile reports of our slow rows to bench/results/ (see bench/hotspots.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
sys.path.insert(0, str(BENCH_DIR))

import corpus as corpus_mod  # noqa: E402

PY = sys.executable
API = str(BENCH_DIR / "api.py")
CHUNK = 4 << 20
# Child processes get a bytecode cache, as an installed package has (pip compiles at install
# time). Without it (PYTHONDONTWRITEBYTECODE=1, set in some sandboxes) every start recompiles
# the whole package, ~20 ms. The cache lives outside src/, under the git-ignored corpus dir.
PYCACHE = corpus_mod.CORPUS_ROOT / "pycache"
ENV = dict(os.environ, PYTHONPYCACHEPREFIX=str(PYCACHE))
ENV.pop("PYTHONDONTWRITEBYTECODE", None)
NO_PYC_ENV = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
NO_PYC_ENV.pop("PYTHONPYCACHEPREFIX", None)


def ours_tool() -> list[str]:
    exe = Path(PY).parent / "qcow2"
    return [str(exe)] if exe.exists() else [PY, "-m", "qcow2"]


def has_cli(cmd: str) -> bool:
    try:
        return importlib.util.find_spec(f"qcow2.cli.{cmd}") is not None
    except ImportError:
        return False


# --------------------------------------------------------------------------- measuring
CLK_TCK = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


def wait_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores; return that use."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = busy_cpu_seconds(), time.monotonic()
        time.sleep(1.0)
        load = (busy_cpu_seconds() - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() >= deadline:
            return load


@dataclass
class Cmd:
    argv: list[str]
    stdin: Path | None = None
    output: Path | None = None  # removed before every run
    label: str = ""
    env: dict[str, str] | None = None  # None: ENV
    setup: list[list[str]] = field(default_factory=list)  # run before every run, untimed
    result: Path | None = None  # the image verify="image" compares (default: output)

    def key(self) -> tuple[str, ...]:
        return (*self.argv, f"<{self.stdin}" if self.stdin else "",
                "nopyc" if self.env is NO_PYC_ENV else "",
                *(" ".join(a) for a in self.setup))

    def shell(self) -> str:
        s = " ".join(_short(a) for a in self.argv)
        return s + (f" < {self.stdin.name}" if self.stdin else "")


def _short(a: str) -> str:
    for prefix, rep in ((str(REPO) + "/", ""), (str(Path(PY).parent) + "/", ".venv/bin/")):
        if a.startswith(prefix):
            return rep + a[len(prefix):]
    return a


@dataclass
class Timing:
    best: float = float("inf")
    cpu: float = 0.0  # user+sys of the best run (children included)
    runs: list[float] = field(default_factory=list)
    error: str | None = None
    foreign: float = 0.0  # cores' worth of CPU other processes used while this was timed
    rss: int = 0  # peak RSS (bytes): ru_maxrss of the warm-up run, through GNU time
    anon: int = 0  # peak anonymous RSS (bytes), sampled during the warm-up run


@dataclass
class Run:
    wall: float
    cpu: float  # user+sys of the child (and the children it waited for)
    rss: int  # ru_maxrss of the command, bytes: includes mapped file pages (page cache)
    anon: int  # sampled peak RssAnon, bytes (0 unless sampled)
    error: str | None


SAMPLE_EVERY = 0.002  # seconds between /proc/PID/status reads in a sampled run
# ru_maxrss of a child we start ourselves is at least *our* peak RSS (~20 MiB): Linux keeps
# the high-water mark of the memory the child had before exec (vfork: ours). GNU time forks
# from a 2 MiB process, so its %M (its child's ru_maxrss) is the command's own peak.
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def _child_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Runner:
    def __init__(self) -> None:
        self.cache: dict[tuple[str, ...], Timing] = {}

    def once(self, c: Cmd, capture: Path | None = None, sample: bool = False) -> Run:
        """Run c (its setup first, untimed). sample: measure memory instead of time: run c
        under GNU time (for its exact ru_maxrss) and poll its RssAnon (the peak private
        memory, which ru_maxrss cannot tell apart from mapped page cache)."""
        if c.output is not None and c.output.exists():
            c.output.unlink()
        for argv in c.setup:
            p0 = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
            if p0.returncode != 0:
                msg = p0.stderr.decode(errors="replace").strip().splitlines()
                return Run(0.0, 0.0, 0, 0, f"setup {argv[0]} exit {p0.returncode}: "
                                           f"{msg[-1] if msg else ''}"[:200])
        with contextlib.ExitStack() as stack:
            stdin: Any = (stack.enter_context(open(c.stdin, "rb")) if c.stdin
                          else subprocess.DEVNULL)
            stdout: Any = (stack.enter_context(open(capture, "wb")) if capture
                           else subprocess.DEVNULL)
            errf = stack.enter_context(tempfile.TemporaryFile())
            timef = (stack.enter_context(tempfile.NamedTemporaryFile("r"))
                     if sample and GNU_TIME else None)
            argv = ([GNU_TIME, "-f", "%M", "-o", timef.name, *c.argv] if timef  # type: ignore[list-item]
                    else c.argv)
            anon = 0
            t0 = time.perf_counter()
            p = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=errf,
                                 env=c.env if c.env is not None else ENV)
            if sample:
                target = None if timef else p.pid
                while True:
                    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                    if pid:
                        break
                    if target is None:
                        target = _child_pid(p.pid)
                    if target is not None:
                        anon = max(anon, _rss_anon(target))
                    time.sleep(SAMPLE_EVERY)
            else:
                _, status, ru = os.wait4(p.pid, 0)
            dt = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            errf.seek(0)
            stderr = errf.read()
            maxrss = ru.ru_maxrss << 10
            if timef:
                lines = timef.read().split()
                maxrss = int(lines[-1]) << 10 if lines and lines[-1].isdigit() else 0
        err = None
        if p.returncode != 0:
            lines = stderr.decode(errors="replace").strip().splitlines()
            err = f"exit {p.returncode}: {lines[-1] if lines else ''}"[:200]
        return Run(dt, ru.ru_utime + ru.ru_stime, maxrss, anon, err)

    def compare(self, a: Cmd, b: Cmd, repeat: int) -> tuple[Timing, Timing]:
        """Warm both, then alternate a/b `repeat` times; commands timed before are reused."""
        todo = [c for c in (a, b) if c.key() not in self.cache]
        if len(todo) == 2 and todo[0].key() == todo[1].key():
            todo = todo[:1]
        for c in todo:
            t = self.cache[c.key()] = Timing()
            w = self.once(c, sample=True)  # warm-up (and the private-memory sample)
            t.error, t.rss, t.anon = w.error, w.rss, w.anon
        spent: dict[int, list[float]] = {id(c): [0.0, 0.0] for c in todo}  # foreign, wall
        for _ in range(repeat):
            for c in todo:
                t = self.cache[c.key()]
                if t.error:
                    continue
                b0 = busy_cpu_seconds()
                r = self.once(c)
                dt = r.wall
                acc = spent[id(c)]
                acc[0] += max(0.0, busy_cpu_seconds() - b0 - r.cpu)
                acc[1] += dt
                t.foreign = acc[0] / acc[1] if acc[1] else 0.0
                if r.error:
                    t.error = r.error
                    continue
                t.runs.append(dt)
                if dt < t.best:
                    t.best, t.cpu = dt, r.cpu
        for c in (a, b):
            if c.output is not None and c.output.exists():
                c.output.unlink()
        return self.cache[a.key()], self.cache[b.key()]


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    id: str
    title: str
    ours: Cmd | None
    qemu: Cmd
    repeat: int
    note: str = ""
    # "files" (cmp the outputs), "json" (compare stdout as JSON), "image" (qemu-img compare
    # and cmp of the two result images, qemu-img check of ours)
    verify: str = ""
    setup: list[list[str]] = field(default_factory=list)  # run once before the row, untimed
    cleanup: list[Path] = field(default_factory=list)  # deleted after the row
    t_ours: Timing | None = None
    t_qemu: Timing | None = None
    check: str = ""


def virtual_size(img: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(img)], check=True,
                         capture_output=True).stdout
    return int(json.loads(out)["virtual-size"])


# --------------------------------------------------------------------------- write rows
CLUSTER = 64 << 10  # qemu-img create's default, for both tools' images
INT_MAX = (1 << 31) - 1  # qemu-img bench takes -S up to INT_MAX
WRITE_PATTERN = "0xa5"  # not zero: neither side should be able to skip the data
WRITE_COUNT_CAP = 16384
HUGE_WRITE_SIZE = 1 << 40
HUGE_WRITE_COUNT = 4096


def spread_step(vsize: int) -> int:
    """A step that scatters bench requests over the whole image, one cluster each.

    qemu-img bench only goes forward by -S, wrapping modulo the image size. A whole number of
    clusters, odd and coprime with the cluster count, about 0.38 of the image (capped below
    INT_MAX), visits every cluster once before it repeats one, in a scattered order.
    """
    clusters = vsize // CLUSTER
    p = max(1, min(int(clusters * 0.382), INT_MAX // CLUSTER)) | 1
    while p > 1 and (math.gcd(p, clusters) != 1 or p * CLUSTER > INT_MAX):
        p -= 2
    return p * CLUSTER


def write_cmds(img: Path, qimg: Path, bufsize: int, step: int, count: int
               ) -> tuple[Cmd, Cmd]:
    args = ["-s", str(bufsize), "-S", str(step), "-c", str(count), "-o", "0"]
    o = Cmd([PY, API, "write", str(img), *args, "--pattern", WRITE_PATTERN])
    q = Cmd(["qemu-img", "bench", "-w", "-f", "qcow2", "-t", "writeback", "-d", "1", *args,
             f"--pattern={WRITE_PATTERN}", str(qimg)])
    return o, q


def _kib(n: int) -> str:
    return f"{n >> 10} KiB"


def write_rows(vsize: int, outdir: Path, repeat: int) -> list[Row]:
    """Writes through our API (bench/api.py write) against `qemu-img bench -w`, same offsets."""
    rows: list[Row] = []
    step = spread_step(vsize)
    count = min(vsize // CLUSTER, WRITE_COUNT_CAP)
    vs = fmt_bytes(vsize)
    for bufsize in (4 << 10, 64 << 10):
        label = f"{bufsize >> 10}k"
        # allocating: a fresh empty image before every run (untimed)
        oi, qi = outdir / "ours-w.qcow2", outdir / "qemu-w.qcow2"
        o, q = write_cmds(oi, qi, bufsize, step, count)
        for cmd, img in ((o, oi), (q, qi)):
            cmd.output = cmd.result = img
            cmd.setup = [["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(vsize)]]
        rows.append(Row(f"write-{label}-alloc",
                        f"write {_kib(bufsize)} ×{count}, allocating, {vs} image", o, q, repeat,
                        f"fresh empty image per run; each write allocates a cluster "
                        f"(step {step})", verify="image"))
        # in place: metadata-preallocated images; the warm-up has written every offset once,
        # so the timed runs overwrite allocated, already-written clusters
        oi, qi = outdir / "ours-p.qcow2", outdir / "qemu-p.qcow2"
        o, q = write_cmds(oi, qi, bufsize, step, count)
        o.result, q.result = oi, qi
        rows.append(Row(f"write-{label}-inplace",
                        f"write {_kib(bufsize)} ×{count}, in place, {vs} image", o, q, repeat,
                        "preallocation=metadata image, offsets already written by the warm-up",
                        verify="image",
                        setup=[["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                                "preallocation=metadata", str(img), str(vsize)]
                               for img in (oi, qi)],
                        cleanup=[oi, qi]))
    # memory: a 1 TiB virtual image; the step (512 MiB + 64 KiB) moves to the next L2 table
    # every time, so the run touches each of the 2048 L2 tables twice
    oi, qi = outdir / "ours-h.qcow2", outdir / "qemu-h.qcow2"
    hstep = (512 << 20) + CLUSTER
    o, q = write_cmds(oi, qi, 64 << 10, hstep, HUGE_WRITE_COUNT)
    for cmd, img in ((o, oi), (q, qi)):
        cmd.output = cmd.result = img
        cmd.setup = [["qemu-img", "create", "-q", "-f", "qcow2", str(img),
                      str(HUGE_WRITE_SIZE)]]
    rows.append(Row("write-64k-alloc-1t",
                    f"write 64 KiB ×{HUGE_WRITE_COUNT}, allocating, "
                    f"{fmt_bytes(HUGE_WRITE_SIZE)} image", o, q, repeat,
                    f"step {hstep} (512 MiB + 64 KiB): every write lands in another L2 table; "
                    "all 2048 tables are allocated, then each is visited again",
                    verify="image"))
    return rows


def build_rows(c: corpus_mod.Corpus, outdir: Path, repeat: int, repeat_startup: int
               ) -> list[Row]:
    tool = ours_tool()
    rows: list[Row] = []
    conv = has_cli("convert")
    for kind in ("plain", "zlib", "zstd"):
        img = str(getattr(c, kind))
        q = Cmd(["qemu-img", "convert", "-O", "raw", img, str(outdir / "qemu.raw")],
                output=outdir / "qemu.raw")
        o = (Cmd([*tool, "convert", "-O", "raw", img, str(outdir / "ours.raw")],
                 output=outdir / "ours.raw") if conv else None)
        rows.append(Row(f"convert-{kind}", f"convert -O raw, {kind}", o, q, repeat,
                        "" if conv else "skipped: `qcow2 convert` not there yet",
                        verify="files"))
    if c.raw is not None:
        raw = str(c.raw)
        q = Cmd(["qemu-img", "convert", "-O", "qcow2", raw, str(outdir / "qemu.qcow2")],
                output=outdir / "qemu.qcow2")
        o = (Cmd([*tool, "convert", "-O", "qcow2", raw, str(outdir / "ours.qcow2")],
                 output=outdir / "ours.qcow2") if conv else None)
        rows.append(Row("convert-raw-to-qcow2",
                        f"convert -O qcow2, raw ext4 ({fmt_bytes(c.raw.stat().st_size)})",
                        o, q, repeat, "" if conv else "skipped: `qcow2 convert` not there yet",
                        verify="image"))
        # Compressed output: the slowest thing qemu-img does; one timed round each (after the
        # warm-up) keeps the suite's run time reasonable.
        for ctype in ("zlib", "zstd"):
            opts = ["-o", f"compression_type={ctype}"]
            q = Cmd(["qemu-img", "convert", "-c", "-O", "qcow2", *opts, raw,
                     str(outdir / "qemu.qcow2")], output=outdir / "qemu.qcow2")
            o = Cmd([*tool, "convert", "-c", "-O", "qcow2", *opts, raw,
                     str(outdir / "ours.qcow2")], output=outdir / "ours.qcow2")
            rows.append(Row(f"convert-c-{ctype}",
                            f"convert -c -O qcow2 ({ctype}), raw ext4", o, q, 1,
                            "output byte-identical to qemu-img's (cmp)", verify="files"))
    for name, img in (("huge", c.huge), ("zlib", c.zlib), ("snaps", c.snaps)):
        note = "metadata scan: every L2 entry and refcount"
        if name == "snaps":
            note += " of every snapshot's tree (64 GiB, 128 L2 tables, diverged per snapshot)"
        rows.append(Row(f"check-{name}", f"check, {name}.qcow2",
                        Cmd([*tool, "check", str(img)]), Cmd(["qemu-img", "check", str(img)]),
                        repeat, note))
    for kind in ("plain", "zlib", "zstd"):
        img = getattr(c, kind)
        size = virtual_size(img)
        o = Cmd([PY, API, "read", str(img), "--chunk", str(CHUNK)])
        qb = Cmd(["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-d", "1",
                  "-s", str(CHUNK), "-S", str(CHUNK), "-c", str(-(-size // CHUNK)), str(img)])
        rows.append(Row(f"read-{kind}", f"sequential read 4 MiB, {kind} (API vs qemu-img bench)",
                        o, qb, repeat, "qemu-img bench -d 1: one 4 MiB read at a time, no output"))
        q = Cmd(["qemu-img", "convert", "-O", "raw", str(img), str(outdir / "qemu.raw")],
                output=outdir / "qemu.raw")
        rows.append(Row(f"read-{kind}-vs-convert",
                        f"sequential read 4 MiB, {kind} (API vs qemu-img convert)", o, q, repeat,
                        "qemu-img convert also writes the raw file (tmpfs), several requests "
                        "in flight"))
    rows += write_rows(virtual_size(c.plain), outdir, repeat)
    rows += amend_rows(c.small, outdir, repeat)
    small = str(c.small)
    if has_cli("info"):
        o, note = Cmd([*tool, "info", small]), ""
    else:
        o, note = Cmd([PY, API, "open", small]), "`qcow2 info` not there yet: API open instead"
    rows.append(Row("info-small", "info, 64 MiB image", o, Cmd(["qemu-img", "info", small]),
                    repeat_startup, note))
    if has_cli("map"):
        o, note = Cmd([*tool, "map", small]), ""
        oj, notej = Cmd([*tool, "map", "--output=json", str(c.huge)]), ""
    else:
        o = Cmd([PY, API, "extents", small])
        note = "`qcow2 map` not there yet: API `list(img.extents())` instead"
        oj = Cmd([PY, API, "extents", "--json", str(c.huge)])
        notej = "`qcow2 map` not there yet: API `list(img.extents())` + JSON dump instead"
    rows.append(Row("map-small", "map, 64 MiB image", o, Cmd(["qemu-img", "map", small]),
                    repeat_startup, note))
    hv = fmt_bytes(virtual_size(c.huge))
    rows.append(Row("map-huge-json", f"map --output=json, {hv} preallocation=metadata", oj,
                    Cmd(["qemu-img", "map", "--output=json", str(c.huge)]), repeat, notej,
                    verify="json"))
    return rows


def fmt_bytes(n: int) -> str:
    return corpus_mod.fmt_size(n).replace(".0 ", " ")


def amend_rows(small: Path, outdir: Path, repeat: int) -> list[Row]:
    """amend on a fresh copy of the 64 MiB image per run (the copy is untimed)."""
    tool = ours_tool()
    rows: list[Row] = []
    for opt, note in (("refcount_bits=64", "rebuilds every refcount structure: QEMU walks "
                       "the old refcounts cluster by cluster over the whole reftable range"),
                      ("compat=0.10", "downgrade: zero clusters expanded, header rewritten")):
        oi, qi = outdir / "ours-a.qcow2", outdir / "qemu-a.qcow2"
        o = Cmd([*tool, "amend", "-o", opt, str(oi)], result=oi,
                setup=[["cp", str(small), str(oi)]])
        q = Cmd(["qemu-img", "amend", "-o", opt, str(qi)], result=qi,
                setup=[["cp", str(small), str(qi)]])
        rows.append(Row(f"amend-{opt.split('=')[0]}", f"amend -o {opt}, 64 MiB image", o, q,
                        repeat, note, verify="image"))
    return rows


def verify_row(r: Row, runner: Runner, outdir: Path) -> str:
    if r.ours is None or (r.t_ours and r.t_ours.error) or (r.t_qemu and r.t_qemu.error):
        return ""
    if r.verify == "image":
        a, b = r.ours.result or r.ours.output, r.qemu.result or r.qemu.output
        assert a is not None and b is not None
        for cmd in (r.ours, r.qemu):
            if runner.once(cmd).error:
                return ""
        check = subprocess.run(["qemu-img", "check", "-q", str(a)], capture_output=True)
        comp = subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)],
                              capture_output=True)
        same = subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0
        for cmd in (r.ours, r.qemu):
            if cmd.output is not None:
                cmd.output.unlink(missing_ok=True)
        notes = ["qemu-img check of ours clean" if check.returncode == 0
                 else f"**qemu-img check of ours: exit {check.returncode}**"]
        if comp.returncode != 0:
            notes.append(f"**qemu-img compare: exit {comp.returncode}**")
        elif same:
            notes.append("images byte-identical")
        else:
            notes.append("same content (qemu-img compare), files differ (cmp)")
        return "; ".join(notes)
    if r.verify == "files":
        assert r.ours.output is not None and r.qemu.output is not None
        runner.once(r.ours)
        runner.once(r.qemu)
        same = subprocess.run(["cmp", "-s", str(r.ours.output), str(r.qemu.output)]).returncode
        r.ours.output.unlink(missing_ok=True)
        r.qemu.output.unlink(missing_ok=True)
        return "outputs identical" if same == 0 else "**outputs differ**"
    if r.verify == "json":
        a, b = outdir / "ours.json", outdir / "qemu.json"
        runner.once(r.ours, capture=a)
        runner.once(r.qemu, capture=b)
        try:
            same = json.loads(a.read_text()) == json.loads(b.read_text())
        except ValueError:
            same = False
        a.unlink()
        b.unlink()
        return "JSON identical" if same else "**JSON differs**"
    return ""


# --------------------------------------------------------------------------- import time
IMPORT_RE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)")


def importtime(argv: list[str], runs: int = 5) -> dict[str, object]:
    """`python -X importtime` of argv (a python script + args): min over runs, per module."""
    best_self: dict[str, int] = {}
    best_cum: dict[str, int] = {}
    top: set[str] = set()
    totals: list[int] = []
    walls: list[float] = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        p = subprocess.run([PY, "-X", "importtime", *argv], capture_output=True, text=True,
                           env=ENV)
        walls.append(time.perf_counter() - t0)
        total = 0
        for line in p.stderr.splitlines():
            m = IMPORT_RE.match(line)
            if not m:
                continue
            s, cum, indent, mod = int(m[1]), int(m[2]), len(m[3]), m[4]
            total += s
            best_self[mod] = min(best_self.get(mod, s), s)
            best_cum[mod] = min(best_cum.get(mod, cum), cum)
            if indent == 1:
                top.add(mod)
        totals.append(total)
    totals, walls = totals[1:], walls[1:]  # first run warms .pyc files
    by_self = sorted(best_self.items(), key=lambda kv: -kv[1])[:12]
    by_cum = sorted(((m, best_cum[m]) for m in top), key=lambda kv: -kv[1])[:10]
    return {"argv": argv, "total_us": min(totals), "wall_s": min(walls), "by_self": by_self,
            "top_level_cum": by_cum, "modules": len(best_self)}


# --------------------------------------------------------------------------- report
def machine_info(c: corpus_mod.Corpus, outdir: Path) -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    qv = subprocess.run(["qemu-img", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True).stdout.strip()
    vers = []
    for mod in ("numpy", "zstandard"):
        try:
            vers.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            vers.append(f"{mod} missing")
    imgs = []
    for name, p in c.images().items():
        st = p.stat()
        imgs.append(f"{name} {fmt_bytes(virtual_size(p))} virtual / "
                    f"{fmt_bytes(st.st_blocks * 512)} on disk")
    manifest = json.loads((c.dir / "manifest.json").read_text())
    fs = manifest["built"].get("fs.raw", {})
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu} × {os.cpu_count()}",
        "memory": fmt_bytes(mem),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}; "
                  + ", ".join(vers),
        "qemu-img": qv,
        "qcow2": f"git {git}{' (src modified)' if dirty else ''}",
        "corpus": f"{c.params.profile}: ext4 with {fs.get('files', '?')} files / "
                  f"{fmt_bytes(int(fs.get('file_bytes', 0)))} from {c.params.source}; "
                  + "; ".join(imgs),
        "outputs": f"{outdir} ({_fstype(outdir)})",
    }


def _fstype(p: Path) -> str:
    best, fstype = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(p).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


def _fmt_t(t: Timing | None) -> str:
    if t is None:
        return "—"
    if t.error:
        return "error"
    if t.best >= 10:
        return f"{t.best:.1f} s"
    if t.best >= 1:
        return f"{t.best:.2f} s"
    return f"{t.best * 1000:.0f} ms"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f}" if n else "?"


def render(rows: list[Row], info: dict[str, str], imp: dict[str, object] | None,
           floors: dict[str, Timing], repeat: int, repeat_startup: int) -> str:
    out = ["## Results", "",
           f"Best of {repeat} (start-up rows: best of {repeat_startup}) wall-clock runs after one "
           "untimed warm-up per command; CPU = user+sys of that best run. "
           "Ratio = ours / qemu (lower is better). Noise = cores' worth of CPU used by other "
           "processes while the row ran (0 = quiet machine). Peak RSS = ru_maxrss of the "
           "warm-up run (under GNU time); it counts mapped file pages (our convert maps its "
           "source, so its RSS includes page cache). Private = peak RssAnon, sampled "
           f"every {SAMPLE_EVERY * 1000:.0f} ms during the same run. Python children run with a "
           "bytecode cache (as after `pip install`).", "",
           "| row | ours | qemu | ratio | CPU ours / qemu | peak RSS ours / qemu "
           "| private ours / qemu | noise | notes |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = cpu = noise = rss = anon = "—"
        o, q = r.t_ours, r.t_qemu
        if o and q and not o.error and not q.error:
            ratio = f"**{o.best / q.best:.2f}×**"
            cpu = f"{o.cpu:.2f} / {q.cpu:.2f} s"
            noise = f"{max(o.foreign, q.foreign):.2f}"
            rss = f"{_mib(o.rss)} / {_mib(q.rss)} MiB"
            anon = f"{_mib(o.anon)} / {_mib(q.anon)} MiB"
        notes = [n for n in (r.note, r.check) if n]
        for t, who in ((o, "ours"), (q, "qemu")):
            if t and t.error:
                notes.append(f"{who} failed: {t.error}")
        out.append(f"| {r.title} | {_fmt_t(o)} | {_fmt_t(q)} | {ratio} | {cpu} | {rss} | "
                   f"{anon} | {noise} | {'; '.join(notes)} |")
    out += ["", "Commands (ours / qemu):", ""]
    for r in rows:
        out.append(f"- `{r.id}`: `{r.ours.shell() if r.ours else '(skipped)'}`  /  "
                   f"`{r.qemu.shell()}`")
    if floors:
        out += ["", "Reference floors (not ratios):", ""]
        for label, t in floors.items():
            out.append(f"- {label}: {_fmt_t(t)}")
    if imp:
        out += ["", f"### `python -X importtime` of `{' '.join(_short(a) for a in imp['argv'])}`",  # type: ignore[union-attr]
                "",
                f"{imp['modules']} modules, {int(imp['total_us']) / 1000:.1f} ms of import time "  # type: ignore[call-overload]
                f"(sum of self times, min of runs); whole process {float(imp['wall_s']) * 1000:.0f} ms.",  # type: ignore[arg-type]
                "", "| top-level import | cumulative ms |", "|---|---:|"]
        for m, us in imp["top_level_cum"]:  # type: ignore[attr-defined]
            out.append(f"| {m} | {us / 1000:.1f} |")
        out += ["", "| module (self time) | ms |", "|---|---:|"]
        for m, us in imp["by_self"]:  # type: ignore[attr-defined]
            out.append(f"| {m} | {us / 1000:.1f} |")
    out += ["", "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main
def pick_outdir(need: int) -> tuple[Path, bool]:
    for base in ("/dev/shm", tempfile.gettempdir()):
        try:
            st = os.statvfs(base)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize > need:
            return Path(tempfile.mkdtemp(prefix="qcow2-bench-", dir=base)), True
    return Path(tempfile.mkdtemp(prefix="out-", dir=corpus_mod.CORPUS_ROOT)), True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="qcow2 vs qemu-img benchmarks",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    corpus_mod.add_size_args(ap)
    ap.add_argument("--repeat", type=int, help="timed rounds per heavy row (default 3)")
    ap.add_argument("--repeat-startup", type=int, default=20,
                    help="timed rounds per start-up row (default 20)")
    ap.add_argument("--only", help="comma-separated row id prefixes, e.g. convert,map-huge")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each row, wait up to SECONDS for other processes to go quiet")
    ap.add_argument("--idle-threshold", type=float, default=0.25, metavar="CORES",
                    help="'quiet' for --wait-idle: others use less than CORES (default 0.25)")
    ap.add_argument("--no-verify", action="store_true", help="skip output comparisons")
    ap.add_argument("--no-importtime", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile our slow rows (bench/hotspots.py) into bench/results/")
    ap.add_argument("--outdir", help="where converted outputs go (default: tmpfs if it fits)")
    ap.add_argument("--results", default=str(RESULTS / "latest.md"))
    a = ap.parse_args(argv)
    repeat = a.repeat or 3
    params = corpus_mod.params_from("quick" if a.quick else "full", a.vsize, a.files, a.huge)
    c = corpus_mod.ensure(params)
    vmax = max(virtual_size(p) for p in (c.plain, c.zlib, c.zstd))
    if a.outdir:
        outdir, tmp = Path(a.outdir), False
        outdir.mkdir(parents=True, exist_ok=True)
    else:
        outdir, tmp = pick_outdir(2 * vmax + (1 << 30))
    runner = Runner()
    try:
        rows = build_rows(c, outdir, repeat, a.repeat_startup)
        if a.only:
            prefixes = a.only.split(",")
            rows = [r for r in rows if any(r.id.startswith(p) for p in prefixes)]
        for r in rows:
            if a.wait_idle:
                load = wait_idle(a.wait_idle, a.idle_threshold)
                print(f"[run] other load {load:.2f} cores", file=sys.stderr, flush=True)
            print(f"[run] {r.id} ...", file=sys.stderr, flush=True)
            try:
                for argv_ in r.setup:
                    subprocess.run(argv_, check=True, stdin=subprocess.DEVNULL)
                if r.ours is None:
                    r.t_qemu = runner.compare(r.qemu, r.qemu, r.repeat)[1]
                else:
                    r.t_ours, r.t_qemu = runner.compare(r.ours, r.qemu, r.repeat)
                    if not a.no_verify and r.verify:
                        r.check = verify_row(r, runner, outdir)
            finally:
                for p in r.cleanup:
                    p.unlink(missing_ok=True)
        floors: dict[str, Timing] = {}
        if not a.only or any(p.startswith(("info", "map")) for p in a.only.split(",")):
            for label, argv_ in (("python -c pass", [PY, "-c", "pass"]),
                                 ("python -I -S -c pass", [PY, "-I", "-S", "-c", "pass"]),
                                 ("python -c 'import qcow2'", [PY, "-c", "import qcow2"])):
                cmd = Cmd(argv_)
                floors[label] = runner.compare(cmd, cmd, a.repeat_startup)[0]
            if has_cli("info"):
                cmd = Cmd([*ours_tool(), "info", str(c.small)], env=NO_PYC_ENV)
                floors["qcow2 info without a bytecode cache (PYTHONDONTWRITEBYTECODE=1)"] = \
                    runner.compare(cmd, cmd, a.repeat_startup)[0]
        if not a.only or any(p.startswith("read") for p in a.only.split(",")):
            cmd = Cmd([PY, API, "preadv", str(c.plain), "--chunk", str(CHUNK)])
            floors["os.preadv of plain.qcow2 file, 4 MiB chunks (Python I/O floor)"] = \
                runner.compare(cmd, cmd, repeat)[0]
        imp = None
        if not a.no_importtime:
            small = str(c.small)
            script = ([ours_tool()[0], "info", small] if has_cli("info")
                      and ours_tool()[0].endswith("qcow2") else [API, "open", small])
            imp = importtime(script)
        info = machine_info(c, outdir)
        report = render(rows, info, imp, floors, repeat, a.repeat_startup)
        print(report)
        res = Path(a.results)
        res.parent.mkdir(parents=True, exist_ok=True)
        res.write_text("# qcow2 benchmark results\n\n" + report)
        res.with_suffix(".json").write_text(json.dumps({
            "machine": info,
            "rows": [{"id": r.id, "title": r.title, "note": r.note, "check": r.check,
                      "ours": r.ours.shell() if r.ours else None, "qemu": r.qemu.shell(),
                      "ours_s": r.t_ours.runs if r.t_ours else None,
                      "qemu_s": r.t_qemu.runs if r.t_qemu else None,
                      "ours_rss": r.t_ours.rss if r.t_ours else None,
                      "qemu_rss": r.t_qemu.rss if r.t_qemu else None,
                      "ours_anon": r.t_ours.anon if r.t_ours else None,
                      "qemu_anon": r.t_qemu.anon if r.t_qemu else None,
                      "ours_err": r.t_ours.error if r.t_ours else None,
                      "qemu_err": r.t_qemu.error if r.t_qemu else None} for r in rows],
            "floors": {k: v.runs for k, v in floors.items()},
            "importtime": imp}, indent=1) + "\n")
        print(f"[run] wrote {res}", file=sys.stderr)
        if a.profile:
            subprocess.run([PY, str(BENCH_DIR / "hotspots.py"),
                            *(["--quick"] if a.quick else [])], check=False)
    finally:
        if tmp:
            shutil.rmtree(outdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
