"""qcow2._record: the dataclass stand-in used by the records every command imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qcow2._record import FrozenRecordError, field, record


@record
class Rec:
    a: int
    b: str = "x"
    c: list[int] = field(default_factory=list)


@record(frozen=True)
class Frozen:
    start: int
    length: int = 0


def test_init_defaults_and_factories() -> None:
    r = Rec(1)
    assert (r.a, r.b, r.c) == (1, "x", [])
    assert Rec(1).c is not Rec(1).c
    assert Rec(2, "y", [3]) == Rec(a=2, b="y", c=[3])
    assert Rec(1) != Rec(2)
    assert repr(Rec(1, "q")) == "Rec(a=1, b='q', c=[])"
    with pytest.raises(TypeError):
        Rec()  # type: ignore[call-arg]


def test_slots_and_mutability() -> None:
    r = Rec(1)
    r.a = 5
    assert r.a == 5
    assert not hasattr(r, "__dict__")
    with pytest.raises(AttributeError):
        r.zzz = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        hash(r)


def test_frozen() -> None:
    f = Frozen(1, 2)
    with pytest.raises(FrozenRecordError):
        f.start = 3  # type: ignore[misc]
    assert hash(f) == hash(Frozen(1, 2))
    assert {f, Frozen(1, 2)} == {f}
    match f:
        case Frozen(s, n):
            assert (s, n) == (1, 2)


def test_non_default_after_default_refused() -> None:
    with pytest.raises(TypeError):
        @record
        class Bad:
            a: int = 1
            b: int


def test_cli_start_up_imports_stay_light() -> None:
    # The modules `qcow2 info`/`map` load must not pull in the heavy standard modules.
    code = ("import sys, qcow2.cli.main, qcow2.ops.info, qcow2.ops.map\n"
            "print(sorted(m for m in ('dataclasses', 'inspect', 'ctypes', 'numpy', "
            "'subprocess') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
