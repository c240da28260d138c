"""The wire format, for those who write their own transport or peer (docs/PROTOCOL.md):
frame headers, CRC16, whole frames, the incremental decoder, and Error payloads.

Backed by the compiled wire kernels, or by their pure-Python twin where the extensions are not
built (``hintens.implementation`` says which); both give the same results and raise the same
errors. The application API above them (Client, Server, ...) is at the top level,
``hintens``.
"""

from __future__ import annotations

from .._constants import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ErrorCode,
    Flags,
    MessageType,
)
from .._errors import (
    BadHeaderError,
    ChecksumError,
    IncompleteFrameError,
    ProtocolError,
    decode_error_payload,
    encode_error_payload,
)
from .._impl import core as _core

#: CRC-16/CCITT-FALSE of a buffer (the frame checksum), continuing from ``value``.
crc16 = _core.crc16
#: Which CRC16 kernel the core runs (for example ``"vpclmulqdq-avx2"``).
crc16_backend = _core.crc16_backend
#: The 24-byte header for a payload: ``encode_header(msg_type, payload, request_id, flags=0)``.
encode_header = _core.encode_header
#: A whole frame, header and payload: ``encode_frame(msg_type, payload, request_id, flags=0)``.
encode_frame = _core.encode_frame
#: Write a header into a buffer at an offset, from its fields.
pack_header_into = _core.pack_header_into
#: Read and check the header at an offset of a buffer: a ``FrameHeader``.
unpack_header = _core.unpack_header
Frame = _core.Frame
FrameHeader = _core.FrameHeader
FrameDecoder = _core.FrameDecoder

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "BadHeaderError",
    "ChecksumError",
    "ErrorCode",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "IncompleteFrameError",
    "MessageType",
    "ProtocolError",
    "crc16",
    "crc16_backend",
    "decode_error_payload",
    "encode_error_payload",
    "encode_frame",
    "encode_header",
    "pack_header_into",
    "unpack_header",
]
