"""Unit tests of engine/check.py (no oracle): refblock codecs, counters, classification and
repairs on small in-memory images built with format/builder.py, and the CLI's text."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

import qcow2
from qcow2.cli.check import human_check
from qcow2.cli.main import main
from qcow2.engine.check import (
    CheckResult,
    check_store,
    decode_refblock_np,
    encode_refblock_np,
)
from qcow2.format.builder import ImageSpec, build_image
from qcow2.format.refcount import decode_refblock, encode_refblock
from qcow2.io import MemoryStore

CS = 65536


def _image(**kw: object) -> bytearray:
    spec = ImageSpec(size=8 << 20, clusters={0: b"\x01" * CS, 1: b"\x02" * CS, 5: b"\x03" * CS},
                     **kw)  # type: ignore[arg-type]
    return bytearray(build_image(spec))


def _u64(img: bytes | bytearray, off: int) -> int:
    return int(struct.unpack_from(">Q", img, off)[0])


def _refblock(img: bytearray) -> int:
    return _u64(img, _u64(img, 48)) & ~511


def _l2(img: bytearray) -> int:
    return _u64(img, _u64(img, 40)) & 0x00FFFFFFFFFFFE00


def _set_rc16(img: bytearray, cluster: int, value: int) -> None:
    struct.pack_into(">H", img, _refblock(img) + 2 * cluster, value)


def _check(img: bytearray, repair: str | None = None) -> tuple[CheckResult, MemoryStore]:
    store = MemoryStore(img)
    return check_store(store, "img", repair), store  # type: ignore[arg-type]


@pytest.mark.parametrize("order", range(7))
def test_refblock_codecs_match_the_scalar_ones(order: int) -> None:
    bits = 1 << order
    n = CS * 8 // bits
    rng = np.random.default_rng(order)
    values = rng.integers(0, (1 << min(bits, 63)) - 1, size=n, endpoint=True, dtype=np.uint64)
    raw = encode_refblock(values.tolist(), order)
    assert encode_refblock_np(np, values, order) == raw
    assert decode_refblock_np(np, raw, order).tolist() == decode_refblock(raw, order)


def test_clean_image_counters() -> None:
    res, _ = _check(_image())
    assert res.clean and not res.messages
    q = res.to_qapi()
    assert q == {"filename": "img", "format": "qcow2", "check-errors": 0,
                 "image-end-offset": q["image-end-offset"], "total-clusters": 128,
                 "allocated-clusters": 3}


def test_to_qapi_omits_zero_counters() -> None:
    assert CheckResult("x").to_qapi() == {"filename": "x", "format": "qcow2",
                                          "check-errors": 0}


def test_leak_is_reported_and_repaired() -> None:
    img = _image()
    img += bytes(CS)               # a cluster past the data, referenced by nothing
    _set_rc16(img, len(img) // CS - 1, 1)
    res, _ = _check(img)
    assert (res.leaks, res.corruptions) == (1, 0)
    assert res.messages[0].text.startswith("Leaked cluster")
    res, store = _check(img, "leaks")
    assert (res.leaks_fixed, res.leaks) == (1, 0)
    assert check_store(store, "img").clean


def test_refcount_too_high_is_a_leak_and_a_copied_mismatch() -> None:
    img = _image()
    data_cluster = (_u64(img, _l2(img)) & 0x00FFFFFFFFFFFE00) // CS
    _set_rc16(img, data_cluster, 2)
    res, _ = _check(img)
    assert (res.leaks, res.corruptions) == (1, 1)
    assert [m.text.split()[0] for m in res.messages] == ["Leaked", "ERROR"]
    res, store = _check(img, "all")
    assert res.leaks_fixed == 1 and res.corruptions == 0
    assert check_store(store, "img").clean


def test_refcount_zero_needs_a_rebuild_which_repair_all_does() -> None:
    img = _image()
    data_cluster = (_u64(img, _l2(img)) & 0x00FFFFFFFFFFFE00) // CS
    _set_rc16(img, data_cluster, 0)
    before = qcow2_read(img)
    res, _ = _check(img, "leaks")
    assert res.failure == "Input/output error"
    assert res.messages[-1].text == "ERROR need to rebuild refcount structures"
    res, store = _check(img, "all")
    assert res.failure is None and res.corruptions_fixed == 1
    assert "Rebuilding refcount structure" in [m.text for m in res.messages]
    after = check_store(store, "img")
    assert after.clean, after.messages
    assert qcow2_read(store.buf) == before


def qcow2_read(img: bytes | bytearray) -> bytes:
    from qcow2.engine.image import Qcow2Image

    with Qcow2Image(MemoryStore(bytes(img)), "m") as dev:  # type: ignore[arg-type]
        return dev.read(0, dev.virtual_size)


def test_copied_flag_cleared_is_repaired() -> None:
    img = _image()
    l2 = _l2(img)
    struct.pack_into(">Q", img, l2, _u64(img, l2) & ~(1 << 63))
    res, _ = _check(img)
    assert res.corruptions == 1 and "OFLAG_COPIED data cluster" in res.messages[0].text
    res, store = _check(img, "all")
    assert res.corruptions_fixed == 1
    assert _u64(store.buf, l2) >> 63 == 1


def test_reserved_bits_are_corruptions_not_repaired() -> None:
    img = _image()
    l2 = _l2(img)
    struct.pack_into(">Q", img, l2 + 8, _u64(img, l2 + 8) | 0x2)
    res, _ = _check(img, "all")
    assert res.corruptions == 1 and res.corruptions_fixed == 0
    assert res.messages[0].text.startswith("ERROR found l2 entry with reserved bits set")


def test_reference_past_eof() -> None:
    img = _image()
    l2 = _l2(img)
    struct.pack_into(">Q", img, l2 + 8, (1 << 63) | (1 << 30))
    res, _ = _check(img)
    assert res.messages[0].text.startswith(
        "ERROR: counting reference for region exceeding the end of the file")
    assert res.corruptions == 2 and res.leaks == 1


@pytest.mark.parametrize("order", [0, 3, 6])
def test_refcount_widths_clean(order: int) -> None:
    res, _ = _check(_image(refcount_order=order))
    assert res.clean, res.messages


def test_overflow_with_one_bit_refcounts() -> None:
    img = _image(refcount_order=0)
    l2 = _l2(img)
    # guest cluster 2 shares guest cluster 0's host cluster: two references, max is 1
    struct.pack_into(">Q", img, l2 + 16, _u64(img, l2) & ~(1 << 63))
    res, _ = _check(img)
    texts = [m.text for m in res.messages]
    assert texts[0].startswith("ERROR: overflow cluster offset=")
    assert texts[1].startswith("Use qemu-img amend")
    assert res.corruptions >= 1


def test_dirty_bit_cleared_by_repair_only_when_consistent() -> None:
    img = _image()
    struct.pack_into(">Q", img, 72, 1)   # dirty
    res, store = _check(img, "all")
    assert res.clean
    assert _u64(store.buf, 72) == 0


def test_check_of_hostile_header_is_one_error() -> None:
    img = _image()
    struct.pack_into(">I", img, 20, 40)   # cluster_bits 40
    with pytest.raises(qcow2.Qcow2Error):
        _check(img)


def test_human_output() -> None:
    res = CheckResult("x", corruptions=2, leaks=1, total_clusters=1024, allocated_clusters=2,
                      fragmented_clusters=1, image_end_offset=458752)
    assert human_check(res) == (
        "\n2 errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n"
        "\n1 leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n"
        "2/1024 = 0.20% allocated, 50.00% fragmented, 0.00% compressed clusters\n"
        "Image end offset: 458752\n")
    assert human_check(CheckResult("x", image_end_offset=262144)) == (
        "No errors were found on the image.\nImage end offset: 262144\n")


def test_cli_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.qcow2"
    p.write_bytes(_image())
    assert main(["check", str(p)]) == 0
    assert capsys.readouterr().out.startswith("No errors were found on the image.\n")
    assert main(["check", "-r", "foo", str(p)]) == 1
    assert "Unknown option value for -r" in capsys.readouterr().err
    assert main(["check", "--output=xml", str(p)]) == 1
    assert main(["check", str(p), str(p)]) == 1
    assert main(["check", str(tmp_path / "missing")]) == 1
    r = tmp_path / "r.raw"
    r.write_bytes(bytes(4096))
    assert main(["check", str(r)]) == 63
    assert "does not support checks" in capsys.readouterr().err
    img = _image()
    _set_rc16(img, 3, 2)   # the L1 table's cluster: a leak
    p.write_bytes(img)
    assert main(["check", "-q", str(p)]) == 3
    assert capsys.readouterr().out == ""
    assert main(["check", "-r", "leaks", str(p)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The following inconsistencies were found and repaired:\n\n"
                          "    1 leaked clusters\n    0 corruptions\n\n"
                          "Double checking the fixed image now...\nNo errors")


def test_api_check(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    img = _image()
    _set_rc16(img, 3, 2)
    p.write_bytes(img)
    assert qcow2.check(str(p)).leaks == 1
    res = qcow2.check(str(p), repair="leaks")
    assert res.leaks_fixed == 1 and res.leaks == 0
    assert [m.text.split()[0] for m in res.messages] == ["Leaked", "Repairing"]
    with pytest.raises(ValueError):
        qcow2.check(str(p), repair="bogus")  # type: ignore[arg-type]
    with pytest.raises(OSError):
        qcow2.check(str(tmp_path / "missing"))
