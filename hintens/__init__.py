"""hintens: fast message passing between processes on one machine.

The application API lives here, and the wire format (headers, CRC16, frames, the decoder) in
``hintens.wire``; every module behind them is private. See README.md for a tour and
docs/PROTOCOL.md for the wire format.
"""

from __future__ import annotations

from ._constants import DEFAULT_MAX_PAYLOAD_BYTES, FIRST_APPLICATION_ERROR_CODE, ErrorCode
# wire before anything that imports _impl: hintens.wire's __init__ takes its names from
# _impl.core, and loading the core imports hintens.wire._wire, which runs that __init__ first
# if it has not started yet, in the middle of _impl, before core is set.
from . import wire
from . import bincode
from .sync.client import Client, Session
from .sync.coded import CodedClient
from ._codecs import BincodeCodec, Codec, JsonCodec, PickleCodec, RawCodec
from ._errors import (
    BadHeaderError,
    ChecksumError,
    ConnectError,
    ConnectionClosed,
    FrameTooLargeError,
    HandlerError,
    HintensError,
    IncompleteFrameError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    RemoteTimeoutError,
    ServerRunningError,
    ShmError,
    SocketPathError,
    Timeout,
    UnavailableError,
    UnsupportedFlagsError,
    UntrustedServerError,
    remote_error,
)
from ._impl import implementation
from ._retry import NO_RETRY, RetryPolicy
from .sync.pool import ClientPool
from .protocol.hello import Hello
from .sync.server import Server, ServerConnection
from .transport.unix import PeerCredentials

# Wire-level names live in hintens.wire; these old spellings still work, with a warning.
_MOVED_TO_WIRE = frozenset({
    "HEADER_SIZE", "MAGIC", "VERSION", "Flags", "MessageType", "Frame", "FrameDecoder",
    "FrameHeader", "crc16", "crc16_backend", "decode_error_payload", "encode_error_payload",
    "encode_frame", "encode_header", "pack_header_into", "unpack_header"})


def __getattr__(name: str) -> object:
    if name in _MOVED_TO_WIRE:
        import warnings

        warnings.warn(f"hintens.{name} is hintens.wire.{name} now", DeprecationWarning,
                      stacklevel=2)
        return getattr(wire, name)
    raise AttributeError(f"module 'hintens' has no attribute {name!r}")


try:
    from ._version import version as __version__
except ImportError:  # a source tree that setuptools-scm never wrote to
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "FIRST_APPLICATION_ERROR_CODE",
    "BadHeaderError",
    "BincodeCodec",
    "ChecksumError",
    "Client",
    "ClientPool",
    "CodedClient",
    "Codec",
    "ConnectError",
    "ConnectionClosed",
    "ErrorCode",
    "FrameTooLargeError",
    "HandlerError",
    "Hello",
    "HintensError",
    "IncompleteFrameError",
    "JsonCodec",
    "NO_RETRY",
    "PeerCredentials",
    "PickleCodec",
    "ProtocolError",
    "RawCodec",
    "RemoteError",
    "RemoteProtocolError",
    "RemoteTimeoutError",
    "RetryPolicy",
    "Server",
    "ServerConnection",
    "ServerRunningError",
    "Session",
    "ShmError",
    "SocketPathError",
    "Timeout",
    "UnavailableError",
    "UnsupportedFlagsError",
    "UntrustedServerError",
    "__version__",
    "bincode",
    "wire",
    "implementation",
    "remote_error",
]
