"""`qcow2 info` in-process, and the shared CLI helpers (sizes, QDict order, QEMU's JSON).

No oracle here: images come from the in-memory builder and the expected texts are qemu-img
7.2's (checked against it by tests/differential/test_info_map.py).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from qcow2.cli.common import (
    cvtnum,
    dump_qobject,
    json_quote,
    qdict_order,
    qemu_strtosz,
    size_to_str,
    to_json_pretty,
)
from qcow2.cli.main import UsageError, main
from qcow2.format.builder import ZERO, ImageSpec, build_image

MiB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def make(path: Path, size: int = 1 * MiB, **kw: object) -> Path:
    spec = ImageSpec(size=size, **kw)  # type: ignore[arg-type]
    path.write_bytes(build_image(spec))
    return path


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("value,text", [
    (0, "0 B"), (1, "1 B"), (999, "999 B"), (1000, "0.977 KiB"), (1024, "1 KiB"),
    (368640, "360 KiB"), (397312, "388 KiB"), (67108864, "64 MiB"),
    (1610612736, "1.5 GiB"), (1 << 40, "1 TiB"), (2297856, "2.19 MiB"),
    ((1 << 64) - 1, "16 EiB"),
])
def test_size_to_str(value: int, text: str) -> None:
    assert size_to_str(value) == text


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("64k", 65536), ("64K", 65536), (" 64k", 65536), ("+64k", 65536),
    ("1M", MiB), ("1.5M", 3 * MiB // 2), ("1.k", 1024), ("1.0", 1), ("1b", 1),
    ("0x10000", 65536), ("1E", 1 << 60), ("15E", 15 << 60), ("1T", 1 << 40),
])
def test_strtosz(text: str, value: int) -> None:
    assert qemu_strtosz(text) == value


@pytest.mark.parametrize("text", ["", "x", "1.5", ".5k", "64kB", "-1", "-0", "1e3", "0x",
                                  "1.5e3k", "0x1.5", "1 k"])
def test_strtosz_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        qemu_strtosz(text)


def test_strtosz_overflow() -> None:
    with pytest.raises(OverflowError):
        qemu_strtosz("16E")
    with pytest.raises(OverflowError):
        qemu_strtosz("99999999999999999999")


def test_strtosz_hex_suffix_is_deprecated(capsys: pytest.CaptureFixture[str]) -> None:
    assert qemu_strtosz("0x10k") == 16384
    assert capsys.readouterr().err == (
        "qcow2: warning: Using a multiplier suffix on hex numbers is deprecated: 0x10k\n")


def test_cvtnum_messages() -> None:
    with pytest.raises(UsageError) as e:
        cvtnum("start offset", "1.5")
    assert str(e.value) == (
        "Invalid start offset specified. You may use k, M, G, T, P or E suffixes for\n"
        "qcow2: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    for bad in ("8E", "16E"):
        with pytest.raises(UsageError) as e:
            cvtnum("max length", bad)
        assert str(e.value) == ("Invalid max length specified. Must be between 0 and "
                                "9223372036854775807.")


def test_qdict_order_matches_qemu() -> None:
    # The QAPI insertion order of ImageInfo, and the order qemu-img 7.2 prints.
    qapi = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
            "backing-filename", "full-backing-filename", "backing-filename-format",
            "snapshots", "format-specific"]
    assert qdict_order(qapi) == [
        "backing-filename-format", "snapshots", "virtual-size", "filename", "cluster-size",
        "format", "actual-size", "format-specific", "full-backing-filename",
        "backing-filename", "dirty-flag"]
    assert qdict_order(["id", "name", "vm-state-size", "date-sec", "date-nsec",
                        "vm-clock-sec", "vm-clock-nsec", "icount"]) == [
        "icount", "vm-clock-nsec", "name", "date-sec", "date-nsec", "vm-clock-sec", "id",
        "vm-state-size"]


def test_json_pretty_layout() -> None:
    obj = {"type": "qcow2", "data": {"flags": [], "list": ["auto", 1, True], "n": -5}}
    assert to_json_pretty(obj) == (
        '{\n'
        '    "type": "qcow2",\n'
        '    "data": {\n'
        '        "flags": [\n'
        '        ],\n'
        '        "list": [\n'
        '            "auto",\n'
        '            1,\n'
        '            true\n'
        '        ],\n'
        '        "n": -5\n'
        '    }\n'
        '}')
    assert to_json_pretty({}) == "{\n}"


def test_json_quote() -> None:
    assert json_quote('a"b\\c\n\t\x01\x7f') == '"a\\"b\\\\c\\n\\t\\u0001\\u007F"'
    assert json_quote("snäp") == '"sn\\u00E4p"'
    assert json_quote("\U0001F600") == '"\\uD83D\\uDE00"'
    assert json_quote("x\udcff") == '"x\\uFFFD"'


def test_dump_qobject() -> None:
    out: list[str] = []
    dump_qobject(1, {"bitmaps": [{"flags": [], "name": "b", "granularity": 65536}],
                     "lazy-refcounts": False}, out)
    assert "".join(out) == ("    lazy refcounts: false\n"
                            "    bitmaps:\n"
                            "        [0]:\n"
                            "            flags:\n"
                            "            name: b\n"
                            "            granularity: 65536\n")


# ----------------------------------------------------------------------------- info
FORMAT_SPECIFIC = ("Format specific information:\n"
                   "    compat: 1.1\n"
                   "    compression type: zlib\n"
                   "    lazy refcounts: false\n"
                   "    refcount bits: 16\n"
                   "    corrupt: false\n"
                   "    extended l2: false\n")


def test_info_human(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(cwd / "a.qcow2", 64 * MiB, clusters={0: b"x" * 100, 3: ZERO})
    actual = os.stat(cwd / "a.qcow2").st_blocks * 512
    rc, out, err = run(capsys, "info", "a.qcow2")
    assert (rc, err) == (0, "")
    assert out == ("image: a.qcow2\n"
                   "file format: qcow2\n"
                   "virtual size: 64 MiB (67108864 bytes)\n"
                   f"disk size: {size_to_str(actual)}\n"
                   "cluster_size: 65536\n" + FORMAT_SPECIFIC)


def test_info_json(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(cwd / "a.qcow2", 64 * MiB, clusters={0: b"x" * 100})
    actual = os.stat(cwd / "a.qcow2").st_blocks * 512
    rc, out, err = run(capsys, "info", "--output=json", "a.qcow2")
    assert (rc, err) == (0, "")
    assert out == ('{\n'
                   '    "virtual-size": 67108864,\n'
                   '    "filename": "a.qcow2",\n'
                   '    "cluster-size": 65536,\n'
                   '    "format": "qcow2",\n'
                   f'    "actual-size": {actual},\n'
                   '    "format-specific": {\n'
                   '        "type": "qcow2",\n'
                   '        "data": {\n'
                   '            "compat": "1.1",\n'
                   '            "compression-type": "zlib",\n'
                   '            "lazy-refcounts": false,\n'
                   '            "refcount-bits": 16,\n'
                   '            "corrupt": false,\n'
                   '            "extended-l2": false\n'
                   '        }\n'
                   '    },\n'
                   '    "dirty-flag": false\n'
                   '}\n')


def test_info_v2(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(cwd / "v2.qcow2", version=2)
    _, out, _ = run(capsys, "info", "--output=json", "v2.qcow2")
    assert json.loads(out)["format-specific"]["data"] == {
        "compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}
    rc, out, _ = run(capsys, "info", "v2.qcow2")
    assert rc == 0
    assert out.endswith("Format specific information:\n    compat: 0.10\n"
                        "    compression type: zlib\n    refcount bits: 16\n")


def test_info_dirty_and_corrupt(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = make(cwd / "d.qcow2")
    with open(p, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">QQ", 3, 1))  # dirty + corrupt, lazy refcounts
    rc, out, _ = run(capsys, "info", "d.qcow2")
    assert rc == 0
    assert "cluster_size: 65536\ncleanly shut down: no\n" in out
    assert "lazy refcounts: true\n" in out and "corrupt: true\n" in out
    info = json.loads(run(capsys, "info", "--output=json", "d.qcow2")[1])
    assert info["dirty-flag"] is True
    assert info["format-specific"]["data"]["corrupt"] is True


def test_info_backing_missing(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(cwd / "top.qcow2", backing_file="nothere.qcow2", backing_format="qcow2")
    rc, out, err = run(capsys, "info", "top.qcow2")
    assert (rc, err) == (0, "")
    assert "backing file: nothere.qcow2\nbacking file format: qcow2\n" in out
    rc, out, err = run(capsys, "info", "--backing-chain", "top.qcow2")
    assert (rc, out) == (1, "")
    assert err == ("qcow2: Could not open 'nothere.qcow2': Could not open 'nothere.qcow2': "
                   "No such file or directory\n")


def test_info_backing_chain(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (cwd / "sub").mkdir()
    (cwd / "sub" / "base.raw").write_bytes(b"\x01" * 1000)
    make(cwd / "sub" / "top.qcow2", backing_file="base.raw", backing_format="raw")
    rc, out, err = run(capsys, "info", "--backing-chain", "sub/top.qcow2")
    assert (rc, err) == (0, "")
    top, base = out.split("\n\n")
    assert "backing file: base.raw (actual path: sub/base.raw)\nbacking file format: raw\n" \
        in top
    assert base.startswith("image: sub/base.raw\nfile format: raw\n"
                           "virtual size: 1 KiB (1024 bytes)\n")
    infos = json.loads(run(capsys, "info", "--backing-chain", "--output=json",
                           "sub/top.qcow2")[1])
    assert [i["filename"] for i in infos] == ["sub/top.qcow2", "sub/base.raw"]
    assert infos[0]["full-backing-filename"] == "sub/base.raw"
    assert infos[0]["backing-filename"] == "base.raw"
    assert infos[1] == {"virtual-size": 1024, "filename": "sub/base.raw", "format": "raw",
                        "actual-size": infos[1]["actual-size"], "dirty-flag": False}
    # without --backing-chain, JSON is one object, not a list
    assert isinstance(json.loads(run(capsys, "info", "--output=json", "sub/top.qcow2")[1]),
                      dict)


def test_info_backing_loop(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(cwd / "a.qcow2", backing_file="b.qcow2", backing_format="qcow2")
    make(cwd / "b.qcow2", backing_file="a.qcow2", backing_format="qcow2")
    rc, out, err = run(capsys, "info", "--backing-chain", "a.qcow2")
    assert (rc, out) == (1, "")
    assert err == "qcow2: Backing file 'a.qcow2' creates an infinite loop.\n"


def test_info_raw(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (cwd / "r.raw").write_bytes(b"\x01" * 1000)
    rc, out, err = run(capsys, "info", "r.raw")
    assert (rc, err) == (0, "")
    assert out.startswith("image: r.raw\nfile format: raw\nvirtual size: 1 KiB (1024 bytes)\n"
                          "disk size: ")
    assert out.count("\n") == 4


def test_info_odd_size_keeps_whole_sectors(cwd: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    p = make(cwd / "o.qcow2")
    with open(p, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", MiB + 1000))
    info = json.loads(run(capsys, "info", "--output=json", "o.qcow2")[1])
    assert info["virtual-size"] == MiB + 512


@pytest.mark.parametrize("argv,message", [
    (["info", "nofile"],
     "Could not open 'nofile': Could not open 'nofile': No such file or directory"),
    (["info", "."], "Could not open '.': 'file' driver requires '.' to be a regular file"),
    (["info", "-f", "foo", "a.qcow2"], "Could not open 'a.qcow2': Unknown driver 'foo'"),
    (["info", "-f", "qcow2", "r.raw"], "Could not open 'r.raw': Image is not in qcow2 format"),
    (["info", "--output=xml", "a.qcow2"],
     "--output must be used with human or json as argument."),
    (["info"], "Expecting one image file name"),
    (["info", "a.qcow2", "r.raw"], "Expecting one image file name"),
])
def test_info_errors(cwd: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                     message: str) -> None:
    make(cwd / "a.qcow2")
    (cwd / "r.raw").write_bytes(bytes(4096))
    assert run(capsys, *argv) == (1, "", f"qcow2: {message}\n")


def test_info_truncated_image_is_one_line(cwd: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    data = build_image(ImageSpec(size=MiB, clusters={0: b"x"}))
    (cwd / "t.qcow2").write_bytes(data[:40])
    rc, out, err = run(capsys, "info", "-f", "qcow2", "t.qcow2")
    assert (rc, out) == (1, "")
    assert err.startswith("qcow2: Could not open 't.qcow2': ") and err.count("\n") == 1


def test_info_encrypted_aes(cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the engine cannot read encrypted data, but info needs none (qemu-img opens without key)
    p = make(cwd / "e.qcow2")
    with open(p, "r+b") as f:
        f.seek(32)
        f.write(struct.pack(">I", 1))
    rc, out, err = run(capsys, "info", "e.qcow2")
    assert (rc, err) == (0, "")
    assert "disk size: " in out and "encrypted: yes\ncluster_size: 65536\n" in out
    assert "    refcount bits: 16\n    encrypt:\n        format: aes\n    corrupt: false\n" in out
    info = json.loads(run(capsys, "info", "--output=json", "e.qcow2")[1])
    assert info["encrypted"] is True
    assert info["format-specific"]["data"]["encrypt"] == {"format": "aes"}
    rc, out, err = run(capsys, "map", "e.qcow2")
    assert (rc, out) == (1, "") and err.count("\n") == 1


def test_luks_info() -> None:
    from qcow2.ops.info import LUKS_SLOT_ENABLED, luks_info

    hdr = struct.pack(">6sH32s32s32sII20s32sI40s", b"LUKS\xba\xbe", 1, b"aes", b"xts-plain64",
                      b"sha256", 4040, 64, bytes(20), bytes(32), 1234, b"1234-uuid")
    for i in range(8):
        hdr += struct.pack(">II32sII", LUKS_SLOT_ENABLED if i == 0 else 0xDEAD, 99, bytes(32),
                           8 + i * 512, 4000)
    assert luks_info(hdr) == {
        "format": "luks", "cipher-alg": "aes-256", "cipher-mode": "xts", "ivgen-alg": "plain64",
        "hash-alg": "sha256", "payload-offset": 4040 * 512, "master-key-iters": 1234,
        "uuid": "1234-uuid",
        "slots": [{"active": True, "iters": 99, "stripes": 4000, "key-offset": 4096}] +
                 [{"active": False, "key-offset": (8 + i * 512) * 512} for i in range(1, 8)]}
