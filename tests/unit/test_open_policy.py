"""Opening chains: loops, depth, the backing/data-file policy, open_backing=False, missing files,
and the bounded L2 cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import qcow2
from qcow2.engine.image import Qcow2Image
from qcow2.engine.open import MAX_BACKING_DEPTH
from qcow2.format.builder import ImageSpec, build_image
from tests.conftest import qemu_img, qemu_io

CS = 65536


def _write(path: Path, backing: str | None = None, fmt: str | None = "qcow2",
           clusters: dict[int, object] | None = None, size: int = 1 << 20) -> Path:
    spec = ImageSpec(size=size, backing_file=backing, backing_format=fmt if backing else None,
                     clusters=clusters or {})
    path.write_bytes(build_image(spec))
    return path


# ----------------------------------------------------------------------------- loops, depth
def test_two_image_loop_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a.qcow2", "b.qcow2")
    _write(tmp_path / "b.qcow2", "a.qcow2")
    for name in ("a.qcow2", "b.qcow2"):
        with pytest.raises(qcow2.BackingChainError, match="infinite loop"):
            qcow2.open(str(tmp_path / name))
        with pytest.raises(qcow2.BackingChainError, match="infinite loop"):
            qcow2.open(str(tmp_path / name), backing_policy="follow")


def test_self_loop_and_loop_below_the_top(tmp_path: Path) -> None:
    _write(tmp_path / "self.qcow2", "self.qcow2")
    with pytest.raises(qcow2.BackingChainError, match="infinite loop"):
        qcow2.open(str(tmp_path / "self.qcow2"))
    _write(tmp_path / "top.qcow2", "x.qcow2")
    _write(tmp_path / "x.qcow2", "y.qcow2")
    _write(tmp_path / "y.qcow2", "./x.qcow2")   # another spelling of the same file
    with pytest.raises(qcow2.BackingChainError, match="infinite loop"):
        qcow2.open(str(tmp_path / "top.qcow2"))


def test_loop_through_a_symlink(tmp_path: Path) -> None:
    _write(tmp_path / "a.qcow2", "link.qcow2")
    os.symlink("a.qcow2", tmp_path / "link.qcow2")
    with pytest.raises(qcow2.BackingChainError, match="infinite loop"):
        qcow2.open(str(tmp_path / "a.qcow2"))


def test_loop_message_matches_qemu_img_info(tmp_path: Path, oracle: None) -> None:
    _write(tmp_path / "a.qcow2", "b.qcow2")
    _write(tmp_path / "b.qcow2", "a.qcow2")
    r = qemu_img("info", "--backing-chain", tmp_path / "a.qcow2", check=False)
    assert r.returncode == 1
    with pytest.raises(qcow2.BackingChainError) as ei:
        qcow2.open(str(tmp_path / "a.qcow2"))
    assert r.stderr.strip() == f"qemu-img: {ei.value}"


def test_too_deep_chain_is_an_error_not_a_recursion(tmp_path: Path) -> None:
    n = MAX_BACKING_DEPTH + 3
    _write(tmp_path / f"l{n}.qcow2")
    for i in range(n):
        _write(tmp_path / f"l{i}.qcow2", f"l{i + 1}.qcow2")
    with pytest.raises(qcow2.BackingChainError, match="deeper than"):
        qcow2.open(str(tmp_path / "l0.qcow2"))
    # a chain at the limit opens and reads through every layer
    with qcow2.open(str(tmp_path / f"l{n - MAX_BACKING_DEPTH}.qcow2")) as img:
        assert len(img.chain()) == MAX_BACKING_DEPTH + 1
        assert img.read(0, 4096) == bytes(4096)


# ----------------------------------------------------------------------------- missing files
def test_missing_backing_file_message(tmp_path: Path) -> None:
    _write(tmp_path / "top.qcow2", "base.qcow2")
    with pytest.raises(qcow2.BackingChainError) as ei:
        qcow2.open(str(tmp_path / "top.qcow2"))
    assert str(ei.value) == (f"Could not open backing file: Could not open "
                             f"'{tmp_path / 'base.qcow2'}': No such file or directory")


def test_missing_backing_file_message_matches_qemu(tmp_path: Path, oracle: None) -> None:
    _write(tmp_path / "top.qcow2", "base.qcow2")
    r = qemu_img("map", tmp_path / "top.qcow2", check=False)   # info does not open backing
    with pytest.raises(qcow2.BackingChainError) as ei:
        qcow2.open(str(tmp_path / "top.qcow2"))
    assert r.stderr.strip() == f"qemu-img: Could not open '{tmp_path / 'top.qcow2'}': {ei.value}"


def test_missing_backing_in_the_middle_of_a_chain(tmp_path: Path) -> None:
    _write(tmp_path / "top.qcow2", "mid.qcow2")
    _write(tmp_path / "mid.qcow2", "gone.qcow2")
    with pytest.raises(qcow2.BackingChainError, match=r"gone\.qcow2': No such file"):
        qcow2.open(str(tmp_path / "top.qcow2"))


def test_open_backing_false_reads_unallocated_as_zero(tmp_path: Path) -> None:
    _write(tmp_path / "base.qcow2", clusters={0: b"B" * CS, 1: b"b" * CS})
    _write(tmp_path / "top.qcow2", "base.qcow2", clusters={1: b"T" * CS})
    with qcow2.open(str(tmp_path / "top.qcow2")) as img:
        assert img.read(0, 2 * CS) == b"B" * CS + b"T" * CS
    with qcow2.open(str(tmp_path / "top.qcow2"), open_backing=False) as img:
        assert img.backing is None
        assert img.read(0, 2 * CS) == bytes(CS) + b"T" * CS
        ext = [e.to_map_json() for e in img.extents()]
        assert ext[0] == {"start": 0, "length": CS, "depth": 0, "present": False,
                          "zero": True, "data": False}
    # it does not even need the backing file to exist
    (tmp_path / "base.qcow2").unlink()
    with qcow2.open(str(tmp_path / "top.qcow2"), open_backing=False) as img:
        assert img.read(0, CS) == bytes(CS)


# ----------------------------------------------------------------------------- policy
@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, Path]:
    """An image in tmp/img/ whose backing file lives in tmp/other/."""
    (tmp_path / "img").mkdir()
    (tmp_path / "other").mkdir()
    base = _write(tmp_path / "other" / "base.qcow2", clusters={0: b"O" * CS})
    top = _write(tmp_path / "img" / "top.qcow2", "../other/base.qcow2")
    return top, base


def test_beside_refuses_a_backing_file_outside_the_directory(outside: tuple[Path, Path]) -> None:
    top, _ = outside
    with pytest.raises(qcow2.BackingChainError) as ei:
        qcow2.open(str(top))
    msg = str(ei.value)
    assert "backing file" in msg and "other/base.qcow2" in msg and "beside" in msg
    assert "backing_policy='follow'" in msg


def test_follow_opens_a_backing_file_outside_the_directory(outside: tuple[Path, Path]) -> None:
    top, _ = outside
    with qcow2.open(str(top), backing_policy="follow") as img:
        assert img.read(0, 3) == b"OOO"


def test_beside_refuses_an_absolute_system_path(tmp_path: Path) -> None:
    top = _write(tmp_path / "top.qcow2", "/etc/passwd", fmt=None)
    with pytest.raises(qcow2.BackingChainError, match=r"'/etc/passwd'.*refused by the beside"):
        qcow2.open(str(top))
    with pytest.raises(qcow2.BackingChainError, match="refused"):
        qcow2.open(str(top), backing_policy="never")
    with qcow2.open(str(top), backing_policy="follow") as img:   # as QEMU would
        assert img.backing is not None and img.backing.format_name == "raw"


def test_beside_refuses_a_symlink_pointing_outside(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    _write(tmp_path / "secret.qcow2")
    os.symlink("../secret.qcow2", tmp_path / "img" / "base.qcow2")
    top = _write(tmp_path / "img" / "top.qcow2", "base.qcow2")
    with pytest.raises(qcow2.BackingChainError, match="refused"):
        qcow2.open(str(top))


def test_beside_allows_subdirectories_and_checks_every_layer(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "base.qcow2", clusters={0: b"s" * CS})
    _write(tmp_path / "sub" / "mid.qcow2", "base.qcow2")
    top = _write(tmp_path / "top.qcow2", "sub/mid.qcow2")
    with qcow2.open(str(top)) as img:
        assert img.read(0, 2) == b"ss"
    # a layer further down naming a file outside *its* directory is refused too
    _write(tmp_path / "sub" / "mid.qcow2", "../top2.qcow2")
    _write(tmp_path / "top2.qcow2")
    with pytest.raises(qcow2.BackingChainError, match="refused"):
        qcow2.open(str(top))


def test_never_refuses_any_backing_file(tmp_path: Path) -> None:
    _write(tmp_path / "base.qcow2")
    top = _write(tmp_path / "top.qcow2", "base.qcow2")
    with pytest.raises(qcow2.BackingChainError, match="refused by the never policy"):
        qcow2.open(str(top), backing_policy="never")
    # an image without a backing file is fine
    with qcow2.open(str(tmp_path / "base.qcow2"), backing_policy="never") as img:
        assert img.backing is None


def test_callable_policy_gets_path_kind_referrer(tmp_path: Path) -> None:
    _write(tmp_path / "base.qcow2")
    _write(tmp_path / "mid.qcow2", "base.qcow2")
    top = _write(tmp_path / "top.qcow2", "mid.qcow2")
    calls: list[tuple[str, str, str]] = []

    def allow(path: str, kind: str, referrer: str) -> bool:
        calls.append((path, kind, referrer))
        return True

    with qcow2.open(str(top), backing_policy=allow) as img:
        assert len(img.chain()) == 3
    assert calls == [(str(tmp_path / "mid.qcow2"), "backing file", str(top)),
                     (str(tmp_path / "base.qcow2"), "backing file", str(tmp_path / "mid.qcow2"))]

    def deny_base(path: str, kind: str, referrer: str) -> bool:
        return not path.endswith("base.qcow2")

    with pytest.raises(qcow2.BackingChainError, match="refused by the callback policy"):
        qcow2.open(str(top), backing_policy=deny_base)


def test_data_file_goes_through_the_policy(tmp_path: Path, oracle: None) -> None:
    img_path = tmp_path / "img.qcow2"
    data = tmp_path / "img.data"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", img_path, "1M")
    qemu_io(img_path, "write -P 0x61 0 4096", fmt="qcow2")
    calls: list[tuple[str, str, str]] = []

    def record(path: str, kind: str, referrer: str) -> bool:
        calls.append((path, kind, referrer))
        return kind != "data file"

    with pytest.raises(qcow2.BackingChainError, match="data file"):
        qcow2.open(str(img_path), backing_policy=record)
    assert calls == [(str(data), "data file", str(img_path))]
    with pytest.raises(qcow2.BackingChainError, match="refused"):
        qcow2.open(str(img_path), backing_policy="never")
    with qcow2.open(str(img_path)) as img:   # beside: same directory
        assert img.read(0, 2) == b"aa"
    # a data file passed explicitly by the caller is the caller's choice, not the image's
    with qcow2.open(str(img_path), backing_policy="never", data_file=str(data)) as img:
        assert img.read(0, 2) == b"aa"


# ----------------------------------------------------------------------------- L2 cache
def test_l2_cache_stays_bounded(tmp_path: Path) -> None:
    # 512-byte clusters: one L2 table maps only 32 KiB, so this image has 60 L2 tables.
    cs = 512
    span = cs * (cs // 8)
    clusters: dict[int, object] = {i * (cs // 8) + i % 7: bytes([i + 1]) * cs for i in range(60)}
    spec = ImageSpec(size=60 * span, cluster_bits=9, clusters=clusters)
    p = tmp_path / "many-l2.qcow2"
    p.write_bytes(build_image(spec))
    model = bytearray(spec.size)
    for gc, data in clusters.items():
        assert isinstance(data, bytes)
        model[gc * cs:(gc + 1) * cs] = data
    with qcow2.open(str(p), l2_cache_size=4 * cs) as img:
        assert isinstance(img, Qcow2Image)
        cap = img.l2_cache.capacity
        assert cap == 4
        assert img.read(0, spec.size) == bytes(model)
        assert len(img.l2_cache) <= cap
        assert sum(e.length for e in img.extents()) == spec.size
        assert len(img.l2_cache) <= cap
        for i in range(59, -1, -3):   # random-ish access keeps it bounded too
            off = i * span + 100
            assert img.read(off, 1000) == bytes(model[off:off + 1000])
            assert len(img.l2_cache) <= cap
    # smaller than two tables is rounded up to QEMU's minimum of two
    with qcow2.open(str(p), l2_cache_size=1) as img:
        assert isinstance(img, Qcow2Image)
        assert img.l2_cache.capacity == 2
        assert img.read(0, spec.size) == bytes(model)


# ----------------------------------------------------------------------------- error messages
BROKEN_BACKINGS = [
    # (id, backing name, backing format, what to create under that name)
    ("missing", "nonexist.img", "raw", None),
    ("wrong-format", "raw.img", "qcow2", "raw"),
    ("directory", "d", "raw", "dir"),
    ("missing-two-levels-down", "mid.qcow2", "qcow2", "mid-missing"),
    ("wrong-format-two-levels-down", "mid.qcow2", "qcow2", "mid-wrong-format"),
]


@pytest.mark.parametrize(("name", "fmt", "make"), [b[1:] for b in BROKEN_BACKINGS],
                         ids=[b[0] for b in BROKEN_BACKINGS])
def test_broken_backing_messages_match_qemu(tmp_path: Path, oracle: None, name: str, fmt: str,
                                            make: str | None) -> None:
    if make == "raw":
        (tmp_path / name).write_bytes(bytes(1 << 20))
    elif make == "dir":
        (tmp_path / name).mkdir()
    elif make is not None:
        (tmp_path / "raw.img").write_bytes(bytes(1 << 20))
        below, below_fmt = ("gone.img", "raw") if make == "mid-missing" else ("raw.img", "qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", below, "-F", below_fmt,
                 tmp_path / name, "1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", fmt, top, "1M")
    r = qemu_img("map", top, check=False)
    assert r.returncode == 1
    with pytest.raises(qcow2.BackingChainError) as ei:
        qcow2.open(str(top), backing_policy="follow")
    assert r.stderr.strip() == f"qemu-img: Could not open '{top}': {ei.value}"


def test_directory_and_fifo_are_not_images(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(qcow2.InvalidImageError, match=r"'file' driver requires .* regular file"):
        qcow2.open(str(tmp_path / "d"))
    # QEMU blocks forever opening a FIFO backing file; we refuse it before opening
    os.mkfifo(tmp_path / "fifo")
    _write(tmp_path / "top.qcow2", "fifo", fmt="raw")
    with pytest.raises(qcow2.BackingChainError, match="regular file"):
        qcow2.open(str(tmp_path / "top.qcow2"))
