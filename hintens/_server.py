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

import itertools
import logging
import os
import select
import socket
import threading
from time import monotonic
from typing import Any, Callable, Iterable

from . import _impl
from ._codecs import CodecSpec, codec_from, join, ready
from ._constants import (
    BATCH_WRITE_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    SCATTER_THRESHOLD_BYTES,
    ErrorCode,
    Flags,
    MessageType,
)
from ._errors import (
    ConnectionClosed,
    FrameTooLargeError,
    ProtocolError,
    RemoteError,
    ShmError,
    Timeout,
    encode_error_payload,
)
from .transport.connection import open_channel
from .protocol.endpoint import (
    DEFAULT_COMPRESS_THRESHOLD_BYTES,
    DEFAULT_SHM_POOL_BYTES,
    DEFAULT_SHM_RECEIVE_BYTES,
    DEFAULT_SHM_RECEIVE_SEGMENTS,
    DEFAULT_SHM_THRESHOLD_BYTES,
    FEATURE_COMPRESSION,
    FEATURE_SHM,
    Endpoint,
    Hello,
    HelloKey,
)
from .protocol.replay import (
    ANSWERED,
    DEFAULT_REPLAY_BYTES,
    DEFAULT_REPLAY_SESSIONS,
    DEFAULT_REPLAY_TOTAL_BYTES,
    DEFAULT_REPLAY_WINDOW,
    FORGOTTEN,
    MOVED,
    NEW,
    RUNNING,
    TOO_LARGE,
    ReplayMemory,
    ReplayWindow,
)
from ._checks import (
    call_timeout_s,
    count,
    deadline_after,
    optional_callable,
    path_like,
    timeout_s,
    uids,
    wait_s,
)
from .transport.unix import (
    PeerCredentials,
    listen,
    peer_credentials,
    remove_socket_file,
    set_kernel_timeouts,
    socket_path,
)

log = logging.getLogger("hintens")

DEFAULT_MODE = 0o600
DEFAULT_BACKLOG = 1024
DEFAULT_FRAME_TIMEOUT_S = 10.0
DEFAULT_SEND_TIMEOUT_S = 10.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0

Handler = Callable[[Any], Any]

_REPLAY_REFUSALS = {
    RUNNING: "is still running on another connection of its session",
    FORGOTTEN: "may have run already, and is older than its session's replay window",
    "too large": "ran already, and its answer was too large to keep for a replay",
}


#: A handler thread's stack: Python code needs little of one, and each connection has a
#: thread, so the platform's default (often 8 MiB of address space) adds up.
DEFAULT_THREAD_STACK_BYTES = 1 << 20
MIN_THREAD_STACK_BYTES = 64 * 1024
MAX_THREAD_STACK_BYTES = 1 << 30
DEFAULT_MAX_CONNECTIONS = 1024
#: Bytes held for unfinished frames across all connections (at least max_payload).
DEFAULT_MAX_PENDING_BYTES = 256 << 20
#: Clients' shared memory mapped across all connections: bytes and segments.
DEFAULT_SHM_RECEIVE_TOTAL_BYTES = 4 << 30
DEFAULT_SHM_RECEIVE_TOTAL_SEGMENTS = 4096
#: Bytes of pushed Events one connection's outgoing queue holds before the slow-consumer
#: policy applies.
DEFAULT_SEND_QUEUE_BYTES = 16 << 20
#: A reply waiting for a shared-memory segment reads at least this often.
_RELEASE_POLL_S = 0.05
_UNSET = object()
# Connection threads get small stacks only where that can be done without touching the
# stack size of threads the application starts: threading.stack_size() is process-wide, so
# it is changed by the compiled core for the one C call that creates our thread (no bytecode
# runs meanwhile, so no other thread can start one with it). That call is threading's own
# start_new_thread, and the steps around it are Thread.start's (CPython 3.9 to 3.12). Where
# these are missing, or with the pure-Python core, threads get the platform's default stack.
_SMALL_STACKS = (_impl.implementation == "cython"
                 and all(hasattr(threading, name) for name in
                         ("_start_new_thread", "_limbo", "_active_limbo_lock"))
                 and hasattr(threading.Thread, "_bootstrap"))


def _start_thread(target: Callable[..., Any], argument: Any, name: str,
                  stack_bytes: int | None) -> threading.Thread:
    """Start a daemon thread with a stack of ``stack_bytes`` (None: the platform default).

    Raises:
        RuntimeError: the thread could not be started (RLIMIT_NPROC, a pids cgroup, memory).
    """
    thread = threading.Thread(target=target, args=(argument,), name=name, daemon=True)
    if stack_bytes is None or not _SMALL_STACKS:
        thread.start()
        return thread
    registry: Any = threading
    with registry._active_limbo_lock:
        registry._limbo[thread] = thread
    try:
        _impl.core.call_with_stack_size(stack_bytes, registry._start_new_thread,
                                        thread._bootstrap, ())  # type: ignore[attr-defined]
    except BaseException:
        with registry._active_limbo_lock:
            del registry._limbo[thread]
        raise
    thread._started.wait()  # type: ignore[attr-defined]
    return thread


def _refuse(sock: socket.socket, why: str) -> None:
    """Answer a connection we will not serve with one Error (UNAVAILABLE, request id 0), if
    the socket takes it now, and close it."""
    frame = _impl.core.encode_frame(MessageType.ERROR,
                                    encode_error_payload(ErrorCode.UNAVAILABLE, why), 0)
    try:
        sock.send(frame, socket.MSG_DONTWAIT)
    except OSError:
        pass
    sock.close()


def echo(payload: Any) -> Any:
    """The default handler: the response is the request."""
    return payload


def _is_echo(endpoint: Endpoint, result: Any) -> bool:
    """The handler returned the payload it was lent: the reply points back at its segment."""
    return type(result) is memoryview and endpoint.lends(result)


class ServerConnection:
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
        self._sock = sock
        self._endpoint = server._new_endpoint()
        self._endpoint.decoder.budget = server._pending_budget
        # Pushed Events left unread this long with the socket full: the flusher cuts.
        self._channel = open_channel(sock, self._endpoint, shm=server.shm,
                                     stall_timeout=server.send_timeout)
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
        self._receive_timeout: Any = _UNSET
        # Items a read made while a reply waited for a shared-memory segment: served next.
        self._backlog: list[Any] = []
        self.thread: threading.Thread | None = None

    @property
    def peer_hello(self) -> Hello | None:
        """The client's capability hello, once it has arrived."""
        return self._endpoint.peer_hello

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
        if type(payload) is bytes and len(payload) < endpoint.small_max:
            writes: list[Any] | None = small or [([_impl.core.encode_frame(
                MessageType.EVENT, payload, event_id)], [])]
        else:
            writes = endpoint.writes(MessageType.EVENT, payload, event_id)
            if writes is None and memoryview(payload).nbytes <= endpoint.peer.max_payload:
                # Every segment is lent out (the client holds the Events it was lent): this
                # one goes inline, into the bounded queue, rather than wait.
                writes = [(endpoint.inline(MessageType.EVENT, payload, event_id), [])]
        try:
            if writes is not None and channel.offer(writes, self._server.send_queue_bytes):
                self._dropping = False
                return True
        except OSError as error:
            self.close()
            raise ConnectionClosed(f"connection {self.id} lost while sending: {error}") \
                from error
        if writes is not None:
            endpoint.unsent(writes)
        return self._server._overflowed(
            self, f"its outgoing queue is full ({channel.queued} bytes unread, "
                  f"send_queue_bytes={self._server.send_queue_bytes})" if writes is not None
            else "every shared-memory segment of its connection is lent out")

    def close(self) -> None:
        """Cut this connection now; its serving thread ends."""
        self._open = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, frames: list[Any]) -> None:
        if not self._open:
            raise _ClientGone(f"connection {self.id} is closed")
        try:
            self._channel.send(frames)
        except OSError as error:   # BlockingIOError: the send timeout expired
            self.close()
            raise _ClientGone(f"connection {self.id} lost while sending: {error}") from error

    def _send_writes(self, writes: list[Any]) -> None:
        for buffers, fds in writes:
            if fds:
                try:
                    self._channel.send(buffers, fds)
                except OSError as error:
                    self.close()
                    raise _ClientGone(
                        f"connection {self.id} lost while sending: {error}") from error
            else:
                self._send(buffers)

    def _set_receive_timeout(self, seconds: float | None) -> None:
        if seconds != self._receive_timeout:
            set_kernel_timeouts(self._sock, seconds)
            self._receive_timeout = seconds

    def _reply_writes(self, request_id: int, result: Any) -> list[Any]:
        """The writes that answer a Request (Endpoint.reply_writes), waiting up to
        ``send_timeout`` for a shared-memory segment if they need one, and reading meanwhile:
        the release that frees one arrives on this connection, and this thread is its only
        reader. After that, the answer is UNAVAILABLE.

        Raises:
            RemoteError: the handler's result is not bytes-like (a HANDLER_ERROR that says so).
            ConnectionClosed: the client went while we waited.
        """
        if type(result) is not bytes and result is not None and not _bytes_like(result):
            raise RemoteError(ErrorCode.HANDLER_ERROR, f"handler must return a bytes-like "
                                                       f"object, got {type(result).__name__}")
        endpoint = self._endpoint
        writes = endpoint.reply_writes(request_id, result)
        if writes is not None:
            return writes
        pool = endpoint.pool
        assert pool is not None
        deadline = deadline_after(self._server.send_timeout)
        while True:
            generation = pool.generation
            writes = endpoint.reply_writes(request_id, result)
            if writes is not None:
                return writes
            remaining = deadline - monotonic()
            if remaining <= 0:
                return [([endpoint.error_frame(
                    ErrorCode.UNAVAILABLE, f"no shared memory for the reply: all "
                    f"{pool.total_bytes} bytes of this connection's segments stayed lent out",
                    request_id)], [])]
            if pool.generation == generation:
                self._read_aside(min(remaining, _RELEASE_POLL_S))

    def _read_aside(self, timeout: float) -> None:
        """One read while a reply waits for a segment: control Events (the releases) take
        effect now, and whatever else came is kept, in order, to be served next.

        Raises:
            ConnectionClosed: the client hung up.
        """
        self._set_receive_timeout(timeout)
        endpoint = self._endpoint
        try:
            frames = self._channel.receive()
        except BlockingIOError:
            return
        except ProtocolError as error:
            self._backlog += endpoint.after_error(error, self._channel.fds)
            return
        except OSError as error:
            raise _ClientGone(f"connection {self.id} lost: {error}") from error
        if frames is None:
            raise _ClientGone(f"connection {self.id} closed by the client")
        self._backlog += endpoint.admit(frames, self._channel.fds)

    def _take_backlog(self) -> list[Any]:
        items, self._backlog = self._backlog, []
        return items

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} pid={self.peer.pid} uid={self.peer.uid}>"


class _ClientGone(ConnectionClosed):
    """The client went while we answered it: the connection ends, quietly. (Raised by our
    own writes and reads; a handler's ConnectionClosed is the handler's failure.)"""


def _bytes_like(value: Any) -> bool:
    if type(value) is bytes:
        return True
    try:
        memoryview(value).release()
        return True
    except TypeError:
        return False


class Server:
    """A hintens server on a Unix socket.

    The socket is bound and listening when the constructor returns; call ``serve_forever()``
    (blocking) or ``start()`` (background thread) to accept connections.

    Args:
        path: socket path; default ``$HINTENS_SOCKET``, else ``$XDG_RUNTIME_DIR/hintens.sock``,
            else ``/tmp/hintens-$UID/hintens.sock`` (that directory is created, mode 0700, and
            refused if it is not this user's alone). A socket directory that others may write
            to without the sticky bit is logged as a warning: they could replace the socket.
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
            sessions turns it off. See ``hintens.protocol.replay``.

    Raises:
        ServerRunningError: another server is listening on ``path``.
        SocketPathError: ``path`` is too long, or exists and is not a socket.
        OSError: the socket could not be bound (for example, no such directory).
        TypeError, ValueError: a bad argument (a handler that is not callable, a ``mode``
            that is not an int in [0, 0o777], a timeout that is not positive, ...). Arguments
            are checked before the socket file is created.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, handler: Handler = echo, *,
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
                 thread_stack_bytes: int | None = DEFAULT_THREAD_STACK_BYTES) -> None:
        # Every argument is checked before the socket file is made: a bad one leaves nothing
        # behind.
        path = path_like(path)
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
        self.thread_stack_bytes = None if thread_stack_bytes is None else count(
            thread_stack_bytes, "thread_stack_bytes", minimum=MIN_THREAD_STACK_BYTES,
            maximum=MAX_THREAD_STACK_BYTES)
        core = _impl.core
        # Bounds across connections: bytes held for unfinished frames, and the clients'
        # shared memory we map (bytes and segments).
        self._shm_budgets = [
            (core.MemoryBudget(count(shm_receive_total_bytes, "shm_receive_total_bytes")),
             "shared memory this server maps across connections (shm_receive_total_bytes)"),
            (core.MemoryBudget(count(shm_receive_total_segments,
                                     "shm_receive_total_segments")),
             "segments this server maps across connections (shm_receive_total_segments)")]
        self._new_endpoint()   # the protocol layer checks its settings: once, and now
        self._pending_budget = core.MemoryBudget(count(
            max_pending_bytes, "max_pending_bytes", minimum=max_payload))
        #: Counters, for monitoring: clients cut because they fell behind (their queue full,
        #: or nothing read for send_timeout), Events dropped (slow_consumer="drop"), and
        #: connections refused (max_connections, or no thread could be started).
        self.stats = {"slow_consumers_cut": 0, "events_dropped": 0, "connections_refused": 0}
        #: Names this run of the server in its hellos: a retry that reaches another run
        #: cannot be answered from this one's replay memory.
        self.instance_id = os.urandom(16)
        self._replay = ReplayMemory(
            count(replay_sessions, "replay_sessions", minimum=0),
            count(replay_window, "replay_window"), count(replay_bytes, "replay_bytes"),
            count(replay_total_bytes, "replay_total_bytes", minimum=replay_bytes)) \
            if replay_sessions > 0 else None
        self._call = handler if self.codec is None else self._coded_call
        self.path = socket_path(path, create_dir=True)
        self._lock = threading.Lock()
        self._connections: dict[int, ServerConnection] = {}
        self._starting: set[ServerConnection] = set()   # accepted, hello not yet sent
        self._local = threading.local()                  # .serving: a connection thread
        self._ids = itertools.count(1)
        self._event_ids = itertools.count(1)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._serving = False
        self._drained = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._listener, self._identity = listen(self.path, mode=mode, backlog=backlog)
        self._listener.setblocking(False)
        log.info("listening on %s", self.path)

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
        if self.codec is not None:
            payload = join(self.codec.encode(payload, "event"))
        elif type(payload) is not bytes and not _bytes_like(payload):
            raise TypeError(f"a payload must be a bytes-like object, not "
                            f"{type(payload).__name__}")
        event_id = self._next_event_id()
        # A small payload's frame is the same for every client: encoded once. (Each one
        # still checks it against its client's limit.)
        small: list[Any] | None = None
        if type(payload) is bytes and len(payload) < SCATTER_THRESHOLD_BYTES:
            small = [([_impl.core.encode_frame(MessageType.EVENT, payload, event_id)], [])]
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
        deadline = deadline_after(call_timeout_s(timeout, self.send_timeout))
        endpoint = connection._endpoint
        while True:
            generation = endpoint.pool.generation if endpoint.pool is not None else 0
            view = endpoint.allocate(size)
            if view is not None:
                return view
            assert endpoint.pool is not None
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise Timeout(f"no shared-memory segment came free in time "
                              f"({endpoint.pool.total_bytes} bytes lent out)")
            if endpoint.pool.generation == generation:
                connection._read_aside(min(remaining, _RELEASE_POLL_S))

    def serve_forever(self) -> None:
        """Accept and serve connections until ``shutdown()`` or ``close()``, then drain.
        A ``shutdown()`` that came first (a signal handler's, say) makes it drain at once.

        Raises:
            RuntimeError: the server is already serving, or was closed.
        """
        with self._lock:
            if self._serving or self._drained:
                raise RuntimeError("this server is already serving or closed")
            self._serving = True
        try:
            self._accept_loop()
        finally:
            self._drain(self._shutdown_timeout)
            self._done.set()

    def start(self) -> Server:
        """Serve in a background thread; returns self."""
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
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Internals --------------------------------------------------------------------------

    _shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT_S

    def _new_endpoint(self) -> Endpoint:
        """The protocol state of one connection, with this server's settings."""
        return Endpoint(max_payload=self.max_payload,
                        features=(FEATURE_SHM if self.shm else 0)
                        | (FEATURE_COMPRESSION if self.compress else 0),
                        shm_threshold=self.shm_threshold, shm_pool_bytes=self.shm_pool_bytes,
                        compress_threshold=self.compress_threshold,
                        shm_receive_bytes=self.shm_receive_bytes,
                        shm_receive_segments=self.shm_receive_segments,
                        shared_budgets=self._shm_budgets, writable_lending=self.writable)

    def _count(self, name: str, connection: ServerConnection | None = None) -> None:
        with self._lock:
            self.stats[name] += 1
            if connection is not None and name == "events_dropped":
                connection.events_dropped += 1

    def _overflowed(self, connection: ServerConnection, why: str) -> bool:
        """An Event did not fit ``connection``'s outgoing queue: the slow-consumer policy.
        Returns False (dropped), or raises ConnectionClosed (cut)."""
        if self.slow_consumer == "drop":
            self._count("events_dropped", connection)
            if not connection._dropping:
                connection._dropping = True
                log.warning("dropping Events for %r: %s", connection, why)
            return False
        self._cut(connection, why)
        raise ConnectionClosed(f"connection {connection.id} was cut: {why}")

    def _cut(self, connection: ServerConnection, why: str) -> None:
        """Cut a client that fell behind, once, with a logged reason and a counter."""
        if not connection._cut:
            connection._cut = True
            connection._channel.abort(why)
            connection._open = False
            self._count("slow_consumers_cut")
            log.warning("cut %r: %s", connection, why)

    def _next_event_id(self) -> int:
        return next(self._event_ids)

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        while not self._stop.is_set():
            poller.poll()
            while not self._stop.is_set():
                try:
                    sock, _ = self._listener.accept()
                except BlockingIOError:
                    break
                except OSError as error:   # EMFILE and friends: back off, do not spin
                    log.error("accept failed on %s: %s", self.path, error)
                    self._stop.wait(0.05)
                    break
                try:
                    self._admit(sock)
                except Exception:   # whatever one connection does, accepting goes on
                    log.exception("could not admit a connection on %s", self.path)
                    sock.close()

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        peer = peer_credentials(sock)
        if peer.uid not in self._allowed_uids and peer.gid not in self._allowed_gids:
            log.warning("refused a connection from pid %d uid %d gid %d on %s",
                        peer.pid, peer.uid, peer.gid, self.path)
            _refuse(sock, f"uid {peer.uid} may not connect to this server")
            return
        with self._lock:
            full = len(self._connections) + len(self._starting) >= self.max_connections
        if full:
            self._count("connections_refused")
            log.warning("refused a connection from pid %d on %s: %d connections are open "
                        "(max_connections)", peer.pid, self.path, self.max_connections)
            _refuse(sock, f"the server has {self.max_connections} connections open, its "
                          f"limit (max_connections); try again later")
            return
        set_kernel_timeouts(sock, None, self.send_timeout, set_send=True)
        connection = ServerConnection(self, sock, peer, next(self._ids))
        with self._lock:
            self._starting.add(connection)   # registered once its hello has gone out
        try:
            connection.thread = _start_thread(self._serve, connection,
                                              f"hintens-conn-{connection.id}",
                                              self.thread_stack_bytes)
        except Exception as error:   # RLIMIT_NPROC, a pids cgroup, no memory for a stack
            with self._lock:
                self._starting.discard(connection)
            self._count("connections_refused")
            log.error("refused a connection from pid %d on %s: cannot start its thread: %s",
                      peer.pid, self.path, error)
            _refuse(sock, f"the server cannot start a thread for this connection now "
                          f"({error}); try again later")
            connection._channel.close()
            connection._endpoint.close_shm()
            connection._endpoint.decoder.close()

    def _serve(self, connection: ServerConnection) -> None:
        channel, endpoint = connection._channel, connection._endpoint
        self._local.serving = True
        self._local.connection = connection
        why = ""
        try:
            connection._send([endpoint.hello_frame()])   # the hello goes first, always
            with self._lock:
                self._starting.discard(connection)
                if self._drained:
                    return
                self._connections[connection.id] = connection
            if self.on_connect is not None:
                self.on_connect(connection)
            why = self._serve_frames(connection)
        except ConnectionClosed as error:
            why = str(error)
        except Exception:
            log.exception("connection %r failed", connection)
        finally:
            if channel.aborted is not None and not connection._cut:
                # Cut by the flusher: the client read nothing for send_timeout.
                self._count("slow_consumers_cut")
                log.warning("cut %r: %s", connection, channel.aborted)
            elif why:
                log.debug("%r ended: %s", connection, why)
            if connection._open and channel.queued and not channel.broken:
                try:
                    channel.flush()   # Events pushed to this client before it went
                except OSError:
                    pass
            connection.close()
            channel.close()
            endpoint.close_shm()
            endpoint.decoder.close()   # an unfinished frame's memory and budget, now
            connection._backlog.clear()
            with self._lock:
                self._starting.discard(connection)
                registered = self._connections.pop(connection.id, None) is not None
            if registered and self.on_disconnect is not None:
                try:
                    self.on_disconnect(connection)
                except Exception:
                    log.exception("on_disconnect callback raised")

    def _serve_frames(self, connection: ServerConnection) -> str:
        """Read and answer until the connection ends; returns why it ended."""
        channel, endpoint = connection._channel, connection._endpoint
        decoder = endpoint.decoder
        handler = self._call
        reply_writes = connection._reply_writes

        def on_error(request_id: int, error: Exception) -> bytes:
            return self._error_answer(endpoint, request_id, error)

        frame_started = 0.0
        frame_timeout, idle_timeout = self.frame_timeout, self.idle_timeout
        joined = False   # looked for the session its hello announces
        while True:
            timeout: float | None
            if decoder.in_frame and frame_timeout is not None:
                timeout = max(0.001, frame_timeout - (monotonic() - frame_started))
            else:
                timeout = idle_timeout
            if timeout != connection._receive_timeout:
                connection._set_receive_timeout(timeout)
            was_in_frame, decoded = decoder.in_frame, decoder.frames_decoded
            try:
                # Plain Requests are answered inside the core, read after read, until a
                # read brings something else: that comes back here. (Not while a frame is
                # open: its timeout is on the socket, and the idle one must come back after
                # it.) A session's requests all go through _handle and its replay window.
                if connection.window is None and not endpoint.compressing:
                    rest = channel.serve(handler, on_error, reply_writes, endpoint.small_max,
                                         endpoint.inline_max, not was_in_frame)
                else:
                    rest = channel.receive()
                if rest is None:
                    if decoder.in_frame:
                        return (f"hung up inside a frame ({decoder.pending} bytes of it "
                                f"received)")
                    return "closed by the client"
                items = endpoint.admit(rest, channel.fds) if rest else []
            except BlockingIOError:
                what = "inside a frame" if decoder.in_frame else "idle"
                log.info("closing %r: %s for too long", connection, what)
                return f"{what} for too long"
            except ProtocolError as error:
                items = endpoint.after_error(error, channel.fds)
            except OSError as error:
                return str(error)
            if not joined and endpoint.peer_hello is not None:
                joined = True
                self._join_session(connection)
            if connection._backlog:
                # Replies that waited for shared memory read on meanwhile: serve that too.
                items += connection._take_backlog()
            while items:
                if not self._handle(connection, items):
                    return "closed after a fatal protocol error"
                items = connection._take_backlog()
            if channel.fds and not decoder.in_frame:
                channel.close_fds()   # descriptors no frame claimed: never kept
            if decoder.in_frame and (not was_in_frame or decoder.frames_decoded != decoded
                                     or connection._receive_timeout is None):
                # A frame completed (or an error ended one) in this read, or none was open:
                # the unfinished one began in this read.
                frame_started = monotonic()

    def _join_session(self, connection: ServerConnection) -> None:
        """Once the client's hello is in: the replay window of the session it announced, so
        that all its requests go through it (none through the core's fast path)."""
        assert connection._endpoint.peer_hello is not None
        session = connection._endpoint.peer_hello.entries.get(HelloKey.SESSION_ID)
        if self._replay is not None and session is not None and len(session) == 16:
            connection.session = session
            connection.window = self._replay.window_for(session)

    def _handle(self, connection: ServerConnection, items: list[Any]) -> bool:
        """Serve items the core did not: Events, hellos, violations, and Requests after them.
        False when the connection must close."""
        frame_type = _impl.core.Frame
        out: list[Any] = []   # inline answers, written together, in order
        for index in range(len(items)):
            item = items[index]
            if type(item) is not frame_type:
                if not self._violation(connection, item, out):
                    break
            elif item.type == MessageType.REQUEST:
                item = None   # _answer drops the request (and its lent payload) when it may
                out = self._answer(connection, items, index, out)
            elif item.type == MessageType.EVENT:
                self._deliver_event(connection, item)
            else:
                log.debug("%r sent an unsolicited %s frame; ignored", connection,
                          MessageType(item.type).name)
        else:
            if out:
                connection._send(out)
            return True
        if out:
            connection._send(out)
        return False

    def _answer(self, connection: ServerConnection, items: list[Any], index: int,
                out: list[Any]) -> list[Any]:
        """Answer the Request ``items[index]``. An inline reply joins ``out``; one through
        shared memory goes at once, after what ``out`` held. Returns what is left in ``out``."""
        endpoint = connection._endpoint
        item = items[index]
        request_id = item.request_id
        try:
            if connection.window is None:
                result = self._call(item.payload)
            else:
                ok, result = self._replay_or_run(connection, item)
                if not ok:
                    out.append(result)   # the Error frame that answers it
                    return out
            writes = connection._reply_writes(request_id, result)
            if len(writes) == 1 and not _impl.core.unpack_header(
                    writes[0][0][0]).flags & Flags.SHM:
                out += writes[0][0]   # inline: goes with the others, in order
                return out
            if not _is_echo(endpoint, result):
                # The reply was copied out: drop the request's lent payload now, so that its
                # release reaches the client before the reply does.
                items[index] = item = result = None
            # (An echo names the client's own segment: the release must follow the reply, or
            # the client would free the segment before it.)
            if out:
                connection._send(out)
                out = []
            connection._send_writes(writes)
            items[index] = item = result = None
        except Exception as error:
            out.append(self._error_answer(endpoint, request_id, error))
        return out

    def _replay_or_run(self, connection: ServerConnection, item: Any) -> tuple[bool, Any]:
        """For a connection with a session: run the Request if it is new, or answer it from
        the replay window. Returns ``(True, result)``, or ``(False, error_frame)``."""
        assert connection.window is not None
        request_id = item.request_id
        window = connection.window
        state, kept = window.claim(request_id, self.send_timeout)
        while state == MOVED:   # the memory gave that window up
            assert self._replay is not None
            window = connection.window = self._replay.window_for(connection.session)
            state, kept = window.claim(request_id, self.send_timeout)
        if state == NEW:
            ok, data, result = self._run_once(connection._endpoint, window, item)
            return (True, result) if ok else (False, data)
        if state == ANSWERED and kept is not TOO_LARGE:
            return kept   # (ok, the answer's bytes or its Error frame)
        why = _REPLAY_REFUSALS[state if kept is not TOO_LARGE else "too large"]
        return False, connection._endpoint.error_frame(
            ErrorCode.UNAVAILABLE, f"request {request_id} {why}; it is not run again",
            request_id)

    def _deliver_event(self, connection: ServerConnection, item: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(item.payload if self.codec is None else
                              self.codec.decode(item.payload, "event"), connection)
            except Exception:
                log.exception("on_event callback raised")

    def _violation(self, connection: ServerConnection, error: Any, out: list[Any]) -> bool:
        """A frame that broke the protocol: its Error reply joins ``out``. False if it is
        fatal (the connection closes)."""
        log.info("%r broke the protocol: %s", connection, error)
        reply = connection._endpoint.error_reply(error)
        if reply is not None:
            out.append(reply)
        return not error.fatal

    def _run_once(self, endpoint: Endpoint, window: ReplayWindow,
                  item: Any) -> tuple[bool, bytes, Any]:
        """Run a session's request claimed NEW and remember its answer.

        Returns:
            ``(ok, error_frame, result)``: whether the handler answered, the Error frame that
            answers it when it did not, and the handler's own result, sent as it is (shared
            memory included). The window keeps a copy of the answer, if it is small enough.
        """
        answer: tuple[bool, bytes] = (False, endpoint.error_frame(
            ErrorCode.HANDLER_ERROR, "the handler did not finish", item.request_id))
        try:
            result = self._call(item.payload)
            result = b"" if result is None else result
            if not _bytes_like(result):   # the same Error as without replay
                raise RemoteError(ErrorCode.HANDLER_ERROR, f"handler must return a bytes-like "
                                                           f"object, got {type(result).__name__}")
            with memoryview(result) as view:
                # Copied only if it can be kept: an echo of a (sparse) lent gigabyte must not
                # cost a gigabyte here.
                answer = (True, view.tobytes()) if view.nbytes <= window.max_bytes \
                    else TOO_LARGE
            return True, b"", result
        except Exception as error:
            answer = (False, self._error_answer(endpoint, item.request_id, error))
            return False, answer[1], None
        finally:
            window.finish(item.request_id, answer)

    def _coded_call(self, payload: Any) -> Any:
        """The handler behind a codec: decoded request in, encoded response out. A response
        in parts goes into shared memory when the client negotiated it and it is large."""
        assert self.codec is not None
        out = self.codec.encode(self.handler(self.codec.decode(payload, "request")),
                                "response")
        if not isinstance(out, list):
            return out
        negotiated = self.current_connection()._endpoint.negotiated(FEATURE_SHM)
        return ready(out, self.shm_threshold, self.allocate if negotiated else None)

    @staticmethod
    def _error_answer(endpoint: Endpoint, request_id: int, error: Exception) -> bytes:
        """The Error frame for a handler that raised (or returned something unsendable).

        Raises:
            ConnectionClosed: the client went while we answered it: no answer is due, and
                nothing else on this connection is.
        """
        if isinstance(error, _ClientGone):
            raise error
        if isinstance(error, RemoteError):
            return endpoint.error_frame(error.code, error.message, request_id)
        log.warning("handler failed on request %d", request_id, exc_info=True)
        return endpoint.error_frame(ErrorCode.HANDLER_ERROR, f"{type(error).__name__}: {error}",
                                    request_id)

    def _drain(self, timeout: float | None) -> None:
        with self._lock:
            if self._drained:
                return
            self._drained = True
        self._listener.close()
        remove_socket_file(self.path, self._identity)
        deadline = deadline_after(timeout)
        with self._lock:
            starting = list(self._starting)
        for connection in starting:   # accepted but not serving yet: nothing is in flight
            connection.close()
        for connection in self.connections:
            try:
                connection._sock.shutdown(socket.SHUT_RD)   # queued requests still get read
            except OSError:
                pass
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
