"""The plan compiler: every type is compiled once into a ``_Plan`` (an encoder and a decoder)
and cached by (type, varint). ``_plan`` looks a type up or compiles it, one thread at a time,
recursive types through a forward plan; ``_compile`` sends each kind of type to its builder in
``_scalars``, ``_containers`` or ``_struct``. The builders compile their members through
``_plan``, so this module imports them where it calls them, not at the top."""

from __future__ import annotations

import dataclasses
import enum
import threading
import types
import typing
from typing import Any, Callable, Union

from ._types import EncodeError, _Array, _Number


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


def _compile(T: Any, varint: bool) -> _Plan:
    from ._struct import _struct_plan

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
    from ._containers import _dict_plan, _list_plan, _ndarray_plan, _option_plan, _tuple_plan
    from ._scalars import _bool_plan, _bytes_plan, _number_plan, _str_plan
    from ._struct import _enum_plan, _union_plan

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
