"""`qcow2 create` in process, and the qcow2.create() API. No oracle: the expected texts and
layouts are qemu-img 7.2's (tests/differential/test_create.py compares against it live)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest

import qcow2
from qcow2.cli.main import main
from qcow2.format import constants as C
from qcow2.format.header import Header, parse_extensions
from qcow2.ops.create import CreateError, format_line, option_help, parse_create_options
from qcow2.ops.qemu_opts import has_help_option, is_valid_option_list, parse_size

MiB = 1 << 20
DEFAULTS = "cluster_size=65536 extended_l2=off compression_type=zlib"
TAIL = "lazy_refcounts=off refcount_bits=16"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["create", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def header(path: Path) -> Header:
    return Header.parse(path.read_bytes()[:4096])


# ----------------------------------------------------------------------------- output
@pytest.mark.parametrize("argv,line", [
    (["-f", "qcow2", "a.qcow2", "64M"],
     f"fmt=qcow2 {DEFAULTS} size=67108864 {TAIL}"),
    (["-f", "qcow2", "-o", "compat=0.10", "b.qcow2", "1000"],
     f"fmt=qcow2 {DEFAULTS} size=1000 compat=0.10 {TAIL}"),
    (["-f", "qcow2", "-o", "preallocation=metadata,lazy_refcounts=on,compression_type=zstd,"
      "extended_l2=on,refcount_bits=1,cluster_size=16k", "d.qcow2", "1G"],
     "fmt=qcow2 cluster_size=16384 extended_l2=on preallocation=metadata "
     "compression_type=zstd size=1073741824 lazy_refcounts=on refcount_bits=1"),
    (["-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "e.qcow2", "1M"],
     f"fmt=qcow2 {DEFAULTS} size=1048576 data_file=d.raw data_file_raw=on {TAIL}"),
    (["-f", "raw", "r.raw", "1M"], "fmt=raw size=1048576"),
    (["r2.raw", "1M", "-o", "preallocation=full"], "fmt=raw size=1048576 preallocation=full"),
    (["-f", "qcow", "q.qcow", "1M"], "fmt=qcow size=1048576"),
    (["-f", "qcow2", "-o", "nocow=on,extent_size_hint=2M", "n.qcow2", "1M"],
     f"fmt=qcow2 {DEFAULTS} size=1048576 {TAIL} nocow=on extent_size_hint=2097152"),
    (["-f", "qcow2", "-u", "-b", "a,b", "-F", "raw", "c.qcow2", "1M"],
     f"fmt=qcow2 {DEFAULTS} size=1048576 backing_file=a,,b backing_fmt=raw {TAIL}"),
    (["-f", "qcow2", "-o", "lazy_refcounts,refcount_bits=010", "l.qcow2", "1.5k"],
     f"fmt=qcow2 {DEFAULTS} size=1536 lazy_refcounts=on refcount_bits=8"),
])
def test_formatting_line(cwd: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                         line: str) -> None:
    rc, out, err = run(capsys, *argv)
    name = next(a for a in argv if a.endswith((".qcow2", ".raw", ".qcow")) and "=" not in a)
    assert (rc, out, err) == (0, f"Formatting '{name}', {line}\n", "")


def test_quiet(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "-q", "-f", "qcow2", "x.qcow2", "1M") == (0, "", "")


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("opts,size,length", [
    ("", 64 * MiB, 196616),  # the L1 is written with its exact length
    ("", 0, 3 * 65536),  # no L1 at all
    ("", 1 << 40, 0x30000 + 16384),
    ("cluster_size=512", MiB, 1792),
    ("preallocation=metadata", 64 * MiB, 327680 + 64 * MiB),
    ("preallocation=metadata", 1000, 6 * 65536),  # the COW of the last cluster's tail
])
def test_file_length(cwd: Path, opts: str, size: int, length: int) -> None:
    options: dict[str, Any] = dict(o.split("=") for o in opts.split(",") if o)
    qcow2.create("x.qcow2", size, **options)
    assert os.path.getsize("x.qcow2") == length


def test_header_and_extensions(cwd: Path) -> None:
    qcow2.create("base.qcow2", 10 * MiB)
    qcow2.create("x.qcow2", backing_file="base.qcow2", backing_fmt="qcow2", extended_l2=True,
                 compression_type="zstd", lazy_refcounts=True, refcount_bits=64)
    raw = Path("x.qcow2").read_bytes()
    h = Header.parse(raw[:65536])
    assert (h.version, h.size, h.cluster_bits, h.refcount_order) == (3, 10 * MiB, 16, 6)
    assert h.incompatible_features == C.QCOW2_INCOMPAT_EXTL2 | C.QCOW2_INCOMPAT_COMPRESSION
    assert h.compatible_features == C.QCOW2_COMPAT_LAZY_REFCOUNTS
    assert (h.compression_type, h.header_length) == (1, 112)
    assert (h.l1_table_offset, h.l1_size) == (3 * 65536, 1)
    assert (h.refcount_table_offset, h.refcount_table_clusters) == (65536, 1)
    exts = parse_extensions(raw[:65536], h)
    assert exts.backing_format == "qcow2"
    assert [e.magic for e in exts.raw] == [C.QCOW2_EXT_MAGIC_BACKING_FORMAT,
                                           C.QCOW2_EXT_MAGIC_FEATURE_TABLE]
    # The backing name follows the end marker (0x70 + 16 + 8 + 392 + 8).
    assert h.backing_file_offset == 0x210
    assert raw[0x210:0x210 + h.backing_file_size] == b"base.qcow2"
    # reftable[0] -> refblock at cluster 2; clusters 0..3 have refcount 1 (64-bit entries).
    assert struct.unpack_from(">Q", raw, 65536)[0] == 2 * 65536
    assert struct.unpack_from(">4Q", raw, 2 * 65536) == (1, 1, 1, 1)


def test_v2_header(cwd: Path) -> None:
    qcow2.create("x.qcow2", MiB, compat="0.10")
    raw = Path("x.qcow2").read_bytes()
    assert struct.unpack_from(">I", raw, 4)[0] == 2
    # A v2 header is 72 bytes: the end-of-extensions marker follows at once (no feature table).
    assert raw[72:80] == bytes(8) and raw[80:4096] == bytes(4016)


def test_preallocation_metadata_map(cwd: Path) -> None:
    qcow2.create("x.qcow2", 4 * MiB, cluster_size=65536, preallocation="metadata")
    raw = Path("x.qcow2").read_bytes()
    l1 = struct.unpack_from(">Q", raw, 3 * 65536)[0]
    assert l1 == C.QCOW_OFLAG_COPIED | 4 * 65536
    l2 = struct.unpack_from(">64Q", raw, 4 * 65536)
    assert l2 == tuple(C.QCOW_OFLAG_COPIED | (5 + i) * 65536 for i in range(64))
    with qcow2.open("x.qcow2") as img:
        assert img.read(0, 4 * MiB) == bytes(4 * MiB)
        ext = list(img.extents())
        assert [(e.start, e.length, e.data, e.zero, e.host_offset) for e in ext] == \
            [(0, 4 * MiB, True, True, 5 * 65536)]


def test_data_file(cwd: Path) -> None:
    Path("d.raw").write_bytes(b"old contents")
    qcow2.create("x.qcow2", 100 * 1024, data_file="d.raw")
    # QEMU truncates the data file to 0, then to the image size, and writes its first block.
    assert Path("d.raw").read_bytes() == bytes(100 * 1024)
    h = header(cwd / "x.qcow2")
    assert h.incompatible_features == C.QCOW2_INCOMPAT_DATA_FILE
    with qcow2.open("x.qcow2", backing_policy="follow") as img:
        assert img.read(0, 4096) == bytes(4096)


def test_data_file_raw_maps_one_to_one(cwd: Path) -> None:
    qcow2.create("x.qcow2", MiB, data_file="d.raw", data_file_raw=True)
    raw = Path("x.qcow2").read_bytes()
    assert header(cwd / "x.qcow2").autoclear_features == C.QCOW2_AUTOCLEAR_DATA_FILE_RAW
    l2_offset = struct.unpack_from(">Q", raw, 3 * 65536)[0] & ~C.QCOW_OFLAG_COPIED
    assert struct.unpack_from(">3Q", raw, l2_offset) == tuple(
        C.QCOW_OFLAG_COPIED | i * 65536 for i in range(3))


def test_size_from_backing(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (cwd / "sub").mkdir()
    qcow2.create("sub/base.qcow2", 7 * MiB)
    # The backing name is relative to the new image's directory, as in QEMU.
    rc, out, _err = run(capsys, "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                       "sub/top.qcow2")
    assert rc == 0 and "size=7340032 backing_file=base.qcow2" in out
    assert header(cwd / "sub/top.qcow2").size == 7 * MiB
    Path("raw.img").write_bytes(b"x" * 1000)
    qcow2.create("top2.qcow2", backing_file="raw.img", backing_fmt="raw")
    assert header(cwd / "top2.qcow2").size == 1024  # sectors, rounded up


def test_qcow_v1(cwd: Path) -> None:
    qcow2.create("x.qcow", 16 * MiB, fmt="qcow")
    raw = Path("x.qcow").read_bytes()
    assert len(raw) == 560 and raw[:8] == b"QFI\xfb\x00\x00\x00\x01"
    assert (raw[32], raw[33]) == (12, 9)
    qcow2.create("y.qcow", fmt="qcow", backing_file="x.qcow", backing_fmt="qcow")
    raw = Path("y.qcow").read_bytes()
    assert (raw[32], raw[33]) == (9, 12) and raw[48:54] == b"x.qcow"
    assert len(raw) == 56 + 512
    with qcow2.open("y.qcow", backing_policy="follow") as img:
        assert img.virtual_size == 16 * MiB and img.read(0, 512) == bytes(512)


def test_raw_first_block(cwd: Path) -> None:
    qcow2.create("x.raw", MiB, fmt="raw")
    fd = os.open("x.raw", os.O_RDONLY)
    try:
        assert os.path.getsize("x.raw") == MiB
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv,err", [
    (["-f", "qcow2", "x.qcow2"], "qcow2: x.qcow2: Image creation needs a size parameter\n"),
    (["-f", "qcow2", "-o", "cluster_size=1000", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Cluster size must be a power of two between 512 and 2048k\n"),
    (["-f", "qcow2", "-o", "cluster_size=4k,extended_l2=on", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Extended L2 entries are only supported with cluster sizes of at least "
     "16384 bytes\n"),
    (["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Lazy refcounts only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)\n"),
    (["-f", "qcow2", "-o", "refcount_bits=3", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Refcount width must be a power of two and may not exceed 64 bits\n"),
    (["-f", "qcow2", "x.qcow2", "3P"],
     "qcow2: x.qcow2: The image size is too large for file format 'qcow2' (try using a larger "
     "cluster size)\n"),
    (["-f", "qcow2", "-o", "compat=1.2", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Parameter 'version' does not accept value '1.2'\n"),
    (["-f", "qcow2", "-o", "bogus=1", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Invalid parameter 'bogus'\n"),
    (["-f", "qcow2", "-F", "qcow2", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Backing format cannot be used without backing file\n"),
    (["-f", "qcow2", "-b", "b.qcow2", "-u", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Backing file specified without backing format\n"),
    (["-f", "qcow2", "-b", "missing", "-F", "qcow2", "x.qcow2"],
     "qcow2: x.qcow2: Could not open 'missing': No such file or directory\n"
     "Could not open backing image.\n"),
    (["-f", "qcow2", "x.qcow2", "1Q"],
     "qcow2: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
     "qcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n"),
    (["-f", "qcow2", "x.qcow2", "8E"],
     "qcow2: Invalid image size specified. Must be between 0 and 9223372036854775807.\n"),
    (["-f", "qcow2", "x.qcow2", "-5"],
     "qcow2: unrecognized option '-5'\nTry 'qcow2 --help' for more information\n"),
    (["-f", "qcow2", "-o", ",compat=0.10", "x.qcow2", "1M"],
     "qcow2: Invalid option list: ,compat=0.10\n"),
    (["-f", "qcow2"], "qcow2: Expecting image file name\nTry 'qcow2 --help' for more "
     "information\n"),
    (["-f", "vmdk", "x.qcow2", "1M"], "qcow2: x.qcow2: Unknown file format 'vmdk'\n"),
    (["-f", "qcow2", "-o", "encryption=on", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Encryption is not supported yet (option 'encryption')\n"),
    (["-f", "qcow2", "-o", "encrypt.format=luks", "x.qcow2", "1M"],
     "qcow2: x.qcow2: Encryption is not supported yet (option 'encrypt.format')\n"),
])
def test_errors(cwd: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                err: str) -> None:
    rc, _out, stderr = run(capsys, *argv)
    assert (rc, stderr) == (1, err)
    assert not (cwd / "x.qcow2").exists()


def test_failed_qcow2_create_deletes_the_files(cwd: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Like QEMU: the image and data file were created (truncated) before the options were
    checked, and are deleted on failure, even if they existed before."""
    Path("x.qcow2").write_bytes(b"old")
    Path("d.raw").write_bytes(b"old")
    rc, _out, err = run(capsys, "-f", "qcow2", "-o", "data_file=d.raw,compat=0.10",
                        "x.qcow2", "1M")
    assert rc == 1 and "External data files are only supported" in err
    assert not Path("x.qcow2").exists() and not Path("d.raw").exists()
    # An option error found before any file is touched leaves it alone.
    Path("x.qcow2").write_bytes(b"old")
    assert run(capsys, "-f", "qcow2", "-o", "bogus=1", "x.qcow2", "1M")[0] == 1
    assert Path("x.qcow2").read_bytes() == b"old"


def test_api_errors(cwd: Path) -> None:
    with pytest.raises(CreateError, match="needs a size"):
        qcow2.create("x.qcow2")
    with pytest.raises(CreateError, match="Invalid parameter 'bogus'"):
        qcow2.create("x.qcow2", MiB, bogus=1)
    with pytest.raises(qcow2.ImageLimitError, match="too large"):
        qcow2.create("x.qcow2", 3 << 50)
    with pytest.raises(ValueError, match="Extended L2"):
        qcow2.create("x.qcow2", MiB, extended_l2=True, cluster_size=4096)
    with pytest.raises(CreateError, match="without backing format"):
        qcow2.create("x.qcow2", MiB, backing_file="b.qcow2", open_backing=False)
    assert not Path("x.qcow2").exists()


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,value", [
    ("0", 0), ("1000", 1000), ("1k", 1024), ("1.5k", 1536), ("1.k", 1024), ("64M", 64 * MiB),
    ("1b", 1), ("0x100", 256), (" 12", 12), ("+5k", 5120), ("12.345M", 12944671),
    ("8E", 8 << 60), ("16E", OverflowError), ("1.5", ValueError), ("1e3", ValueError),
    ("1kB", ValueError), ("-5", ValueError), ("", ValueError), ("1Q", ValueError),
    ("0x1.8", ValueError),
])
def test_parse_size(text: str, value: int | type[Exception]) -> None:
    if isinstance(value, int):
        assert parse_size(text) == value
    else:
        with pytest.raises(value):
            parse_size(text)


def test_option_parsing() -> None:
    assert parse_create_options("qcow2", "backing_file=a,,b,compat=1.1,compat=0.10") == \
        {"backing_file": "a,b", "compat": "0.10"}
    assert parse_create_options("qcow2", "lazy_refcounts,noextended_l2") == \
        {"lazy_refcounts": "on", "extended_l2": "off"}
    with pytest.raises(CreateError, match="expects 'on' or 'off'"):
        parse_create_options("qcow2", "lazy_refcounts=maybe")
    with pytest.raises(CreateError, match="expects a number"):
        parse_create_options("qcow2", "refcount_bits=abc")
    with pytest.raises(CreateError, match="is too large for parameter"):
        parse_create_options("qcow2", "refcount_bits=99999999999999999999")
    with pytest.raises(CreateError, match="is out of range for parameter 'size'"):
        parse_create_options("qcow2", "size=16E")
    with pytest.raises(CreateError, match="Invalid parameter 'cluster_size'"):
        parse_create_options("raw", "cluster_size=4k")
    assert has_help_option("compat=1.1,help") and has_help_option("?")
    assert not has_help_option("backing_file=help,,x")
    assert is_valid_option_list("a=1,,") and not is_valid_option_list("a=1,")
    assert not is_valid_option_list(",a=1") and not is_valid_option_list("")


def test_format_line_prints_sizes_as_int64() -> None:
    assert format_line("x", "qcow2", {"size": "15E"}).split()[6] == \
        "size=-1152921504606846976"


def test_option_help() -> None:
    text = option_help("raw")
    assert text == (
        "Supported options:\n"
        "  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable\n"
        "  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n"
        "  preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)\n"
        "  size=<size>            - Virtual disk size\n")
    assert option_help("qcow2", with_protocol=False).startswith(
        "Supported qcow2 options:\n  backing_file=<str>     - File name of a base image\n")


def test_non_utf8_names(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """File names are bytes to QEMU: argv's undecodable bytes go into the header unchanged."""
    rc, _out, _err = run(capsys, "-q", "-f", "qcow2", "-u", "-b", "b\udcff", "-F", "raw",
                         "-o", "data_file=d\udcfe", "x.qcow2", "1M")
    assert rc == 0
    raw = Path("x.qcow2").read_bytes()[:65536]
    h = Header.parse(raw)
    assert raw[h.backing_file_offset:h.backing_file_offset + h.backing_file_size] == b"b\xff"
    assert b"DATA\x00\x00\x00\x02d\xfe" in raw
    assert os.path.exists(b"d\xfe")
