"""Generate the benchmark corpus (idempotent) under bench/corpus/<profile>/.

    .venv/bin/python bench/corpus.py            # full profile: 4 GiB ext4 with ~2.5 GiB of /usr
    .venv/bin/python bench/corpus.py --quick    # quick profile: 512 MiB ext4, 256 GiB huge image

Images (all made by qemu-img, so the benchmark reads QEMU's layout, not ours):

    plain.qcow2   `qemu-img convert -O qcow2` of an ext4 filesystem image filled with files
                  sampled from /usr (made with `mke2fs -t ext4 -d DIR`, no mounting)
    zlib.qcow2    the same, `qemu-img convert -c` (deflate)
    zstd.qcow2    the same, `qemu-img convert -c -o compression_type=zstd`
    huge.qcow2    `qemu-img create -o preallocation=metadata` (4 TiB: 64 Mi L2 entries, ~640 MiB
                  of metadata on disk, sparse file of 4 TiB apparent size)
    small.qcow2   64 MiB with a handful of extents written by qemu-io (start-up timing)
    fs.raw        the raw ext4 image itself (source of the `convert -O qcow2` row); when it is
                  missing but the images above are up to date (a corpus built before it was
                  kept), it is remade with `qemu-img convert -O raw plain.qcow2` (same bytes)

Sizes: --vsize/--files/--huge, or QCOW2_BENCH_VSIZE / QCOW2_BENCH_FILES / QCOW2_BENCH_HUGE
(suffixes K, M, G, T). A manifest.json records the parameters; an image whose parameters are
unchanged is not rebuilt. The raw filesystem image is kept unless --drop-raw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CORPUS_ROOT = BENCH_DIR / "corpus"
SOURCE_TREE = "/usr"
FS_UUID = "6c1b0f1e-7f2a-4a4e-9d1c-0b0e0c0a0d0e"

PROFILES: dict[str, dict[str, str]] = {
    "full": {"vsize": "4G", "files": "2560M", "huge": "4T"},
    "quick": {"vsize": "512M", "files": "320M", "huge": "256G"},
}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for i, suffix in enumerate("KMGTP", start=1):
        if text.endswith(suffix):
            mult = 1 << (10 * i)
            text = text[:-1]
            break
    return int(float(text) * mult)


def fmt_size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Params:
    profile: str
    vsize: int
    files: int
    huge: int
    source: str = SOURCE_TREE


@dataclass
class Corpus:
    dir: Path
    params: Params
    plain: Path
    zlib: Path
    zstd: Path
    huge: Path
    small: Path
    snaps: Path
    raw: Path | None = None  # the raw ext4 image (None if --drop-raw)

    def images(self) -> dict[str, Path]:
        imgs = {"plain": self.plain, "zlib": self.zlib, "zstd": self.zstd,
                "huge": self.huge, "small": self.small, "snaps": self.snaps}
        if self.raw is not None:
            imgs["raw"] = self.raw
        return imgs


def log(msg: str) -> None:
    print(f"[corpus] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw: object) -> None:
    log("$ " + " ".join(argv))
    subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- file sampling
def _walk_files(root: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        # do not descend into other filesystems (e.g. bind mounts) or into our own corpus
        dirnames[:] = [d for d in dirnames
                       if not os.path.ismount(os.path.join(dirpath, d))]
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and os.access(p, os.R_OK):
                out.append((p, st.st_size))
    return out


def sample_files(root: str, budget: int) -> list[tuple[str, int]]:
    """A deterministic sample of regular files under root totalling about `budget` bytes.

    Each file is kept if a hash of its path falls under the wanted fraction, so the sample
    has the same mix (binaries, libraries, text, compressed archives) as the whole tree.
    """
    files = _walk_files(root)
    total = sum(s for _, s in files)
    if total <= budget:
        return files
    frac = min(1.0, budget / total * 1.08)
    limit = int(frac * 1_000_000)
    chosen: list[tuple[str, int]] = []
    used = 0
    for p, s in files:
        if zlib.crc32(p.encode()) % 1_000_000 >= limit:
            continue
        if used + s > budget:
            continue
        chosen.append((p, s))
        used += s
    return chosen


def stage_files(files: list[tuple[str, int]], root: str, stage: Path) -> int:
    """Hard-link (copy when that fails) the chosen files into `stage`, keeping relative paths."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    total = 0
    for p, s in files:
        dst = stage / os.path.relpath(p, root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, dst)
        except OSError:
            shutil.copy2(p, dst)
        total += s
    return total


# --------------------------------------------------------------------------- builders
def _atomic(path: Path, build: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    build(tmp)
    os.replace(tmp, path)


def build_fs(params: Params, raw: Path, work: Path) -> dict[str, object]:
    t0 = time.monotonic()
    files = sample_files(params.source, params.files)
    stage = work / "stage"
    nbytes = stage_files(files, params.source, stage)
    log(f"staged {len(files)} files, {fmt_size(nbytes)} from {params.source}")
    try:
        def mk(tmp: Path) -> None:
            env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
            run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "qcow2bench", "-U", FS_UUID,
                 "-E", f"hash_seed={FS_UUID},root_owner=0:0", "-d", str(stage), str(tmp),
                 str(params.vsize // 1024) + "k"], env=env)
        _atomic(raw, mk)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"files": len(files), "file_bytes": nbytes, "seconds": round(time.monotonic() - t0, 1)}


def ensure_mke2fs() -> None:
    if shutil.which("mke2fs"):
        return
    log("mke2fs missing: installing e2fsprogs")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    run([*sudo, "apt-get", "install", "-y", "-qq", "e2fsprogs"],
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def ensure(params: Params, *, keep_raw: bool = True, force: bool = False) -> Corpus:
    """Build whatever is missing or stale; return the paths."""
    d = CORPUS_ROOT / params.profile
    d.mkdir(parents=True, exist_ok=True)
    c = Corpus(d, params, d / "plain.qcow2", d / "zlib.qcow2", d / "zstd.qcow2",
               d / "huge.qcow2", d / "small.qcow2", d / "snaps.qcow2")
    manifest_path = d / "manifest.json"
    manifest: dict[str, object] = {}
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
    fs_key = {"vsize": params.vsize, "files": params.files, "source": params.source}
    built: dict[str, object] = dict(manifest.get("built", {}))  # type: ignore[call-overload]

    def fresh(name: str, key: object) -> bool:
        path = d / name
        return path.exists() and built.get(name, {}).get("key") == key  # type: ignore[union-attr]

    def save() -> None:
        manifest_path.write_text(json.dumps({"params": asdict(params), "built": built},
                                            indent=2) + "\n")

    raw = d / "fs.raw"
    fs_targets = ("plain.qcow2", "zlib.qcow2", "zstd.qcow2")
    if not all(fresh(n, fs_key) for n in fs_targets):
        if not fresh("fs.raw", fs_key):
            ensure_mke2fs()
            info = build_fs(params, raw, d)
            built["fs.raw"] = {"key": fs_key, **info}
            save()
        convs = {
            "plain.qcow2": ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"],
            "zlib.qcow2": ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c"],
            "zstd.qcow2": ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c",
                           "-o", "compression_type=zstd"],
        }
        for name, argv in convs.items():
            if fresh(name, fs_key):
                continue
            t0 = time.monotonic()
            _atomic(d / name, lambda tmp, argv=argv: run([*argv, str(raw), str(tmp)]))
            built[name] = {"key": fs_key, "seconds": round(time.monotonic() - t0, 1),
                           "file_bytes": (d / name).stat().st_size}
            save()
    if keep_raw and not raw.exists():
        # A corpus built before the raw image was kept: the same bytes, from plain.qcow2.
        t0 = time.monotonic()
        _atomic(raw, lambda tmp: run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                                      str(c.plain), str(tmp)]))
        entry = dict(built.get("fs.raw", {}))  # type: ignore[call-overload]
        entry.update(key=fs_key, remade_from="plain.qcow2",
                     remade_seconds=round(time.monotonic() - t0, 1))
        built["fs.raw"] = entry
        save()
    if keep_raw:
        c.raw = raw
    elif raw.exists():
        raw.unlink()  # its manifest entry stays as a record of what the images contain

    huge_key = {"size": params.huge}
    if not fresh("huge.qcow2", huge_key):
        t0 = time.monotonic()
        _atomic(c.huge, lambda tmp: run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
             str(tmp), str(params.huge)]))
        built["huge.qcow2"] = {"key": huge_key, "seconds": round(time.monotonic() - t0, 1),
                               "disk_bytes": c.huge.stat().st_blocks * 512}
        save()

    small_key = {"size": 64 << 20, "v": 1}
    if not fresh("small.qcow2", small_key):
        def mk_small(tmp: Path) -> None:
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "64M"])
            cmds = ["write -P 0xab 0 1M", "write -z 4M 1M", "write -P 0x11 8M 192k",
                    "write -P 0x22 16M 64k", "write -z -u 20M 64k", "write -P 0x33 63M 1M"]
            argv = ["qemu-io", "-f", "qcow2"]
            for cmd in cmds:
                argv += ["-c", cmd]
            run([*argv, str(tmp)], stdout=subprocess.DEVNULL)
        _atomic(c.small, mk_small)
        built["small.qcow2"] = {"key": small_key}
        save()
    # Many internal snapshots whose L2 tables have diverged: `check` walks every snapshot's
    # tree. 64 GiB virtual, one 64 KiB write every 32 MiB (128 L2 tables), then per snapshot
    # 16 writes spread over the image (each copies the L2 tables it hits) and `snapshot -c`.
    n_snaps = 100 if params.profile == "full" else 20
    snaps_key = {"snapshots": n_snaps, "v": 1}
    if not fresh("snaps.qcow2", snaps_key):
        def mk_snaps(tmp: Path) -> None:
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), "64G"])
            slots = 2048
            argv = ["qemu-io", "-f", "qcow2"]
            for k in range(slots):
                argv += ["-c", f"write -P {k % 255 + 1} {k * 32}M 64k"]
            run([*argv, str(tmp)], stdout=subprocess.DEVNULL)
            for i in range(n_snaps):
                argv = ["qemu-io", "-f", "qcow2"]
                for k in range(16):
                    slot = (i * 37 + k * 131) % slots
                    argv += ["-c", f"write -P {i % 255 + 1} {slot * 32}M 4k"]
                run([*argv, str(tmp)], stdout=subprocess.DEVNULL)
                run(["qemu-img", "snapshot", "-c", f"snap{i}", str(tmp)])
        t0 = time.monotonic()
        _atomic(c.snaps, mk_snaps)
        built["snaps.qcow2"] = {"key": snaps_key, "seconds": round(time.monotonic() - t0, 1),
                                "file_bytes": c.snaps.stat().st_size}
        save()
    save()
    return c


def params_from(profile: str, vsize: str | None = None, files: str | None = None,
                huge: str | None = None) -> Params:
    base = PROFILES[profile]
    v = vsize or os.environ.get("QCOW2_BENCH_VSIZE") or base["vsize"]
    f = files or os.environ.get("QCOW2_BENCH_FILES") or base["files"]
    h = huge or os.environ.get("QCOW2_BENCH_HUGE") or base["huge"]
    p = Params(profile, parse_size(v), parse_size(f), parse_size(h))
    if (v, f, h) != (base["vsize"], base["files"], base["huge"]):
        # custom sizes get their own directory so the standard profiles stay reusable
        p = Params(f"{profile}-{v}-{f}-{h}".lower(), p.vsize, p.files, p.huge)
    if p.files > p.vsize * 0.85:
        raise SystemExit(f"--files {f} does not fit a {v} filesystem (keep it under 85%)")
    return p


def add_size_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    default=os.environ.get("QCOW2_BENCH_QUICK", "") not in ("", "0"),
                    help="small corpus (512 MiB filesystem, 256 GiB huge image); "
                         "also QCOW2_BENCH_QUICK=1")
    ap.add_argument("--vsize", help="filesystem (virtual disk) size, e.g. 4G")
    ap.add_argument("--files", help="bytes of /usr files to put in it, e.g. 2560M")
    ap.add_argument("--huge", help="virtual size of the metadata-preallocated image, e.g. 4T")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(ap)
    ap.add_argument("--drop-raw", action="store_true",
                    help="delete the raw ext4 image (fs.raw; the convert -O qcow2 row needs it)")
    ap.add_argument("--keep-raw", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--force", action="store_true", help="rebuild everything")
    a = ap.parse_args(argv)
    params = params_from("quick" if a.quick else "full", a.vsize, a.files, a.huge)
    c = ensure(params, keep_raw=not a.drop_raw, force=a.force)
    for name, p in c.images().items():
        st = p.stat()
        print(f"{name:6} {p}  file {fmt_size(st.st_size)}, "
              f"on disk {fmt_size(st.st_blocks * 512)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
