"""Plans of the scalars: numbers (fixed-width, or varint and zigzag), bool, String, Vec<u8>,
and the prefixes other plans share (u64 lengths, u32 variant indices) in either mode."""

from __future__ import annotations

import struct
from typing import Any, Callable

from ._plans import _Plan
from ._types import DecodeError, EncodeError, _Number

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U8 = struct.Struct("<B")


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
