"""The pure-Python core as one namespace: the twins of the wire kernels
(``hintens.wire._wire_py``) and of the socket transport (``hintens.transport._channel_py``),
with the same names as ``hintens._cython_core``. ``hintens._impl`` picks one of the two.
"""

from __future__ import annotations

from .transport._channel_py import (
    DRIVES_TLS,
    SEES_VIEW_RELEASE,
    Channel,
    Mapping,
    Ring,
    SharedRegion,
    call_with_stack_size,
)
from .wire._wire_py import (
    Frame,
    FrameDecoder,
    FrameHeader,
    MemoryBudget,
    crc16,
    crc16_backend,
    encode_frame,
    encode_header,
    pack_header_into,
    unpack_header,
)

__all__ = [
    "Channel",
    "DRIVES_TLS",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "Mapping",
    "Ring",
    "MemoryBudget",
    "SEES_VIEW_RELEASE",
    "SharedRegion",
    "call_with_stack_size",
    "crc16",
    "crc16_backend",
    "encode_frame",
    "encode_header",
    "pack_header_into",
    "unpack_header",
]
