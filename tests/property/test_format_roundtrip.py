"""parse ∘ encode round trips for every record of the format layer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qcow2.format import constants as C
from qcow2.format.bitmap import BitmapDirEntry, parse_bitmap_directory
from qcow2.format.entries import CompressedLayout
from qcow2.format.header import (
    Extension,
    Header,
    HeaderExtensions,
    encode_header_cluster,
    parse_extensions,
)
from qcow2.format.refcount import decode_refblock, encode_refblock, get_refcount, set_refcount
from qcow2.format.snapshot import SnapshotEntry, encode_snapshot_table, parse_snapshot_table

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    version = draw(st.sampled_from([2, 3]))
    cbits = draw(st.integers(9, 21))
    h = Header(version=version, cluster_bits=cbits, size=draw(u64), crypt_method=draw(u32),
               l1_size=draw(u32), l1_table_offset=draw(u64), refcount_table_offset=draw(u64),
               refcount_table_clusters=draw(u32), nb_snapshots=draw(u32),
               snapshots_offset=draw(u64), backing_file_offset=draw(u64),
               backing_file_size=draw(u32))
    if version == 3:
        h.incompatible_features = draw(u64)
        h.compatible_features = draw(u64)
        h.autoclear_features = draw(u64)
        h.refcount_order = draw(st.integers(0, 6))
        h.header_length = draw(st.integers(104, min(1 << cbits, 600)))
        if h.header_length > 104:
            h.compression_type = draw(st.integers(0, 255))
            h.tail_bytes = draw(st.binary(min_size=h.header_length - 105,
                                          max_size=h.header_length - 105))
    else:
        h.header_length = 72
    return h


@given(headers())
def test_header_roundtrip(h: Header) -> None:
    raw = h.encode()
    assert len(raw) == h.header_length
    assert Header.parse(raw) == h
    assert Header.parse(raw).encode() == raw


names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12)


@given(st.sampled_from([12, 16, 21]), st.one_of(st.none(), st.text("abcdefgh", min_size=1,
                                                                  max_size=15)),
       st.one_of(st.none(), st.text("abc/.", min_size=1, max_size=40)),
       st.lists(st.tuples(st.integers(1, 2**32 - 1).filter(lambda m: m not in (
           C.QCOW2_EXT_MAGIC_BACKING_FORMAT, C.QCOW2_EXT_MAGIC_FEATURE_TABLE,
           C.QCOW2_EXT_MAGIC_BITMAPS, C.QCOW2_EXT_MAGIC_CRYPTO_HEADER,
           C.QCOW2_EXT_MAGIC_DATA_FILE)), st.binary(max_size=20)), max_size=3),
       st.one_of(st.none(), st.text("xyz", min_size=1, max_size=30)))
def test_header_cluster_roundtrip(cbits: int, fmt: str | None, data_file: str | None,
                                  unknown: list[tuple[int, bytes]], backing: str | None) -> None:
    h = Header(version=3, cluster_bits=cbits, size=1 << 30)
    exts = HeaderExtensions(backing_format=fmt, data_file=data_file,
                            unknown=[Extension(m, d) for m, d in unknown])
    cluster = encode_header_cluster(h, exts, backing)
    assert len(cluster) == 1 << cbits
    h2 = Header.parse(cluster)
    e2 = parse_extensions(cluster, h2)
    assert e2.backing_format == fmt
    assert e2.data_file == data_file
    # QEMU re-emits unknown extensions in reverse order on every rewrite.
    assert [(x.magic, x.data) for x in e2.unknown] == list(reversed(unknown))
    if cbits > 12:
        assert e2.feature_table is not None and len(e2.feature_table) == 8
    else:
        assert e2.feature_table is None
    if backing:
        off = h2.backing_file_offset
        assert cluster[off:off + h2.backing_file_size].decode() == backing


@given(st.integers(9, 21), st.integers(0, 2**40), st.integers(1, 1 << 20))
def test_compressed_descriptor_roundtrip(cbits: int, coffset: int, clen: int) -> None:
    layout = CompressedLayout(cbits)
    clen = min(clen, (1 << cbits))
    if coffset > layout.offset_mask:
        return
    entry = layout.encode(coffset, clen)
    off, size = layout.decode(entry)
    assert off == coffset
    assert entry & C.QCOW_OFLAG_COMPRESSED and not entry & C.QCOW_OFLAG_COPIED
    # The sector-rounded read covers the compressed bytes and ends on a sector boundary.
    assert size >= clen and (off + size) % 512 == 0 and size - clen < 512


@given(st.integers(0, 6), st.binary(min_size=512, max_size=512), st.data())
def test_refblock_roundtrip(order: int, raw: bytes, data: st.DataObject) -> None:
    bits = 1 << order
    n = 512 * 8 // bits
    values = decode_refblock(raw, order)
    assert len(values) == n and all(0 <= v < 2**bits for v in values)
    assert encode_refblock(values, order) == raw
    i = data.draw(st.integers(0, n - 1))
    assert get_refcount(raw, i, order) == values[i]
    buf = bytearray(raw)
    v = data.draw(st.integers(0, 2**bits - 1))
    set_refcount(buf, i, order, v)
    values[i] = v
    assert decode_refblock(bytes(buf), order) == values


def test_subbyte_refcounts_are_lsb_first() -> None:
    assert encode_refblock([1, 0, 0, 0, 0, 0, 0, 1], 0) == b"\x81"
    assert encode_refblock([3, 0, 1, 2], 1) == bytes([0b10010011])
    assert encode_refblock([0xA, 0x5], 2) == b"\x5a"


@given(st.lists(st.tuples(u64.map(lambda x: x & ~0xFFFF), u32, names, names, u32, u32, u64,
                          u64, st.binary(max_size=16), st.integers(-1, 2**40)),
                max_size=5), st.integers(0, 2**20).map(lambda x: x * 512))
def test_snapshot_table_roundtrip(rows: list[tuple[int, int, str, str, int, int, int, int,
                                                   bytes, int]], table_offset: int) -> None:
    entries = [SnapshotEntry(l1_table_offset=a, l1_size=b, id_str=c, name=d, date_sec=e,
                             date_nsec=f, vm_clock_nsec=g, vm_state_size=0,
                             extra_data_size=24 + len(extra), vm_state_size_large=vm,
                             disk_size=vm, icount=icount, unknown_extra_data=extra)
               for a, b, c, d, e, f, g, vm, extra, icount in rows]
    raw = encode_snapshot_table(entries, table_offset)
    back = parse_snapshot_table(raw, len(entries), table_offset)
    assert back == [
        SnapshotEntry(l1_table_offset=e.l1_table_offset, l1_size=e.l1_size, id_str=e.id_str,
                      name=e.name, date_sec=e.date_sec, date_nsec=e.date_nsec,
                      vm_clock_nsec=e.vm_clock_nsec,
                      vm_state_size=e.vm_state_size_large if (e.vm_state_size_large or 0)
                      <= 0xFFFFFFFF else 0,
                      extra_data_size=e.extra_data_size, vm_state_size_large=e.vm_state_size_large,
                      disk_size=e.disk_size, icount=e.icount,
                      unknown_extra_data=e.unknown_extra_data) for e in entries]
    assert encode_snapshot_table(back, table_offset) == raw


@given(st.lists(st.tuples(u64.map(lambda x: x & ~0x1FF), st.integers(1, 2**27), u32,
                          st.integers(9, 31), st.text("abc", min_size=1, max_size=30),
                          st.binary(max_size=9)), min_size=1, max_size=4))
def test_bitmap_directory_roundtrip(rows: list[tuple[int, int, int, int, str, bytes]]) -> None:
    entries = [BitmapDirEntry(off, size, flags, 1, g, name, extra)
               for off, size, flags, g, name, extra in rows]
    raw = b"".join(e.encode() for e in entries)
    assert parse_bitmap_directory(raw, len(entries)) == entries
