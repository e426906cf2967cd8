"""Record classes for the modules every command imports (header, extensions, snapshots,
bitmaps, extents): what `@dataclass(slots=True)` gives them — `__init__`, `__repr__`, `__eq__`,
`__slots__`, frozen records — without importing `dataclasses`, which pulls in `inspect`,
`ast` and `dis` and costs about 15 ms of every command's start-up (a third of `qcow2 info`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T")


class FrozenRecordError(AttributeError):
    """Assignment to a field of a frozen record."""


class _Factory:
    __slots__ = ("factory",)

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory


def field(*, default_factory: Callable[[], Any]) -> Any:
    """A field whose default is made per instance (a fresh list or dict)."""
    return _Factory(default_factory)


_NO_DEFAULT = object()


@dataclass_transform(field_specifiers=(field,))
def record(cls: type[T] | None = None, *, frozen: bool = False) -> Any:
    """Class decorator: fields are the class's annotations, in order, as with dataclasses."""

    def wrap(c: type[T]) -> type[T]:
        return _build(c, frozen)

    return wrap if cls is None else wrap(cls)


def _build(cls: type[T], frozen: bool) -> type[T]:
    # Not inspect.get_annotations: importing inspect is the cost this module avoids.
    names = [n for n, a in cls.__dict__.get("__annotations__", {}).items()  # noqa: RUF063
             if not str(a).startswith(("ClassVar", "typing.ClassVar"))]
    ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    defaults: dict[str, Any] = {}
    for n in names:
        if n in ns:
            defaults[n] = ns.pop(n)
    ns["__slots__"] = tuple(names)
    ns["__match_args__"] = tuple(names)
    glb: dict[str, Any] = {"_NO_DEFAULT": _NO_DEFAULT, "_setattr": object.__setattr__}
    params, body = [], []
    for n in names:
        d = defaults.get(n, _NO_DEFAULT)
        if isinstance(d, _Factory):
            glb[f"_f_{n}"] = d.factory
            params.append(f"{n}=_NO_DEFAULT")
            value = f"_f_{n}() if {n} is _NO_DEFAULT else {n}"
        elif d is not _NO_DEFAULT:
            glb[f"_d_{n}"] = d
            params.append(f"{n}=_d_{n}")
            value = n
        else:
            if any(p.endswith("_NO_DEFAULT") or "=_d_" in p for p in params):
                raise TypeError(f"non-default field {n!r} follows a default one")
            params.append(n)
            value = n
        body.append(f"    _setattr(self, {n!r}, {value})" if frozen else
                    f"    self.{n} = {value}")
    src = f"def __init__(self, {', '.join(params)}) -> None:\n" + \
        ("\n".join(body) or "    pass") + "\n"
    exec(src, glb)
    ns["__init__"] = glb["__init__"]
    ns["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in names)

    ns.setdefault("__repr__", __repr__)
    ns.setdefault("__eq__", __eq__)
    if frozen:
        def __setattr__(self: Any, name: str, value: Any) -> None:
            raise FrozenRecordError(f"cannot assign to field {name!r}")

        def __delattr__(self: Any, name: str) -> None:
            raise FrozenRecordError(f"cannot delete field {name!r}")

        def __hash__(self: Any) -> int:
            return hash(tuple(getattr(self, n) for n in names))

        ns["__setattr__"] = __setattr__
        ns["__delattr__"] = __delattr__
        ns["__hash__"] = __hash__
    else:
        ns["__hash__"] = None
    meta: Any = type(cls)
    new: type[T] = meta(cls.__name__, cls.__bases__, ns)
    new.__qualname__ = cls.__qualname__
    return new
