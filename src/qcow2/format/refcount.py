"""Refcount block entries of every width (refcount_order 0..6) and refcount table entries."""

from __future__ import annotations

from array import array
from sys import byteorder

from . import constants as C


def refcounts_per_block(cluster_bits: int, refcount_order: int) -> int:
    return 1 << (cluster_bits + 3 - refcount_order)


def decode_refblock(data: bytes, refcount_order: int) -> list[int]:
    """All refcounts of one refblock as ints. Sub-byte widths are packed LSB-first in a byte."""
    bits = 1 << refcount_order
    if bits == 8:
        return list(data)
    if bits < 8:
        per = 8 // bits
        mask = (1 << bits) - 1
        return [(b >> (i * bits)) & mask for b in data for i in range(per)]
    code = {16: "H", 32: "I", 64: "Q"}[bits]
    arr = array(code)
    arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
    if byteorder == "little":
        arr.byteswap()
    return arr.tolist()


def encode_refblock(values: list[int], refcount_order: int) -> bytes:
    bits = 1 << refcount_order
    if bits == 8:
        return bytes(values)
    if bits < 8:
        per = 8 // bits
        out = bytearray((len(values) + per - 1) // per)
        for i, v in enumerate(values):
            out[i // per] |= (v & ((1 << bits) - 1)) << ((i % per) * bits)
        return bytes(out)
    code = {16: "H", 32: "I", 64: "Q"}[bits]
    arr = array(code, values)
    if byteorder == "little":
        arr.byteswap()
    return arr.tobytes()


def get_refcount(data: bytes | bytearray | memoryview, index: int, refcount_order: int) -> int:
    bits = 1 << refcount_order
    if bits < 8:
        per = 8 // bits
        return (data[index // per] >> ((index % per) * bits)) & ((1 << bits) - 1)
    nbytes = bits // 8
    return int.from_bytes(data[index * nbytes:(index + 1) * nbytes], "big")


def set_refcount(data: bytearray, index: int, refcount_order: int, value: int) -> None:
    bits = 1 << refcount_order
    if value < 0 or value >> bits:
        raise ValueError("refcount out of range for this width")
    if bits < 8:
        per = 8 // bits
        shift = (index % per) * bits
        mask = ((1 << bits) - 1) << shift
        data[index // per] = (data[index // per] & ~mask) | (value << shift)
        return
    nbytes = bits // 8
    data[index * nbytes:(index + 1) * nbytes] = value.to_bytes(nbytes, "big")


def reftable_entry_offset(entry: int) -> int:
    return entry & C.REFT_OFFSET_MASK


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool) -> tuple[int, int]:
    """(bytes of refcount table + blocks, number of refblocks) to refcount `clusters` clusters.

    The fixed point where the refcount structures also cover themselves, as QEMU's
    qcow2_refcount_metadata_size(); `generous_increase` adds half the table once more.
    """
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    n = last = -1
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
        if n == last:
            break
    return (blocks + table) * cluster_size, blocks
