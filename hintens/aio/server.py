"""An asyncio server, on the same protocol core and with the same settings, limits and wire
as the sync ``hintens.Server``; each connection is driven by the event loop
(``hintens/aio/serving.py``), with no thread per connection.

Shutdown is graceful, as in sync: ``close()`` stops accepting, removes the socket file, and
shuts each connection's read side; what clients had sent already is read and answered, and
connections still busy at the deadline are cut.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import select
import ssl
import threading
from typing import Any, Callable, Iterable

from .._checks import count, timeout_s
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
from ..transport.tls import HANDSHAKE_TIMEOUT_S, TlsStream, plaintext_hint
from .serving import ServerConnection, current, logged

log = logging.getLogger("hintens")

#: Requests (and async callbacks) one connection runs at once as tasks, at most.
DEFAULT_MAX_CONCURRENCY = 256
#: Connections accepted per wake-up of the listening socket, so that a storm of connects
#: does not hold the loop.
_ACCEPT_BATCH = 64
_ACCEPT_BACKOFF_S = 0.05

__all__ = ["Server", "ServerConnection", "DEFAULT_MAX_CONCURRENCY"]


# __module__ is the public name (hintens.aio.X): help(), tracebacks and pickles show it.
class Server(ServerBase):
    """A hintens server on a Unix socket, driven by an asyncio event loop.

    The socket is bound and listening when the constructor returns; ``await start()`` (or
    ``async with``) begins accepting on the running loop, ``await serve_forever()`` accepts
    until ``close()``. Use the server from that loop's thread.

    Args:
        path: where to listen, as for the sync ``Server``: a Unix socket path, ``unix:/path``
            or ``tcp://host:port``, or a list of them.
        handler: called with each Request's payload; returns the Response payload (any
            bytes-like object, or None for an empty one). It may be:

            * ``async def`` (or return an awaitable): each Request runs as a task, so that
              a connection's requests run concurrently, at most ``max_concurrency`` at once;
            * a plain function: it runs right on the loop, in the callback that read the
              Request, and the replies of one read leave in one write. The lowest latency,
              for handlers that do not block; one that blocks stalls the whole server;
            * a plain function with ``threaded=True``: it runs in ``executor`` (a thread
              pool by default), as a task, so that it may block.

            An exception becomes an Error frame: a ``RemoteError`` keeps its code and
            message, anything else is HANDLER_ERROR. The connection stays open either way.
            ``Server.current_connection()`` gives the connection being served.
        on_event: called as ``on_event(payload, connection)`` for each Event from a client:
            a plain function on the loop, an ``async def`` as a task. Dropped when None.
        on_connect, on_disconnect: called with the ``ServerConnection`` (plain or async).
        threaded: run a plain ``handler`` in ``executor`` instead of on the loop.
        executor: a ``concurrent.futures.Executor`` for ``threaded``; default a thread pool
            of the server's own (shut down by ``close``).
        max_concurrency: tasks one connection runs at once (handlers and async callbacks);
            while it has that many, it is not read, so a client cannot make the server start
            tasks without end.

    Every other argument is the sync ``hintens.Server``'s, with the same defaults and
    meaning: ``mode``, ``allow_uids``, ``allow_gids``, ``max_payload``, ``idle_timeout``,
    ``frame_timeout``, ``send_timeout`` (a client that leaves our bytes unread that long is
    cut), ``backlog``, ``shm``, ``writable``, ``shm_threshold``, ``shm_pool_bytes``, the
    ``replay_*`` bounds, ``codec``, ``compress``, ``compress_threshold``,
    ``max_connections``, ``max_pending_bytes``, ``shm_receive_*`` bounds,
    ``send_queue_bytes`` (also: a connection whose outgoing queue holds more is not read, and
    its tasks start no handler, until it drains), ``slow_consumer``, ``ring`` and
    ``ring_bytes``. Over a ring the loop never spins: a read that finds the ring empty (or a
    write that finds it full) asks the client for a wake record on the socket, which the loop
    watches.

    Raises:
        ServerRunningError, SocketPathError, OSError, TypeError, ValueError: as the sync
            ``Server``.
    """

    __module__ = "hintens.aio"

    def __init__(self, path: Addresses = None,
                 handler: Callable[[Any], Any] = echo, *,
                 on_event: Callable[[Any, ServerConnection], Any] | None = None,
                 on_connect: Callable[[ServerConnection], Any] | None = None,
                 on_disconnect: Callable[[ServerConnection], Any] | None = None,
                 threaded: bool = False,
                 executor: concurrent.futures.Executor | None = None,
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
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
                 allow_subjects: Iterable[str] | None = None, ring: bool = False,
                 ring_bytes: int = DEFAULT_RING_CAPACITY) -> None:
        self.max_concurrency = count(max_concurrency, "max_concurrency")
        if executor is not None and not isinstance(executor, concurrent.futures.Executor):
            raise TypeError(f"executor must be a concurrent.futures.Executor, not "
                            f"{type(executor).__name__}")
        self.threaded = bool(threaded)
        self._executor = executor
        self._own_executor = False
        self._connections: dict[int, ServerConnection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._accepting = False
        self._closing = False
        self._closed: asyncio.Event | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        # TLS handshakes under way: the stream, and what ends it.
        self._handshaking: dict[TlsStream, Callable[[BaseException | None], None]] = {}
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
        #: Plain handlers run in the read callback; the rest as tasks.
        self._inline = not self.threaded and not inspect.iscoroutinefunction(handler)
        self._call: Callable[[Any], Any] = handler if self.codec is None else self._coded_call

    # Public API -------------------------------------------------------------------------

    @property
    def connections(self) -> list[ServerConnection]:
        """A snapshot of the open connections."""
        return list(self._connections.values())

    async def start(self) -> Server:
        """Begin accepting connections on the running loop; returns self.

        Raises:
            RuntimeError: the server was closed, or started on another loop.
        """
        loop = asyncio.get_running_loop()
        if self._closing:
            raise RuntimeError("this server is closed")
        if self._loop is not None:
            if self._loop is not loop:
                raise RuntimeError("this server was started on another event loop")
            return self
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._closed = asyncio.Event()
        if self.threaded and self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                thread_name_prefix="hintens-handler")
            self._own_executor = True
        self._accepting = True
        for listener in self._listeners:
            loop.add_reader(listener.sock.fileno(), self._accept, listener)
        return self

    async def serve_forever(self) -> None:
        """Accept and serve until ``close()`` (starting first if need be). Cancelling it
        closes the server.

        Raises:
            RuntimeError: as ``start``.
        """
        await self.start()
        assert self._closed is not None
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            await self.close()
            raise

    async def close(self, timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
        """Stop accepting, answer what clients had sent already, close everything.
        Idempotent.

        Args:
            timeout: seconds to let in-flight requests finish before connections are cut
                (None: wait for them however long they take).

        Raises:
            TypeError, ValueError: ``timeout`` is not a positive number or None.
        """
        seconds = timeout_s(timeout, "timeout")
        if self._closing:
            if self._closed is not None:
                await self._closed.wait()
            return
        self._closing = True
        if self._accepting and self._loop is not None:
            for listener in self._listeners:
                self._loop.remove_reader(listener.sock.fileno())
            self._accepting = False
        self._close_listeners()
        for finish in list(self._handshaking.values()):
            finish(ConnectionAbortedError("the server is closing"))
        open_now = self.connections
        for connection in open_now:
            connection.drain()
        if open_now:
            await asyncio.wait([connection.ended for connection in open_now],
                               timeout=seconds)
        for connection in self.connections:
            log.warning("cutting %r at the shutdown deadline", connection)
            connection._end("cut at the shutdown deadline")
        for task in list(self._tasks):
            task.cancel()
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._closed is not None:
            self._closed.set()
        log.info("server on %s closed", self.path)

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def broadcast(self, payload: Any) -> int:
        """Push an Event to every connected client, without waiting for any of them (as
        the sync ``Server.broadcast``: the slow-consumer policy applies per client).

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
        """From a handler or callback: the connection being served.

        Raises:
            RuntimeError: not called from one of this server's handlers or callbacks.
        """
        connection = current.get()
        if connection is None or connection._server is not self:
            raise RuntimeError("Server.current_connection() is for this server's handlers")
        return connection

    def allocate(self, size: int) -> memoryview:
        """From a handler: ``current_connection().allocate(size)``, a writable buffer in a
        shared-memory segment to return as the response, uncopied.

        Raises:
            RuntimeError: not called from a handler.
            ShmError, Timeout, ValueError, TypeError: as ``ServerConnection.allocate``.
        """
        return self.current_connection().allocate(size)

    # Internals ----------------------------------------------------------------------------

    async def _run(self, payload: Any) -> Any:
        """The handler's result for a Request answered in a task (in the executor when
        ``threaded``), awaited if it is awaitable."""
        if self.threaded:
            assert self._loop is not None
            result = await self._loop.run_in_executor(
                self._executor, contextvars.copy_context().run, self._call, payload)
        else:
            result = self._call(payload)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _coded_call(self, payload: Any) -> Any:
        assert self.codec is not None
        result = self.handler(self.codec.decode(payload, "request"))
        if inspect.isawaitable(result):
            return self._encoded_later(result)
        return self._encoded(result)

    async def _encoded_later(self, awaitable: Any) -> Any:
        return self._encoded(await awaitable)

    def _encoded(self, value: Any) -> Any:
        """A response value as the codec's payload; one in parts goes into one shared-memory
        buffer when the client negotiated it and it is large."""
        assert self.codec is not None
        out = self.codec.encode(value, "response")
        if not isinstance(out, list):
            return out
        connection = current.get()
        return ready(out, self.shm_threshold, connection.allocate
                     if connection is not None and connection.shm else None)

    def _accept(self, listener: Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as error:   # EMFILE and friends: back off, do not spin
                log.error("accept failed on %s: %s", listener.address, error)
                self._pause_accepting()
                return
            try:
                self._admit(sock, listener)
            except Exception:   # whatever one connection does, accepting goes on
                log.exception("could not admit a connection on %s", listener.address)
                sock.close()

    def _pause_accepting(self) -> None:
        loop = self._loop
        if loop is None or not self._accepting:
            return
        for listener in self._listeners:
            loop.remove_reader(listener.sock.fileno())
        self._accepting = False

        def resume() -> None:
            if not self._closing and not self._accepting:
                self._accepting = True
                for listener in self._listeners:
                    loop.add_reader(listener.sock.fileno(), self._accept, listener)

        loop.call_later(_ACCEPT_BACKOFF_S, resume)

    def _admit(self, sock: Any, listener: Listener) -> None:
        assert self._loop is not None
        sock.setblocking(False)
        admitted = self._admissible(sock, len(self._connections) + len(self._handshaking),
                                    listener)
        if admitted is None:
            return
        peer, address = admitted
        if self._tls(listener):
            self._handshake(self._secured(sock, listener), peer, address)
            return
        self._serve_connection(sock, peer, address, shm=not listener.tcp)

    def _serve_connection(self, sock: Any, peer: Any, address: str, *, shm: bool,
                          subject: str | None = None) -> None:
        assert self._loop is not None
        try:
            connection = ServerConnection(self, sock, peer, next(self._ids), self._loop,
                                          address, shm=shm)
        except BaseException:
            sock.close()
            raise
        connection.subject = subject
        self._connections[connection.id] = connection   # listed before its hello goes
        connection.start()
        log.debug("%r connected", connection)
        if self.on_connect is not None:
            self._callback(self.on_connect, connection, "on_connect")

    def _handshake(self, stream: TlsStream, peer: Any, address: str) -> None:
        """Drive a TLS handshake on the loop (reader or writer, as OpenSSL asks), within
        ``frame_timeout``; then serve the connection, or close it, logging why."""
        loop = self._loop
        assert loop is not None
        fd = stream.fileno()
        watching: list[int] = []   # the event we wait for now, if any

        def unwatch() -> None:
            while watching:
                if watching.pop() & select.POLLIN:
                    loop.remove_reader(fd)
                else:
                    loop.remove_writer(fd)

        def step() -> None:
            unwatch()
            try:
                wait = stream.handshake_step()
            except (ssl.SSLError, OSError) as error:
                finish(error)
                return
            if wait is None:
                finish(None)
            elif wait & select.POLLIN:
                watching.append(wait)
                loop.add_reader(fd, step)
            else:
                watching.append(wait)
                loop.add_writer(fd, step)

        def finish(error: BaseException | None) -> None:
            nonlocal step
            # step names itself (to wait again): a cycle that would hold the stream until a
            # full garbage collection. finish runs once per handshake: break it here.
            del step
            unwatch()
            timer.cancel()
            self._handshaking.pop(stream, None)
            if error is not None or self._closing:
                if error is not None:
                    log.info("TLS handshake with %s failed: %s%s", address, error,
                             plaintext_hint(error))
                stream.close()
                return
            try:
                self._serve_connection(stream, peer, address, shm=False,
                                       subject=stream.subject())
            except Exception:
                log.exception("could not admit a connection from %s", address)

        timer = loop.call_later(self.frame_timeout or HANDSHAKE_TIMEOUT_S, finish,
                                TimeoutError("the TLS handshake took too long"))
        self._handshaking[stream] = finish
        step()

    def _unregister(self, connection: ServerConnection) -> None:
        """A connection has ended and been closed."""
        self._retire_stats(connection)
        if self._connections.pop(connection.id, None) is not None \
                and self.on_disconnect is not None:
            self._callback(self.on_disconnect, connection, "on_disconnect")

    def _callback(self, callback: Callable[..., Any], connection: ServerConnection,
                  what: str) -> None:
        token = current.set(connection)
        try:
            result = callback(connection)
        except Exception:
            log.exception("%s callback raised", what)
            return
        finally:
            current.reset(token)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(logged(result, f"{what} callback raised"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

