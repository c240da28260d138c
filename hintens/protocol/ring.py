"""The shared-memory ring's protocol rules (docs/PROTOCOL.md section 9b), sans-IO: the switch
frame (HRNG) each side sends as its last frame on the socket, and the order of the switch.

* Both hellos announce FEATURE_RING (bit 2): the ring is negotiated.
* The server (the side that accepted the connection) then creates the ring and sends HRNG,
  with the ring's memfd on its first byte; everything it sends after that goes into the ring.
* The client, on the server's HRNG, reads from the ring from then on, and sends its own HRNG
  (without a descriptor), after which everything it sends goes into the ring.
* The server, on the client's HRNG, reads from the ring from then on.

An HRNG is the last frame its sender puts on the socket: a frame after it there, an HRNG that
was not negotiated, a second one, or one that does not match what the server offered is a
fatal violation. The mapping itself, its waits and its carriers are the transport's
(hintens/transport/ring.py and the core Channel).
"""

from __future__ import annotations

import struct
from typing import Any

RING_MAGIC = b"HRNG"
#: The layout version PROTOCOL.md section 9b describes.
RING_LAYOUT_VERSION = 2
#: A ring's capacity (bytes per direction) is a power of two within these.
MIN_RING_CAPACITY = 4096
MAX_RING_CAPACITY = 64 * 1024 * 1024
#: What a hintens server offers unless told otherwise: the socket's usual buffer, about.
DEFAULT_RING_CAPACITY = 256 * 1024
#: The header page in front of the two rings' data.
RING_HEADER_BYTES = 4096
_SWITCH = struct.Struct("<4sIQ")
#: Bytes of an HRNG payload.
RING_SWITCH_BYTES = _SWITCH.size


def check_capacity(capacity: int) -> int:
    """``capacity`` if it is a valid ring capacity.

    Raises:
        ValueError: not a power of two within MIN_RING_CAPACITY..MAX_RING_CAPACITY.
    """
    if not (MIN_RING_CAPACITY <= capacity <= MAX_RING_CAPACITY) or capacity & (capacity - 1):
        raise ValueError(f"a ring's capacity must be a power of two from {MIN_RING_CAPACITY} "
                         f"to {MAX_RING_CAPACITY} bytes, not {capacity}")
    return capacity


def ring_bytes(capacity: int) -> int:
    """The size of the memfd that holds a ring of ``capacity`` bytes per direction."""
    return RING_HEADER_BYTES + 2 * capacity


def encode_switch(capacity: int) -> bytes:
    """An HRNG payload: the magic, the layout version, the capacity."""
    return _SWITCH.pack(RING_MAGIC, RING_LAYOUT_VERSION, capacity)


def is_switch(payload: Any) -> bool:
    """The control Event's payload is an HRNG (of any shape)."""
    return bytes(payload[:4]) == RING_MAGIC


def decode_switch(payload: Any) -> int:
    """The capacity an HRNG payload names.

    Raises:
        ValueError: not 16 bytes, another layout version, or a capacity out of range.
    """
    if len(payload) != RING_SWITCH_BYTES:
        raise ValueError(f"an HRNG payload is {RING_SWITCH_BYTES} bytes, not {len(payload)}")
    _, version, capacity = _SWITCH.unpack(bytes(payload))
    if version != RING_LAYOUT_VERSION:
        raise ValueError(f"ring layout version {version}; this side knows "
                         f"{RING_LAYOUT_VERSION}")
    return check_capacity(capacity)
