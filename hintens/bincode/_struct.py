"""Plans of dataclasses (structs), ``enum.Enum`` (enums of unit variants) and Unions of
dataclasses (enums with data). A struct whose fields the compiled kernels know
(hintens/_bincode.pyx) becomes a kernel program, which ``encode``/``decode`` call directly;
any other struct is a Python plan."""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any

from ._containers import _sequence_plan
from ._plans import _Plan, _plan
from ._scalars import _variant_codec
from ._types import DecodeError, EncodeError, _Number, _number_spec


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
    from .._impl import NO_EXTENSIONS
    if NO_EXTENSIONS:
        return None
    try:
        from .. import _bincode
    except ImportError:
        return None
    return _bincode


#: The compiled kernels, or None (not built, or HINTENS_NO_EXTENSIONS): Python plans only.
_kernels = _load_kernels()
