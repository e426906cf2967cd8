"""Shared test fixtures: the qemu-img/qemu-io oracle and small helpers to run it.

In CI (CI=true) a missing oracle is an error, never a skip: differential tests are the
ground truth of this project.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

ORACLE_TOOLS = ("qemu-img", "qemu-io")


def _missing_oracle() -> list[str]:
    return [t for t in ORACLE_TOOLS if shutil.which(t) is None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing_oracle()
    if not missing:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(
            f"oracle missing in CI: {', '.join(missing)} (install Debian qemu-utils)")
    skip = pytest.mark.skip(reason=f"oracle missing: {', '.join(missing)}")
    for item in items:
        if "oracle" in item.keywords:
            item.add_marker(skip)


def run(cmd: Sequence[str | os.PathLike[str]], check: bool = True,
        cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; raise with its stderr when `check` and it fails."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> {p.returncode}\n{p.stderr}{p.stdout}")
    return p


def qemu_img(*args: str | os.PathLike[str], check: bool = True,
             cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(["qemu-img", *args], check=check, cwd=cwd)


def qemu_io(path: str | os.PathLike[str], *cmds: str, fmt: str | None = None,
            extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    argv: list[str | os.PathLike[str]] = ["qemu-io"]
    if fmt:
        argv += ["-f", fmt]
    argv += list(extra)
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    p = run(argv)
    # qemu-io reports I/O errors on stdout with exit status 0
    assert "error" not in p.stdout.lower() or "0 errors" in p.stdout.lower(), p.stdout
    return p


def qemu_json(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> Any:
    return json.loads(qemu_img(*args, cwd=cwd).stdout)


def data_map(path: Path) -> list[tuple[int, int]]:
    """The (start, length) data extents of a file, as SEEK_DATA/SEEK_HOLE report them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
        return out
    finally:
        os.close(fd)


def qemu_raw(path: str | os.PathLike[str], tmp: Path, *extra: str) -> bytes:
    """The guest content as qemu-img reads it (`qemu-img convert -O raw`)."""
    out = tmp / f"oracle-{abs(hash((str(path), *extra)))}.raw"
    qemu_img("convert", *extra, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture
def oracle() -> None:
    """Request this (or mark `oracle`) in tests that call qemu-img/qemu-io."""
    missing = _missing_oracle()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"oracle missing in CI: {', '.join(missing)}")
        pytest.skip(f"oracle missing: {', '.join(missing)}")
