"""`img.extents()` is exactly `qemu-img map --output=json`, for whole images and windows."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.conftest import qemu_img
from tests.differential.conftest import (
    CASE_NAMES,
    SNAPSHOT_CASES,
    MatrixImage,
    drop_page_cache,
)
from tests.differential.test_read_matrix import open_case

pytestmark = pytest.mark.oracle

MAP_CASES = [n for n in CASE_NAMES if n not in SNAPSHOT_CASES]


def _ours(case: MatrixImage, start: int | None, length: int | None) -> list[dict[str, Any]]:
    drop_page_cache(case)
    with open_case(case) as img:
        return [e.to_map_json() for e in img.extents(start or 0, length)]


def _qemu(case: MatrixImage, start: int | None, length: int | None) -> list[dict[str, Any]]:
    drop_page_cache(case)
    window = [] if start is None else [f"--start-offset={start}", f"--max-length={length}"]
    out: list[dict[str, Any]] = json.loads(
        qemu_img("map", "--output=json", *window, case.path, cwd=case.path.parent).stdout)
    if len(out) == 1 and out[0]["length"] == 0:
        return []   # qemu-img map prints one dummy zero-length entry for an empty window
    return out


def assert_map_matches(case: MatrixImage, expected: list[dict[str, Any]],
                       start: int | None = None, length: int | None = None) -> None:
    got = _ours(case, start, length)
    if got == expected:
        return
    # With metadata preallocation both sides ask the file system where the holes are, and
    # on ext4 the answer for fallocated ranges changes while earlier reads (readahead) are
    # still filling the page cache. Ask both again, back to back, once that settled.
    time.sleep(0.2)
    again = _qemu(case, start, length)
    assert _ours(case, start, length) == again, (start, length)


@pytest.mark.parametrize("name", MAP_CASES)
def test_map_equals_qemu(matrix: dict[str, MatrixImage], name: str, l2_classifier: str) -> None:
    case = matrix[name]
    assert case.map_json is not None
    assert_map_matches(case, case.map_json)


@pytest.mark.parametrize("name", MAP_CASES)
def test_map_windows_equal_qemu(matrix: dict[str, MatrixImage], name: str, l2_classifier: str) -> None:
    case = matrix[name]
    for start, length, qemu in case.windows:
        expected = [] if len(qemu) == 1 and qemu[0]["length"] == 0 else qemu
        assert_map_matches(case, expected, start, length)
