"""Codecs: how application values become payloads, and back.

The protocol a codec follows is ``Codec``'s docstring.
"""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any, Callable, Protocol, Union

from . import bincode
from .bincode._plans import _plan
from ._errors import ShmError

Payload = Any   # a bytes-like object, or a list of them


class Codec(Protocol):
    """The codec protocol.

    A codec is any object with two methods::

        encode(value, kind) -> payload
        decode(payload, kind) -> value

    ``kind`` is ``"request"``, ``"response"`` or ``"event"``, so that requests, responses
    and events may have types of their own. ``encode`` returns a bytes-like object, or a list
    of them (parts): a client or server then copies the parts straight into one shared-memory
    buffer when the payload is large enough, or joins them, instead of making the codec join
    them first. ``decode`` gets ``bytes`` or a read-only ``memoryview`` lent from shared
    memory (valid until released or collected): a codec that keeps views of it keeps the
    memory lent.

    Give one as ``Client(codec=...)``, ``Server(codec=...)`` or ``ClientPool(codec=...)``, as
    an object or by name: ``"raw"`` (the default: bytes in, bytes or memoryview out),
    ``"json"``, ``"pickle"``; ``BincodeCodec(request_type, response_type)`` for Rust peers.
    msgpack, for one, plugs in as::

        class MsgpackCodec:
            def encode(self, value, kind):
                return msgpack.packb(value)
            def decode(self, payload, kind):
                return msgpack.unpackb(payload)
    """

    def encode(self, value: Any, kind: str) -> Payload: ...

    def decode(self, payload: Any, kind: str) -> Any: ...


# The public name, hintens.Codec, for help(). Set after the class: in a Protocol's body it would
# be a member that implementations must have (for mypy).
Codec.__module__ = "hintens"


# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
class RawCodec:
    """Payloads as they are: bytes-like in, ``bytes`` or ``memoryview`` out."""

    __module__ = "hintens"

    def encode(self, value: Any, kind: str) -> Payload:
        return value

    def decode(self, payload: Any, kind: str) -> Any:
        return payload


class JsonCodec:
    """JSON (UTF-8, compact). Decodes to dicts, lists, str, int, float, bool, None."""

    __module__ = "hintens"

    def encode(self, value: Any, kind: str) -> Payload:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, payload: Any, kind: str) -> Any:
        return json.loads(bytes(payload))


class BincodeCodec:
    """bincode (see ``hintens.bincode``), with a type per kind of message.

    Args:
        request_type: the type of requests (and of events, unless ``event_type``).
        response_type: the type of responses (default: ``request_type``).
        event_type: the type of events (default: ``request_type``).
        varint: bincode's varint encoding (``DefaultOptions``) instead of fixed-width.
    """

    __module__ = "hintens"

    def __init__(self, request_type: Any, response_type: Any = None, event_type: Any = None,
                 *, varint: bool = False) -> None:
        self.types = {"request": request_type,
                      "response": request_type if response_type is None else response_type,
                      "event": request_type if event_type is None else event_type}
        self.varint = varint
        for T in self.types.values():   # compile now: a bad type fails here, not mid-call
            _plan(T, varint)

    def encode(self, value: Any, kind: str) -> Payload:
        return bincode.encode(value, self.types[kind], varint=self.varint)

    def decode(self, payload: Any, kind: str) -> Any:
        return bincode.decode(payload, self.types[kind], varint=self.varint)


class PickleCodec:
    """pickle protocol 5, with out-of-band buffers.

    Buffers that pickle hands out of band (numpy arrays, ``PickleBuffer``) are not copied
    into the pickle: they become parts of the payload, 64-byte aligned, which a client or
    server copies once into shared memory when the payload is large. The receiver's objects
    then view that memory directly (read-only, unless the connection lends writable views).

    Only for peers you trust: unpickling runs code of the sender's choosing. (A hintens
    server refuses other users by default.)

    Payload: ``b"HXP5"``, u32 LE count, u32 LE offset of the pickle, count × (u64 LE offset,
    u64 LE length) of the buffers, then the pickle and the buffers. A payload without
    out-of-band buffers is a plain pickle.
    """

    __module__ = "hintens"

    MAGIC = b"HXP5"
    ALIGN = 64

    def encode(self, value: Any, kind: str) -> Payload:
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(value, protocol=5, buffer_callback=self._out_of_band(buffers))
        if not buffers:
            return data
        views = [buffer.raw() for buffer in buffers]
        head_size = 12 + 16 * len(views)
        offset = head_size + len(data)
        table: list[bytes] = []
        parts: list[Any] = []
        for view in views:
            pad = -offset % self.ALIGN
            if pad:
                parts.append(bytes(pad))
            offset += pad
            table.append(struct.pack("<QQ", offset, view.nbytes))
            parts.append(view)
            offset += view.nbytes
        head = self.MAGIC + struct.pack("<II", len(views), head_size) + b"".join(table)
        return [head, data, *parts]

    @staticmethod
    def _out_of_band(buffers: list[pickle.PickleBuffer]) -> Any:
        def keep(buffer: pickle.PickleBuffer) -> bool:
            try:
                buffer.raw()            # contiguous: it can travel out of band
            except BufferError:
                return True             # not contiguous: pickle copies it in band
            buffers.append(buffer)
            return False
        return keep

    def decode(self, payload: Any, kind: str) -> Any:
        view = memoryview(payload)
        if view.nbytes < 12 or bytes(view[:4]) != self.MAGIC:
            return pickle.loads(view)
        count, start = struct.unpack_from("<II", view, 4)
        if count > (view.nbytes - 12) // 16 or start != 12 + 16 * count:
            raise ValueError("malformed out-of-band pickle payload")
        buffers, end = [], view.nbytes
        for index in range(count):
            offset, length = struct.unpack_from("<QQ", view, 12 + 16 * index)
            if offset < start or offset > end or length > end - offset:
                raise ValueError("malformed out-of-band pickle payload: a buffer is out of "
                                 "bounds")
            buffers.append(view[offset:offset + length])
        return pickle.loads(view[start:], buffers=buffers)


_NAMED: dict[str, type] = {"raw": RawCodec, "json": JsonCodec, "pickle": PickleCodec}

CodecSpec = Union[str, Codec, None]


def codec_from(spec: CodecSpec) -> Codec | None:
    """The codec object for ``spec``; None for raw (no codec work at all).

    Raises:
        ValueError: an unknown name. TypeError: an object without encode/decode.
    """
    if spec is None or spec == "raw" or isinstance(spec, RawCodec):
        return None
    if isinstance(spec, str):
        if spec == "bincode":
            raise ValueError("bincode needs types: codec=hintens.BincodeCodec(request_type, "
                             "response_type)")
        try:
            return _NAMED[spec]()  # type: ignore[no-any-return]
        except KeyError:
            raise ValueError(f"unknown codec {spec!r}: one of raw, json, pickle, or a "
                             f"codec object") from None
    if not (callable(getattr(spec, "encode", None)) and callable(getattr(spec, "decode", None))):
        raise TypeError(f"{spec!r} is not a codec: it needs encode(value, kind) and "
                        f"decode(payload, kind)")
    return spec


def join(payload: Payload) -> Any:
    """A codec's payload as one bytes-like object (parts joined)."""
    return b"".join(payload) if isinstance(payload, list) else payload


def size_of(payload: Payload) -> int:
    if isinstance(payload, list):
        return sum(memoryview(part).nbytes for part in payload)
    return memoryview(payload).nbytes if type(payload) is not bytes else len(payload)


def ready(payload: Payload, shm_threshold: int,
          allocate: Callable[[int], memoryview] | None) -> Any:
    """A codec's payload, ready to send. Parts that together reach ``shm_threshold`` go
    straight into one buffer from ``allocate`` (the connection's shared memory, when it
    negotiated it; a ``ShmError`` from it means it did not), so they are copied once; else
    they are joined."""
    if not isinstance(payload, list):
        return payload
    total = size_of(payload)
    if allocate is not None and total >= shm_threshold:
        try:
            return fill(payload, allocate(total))
        except ShmError:
            pass
    return b"".join(payload)


def fill(parts: list[Any], buffer: memoryview) -> memoryview:
    """Copy a codec's parts, back to back, into ``buffer`` (from ``allocate()``); return it."""
    offset = 0
    for part in parts:
        with memoryview(part) as view:
            buffer[offset:offset + view.nbytes] = view.cast("B")
            offset += view.nbytes
    return buffer
