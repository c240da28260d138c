"""bincode, byte for byte as Rust's ``bincode`` 1.x crate writes it.

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

import array
import dataclasses
import enum
import struct
import sys
import threading
import types
import typing
from typing import Any, Callable, TypeVar, Union, overload

__all__ = [
    "DecodeError", "EncodeError", "Error", "decode", "encode", "encode_into", "ndarray",
    "f32", "f64", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64",
]


class Error(ValueError):
    """A value or a byte string that does not match its bincode type."""


class DecodeError(Error):
    """The bytes are not a bincode encoding of the type."""


class EncodeError(Error, TypeError):
    """The value does not fit the type (a wrong Python type, or an integer out of range)."""


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


def ndarray(item: Any) -> Any:
    """A Vec of numbers (``Vec<f64>``, say) that decodes to a numpy array instead of a list:
    the same bytes on the wire, no Python object per element. The array views the input
    (read-only when the input is), so it lives as long as the input does. Encoding takes a
    numpy array (one copy) or a list.

    Raises:
        TypeError: ``item`` is not one of the number types.
    """
    spec = _number_spec(item)
    if spec is None:
        raise TypeError(f"ndarray wants a number type (bincode.f64, ...), not {item!r}")
    return typing.Annotated[Any, _Array(item)]


def encode(value: Any, T: Any, *, varint: bool = False) -> bytes:
    """The bincode encoding of ``value`` as type ``T``.

    Raises:
        EncodeError: ``value`` does not fit ``T``.
        TypeError: ``T`` is not a type bincode can describe.
    """
    try:
        direct = _direct.get((T, varint))
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
        direct = _direct.get((T, varint))
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


# Plans ---------------------------------------------------------------------------------------

class _Plan:
    """How one type encodes and decodes. ``fixed`` is its struct code when it has a fixed
    width (in fixint mode), so that runs of such fields merge into one struct call; ``least``
    is the fewest bytes an encoding takes (for refusing impossible lengths early)."""

    __slots__ = ("encode", "decode", "fixed", "least", "check", "to_bytes")

    def __init__(self, encode: Callable[[Any, bytearray], None],
                 decode: Callable[[Any, int], tuple[Any, int]], least: int,
                 fixed: str | None = None, check: Callable[[Any], Any] | None = None) -> None:
        self.encode, self.decode, self.least, self.fixed = encode, decode, least, fixed
        self.check = check   # for a fixed member: validates/converts a decoded raw value
        self.to_bytes: Callable[[Any], bytes | None] | None = None   # a one-copy encode()


_cache: dict[tuple[Any, bool], _Plan] = {}
_cache_lock = threading.RLock()


def _plan(T: Any, varint: bool) -> _Plan:
    key = (T, varint)
    try:
        return _cache[key]
    except KeyError:
        pass
    except TypeError:   # an unhashable annotation
        raise TypeError(f"{T!r} is not a type bincode can describe") from None
    global _depth
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        if key in _pending:   # being compiled by this thread (a recursive type)
            return _pending[key]
        _depth += 1
        done = False
        try:
            plan = _compile(T, varint)
            done = True
        finally:
            _depth -= 1
            if _depth == 0:
                # Plans become visible to other threads only once every one they refer to
                # is complete (a recursive type's forward plan is not until then).
                if done:
                    _cache.update(_pending)
                _pending.clear()
        return plan


_pending: dict[tuple[Any, bool], _Plan] = {}
_depth = 0


def _name(T: Any) -> str:
    return getattr(T, "__name__", None) or repr(T)


_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U8 = struct.Struct("<B")


def _compile(T: Any, varint: bool) -> _Plan:
    key = (T, varint)
    if dataclasses.is_dataclass(T) and isinstance(T, type):
        # Recursive types: a forward plan stands in while the fields are compiled.
        forward = _Plan(lambda v, o: plan.encode(v, o), lambda b, p: plan.decode(b, p), 0)
        _pending[key] = forward
        plan = _struct_plan(T, varint)
        forward.least = plan.least
        _pending[key] = plan
        return plan
    plan = _compile_other(T, varint)
    _pending[key] = plan
    return plan


def _compile_other(T: Any, varint: bool) -> _Plan:
    origin = typing.get_origin(T)
    if origin is typing.Annotated:
        spec = typing.get_args(T)[1] if len(typing.get_args(T)) > 1 else None
        if isinstance(spec, _Number):
            return _number_plan(spec, varint)
        if isinstance(spec, _Array):
            return _ndarray_plan(spec.item, varint)
        raise TypeError(f"{T!r}: only bincode's own Annotated number types are understood")
    if T is bool:
        return _bool_plan()
    if T is str:
        return _str_plan(varint)
    if T is bytes:
        return _bytes_plan(varint)
    if T is type(None) or T is None:
        return _Plan(_encode_unit, lambda buf, pos: (None, pos), 0, None)
    if T is int or T is float:
        raise TypeError(f"a bare {T.__name__} has no bincode width: say bincode.i64, "
                        f"bincode.u32, bincode.f64, ...")
    if isinstance(T, type) and issubclass(T, enum.Enum):
        return _enum_plan(T, varint)
    if origin is list:
        (item,) = typing.get_args(T) or (None,)
        if item is None:
            raise TypeError("list needs its item type: list[T]")
        return _list_plan(item, varint)
    if origin is tuple:
        items = typing.get_args(T)
        if not items or items[-1] is Ellipsis:
            raise TypeError("tuple[T, ...] has no fixed length: use list[T] for a Vec")
        if items == ((),):
            items = ()
        return _tuple_plan(items, varint)
    if origin is dict:
        key_type, value_type = typing.get_args(T)
        return _dict_plan(key_type, value_type, varint)
    if origin in (Union, getattr(types, "UnionType", Union)):
        members = typing.get_args(T)
        if type(None) in members:
            rest = tuple(m for m in members if m is not type(None))
            if len(rest) != 1:
                raise TypeError("Optional of a Union is ambiguous: name the enum type")
            return _option_plan(rest[0], varint)
        return _union_plan(members, varint)
    raise TypeError(f"{T!r} is not a type bincode can describe")


def _encode_unit(value: Any, out: bytearray) -> None:
    if value is not None:
        raise EncodeError(f"the unit type () encodes only None, not {type(value).__name__}")


# Integers --------------------------------------------------------------------------------------

_SINGLE_BYTE_MAX = 250
_U16_BYTE, _U32_BYTE, _U64_BYTE = 251, 252, 253


def _write_varint(n: int, out: bytearray) -> None:
    if n <= _SINGLE_BYTE_MAX:
        out.append(n)
    elif n <= 0xFFFF:
        out.append(_U16_BYTE)
        out += n.to_bytes(2, "little")
    elif n <= 0xFFFFFFFF:
        out.append(_U32_BYTE)
        out += n.to_bytes(4, "little")
    else:
        out.append(_U64_BYTE)
        out += n.to_bytes(8, "little")


def _read_varint(buf: Any, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise DecodeError("truncated input: a varint is missing")
    tag = buf[pos]
    if tag <= _SINGLE_BYTE_MAX:
        return tag, pos + 1
    width = {_U16_BYTE: 2, _U32_BYTE: 4, _U64_BYTE: 8}.get(tag)
    if width is None:
        raise DecodeError(f"varint tag {tag} is not one bincode writes (u128 is not supported)")
    end = pos + 1 + width
    if end > len(buf):
        raise DecodeError("truncated input inside a varint")
    return int.from_bytes(buf[pos + 1:end], "little"), end


def _check_int(spec: _Number, value: Any) -> int:
    if type(value) is not int:
        if isinstance(value, bool):
            raise EncodeError(f"{spec.name} wants an int, not a bool")
        if not isinstance(value, int):
            try:
                value = value.__index__()   # numpy integers and friends
            except AttributeError:
                raise EncodeError(f"{spec.name} wants an int, not {type(value).__name__}") \
                    from None
    if not spec.low <= value <= spec.high:
        raise EncodeError(f"{value} is out of range for {spec.name}")
    return value


def _number_plan(spec: _Number, varint: bool) -> _Plan:
    if not spec.integer or spec.size == 1 or not varint:
        packer = struct.Struct("<" + spec.code)
        pack, unpack = packer.pack, packer.unpack_from
        size = spec.size

        if spec.integer:
            def enc(value: Any, out: bytearray) -> None:
                out += pack(_check_int(spec, value))
        else:
            def enc(value: Any, out: bytearray) -> None:
                try:
                    out += pack(value)
                except (struct.error, OverflowError, TypeError) as error:
                    raise EncodeError(f"{spec.name}: {error}") from None

        def dec(buf: Any, pos: int) -> tuple[Any, int]:
            return unpack(buf, pos)[0], pos + size

        return _Plan(enc, dec, size, spec.code)

    if spec.signed:
        def enc(value: Any, out: bytearray) -> None:
            n = _check_int(spec, value)
            _write_varint(n << 1 if n >= 0 else ((-n) << 1) - 1, out)

        def dec(buf: Any, pos: int) -> tuple[Any, int]:
            z, pos = _read_varint(buf, pos)
            n = (z >> 1) ^ -(z & 1)
            if not spec.low <= n <= spec.high:
                raise DecodeError(f"{n} is out of range for {spec.name}")
            return n, pos
    else:
        def enc(value: Any, out: bytearray) -> None:
            _write_varint(_check_int(spec, value), out)

        def dec(buf: Any, pos: int) -> tuple[Any, int]:
            n, pos = _read_varint(buf, pos)
            if n > spec.high:
                raise DecodeError(f"{n} is out of range for {spec.name}")
            return n, pos

    return _Plan(enc, dec, 1)


def _prefix_codec(packer: struct.Struct, what: str,
                  varint: bool) -> tuple[Callable[[int, bytearray], None],
                                         Callable[[Any, int], tuple[int, int]]]:
    """How a prefix (a u64 length, a u32 variant index) is written and read in this mode."""
    size = packer.size
    if varint:
        if size == 8:
            return _write_varint, _read_varint

        def read_varint(buf: Any, pos: int) -> tuple[int, int]:
            n, pos = _read_varint(buf, pos)
            if n >> (8 * size):
                raise DecodeError(f"{what} {n} is out of range for u{8 * size}")
            return n, pos
        return _write_varint, read_varint
    pack, unpack = packer.pack, packer.unpack_from

    def write(n: int, out: bytearray) -> None:
        out += pack(n)

    def read(buf: Any, pos: int) -> tuple[int, int]:
        if pos + size > len(buf):
            raise DecodeError(f"truncated input: a {what} is missing")
        return unpack(buf, pos)[0], pos + size

    return write, read


def _length_codec(varint: bool) -> tuple[Callable[[int, bytearray], None],
                                         Callable[[Any, int], tuple[int, int]]]:
    """How lengths (u64) are written and read in this mode."""
    return _prefix_codec(_U64, "length", varint)


def _variant_codec(varint: bool) -> tuple[Callable[[int, bytearray], None],
                                          Callable[[Any, int], tuple[int, int]]]:
    """How enum variant indices (u32) are written and read in this mode."""
    return _prefix_codec(_U32, "variant index", varint)


# Scalars -------------------------------------------------------------------------------------

def _bool_plan() -> _Plan:
    def enc(value: Any, out: bytearray) -> None:
        if type(value) is not bool:
            raise EncodeError(f"bool wants True or False, not {type(value).__name__}")
        out.append(value)

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        if pos >= len(buf):
            raise DecodeError("truncated input: a bool is missing")
        return _bool_of(buf[pos]), pos + 1

    return _Plan(enc, dec, 1, "B", _bool_of)


def _bool_of(byte: int) -> bool:
    if byte > 1:
        raise DecodeError(f"a bool is 0 or 1, not {byte}")
    return byte == 1


def _str_plan(varint: bool) -> _Plan:
    write_len, read_len = _length_codec(varint)

    def enc(value: Any, out: bytearray) -> None:
        if type(value) is not str:
            raise EncodeError(f"String wants a str, not {type(value).__name__}")
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise EncodeError(f"a str that is not valid Unicode: {error}") from None
        write_len(len(data), out)
        out += data

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        n, pos = read_len(buf, pos)
        if n > len(buf) - pos:
            raise DecodeError(f"a String of {n} bytes, but {len(buf) - pos} remain")
        try:
            return str(buf[pos:pos + n], "utf-8"), pos + n
        except UnicodeDecodeError as error:
            raise DecodeError(f"a String that is not UTF-8: {error}") from None

    return _Plan(enc, dec, 1 if varint else 8)


def _bytes_plan(varint: bool) -> _Plan:
    write_len, read_len = _length_codec(varint)

    def enc(value: Any, out: bytearray) -> None:
        try:
            view = memoryview(value)
        except TypeError:
            raise EncodeError(f"Vec<u8> wants a bytes-like object, not "
                              f"{type(value).__name__}") from None
        with view:
            write_len(view.nbytes, out)
            out += view

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        n, pos = read_len(buf, pos)
        if n > len(buf) - pos:
            raise DecodeError(f"a Vec<u8> of {n} bytes, but {len(buf) - pos} remain")
        return bytes(buf[pos:pos + n]), pos + n

    return _Plan(enc, dec, 1 if varint else 8)


# Containers ----------------------------------------------------------------------------------

_BUFFER_KINDS = {"B": "u", "H": "u", "I": "u", "L": "u", "Q": "u", "b": "i", "h": "i",
                 "i": "i", "l": "i", "q": "i", "f": "f", "d": "f"}


def _same_numbers(view: memoryview, spec: _Number) -> bool:
    """A buffer whose items are exactly ``spec``'s machine type, native little-endian."""
    fmt = view.format.lstrip("@=<") if sys.byteorder == "little" else view.format
    kind = _BUFFER_KINDS.get(fmt)
    want = "f" if not spec.integer else ("i" if spec.signed else "u")
    return kind == want and view.itemsize == spec.size and view.c_contiguous


def _list_plan(item: Any, varint: bool) -> _Plan:
    write_len, read_len = _length_codec(varint)
    inner = _plan(item, varint)
    spec = _number_spec(item)
    if spec is not None and inner.fixed is not None:   # a Vec of fixed-width numbers
        code, size = spec.code, spec.size

        def enc(value: Any, out: bytearray) -> None:
            if not isinstance(value, (list, tuple)):
                try:
                    view = memoryview(value)
                except TypeError:
                    raise EncodeError(f"Vec<{spec.name}> wants a list, not "
                                      f"{type(value).__name__}") from None
                with view:
                    if view.ndim == 1 and _same_numbers(view, spec):
                        write_len(len(view), out)
                        out += view   # one copy
                        return
                    value = view.tolist()
            if type(value) is not tuple:
                value = tuple(value)   # a snapshot: conversions cannot change its length
            write_len(len(value), out)
            if spec.integer:
                for n in value:   # range checks (struct's messages are poor)
                    if not (type(n) is int and spec.low <= n <= spec.high):
                        _check_int(spec, n)
            try:
                out += struct.pack(f"<{len(value)}{code}", *value)
            except (struct.error, OverflowError, TypeError) as error:
                raise EncodeError(f"Vec<{spec.name}>: {error}") from None

        native = array.array(code).itemsize == size and sys.byteorder == "little"

        def dec(buf: Any, pos: int) -> tuple[Any, int]:
            n, pos = read_len(buf, pos)
            if n > (len(buf) - pos) // size:
                raise DecodeError(f"a Vec of {n} {spec.name}, but {len(buf) - pos} bytes "
                                  f"remain")
            end = pos + n * size
            if native and n > 64:   # one pass in C, no intermediate tuple
                items = array.array(code)
                items.frombytes(buf[pos:end])
                return items.tolist(), end
            return list(struct.unpack_from(f"<{n}{code}", buf, pos)), end

        def to_bytes(value: Any) -> bytes | None:
            """A buffer of this item type, encoded with its one copy (or None)."""
            if isinstance(value, (list, tuple)):
                return None
            try:
                view = memoryview(value)
            except TypeError:
                return None
            with view:
                if view.ndim != 1 or not _same_numbers(view, spec):
                    return None
                prefix = bytearray()
                write_len(len(view), prefix)
                return b"".join((prefix, view))

        plan = _Plan(enc, dec, 1 if varint else 8)
        plan.to_bytes = to_bytes
        return plan

    item_enc, item_dec, least = inner.encode, inner.decode, inner.least

    def enc_items(value: Any, out: bytearray) -> None:
        if not isinstance(value, (list, tuple)):
            try:
                with memoryview(value) as view:   # a numpy array, say
                    value = view.tolist()
            except TypeError:
                raise EncodeError(f"Vec wants a list, not {type(value).__name__}") from None
        if type(value) is not tuple:
            value = tuple(value)   # a snapshot: element encoders cannot change its length
        write_len(len(value), out)
        for element in value:
            item_enc(element, out)

    def dec_items(buf: Any, pos: int) -> tuple[Any, int]:
        n, pos = read_len(buf, pos)
        _check_count(n, least, len(buf) - pos)
        result: list[Any] = []
        append = result.append
        for _ in range(n):
            element, pos = item_dec(buf, pos)
            append(element)
        return result, pos

    return _Plan(enc_items, dec_items, 1 if varint else 8)


def _ndarray_plan(item: Any, varint: bool) -> _Plan:
    import numpy

    spec = _number_spec(item)
    assert spec is not None
    vec = _list_plan(item, varint)
    read_len = _length_codec(varint)[1]
    dtype = numpy.dtype(("<" if spec.size > 1 else "") + spec.code)
    if not (spec.integer and varint and spec.size > 1):
        def dec(buf: Any, pos: int) -> tuple[Any, int]:
            n, pos = read_len(buf, pos)
            if n > (len(buf) - pos) // spec.size:
                raise DecodeError(f"a Vec of {n} {spec.name}, but {len(buf) - pos} bytes "
                                  f"remain")
            return numpy.frombuffer(buf, dtype, n, pos), pos + n * spec.size
    else:   # varint integers have no fixed width: decode, then make the array
        def dec(buf: Any, pos: int) -> tuple[Any, int]:
            values, pos = vec.decode(buf, pos)
            return numpy.array(values, dtype), pos
    plan = _Plan(vec.encode, dec, vec.least)
    plan.to_bytes = vec.to_bytes
    return plan


def _check_count(n: int, least: int, remaining: int) -> None:
    """Refuse a count the input cannot hold, before anything is allocated. Elements that
    take no bytes (units, empty structs) draw on one budget for the whole decode."""
    if least:
        if n > remaining // least:
            raise DecodeError(f"a length of {n} elements, but only {remaining} bytes remain")
        return
    left = getattr(_zero_budget, "left", ZERO_SIZE_BUDGET)
    if n > left:
        raise DecodeError(f"{n} elements that take no bytes: more than the {left} that may "
                          f"remain to be made for this input")
    _zero_budget.left = left - n


#: How many elements that take no bytes one decode may make (plus one per input byte).
ZERO_SIZE_BUDGET = 1 << 20
_zero_budget = threading.local()


def _number_spec(T: Any) -> _Number | None:
    if typing.get_origin(T) is typing.Annotated:
        spec = typing.get_args(T)[1]
        if isinstance(spec, _Number):
            return spec
    return None


def _dict_plan(key_type: Any, value_type: Any, varint: bool) -> _Plan:
    if typing.get_origin(key_type) in (list, dict) or (
            typing.get_origin(key_type) is typing.Annotated
            and isinstance(typing.get_args(key_type)[1], _Array)):
        raise TypeError(f"map keys of type {key_type!r} cannot be dict keys in Python")
    write_len, read_len = _length_codec(varint)
    key_plan, value_plan = _plan(key_type, varint), _plan(value_type, varint)
    key_enc, key_dec = key_plan.encode, key_plan.decode
    value_enc, value_dec = value_plan.encode, value_plan.decode
    least = key_plan.least + value_plan.least

    def enc(value: Any, out: bytearray) -> None:
        if not isinstance(value, dict):
            raise EncodeError(f"a map wants a dict, not {type(value).__name__}")
        write_len(len(value), out)
        for k, v in value.items():
            key_enc(k, out)
            value_enc(v, out)

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        n, pos = read_len(buf, pos)
        _check_count(n, least, len(buf) - pos)
        result = {}
        for _ in range(n):
            k, pos = key_dec(buf, pos)
            result[k], pos = value_dec(buf, pos)
        return result, pos

    return _Plan(enc, dec, 1 if varint else 8)


def _option_plan(T: Any, varint: bool) -> _Plan:
    inner = _plan(T, varint)
    inner_enc, inner_dec = inner.encode, inner.decode

    def enc(value: Any, out: bytearray) -> None:
        if value is None:
            out.append(0)
        else:
            out.append(1)
            inner_enc(value, out)

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        if pos >= len(buf):
            raise DecodeError("truncated input: an Option tag is missing")
        tag = buf[pos]
        if tag == 0:
            return None, pos + 1
        if tag != 1:
            raise DecodeError(f"an Option tag is 0 or 1, not {tag}")
        return inner_dec(buf, pos + 1)

    return _Plan(enc, dec, 1)


def _sequence_plan(plans: list[_Plan], what: str) -> tuple[Callable[[Any, bytearray], None],
                                                             Callable[[Any, int], tuple[list[Any], int]],
                                                             int]:
    """Encode and decode a fixed sequence of values, runs of fixed-width ones in one struct
    call each. The encoder takes a sequence of the values; the decoder returns a list."""
    steps: list[tuple[str, Any]] = []   # ("run", (struct, count, checks)) or ("one", plan)
    run: list[_Plan] = []

    def close_run() -> None:
        if run:
            packer = struct.Struct("<" + "".join(p.fixed for p in run))  # type: ignore[misc]
            checks = [p.check for p in run]
            # Values struct would take but the type must not: anything but a plain int or
            # float, and anything in a bool's place (struct packs 5 there as a byte).
            strict = [p.check is not None for p in run]
            steps.append(("run", (packer, len(run), checks if any(checks) else None,
                                  [p.encode for p in run], strict)))
            run.clear()

    for plan in plans:
        if plan.fixed is not None:
            run.append(plan)
        else:
            close_run()
            steps.append(("one", plan))
    close_run()
    least = sum(p.least for p in plans)

    def enc(values: Any, out: bytearray) -> None:
        index = 0
        for kind, step in steps:
            if kind == "one":
                step.encode(values[index], out)
                index += 1
            else:
                packer, n, _, encoders, strict = step
                chunk = values[index:index + n]
                index += n
                # Plain ints and floats go in one struct call (their range errors surface
                # below). Anything else (a bool's place, a numpy scalar, an object with
                # __index__) goes field by field, so its conversion runs exactly once.
                plain = True
                for value, must in zip(chunk, strict):
                    if must or (type(value) is not int and type(value) is not float):
                        plain = False
                        break
                if plain:
                    try:
                        out += packer.pack(*chunk)
                        continue
                    except (struct.error, OverflowError):
                        pass   # out of range: the field's encoder says which, and why
                for encoder, value in zip(encoders, chunk):
                    encoder(value, out)

    def dec(buf: Any, pos: int) -> tuple[list[Any], int]:
        values: list[Any] = []
        for kind, step in steps:
            if kind == "one":
                value, pos = step.decode(buf, pos)
                values.append(value)
            else:
                packer, _, checks, _, _ = step
                if pos + packer.size > len(buf):
                    raise DecodeError(f"truncated input inside a {what}")
                raw = packer.unpack_from(buf, pos)
                pos += packer.size
                if checks is None:
                    values += raw
                else:
                    values += [c(v) if c is not None else v for c, v in zip(checks, raw)]
        return values, pos

    return enc, dec, least


def _tuple_plan(items: tuple[Any, ...], varint: bool) -> _Plan:
    seq_enc, seq_dec, least = _sequence_plan([_plan(t, varint) for t in items], "tuple")
    size = len(items)

    def enc(value: Any, out: bytearray) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != size:
            raise EncodeError(f"a {size}-tuple wants a tuple of {size}, not "
                              f"{type(value).__name__}"
                              + (f" of {len(value)}" if isinstance(value, (tuple, list)) else ""))
        seq_enc(value, out)

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        values, pos = seq_dec(buf, pos)
        return tuple(values), pos

    return _Plan(enc, dec, least)


def _struct_plan(cls: type, varint: bool) -> _Plan:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f for f in dataclasses.fields(cls)]
    names = [f.name for f in fields]
    plans = [_plan(hints[name], varint) for name in names]
    program = _program(cls, fields, hints) if _kernels is not None else None
    if program is not None:
        return _compiled_struct_plan(program, plans, varint)
    seq_enc, seq_dec, least = _sequence_plan(plans, cls.__name__)
    keywords = any(getattr(f, "kw_only", False) or not f.init for f in fields)
    getter = (lambda v: [getattr(v, name) for name in names]) if len(names) != 1 \
        else (lambda v: [getattr(v, names[0])])

    def enc(value: Any, out: bytearray) -> None:
        if not isinstance(value, cls):
            raise EncodeError(f"{cls.__name__} wants a {cls.__name__}, not "
                              f"{type(value).__name__}")
        seq_enc(getter(value), out)

    if keywords:
        def build(values: list[Any]) -> Any:
            obj: Any = object.__new__(cls)
            for name, value in zip(names, values):
                object.__setattr__(obj, name, value)
            return obj
    else:
        def build(values: list[Any]) -> Any:
            return cls(*values)

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        values, pos = seq_dec(buf, pos)
        return build(values), pos

    return _Plan(enc, dec, least)


# The compiled kernels (hintens/_bincode.pyx) ---------------------------------------------------

_KINDS = {"u": 1, "i": 2, "f": 3}
_VEC_KINDS = {"u": 7, "i": 8, "f": 9}
_BOOL, _STR, _BYTES, _STRUCT = 4, 5, 6, 10


def _program(cls: type, fields: list[Any], hints: dict[str, Any],
             outer: tuple[type, ...] = ()) -> tuple[Any, ...] | None:
    """The kernels' program for a dataclass whose fields are all numbers, bools, strings,
    bytes, Vecs of numbers or such dataclasses; None for anything else."""
    ops: list[tuple[int, int, Any]] = []
    for f in fields:
        T = hints[f.name]
        spec = _number_spec(T)
        if spec is not None:
            ops.append((_KINDS[_kind(spec)], spec.size, None))
        elif T is bool:
            ops.append((_BOOL, 1, None))
        elif T is str:
            ops.append((_STR, 0, None))
        elif T is bytes:
            ops.append((_BYTES, 0, None))
        elif typing.get_origin(T) is list and _number_spec(typing.get_args(T)[0]) is not None:
            item = _number_spec(typing.get_args(T)[0])
            assert item is not None
            ops.append((_VEC_KINDS[_kind(item)], item.size, None))
        elif isinstance(T, type) and dataclasses.is_dataclass(T) and T not in (cls, *outer):
            inner = _program(T, list(dataclasses.fields(T)),
                             typing.get_type_hints(T, include_extras=True), (cls, *outer))
            if inner is None:
                return None
            ops.append((_STRUCT, 0, inner))
        else:
            return None
    if any(getattr(f, "kw_only", False) or not f.init for f in fields) \
            or not cls.__dataclass_params__.init:   # type: ignore[attr-defined]
        return None   # no positional __init__ of the fields: the Python plan builds these
    plain = not (hasattr(cls, "__post_init__") or hasattr(cls, "__slots__")
                 or cls.__new__ is not object.__new__)
    return (cls, tuple(f.name for f in fields), tuple(ops), 0 if plain else 1)


def _kind(spec: _Number) -> str:
    return "f" if not spec.integer else ("i" if spec.signed else "u")


def _compiled_struct_plan(program: tuple[Any, ...], plans: list[_Plan], varint: bool) -> _Plan:
    assert _kernels is not None
    compiled = _kernels.Program(*program)
    _direct[program[0], varint] = compiled   # encode()/decode() call it straight away
    encode_struct, decode_at = compiled.encode, compiled.decode_at

    def enc(value: Any, out: bytearray) -> None:
        out += encode_struct(value, varint)

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        return decode_at(buf, pos, varint)   # type: ignore[no-any-return]

    return _Plan(enc, dec, sum(p.least for p in plans))


#: Compiled kernels' programs of structs, by (type, varint).
_direct: dict[tuple[Any, bool], Any] = {}


def _enum_plan(cls: type[enum.Enum], varint: bool) -> _Plan:
    members = list(cls)
    index = {member: position for position, member in enumerate(members)}
    write, read = _variant_codec(varint)

    def enc(value: Any, out: bytearray) -> None:
        position = index.get(value) if isinstance(value, cls) else None
        if position is None:
            raise EncodeError(f"{cls.__name__} wants one of its members, not {value!r}")
        write(position, out)

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        position, pos = read(buf, pos)
        if position >= len(members):
            raise DecodeError(f"variant index {position} is not a {cls.__name__} "
                              f"({len(members)} variants)")
        return members[position], pos

    return _Plan(enc, dec, 1 if varint else 4)


def _union_plan(members: tuple[Any, ...], varint: bool) -> _Plan:
    for member in members:
        if not (isinstance(member, type) and dataclasses.is_dataclass(member)):
            raise TypeError(f"a Union (a Rust enum with data) takes dataclasses, not {member!r}")
    plans = [_plan(member, varint) for member in members]
    index = {member: position for position, member in enumerate(members)}
    write, read = _variant_codec(varint)

    def enc(value: Any, out: bytearray) -> None:
        position = index.get(type(value))
        if position is None:
            raise EncodeError(f"{type(value).__name__} is not a variant of "
                              f"Union[{', '.join(m.__name__ for m in members)}]")
        write(position, out)
        plans[position].encode(value, out)

    def dec(buf: Any, pos: int) -> tuple[Any, int]:
        position, pos = read(buf, pos)
        if position >= len(plans):
            raise DecodeError(f"variant index {position} is not one of the {len(plans)} "
                              f"variants")
        return plans[position].decode(buf, pos)

    return _Plan(enc, dec, 1 if varint else 4)




def _load_kernels() -> Any:
    from ._impl import NO_EXTENSIONS
    if NO_EXTENSIONS:
        return None
    try:
        from . import _bincode
    except ImportError:
        return None
    return _bincode


#: The compiled kernels, or None (not built, or HINTENS_NO_EXTENSIONS): Python plans only.
_kernels = _load_kernels()
