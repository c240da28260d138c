"""Wire constants shared by the compiled core and its pure-Python twin.

Every number here is fixed by docs/PROTOCOL.md; change them only together with that file.
"""

from __future__ import annotations

import enum
import socket

#: Size in bytes of the fixed frame header.
HEADER_SIZE = 24
#: First two bytes of every frame: ASCII "HP".
MAGIC = 0x4850
#: Protocol version this package speaks: major 1, minor 0.
VERSION = 0x0100
#: Major version accepted from peers (any minor of it is accepted).
VERSION_MAJOR = 1
#: Largest payload the length field can describe.
MAX_FRAME_PAYLOAD_BYTES = 0xFFFFFFFF
#: Default payload limit of a FrameDecoder.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
#: Error frames and control Events (Events with request id 0) are accepted up to this size
#: whatever the receiver's limit: an Error payload is at most 12 + 4096 bytes, a release or
#: retire at most 8 + 4 * 1024, a hello at most 4096.
CONTROL_MAX_PAYLOAD_BYTES = 12 + 4096
#: Unfinished frames whose payload is larger than this count against a decoder's MemoryBudget
#: (max_pending_bytes); smaller ones are not worth the bookkeeping.
BUDGETED_FRAME_BYTES = 64 * 1024
#: Payloads shorter than this are copied out of the receive buffer into a new ``bytes``;
#: longer ones are returned as read-only memoryviews sharing it (when it is immutable).
PAYLOAD_COPY_THRESHOLD_BYTES = 1024

# Batching of small frames (not wire-visible).
#: Seconds an Event may wait in a connection's queue for more frames to share its write.
DEFAULT_FLUSH_INTERVAL_S = 0.001
#: Queued bytes past which the thread that queues more writes them out itself (and waits).
DEFAULT_MAX_QUEUE_BYTES = 1024 * 1024
#: Queued bytes from which a write starts without waiting for the flush interval.
BATCH_WRITE_BYTES = 64 * 1024


# __module__ is the public name (hintens.wire.X; hintens.ErrorCode): help() and pickles show it.
class MessageType(enum.IntEnum):
    """The message type field (header offset 4, u32)."""

    __module__ = "hintens.wire"

    REQUEST = 1
    RESPONSE = 2
    EVENT = 3
    ERROR = 4


#: The message types as plain ints, for per-frame tests on hot paths: looking up an IntEnum
#: member and comparing with it costs about seven times an int's (80 ns against 11).
REQUEST, RESPONSE, EVENT, ERROR = (int(MessageType.REQUEST), int(MessageType.RESPONSE),
                                   int(MessageType.EVENT), int(MessageType.ERROR))


class Flags(enum.IntFlag):
    """The flags field (header offset 8, u16). Every other bit is reserved and must be zero."""

    __module__ = "hintens.wire"

    NONE = 0
    SHM = 0x0001
    COMPRESSED = 0x0002


#: Bits of the flags field that a peer may set.
KNOWN_FLAGS_MASK = int(Flags.SHM | Flags.COMPRESSED)


class ErrorCode(enum.IntEnum):
    """Codes carried by Error frames. Codes of 1000 and above belong to applications."""

    __module__ = "hintens"

    CHECKSUM = 1
    BAD_HEADER = 2
    TOO_LARGE = 3
    UNSUPPORTED_FLAGS = 4
    HANDLER_ERROR = 5
    TIMEOUT = 6
    SHM_ERROR = 7
    UNAVAILABLE = 8


#: First error code free for applications.
FIRST_APPLICATION_ERROR_CODE = 1000

#: Payloads at least this large leave as header + payload in one sendmsg, without a copy;
#: smaller ones are packed into the connection's outbox (the protocol's ``small_max``).
SCATTER_THRESHOLD_BYTES = 16 * 1024
#: Bytes a connection reads from its socket at once (its receive buffer).
RECEIVE_BUFFER_BYTES = 256 * 1024

#: Upper bounds (seconds) of the handler-time buckets that stats report; one more bucket
#: holds what is slower than the last.
HANDLER_BUCKETS_S = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)

# Socket flags as plain ints: operators on the socket module's MsgFlag enum members run enum
# code in Python, microseconds a call on the pure-Python (and TLS) paths.
MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
MSG_CTRUNC = int(socket.MSG_CTRUNC)
