"""The compiled core as one namespace, with the same names as its twin in
``hintens._python_core``. ``hintens._impl`` picks one of the two; importing this module fails
(ImportError) where the extension is not built. (For now the whole core lives in
``hintens.wire``.)
"""

from __future__ import annotations

from .wire._wire import (
    SEES_VIEW_RELEASE,
    Channel,
    Frame,
    FrameDecoder,
    FrameHeader,
    Mapping,
    MemoryBudget,
    SharedRegion,
    call_with_stack_size,
    crc16,
    crc16_backend,
    encode_frame,
    encode_header,
    pack_header_into,
    unpack_header,
)

__all__ = [
    "Channel",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "Mapping",
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
