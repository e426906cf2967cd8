"""qcow v1 format layer: header parse/encode, QEMU's open-time checks, compressed entries."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcow2.errors import ImageLimitError, InvalidImageError, UnsupportedFeatureError
from qcow2.format.qcow1 import (
    MAX_HOST_OFFSET,
    QCOW_HEADER_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QcowHeader,
    compressed_offset_mask,
    encode_compressed_entry,
    l1_entries_for,
    parse_compressed_entry,
)

HDR = struct.Struct(">IIQIIQBBHIQ")
MAGIC = 0x514649FB

# The first 48 bytes `qemu-img create -f qcow a.qcow 1000000` writes (7.2).
QEMU_HEADER = bytes.fromhex(
    "514649fb000000010000000000000000000000000000000000000000000f"
    "44000c090000000000000000000000000030")
# ... and `qemu-img create -f qcow -b base.qcow2 -F qcow2 ov.qcow 2M`.
QEMU_BACKING_HEADER = bytes.fromhex(
    "514649fb0000000100000000000000300000000a00000000000000000020"
    "0000090c0000000000000000000000000040")


def raw_header(*, magic: int = MAGIC, version: int = 1, bfo: int = 0, bfs: int = 0,
               mtime: int = 0, size: int = 1 << 20, cbits: int = 12, l2bits: int = 9,
               pad: int = 0, crypt: int = 0, l1_off: int = 48) -> bytes:
    return HDR.pack(magic, version, bfo, bfs, mtime, size, cbits, l2bits, pad, crypt, l1_off)


def check(data: bytes) -> QcowHeader:
    h = QcowHeader.parse(data)
    h.validate()
    return h


def test_qemu_header_fields() -> None:
    assert len(QEMU_HEADER) == QCOW_HEADER_SIZE
    h = check(QEMU_HEADER)
    assert (h.version, h.size, h.cluster_bits, h.l2_bits, h.crypt_method) == (1, 1000448, 12, 9, 0)
    assert h.l1_table_offset == 48 and h.backing_file_offset == 0
    assert h.cluster_size == 4096 and h.l2_entries == 512
    assert h.l1_size == 1  # one L2 table maps 2 MiB
    assert h.virtual_size == 1000448
    assert h.encode() == QEMU_HEADER


def test_qemu_backing_header_fields() -> None:
    h = check(QEMU_BACKING_HEADER)
    assert (h.backing_file_offset, h.backing_file_size) == (48, 10)
    assert (h.cluster_bits, h.l2_bits, h.l1_table_offset) == (9, 12, 64)
    assert h.l1_size == 1
    assert h.encode() == QEMU_BACKING_HEADER


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 255), st.integers(0, 255),
       st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_parse_encode_round_trip(bfo: int, bfs: int, mtime: int, size: int, cbits: int,
                                 l2bits: int, pad: int, crypt: int, l1_off: int) -> None:
    data = raw_header(bfo=bfo, bfs=bfs, mtime=mtime, size=size, cbits=cbits, l2bits=l2bits,
                      pad=pad, crypt=crypt, l1_off=l1_off)
    h = QcowHeader.parse(data + b"trailing bytes are ignored")
    assert h.encode() == data
    assert QcowHeader.parse(h.encode()) == h


def test_virtual_size_drops_partial_sector() -> None:
    # QEMU sets total_sectors = size / 512 [verified: 1000100 -> 999936, 300 -> 0].
    assert check(raw_header(size=1000100)).virtual_size == 999936
    assert check(raw_header(size=300)).virtual_size == 0
    assert check(raw_header(size=2)).virtual_size == 0


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"magic": 0x514649FC}, InvalidImageError, "Image not in qcow format"),
    ({"version": 2}, UnsupportedFeatureError,
     "qcow (v1) does not support qcow version 2 (try the 'qcow2' driver instead)"),
    ({"version": 0}, UnsupportedFeatureError, "qcow (v1) does not support qcow version 0"),
    ({"size": 0}, InvalidImageError, "Image size is too small (must be at least 2 bytes)"),
    ({"size": 1}, InvalidImageError, "Image size is too small (must be at least 2 bytes)"),
    ({"cbits": 8}, InvalidImageError, "Cluster size must be between 512 and 64k"),
    ({"cbits": 17}, InvalidImageError, "Cluster size must be between 512 and 64k"),
    ({"cbits": 255}, InvalidImageError, "Cluster size must be between 512 and 64k"),
    ({"l2bits": 5}, InvalidImageError, "L2 table size must be between 512 and 64k"),
    ({"l2bits": 14}, InvalidImageError, "L2 table size must be between 512 and 64k"),
    ({"crypt": 2}, InvalidImageError, "invalid encryption method in qcow header"),
    ({"crypt": 2**32 - 1}, InvalidImageError, "invalid encryption method in qcow header"),
    # size + 2^shift - 1 would wrap in uint64
    ({"size": 2**64 - 1}, ImageLimitError, "Image too large"),
    ({"size": 2**64 - 2**21, "cbits": 12, "l2bits": 9}, ImageLimitError, "Image too large"),
    # L1 of 2^28 entries: more than INT_MAX bytes
    ({"size": 2**43, "cbits": 9, "l2bits": 6}, ImageLimitError, "Image too large"),
    ({"l1_off": 2**63}, InvalidImageError, "L1 table offset 0x8000000000000000 is beyond"),
    ({"l1_off": MAX_HOST_OFFSET - 7}, InvalidImageError, "L1 table offset"),
    ({"bfo": 48, "bfs": 1024}, InvalidImageError, "Backing file name too long"),
    ({"bfo": 48, "bfs": 2**32 - 1}, InvalidImageError, "Backing file name too long"),
    ({"bfo": 2**64 - 1, "bfs": 10}, InvalidImageError, "Backing file name offset"),
])
def test_validation_errors(kwargs: dict[str, int], exc: type[Exception], message: str) -> None:
    with pytest.raises(exc) as info:
        check(raw_header(**kwargs))
    assert type(info.value) is exc
    assert str(info.value).startswith(message)


def test_validation_order_follows_qemu() -> None:
    # Several bad fields: QEMU reports size, then cluster size, then L2 size, then encryption.
    with pytest.raises(InvalidImageError, match="Image size is too small"):
        check(raw_header(size=0, cbits=0, l2bits=0, crypt=9))
    with pytest.raises(InvalidImageError, match="Cluster size"):
        check(raw_header(cbits=0, l2bits=0, crypt=9))
    with pytest.raises(InvalidImageError, match="L2 table size"):
        check(raw_header(l2bits=0, crypt=9))
    with pytest.raises(InvalidImageError, match="encryption method"):
        check(raw_header(crypt=9, size=2**64 - 1))


def test_truncated_header() -> None:
    with pytest.raises(InvalidImageError, match="not in qcow format"):
        QcowHeader.parse(QEMU_HEADER[:47])
    with pytest.raises(InvalidImageError):
        QcowHeader.parse(b"")


def test_limits_accepted() -> None:
    for cbits in (9, 16):
        for l2bits in (6, 13):
            h = check(raw_header(cbits=cbits, l2bits=l2bits, size=2))
            assert h.l1_size == 1
    h = check(raw_header(bfo=48, bfs=1023))
    assert h.backing_file_size == 1023
    # A backing size with a zero offset is ignored, as QEMU does.
    check(raw_header(bfo=0, bfs=2**32 - 1))
    # Encryption method 1 (AES) is a valid header; reading it is refused by the engine.
    assert check(raw_header(crypt=1)).crypt_method == 1


def test_l1_entries() -> None:
    assert l1_entries_for(2, 12, 9) == 1
    assert l1_entries_for(2 << 20, 12, 9) == 1
    assert l1_entries_for((2 << 20) + 1, 12, 9) == 2
    # the largest L1 QEMU accepts: INT_MAX / 8 entries
    assert l1_entries_for(((2**31 - 1) // 8) << 15, 9, 6) == (2**31 - 1) // 8
    with pytest.raises(ImageLimitError):
        l1_entries_for((((2**31 - 1) // 8) << 15) + 1, 9, 6)


def test_compressed_entry_spec_example() -> None:
    # 4 KiB clusters: 0x8f88000000002000 is 497 compressed bytes at 0x2000 [verified].
    assert parse_compressed_entry(0x8F88000000002000, 12) == (0x2000, 497)
    assert encode_compressed_entry(0x2000, 497, 12) == 0x8F88000000002000
    assert compressed_offset_mask(12) == (1 << 51) - 1
    assert compressed_offset_mask(9) == (1 << 54) - 1
    assert compressed_offset_mask(16) == (1 << 47) - 1


@given(st.integers(9, 16), st.data())
def test_compressed_entry_round_trip(cbits: int, data: st.DataObject) -> None:
    coffset = data.draw(st.integers(0, compressed_offset_mask(cbits)))
    csize = data.draw(st.integers(1, (1 << cbits) - 1))
    e = encode_compressed_entry(coffset, csize, cbits)
    assert e & QCOW_OFLAG_COMPRESSED
    assert parse_compressed_entry(e, cbits) == (coffset, csize)


def test_compressed_entry_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_compressed_entry(0, 4096, 12)  # not smaller than a cluster
    with pytest.raises(ValueError):
        encode_compressed_entry(0, 0, 12)
    with pytest.raises(ValueError):
        encode_compressed_entry(1 << 51, 10, 12)
