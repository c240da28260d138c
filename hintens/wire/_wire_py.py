"""Pure-Python twin of the compiled wire kernels, ``hintens.wire._wire``.

Same names, same signatures, same exceptions and the same decoder semantics as the Cython
module (the socket transport's twin is ``hintens.transport._channel_py``). It is used where the extension is not built, on interpreters other than CPython, or when
``HINTENS_NO_EXTENSIONS=1``. Speed is not its goal: correctness and agreement with the compiled
core are, and the test-suite runs every core test against both.

The decoder's rules, which both implementations follow, are in ``FrameDecoder``'s docstring.
"""

from __future__ import annotations

import binascii
import operator
import struct
import threading
from typing import Any

from .. import _errors
from .._constants import (
    BUDGETED_FRAME_BYTES,
    CONTROL_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    HEADER_SIZE,
    KNOWN_FLAGS_MASK,
    MAGIC,
    MAX_FRAME_PAYLOAD_BYTES,
    PAYLOAD_COPY_THRESHOLD_BYTES,
    VERSION,
    VERSION_MAJOR,
)
from .._errors import IncompleteFrameError, ProtocolError

__all__ = [
    "MemoryBudget",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "crc16",
    "crc16_backend",
    "encode_frame",
    "encode_header",
    "pack_header_into",
    "unpack_header",
]

_HEADER = struct.Struct(">HHIHIHQ")
assert _HEADER.size == HEADER_SIZE


def _contiguous_bytes(data: Any) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer, without copying it."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise BufferError("hintens needs a C-contiguous buffer")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _u(value: Any, bits: int, name: str) -> int:
    value = operator.index(value)
    if not 0 <= value < (1 << bits):
        raise OverflowError(f"{name}={value} does not fit an unsigned {bits}-bit field")
    return value


def crc16(data: Any, value: int = 0xFFFF) -> int:
    """CRC-16/IBM-3740 (poly 0x1021, init 0xFFFF, not reflected, xorout 0) of a buffer.

    The pure-Python core takes it on the calling thread (``binascii.crc_hqx``); the compiled
    one shares a buffer of 16 MiB or more among up to 4 threads.

    Args:
        data: any C-contiguous buffer; it is not copied.
        value: the CRC of the data that precedes ``data``, to compute incrementally; 0xFFFF
            (the initial value) to start.

    Returns:
        The CRC as an int in [0, 0xFFFF].

    Raises:
        TypeError: ``data`` does not support the buffer protocol.
        BufferError: ``data`` is not C-contiguous.
        OverflowError: ``value`` is outside [0, 0xFFFF].
    """
    value = _u(value, 16, "value")
    return binascii.crc_hqx(_contiguous_bytes(data), value)


def crc16_backend() -> str:
    """Name of the CRC16 kernel in use ("binascii" in the pure-Python core)."""
    return "binascii"


class FrameHeader:
    """The 24 header bytes, unpacked and unvalidated."""

    __slots__ = ("magic", "version", "type", "flags", "length", "checksum", "request_id")

    def __init__(self, magic: int, version: int, type: int, flags: int, length: int,
                 checksum: int, request_id: int) -> None:
        self.magic = magic
        self.version = version
        self.type = type
        self.flags = flags
        self.length = length
        self.checksum = checksum
        self.request_id = request_id

    def __repr__(self) -> str:
        return (f"FrameHeader(magic=0x{self.magic:04x}, version=0x{self.version:04x}, "
                f"type={self.type}, flags=0x{self.flags:04x}, length={self.length}, "
                f"checksum=0x{self.checksum:04x}, request_id={self.request_id})")


class Frame:
    """One decoded frame."""

    __slots__ = ("type", "flags", "version", "request_id", "payload")

    def __init__(self, type: int, flags: int, version: int, request_id: int,
                 payload: Any) -> None:
        self.type = type
        self.flags = flags
        self.version = version
        self.request_id = request_id
        self.payload = payload

    def __repr__(self) -> str:
        return (f"Frame(type={self.type}, flags=0x{self.flags:04x}, "
                f"version=0x{self.version:04x}, request_id={self.request_id}, "
                f"payload=<{len(self.payload)} bytes>)")


def _check_frame_args(msg_type: Any, request_id: Any, flags: Any, n: int) -> tuple[int, int, int]:
    msg_type = _u(msg_type, 32, "msg_type")
    request_id = _u(request_id, 64, "request_id")
    flags = _u(flags, 16, "flags")
    if not 1 <= msg_type <= 4:
        raise ValueError(f"msg_type must be 1-4 (a MessageType), not {msg_type}")
    if flags & ~KNOWN_FLAGS_MASK:
        raise ValueError(f"flags 0x{flags:04x} set reserved bits")
    if n > MAX_FRAME_PAYLOAD_BYTES:
        raise ValueError(f"payload of {n} bytes does not fit the u32 length field")
    return msg_type, request_id, flags


def encode_header(msg_type: int, payload: Any, request_id: int, flags: int = 0) -> bytes:
    """The 24-byte header for ``payload``, for a scatter/gather write of header then payload.

    Args:
        msg_type: a ``MessageType`` (1-4).
        payload: any C-contiguous buffer; only its length and CRC are read.
        request_id: u64 chosen by the requester.
        flags: ``Flags`` bits; reserved bits are refused.

    Returns:
        24 bytes.

    Raises:
        ValueError: unknown type, reserved flags, or a payload over 4 GiB - 1.
        OverflowError: a field does not fit its width.
    """
    view = _contiguous_bytes(payload)
    msg_type, request_id, flags = _check_frame_args(msg_type, request_id, flags, len(view))
    return _HEADER.pack(MAGIC, VERSION, msg_type, flags, len(view),
                        binascii.crc_hqx(view, 0xFFFF), request_id)


def encode_frame(msg_type: int, payload: Any, request_id: int, flags: int = 0) -> bytes:
    """A complete frame: header followed by a copy of the payload.

    Args and Raises: as ``encode_header``.

    Returns:
        ``24 + len(payload)`` bytes.
    """
    return encode_header(msg_type, payload, request_id, flags) + bytes(_contiguous_bytes(payload))


def pack_header_into(buffer: Any, offset: int, msg_type: int, length: int, checksum: int,
                     request_id: int, flags: int = 0, version: int = VERSION) -> None:
    """Write a header with the given raw field values into ``buffer`` at ``offset``.

    Nothing is validated beyond field widths: this is the low-level twin of
    ``struct.pack_into``. Use ``encode_header`` to have length and CRC computed.

    Raises:
        OverflowError: a field does not fit its width.
        ValueError: ``offset`` is negative or fewer than 24 bytes follow it.
        TypeError: ``buffer`` is not a writable buffer.
    """
    view = memoryview(buffer)
    if view.readonly:
        raise TypeError("pack_header_into needs a writable buffer")
    view = _contiguous_bytes(view)
    offset = operator.index(offset)
    fields = (_u(version, 16, "version"), _u(msg_type, 32, "msg_type"), _u(flags, 16, "flags"),
              _u(length, 32, "length"), _u(checksum, 16, "checksum"),
              _u(request_id, 64, "request_id"))
    if offset < 0 or len(view) - offset < HEADER_SIZE:
        raise ValueError(f"need {HEADER_SIZE} bytes at offset {offset} of a {len(view)}-byte buffer")
    _HEADER.pack_into(view, offset, MAGIC, *fields)


def unpack_header(buffer: Any, offset: int = 0) -> FrameHeader:
    """Read the 24 header bytes at ``offset`` without validating them.

    Raises:
        ValueError: ``offset`` is negative or fewer than 24 bytes follow it.
        TypeError: ``buffer`` does not support the buffer protocol.
    """
    view = _contiguous_bytes(buffer)
    offset = operator.index(offset)
    if offset < 0 or len(view) - offset < HEADER_SIZE:
        raise ValueError(f"need {HEADER_SIZE} bytes at offset {offset} of a {len(view)}-byte buffer")
    return FrameHeader(*_HEADER.unpack_from(view, offset))


class MemoryBudget:
    """A count of bytes (or of anything else) that several owners draw from, bounded by
    ``limit``: the bytes all connections hold for unfinished frames, say, or the shared memory
    they map.

    Args:
        limit: the most that may be taken at once (at least 0).

    Raises:
        ValueError: ``limit`` is negative.
    """

    def __init__(self, limit: int) -> None:
        limit = operator.index(limit)
        if limit < 0:
            raise ValueError("a budget's limit must not be negative")
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, amount: int) -> bool:
        """Take ``amount`` if it fits under the limit. Returns:
            True when taken (give it back later), False when it would not fit (nothing taken).
        """
        with self._lock:
            if amount < 0 or amount > self.limit - self.used:
                return False
            self.used += amount
            return True

    def give(self, amount: int) -> None:
        """Give back ``amount`` taken earlier."""
        with self._lock:
            self.used = max(0, self.used - amount)

    def __repr__(self) -> str:
        return f"MemoryBudget(used={self.used}, limit={self.limit})"


# Decoder states.
_HEADER_STATE, _PAYLOAD_STATE, _DISCARD_STATE = 0, 1, 2


class FrameDecoder:
    """Sans-IO frame decoder: bytes in, frames out, from a byte stream fed in any pieces
    (``FrameDecoder(max_payload).feed(data)``).

    Rules (the compiled core and its pure-Python twin follow the same ones):

    * A frame's header is validated, in this order, before any of its payload is buffered:
      magic, major version, message type, length limit, reserved flags. The first two are
      checked as soon as their bytes arrive, so garbage is rejected without waiting for 24
      bytes.
    * Fatal errors (bad header, too large) poison the decoder: every later call raises again.
    * Recoverable errors (CRC, reserved flags) consume exactly the bad frame. Bytes after it
      that were already passed in are kept; ``feed(b"")`` decodes them.
    * Frames decoded before an error in the same call travel in the exception's ``frames``.
    * A payload is a read-only memoryview sharing the input when the input is ``bytes``, the
      frame lies wholly inside it and the payload has at least 1 KiB; otherwise it is a new
      ``bytes``.
    """

    _reserved = 0   # class defaults: __del__ may run on an instance whose __init__ raised
    budget: MemoryBudget | None = None

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        """Args:
            max_payload: the largest payload accepted, in bytes (at most 2**32 - 1).

        Raises:
            ValueError: ``max_payload`` is negative or over 2**32 - 1.
        """
        max_payload = operator.index(max_payload)
        if not 0 <= max_payload <= MAX_FRAME_PAYLOAD_BYTES:
            raise ValueError(f"max_payload must be in [0, {MAX_FRAME_PAYLOAD_BYTES}]")
        self._max_payload = max_payload
        self._state = _HEADER_STATE
        self._header = bytearray()      # header bytes of an unfinished frame
        self._fields: tuple[int, ...] = ()  # unpacked header of the frame being assembled
        self._parts: list[bytes] = []   # payload pieces of the frame being assembled
        self._remaining = 0             # payload bytes still to assemble or discard
        self._assembled = 0             # payload bytes assembled so far
        self._backlog = b""             # input left unread when a recoverable error was raised
        self._failed: ProtocolError | None = None
        #: Frames completed so far (returned, in errors' ``frames``, or skipped).
        self.frames_decoded = 0
        #: Drop plain Events (no flags, request id not 0) instead of returning them.
        self.skip_events = False
        #: How many Events ``skip_events`` dropped.
        self.events_skipped = 0
        #: Stream bytes fed in, each counted once.
        self.bytes_fed = 0
        self._by_type = [0, 0, 0, 0, 0]   # frames returned, by type; [0]: control Events
        #: Bounds the bytes held for unfinished frames (shared by several decoders), or None.
        self.budget = None
        self._reserved = 0              # taken from budget for the frame being assembled

    def __del__(self) -> None:
        self._drop_payload()

    def close(self) -> None:
        """Drop the unfinished frame, if any, and give its bytes back to ``budget`` now (a
        connection that ends inside a frame). The decoder may not be fed afterwards."""
        self._drop_payload()
        self._state, self._header, self._remaining = _HEADER_STATE, bytearray(), 0
        self._backlog = b""
        self._failed = ProtocolError("the decoder was closed")

    def _drop_payload(self) -> None:
        self._parts, self._assembled = [], 0
        if self._reserved:   # given back once, whoever comes first (close, completion, GC)
            if self.budget is not None:
                self.budget.give(self._reserved)
            self._reserved = 0

    @property
    def max_payload(self) -> int:
        """The payload limit in bytes."""
        return self._max_payload

    @property
    def in_frame(self) -> bool:
        """True between the first byte of a frame and its last (skipped payloads included)."""
        return bool(self._header) or self._state != _HEADER_STATE

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as frames (an unfinished frame and backlog)."""
        assembling = HEADER_SIZE + self._assembled if self._state == _PAYLOAD_STATE else 0
        return len(self._header) + assembling + len(self._backlog)

    def feed(self, data: Any) -> list[Frame]:
        """Decode the frames that ``data`` completes.

        Args:
            data: the next bytes of the stream, any C-contiguous buffer, any chunking.

        Returns:
            The frames completed by this call, in stream order, each exactly once.

        Raises:
            ProtocolError: a subclass per violation (the class's rules).
            BufferError: ``data`` is not C-contiguous.
        """
        if self._failed is not None:
            raise _errors.renew(self._failed)
        share = type(data) is bytes
        view = _contiguous_bytes(data)
        self.bytes_fed += view.nbytes
        if self._backlog:
            view = memoryview(self._backlog + bytes(view))
            share = False
            self._backlog = b""
        frames: list[Frame] = []
        try:
            self._decode(view, share, frames)
        except ProtocolError as error:
            self._count(frames)
            self.frames_decoded += len(frames)
            error.frames = frames
            if error.fatal:
                self._failed = error
            raise
        self._count(frames)
        self.frames_decoded += len(frames)
        return frames

    def _count(self, frames: list[Frame]) -> None:
        by_type = self._by_type
        for frame in frames:
            by_type[0 if frame.type == 3 and not frame.request_id else frame.type] += 1

    def frame_counts(self) -> tuple[int, int, int, int, int]:
        """Frames returned so far, by type: ``(control Events, Requests, Responses, Events,
        Errors)``. Control Events are those with request id 0; skipped Events are in
        ``events_skipped`` instead."""
        c = self._by_type
        return (c[0], c[1], c[2], c[3], c[4])

    def feed_eof(self) -> list[Frame]:
        """Signal the end of the stream.

        Returns:
            Frames still waiting in the backlog after a recoverable error.

        Raises:
            IncompleteFrameError: the stream ended inside a frame.
            ProtocolError: the backlog holds a bad frame.
        """
        frames = self.feed(b"")
        if self.pending or self._state != _HEADER_STATE:
            raise IncompleteFrameError(
                f"stream ended inside a frame ({self.pending} bytes of it received)",
                self.pending)
        return frames

    def _decode(self, view: memoryview, share: bool, frames: list[Frame]) -> None:
        pos, end = 0, len(view)
        try:
            while pos < end:
                if self._state == _DISCARD_STATE:
                    take = min(self._remaining, end - pos)
                    pos += take
                    self._remaining -= take
                    if not self._remaining:
                        self._state = _HEADER_STATE
                elif self._state == _PAYLOAD_STATE:
                    take = min(self._remaining, end - pos)
                    self._parts.append(bytes(view[pos:pos + take]))
                    pos += take
                    self._remaining -= take
                    self._assembled += take
                    if not self._remaining:
                        assembled = b"".join(self._parts)
                        self._drop_payload()   # handed over: no longer ours to count
                        self._state = _HEADER_STATE
                        self._emit(frames, self._finish(self._fields, assembled))
                elif not self._header and end - pos >= HEADER_SIZE:
                    fields = _HEADER.unpack_from(view, pos)
                    length = fields[4]
                    pos += HEADER_SIZE  # consumed even when invalid: a recoverable error skips it
                    self._validate(fields)
                    if end - pos >= length:
                        if share and length >= PAYLOAD_COPY_THRESHOLD_BYTES:
                            payload: Any = view[pos:pos + length].toreadonly()
                        else:
                            payload = bytes(view[pos:pos + length])
                        pos += length
                        self._emit(frames, self._finish(fields, payload))
                    else:
                        self._start_payload(fields)
                else:
                    take = min(HEADER_SIZE - len(self._header), end - pos)
                    self._header += view[pos:pos + take]
                    pos += take
                    self._check_prefix()
                    if len(self._header) == HEADER_SIZE:
                        fields = _HEADER.unpack(self._header)
                        self._header = bytearray()
                        self._validate(fields)
                        if fields[4]:
                            self._start_payload(fields)
                        else:
                            self._emit(frames, self._finish(fields, b""))
        except ProtocolError as error:
            if not error.fatal:
                self._backlog = bytes(view[pos:])
            raise

    def _check_prefix(self) -> None:
        header = self._header
        if len(header) >= 2 and (header[0] << 8 | header[1]) != MAGIC:
            raise _errors.bad_magic_error(header[0] << 8 | header[1])
        if len(header) >= 3 and header[2] != VERSION_MAJOR:
            raise _errors.bad_version_error(header[2])

    def _validate(self, fields: tuple[int, ...]) -> None:
        magic, version, msg_type, flags, length, _, request_id = fields
        if magic != MAGIC:
            raise _errors.bad_magic_error(magic)
        if version >> 8 != VERSION_MAJOR:
            raise _errors.bad_version_error(version >> 8)
        if not 1 <= msg_type <= 4:
            raise _errors.bad_type_error(msg_type, request_id)
        if length > self._max_payload and not (
                length <= CONTROL_MAX_PAYLOAD_BYTES
                and (msg_type == 4 or (msg_type == 3 and request_id == 0))):
            raise _errors.too_large_error(length, self._max_payload, request_id, msg_type)
        if flags & ~KNOWN_FLAGS_MASK:
            if length:
                self._state, self._remaining = _DISCARD_STATE, length
            raise _errors.reserved_flags_error(flags, request_id, msg_type)

    def _emit(self, frames: list[Frame], frame: Frame) -> None:
        if self.skip_events and frame.type == 3 and not frame.flags and frame.request_id:
            self.events_skipped += 1
            self.frames_decoded += 1
        else:
            frames.append(frame)

    def _start_payload(self, fields: tuple[int, ...]) -> None:
        # A large payload takes its whole length from the budget first (so that a frame once
        # admitted can always complete), or is skipped and refused. Its pieces are kept as
        # they arrive: a peer that declares a large frame and stalls holds only what it sent.
        length = fields[4]
        if self.budget is not None and length > BUDGETED_FRAME_BYTES:
            if not self.budget.take(length):
                self._state, self._remaining = _DISCARD_STATE, length
                raise _errors.overloaded_error(length, self.budget.used, self.budget.limit,
                                               fields[6], fields[2])
            self._reserved = length
        self._fields = fields
        self._state = _PAYLOAD_STATE
        self._remaining = length

    @staticmethod
    def _finish(fields: tuple[int, ...], payload: Any) -> Frame:
        _, version, msg_type, flags, _, checksum, request_id = fields
        actual = binascii.crc_hqx(payload, 0xFFFF)
        if actual != checksum:
            raise _errors.checksum_error(checksum, actual, request_id, msg_type)
        return Frame(msg_type, flags, version, request_id, payload)
