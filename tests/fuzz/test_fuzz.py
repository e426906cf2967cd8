"""A short bounded fuzz campaign over mutated images (the harness says what fails a case).

Mutations are biased to where a parser looks: the header and extensions, and the first
entries of every table the image points at (L1, L2, refcount table and blocks, snapshots).
QCOW2_FUZZ_EXAMPLES sets the number of cases (default 150 in the suite).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import bounded, make_seeds, run_case

EXAMPLES = int(os.environ.get("QCOW2_FUZZ_EXAMPLES", "150"))
_SEEDS: dict[str, bytes] = {}

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 62, 1 << 63,
               (1 << 64) - 1, 512, 65536, 1 << 21, 1 << 30, (1 << 56) - 512]


def seeds(tmp_root: Path) -> dict[str, bytes]:
    if not _SEEDS:
        _SEEDS.update(make_seeds(tmp_root))
    return _SEEDS


def _hot_offsets(data: bytes) -> list[int]:
    """Header fields, and the starts of the tables the header points to."""
    hot = list(range(0, min(len(data), 512), 4))
    if data[:4] == b"QFI\xfb" and len(data) >= 72:
        for field in (8, 40, 48, 64):   # backing name, l1, refcount table, snapshots
            (off,) = struct.unpack_from(">Q", data, field)
            if 0 < off < len(data):
                hot += list(range(off, min(len(data), off + 64), 8))
        (l1,) = struct.unpack_from(">Q", data, 40)
        if 0 < l1 < len(data) - 8:
            (l2,) = struct.unpack_from(">Q", data, l1)
            l2 &= 0x00FFFFFFFFFFFE00
            if 0 < l2 < len(data):
                hot += list(range(l2, min(len(data), l2 + 256), 8))
    return hot


class Case(bytes):
    """Image bytes with a short repr (hypothesis prints failing examples)."""

    seed = ""

    def __repr__(self) -> str:
        import hashlib

        return f"<{self.seed} mutant, {len(self)} bytes, sha1 {hashlib.sha1(self).hexdigest()}>"


@st.composite
def mutated(draw: st.DrawFn, names: list[str]) -> tuple[str, bytes]:
    name = draw(st.sampled_from(names))
    data = bytearray(_SEEDS[name])
    hot = _hot_offsets(bytes(data))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["u64", "u32", "byte", "bit", "truncate", "extend"]))
        pos = draw(st.sampled_from(hot) | st.integers(0, max(0, len(data) - 1)))
        if kind == "u64" and pos + 8 <= len(data):
            v = draw(st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1))
            struct.pack_into(">Q", data, pos, v)
        elif kind == "u32" and pos + 4 <= len(data):
            v = draw(st.sampled_from(INTERESTING).map(lambda x: x & 0xFFFFFFFF)
                     | st.integers(0, (1 << 32) - 1))
            struct.pack_into(">I", data, pos, v)
        elif kind == "byte" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif kind == "bit" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "extend":
            data += bytes(draw(st.integers(1, 70000)))
    case = Case(data)
    case.seed = name
    return name, case


@pytest.fixture(scope="module")
def seed_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return sorted(seeds(tmp_path_factory.mktemp("fuzz-seeds")))


def test_seeds_pass_the_harness(seed_names: list[str], tmp_path: Path) -> None:
    for name in seed_names:
        with bounded():
            run_case(_SEEDS[name], tmp_path)


def test_fuzz_mutated_images(seed_names: list[str], tmp_path_factory: pytest.TempPathFactory
                             ) -> None:
    work = tmp_path_factory.mktemp("fuzz-work")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated(seed_names))
    def case(arg: tuple[str, bytes]) -> None:
        _, data = arg
        try:
            with bounded():
                run_case(data, work)
        except BaseException as e:
            # keep the smallest failing image per kind of failure: regression tests are made
            # from them
            tb = e.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{Path(tb.tb_frame.f_code.co_filename).stem}-{tb.tb_lineno}" if tb else ""
            out = (Path(os.environ.get("QCOW2_FUZZ_CRASHES", work))
                   / f"{type(e).__name__}-{where}.img")
            if not out.exists() or out.stat().st_size > len(data):
                out.write_bytes(data)
            raise

    case()
