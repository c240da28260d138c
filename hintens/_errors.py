"""Exceptions, and the table that ties each wire error code to them.

Two families, on purpose:

* ``ProtocolError`` subclasses are raised *here* when incoming bytes break the protocol
  (the decoder found a bad CRC, a bad header, ...). ``fatal`` says whether the byte stream
  can still be trusted: after a fatal error the connection must be closed.
* ``RemoteError`` subclasses are raised when the *peer* answered with an Error frame.

The Error frame payload is the bincode 1.x encoding of ``(code: u32, message: String)``:
``<u32 code LE><u64 byte length LE><UTF-8 bytes>``.
"""

from __future__ import annotations

import copy
import struct
from typing import Any, Sequence

from ._constants import ErrorCode

_ERROR_PREFIX = struct.Struct("<IQ")
#: Messages longer than this are cut when encoded, so an Error frame stays small.
MAX_ERROR_MESSAGE_BYTES = 4096


# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
class HintensError(Exception):
    """Base class of every exception hintens raises on its own."""

    __module__ = "hintens"


class ProtocolError(HintensError):
    """Incoming bytes broke the protocol.

    Attributes:
        code: the ``ErrorCode`` that answers this violation on the wire.
        request_id: the offending frame's request id, or None where the header was unreadable.
        msg_type: the offending frame's message type where it is a valid one, else None.
        frames: complete frames decoded, in the same ``feed`` call, before the bad one. They are
            delivered only here, exactly once.
        fatal: True when the stream cannot be resynchronised and the connection must close.
    """

    __module__ = "hintens"

    code: ErrorCode = ErrorCode.BAD_HEADER
    fatal: bool = True

    def __init__(self, message: str, request_id: int | None = None,
                 frames: Sequence[Any] = (), msg_type: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.msg_type = msg_type
        self.frames = list(frames)


class ChecksumError(ProtocolError):
    """The payload's CRC16 does not match the header. The stream stays in sync."""

    __module__ = "hintens"

    code = ErrorCode.CHECKSUM
    fatal = False


class BadHeaderError(ProtocolError):
    """Bad magic, an unsupported major version or an unknown message type."""

    __module__ = "hintens"

    code = ErrorCode.BAD_HEADER
    fatal = True


class FrameTooLargeError(ProtocolError):
    """The payload length is over the receiver's limit; nothing was allocated for it."""

    __module__ = "hintens"

    code = ErrorCode.TOO_LARGE
    fatal = True


class UnsupportedFlagsError(ProtocolError):
    """Reserved flag bits are set. The payload is skipped unread; the stream stays in sync."""

    __module__ = "hintens"

    code = ErrorCode.UNSUPPORTED_FLAGS
    fatal = False


class DecompressedTooLargeError(FrameTooLargeError):
    """A COMPRESSED payload would decompress past the receiver's limit. Nothing was inflated;
    the frame's boundaries are intact, so the connection goes on."""

    fatal = False


class OverloadedError(ProtocolError):
    """The receiver has no room for this frame now: buffering its payload would take the bytes
    held for unfinished frames over the receiver's bound (``max_pending_bytes``). The payload
    is skipped unread, the stream stays in sync, and a Request is answered UNAVAILABLE."""

    code = ErrorCode.UNAVAILABLE
    fatal = False


class ShmError(ProtocolError):
    """A shared-memory descriptor or file descriptor failed validation."""

    __module__ = "hintens"

    code = ErrorCode.SHM_ERROR
    fatal = False


class IncompleteFrameError(HintensError, EOFError):
    """The stream ended inside a frame.

    Attributes:
        pending_bytes: how many bytes of the unfinished frame had arrived.
    """

    __module__ = "hintens"

    def __init__(self, message: str, pending_bytes: int) -> None:
        super().__init__(message)
        self.pending_bytes = pending_bytes

    def __reduce__(self) -> Any:   # pickles rebuild it from its own arguments
        return type(self), (str(self), self.pending_bytes), self.__dict__


class Timeout(HintensError, TimeoutError):
    """An operation did not finish in time (connect, a request, a send).

    Attributes:
        request_sent: for a request, True when all of its frame had reached the kernel (the
            server may have run it), False when it never left whole (the server cannot have
            run it); None when the error is not about a request.
        request_id: the id of that request, or None.
    """

    __module__ = "hintens"

    request_sent: bool | None = None
    request_id: int | None = None


class ConnectionClosed(HintensError, ConnectionError):
    """The connection is gone: closed by either side, lost, or failed by a fatal error.

    Every request waiting on it raises this; ``__cause__`` holds the underlying reason.

    Attributes:
        request_sent: as for ``Timeout``. False makes a retry safe for any request.
        request_id: the id of that request, or None.
    """

    __module__ = "hintens"

    request_sent: bool | None = None
    request_id: int | None = None


def detached(error: BaseException, depth: int = 4) -> BaseException:
    """``error``, to be kept after it was raised (the cause of a connection's closing): a
    copy without a traceback, its own cause and context detached alike (``depth`` levels).

    The error itself gathers a traceback as it propagates, and so every frame it passes
    through, with what they hold: the client (whose closing reason keeps the error, a
    reference cycle) and the payload of the call that failed. Kept as it is, all of that
    would live until a full garbage collection. An error that cannot be copied is kept
    as it is.
    """
    try:
        twin = copy.copy(error)
    except Exception:   # an exception class whose state does not reduce
        return error
    if depth > 1:
        if error.__cause__ is not None:
            twin.__cause__ = detached(error.__cause__, depth - 1)
        elif error.__context__ is not None and not error.__suppress_context__:
            twin.__context__ = detached(error.__context__, depth - 1)
    return twin


def closed_error(reason: BaseException, path: str) -> ConnectionClosed:
    """A new ConnectionClosed for one more caller of a connection that ``reason`` closed:
    the same words, and the same underlying cause."""
    error = ConnectionClosed(str(reason) if isinstance(reason, ConnectionClosed)
                             else f"connection to {path} closed: {reason}")
    error.__cause__ = reason.__cause__ if isinstance(reason, ConnectionClosed) else reason
    return error


def no_free_segment(pool: Any, waited: bool = True) -> Timeout:
    """The Timeout of a send or ``allocate`` that found every shared-memory segment of its
    connection's pool lent out (``waited``: until its deadline)."""
    state = f"{pool.total_bytes} of {pool.max_bytes} bytes lent out"
    if waited:
        return Timeout(f"no shared-memory segment came free in time ({state})")
    return Timeout(f"no shared-memory segment is free ({state})")


def lost_message(path: str, server_error: BaseException | None, aborted: str | None,
                 error: OSError | None, before_hello: bool = False) -> str:
    """Why a client's connection ended: the server's own word where it gave one (an Error
    frame about the connection), the reason we cut it, or what the socket said (None: the
    server closed it). ``before_hello``: a TCP server hung up before its hello, which is
    what a TLS server does to a client that speaks no TLS: said as a hint."""
    if server_error is not None:
        return f"server at {path} closed the connection: {server_error}"
    if aborted is not None:
        return f"connection to {path} cut: {aborted}"
    hint = (" before its hello (is it a TLS port? then pass ssl_context=)"
            if before_hello and path.startswith("tcp://") else "")
    if error is None:
        return f"server at {path} closed the connection{hint}"
    return f"connection to {path} lost: {error.strerror or error}{hint}"


class ConnectError(HintensError, ConnectionError):
    """No connection could be made: no socket file, nobody listening, or no permission."""

    __module__ = "hintens"


class UntrustedServerError(ConnectError):
    """The process listening on the socket runs as a user this client does not trust
    (SO_PEERCRED): not our own uid, not root, and not in ``server_uids``. Nothing was sent."""

    __module__ = "hintens"


class SocketPathError(HintensError, ValueError):
    """The socket path cannot be used (too long for the OS, or not a socket)."""

    __module__ = "hintens"


class ServerRunningError(HintensError, OSError):
    """Another server is alive on the socket path; it was left alone."""

    __module__ = "hintens"


class RemoteError(HintensError):
    """The peer answered with an Error frame.

    Attributes:
        code: the error code (an ``ErrorCode`` where known, else the plain int).
        message: the peer's message.
        request_id: the request the error answers.
    """

    __module__ = "hintens"

    def __init__(self, code: int, message: str, request_id: int | None = None) -> None:
        try:
            code = ErrorCode(code)
        except ValueError:
            pass
        super().__init__(f"[{code_name(code)}] {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    def __reduce__(self) -> Any:
        # Pickles (a process pool's results, say) rebuild it from its own arguments, and
        # keep what was set on it since (request_sent, for one).
        return type(self), (int(self.code), self.message, self.request_id), self.__dict__


class RemoteProtocolError(RemoteError):
    """The peer rejected our frame as a protocol violation (codes 1-4 and 7)."""

    __module__ = "hintens"


class HandlerError(RemoteError):
    """The peer's handler raised while serving the request (code 5)."""

    __module__ = "hintens"


class RemoteTimeoutError(RemoteError):
    """The peer gave up on the request in time (code 6)."""

    __module__ = "hintens"


class UnavailableError(RemoteError):
    """The peer cannot serve the request now, for example while shutting down (code 8)."""

    __module__ = "hintens"


#: code -> (exception raised locally on detection, exception raised when a peer reports it).
ERROR_TABLE: dict[ErrorCode, tuple[type[ProtocolError] | None, type[RemoteError]]] = {
    ErrorCode.CHECKSUM: (ChecksumError, RemoteProtocolError),
    ErrorCode.BAD_HEADER: (BadHeaderError, RemoteProtocolError),
    ErrorCode.TOO_LARGE: (FrameTooLargeError, RemoteProtocolError),
    ErrorCode.UNSUPPORTED_FLAGS: (UnsupportedFlagsError, RemoteProtocolError),
    ErrorCode.HANDLER_ERROR: (None, HandlerError),
    ErrorCode.TIMEOUT: (None, RemoteTimeoutError),
    ErrorCode.SHM_ERROR: (ShmError, RemoteProtocolError),
    ErrorCode.UNAVAILABLE: (OverloadedError, UnavailableError),
}


def code_name(code: int) -> str:
    """Return the symbolic name of an error code, or ``APP_<n>``/``UNKNOWN_<n>``."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"APP_{code}" if code >= 1000 else f"UNKNOWN_{code}"


def remote_error(code: int, message: str, request_id: int | None = None) -> RemoteError:
    """Build the ``RemoteError`` subclass that matches a code received in an Error frame.

    Args:
        code: the u32 code from the Error payload.
        message: the message from the Error payload.
        request_id: the request id of the Error frame.

    Returns:
        An instance of the matching ``RemoteError`` subclass (plain ``RemoteError`` for
        application and unknown codes).
    """
    entry = ERROR_TABLE.get(code)  # type: ignore[call-overload]
    cls = entry[1] if entry is not None else RemoteError
    return cls(code, message, request_id)


def encode_error_payload(code: int, message: str) -> bytes:
    """Encode an Error frame payload: bincode ``(u32, String)``.

    Args:
        code: 0 <= code < 2**32.
        message: text; cut to 4096 bytes of UTF-8 on a character boundary.

    Returns:
        The payload bytes.

    Raises:
        OverflowError: the code does not fit a u32.
    """
    if not 0 <= code <= 0xFFFFFFFF:
        raise OverflowError(f"error code {code} does not fit a u32")
    text = message.encode("utf-8", "surrogatepass")[:MAX_ERROR_MESSAGE_BYTES]
    text = text.decode("utf-8", "ignore").encode("utf-8")  # never end mid-character
    return _ERROR_PREFIX.pack(code, len(text)) + text


def decode_error_payload(payload: Any) -> tuple[int, str]:
    """Decode an Error frame payload.

    Args:
        payload: a bytes-like object.

    Returns:
        ``(code, message)``. Invalid UTF-8 in the message is replaced, never fatal: the error
        itself is what the caller needs to see.

    Raises:
        ValueError: the payload is shorter than its prefix, its length field disagrees with
            its size, or it has trailing bytes.
    """
    data = memoryview(payload).cast("B")
    if len(data) < _ERROR_PREFIX.size:
        raise ValueError(f"error payload of {len(data)} bytes is shorter than its 12-byte prefix")
    code, length = _ERROR_PREFIX.unpack_from(data)
    if length != len(data) - _ERROR_PREFIX.size:
        raise ValueError(
            f"error payload says its message has {length} bytes, but {len(data) - 12} follow")
    return code, bytes(data[_ERROR_PREFIX.size:]).decode("utf-8", "replace")


# Constructors for the decoder's errors. Both core implementations call these, so the two
# raise identical exceptions with identical messages. They run only on the error path.

def bad_magic_error(magic: int) -> BadHeaderError:
    return BadHeaderError(f"bad magic 0x{magic:04x}: not a hintens frame (expected 0x4850 'HP')")


def bad_version_error(major: int) -> BadHeaderError:
    return BadHeaderError(f"unsupported protocol major version {major} (this peer speaks 1.x)")


def bad_type_error(msg_type: int, request_id: int) -> BadHeaderError:
    return BadHeaderError(f"unknown message type {msg_type} (expected 1-4)", request_id)


def too_large_error(length: int, limit: int, request_id: int,
                    msg_type: int) -> FrameTooLargeError:
    return FrameTooLargeError(
        f"payload of {length} bytes is over this receiver's limit of {limit} bytes", request_id,
        msg_type=msg_type)


def overloaded_error(length: int, used: int, limit: int, request_id: int,
                     msg_type: int) -> OverloadedError:
    return OverloadedError(
        f"no room for a {length}-byte frame now: {used} of the {limit} bytes this receiver "
        f"holds for unfinished frames are taken; try again later", request_id,
        msg_type=msg_type)


def no_memory_error(length: int, request_id: int, msg_type: int) -> OverloadedError:
    return OverloadedError(f"no memory for a {length}-byte frame now; try again later",
                           request_id, msg_type=msg_type)


def reserved_flags_error(flags: int, request_id: int, msg_type: int) -> UnsupportedFlagsError:
    return UnsupportedFlagsError(
        f"reserved flag bits 0x{flags & ~0x0003 & 0xFFFF:04x} are set (flags 0x{flags:04x})",
        request_id, msg_type=msg_type)


def checksum_error(expected: int, actual: int, request_id: int, msg_type: int) -> ChecksumError:
    return ChecksumError(
        f"payload CRC16 is 0x{actual:04x} but the header says 0x{expected:04x}", request_id,
        msg_type=msg_type)


def renew(error: ProtocolError) -> ProtocolError:
    """A fresh copy of a fatal error, raised again by a decoder that already failed."""
    return type(error)(error.message, error.request_id, msg_type=error.msg_type)


# The public names, as for the classes above: help(), tracebacks and pickles show hintens.X
# (hintens.wire.X), not this private module.
remote_error.__module__ = "hintens"
encode_error_payload.__module__ = "hintens.wire"
decode_error_payload.__module__ = "hintens.wire"
