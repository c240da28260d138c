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
import ssl
import threading
from typing import TYPE_CHECKING, Any

from .._checks import call_timeout_s, deadline_after
from .._errors import ConnectionClosed, no_free_segment
from ..protocol.hello import FEATURE_SHM, Hello, HelloKey
from ..protocol.replay import ReplayWindow
from ..transport.unix import PeerCredentials
from .._stats import public_name
from .._server_common import Pushing
from ..transport.tls import HANDSHAKE_TIMEOUT_S, TlsStream, plaintext_hint
from .answering import Answering, ClientGone
from .connection import Connection

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("hintens")



# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
#: Why ``ServerConnection.close`` cut a connection (its channel's ``aborted``).
_CLOSED_HERE = "closed by the server"


class ServerConnection(Answering, Pushing):
    """One accepted client, as callbacks see it.

    Attributes:
        id: a number unique within this server.
        peer: the client's pid, uid and gid from SO_PEERCRED (-1 each over TCP, which has
            none).
        address: where the client is: ``tcp://host:port``, or ``unix:`` and the server's
            socket path.
        events_dropped: Events this client did not get because its outgoing queue was full
            (``slow_consumer="drop"``).
    """

    __module__ = "hintens"

    def __init__(self, server: Server, sock: socket.socket, peer: PeerCredentials,
                 connection_id: int, address: str = "", *, shm: bool = True) -> None:
        self.id = connection_id
        self.peer = peer
        self.address = address
        #: The client certificate's subject under TLS (``CN=...,O=...``), else None.
        self.subject: str | None = None
        self.events_dropped = 0
        self._server = server
        endpoint = server._new_endpoint(shm, ring=shm)
        endpoint.decoder.budget = server._pending_budget
        # Pushed Events left unread this long with the socket full: the flusher cuts.
        self._conn = Connection(sock, endpoint, shm=server.shm and shm,
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
    def ring_active(self) -> bool:
        """This connection's frames travel through a shared-memory ring (the client asked,
        and we switched)."""
        return self._channel.ring is not None

    @property
    def peer_hello(self) -> Hello | None:
        """The client's capability hello, once it has arrived."""
        return self._endpoint.peer_hello

    @property
    def shm(self) -> bool:
        """Shared memory was negotiated with this client (its hello offered it, and so did
        the server)."""
        return self._endpoint.negotiated(FEATURE_SHM)

    def close(self) -> None:
        """Cut this connection now; its serving thread ends."""
        self._open = False
        # Both ways, the socket's and a ring's: a reply the handler returns after this is
        # not sent (over a ring, nothing else would stop it).
        self._channel.abort(_CLOSED_HERE)

    def serve(self) -> None:
        """The connection's thread: say hello, serve until the connection ends, close it."""
        server, channel = self._server, self._channel
        why = ""
        try:
            if isinstance(self._sock, TlsStream):
                try:
                    self._sock.handshake(server.frame_timeout or HANDSHAKE_TIMEOUT_S)
                except (ssl.SSLError, OSError) as error:
                    log.info("TLS handshake with %s failed: %s%s", self.address, error,
                             plaintext_hint(error))
                    return
                self.subject = self._sock.subject()
            self._say_hello()   # the hello goes first, always
            if not server._register(self):
                return
            log.debug("%r connected", self)
            why = self._serve_frames()
        except ConnectionClosed as error:
            why = str(error)
        except Exception:
            log.exception("connection %r failed", self)
        finally:
            if channel.aborted is not None and not self._cut \
                    and channel.aborted != _CLOSED_HERE:
                # Cut by the flusher: the client read nothing for send_timeout.
                server._count("slow_consumers_cut")
                log.warning("cut %r: %s", self, channel.aborted)
            elif why:
                log.debug("%r ended: %s", self, why)
            self._close_transport()
            server._unregister(self)

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
        if self.peer.pid < 0:
            who = self.address if self.subject is None else f"{self.address} {self.subject}"
        else:
            who = f"pid={self.peer.pid} uid={self.peer.uid}"
        return f"<{public_name(self)} {self.id} {who}>"   # the same for its whole life (logs)
