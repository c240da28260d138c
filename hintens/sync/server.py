"""Sync server over a Unix socket: one thread per connection.

A thread per connection gives the lowest round-trip latency. The thread that read a request
runs the handler and writes the reply, with no queue in between. A client that stalls, even
in the middle of a frame, blocks only its own thread. Its connection closes when the frame
deadline passes.

Shutdown is graceful. ``close()`` (or ``shutdown()`` from a signal handler) stops accepting,
removes the socket file, and half-closes each connection for reading. The kernel still hands
over the bytes that had already arrived, so requests already in flight are read, answered
and flushed. Connections still busy at the deadline are cut.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from time import monotonic
from typing import Any, Callable, Iterable

from .._checks import count, deadline_after, timeout_s, wait_s
from .._codecs import CodecSpec, ready
from .._constants import DEFAULT_MAX_PAYLOAD_BYTES
from .._errors import ConnectionClosed, FrameTooLargeError, ShmError
from .._server_common import (
    DEFAULT_BACKLOG,
    DEFAULT_FRAME_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MODE,
    DEFAULT_SEND_QUEUE_BYTES,
    DEFAULT_SEND_TIMEOUT_S,
    DEFAULT_SHM_RECEIVE_TOTAL_BYTES,
    DEFAULT_SHM_RECEIVE_TOTAL_SEGMENTS,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    Addresses,
    ServerBase,
    echo,
    refuse,
)
from ..protocol.endpoint import (
    DEFAULT_COMPRESS_THRESHOLD_BYTES,
    DEFAULT_SHM_POOL_BYTES,
    DEFAULT_SHM_RECEIVE_BYTES,
    DEFAULT_SHM_RECEIVE_SEGMENTS,
    DEFAULT_SHM_THRESHOLD_BYTES,
)
from ..protocol.ring import DEFAULT_RING_CAPACITY
from ..protocol.replay import (
    DEFAULT_REPLAY_BYTES,
    DEFAULT_REPLAY_SESSIONS,
    DEFAULT_REPLAY_TOTAL_BYTES,
    DEFAULT_REPLAY_WINDOW,
)
from ..transport.address import Listener
from ..transport.unix import set_kernel_timeouts
from .serving import ServerConnection
from .threads import (
    DEFAULT_THREAD_STACK_BYTES,
    MAX_THREAD_STACK_BYTES,
    MIN_THREAD_STACK_BYTES,
    start_thread,
)

__all__ = ["Server", "ServerConnection", "echo"]

log = logging.getLogger("hintens")

Handler = Callable[[Any], Any]


# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
class Server(ServerBase):
    """A hintens server on a Unix socket.

    The socket is bound and listening when the constructor returns; call ``serve_forever()``
    (blocking) or ``start()`` (background thread) to accept connections.

    Args:
        path: where to listen: a Unix socket path (or ``unix:/path``), ``tcp://host:port``,
            or a list of them (the server listens on all at once; ``addresses`` lists them,
            ``path`` is the first). A Unix socket's default is ``$HINTENS_SOCKET``, else
            ``$XDG_RUNTIME_DIR/hintens.sock``, else ``/tmp/hintens-$UID/hintens.sock`` (that
            directory is created, mode 0700, and refused if it is not this user's alone). A
            socket directory that others may write to without the sticky bit is logged as a
            warning: they could replace the socket. ``tcp://:port`` binds 127.0.0.1; port 0
            takes any free port. Over TCP there is no shared memory and no SO_PEERCRED:
            ``allow_uids``/``allow_gids`` and ``mode`` do not apply, and any host that can
            reach the port can call the server (binding a non-loopback address logs a
            warning).
        handler: called with each Request's payload; returns the Response payload (any
            bytes-like object, or None for an empty one). An exception becomes an Error frame:
            a ``RemoteError`` keeps its code and message, anything else is HANDLER_ERROR. The
            connection stays open either way.
        on_event: called as ``on_event(payload, connection)`` for each Event from a client.
            Events are dropped when it is None.
        on_connect, on_disconnect: called with the ``ServerConnection``.
        mode: file mode of the socket (default 0o600: only the owner may connect).
        allow_uids, allow_gids: peers whose uid or gid is listed may connect as well as this
            process's own effective uid. Others are refused before a frame is read.
        max_payload: largest inline payload accepted (default 64 MiB).
        idle_timeout: seconds a connection may stay silent between frames (None: for ever).
        frame_timeout: seconds a frame may take from its first byte to its last (None: no
            limit, which lets a client hold a thread by dripping a frame).
        send_timeout: seconds a client may leave our replies unread before it is cut (None:
            for ever).
        backlog: listen() backlog, for bursts of connects.
        shm, shm_threshold, shm_pool_bytes: shared memory, as for ``Client``: payloads of
            ``shm_threshold`` bytes or more travel through sealed memfd segments toward clients
            that offer it too; each connection's sending segments hold at most
            ``shm_pool_bytes``.
        writable: handlers get shared payloads as writable copy-on-write views (MAP_PRIVATE)
            instead of read-only ones; nothing is copied until written.
        compress, compress_threshold: zstd compression, as for ``Client``, toward clients
            that offer it too.
        codec: how payloads become values (see ``hintens.Codec``): the handler then gets the
            decoded request and returns the response value, ``on_event`` gets decoded
            events, and ``broadcast``/``send_event`` take values. Default: raw bytes.
        replay_window, replay_bytes, replay_sessions, replay_total_bytes: the bounds of the
            exactly-once memory for clients that announce a session
            (``ClientPool(exactly_once=True)``): answers kept per session, bytes of them per
            session, sessions kept, and bytes of answers across all sessions (256 MiB). 0
            sessions turns it off. docs/PROTOCOL.md, section 10, has the rules.
        ssl_context: TLS on the ``tcp://`` addresses: a server-side ``ssl.SSLContext``
            (``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)`` with ``load_cert_chain``;
            ``verify_mode = ssl.CERT_REQUIRED`` and ``load_verify_locations`` to let in only
            clients whose certificate chains to that CA). Unix sockets stay as they are. A
            handshake that fails, or takes longer than ``frame_timeout``, closes the
            connection (logged); nothing is said in the clear.
        allow_subjects: with client certificates, only these certificate subjects
            (``"CN=client,O=Example"``, as ``ServerConnection.subject`` shows them) get in.
        thread_stack_bytes: the stack of each connection's thread.
        ring: offer a shared-memory ring (docs/PROTOCOL.md section 9b) to clients on a Unix
            socket that ask for one (``Client(ring=True)``): their frames then travel through
            shared memory, and a waiting side spins a moment before it sleeps on a futex.
            Needs the compiled core (otherwise logged, and the socket is used).
        ring_bytes: each ring's capacity per direction, a power of two from 4 KiB to 64 MiB
            (default 256 KiB); a ring costs ``2 * ring_bytes + 4096`` bytes of shared memory.

    Raises:
        ServerRunningError: another server is listening on ``path``.
        SocketPathError: ``path`` is too long, or exists and is not a socket.
        OSError: the socket could not be bound (for example, no such directory).
        TypeError, ValueError: a bad argument (a handler that is not callable, a ``mode``
            that is not an int in [0, 0o777], a timeout that is not positive, ...). Arguments
            are checked before the socket file is created.
    """

    __module__ = "hintens"

    def __init__(self, path: Addresses = None, handler: Handler = echo, *,
                 on_event: Callable[[Any, ServerConnection], Any] | None = None,
                 on_connect: Callable[[ServerConnection], Any] | None = None,
                 on_disconnect: Callable[[ServerConnection], Any] | None = None,
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
                 thread_stack_bytes: int | None = DEFAULT_THREAD_STACK_BYTES,
                 ring: bool = False, ring_bytes: int = DEFAULT_RING_CAPACITY) -> None:
        self.thread_stack_bytes = None if thread_stack_bytes is None else count(
            thread_stack_bytes, "thread_stack_bytes", minimum=MIN_THREAD_STACK_BYTES,
            maximum=MAX_THREAD_STACK_BYTES)
        self._lock = threading.Lock()
        self._connections: dict[int, ServerConnection] = {}
        self._starting: set[ServerConnection] = set()   # accepted, hello not yet sent
        self._local = threading.local()                  # .serving: a connection thread
        self._stop = threading.Event()
        self._done = threading.Event()
        self._serving = False
        self._drained = False
        self._thread: threading.Thread | None = None
        super().__init__(
            path, handler, on_event=on_event, on_connect=on_connect,
            on_disconnect=on_disconnect, mode=mode, allow_uids=allow_uids,
            allow_gids=allow_gids, max_payload=max_payload, idle_timeout=idle_timeout,
            frame_timeout=frame_timeout, send_timeout=send_timeout, backlog=backlog, shm=shm,
            writable=writable, shm_threshold=shm_threshold, shm_pool_bytes=shm_pool_bytes,
            replay_window=replay_window, replay_bytes=replay_bytes,
            replay_sessions=replay_sessions, replay_total_bytes=replay_total_bytes,
            codec=codec, compress=compress, compress_threshold=compress_threshold,
            max_connections=max_connections, max_pending_bytes=max_pending_bytes,
            shm_receive_bytes=shm_receive_bytes, shm_receive_segments=shm_receive_segments,
            shm_receive_total_bytes=shm_receive_total_bytes,
            shm_receive_total_segments=shm_receive_total_segments,
            send_queue_bytes=send_queue_bytes, slow_consumer=slow_consumer,
            ssl_context=ssl_context, allow_subjects=allow_subjects, ring=ring,
            ring_bytes=ring_bytes)
        self._call = handler if self.codec is None else self._coded_call
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    # Public API -------------------------------------------------------------------------

    @property
    def connections(self) -> list[ServerConnection]:
        """A snapshot of the open connections."""
        with self._lock:
            return list(self._connections.values())

    def broadcast(self, payload: Any) -> int:
        """Push an Event to every connected client, without waiting for any of them: each
        gets it in its own outgoing queue (through shared memory when it is large and the
        client negotiated it). A client whose queue is full is cut or skipped, per
        ``slow_consumer``; one that cannot take the payload at all (over its limit without
        shared memory) is skipped, and logged.

        Returns:
            How many clients it was queued for.

        Raises:
            TypeError: ``payload`` is not bytes-like (or not encodable by the codec).
        """
        payload = self._event_payload(payload)
        event_id = self._next_event_id()
        small = self._broadcast_writes(payload, event_id)
        queued = 0
        for connection in self.connections:
            try:
                queued += connection._push(payload, event_id, small)
            except ConnectionClosed:
                pass
            except (FrameTooLargeError, ShmError) as error:
                log.warning("broadcast skipped %r: %s", connection, error)
        return queued

    def current_connection(self) -> ServerConnection:
        """From a handler or ``on_event``: the connection being served (its peer's
        credentials, ``send_event``, ``close``).

        Raises:
            RuntimeError: not called on one of this server's connection threads.
        """
        connection = getattr(self._local, "connection", None)
        if connection is None:
            raise RuntimeError("Server.current_connection() is for handlers, on the serving "
                               "thread")
        return connection

    def allocate(self, size: int, timeout: float | None = None) -> memoryview:
        """From a handler: a writable buffer inside a shared-memory segment of the connection
        being served. Fill it and return it as the response: nothing is copied.

        Raises:
            RuntimeError: not called from a handler.
            ShmError: this client did not negotiate shared memory.
            Timeout: every segment of the connection's pool is lent out.
        """
        try:
            connection = self.current_connection()
        except RuntimeError:
            raise RuntimeError("Server.allocate() is for handlers, on the serving thread") \
                from None
        return connection.allocate(size, timeout)

    def serve_forever(self) -> None:
        """Accept and serve connections until ``shutdown()`` or ``close()``, then drain.
        A ``shutdown()`` that came first (a signal handler's, say) makes it drain at once.
        On a server that serves in the background already (``start``, or ``with``), it waits
        until that stops.

        Raises:
            RuntimeError: the server is serving in another thread's ``serve_forever``, or
                was closed.
        """
        with self._lock:
            background = self._thread
            if background is not None and background is not threading.current_thread():
                waiting = True
            elif self._serving or self._drained:
                raise RuntimeError("this server is already serving or closed")
            else:
                waiting = False
                self._serving = True
        if waiting:
            self._done.wait()
            return
        try:
            self._accept_loop()
        finally:
            self._drain(self._shutdown_timeout)
            self._done.set()

    def start(self) -> Server:
        """Serve in a background thread; returns self. A server that serves already (from
        ``start`` or ``with``) is left as it is.

        Raises:
            RuntimeError: the server was closed.
        """
        with self._lock:
            if self._drained:
                raise RuntimeError("this server is closed")
            if self._thread is not None or self._serving:
                return self
            self._thread = threading.Thread(target=self.serve_forever, name="hintens-server",
                                            daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
        """Ask ``serve_forever`` to stop and drain. Safe from a signal handler; returns at once.

        Args:
            timeout: seconds to let in-flight requests finish before connections are cut
                (None: wait for them however long they take).

        Raises:
            TypeError, ValueError: ``timeout`` is not a positive number or None.
        """
        self._shutdown_timeout = timeout_s(timeout, "timeout")
        self._stop.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def close(self, timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
        """Stop accepting, answer requests already in flight, close everything. Idempotent.

        Args:
            timeout: seconds to let in-flight requests finish before connections are cut
                (None: wait for them however long they take).

        Raises:
            TypeError, ValueError: ``timeout`` is not a positive number or None.
        """
        self.shutdown(timeout)
        if getattr(self._local, "serving", False):
            return   # from one of our handlers: waiting here would wait on ourselves
        if self._serving:
            if threading.current_thread() is not self._thread:
                self._done.wait(None if self._shutdown_timeout is None
                                else wait_s(self._shutdown_timeout + 5.0))
        else:
            self._drain(self._shutdown_timeout)

    def __enter__(self) -> Server:
        """Start serving in a background thread (as ``start``), so that a ``with`` block's
        clients are answered; leaving the block closes the server."""
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Internals --------------------------------------------------------------------------

    _shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT_S

    def _register(self, connection: ServerConnection) -> bool:
        """A connection's hello has gone out: it is served (and listed) from now on, unless
        the server is closing (False)."""
        self._local.serving = True
        self._local.connection = connection
        with self._lock:
            self._starting.discard(connection)
            if self._drained:
                return False
            self._connections[connection.id] = connection
        if self.on_connect is not None:
            self.on_connect(connection)
        return True

    def _unregister(self, connection: ServerConnection) -> None:
        """A connection has ended and been closed."""
        self._retire_stats(connection)
        with self._lock:
            self._starting.discard(connection)
            registered = self._connections.pop(connection.id, None) is not None
        if registered and self.on_disconnect is not None:
            try:
                self.on_disconnect(connection)
            except Exception:
                log.exception("on_disconnect callback raised")

    def _accept_loop(self) -> None:
        poller = select.poll()
        by_fd = {listener.sock.fileno(): listener for listener in self._listeners}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        while not self._stop.is_set():
            ready = [by_fd[fd] for fd, _ in poller.poll() if fd in by_fd]
            for listener in ready:
                self._accept_from(listener)

    def _accept_from(self, listener: Listener) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as error:   # EMFILE and friends: back off, do not spin
                log.error("accept failed on %s: %s", listener.address, error)
                self._stop.wait(0.05)
                return
            try:
                self._admit(sock, listener)
            except Exception:   # whatever one connection does, accepting goes on
                log.exception("could not admit a connection on %s", listener.address)
                sock.close()

    def _admit(self, sock: socket.socket, listener: Listener) -> None:
        sock.setblocking(True)
        with self._lock:
            open_now = len(self._connections) + len(self._starting)
        admitted = self._admissible(sock, open_now, listener)
        if admitted is None:
            return
        peer, address = admitted
        sock = self._secured(sock, listener)   # TLS: its handshake runs on its own thread
        set_kernel_timeouts(sock, None, self.send_timeout, set_send=True)
        connection = ServerConnection(self, sock, peer, next(self._ids), address,
                                      shm=not listener.tcp)
        with self._lock:
            self._starting.add(connection)   # registered once its hello has gone out
        try:
            connection.thread = start_thread(ServerConnection.serve, connection,
                                              f"hintens-conn-{connection.id}",
                                              self.thread_stack_bytes)
        except Exception as error:   # RLIMIT_NPROC, a pids cgroup, no memory for a stack
            with self._lock:
                self._starting.discard(connection)
            self._count("connections_refused")
            log.error("refused a connection from %s on %s: cannot start its thread: %s",
                      address, listener.address, error)
            refuse(sock, f"the server cannot start a thread for this connection now "
                          f"({error}); try again later")
            connection._close_transport()

    def _coded_call(self, payload: Any) -> Any:
        """The handler behind a codec: decoded request in, encoded response out. A response
        in parts goes into shared memory when the client negotiated it and it is large."""
        assert self.codec is not None
        out = self.codec.encode(self.handler(self.codec.decode(payload, "request")),
                                "response")
        if not isinstance(out, list):
            return out
        connection = self.current_connection()
        return ready(out, self.shm_threshold, connection.allocate if connection.shm else None)

    def _drain(self, timeout: float | None) -> None:
        with self._lock:
            if self._drained:
                return
            self._drained = True
        self._close_listeners()
        deadline = deadline_after(timeout)
        with self._lock:
            starting = list(self._starting)
        for connection in starting:   # accepted but not serving yet: nothing is in flight
            connection.close()
        for connection in self.connections:
            connection._channel.stop_reading()   # queued requests still get read
        me = threading.current_thread()
        for connection in self.connections:
            if connection.thread is not None and connection.thread is not me:
                connection.thread.join(wait_s(deadline - monotonic()))
        for connection in self.connections:
            if connection.thread is not me:
                log.warning("cutting %r at the shutdown deadline", connection)
                connection.close()
        self._wake_r.close()
        self._wake_w.close()
        log.info("server on %s closed", self.path)
