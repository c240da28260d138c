"""bincode, byte for byte as Rust's ``bincode`` 1.x crate writes it. For example::

    from dataclasses import dataclass
    from hintens import bincode

    @dataclass
    class Point:          # struct Point { x: i32, y: i32 }
        x: bincode.i32
        y: bincode.i32

    data = bincode.encode(Point(1, -2), Point)          # bincode::serialize(&p)
    bincode.decode(data, Point)                          # Point(x=1, y=-2)
    bincode.encode([1, 2], list[bincode.u16], varint=True)   # DefaultOptions::new()

Types (usable as annotations of dataclass fields):

* ``u8 u16 u32 u64 i8 i16 i32 i64 f32 f64``; ``bool``; ``str`` (String); ``bytes`` (Vec<u8>;
  any bytes-like value encodes); ``type(None)`` (the unit ``()``, value None);
* ``list[T]`` (Vec<T>), ``tuple[A, B, ...]`` (a tuple or a fixed array ``[T; N]``: no length),
  ``dict[K, V]`` (a map: length, then the pairs in the dict's order), ``Optional[T]``;
* ``ndarray(T)``: a Vec of numbers that decodes to a numpy array viewing the input;
* a dataclass (a struct: its fields in order, nothing else; one field is a newtype struct,
  none a unit struct);
* an ``enum.Enum`` (a Rust enum of unit variants: the member's position is the variant index);
* ``Union[A, B, ...]`` of dataclasses (a Rust enum with data: the position in the Union is the
  variant index, then the dataclass's fields).

Modes. ``varint=False`` is bincode 1.x's default (``bincode::serialize``): little-endian
fixed-width integers, u64 lengths, u32 variant indices. ``varint=True`` is ``DefaultOptions``:
integers, lengths and variant indices as varints (below 251: one byte; 251 + u16; 252 + u32;
253 + u64), signed integers zigzagged first; u8, i8, bool and floats stay raw. In both modes an
Option is a 0/1 byte, then the value.

Every type is compiled once into an encoder and a decoder, and cached. Runs of fixed-width
fields become one ``struct`` call; a list of numbers, one call too (a numpy array or any buffer
of the right item type is copied in with a single memcpy).

Errors: ``EncodeError`` (a value that does not fit its type: wrong Python type, integer out of
range) and ``DecodeError`` (truncated input, trailing bytes, invalid UTF-8, a bool or Option
byte other than 0 or 1, an unknown variant index, an integer out of range), both subclasses of
``bincode.Error``, a ``ValueError``. A length prefix larger than the input that remains is an
error before anything is allocated.
"""

from __future__ import annotations

import struct
import typing
from typing import Any, TypeVar, overload

from . import _struct
from ._containers import ZERO_SIZE_BUDGET, _numpy, _zero_budget
from ._plans import _name, _plan
from ._types import (
    DecodeError,
    EncodeError,
    Error,
    f32,
    f64,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
    _Array,
    _number_spec,
)

__all__ = [
    "DecodeError", "EncodeError", "Error", "decode", "encode", "encode_into", "ndarray",
    "f32", "f64", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64",
]


def ndarray(item: Any) -> Any:
    """A Vec of numbers (``Vec<f64>``, say) that decodes to a numpy array instead of a list:
    the same bytes on the wire, no Python object per element. The array views the input
    (read-only when the input is), so it lives as long as the input does. Encoding takes a
    numpy array (one copy) or a list.

    Raises:
        TypeError: ``item`` is not one of the number types.
        ImportError: numpy is not installed.
    """
    spec = _number_spec(item)
    if spec is None:
        raise TypeError(f"ndarray wants a number type (bincode.f64, ...), not {item!r}")
    _numpy()
    return typing.Annotated[Any, _Array(item)]


def encode(value: Any, T: Any, *, varint: bool = False) -> bytes:
    """The bincode encoding of ``value`` as type ``T``.

    Raises:
        EncodeError: ``value`` does not fit ``T``.
        TypeError: ``T`` is not a type bincode can describe.
    """
    try:
        direct = _struct._direct.get((T, varint))
    except TypeError:   # unhashable: said by _plan below
        direct = None
    plan = _plan(T, varint) if direct is None else None   # TypeError: T is what is wrong
    try:
        if direct is not None:
            return direct.encode(value, varint)   # type: ignore[no-any-return]
        assert plan is not None
        if plan.to_bytes is not None:
            data = plan.to_bytes(value)
            if data is not None:
                return data
        out = bytearray()
        plan.encode(value, out)
        return bytes(out)
    except Error:
        raise
    except _ODD_VALUES as error:
        raise EncodeError(f"{_name(T)}: {type(error).__name__}: {error}") from error
    except RecursionError:
        raise EncodeError(f"{_name(T)}: nested too deeply") from None


#: What a value that does not fit may raise from deep inside (a lone surrogate in a str, a
#: 0-d or big-endian array, a non-contiguous buffer, ...): reported as EncodeError.
_ODD_VALUES = (TypeError, ValueError, BufferError, NotImplementedError, OverflowError)


def encode_into(value: Any, T: Any, out: bytearray, *, varint: bool = False) -> None:
    """Append the encoding of ``value`` to ``out``."""
    _plan(T, varint).encode(value, out)


_T = TypeVar("_T")


@overload
def decode(data: Any, T: type[_T], *, varint: bool = False) -> _T: ...


@overload
def decode(data: Any, T: Any, *, varint: bool = False) -> Any: ...


def decode(data: Any, T: Any, *, varint: bool = False) -> Any:
    """The value of type ``T`` that ``data`` (any bytes-like object) encodes, exactly. Typed:
    ``decode(data, Point)`` is a ``Point`` (``list[int]``, a ``list[int]``); a bincode spec
    such as ``bincode.u32`` or ``Annotated[...]`` gives ``Any``.

    Raises:
        DecodeError: ``data`` is not exactly one encoding of ``T``.
        TypeError: ``T`` is not a type bincode can describe.
    """
    try:
        direct = _struct._direct.get((T, varint))
    except TypeError:
        direct = None
    if direct is not None:
        return direct.decode(data, varint)
    plan = _plan(T, varint)
    try:
        buf = data if type(data) is bytes else memoryview(data).cast("B")
    except TypeError:
        raise DecodeError(f"decode wants a bytes-like object, not {type(data).__name__}") \
            from None
    _zero_budget.left = ZERO_SIZE_BUDGET + len(buf)
    try:
        value, end = plan.decode(buf, 0)
    except struct.error as error:   # a fixed-width read past the end
        raise DecodeError(f"truncated input: {error}") from None
    except RecursionError:
        raise DecodeError(f"{_name(T)}: nested too deeply") from None
    if end != len(buf):
        raise DecodeError(f"{len(buf) - end} trailing bytes after the {_name(T)}")
    return value
