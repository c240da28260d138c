"""Sans-IO connection layer: bytes in, frames and protocol errors out. No sockets here.

Rules (docs/PROTOCOL.md sections 5, 6 and 8):

* An Event with request id 0 is a capability hello. A hello we understand updates
  ``peer_hello``; one we do not understand is ignored. Neither reaches the application.
* A flag the connection did not negotiate (SHM, COMPRESSED) is an UNSUPPORTED_FLAGS violation,
  exactly like a reserved bit.
* Every violation comes out of ``receive`` as a ``ProtocolError`` item in stream order.
  ``error_reply`` says what, if anything, goes back to the peer, and ``error.fatal`` says
  whether the connection must close afterwards.
"""

from __future__ import annotations

import struct
from typing import Any, Union

from . import _impl
from ._constants import DEFAULT_MAX_PAYLOAD_BYTES, Flags, MessageType, VERSION
from ._errors import ProtocolError, UnsupportedFlagsError, encode_error_payload

HELLO_MAGIC = b"HELO"
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
#: A hello larger than this, or with more entries, is not understood (and so ignored).
MAX_HELLO_BYTES = 4096
MAX_HELLO_ENTRIES = 64


class HelloKey:
    """Keys of the hello's entries. Unknown keys are skipped by receivers."""

    MINOR = 1          # u8: highest minor version of major 1 the sender speaks
    FEATURES = 2       # u32 LE bit set, see FEATURE_*
    MAX_PAYLOAD = 3    # u32 LE: largest inline payload the sender accepts
    SESSION_ID = 4     # 16 bytes: reserved for client sessions that survive reconnects


FEATURE_SHM = 0x1
FEATURE_COMPRESSION = 0x2


class Hello:
    """What one side announces right after connecting.

    Attributes:
        minor: the highest minor version of protocol major 1 that the sender speaks.
        features: ``FEATURE_*`` bits the sender can receive.
        max_payload: the largest inline payload the sender accepts, in bytes.
        entries: every entry as received, including keys this version does not know.
    """

    __slots__ = ("minor", "features", "max_payload", "entries")

    def __init__(self, minor: int = VERSION & 0xFF, features: int = 0,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 entries: dict[int, bytes] | None = None) -> None:
        self.minor = minor
        self.features = features
        self.max_payload = max_payload
        self.entries = dict(entries or {})

    def encode(self) -> bytes:
        """The hello payload: bincode ``([u8; 4], Vec<(u16, Vec<u8>)>)``."""
        entries = dict(self.entries)
        entries[HelloKey.MINOR] = bytes([self.minor])
        entries[HelloKey.FEATURES] = _U32.pack(self.features)
        entries[HelloKey.MAX_PAYLOAD] = _U32.pack(self.max_payload)
        parts = [HELLO_MAGIC, _U64.pack(len(entries))]
        for key in sorted(entries):
            value = entries[key]
            parts += [_U16.pack(key), _U64.pack(len(value)), value]
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: Any) -> Hello | None:
        """Parse a hello payload; None when it is not one this version understands."""
        data = bytes(payload)
        if len(data) > MAX_HELLO_BYTES or not data.startswith(HELLO_MAGIC) or len(data) < 12:
            return None
        (count,) = _U64.unpack_from(data, 4)
        if count > MAX_HELLO_ENTRIES:
            return None
        pos, entries = 12, {}
        for _ in range(count):
            if len(data) - pos < 10:
                return None
            (key,) = _U16.unpack_from(data, pos)
            (length,) = _U64.unpack_from(data, pos + 2)
            pos += 10
            if length > len(data) - pos or key in entries:
                return None
            entries[key] = data[pos:pos + length]
            pos += length
        if pos != len(data):
            return None
        try:
            minor = entries[HelloKey.MINOR][0] if HelloKey.MINOR in entries else 0
            features = _U32.unpack(entries.get(HelloKey.FEATURES, bytes(4)))[0]
            max_payload = (_U32.unpack(entries[HelloKey.MAX_PAYLOAD])[0]
                           if HelloKey.MAX_PAYLOAD in entries else DEFAULT_MAX_PAYLOAD_BYTES)
        except (struct.error, IndexError):
            return None
        return cls(minor, features, max_payload, entries)

    def __repr__(self) -> str:
        return (f"Hello(minor={self.minor}, features=0x{self.features:x}, "
                f"max_payload={self.max_payload})")


#: A peer that never sends a hello gets inline frames only, within the default limit.
SILENT_PEER = Hello(minor=0, features=0, max_payload=DEFAULT_MAX_PAYLOAD_BYTES)

Item = Union[Any, ProtocolError]   # a core Frame, or a violation


class Endpoint:
    """One side of a connection, without I/O.

    Args:
        max_payload: the largest inline payload accepted from the peer.
        features: ``FEATURE_*`` bits this side announces and can receive.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, features: int = 0) -> None:
        core = _impl.core
        self._frame_type = core.Frame
        self._encode_frame = core.encode_frame
        self.decoder = core.FrameDecoder(max_payload)
        self.hello = Hello(features=features, max_payload=max_payload)
        self.peer_hello: Hello | None = None
        self._allowed_flags = 0   # flags the peer may set: grows as features are negotiated

    @property
    def peer(self) -> Hello:
        """The peer's hello, or what is assumed of a peer that sent none."""
        return self.peer_hello or SILENT_PEER

    def negotiated(self, feature: int) -> bool:
        """Both sides announced ``feature``."""
        return bool(self.hello.features & self.peer.features & feature)

    def hello_frame(self) -> bytes:
        """The frame announcing this side's capabilities (Event, request id 0)."""
        return self._encode_frame(MessageType.EVENT, self.hello.encode(), 0)

    def receive(self, data: Any) -> list[Item]:
        """Decode ``data``; return frames for the application and violations, in stream order."""
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as error:
            return self.after_error(error)
        return self.admit(frames)

    def admit(self, frames: list[Any]) -> list[Item]:
        """Apply the connection's rules (hello, negotiated flags) to frames already decoded."""
        for frame in frames:   # frames without flags or a hello pass through as they are
            if frame.flags or not frame.request_id:
                items: list[Item] = []
                self._admit(frames, items)
                return items
        return frames

    def after_error(self, error: ProtocolError) -> list[Item]:
        """The items around a violation the decoder raised: the frames before it, the error,
        and, when the stream is still in sync, whatever was already buffered after it."""
        items: list[Item] = []
        while True:
            self._admit(error.frames, items)
            items.append(error)
            if error.fatal:
                return items
            try:
                items += self.admit(self.decoder.feed(b""))
                return items
            except ProtocolError as next_error:
                error = next_error

    def _admit(self, frames: list[Any], items: list[Item]) -> None:
        allowed = self._allowed_flags
        for frame in frames:
            if frame.flags & ~allowed:
                items.append(UnsupportedFlagsError(
                    f"flags 0x{frame.flags:04x} were not negotiated on this connection",
                    frame.request_id, msg_type=frame.type))
            elif frame.type == MessageType.EVENT and frame.request_id == 0:
                hello = Hello.decode(frame.payload)
                if hello is not None:
                    self.peer_hello = hello
                    self._allowed_flags = self._negotiated_flags()
            else:
                items.append(frame)

    def _negotiated_flags(self) -> int:
        flags = 0
        if self.negotiated(FEATURE_SHM):
            flags |= Flags.SHM
        if self.negotiated(FEATURE_COMPRESSION):
            flags |= Flags.COMPRESSED
        return int(flags)

    def error_frame(self, code: int, message: str, request_id: int) -> bytes:
        """An Error frame."""
        return self._encode_frame(MessageType.ERROR, encode_error_payload(code, message),
                                  request_id)

    def error_reply(self, error: ProtocolError) -> bytes | None:
        """The Error frame that answers a violation, or None where none is due.

        Fatal violations are always answered (request id 0 when it was unreadable) just before
        the connection closes. Recoverable ones are answered only for Requests.
        """
        if error.fatal or error.msg_type == MessageType.REQUEST:
            return self.error_frame(error.code, error.message, error.request_id or 0)
        return None
