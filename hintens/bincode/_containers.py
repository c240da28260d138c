"""Plans of the containers: Vec (a Vec of numbers in one struct call or one copy), ndarray,
map, Option and tuple, and ``_sequence_plan``, which merges runs of fixed-width members into
one struct call (tuples here, structs in ``_struct``). A length is checked against the input
that remains before anything is allocated."""

from __future__ import annotations

import array
import struct
import sys
import threading
import typing
from typing import Any, Callable

from ._plans import _Plan, _plan
from ._scalars import _check_int, _length_codec
from ._types import DecodeError, EncodeError, _Array, _Number, _number_spec


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


def _numpy() -> Any:
    """numpy, which ``ndarray(T)`` decodes to: an optional dependency, named when missing."""
    try:
        import numpy
    except ImportError:
        raise ImportError("hintens.bincode.ndarray needs numpy (pip install numpy)") from None
    return numpy


def _ndarray_plan(item: Any, varint: bool) -> _Plan:
    numpy = _numpy()
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
