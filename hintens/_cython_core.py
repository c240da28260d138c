"""The compiled core as one namespace: the wire kernels (``hintens.wire._wire``) and the
socket transport (``hintens.transport._channel``), with the same names as their twins in
``hintens._python_core``. ``hintens._impl`` picks one of the two; importing this module fails
(ImportError) where either extension is not built.
"""

from __future__ import annotations

from .transport._channel import (
    DRIVES_TLS,
    SEES_VIEW_RELEASE,
    Channel,
    Mapping,
    Ring,
    SharedRegion,
    call_with_stack_size,
)
from .wire._wire import (
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
    "MemoryBudget",
    "Ring",
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
