"""`qcow2 check` on images a normal open refuses but `qemu-img check` (7.2) takes.

qemu-img check opens the chain with BDRV_O_CHECK: qcow2_do_open() then skips the snapshot
table (validation and reading) and accepts an image without a refcount table, and the check
reads the snapshot table itself (qcow2_check_read_snapshot_table()), reporting what is wrong
or, with -r all, discarding overhanging snapshots / extra data and rewriting the table. The
images here are qemu-img-made images with three internal snapshots, poked: too much extra
data in an entry (with the bytes present), too many snapshots, a table offset that is
unaligned, past EOF or past what the block layer reads, a table over 64 MiB, snapshot L1
tables out of reach, no refcount table, a backing file with a broken table. Same stdout,
stderr and exit status as qemu-img (plain, JSON, -r leaks, -r all), the same file after
repair, and a normal open still refuses what QEMU's normal open refuses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qcow2
from tests.conftest import qemu_img, qemu_io, qemu_raw
from tests.differential.test_check import _our_check, _put, _qemu_check, _twins, _u64

pytestmark = pytest.mark.oracle

MiB = 1 << 20
CS = 1 << 16   # the template's cluster size

Entry = list[bytes]   # [40-byte header, extra data, id, name]


# ----------------------------------------------------------------------------- helpers
def _u32(p: Path, off: int) -> int:
    with open(p, "rb") as f:
        f.seek(off)
        return int(struct.unpack(">I", f.read(4))[0])


def _entries(p: Path) -> list[Entry]:
    """The snapshot table entries of a well-formed image."""
    data = p.read_bytes()
    off, out = _u64(p, 64), []
    for _ in range(_u32(p, 60)):
        off = (off + 7) & ~7
        hdr = data[off:off + 40]
        id_size, name_size = struct.unpack_from(">HH", hdr, 12)
        extra_size = struct.unpack_from(">I", hdr, 36)[0]
        pos = off + 40
        extra = data[pos:pos + extra_size]
        pos += extra_size
        out.append([hdr, extra, data[pos:pos + id_size],
                    data[pos + id_size:pos + id_size + name_size]])
        off = pos + id_size + name_size
    return out


def _encode(entries: list[Entry], table_offset: int) -> bytes:
    out = bytearray()
    for hdr, extra, id_b, name_b in entries:
        out += bytes(((table_offset + len(out) + 7) & ~7) - (table_offset + len(out)))
        h = bytearray(hdr)
        struct.pack_into(">HH", h, 12, len(id_b), len(name_b))
        struct.pack_into(">I", h, 36, len(extra))
        out += h + extra + id_b + name_b
    return bytes(out)


def _set_refcount(p: Path, cluster: int, value: int) -> None:
    # 16-bit refcounts, one refblock covering the whole (small) image
    _put(p, (_u64(p, _u64(p, 48)) & ~511) + 2 * cluster, ">H", value)


def _write_table(p: Path, entries: list[Entry], nb: int | None = None) -> None:
    """Replace the snapshot table: in place if it fits the old table's cluster, else at EOF
    with the refcounts moved along (the image stays otherwise consistent)."""
    old = _u64(p, 64)
    data = _encode(entries, old)
    nb = len(entries) if nb is None else nb
    if len(data) <= CS:
        with open(p, "r+b") as f:
            f.seek(old)
            f.write(data)
        _put(p, 60, ">I", nb)
        return
    new = -(-p.stat().st_size // CS) * CS
    data = _encode(entries, new)
    clusters = -(-len(data) // CS)
    with open(p, "r+b") as f:
        f.seek(new)
        f.write(data)
        f.truncate(new + clusters * CS)
    for c in range(new // CS, new // CS + clusters):
        _set_refcount(p, c, 1)
    _set_refcount(p, old // CS, 0)
    _put(p, 60, ">IQ", nb, new)


def _sparse_table(p: Path, count: int, id_size: int, name_size: int) -> None:
    """The real entries plus `count` entries with ID/name sizes but all-zero contents, at EOF,
    written sparsely (only their headers), with refcounts for the whole table."""
    real = _entries(p)
    new = -(-p.stat().st_size // CS) * CS
    head = _encode(real, new)
    with open(p, "r+b") as f:
        f.seek(new)
        f.write(head)
        off = new + len(head)
        for _ in range(count):
            off = (off + 7) & ~7
            h = bytearray(40)
            struct.pack_into(">QIHH", h, 0, 0, 0, id_size, name_size)
            struct.pack_into(">I", h, 36, 24)
            f.seek(off)
            f.write(h)
            off += 40 + 24 + id_size + name_size
        end = -(-off // CS) * CS
        f.truncate(end)
    old = _u64(p, 64)
    for c in range(new // CS, end // CS):
        _set_refcount(p, c, 1)
    _set_refcount(p, old // CS, 0)
    _put(p, 60, ">IQ", len(real) + count, new)


# ----------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """8 MiB, 64 KiB clusters, data written between three internal snapshots."""
    d = tmp_path_factory.mktemp("tolerant-template")
    p = d / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, str(8 * MiB))
    qemu_io(p, "write -P 1 0 128k", fmt="qcow2")
    for i in range(3):
        qemu_img("snapshot", "-c", f"snap{i}", p)
        qemu_io(p, f"write -P {i + 2} {i * 65536} 64k", fmt="qcow2")
    yield p


@pytest.fixture(scope="module")
def template_raw(template: Path) -> bytes:
    return qemu_raw(template, template.parent)


def _extra_1025_first(p: Path) -> None:
    e = _entries(p)
    e[0][1] += bytes(range(256)) * 3 + bytes(1025 - 24 - 768)
    _write_table(p, e)


def _extra_2072_second(p: Path) -> None:
    e = _entries(p)
    e[1][1] += bytes(range(256)) * 8
    _write_table(p, e)


def _extra_65535_all(p: Path) -> None:
    e = _entries(p)
    for k, ent in enumerate(e):
        ent[1] += bytes([k + 1]) * (65535 - len(ent[1]))
    _write_table(p, e)


def _extra_past_eof(p: Path) -> None:
    # 256 MiB of extra data: the table runs past EOF, the check does not count it, and the
    # repair's free of the old table fails (qcow2_free_clusters: Invalid argument)
    _put(p, _u64(p, 64) + 36, ">I", 256 * MiB)


def _extra_past_int_max(p: Path) -> None:
    # the first entry's extra data ends past INT_MAX: -r all drops every snapshot
    _put(p, _u64(p, 64) + 36, ">I", 0xFFFFFFFF)


def _nb_over_limit(p: Path) -> None:
    # 70000 well-formed entries: -r all keeps QEMU's 65536, the rest leaks and is repaired
    e = _entries(p)
    hdr = bytearray(e[0][0])
    struct.pack_into(">QI", hdr, 0, 0, 0)
    e += [[bytes(hdr), e[0][1], b"%d" % (k + 4), b"x"] for k in range(70000 - len(e))]
    _write_table(p, e)


def _nb_over_limit_in_place(p: Path) -> None:
    # the entries after the real ones are whatever follows the table: -r all ends with the
    # new table allocated in the (uncounted) old one, a prevented overlapping write
    _put(p, 60, ">I", 70000)


def _offset_unaligned(p: Path) -> None:
    _put(p, 64, ">Q", _u64(p, 64) + 8)


def _offset_past_eof(p: Path) -> None:
    # zeros: incomplete entries; freeing the old table allocates a refblock and fails
    # (qcow2_free_clusters: Resource temporarily unavailable)
    _put(p, 64, ">Q", 1 << 40)


def _offset_unreadable(p: Path) -> None:
    # past BDRV_MAX_LENGTH: "Failed to read snapshot table: Input/output error"
    _put(p, 64, ">Q", 0x7FFFFFFFFFFF0000)


def _offset_over_int64(p: Path) -> None:
    _put(p, 64, ">Q", 0xFFFFFFFFFFFF0000)


def _table_over_64m(p: Path) -> None:
    # 520 entries of 128 KiB of (zero) names: "Snapshot table is too big"
    _sparse_table(p, 520, 65535, 65535)


def _sn_l1_too_large(p: Path) -> None:
    _put(p, _u64(p, 64) + 8, ">I", 0x400001)


def _sn_l1_unreadable(p: Path) -> None:
    _put(p, _u64(p, 64), ">Q", 0x7FFFFFFFFFFF0000)


def _sn_l1_over_int64(p: Path) -> None:
    # a negative int64 offset in QEMU: sizes the in-memory refcount table, ENOMEM
    _put(p, _u64(p, 64), ">Q", 0xFFFFFFFFFFFF0000)


def _no_refcount_table(p: Path) -> None:
    _put(p, 56, ">I", 0)


def _offset_past_reftable(p: Path) -> None:
    # 4 KiB clusters, 8-bit refcounts: one reftable cluster covers 8 GiB, so freeing the old
    # table at 1 TiB grows the refcount structure (alloc_refcount_block(): the refblock
    # first, then a new reftable past 1 TiB; the file becomes a sparse 1 TiB)
    p.unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=8", p,
             str(8 * MiB))
    qemu_io(p, "write -P 1 0 128k", fmt="qcow2")
    for i in range(2):
        qemu_img("snapshot", "-c", f"s{i}", p)
        qemu_io(p, f"write -P {i + 2} {i * 4096} 4k", fmt="qcow2")
    _put(p, 64, ">Q", 1 << 40)


def _backing_with_bad_table(p: Path) -> None:
    # the flag is inherited: the backing file's snapshot table is not read either
    base = p.parent / "base.qcow2"
    p.rename(base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p,
             cwd=p.parent)
    qemu_io(p, "write -P 9 4096 4096", fmt="qcow2")
    e = _entries(base)
    e[1][1] += bytes(3000)
    _write_table(base, e)


# name -> (builder, exit status of a plain check, exit status of -r all, normal open fails)
CASES: dict[str, tuple[Callable[[Path], None], int, int, bool]] = {
    "extra_1025_first": (_extra_1025_first, 1, 0, True),
    "extra_2072_second": (_extra_2072_second, 1, 0, True),
    "extra_65535_all": (_extra_65535_all, 1, 0, True),
    "extra_past_eof": (_extra_past_eof, 1, 0, True),
    "extra_past_int_max": (_extra_past_int_max, 1, 0, True),
    "nb_over_limit": (_nb_over_limit, 1, 0, True),
    "nb_over_limit_in_place": (_nb_over_limit_in_place, 1, 1, True),
    "offset_unaligned": (_offset_unaligned, 1, 1, True),
    "offset_past_eof": (_offset_past_eof, 2, 0, False),
    "offset_past_reftable": (_offset_past_reftable, 2, 0, False),
    "offset_unreadable": (_offset_unreadable, 1, 1, True),
    "offset_over_int64": (_offset_over_int64, 1, 1, True),
    "table_over_64m": (_table_over_64m, 1, 0, True),
    "sn_l1_too_large": (_sn_l1_too_large, 2, 2, False),
    "sn_l1_unreadable": (_sn_l1_unreadable, 1, 1, False),
    "sn_l1_over_int64": (_sn_l1_over_int64, 1, 1, False),
    "no_refcount_table": (_no_refcount_table, 2, 0, True),
    "backing_with_bad_table": (_backing_with_bad_table, 0, 0, True),
}
# qemu-img takes seconds per pass over a table of 65536 entries
SLOW = {"nb_over_limit", "nb_over_limit_in_place"}
# images not made from the template (no guest data to compare with it)
OWN_IMAGE = {"offset_past_reftable", "backing_with_bad_table"}


def _build(name: str, template: Path, tmp: Path) -> Path:
    d = tmp / "src"
    d.mkdir()
    p = d / "img.qcow2"
    shutil.copyfile(template, p)
    CASES[name][0](p)
    return p


def _twins_dir(src: Path, tmp: Path) -> tuple[Path, Path]:
    """_twins(), with the other files of the source directory (a backing file) copied too."""
    a, b = _twins(src, tmp)
    for other in src.parent.iterdir():
        if other != src:
            for d in (a.parent, b.parent):
                shutil.copyfile(other, d / other.name)
    return a, b


def _extents(p: Path) -> list[tuple[int, int]]:
    """The data extents of a (possibly huge, sparse) file."""
    out = []
    with open(p, "rb") as f:
        fd, pos, size = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:   # ENXIO: only a hole is left
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def _same(*files: Path) -> bool:
    """Same size and contents (holes and written zeros alike), without reading holes."""
    if len({f.stat().st_size for f in files}) > 1:
        return False
    ranges = sorted({e for f in files for e in _extents(f)})
    with contextlib.ExitStack() as stack:
        fds = [stack.enter_context(open(f, "rb")).fileno() for f in files]
        return all(len({os.pread(fd, end - start, start) for fd in fds}) == 1
                   for start, end in ranges)


def _params(names: list[str]) -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", _params(sorted(CASES)))
def test_check_reports_as_qemu(name: str, template: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    src = _build(name, template, tmp_path)
    a, b = _twins_dir(src, tmp_path)
    for args in ((), ("--output=json",)):
        want = _qemu_check(a, *args)
        assert _our_check(b, *args, capsys=capsys) == want
        assert want[2] == CASES[name][1]
    assert _same(a, b, src)   # nothing written


REPAIRS = [("-r", "leaks", "--output=json"), ("-r", "all"), ("-r", "all", "--output=json")]


@pytest.mark.parametrize(("name", "args"), [
    pytest.param(n, a, marks=[pytest.mark.slow] if n in SLOW else [],
                 id=f"{n}-{a[1]}{'-json' if len(a) > 2 else ''}")
    for n in sorted(CASES) for a in REPAIRS if n not in SLOW or a != ("-r", "all")])
def test_repair_as_qemu(name: str, args: tuple[str, ...], template: Path, template_raw: bytes,
                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _build(name, template, tmp_path)
    a, b = _twins_dir(src, tmp_path)
    want = _qemu_check(a, *args)
    assert _our_check(b, *args, capsys=capsys) == want
    if args[1] == "all":
        assert want[2] == CASES[name][2]
    assert _same(a, b)   # so qemu-img sees both the same from now on
    if want[2] == 0:
        # repaired: qemu-img finds the image clean, and the guest data is the template's
        assert qemu_img("check", b.name, check=False, cwd=b.parent).returncode == 0
        if name not in OWN_IMAGE:
            assert qemu_raw(b, tmp_path) == template_raw


@pytest.mark.parametrize("name", sorted(CASES))
def test_normal_open_unchanged(name: str, template: Path, tmp_path: Path) -> None:
    """Outside check mode the image opens (or is refused) as qemu-img's normal open does."""
    src = _build(name, template, tmp_path)
    refused = CASES[name][3]
    # qemu-io opens the whole chain, as a guest would
    q = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", src.name],
                       capture_output=True, text=True, cwd=src.parent)
    assert (q.returncode != 0) == refused, q.stderr + q.stdout
    old = os.getcwd()
    os.chdir(src.parent)
    try:
        if refused:
            with pytest.raises((qcow2.Qcow2Error, OSError)):
                qcow2.open(src.name, backing_policy="follow").close()
        else:
            qcow2.open(src.name, backing_policy="follow").close()
    finally:
        os.chdir(old)
