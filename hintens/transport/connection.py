"""What the sync front ends share about one connection: a socket, its core Channel (the
transport) and its Endpoint (the protocol rules), wired the same way for a Client and for a
server's connection.
"""

from __future__ import annotations

import socket
from typing import Any

from .. import _impl
from .._constants import RECEIVE_BUFFER_BYTES
from .flusher import FLUSHER
from ..protocol.endpoint import Endpoint, control_sender

#: Descriptors one connection's reads accept when shared memory is on (each NEW_SEGMENT
#: frame brings one); more are closed on arrival.
SHM_MAX_FDS = 64


def open_channel(sock: socket.socket, endpoint: Endpoint, *, shm: bool,
                 stall_timeout: float | None) -> Any:
    """The core Channel over ``sock`` that reads with ``endpoint``'s decoder.

    The endpoint's control Events (releases, retirements) go out through the channel's
    queue; what the socket will not take now, and Events left waiting, are written by the
    flusher, which also cuts the connection when its peer reads nothing for
    ``stall_timeout`` seconds (None: never) while bytes wait for it.
    """
    channel = _impl.core.Channel(sock, endpoint.decoder, RECEIVE_BUFFER_BYTES)
    endpoint.send_control = control_sender(channel)
    if shm:
        channel.max_fds = SHM_MAX_FDS
    channel.stall_timeout = stall_timeout or 0.0
    channel.on_queued = FLUSHER.schedule
    return channel
