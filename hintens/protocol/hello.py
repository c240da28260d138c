"""The hello: the first frame each side sends (an Event with request id 0), announcing its
protocol minor version, its features and its limits (docs/PROTOCOL.md section 5). Sans-IO:
encoding and decoding only."""

from __future__ import annotations

import struct
from typing import Any

from .._constants import DEFAULT_MAX_PAYLOAD_BYTES, VERSION

#: The most of a peer's shared memory one connection maps at once (hello key 6).
DEFAULT_SHM_RECEIVE_BYTES = 1 << 30
#: The most of a peer's segments one connection maps at once (hello key 7).
DEFAULT_SHM_RECEIVE_SEGMENTS = 64

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
    SESSION_ID = 4     # 16 bytes, client to server: a session that survives reconnects
    INSTANCE_ID = 5    # 16 bytes, server to client: this run of the server (its replay memory)
    SHM_RECEIVE_BYTES = 6      # u64 LE: most bytes of the peer's segments the sender maps
    SHM_RECEIVE_SEGMENTS = 7   # u32 LE: most segments of the peer's the sender maps


#: Known keys and the size their value must have; a value of another size is read as absent.
_HELLO_VALUE_SIZES = {HelloKey.MINOR: 1, HelloKey.FEATURES: 4, HelloKey.MAX_PAYLOAD: 4,
                      HelloKey.SESSION_ID: 16, HelloKey.INSTANCE_ID: 16,
                      HelloKey.SHM_RECEIVE_BYTES: 8, HelloKey.SHM_RECEIVE_SEGMENTS: 4}


FEATURE_SHM = 0x1
FEATURE_COMPRESSION = 0x2
#: The shared-memory ring (PROTOCOL.md section 9b): Unix sockets between processes of one host.
FEATURE_RING = 0x4


# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
class Hello:
    """What one side announces right after connecting.

    Attributes:
        minor: the highest minor version of protocol major 1 that the sender speaks.
        features: ``FEATURE_*`` bits the sender can receive.
        max_payload: the largest inline payload the sender accepts, in bytes.
        shm_receive_bytes: the most bytes of our segments the sender maps at once.
        shm_receive_segments: the most of our segments the sender maps at once.
        entries: every entry as received, including keys this version does not know.
    """

    __module__ = "hintens"

    __slots__ = ("minor", "features", "max_payload", "shm_receive_bytes",
                 "shm_receive_segments", "entries")

    def __init__(self, minor: int = VERSION & 0xFF, features: int = 0,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 entries: dict[int, bytes] | None = None, *,
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS) -> None:
        self.minor = minor
        self.features = features
        self.max_payload = max_payload
        self.shm_receive_bytes = shm_receive_bytes
        self.shm_receive_segments = shm_receive_segments
        self.entries = dict(entries or {})

    def encode(self) -> bytes:
        """The hello payload: bincode ``([u8; 4], Vec<(u16, Vec<u8>)>)``, keys in order."""
        entries = dict(self.entries)
        entries[HelloKey.MINOR] = bytes([self.minor])
        entries[HelloKey.FEATURES] = _U32.pack(self.features)
        entries[HelloKey.MAX_PAYLOAD] = _U32.pack(self.max_payload)
        if self.features & FEATURE_SHM:
            entries[HelloKey.SHM_RECEIVE_BYTES] = _U64.pack(self.shm_receive_bytes)
            entries[HelloKey.SHM_RECEIVE_SEGMENTS] = _U32.pack(self.shm_receive_segments)
        parts = [HELLO_MAGIC, _U64.pack(len(entries))]
        for key in sorted(entries):
            value = entries[key]
            parts += [_U16.pack(key), _U64.pack(len(value)), value]
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: Any) -> Hello | None:
        """Parse a hello payload; None when it is not one this version understands.

        Keys may come in any order (senders send them in increasing order); a repeated key
        makes the hello not understood. A known key whose value has the wrong size counts as
        absent.
        """
        data = bytes(payload)
        if len(data) > MAX_HELLO_BYTES or not data.startswith(HELLO_MAGIC) or len(data) < 12:
            return None
        (count_,) = _U64.unpack_from(data, 4)
        if count_ > MAX_HELLO_ENTRIES:
            return None
        pos, entries = 12, {}
        for _ in range(count_):
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
        known = {key: value for key, value in entries.items()
                 if _HELLO_VALUE_SIZES.get(key) == len(value)}
        hello = cls(known[HelloKey.MINOR][0] if HelloKey.MINOR in known else 0,
                    _U32.unpack(known.get(HelloKey.FEATURES, bytes(4)))[0],
                    _U32.unpack(known[HelloKey.MAX_PAYLOAD])[0]
                    if HelloKey.MAX_PAYLOAD in known else DEFAULT_MAX_PAYLOAD_BYTES,
                    entries)
        if HelloKey.SHM_RECEIVE_BYTES in known:
            hello.shm_receive_bytes = _U64.unpack(known[HelloKey.SHM_RECEIVE_BYTES])[0]
        if HelloKey.SHM_RECEIVE_SEGMENTS in known:
            hello.shm_receive_segments = _U32.unpack(known[HelloKey.SHM_RECEIVE_SEGMENTS])[0]
        return hello

    def __repr__(self) -> str:
        return (f"Hello(minor={self.minor}, features=0x{self.features:x}, "
                f"max_payload={self.max_payload})")


#: A peer that never sends a hello gets inline frames only, within the default limit.
SILENT_PEER = Hello(minor=0, features=0, max_payload=DEFAULT_MAX_PAYLOAD_BYTES)
