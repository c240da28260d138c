"""The sync driver of one connection, which a Client and a server's connection share.

It holds a socket, the core Channel over it (the transport: reads, decodes, writes and the
outgoing queue) and the Endpoint (the protocol rules), and moves data one way between them:
the Channel's frames go into the Endpoint, whose items go up to the front end; what the
front end and the Endpoint have to send goes down into the Channel. Nothing here knows what
a request, a reply or an Event means to the front end above it.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from time import monotonic
from typing import Any, Callable, TypeVar

from .. import _impl
from .._constants import RECEIVE_BUFFER_BYTES
from .._errors import ConnectionClosed, ProtocolError, ShmError, Timeout
from ..protocol.endpoint import FEATURE_RING, Endpoint, Item, Write, take_writes
from ..transport import ring as _ring
from ..transport.flusher import FLUSHER
from ..transport.unix import set_kernel_timeouts

#: Descriptors one connection's reads accept when shared memory is on (each NEW_SEGMENT
#: frame brings one); more are closed on arrival.
SHM_MAX_FDS = 64
#: A sender waiting for a shared-memory segment reads (or looks) again at least this often.
RELEASE_POLL_S = 0.05
# Control Events are never refused for room in the outgoing queue: small, and vital.
_UNBOUNDED = 1 << 62
_UNSET: Any = object()

_T = TypeVar("_T")
log = logging.getLogger("hintens")


def control_waker(channel: Any, outgoing: collections.deque[bytes]) -> Callable[[], None]:
    """What an Endpoint's ``on_writes`` is over a core Channel: it moves the control Events
    waiting in ``outgoing`` (the endpoint's queue) into the channel's outgoing queue, and
    does no I/O. A release can come from any thread that drops the last view of a payload,
    the garbage collector included, even one that holds the channel's send lock: this
    neither waits for that lock nor writes to the socket. The frames leave with the
    connection's next write, or the flusher's thread writes them at once. It holds the
    channel and the queue only, not the endpoint, so no reference cycle keeps a closed
    connection's memory alive."""

    def wake() -> None:
        writes = take_writes(outgoing)
        if writes:
            channel.offer(writes, _UNBOUNDED, False)

    return wake


def mark_sent(error: BaseException, channel: Any, live: bool, end: int, request_id: int,
              start: int | None = None) -> None:
    """Say on a failed request's error (a Timeout or ConnectionClosed) whether the server may
    have it: its frame left whole (for a batch from ``start``: any byte of it left), or it is
    still queued on an open connection (``live``) and may yet leave. False only when it never
    can; then any request may be retried safely.

    Args:
        end: the stream offset just past the request's frame (0: it was never queued).
    """
    if not isinstance(error, (Timeout, ConnectionClosed)) or error.request_sent is not None:
        return
    # After a failure the stream is shut, so a write in progress ends at once: wait for
    # it, or a frame the kernel took could be counted as unsent.
    written = channel.settled_written() if isinstance(error, ConnectionClosed) \
        else channel.written
    if start is not None:
        sent = written > start
    else:
        sent = bool(end) and written >= end
    if not sent and end and not (channel.closed or channel.broken or not live):
        sent = True   # still queued (or being written) on a live connection
    error.request_sent = sent
    error.request_id = request_id


class Connection:
    """One connection's socket, Channel and Endpoint, driven by the calling threads.

    Args:
        sock: a connected stream socket, blocking.
        endpoint: the protocol state for this connection.
        shm: shared memory (or a ring) is offered: reads then accept descriptors.
        stall_timeout: seconds the peer may read nothing while our bytes wait for it before
            the flusher cuts the connection (None: never).

    Attributes:
        sock, channel, endpoint: the socket, the core Channel over it, the Endpoint.
    """

    def __init__(self, sock: socket.socket, endpoint: Endpoint, *, shm: bool,
                 stall_timeout: float | None) -> None:
        self.sock = sock
        self.endpoint = endpoint
        # A TLS stream names the Channel that can drive it.
        channel_class = getattr(sock, "channel_class", None) or _impl.core.Channel
        self.channel = channel = channel_class(sock, endpoint.decoder, RECEIVE_BUFFER_BYTES)
        # Over TLS, what decrypted bytes wait (the channel's, when it drives OpenSSL itself):
        # looked up once, not on every read of a plain socket.
        pending = getattr(sock, "pending", None)
        self._pending: Callable[[], bool] | None = None if pending is None \
            else getattr(channel, "tls_pending", pending)
        if shm or endpoint.hello.features & FEATURE_RING:
            channel.max_fds = SHM_MAX_FDS
        channel.stall_timeout = stall_timeout or 0.0
        channel.on_queued = FLUSHER.schedule
        endpoint.on_writes = control_waker(channel, endpoint.outgoing)
        self._receive_timeout = _UNSET
        #: Until when a send may wait for the peer's hello (``monotonic``; the client sets
        #: it when it starts); past it, none is waited for.
        self.hello_by = 0.0
        self._ring_file: tuple[int, int] | None = None   # (st_dev, st_ino) of a ring we made

    # Reading -------------------------------------------------------------------------------

    @property
    def receive_timeout(self) -> float | None:
        """The receive timeout now on the socket (None: none)."""
        return None if self._receive_timeout is _UNSET else self._receive_timeout

    def set_receive_timeout(self, seconds: float | None) -> None:
        """Put a receive timeout on the socket (None: none); a system call only when it
        changes."""
        if seconds != self._receive_timeout:
            set_kernel_timeouts(self.sock, seconds)
            self._receive_timeout = seconds

    def read(self, flags: int = 0) -> list[Item] | None:
        """One read from the socket: the protocol's items for what it brought, in stream
        order ([]: no frame completed), or None at the end of the stream.

        Args:
            flags: for recvmsg (``socket.MSG_DONTWAIT``: do not wait).

        Raises:
            BlockingIOError: nothing came before the receive timeout (or, with MSG_DONTWAIT,
                nothing was waiting).
            OSError: the connection is lost.
        """
        channel = self.channel
        try:
            frames = channel.receive(flags)
        except ProtocolError as error:
            items = self.endpoint.after_error(error, channel.fds)
        else:
            if frames is None:
                return None
            items = self.endpoint.admit(frames, channel.fds) if frames else []
        self.drop_unclaimed()
        if self.endpoint.ring_step is not None:
            self._ring_step(items)
        return items

    def admit(self, frames: list[Any]) -> list[Item]:
        """Items for frames the channel decoded outside ``read`` (its fast paths)."""
        items = self.endpoint.admit(frames, self.channel.fds) if frames else []
        self.drop_unclaimed()
        if self.endpoint.ring_step is not None:
            self._ring_step(items)
        return items

    def after_error(self, error: ProtocolError) -> list[Item]:
        """Items around a violation a fast path of the channel raised."""
        items = self.endpoint.after_error(error, self.channel.fds)
        self.drop_unclaimed()
        if self.endpoint.ring_step is not None:
            self._ring_step(items)
        return items

    def _ring_step(self, items: list[Item]) -> None:
        """Do what the endpoint says the ring needs now (protocol/ring.py), before the next
        read: offer one, map the peer's and switch, or read from it. A ring that cannot be set
        up or mapped ends the connection: the peer's side of it is already switched.

        Raises:
            OSError: the switch frame could not be sent.
        """
        step, self.endpoint.ring_step = self.endpoint.ring_step, None
        assert step is not None
        channel, endpoint = self.channel, self.endpoint
        try:
            if step[0] == "offer":
                ring, fd = _ring.create(step[1], self.sock)
                try:
                    self._ring_file = _ring.identity(fd)
                    channel.switch_tx(ring, endpoint.ring_frame(step[1]), fd)
                finally:
                    os.close(fd)
            elif step[0] == "accept":
                try:
                    ring = _ring.attach(step[1], step[2], self.sock)
                    channel.switch_rx(ring)
                    # Our HRNG carries the ring's descriptor back: the kernel then ends the
                    # server's read at its last byte, so no carrier after it is read as
                    # stream bytes (and the server sees we mapped its ring).
                    try:
                        channel.switch_tx(ring, endpoint.ring_frame(step[2]), step[1])
                    except OSError as error:
                        # The server stopped reading (it is closing): what it sent is still
                        # read from the ring; our next write meets the same error.
                        log.debug("could not send our HRNG: %s", error)
                finally:
                    os.close(step[1])
            else:
                try:
                    same = _ring.identity(step[1]) == self._ring_file
                finally:
                    os.close(step[1])
                if not same:
                    raise ProtocolError("the client's HRNG came with another descriptor than "
                                        "the ring's")
                channel.switch_rx(channel.ring)
        except ShmError as error:
            items.append(ProtocolError(f"the shared-memory ring could not be set up: {error}"))
        except ProtocolError as error:
            items.append(error)

    def more_buffered(self) -> bool:
        """For an event loop, after a read: bytes wait that the socket's descriptor will not
        announce (decrypted TLS records, or a ring's bytes), so read again without waiting
        for it. Over a ring, when none wait, the peer's next bytes will send a wake record
        to the socket (``Channel.ring_pending``)."""
        pending = self._pending
        if pending is not None:
            return bool(pending())
        return bool(self.channel.ring_rx and self.channel.ring_pending())

    def drop_unclaimed(self) -> None:
        """Close the descriptors no frame claimed, once no frame is open: never kept."""
        if self.channel.fds and not self.endpoint.decoder.in_frame:
            self.channel.close_fds()

    # Sending -------------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> int:
        """Write whole frames (with anything queued before them); returns the stream offset
        just past them. Raises what ``Channel.send`` raises."""
        return self.channel.send(frames)

    def send_writes(self, writes: list[Write]) -> int:
        """Write each (buffers, descriptors) pair, in order; returns the stream offset just
        past the last one (0 for none)."""
        end = 0
        send = self.channel.send
        for buffers, fds in writes:
            end = send(buffers, fds) if fds else send(buffers)
        return end

    def offer(self, writes: list[Write], limit: int) -> bool:
        """Queue writes without waiting for the socket, if the outgoing queue stays under
        ``limit`` bytes: True; False (nothing queued) if it would not."""
        return bool(self.channel.offer(writes, limit))

    # Shared memory -------------------------------------------------------------------------

    def until_free(self, attempt: Callable[[], _T | None], deadline: float,
                   read_aside: Callable[[int, float], None]) -> _T | None:
        """``attempt()`` until it returns something other than None (shared memory was
        exhausted), or until ``deadline`` (then None). Between attempts, ``read_aside(
        generation, seconds)`` lets the releases that free segments arrive: they come on this
        connection's stream, so the caller either reads it for at most ``seconds``, or, if
        another thread is its reader, waits for the pool to move past ``generation``."""
        pool = self.endpoint.pool
        while True:
            generation = pool.generation if pool is not None else 0
            result = attempt()
            if result is not None or pool is None:
                return result
            remaining = deadline - monotonic()
            if remaining <= 0:
                return None
            if pool.generation == generation:
                read_aside(generation, min(remaining, RELEASE_POLL_S))

    # The end -------------------------------------------------------------------------------

    def close(self) -> int:
        """Close the socket, free our segments and unmap the peer's, and give back the memory
        of an unfinished frame. Returns the bytes of queued frames that were never sent."""
        self.channel.close()
        self.endpoint.close_shm()
        self.endpoint.decoder.close()
        return int(self.channel.dropped)
