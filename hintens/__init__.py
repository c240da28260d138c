"""hintens: fast message passing between processes on one machine.

Public names live here; every module behind them is private. See README.md for a tour and
docs/PROTOCOL.md for the wire format.
"""

from __future__ import annotations

from ._constants import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    FIRST_APPLICATION_ERROR_CODE,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ErrorCode,
    Flags,
    MessageType,
)
from . import bincode
from ._client import Client, Session
from ._coded import CodedClient
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
    decode_error_payload,
    encode_error_payload,
    remote_error,
)
from ._impl import core as _core_impl
from ._impl import implementation
from ._pool import NO_RETRY, ClientPool, RetryPolicy
from ._protocol import Hello
from ._server import Server, ServerConnection
from ._unix import PeerCredentials

crc16 = _core_impl.crc16
crc16_backend = _core_impl.crc16_backend
encode_frame = _core_impl.encode_frame
encode_header = _core_impl.encode_header
pack_header_into = _core_impl.pack_header_into
unpack_header = _core_impl.unpack_header
Frame = _core_impl.Frame
FrameHeader = _core_impl.FrameHeader
FrameDecoder = _core_impl.FrameDecoder

try:
    from ._version import version as __version__
except ImportError:  # a source tree that setuptools-scm never wrote to
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "FIRST_APPLICATION_ERROR_CODE",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
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
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "FrameTooLargeError",
    "HandlerError",
    "Hello",
    "HintensError",
    "IncompleteFrameError",
    "JsonCodec",
    "MessageType",
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
    "crc16",
    "crc16_backend",
    "decode_error_payload",
    "encode_error_payload",
    "encode_frame",
    "encode_header",
    "implementation",
    "pack_header_into",
    "remote_error",
    "unpack_header",
]
