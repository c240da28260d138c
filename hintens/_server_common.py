"""What the sync and the asyncio ``Server`` share: their settings (checked once, before the
socket file is made), the listening socket, the protocol state each connection starts from,
the exactly-once replay memory, who may connect, and the shape of a pushed Event. How
connections are then driven (a thread each, or the event loop) is each front end's own.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeAlias

from . import _impl
from ._checks import count, optional_callable, path_like, timeout_s, uids
from ._codecs import CodecSpec, codec_from, join
from ._constants import (
    BATCH_WRITE_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    SCATTER_THRESHOLD_BYTES,
    ErrorCode,
    MessageType,
)
from ._errors import ConnectionClosed, encode_error_payload
from ._stats import HANDLER_BUCKETS_S, connection_stats, handler_stats, merge_stats, public_name
from .protocol.answers import event_writes, is_bytes_like
from .protocol.endpoint import (
    FEATURE_RING,
    DEFAULT_COMPRESS_THRESHOLD_BYTES,
    DEFAULT_SHM_POOL_BYTES,
    DEFAULT_SHM_RECEIVE_BYTES,
    DEFAULT_SHM_RECEIVE_SEGMENTS,
    DEFAULT_SHM_THRESHOLD_BYTES,
    FEATURE_COMPRESSION,
    FEATURE_SHM,
    Endpoint,
)
from .protocol.lending import Write
from .protocol.ring import DEFAULT_RING_CAPACITY, check_capacity
from .sync.connection import Connection
from .protocol.replay import (
    DEFAULT_REPLAY_BYTES,
    DEFAULT_REPLAY_SESSIONS,
    DEFAULT_REPLAY_TOTAL_BYTES,
    DEFAULT_REPLAY_WINDOW,
    ReplayMemory,
)
from .transport.address import Listener, accepted, is_tcp, listen, resolve
from .transport.ring import available as ring_available
from .transport.tls import server_stream
from .transport.unix import PeerCredentials

log = logging.getLogger("hintens")

#: Where a server listens: one address (a Unix socket path, ``unix:/path`` or
#: ``tcp://host:port``; None for the default socket), or several.
Addresses: TypeAlias = ("str | os.PathLike[str] | None | list[str | os.PathLike[str]] "
                        "| tuple[str | os.PathLike[str], ...]")

DEFAULT_MODE = 0o600
DEFAULT_BACKLOG = 1024
DEFAULT_FRAME_TIMEOUT_S = 10.0
DEFAULT_SEND_TIMEOUT_S = 10.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 1024
#: Bytes held for unfinished frames across all connections (at least max_payload).
DEFAULT_MAX_PENDING_BYTES = 256 << 20
#: Clients' shared memory mapped across all connections: bytes and segments.
DEFAULT_SHM_RECEIVE_TOTAL_BYTES = 4 << 30
DEFAULT_SHM_RECEIVE_TOTAL_SEGMENTS = 4096
#: Bytes of pushed Events one connection's outgoing queue holds before the slow-consumer
#: policy applies.
DEFAULT_SEND_QUEUE_BYTES = 16 << 20


def echo(payload: Any) -> Any:
    """The default handler: the response is the request."""
    return payload


def refuse(sock: socket.socket, why: str) -> None:
    """Answer a connection we will not serve with one Error (UNAVAILABLE, request id 0), if
    the socket takes it now, and close it."""
    frame = _impl.core.encode_frame(MessageType.ERROR,
                                    encode_error_payload(ErrorCode.UNAVAILABLE, why), 0)
    try:
        sock.send(frame, socket.MSG_DONTWAIT)
    except OSError:
        pass
    sock.close()


class ServerBase:
    """The settings and shared state of a server; see ``hintens.Server`` for the arguments
    (the asyncio ``Server`` takes the same ones). The socket is bound and listening when the
    constructor returns."""

    if TYPE_CHECKING:   # the server class's own
        @property
        def connections(self) -> list[Any]: ...

    def __init__(self, path: Addresses, handler: Callable[..., Any], *,
                 on_event: Callable[..., Any] | None,
                 on_connect: Callable[..., Any] | None,
                 on_disconnect: Callable[..., Any] | None,
                 mode: int = DEFAULT_MODE, allow_uids: Iterable[int] = (),
                 allow_gids: Iterable[int] = (),
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 idle_timeout: float | None = None,
                 frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT_S,
                 send_timeout: float | None = DEFAULT_SEND_TIMEOUT_S,
                 backlog: int = DEFAULT_BACKLOG, shm: bool = True, writable: bool = False,
                 shm_threshold: int = DEFAULT_SHM_THRESHOLD_BYTES,
                 shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 replay_window: int = DEFAULT_REPLAY_WINDOW,
                 replay_bytes: int = DEFAULT_REPLAY_BYTES,
                 replay_sessions: int = DEFAULT_REPLAY_SESSIONS,
                 replay_total_bytes: int = DEFAULT_REPLAY_TOTAL_BYTES,
                 codec: CodecSpec = None, compress: bool = False,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS,
                 shm_receive_total_bytes: int = DEFAULT_SHM_RECEIVE_TOTAL_BYTES,
                 shm_receive_total_segments: int = DEFAULT_SHM_RECEIVE_TOTAL_SEGMENTS,
                 send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
                 slow_consumer: str = "cut",
                 ssl_context: ssl.SSLContext | None = None,
                 allow_subjects: Iterable[str] | None = None,
                 ring: bool = False, ring_bytes: int = DEFAULT_RING_CAPACITY) -> None:
        # Every argument is checked before the socket file is made: a bad one leaves nothing
        # behind. (Subclasses check their own before calling this.)
        wanted = [path_like(one, "path") for one in path] \
            if isinstance(path, (list, tuple)) else [path_like(path)]
        if not wanted:
            raise ValueError("a server needs at least one address to listen on")
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        self.handler = handler
        self.on_event = optional_callable(on_event, "on_event")
        self.on_connect = optional_callable(on_connect, "on_connect")
        self.on_disconnect = optional_callable(on_disconnect, "on_disconnect")
        mode = count(mode, "mode", minimum=0, maximum=0o777)
        backlog = count(backlog, "backlog", minimum=1)
        self._allowed_uids = {os.geteuid(), *uids(allow_uids, "allow_uids")}
        self._allowed_gids = uids(allow_gids, "allow_gids")
        self.idle_timeout = timeout_s(idle_timeout, "idle_timeout")
        self.frame_timeout = timeout_s(frame_timeout, "frame_timeout")
        self.send_timeout = timeout_s(send_timeout, "send_timeout")
        self.codec = codec_from(codec)
        self.compress = compress
        self.compress_threshold = compress_threshold
        self.max_payload = max_payload
        self.shm = shm
        self.ring_bytes = check_capacity(count(ring_bytes, "ring_bytes"))
        if ring and not ring_available():
            log.warning("ring=True needs the compiled core: connections use the socket")
        #: Rings are offered to clients that ask (Unix sockets, compiled core).
        self.ring = ring and ring_available()
        self.writable = writable
        self.shm_threshold = shm_threshold
        self.shm_pool_bytes = shm_pool_bytes
        self.shm_receive_bytes = shm_receive_bytes
        self.shm_receive_segments = shm_receive_segments
        self.max_connections = count(max_connections, "max_connections")
        # At least two batches: Events held a moment for batching must never look like a
        # client that fell behind.
        self.send_queue_bytes = count(send_queue_bytes, "send_queue_bytes",
                                      minimum=2 * BATCH_WRITE_BYTES)
        if slow_consumer not in ("cut", "drop"):
            raise ValueError(f"slow_consumer must be 'cut' or 'drop', not {slow_consumer!r}")
        self.slow_consumer = slow_consumer
        core = _impl.core
        # Bounds across connections: bytes held for unfinished frames, and the clients'
        # shared memory we map (bytes and segments).
        self._shm_budgets = [
            (core.MemoryBudget(count(shm_receive_total_bytes, "shm_receive_total_bytes")),
             "shared memory this server maps across connections (shm_receive_total_bytes)"),
            (core.MemoryBudget(count(shm_receive_total_segments,
                                     "shm_receive_total_segments")),
             "segments this server maps across connections (shm_receive_total_segments)")]
        probe = self._new_endpoint()   # the protocol layer checks its settings: once, now
        self._pending_budget = core.MemoryBudget(count(
            max_pending_bytes, "max_pending_bytes", minimum=max_payload))
        # Counters for ``stats``: clients cut because they fell behind (their queue full,
        # or nothing read for send_timeout), Events dropped (slow_consumer="drop"), and
        # connections refused (max_connections, or no thread could be started); and what
        # the connections that have ended counted, summed.
        self._counters = {"slow_consumers_cut": 0, "events_dropped": 0,
                          "connections_refused": 0, "connections_closed": 0}
        # (Every key present from the start, at zero: ``stats`` before any connection.)
        self._ended_stats: dict[str, Any] = {
            **connection_stats(probe, None), "events_dropped": 0,
            "handler": handler_stats((0, 0.0, (0,) * (len(HANDLER_BUCKETS_S) + 1)))}
        self._stats_lock = threading.Lock()
        #: Names this run of the server in its hellos: a retry that reaches another run
        #: cannot be answered from this one's replay memory.
        self.instance_id = os.urandom(16)
        self._replay = ReplayMemory(
            count(replay_sessions, "replay_sessions", minimum=0),
            count(replay_window, "replay_window"), count(replay_bytes, "replay_bytes"),
            count(replay_total_bytes, "replay_total_bytes", minimum=replay_bytes)) \
            if replay_sessions > 0 else None
        self._ids = itertools.count(1)
        self._event_ids = itertools.count(1)
        resolved = [resolve(one, server=True) for one in wanted]
        if ssl_context is not None:
            if not isinstance(ssl_context, ssl.SSLContext):
                raise TypeError(f"ssl_context must be an ssl.SSLContext, not "
                                f"{type(ssl_context).__name__}")
            if not any(is_tcp(address) for address in resolved):
                raise ValueError("ssl_context is for tcp:// addresses; this server listens "
                                 "on none")
        if allow_subjects is not None and ssl_context is None:
            raise ValueError("allow_subjects needs TLS (ssl_context) with client "
                             "certificates")
        #: TLS for the TCP addresses (None: plain TCP).
        self.ssl_context = ssl_context
        self._allow_subjects = None if allow_subjects is None else frozenset(
            str(subject) for subject in allow_subjects)
        self._listeners: list[Listener] = []
        try:
            for address in resolved:
                self._listeners.append(listen(address, mode=mode, backlog=backlog,
                                              secure=ssl_context is not None))
                log.info("listening on %s", self._listeners[-1].address)
        except BaseException:
            self._close_listeners()
            raise
        #: Where the server listens, in order: Unix socket paths and ``tcp://host:port``
        #: (with the port the kernel chose, for port 0).
        self.addresses = [listener.address for listener in self._listeners]
        #: The first of ``addresses``.
        self.path = self.addresses[0]

    def _close_listeners(self) -> None:
        """Stop listening everywhere (Unix socket files go too). Idempotent."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()

    def _new_endpoint(self, shm: bool = True, ring: bool = False) -> Endpoint:
        """The protocol state of one connection, with this server's settings (``shm``
        False: shared memory is not offered on it, as over TCP; ``ring``: the front end can
        serve this connection through a ring, if the server offers them)."""
        ring = ring and self.ring
        return Endpoint(max_payload=self.max_payload,
                        features=(FEATURE_SHM if self.shm and shm else 0)
                        | (FEATURE_COMPRESSION if self.compress else 0)
                        | (FEATURE_RING if ring else 0),
                        ring_capacity=self.ring_bytes if ring else 0,
                        shm_threshold=self.shm_threshold, shm_pool_bytes=self.shm_pool_bytes,
                        compress_threshold=self.compress_threshold,
                        shm_receive_bytes=self.shm_receive_bytes,
                        shm_receive_segments=self.shm_receive_segments,
                        shared_budgets=self._shm_budgets, writable_lending=self.writable)

    def _next_event_id(self) -> int:
        return next(self._event_ids)

    def _event_payload(self, payload: Any) -> Any:
        """An Event's payload: encoded by the codec, or checked to be bytes-like.

        Raises:
            TypeError: it is not bytes-like (or not encodable by the codec).
        """
        if self.codec is not None:
            return join(self.codec.encode(payload, "event"))
        if type(payload) is not bytes and not is_bytes_like(payload):
            raise TypeError(f"a payload must be a bytes-like object, not "
                            f"{type(payload).__name__}")
        return payload

    @staticmethod
    def _broadcast_writes(payload: Any, event_id: int) -> list[Write] | None:
        """A small bytes payload's frame, the same for every client: encoded once for a
        whole broadcast (each connection still checks it against its client's limit)."""
        if type(payload) is bytes and len(payload) < SCATTER_THRESHOLD_BYTES:
            return [([_impl.core.encode_frame(MessageType.EVENT, payload, event_id)], [])]
        return None

    def _admissible(self, sock: socket.socket, open_now: int,
                    listener: Listener) -> tuple[PeerCredentials, str] | None:
        """Whether a socket accepted on ``listener`` may be served, with ``open_now``
        connections open: its peer's credentials and address, or None once it has been
        refused (and closed). Over a Unix socket, the peer's uid or gid must be allowed; over
        TCP there are none to check. A peer that went already is dropped quietly (None).
        """
        try:
            peer, address = accepted(listener, sock)
        except OSError as error:   # the peer reset before we looked: nothing to answer
            log.debug("a connection on %s went before it was accepted: %s",
                      listener.address, error)
            sock.close()
            return None
        if not listener.tcp and peer.uid not in self._allowed_uids \
                and peer.gid not in self._allowed_gids:
            log.warning("refused a connection from pid %d uid %d gid %d on %s",
                        peer.pid, peer.uid, peer.gid, listener.address)
            self._refuse(sock, listener, f"uid {peer.uid} may not connect to this server")
            return None
        if open_now >= self.max_connections:
            self._count("connections_refused")
            log.warning("refused a connection from %s on %s: %d connections are open "
                        "(max_connections)", address if listener.tcp else f"pid {peer.pid}",
                        listener.address, self.max_connections)
            self._refuse(sock, listener, f"the server has {self.max_connections} connections "
                                         f"open, its limit (max_connections); try again later")
            return None
        return peer, address

    def _tls(self, listener: Listener) -> bool:
        return listener.tcp and self.ssl_context is not None

    def _refuse(self, sock: socket.socket, listener: Listener, why: str) -> None:
        """Refuse an accepted socket: an Error saying why, in the clear (``refuse``); on a
        TLS listener, where nothing is said before the handshake, it is only closed."""
        if self._tls(listener):
            sock.close()
        else:
            refuse(sock, why)

    def _secured(self, sock: socket.socket, listener: Listener) -> Any:
        """An accepted socket, wrapped for TLS if its listener is a TLS one (the handshake
        is still to do: ``TlsStream.handshake``/``handshake_step``)."""
        if not self._tls(listener):
            return sock
        assert self.ssl_context is not None
        return server_stream(sock, self.ssl_context, self._allow_subjects)

    def _count(self, name: str, connection: Any = None) -> None:
        # From any thread: a handler in an executor may push Events.
        with self._stats_lock:
            self._counters[name] += 1
            if connection is not None and name == "events_dropped":
                connection.events_dropped += 1

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the server's counters: every connection's (``ServerConnection.stats``)
        summed over those open now and those that have ended, plus ``connections`` (open
        now), ``connections_closed``, ``connections_refused`` (max_connections, or no thread
        could be started), ``slow_consumers_cut`` and ``events_dropped``."""
        with self._stats_lock:   # a connection is in the sum once: ended, or open
            total = merge_stats({}, self._ended_stats)
            live = [c for c in self.connections if not c._stats_retired]
            for connection in live:
                merge_stats(total, connection.stats)
            total.update(self._counters, connections=len(live))
        return total

    def __repr__(self) -> str:
        where = " ".join(self.addresses)
        count = len(self.connections)
        return f"<{public_name(self)} {where}, {count} connection{'' if count == 1 else 's'}>"

    def _retire_stats(self, connection: Any) -> None:
        """A connection has ended: its counters join the server's sum (once)."""
        with self._stats_lock:
            if not connection._stats_retired:
                connection._stats_retired = True
                merge_stats(self._ended_stats, connection.stats)
                self._counters["connections_closed"] += 1


class Pushing:
    """How a served connection pushes Events (``send_event``, a broadcast's share), for the
    sync and the asyncio ``ServerConnection`` alike: into the connection's outgoing queue,
    never waiting for the client, with the server's slow-consumer policy when the queue is
    full. The connection class provides the state below and ``close()``."""

    id: int
    events_dropped: int
    _server: Any
    _conn: Connection
    _endpoint: Endpoint
    _channel: Any
    _open: bool
    _dropping: bool      # in an episode of dropped Events (logged once)
    _cut: bool           # cut (and counted) for falling behind

    if TYPE_CHECKING:   # the connection class's own
        def close(self) -> None: ...

    events_sent = 0          # Events queued for this client (send_event, broadcasts)
    _stats_retired = False   # its counters were added to the server's (it has ended)

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of this connection's counters, a new dict each time: frames each way
        (``requests_received``, ``responses_sent``, ``events_sent``, ...), Error frames
        (``errors_sent`` by code, ``errors_received``), bytes on the socket and through
        shared memory, segments, ``queued_bytes``; ``events_dropped``; and ``handler``:
        ``count``, ``seconds`` and cumulative ``buckets`` of the handler's run times. The
        README's "Seeing what happens" lists every key."""
        channel = self._channel
        stats = connection_stats(self._endpoint, channel, events_sent=self.events_sent,
                                 responses_sent=channel.responses_sent)
        stats.update(events_dropped=self.events_dropped,
                     handler=handler_stats(channel.handler_times()))
        return stats

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
                self.events_sent += 1
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
