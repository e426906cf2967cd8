"""The numpy L2 classifier yields exactly the runs of the Python loop, or defers to it.

Random standard L2 tables (every entry kind, contiguous stretches, odd entries inside them,
data-file and v2 images) are classified both ways over random windows; after merging, the
runs must be identical, and whenever the Python loop raises the numpy path must decline
(return None) so the loop's error stays the one the user sees.
"""

from __future__ import annotations

import types
from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcow2.engine import image as image_mod
from qcow2.engine.image import Qcow2Image
from qcow2.errors import CorruptImageError
from qcow2.format import constants as C

Run = tuple[int, int, int, int | None]
COMPRESSED = image_mod._COMPRESSED


def _merged(runs: Iterable[Run]) -> list[Run]:
    out: list[Run] = []
    for s, n, k, h in runs:
        if out:
            ps, pn, pk, ph = out[-1]
            if pk == k and k != COMPRESSED and (h is None if ph is None else h == ph + pn):
                out[-1] = (ps, pn + n, pk, ph)
                continue
        out.append((s, n, k, h))
    return out


def _fake(cbits: int) -> Any:
    cs = 1 << cbits

    def bad_entry(msg: str, l2_off: int, idx: int) -> CorruptImageError:
        return CorruptImageError(f"{msg} ({idx})")

    return types.SimpleNamespace(cluster_bits=cbits, cluster_size=cs, l2_entries=cs // 8,
                                 _bad_entry=bad_entry)


@st.composite
def tables(draw: st.DrawFn) -> tuple[int, array[int], int, bool, bool]:
    cbits = draw(st.sampled_from([9, 12, 16]))
    cs = 1 << cbits
    n_entries = cs // 8
    l1_index = draw(st.integers(0, 1000))
    has_df = draw(st.booleans())
    v2 = draw(st.booleans())
    tab = array("Q", [0]) * n_entries
    host = draw(st.integers(1, 1 << 20)) * cs
    if has_df:
        host = l1_index * n_entries * cs
    i = 0
    while i < n_entries:
        n = draw(st.sampled_from([1, 2, 7, 64, 300, n_entries]))
        kind = draw(st.sampled_from("nnnnzZucXr"))
        for j in range(i, min(n_entries, i + n)):
            guest = (l1_index * n_entries + j) * cs
            if kind == "n":
                base = guest if has_df else host
                tab[j] = base | (C.QCOW_OFLAG_COPIED if draw(st.booleans()) or n > 8 else 0)
                host += cs
            elif kind == "z":
                tab[j] = C.QCOW_OFLAG_ZERO
            elif kind == "Z":
                tab[j] = (guest if has_df else host) | C.QCOW_OFLAG_ZERO
                host += cs
            elif kind == "c":
                tab[j] = C.QCOW_OFLAG_COMPRESSED | (j * 977 + 12345)
            elif kind == "X":   # host gap: breaks contiguity
                host += cs
                tab[j] = host | C.QCOW_OFLAG_COPIED
                host += cs
            elif kind == "r":   # unaligned offset: the engine rejects it
                tab[j] = host | 0x200 if cbits > 9 else host
                host += cs
            else:
                tab[j] = 0
        i += n
    return cbits, tab, l1_index, has_df, v2


@settings(max_examples=300, deadline=None)
@given(tables(), st.data())
def test_numpy_runs_equal_python_runs(case: tuple[int, array[int], int, bool, bool],
                                      data: st.DataObject) -> None:
    cbits, tab, l1_index, has_df, v2 = case
    fake = _fake(cbits)
    cs = 1 << cbits
    span = len(tab) * cs
    base = l1_index * span
    a = base + data.draw(st.integers(0, span - 1))
    e = min(base + span, a + data.draw(st.sampled_from([1, 511, cs, 37 * cs + 5, span])))
    try:
        ref: list[Run] | None = _merged(Qcow2Image._std_runs_py(fake, tab, 0, a, e, has_df, v2))
    except CorruptImageError:
        ref = None
    got = image_mod._std_runs_np(np, fake, tab, a, e, has_df, v2)
    if ref is None:
        assert got is None
    elif got is not None:
        assert _merged(got) == ref


def test_contiguous_table_is_one_run() -> None:
    cbits = 16
    cs = 1 << cbits
    tab = array("Q", [((1 << 30) + i * cs) | C.QCOW_OFLAG_COPIED for i in range(cs // 8)])
    runs = image_mod._std_runs_np(np, _fake(cbits), tab, 100, len(tab) * cs, False, False)
    assert runs is not None
    assert list(runs) == [(100, len(tab) * cs - 100, image_mod._NORMAL, (1 << 30) + 100)]


def test_small_images_never_import_numpy(tmp_path: Any) -> None:
    # `qcow2 info`/`map` on small images must not pay numpy's ~140 ms import.
    import subprocess
    import sys

    import qcow2

    path = tmp_path / "small.qcow2"
    qcow2.create(str(path), 64 << 20)
    with qcow2.open(str(path), readonly=False) as img:
        img.write(0, b"x" * (3 << 20))
    code = ("import sys, qcow2\n"
            f"img = qcow2.open({str(path)!r})\n"
            "assert len(list(img.extents())) == 2\n"
            "img.read(0, 64 << 20)\n"
            "print('numpy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_long_scans_switch_to_numpy(monkeypatch: Any) -> None:
    monkeypatch.setattr(image_mod, "_np_module", None)
    monkeypatch.setattr(image_mod, "_py_classified", 0)
    real_get = __import__("sys").modules.get
    monkeypatch.setattr(image_mod, "_loaded_numpy", lambda: None)
    assert image_mod._numpy_if_worth(1024) is None
    assert image_mod._py_classified == 1024
    assert image_mod._numpy_if_worth(image_mod.NUMPY_IMPORT_AFTER) is np
    assert real_get("numpy") is np
