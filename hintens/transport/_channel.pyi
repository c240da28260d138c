# Type stub of the compiled socket transport; hintens/transport/_channel_py.py is its
# pure-Python twin with the same API.
from typing import Any

from ._channel_py import Channel as Channel
from ._channel_py import Mapping as Mapping
from ._channel_py import SharedRegion as SharedRegion

__all__: list[str]
SEES_VIEW_RELEASE: bool
DRIVES_TLS: bool

def call_with_stack_size(stack_bytes: int, function: Any, *args: Any) -> Any: ...

RING_HEADER_BYTES: int
RING_MIN_CAPACITY: int
RING_MAX_CAPACITY: int
RING_LIVENESS_S: float
RING_SPIN_MAX_S: float
RING_LAYOUT_VERSION: int
RING_CARRIER_BYTES: int

class Ring:
    """A connection's shared-memory ring, mapped (compiled core only)."""

    creator: bool
    carriers_received: int
    def __init__(self, fd: int, capacity: int, sock: Any, creator: bool) -> None: ...
    @property
    def capacity(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def header(self) -> bytes: ...
    def close_tx(self) -> None: ...
    def shut(self) -> None: ...
    def _shared(self) -> memoryview: ...
