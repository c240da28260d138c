"""One accepted client of a sync Server, served by a thread of its own: the connection as
callbacks see it (its peer, ``send_event``, ``allocate``, ``close``), its thread's life
(hello, serving, closing) and the Events pushed to it. How it answers what it reads is
``Answering`` (sync/answering.py).

The thread that read a request runs the handler and writes the reply, with no queue in
between.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

from .._checks import call_timeout_s, deadline_after
from .._codecs import join
from .._errors import ConnectionClosed, no_free_segment
from ..protocol.answers import event_writes
from ..protocol.hello import FEATURE_SHM, Hello, HelloKey
from ..protocol.replay import ReplayWindow
from ..transport.unix import PeerCredentials
from .answering import Answering, ClientGone
from .connection import Connection

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("hintens")



class ServerConnection(Answering):
    """One accepted client, as callbacks see it.

    Attributes:
        id: a number unique within this server.
        peer: the client's pid, uid and gid from SO_PEERCRED.
        events_dropped: Events this client did not get because its outgoing queue was full
            (``slow_consumer="drop"``).
    """

    def __init__(self, server: Server, sock: socket.socket, peer: PeerCredentials,
                 connection_id: int) -> None:
        self.id = connection_id
        self.peer = peer
        self.events_dropped = 0
        self._server = server
        endpoint = server._new_endpoint()
        endpoint.decoder.budget = server._pending_budget
        # Pushed Events left unread this long with the socket full: the flusher cuts.
        self._conn = Connection(sock, endpoint, shm=server.shm,
                                stall_timeout=server.send_timeout)
        self._sock, self._channel, self._endpoint = sock, self._conn.channel, endpoint
        self._endpoint.writable_all = server.writable
        self._endpoint.hello.entries[HelloKey.INSTANCE_ID] = server.instance_id
        #: The replay window of the client's session, once its hello announced one.
        self.window: ReplayWindow | None = None
        self.session = b""
        # Without an on_event handler, plain Events are dropped inside the decoder: no Frame,
        # no Python call per Event.
        self._endpoint.decoder.skip_events = server.on_event is None
        self._open = True
        self._dropping = False       # in an episode of dropped Events (logged once)
        self._cut = False            # cut (and counted) for falling behind
        # Items a read made while a reply waited for a shared-memory segment: served next.
        self._backlog: list[Any] = []
        self.thread: threading.Thread | None = None

    @property
    def peer_hello(self) -> Hello | None:
        """The client's capability hello, once it has arrived."""
        return self._endpoint.peer_hello

    @property
    def shm(self) -> bool:
        """Shared memory was negotiated with this client (its hello offered it, and so did
        the server)."""
        return self._endpoint.negotiated(FEATURE_SHM)

    def send_event(self, payload: Any) -> bool:
        """Push an Event to this client without waiting for it to read: into this
        connection's outgoing queue (``send_queue_bytes``), through shared memory when large
        (inline, when the client holds every segment it was lent and the Event fits its
        limit).

        Returns:
            True when queued; False when dropped because the queue is full and the server's
            ``slow_consumer`` policy is "drop" (counted in ``events_dropped``).

        Raises:
            ConnectionClosed: the connection is closed, or was cut now because its queue is
                full (``slow_consumer="cut"``).
            FrameTooLargeError: over the client's limit, and shared memory was not negotiated.
            TypeError: ``payload`` is not bytes-like (or not encodable by the codec).
        """
        if self._server.codec is not None:
            payload = join(self._server.codec.encode(payload, "event"))
        return self._push(payload, self._server._next_event_id())

    def _push(self, payload: Any, event_id: int, small: list[Any] | None = None) -> bool:
        # ``small``: the writes of a small bytes payload, built once for a whole broadcast.
        if not self._open:
            raise ConnectionClosed(f"connection {self.id} is closed")
        endpoint, channel = self._endpoint, self._channel
        writes = event_writes(endpoint, payload, event_id, small)
        try:
            if writes is not None and self._conn.offer(writes, self._server.send_queue_bytes):
                self._dropping = False
                return True
        except OSError as error:
            self.close()
            raise ConnectionClosed(f"connection {self.id} lost while sending: {error}") \
                from error
        if writes is not None:
            endpoint.unsent(writes)
        return self._overflowed(
            f"its outgoing queue is full ({channel.queued} bytes unread, "
            f"send_queue_bytes={self._server.send_queue_bytes})" if writes is not None
            else "every shared-memory segment of its connection is lent out")

    def close(self) -> None:
        """Cut this connection now; its serving thread ends."""
        self._open = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        """The connection's thread: say hello, serve until the connection ends, close it."""
        server, channel = self._server, self._channel
        why = ""
        try:
            self._say_hello()   # the hello goes first, always
            if not server._register(self):
                return
            why = self._serve_frames()
        except ConnectionClosed as error:
            why = str(error)
        except Exception:
            log.exception("connection %r failed", self)
        finally:
            if channel.aborted is not None and not self._cut:
                # Cut by the flusher: the client read nothing for send_timeout.
                server._count("slow_consumers_cut")
                log.warning("cut %r: %s", self, channel.aborted)
            elif why:
                log.debug("%r ended: %s", self, why)
            self._close_transport()
            server._unregister(self)

    def _overflowed(self, why: str) -> bool:
        """An Event did not fit the outgoing queue: the server's slow-consumer policy.
        Returns False (dropped), or raises ConnectionClosed (cut)."""
        server = self._server
        if server.slow_consumer == "drop":
            server._count("events_dropped", self)
            if not self._dropping:
                self._dropping = True
                log.warning("dropping Events for %r: %s", self, why)
            return False
        self._cut_behind(why)
        raise ConnectionClosed(f"connection {self.id} was cut: {why}")

    def _cut_behind(self, why: str) -> None:
        """Cut a client that fell behind, once, with a logged reason and a counter."""
        if not self._cut:
            self._cut = True
            self._channel.abort(why)
            self._open = False
            self._server._count("slow_consumers_cut")
            log.warning("cut %r: %s", self, why)

    def _say_hello(self) -> None:
        self._send([self._endpoint.hello_frame()])

    def _close_transport(self) -> None:
        """The end: Events pushed before the client went are written if the socket takes
        them, then the socket, our segments, the client's mappings and an unfinished frame's
        memory (and budget) go."""
        channel = self._channel
        if self._open and channel.queued and not channel.broken:
            try:
                channel.flush()
            except OSError:
                pass
        self.close()
        self._conn.close()
        self._backlog.clear()

    def _send(self, frames: list[Any]) -> None:
        if not self._open:
            raise ClientGone(f"connection {self.id} is closed")
        try:
            self._channel.send(frames)
        except OSError as error:   # BlockingIOError: the send timeout expired
            self.close()
            raise ClientGone(f"connection {self.id} lost while sending: {error}") from error

    def _send_writes(self, writes: list[Any]) -> None:
        if not self._open:
            raise ClientGone(f"connection {self.id} is closed")
        try:
            self._conn.send_writes(writes)
        except OSError as error:   # BlockingIOError: the send timeout expired
            self.close()
            raise ClientGone(f"connection {self.id} lost while sending: {error}") from error

    def allocate(self, size: int, timeout: float | None = None) -> memoryview:
        """A writable buffer inside a shared-memory segment of this connection: fill it and
        return it from the handler as the response (or pass it to ``send_event``), and
        nothing is copied. For the thread that serves this connection (its handlers and
        callbacks): waiting for a segment reads this connection's stream.

        Args:
            size: bytes.
            timeout: seconds to wait for a free segment; default the server's
                ``send_timeout``.

        Raises:
            ShmError: this client did not negotiate shared memory, or ``size`` is more than
                the pool (or the client) takes.
            Timeout: every segment of the connection's pool stayed lent out.
            ValueError, TypeError: ``size`` is not a positive int.
        """
        deadline = deadline_after(call_timeout_s(timeout, self._server.send_timeout))
        endpoint = self._endpoint
        view = self._conn.until_free(lambda: endpoint.allocate(size), deadline,
                                     self._read_aside)
        if view is None:
            raise no_free_segment(endpoint.pool)
        return view

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} pid={self.peer.pid} uid={self.peer.uid}>"
