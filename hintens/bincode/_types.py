"""The types bincode describes that Python lacks, and the errors: the number types (``u8`` ...
``f64``, each an ``Annotated`` int or float carrying a ``_Number``), what ``ndarray(T)``
stands for (an ``_Array``), and ``Error`` with its two kinds. Nothing here encodes or
decodes; the plan compilers read these specs."""

from __future__ import annotations

import typing
from typing import Any


# Defined here, but raised as hintens.bincode's: tracebacks and pickles name the public module.
class Error(ValueError):
    """A value or a byte string that does not match its bincode type."""

    __module__ = "hintens.bincode"


class DecodeError(Error):
    """The bytes are not a bincode encoding of the type."""

    __module__ = "hintens.bincode"


class EncodeError(Error, TypeError):
    """The value does not fit the type (a wrong Python type, or an integer out of range)."""

    __module__ = "hintens.bincode"


class _Number:
    """What an ``Annotated`` number type stands for."""

    __slots__ = ("name", "code", "size", "signed", "integer", "low", "high")

    def __init__(self, name: str, code: str, size: int, signed: bool, integer: bool) -> None:
        self.name, self.code, self.size = name, code, size
        self.signed, self.integer = signed, integer
        bits = 8 * size
        self.low = -(1 << (bits - 1)) if signed else 0
        self.high = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1

    def __repr__(self) -> str:
        return f"bincode.{self.name}"


def _number(name: str, code: str, size: int, signed: bool, integer: bool = True) -> Any:
    base = int if integer else float
    return typing.Annotated[base, _Number(name, code, size, signed, integer)]


u8 = _number("u8", "B", 1, False)
u16 = _number("u16", "H", 2, False)
u32 = _number("u32", "I", 4, False)
u64 = _number("u64", "Q", 8, False)
i8 = _number("i8", "b", 1, True)
i16 = _number("i16", "h", 2, True)
i32 = _number("i32", "i", 4, True)
i64 = _number("i64", "q", 8, True)
f32 = _number("f32", "f", 4, True, integer=False)
f64 = _number("f64", "d", 8, True, integer=False)


class _Array:
    """What ``ndarray(T)`` stands for: a Vec of numbers, decoded as a numpy array."""

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item

    def __repr__(self) -> str:
        return f"bincode.ndarray({self.item!r})"


def _number_spec(T: Any) -> _Number | None:
    if typing.get_origin(T) is typing.Annotated:
        spec = typing.get_args(T)[1]
        if isinstance(spec, _Number):
            return spec
    return None
