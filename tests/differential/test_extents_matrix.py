"""`img.extents()` is exactly `qemu-img map --output=json`, for whole images and windows."""

from __future__ import annotations

from typing import Any

import pytest

from tests.differential.conftest import (
    CASE_NAMES,
    SNAPSHOT_CASES,
    MatrixImage,
    drop_page_cache,
)
from tests.differential.test_read_matrix import open_case

pytestmark = pytest.mark.oracle

MAP_CASES = [n for n in CASE_NAMES if n not in SNAPSHOT_CASES]


@pytest.mark.parametrize("name", MAP_CASES)
def test_map_equals_qemu(matrix: dict[str, MatrixImage], name: str) -> None:
    case = matrix[name]
    drop_page_cache(case)
    with open_case(case) as img:
        assert [e.to_map_json() for e in img.extents()] == case.map_json


def _expected_window(qemu: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # qemu-img map prints one dummy zero-length entry when the window is empty.
    if len(qemu) == 1 and qemu[0]["length"] == 0:
        return []
    return qemu


@pytest.mark.parametrize("name", MAP_CASES)
def test_map_windows_equal_qemu(matrix: dict[str, MatrixImage], name: str) -> None:
    case = matrix[name]
    drop_page_cache(case)
    with open_case(case) as img:
        for start, length, qemu in case.windows:
            got = [e.to_map_json() for e in img.extents(start, length)]
            assert got == _expected_window(qemu), (start, length)
