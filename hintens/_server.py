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
from ._client import RECEIVE_BUFFER_BYTES
from ._codecs import CodecSpec, codec_from, fill, join, size_of
from ._constants import DEFAULT_MAX_PAYLOAD_BYTES, ErrorCode, MessageType
from ._errors import ConnectionClosed, ProtocolError, RemoteError
from ._flusher import FLUSHER
from ._protocol import (
    DEFAULT_COMPRESS_THRESHOLD_BYTES,
    DEFAULT_SHM_POOL_BYTES,
    DEFAULT_SHM_THRESHOLD_BYTES,
    FEATURE_COMPRESSION,
    FEATURE_SHM,
    Endpoint,
    Hello,
    HelloKey,
    plain_frame,
)
from ._replay import (
    ANSWERED,
    DEFAULT_REPLAY_BYTES,
    DEFAULT_REPLAY_SESSIONS,
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
from ._unix import (
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


def echo(payload: Any) -> Any:
    """The default handler: the response is the request."""
    return payload


def _is_echo(endpoint: Endpoint, result: Any) -> bool:
    """The handler returned the payload it was lent: the reply points back at its segment."""
    return type(result) is memoryview and id(result.obj) in endpoint._lent


class ServerConnection:
    """One accepted client, as callbacks see it.

    Attributes:
        id: a number unique within this server.
        peer: the client's pid, uid and gid from SO_PEERCRED.
    """

    def __init__(self, server: Server, sock: socket.socket, peer: PeerCredentials,
                 connection_id: int) -> None:
        self.id = connection_id
        self.peer = peer
        self._server = server
        self._sock = sock
        self._endpoint = server._new_endpoint()
        self._channel = _impl.core.Channel(sock, self._endpoint.decoder, RECEIVE_BUFFER_BYTES)
        self._endpoint.fd_source = self._channel.fds
        self._endpoint.send_control = self._send_control
        self._endpoint.writable_all = server.writable
        self._endpoint.hello.entries[HelloKey.INSTANCE_ID] = server.instance_id
        #: The replay window of the client's session, once its hello announced one.
        self.window: ReplayWindow | None = None
        self.session = b""
        # Without an on_event handler, plain Events are dropped inside the decoder: no Frame,
        # no Python call per Event.
        self._endpoint.decoder.skip_events = server.on_event is None
        self._channel.on_queued = FLUSHER.schedule
        if server.shm:
            self._channel.max_fds = 64
        self._open = True
        self.thread: threading.Thread | None = None

    @property
    def peer_hello(self) -> Hello | None:
        """The client's capability hello, once it has arrived."""
        return self._endpoint.peer_hello

    def send_event(self, payload: Any) -> None:
        """Push an Event to this client.

        Raises:
            ConnectionClosed: the connection is closed or broke while sending.
        """
        if self._server.codec is not None:
            payload = join(self._server.codec.encode(payload, "event"))
        if type(payload) is bytes and len(payload) < self._endpoint.small_max:
            if not self._open:
                raise ConnectionClosed(f"connection {self.id} is closed")
            try:
                self._channel.event(payload)   # batched as the Client batches its Events
            except OSError as error:
                self.close()
                raise ConnectionClosed(
                    f"connection {self.id} lost while sending: {error}") from error
            return
        self._send(self._endpoint.inline(MessageType.EVENT, payload,
                                         self._server._next_event_id()))

    def _send_control(self, payload: bytes) -> None:
        """A release or retire message (an Event with request id 0)."""
        self._channel.send([_impl.core.encode_frame(MessageType.EVENT, payload, 0)])

    def _shm_reply(self, request_id: int, result: Any) -> Any:
        """The writes that carry a large Response through shared memory, or None."""
        return self._endpoint.shm_sends(MessageType.RESPONSE, result, request_id,
                                        deadline_after(self._server.send_timeout))

    def close(self) -> None:
        """Cut this connection now; its serving thread ends."""
        self._open = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, frames: list[Any]) -> None:
        if not self._open:
            raise ConnectionClosed(f"connection {self.id} is closed")
        try:
            self._channel.send(frames)
        except OSError as error:   # BlockingIOError: the send timeout expired
            self.close()
            raise ConnectionClosed(f"connection {self.id} lost while sending: {error}") from error

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} pid={self.peer.pid} uid={self.peer.uid}>"


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
        replay_window, replay_bytes, replay_sessions: the bounds of the exactly-once memory
            for clients that announce a session (``ClientPool(exactly_once=True)``): answers
            kept per session, bytes of them per session, and sessions kept. 0 sessions turns
            it off. See ``hintens._replay``.

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
                 codec: CodecSpec = None, compress: bool = False,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES) -> None:
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
        self._new_endpoint()   # the protocol layer checks its settings: once, and now
        #: Names this run of the server in its hellos: a retry that reaches another run
        #: cannot be answered from this one's replay memory.
        self.instance_id = os.urandom(16)
        self._replay = ReplayMemory(replay_sessions, replay_window, replay_bytes) \
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
        """Push an Event to every connected client.

        Returns:
            How many clients it was written to. A client whose connection broke is skipped.
        """
        if self.codec is not None:
            payload = join(self.codec.encode(payload, "event"))
        event_id = self._next_event_id()
        frames = plain_frame(MessageType.EVENT, payload, event_id)
        sent = 0
        for connection in self.connections:
            try:
                connection._send(connection._endpoint.inline(MessageType.EVENT, payload, event_id)
                                 if connection._endpoint.compressing else frames)
                sent += 1
            except ConnectionClosed:
                pass
        return sent

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
        return connection._endpoint.allocate(size, deadline)

    def serve_forever(self) -> None:
        """Accept and serve connections until ``shutdown()`` or ``close()``, then drain."""
        with self._lock:
            if self._serving or self._stop.is_set():
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
                                else self._shutdown_timeout + 5.0)
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
                        compress_threshold=self.compress_threshold)

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
                self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        peer = peer_credentials(sock)
        if peer.uid not in self._allowed_uids and peer.gid not in self._allowed_gids:
            log.warning("refused a connection from pid %d uid %d gid %d on %s",
                        peer.pid, peer.uid, peer.gid, self.path)
            refusal = Endpoint().error_frame(
                ErrorCode.UNAVAILABLE, f"uid {peer.uid} may not connect to this server", 0)
            try:
                sock.send(refusal, socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            return
        set_kernel_timeouts(sock, None, send_s=self.send_timeout)
        connection = ServerConnection(self, sock, peer, next(self._ids))
        with self._lock:
            self._starting.add(connection)   # registered once its hello has gone out
        connection.thread = threading.Thread(
            target=self._serve, args=(connection,), name=f"hintens-conn-{connection.id}",
            daemon=True)
        connection.thread.start()

    def _serve(self, connection: ServerConnection) -> None:
        sock, endpoint, channel = connection._sock, connection._endpoint, connection._channel
        decoder = endpoint.decoder
        handler = self._call

        def on_error(request_id: int, error: Exception) -> bytes:
            return self._error_answer(endpoint, request_id, error)

        current_timeout: float | None = None
        frame_started = 0.0
        self._local.serving = True
        self._local.connection = connection
        try:
            connection._send([endpoint.hello_frame()])   # the hello goes first, always
            with self._lock:
                self._starting.discard(connection)
                if self._drained:
                    return
                self._connections[connection.id] = connection
            if self.on_connect is not None:
                self.on_connect(connection)
            while True:
                if decoder.in_frame and self.frame_timeout is not None:
                    timeout: float | None = max(
                        0.001, self.frame_timeout - (monotonic() - frame_started))
                else:
                    timeout = self.idle_timeout
                if timeout != current_timeout:
                    set_kernel_timeouts(sock, timeout)
                    current_timeout = timeout
                was_in_frame, decoded = decoder.in_frame, decoder.frames_decoded
                keep_open = True
                try:
                    # Plain Requests are answered inside the core; the rest comes back here.
                    # A session's requests all go through _handle and its replay window.
                    if connection.window is None and not endpoint.compressing:
                        rest = channel.serve(handler, on_error, connection._shm_reply)
                    else:
                        rest = channel.receive()
                    if rest is None:
                        if decoder.in_frame:
                            log.info("%r hung up inside a frame (%d bytes of it received)",
                                     connection, decoder.pending)
                        break
                    if rest:
                        keep_open = self._handle(connection, endpoint.admit(rest))
                except BlockingIOError:
                    what = "inside a frame" if decoder.in_frame else "idle"
                    log.info("closing %r: %s for too long", connection, what)
                    break
                except ProtocolError as error:
                    keep_open = self._handle(connection, endpoint.after_error(error))
                except OSError as error:
                    log.debug("%r: %s", connection, error)
                    break
                if channel.fds and not decoder.in_frame:
                    channel.close_fds()   # descriptors no frame claimed: never kept
                if not keep_open:
                    break
                if decoder.in_frame and (not was_in_frame or decoder.frames_decoded != decoded
                                         or not current_timeout):
                    # A frame completed (or an error ended one) in this read, or none was open:
                    # the unfinished one began in this read.
                    frame_started = monotonic()
        except ConnectionClosed as error:
            log.debug("%s", error)
        except Exception:
            log.exception("connection %r failed", connection)
        finally:
            if connection._open and channel.queued:
                try:
                    channel.flush()   # Events pushed to this client before it went
                except OSError:
                    pass
            connection.close()
            channel.close()
            endpoint.close_shm()
            with self._lock:
                self._starting.discard(connection)
                registered = self._connections.pop(connection.id, None) is not None
            if registered and self.on_disconnect is not None:
                try:
                    self.on_disconnect(connection)
                except Exception:
                    log.exception("on_disconnect callback raised")

    def _handle(self, connection: ServerConnection, items: list[Any]) -> bool:
        """Serve items the core did not: Events, hellos, violations, and Requests after them.
        False when the connection must close."""
        endpoint = connection._endpoint
        frame_type = _impl.core.Frame
        out: list[Any] = []
        keep_open = True
        if connection.window is None and self._replay is not None \
                and endpoint.peer_hello is not None:
            session = endpoint.peer_hello.entries.get(HelloKey.SESSION_ID)
            if session is not None and len(session) == 16:
                connection.session = session
                connection.window = self._replay.window_for(session)
        window = connection.window
        for index, item in enumerate(items):
            if type(item) is frame_type:
                kind = item.type
                if kind == MessageType.REQUEST:
                    request_id = item.request_id
                    try:
                        if window is not None:
                            state, kept = window.claim(request_id, self.send_timeout)
                            while state == MOVED:   # the memory gave that window up
                                assert self._replay is not None
                                window = connection.window = self._replay.window_for(
                                    connection.session)
                                state, kept = window.claim(request_id, self.send_timeout)
                            if state == NEW:
                                ok, data, result = self._run_once(endpoint, window, item)
                            elif state == ANSWERED and kept is not TOO_LARGE:
                                (ok, data), result = kept, kept[1]
                            else:
                                why = _REPLAY_REFUSALS[state if kept is not TOO_LARGE
                                                       else "too large"]
                                out.append(endpoint.error_frame(
                                    ErrorCode.UNAVAILABLE,
                                    f"request {request_id} {why}; it is not run again",
                                    request_id))
                                continue
                            if not ok:
                                out.append(data)   # the Error frame it was answered with
                                continue
                        else:
                            result = self._call(item.payload)
                        result = b"" if result is None else result
                        writes = connection._shm_reply(request_id, result)
                        if writes is None:
                            out += endpoint.inline(MessageType.RESPONSE, result, request_id)
                        else:
                            if not _is_echo(endpoint, result):
                                # The reply was copied out: drop the request's lent payload now,
                                # so its release reaches the client before the reply does.
                                items[index] = item = result = None
                            # (An echo names the client's own segment: the release must follow
                            # the reply, or the client would free the segment before it.)
                            if out:
                                connection._send(out)
                                out = []
                            for buffers, fds in writes:
                                connection._channel.send(buffers, fds)
                            items[index] = item = result = None
                    except Exception as error:
                        out.append(self._error_answer(endpoint, request_id, error))
                elif kind == MessageType.EVENT:
                    if self.on_event is not None:
                        try:
                            self.on_event(item.payload if self.codec is None else
                                          self.codec.decode(item.payload, "event"), connection)
                        except Exception:
                            log.exception("on_event callback raised")
                else:
                    log.debug("%r sent an unsolicited %s frame; ignored", connection,
                              MessageType(kind).name)
            else:
                log.info("%r broke the protocol: %s", connection, item)
                reply = endpoint.error_reply(item)
                if reply is not None:
                    out.append(reply)
                if item.fatal:
                    keep_open = False
                    break
        if out:
            connection._send(out)
        return keep_open

    def _run_once(self, endpoint: Endpoint, window: ReplayWindow,
                  item: Any) -> tuple[bool, bytes, Any]:
        """Run a session's request claimed NEW and remember its answer.

        Returns:
            ``(ok, kept, result)``: the answer as the window keeps it (a copy of the payload,
            or the Error frame), and the handler's own result, sent as it is (shared memory
            included).
        """
        answer: tuple[bool, bytes] = (False, endpoint.error_frame(
            ErrorCode.HANDLER_ERROR, "the handler did not finish", item.request_id))
        try:
            result = self._call(item.payload)
            result = b"" if result is None else result
            with memoryview(result) as view:   # not a buffer: the same Error as without replay
                answer = (True, view.tobytes())
            return True, answer[1], result
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
        total = size_of(out)
        connection = self.current_connection()
        if total >= self.shm_threshold and connection._endpoint.negotiated(FEATURE_SHM):
            return fill(out, self.allocate(total))
        return b"".join(out)

    @staticmethod
    def _error_answer(endpoint: Endpoint, request_id: int, error: Exception) -> bytes:
        """The Error frame for a handler that raised (or returned something unsendable)."""
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
