"""An asyncio client, on the same protocol core as the sync one.

The socket is driven by the event loop itself: ``loop.add_reader`` on its descriptor reads with
``recvmsg`` (the core Channel, which also receives shared-memory descriptors), and what a write
leaves queued is written when ``loop.add_writer`` says the socket takes more. A reply wakes its
waiting future directly, on the loop's thread: no thread hop on the hot path. The protocol's
rules are the protocol layer's: ``Endpoint`` (hello, limits, lending) and ``sort_for_client``
(what each frame read means to a client).

Cancellation loses nothing: a cancelled ``request()`` takes its future out, the connection
stays usable, and a late reply is dropped (a payload lent from shared memory is released when
it is collected, which gives the segment back).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import os
import ssl
import threading
from time import monotonic
from typing import Any, AsyncIterator, Callable, Generic, Iterable, TypeVar, overload

from .._checks import (
    call_timeout_s,
    count,
    non_negative_s,
    optional_callable,
    path_like,
    timeout_s,
    uids,
)
from .._codecs import Codec, CodecSpec, codec_from, ready
from .._constants import (
    DEFAULT_FLUSH_INTERVAL_S, DEFAULT_MAX_PAYLOAD_BYTES, EVENT, MSG_DONTWAIT, REQUEST)
from .._errors import (
    ConnectionClosed, RemoteError, Timeout, closed_error, detached, lost_message,
    no_free_segment)
from .._stats import ClientCounts, public_name
from ..protocol.endpoint import (
    DEFAULT_COMPRESS_THRESHOLD_BYTES,
    DEFAULT_SHM_POOL_BYTES,
    DEFAULT_SHM_RECEIVE_BYTES,
    DEFAULT_SHM_RECEIVE_SEGMENTS,
    DEFAULT_SHM_THRESHOLD_BYTES,
    FEATURE_COMPRESSION,
    FEATURE_RING,
    FEATURE_SHM,
    Endpoint,
)
from ..protocol.hello import Hello, HelloKey
from ..protocol.roles import sort_for_client
from ..sync.client import Session
from ._loop import on_loop
from ._watch import SocketWatch
from ..sync.connection import Connection, mark_sent
from ..transport.address import check_ssl_context, connect, is_tcp, resolve, server_check
from ..transport.ring import available as ring_available
from ..transport.unix import socket_alive

log = logging.getLogger("hintens")
_R = TypeVar("_R")

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Events that wait for events() to take them, at most.
DEFAULT_MAX_QUEUED_EVENTS = 1024
#: How long a large send waits for the server's hello before it goes inline (once).
HELLO_WAIT_S = 1.0
#: A sender waiting for a shared-memory segment looks again at least this often.
_RELEASE_POLL_S = 0.005
_UNBOUNDED = 1 << 62


# __module__ is the public name (hintens.aio.X): help(), tracebacks and pickles show it.
class Client(Generic[_R]):
    """An asyncio connection to a hintens server. Make one with ``await Client.connect(...)``
    or ``async with Client(...) as client``; use it from the loop it was opened on.

    Args:
        path: the server's address: a Unix socket path, ``unix:/path`` or
            ``tcp://host:port`` (the sync ``Client``'s rules; no shared memory over TCP).
        timeout: default seconds to wait for a reply (None: for ever).
        connect_timeout: seconds to wait for the connection (a full accept queue included).
        on_event: called with the payload of each Event the server pushes: a plain function
            runs on the loop, a coroutine function as a task of its own.
        max_payload: the largest inline payload accepted from the server.
        shm: offer shared memory (payloads of ``shm_threshold`` bytes or more then travel
            through sealed memfd segments toward a server that offers it too).
        shm_threshold, shm_pool_bytes: as for the sync ``Client``.
        flush_interval: seconds an Event may wait to share a write with the ones after it.
        server_uids: uids whose servers this client trusts besides its own uid and root.
        codec: how values become payloads (see ``hintens.Codec``): ``request`` and
            ``send_event`` then take values and ``request`` returns decoded responses, and
            ``on_event`` gets decoded Events. Default: raw bytes.
        compress, compress_threshold: zstd compression of inline payloads, as for the sync
            ``Client`` (the ``compression`` extra).
        max_queued_events: Events that wait for ``events()`` to take them, at most; more are
            dropped (counted in ``events_dropped``, logged once per episode).
        shm_receive_bytes, shm_receive_segments: the most of the server's shared memory this
            connection maps at once, as for the sync ``Client``.
        ssl_context: TLS over a ``tcp://`` address, as for the sync ``Client`` (the
            handshake runs with the connect, off the loop's thread).
        session: draw request ids from this ``hintens.Session``, and announce it in the hello
            if it is exactly-once (as a ``ClientPool`` does for its connections).
        ring: ask for a shared-memory ring (docs/PROTOCOL.md section 9b), as the sync
            ``Client``: toward a server that offers one, frames then travel through shared
            memory instead of the socket. The loop never spins: a read that finds the ring
            empty (or a write that finds it full) asks the server for a wake record on the
            socket, which the loop watches (``ring_active`` says if it was negotiated).

    Raises:
        ConnectError, UntrustedServerError, SocketPathError, Timeout: from ``connect`` or
            ``async with``, as the sync ``Client``.
        ValueError, TypeError: a bad argument, from the constructor.
    """

    __module__ = "hintens.aio"

    # The static type says what ``request`` returns: a memoryview without a codec,
    # the codec's values (Any) with one.
    @overload
    def __init__(self: Client[memoryview], path: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
                 on_event: Callable[[Any], Any] | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, shm: bool = True,
                 shm_threshold: int = DEFAULT_SHM_THRESHOLD_BYTES,
                 shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
                 server_uids: Iterable[int] = (), codec: None = None,
                 compress: bool = False,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES,
                 max_queued_events: int = DEFAULT_MAX_QUEUED_EVENTS,
                 session: Session | None = None,
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS,
                 ssl_context: ssl.SSLContext | None = None, ring: bool = False) -> None: ...

    @overload
    def __init__(self: Client[Any], path: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
                 on_event: Callable[[Any], Any] | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, shm: bool = True,
                 shm_threshold: int = DEFAULT_SHM_THRESHOLD_BYTES,
                 shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
                 server_uids: Iterable[int] = (), codec: str | Codec,
                 compress: bool = False,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES,
                 max_queued_events: int = DEFAULT_MAX_QUEUED_EVENTS,
                 session: Session | None = None,
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS,
                 ssl_context: ssl.SSLContext | None = None, ring: bool = False) -> None: ...

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
                 on_event: Callable[[Any], Any] | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, shm: bool = True,
                 shm_threshold: int = DEFAULT_SHM_THRESHOLD_BYTES,
                 shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
                 server_uids: Iterable[int] = (), codec: CodecSpec = None,
                 compress: bool = False,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES,
                 max_queued_events: int = DEFAULT_MAX_QUEUED_EVENTS,
                 session: Session | None = None,
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS,
                 ssl_context: ssl.SSLContext | None = None, ring: bool = False) -> None:
        self.timeout = timeout_s(timeout, "timeout")
        self._connect_timeout = timeout_s(connect_timeout, "connect_timeout")
        self._on_event = optional_callable(on_event, "on_event")
        self._trusted = uids(server_uids, "server_uids")
        self.path = resolve(path_like(path))
        shm = shm and not is_tcp(self.path)   # no shared memory across hosts
        ring = ring and not is_tcp(self.path) and ring_available()
        check_ssl_context(self.path, ssl_context)
        self._ssl_context = ssl_context
        self._shm = shm
        self._flush_interval = non_negative_s(flush_interval, "flush_interval")
        #: The codec (None: raw bytes).
        self.codec = codec_from(codec)
        self._endpoint = Endpoint(max_payload=max_payload,
                                  features=(FEATURE_SHM if shm else 0)
                                  | (FEATURE_COMPRESSION if compress else 0)
                                  | (FEATURE_RING if ring else 0),
                                  shm_threshold=shm_threshold, shm_pool_bytes=shm_pool_bytes,
                                  compress_threshold=compress_threshold,
                                  shm_receive_bytes=shm_receive_bytes,
                                  shm_receive_segments=shm_receive_segments)
        #: The session this client's request ids come from (None: its own count).
        self.session = session
        if session is not None and session.exactly_once:
            self._endpoint.hello.entries[HelloKey.SESSION_ID] = session.id
        self._ids = session.ids if session is not None else itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed_reason: BaseException | None = None
        self._server_error: BaseException | None = None
        self._watch: SocketWatch | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._soon_handle: asyncio.Handle | None = None
        # Our bytes that wait for the server: since when (the channel's written count then),
        # and who waits for room in the queue.
        self._stall_handle: asyncio.TimerHandle | None = None
        self._stall_mark = 0
        self._drained: asyncio.Event | None = None
        self._hello = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_thread = 0
        self._counts = ClientCounts()   # for stats
        # Requests' deadlines (loop time, request id), earliest first, and the one timer.
        self._deadlines: list[tuple[float, int]] = []
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._sweep_at: float | None = None
        # Events for events(): kept from its first call on, at most max_queued_events.
        self._max_queued_events = count(max_queued_events, "max_queued_events")
        self._event_queue: collections.deque[Any] | None = None
        self._events_ready = asyncio.Event()
        self._dropping = False
        #: Events dropped because ``events()`` fell ``max_queued_events`` behind.
        self.events_dropped = 0

    # Opening and closing -----------------------------------------------------------------

    @overload
    @classmethod
    async def connect(cls, path: str | os.PathLike[str] | None = None, *,
                      codec: None = None, **options: Any) -> Client[memoryview]: ...

    @overload
    @classmethod
    async def connect(cls, path: str | os.PathLike[str] | None = None, *,
                      codec: str | Codec, **options: Any) -> Client[Any]: ...

    @classmethod
    async def connect(cls, path: str | os.PathLike[str] | None = None, *,
                      codec: CodecSpec = None, **options: Any) -> Client[Any]:
        """Connect: ``Client(path, **options)``, opened.

        Returns:
            The connected client.

        Raises:
            ConnectError, UntrustedServerError, SocketPathError, Timeout: as the sync
                ``Client``.
            ValueError, TypeError: a bad argument.
        """
        client: Client[Any] = cls(path, codec=codec, **options)
        await client._open()
        return client

    async def __aenter__(self) -> Client[_R]:
        await self._open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def _open(self) -> None:
        if self._conn is not None:
            raise RuntimeError("this client is already connected")
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # connect() waits out a full accept queue in the kernel: off the loop's thread.
        sock = await _connect_off_loop(loop, self.path, self._connect_timeout,
                                       self._ssl_context)
        try:
            #: The server process's pid, uid and gid (SO_PEERCRED), checked before any byte
            #: (None over TCP).
            self.server_credentials = server_check(sock, self.path, self._trusted)
            sock.setblocking(False)
            conn = Connection(sock, self._endpoint, shm=self._shm, stall_timeout=None)
        except BaseException:
            sock.close()
            raise
        conn.channel.flush_interval = self._flush_interval
        # The loop writes what a write left queued: deadline flushes, releases and leftovers.
        conn.channel.on_queued = self._queued_threadsafe
        if self._endpoint.hello.features & FEATURE_RING:
            conn.channel.ring_socket_wakes = True   # the loop waits on the socket, not a futex
        self._conn = conn
        conn.hello_by = monotonic() + HELLO_WAIT_S
        self._watch = SocketWatch(loop, conn.channel.fileno(), conn.channel, self._readable,
                                  self._writable, self._watch_failed, conn.more_buffered)
        self._send([self._endpoint.hello_frame()])
        self._watch.want_read(True)
        if self._shm:
            # A hintens server says hello on accept: shared memory is negotiated once it is
            # here, and allocate() needs that. A server that never says it is waited for a
            # moment only.
            try:
                await asyncio.wait_for(self._hello.wait(), HELLO_WAIT_S)
            except asyncio.TimeoutError:
                pass
            except BaseException:   # cancelled: the half-open connection must not stay
                self._fail(ConnectionClosed(f"connecting to {self.path} was cancelled"))
                raise

    async def close(self) -> None:
        """Write out what is queued if the socket takes it now, then close. Waiting requests
        raise ConnectionClosed. Idempotent."""
        conn = self._conn
        if conn is None or self._closed_reason is not None:
            return
        try:
            conn.channel.flush_due(False)
        except OSError:
            pass
        self._fail(ConnectionClosed("the client was closed"))

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost."""
        return self._closed_reason is not None

    @property
    def peer_hello(self) -> Hello | None:
        """The server's capability hello, once it has arrived."""
        return self._endpoint.peer_hello

    async def wait_for_hello(self, timeout: float) -> Hello | None:
        """Wait until the server's hello (``peer_hello``) has arrived.

        Returns:
            The server's hello, or None if it did not come within ``timeout`` seconds or
            the connection closed.

        Raises:
            ValueError, TypeError: ``timeout`` is not a positive number of seconds.
        """
        seconds = timeout_s(timeout, "timeout")
        if self._endpoint.peer_hello is None and self._closed_reason is None:
            try:
                await asyncio.wait_for(self._hello.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        return self._endpoint.peer_hello

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of this connection's counters, as the sync ``Client.stats``."""
        conn = self._conn
        return self._counts.stats(self._endpoint, conn.channel if conn is not None else None,
                                  len(self._waiters))

    def __repr__(self) -> str:
        state = "closed" if self._closed_reason is not None else \
            "connected" if self._conn is not None else "not connected"
        return f"<{public_name(self)} {self.path} {state}, {len(self._waiters)} in flight>"

    @property
    def ring_active(self) -> bool:
        """The connection's frames travel through a shared-memory ring (``ring=True``, and
        the server offered one): true from the server's switch on, which comes before its
        reply to our first request."""
        conn = self._conn
        return conn is not None and conn.channel.ring is not None

    def is_alive(self) -> bool:
        """Whether this connection can still carry a request: not ``closed``, and the server
        has not hung up (the socket is asked now, reading nothing).

        Returns:
            False if the connection is closed, lost, or closed by the server.
        """
        if self._closed_reason is not None or self._conn is None:
            return False
        return socket_alive(self._conn.sock)

    # Requests and Events -----------------------------------------------------------------

    async def request(self, payload: Any, timeout: float | None = None, *,
                      writable: bool = False, request_id: int | None = None) -> _R:
        """Send a Request and wait for its reply.

        Args:
            payload: any C-contiguous buffer (or a buffer from ``allocate``, sent uncopied).
            timeout: seconds to wait for the reply; default ``self.timeout``.
            writable: a reply through shared memory comes as a writable copy-on-write view.
            request_id: retry an earlier attempt under its id (1 to 2**64-1): through an
                exactly-once session, the server answers it from its replay window instead
                of running it again. Default: the next id.

        Returns:
            The Response payload, always a ``memoryview`` (``with reply:`` works): over an
            inline reply's bytes, or lent from shared memory until released. With a codec:
            the decoded value.

        Raises:
            RemoteError: the server answered with an Error frame.
            Timeout: no reply in time; the connection stays usable. ``request_sent`` says
                whether the server may have the request.
            ConnectionClosed: the connection is or became closed (``request_sent`` as for
                Timeout: False means no server can have run it).
            ValueError: ``request_id`` is out of range, or a request of this client is
                waiting under it already.
            asyncio.CancelledError: cancelled; the connection stays usable, and a late reply
                is dropped.
        """
        seconds = self.timeout if timeout is None else call_timeout_s(timeout, self.timeout)
        loop = self._running()
        if request_id is None:
            request_id = next(self._ids)
        elif type(request_id) is not int or not 0 < request_id < 1 << 64:
            raise ValueError(f"request_id must be an int from 1 to 2**64-1, not {request_id!r}")
        elif request_id in self._waiters:
            raise ValueError(f"request {request_id} of this client is waiting already")
        if self.codec is not None:
            payload = self._encoded(payload, "request")
        endpoint = self._endpoint
        writes = endpoint.writes(REQUEST, payload, request_id) \
            if endpoint.peer_hello is not None else None
        if writes is None:   # the hello, or a free segment, is to be waited for
            writes = await self._writes(REQUEST, payload, request_id, seconds)
        if self._conn is not None and self._conn.channel.queued >= self._conn.channel.max_queue:
            await self._room(seconds)   # the server is not reading: do not queue without end
        future: asyncio.Future[Any] = loop.create_future()
        self._waiters[request_id] = future
        self._counts.requests += 1
        if writable:
            endpoint.writable_ids.add(request_id)
        if seconds is not None:
            self._deadline(loop, loop.time() + seconds, request_id)
        end = 0
        try:
            end = self._send_writes(writes)
            reply = await future
        except (Timeout, ConnectionClosed) as error:
            conn = self._conn
            if conn is not None:
                mark_sent(error, conn.channel, self._closed_reason is None, end, request_id)
            self._counts.failed(error)
            raise
        except RemoteError as error:
            self._counts.failed(error)
            raise
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                # The reply came, but nobody will see it: a view lent from shared memory
                # gives its segment back now, not when the cancelled task is collected.
                late = future.result()
                if type(late) is memoryview:
                    late.release()
            raise
        finally:
            self._waiters.pop(request_id, None)
            if writable:
                endpoint.writable_ids.discard(request_id)
            # A failed future holds its error, whose traceback has this frame: kept here,
            # the cycle would hold the request's payload until a full collection.
            del future
        if self.codec is None:   # one shape for every raw reply, as in the sync client
            return reply if type(reply) is memoryview else memoryview(reply)  # type: ignore[return-value]
        return self.codec.decode(reply, "response")  # type: ignore[no-any-return]

    async def request_many(self, payloads: Iterable[Any],
                           timeout: float | None = None) -> list[_R]:
        """Send several Requests together and wait for every reply, in order.

        Returns:
            The replies, in the order of ``payloads``.

        Raises:
            RemoteError, Timeout, ConnectionClosed: as ``request``; the first failure in
                order.
        """
        return list(await asyncio.gather(*(self.request(p, timeout) for p in payloads)))

    async def send_event(self, payload: Any) -> None:
        """Send an Event (no reply). Small Events are batched as in the sync client: one that
        comes within ``flush_interval`` of the previous one waits (at most that long) to
        share its write.

        Raises:
            ConnectionClosed: the connection is closed.
            Timeout: the outgoing queue was full (the server reads nothing) for
                ``self.timeout``.
        """
        self._running()
        self._counts.events += 1
        if self.codec is not None:
            payload = self._encoded(payload, "event")
        writes = await self._writes(EVENT, payload, next(self._ids), self.timeout)
        conn = self._live()
        if conn.channel.queued >= conn.channel.max_queue:
            await self._room(self.timeout)
        try:
            if conn.offer(writes, _UNBOUNDED):
                return
        except OSError as error:
            self._fail(ConnectionClosed(f"connection to {self.path} lost: {error}"), error)
            raise self._closed_error() from error

    def allocate(self, size: int) -> memoryview:
        """A writable buffer inside a shared-memory segment: fill it, then pass it to
        ``request`` or ``send_event`` as the payload, and nothing is copied. Once sent, it
        belongs to the receiver until released; a buffer dropped unsent gives its segment
        back.

        Raises:
            ShmError: the server did not negotiate shared memory (or ``shm=False``), or
                ``size`` is more than the pool (or the server) takes.
            Timeout: every segment of the pool is lent out right now.
            ValueError, TypeError: ``size`` is not a positive int.
        """
        self._live()
        view = self._endpoint.allocate(size)
        if view is None:
            raise no_free_segment(self._endpoint.pool, waited=False)
        return view

    async def events(self) -> AsyncIterator[Any]:
        """The server's Events, in order, as they arrive (decoded by the codec, if any), until
        the connection closes. For a client made without ``on_event``; Events that came
        before the first call are not kept. One consumer at a time.

        Raises:
            RuntimeError: the client has an ``on_event`` callback.
        """
        if self._on_event is not None:
            raise RuntimeError("this client delivers Events to its on_event callback")
        if self._event_queue is None:
            self._event_queue = collections.deque()
        queue = self._event_queue
        while True:
            while queue:
                payload = queue.popleft()
                yield payload if self.codec is None else self.codec.decode(payload, "event")
            if self._closed_reason is not None:
                return
            self._events_ready.clear()
            await self._events_ready.wait()

    async def flush(self) -> None:
        """Write out queued Events now (those the socket does not take yet leave as soon as
        it does)."""
        self._flush()

    # Internals ---------------------------------------------------------------------------

    def _encoded(self, value: Any, kind: str) -> Any:
        """A value as the codec's payload; parts of a large one go into one shared-memory
        buffer when the server negotiated it."""
        assert self.codec is not None
        endpoint = self._endpoint
        return ready(self.codec.encode(value, kind), endpoint.shm_threshold,
                     self.allocate if endpoint.negotiated(FEATURE_SHM) else None)

    def _running(self) -> asyncio.AbstractEventLoop:
        if self._closed_reason is not None:
            raise self._closed_error()
        if self._conn is None or self._loop is None:
            raise RuntimeError("this client is not connected: await Client.connect(...) or "
                               "use async with")
        return self._loop

    def _live(self) -> Connection:
        if self._closed_reason is not None or self._conn is None:
            raise self._closed_error()
        return self._conn

    async def _writes(self, msg_type: int, payload: Any, request_id: int,
                      seconds: float | None) -> list[Any]:
        """The protocol's writes for a payload, waiting for the server's hello when shared
        memory may carry it, and for a segment to come free when all are lent out."""
        endpoint = self._endpoint
        if endpoint.peer_hello is None:
            # A large payload waits (briefly) for the server's hello: its limit, and whether
            # shared memory may carry it, are known only then. Until HELLO_WAIT_S after
            # connecting at most: a server that has not said it by then says none, and no
            # send waits for it again (the loop still reads a late one).
            try:
                size = memoryview(payload).nbytes
            except TypeError:
                size = 0
            wait = self._live().hello_by - monotonic()
            if size >= endpoint.shm_threshold and wait > 0:
                try:
                    await asyncio.wait_for(self._hello.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        loop = self._running()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            writes = endpoint.writes(msg_type, payload, request_id)
            if writes is not None:
                return writes
            if deadline is not None and loop.time() >= deadline:
                raise no_free_segment(endpoint.pool)
            await asyncio.sleep(_RELEASE_POLL_S)   # the releases arrive through _readable
            self._live()

    def _deadline(self, loop: asyncio.AbstractEventLoop, at: float, request_id: int) -> None:
        """Fail ``request_id``'s future with Timeout at ``at`` (loop time), unless answered.

        One timer serves all requests: deadlines wait in a heap, and the timer wakes at the
        earliest (a timer per request cost a third of the throughput of 100 tasks). Entries
        of requests answered meanwhile are dropped when they come up, or all at once when
        they outnumber the requests still waiting."""
        heap = self._deadlines
        heapq.heappush(heap, (at, request_id))
        if self._sweep_at is None or at < self._sweep_at:
            if self._sweep_handle is not None:
                self._sweep_handle.cancel()
            self._sweep_at = at
            self._sweep_handle = loop.call_at(at, self._sweep)

    def _sweep(self) -> None:
        self._sweep_handle = self._sweep_at = None
        loop, heap, waiters = self._loop, self._deadlines, self._waiters
        assert loop is not None
        now = loop.time()
        while heap and heap[0][0] <= now:
            _, request_id = heapq.heappop(heap)
            future = waiters.get(request_id)
            if future is not None and not future.done():
                future.set_exception(Timeout(f"no reply to request {request_id} from "
                                             f"{self.path} in time"))
        if len(heap) > 2 * len(waiters) + 1024:
            heap[:] = [entry for entry in heap if entry[1] in waiters]
            heapq.heapify(heap)
        if heap and self._closed_reason is None:
            self._sweep_at = heap[0][0]
            self._sweep_handle = loop.call_at(self._sweep_at, self._sweep)

    def _send(self, frames: list[Any]) -> None:
        self._send_writes([(frames, [])])

    def _send_writes(self, writes: list[Any]) -> int:
        """Queue writes on the channel; they leave together with the others queued in this
        turn of the loop, and what the socket does not take then leaves when the loop says it
        is writable. Returns the stream offset just past them."""
        conn = self._live()
        try:
            conn.channel.offer(writes, _UNBOUNDED, False)
        except OSError as error:
            self._fail(ConnectionClosed(f"connection to {self.path} lost: {error}"), error)
            raise self._closed_error() from error
        return int(conn.channel.submitted)   # the write leaves at the end of this turn

    def _flush(self) -> None:
        conn = self._conn
        if conn is None or self._closed_reason is not None:
            return
        try:
            left = conn.channel.flush_due(False)
        except OSError as error:
            self._fail(ConnectionClosed(f"connection to {self.path} lost: {error}"), error)
            return
        if conn.channel.broken:
            self._fail(ConnectionClosed(f"connection to {self.path} lost while writing"))
            return
        if left:
            if self._watch is not None:
                self._watch.want_write(True)
            if self._stall_handle is None and self.timeout is not None \
                    and self._loop is not None:
                self._stall_mark = conn.channel.written
                self._stall_handle = self._loop.call_later(self.timeout, self._stalled)
        elif self._stall_handle is not None:
            self._stall_handle.cancel()
            self._stall_handle = None
        drained = self._drained
        if drained is not None and conn.channel.queued < conn.channel.max_queue:
            self._drained = None
            drained.set()

    def _stalled(self) -> None:
        """``timeout`` seconds since our bytes began to wait for the server: unless it took
        some meanwhile, it reads nothing, and the connection is cut (as the sync client's
        flusher cuts it)."""
        self._stall_handle = None
        conn = self._conn
        if conn is None or self._closed_reason is not None or not conn.channel.queued:
            return
        if conn.channel.written != self._stall_mark:
            self._flush()   # it reads, slowly: look again in another timeout
            return
        self._fail(ConnectionClosed(
            f"the server at {self.path} read nothing for {self.timeout:g} s while "
            f"{conn.channel.queued} bytes waited for it; the connection was cut"))

    async def _room(self, seconds: float | None) -> None:
        """Wait until the outgoing queue is under ``max_queue`` bytes again (the server reads
        what waits), for ``seconds`` at most.

        Raises:
            Timeout: it stayed full; nothing more was queued.
            ConnectionClosed: the connection closed meanwhile.
        """
        conn = self._live()
        self._flush()
        while conn.channel.queued >= conn.channel.max_queue:
            if self._drained is None:
                self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), seconds)
            except asyncio.TimeoutError:
                raise Timeout(f"the server at {self.path} took none of our "
                              f"{conn.channel.queued} queued bytes in {seconds:g} s") from None
            self._live()

    def _flush_soon(self) -> None:
        self._soon_handle = None
        self._flush()

    def _writable(self) -> None:
        if self._watch is not None:
            self._watch.want_write(False)
        self._flush()

    def _watch_failed(self, error: BaseException) -> None:
        if isinstance(error, OSError):
            self._fail(ConnectionClosed(self._lost_message(error)), error)
            return
        log.warning("closing the connection to %s: the server broke the protocol: %s",
                    self.path, error)
        self._fail(ConnectionClosed(f"connection to {self.path} closed: the server broke "
                                    f"the protocol: {error}"), error)

    def _queued_threadsafe(self, channel: Any, soon: bool = False) -> None:
        """The channel's ``on_queued``: from any thread (a release, on the thread that dropped
        a view). The flush runs on the loop: at once, or at the Event deadline."""
        on_loop(self._loop, self._loop_thread, self._queued, soon)

    def _queued(self, soon: bool) -> None:
        if soon:
            # At the end of this turn of the loop: the requests of every task that runs in
            # it leave in one write (100 tasks: one sendmsg, not 100).
            if self._soon_handle is None and self._loop is not None:
                self._soon_handle = self._loop.call_soon(self._flush_soon)
        elif self._flush_handle is None and self._loop is not None:
            def due() -> None:
                self._flush_handle = None
                self._flush()
            self._flush_handle = self._loop.call_later(self._flush_interval, due)

    def _readable(self) -> None:
        conn = self._conn
        if conn is None or self._closed_reason is not None:
            return
        try:
            items = conn.read(MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail(ConnectionClosed(self._lost_message(error)), error)
            return
        if items is None:
            self._fail(ConnectionClosed(self._lost_message(None)), self._server_error)
            return
        if self._endpoint.peer_hello is not None and not self._hello.is_set():
            self._hello.set()
        if items:
            self._dispatch(items)
        if conn.more_buffered() and self._closed_reason is None and self._watch is not None:
            # Decrypted TLS bytes, or a ring's: the fd will not tell of them.
            self._watch.read_soon()

    def _dispatch(self, items: list[Any]) -> None:
        sorted_items = sort_for_client(self._endpoint, items)
        waiters = self._waiters
        for request_id, payload in sorted_items.replies:
            future = waiters.pop(request_id, None)
            if future is None or future.done():
                log.debug("dropping a late reply to request %d", request_id)
            else:
                future.set_result(payload)
        for request_id, error in sorted_items.failures:
            future = waiters.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(error)
        for dropped in sorted_items.dropped:
            log.warning("dropped a bad frame from %s: %s", self.path, dropped)
        if sorted_items.server_error is not None:
            self._server_error = sorted_items.server_error
            log.warning("server at %s reports: %s", self.path, sorted_items.server_error)
        if sorted_items.answers:
            try:
                self._send(sorted_items.answers)
            except ConnectionClosed:
                pass
        if self._on_event is not None:
            for payload in sorted_items.events:
                self._deliver(payload)
        elif self._event_queue is not None and sorted_items.events:
            self._queue_events(sorted_items.events)
        if sorted_items.fatal is not None:
            error = sorted_items.fatal
            log.warning("closing the connection to %s: the server broke the protocol: %s",
                        self.path, error)
            self._fail(ConnectionClosed(f"connection to {self.path} closed: the server broke "
                                        f"the protocol: {error}"), error)

    def _queue_events(self, payloads: list[Any]) -> None:
        queue = self._event_queue
        assert queue is not None
        for payload in payloads:
            if len(queue) < self._max_queued_events:
                queue.append(payload)
                self._dropping = False
            else:
                self.events_dropped += 1
                if not self._dropping:
                    self._dropping = True
                    log.warning("dropping Events from %s: events() is %d behind "
                                "(max_queued_events)", self.path, len(queue))
        self._events_ready.set()

    def _deliver(self, payload: Any) -> None:
        assert self._on_event is not None
        try:
            if self.codec is not None:
                payload = self.codec.decode(payload, "event")
            result = self._on_event(payload)
        except Exception:
            log.exception("on_event callback raised")
            return
        if asyncio.iscoroutine(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._event_done)

    def _event_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_event callback raised", exc_info=task.exception())

    def _lost_message(self, error: OSError | None) -> str:
        aborted = self._conn.channel.aborted if self._conn is not None else None
        return lost_message(self.path, self._server_error, aborted, error,
                            self._endpoint.peer_hello is None)

    def _closed_error(self) -> ConnectionClosed:
        if self._closed_reason is None:
            return ConnectionClosed(f"the client for {self.path} is not connected")
        return closed_error(self._closed_reason, self.path)

    def _fail(self, reason: ConnectionClosed, cause: BaseException | None = None) -> None:
        if self._closed_reason is not None:
            return
        if cause is not None:
            reason.__cause__ = detached(cause)
        self._closed_reason = reason
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(self._closed_error())
        self._waiters.clear()
        for handle in (self._flush_handle, self._soon_handle, self._stall_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._soon_handle = self._stall_handle = None
        if self._drained is not None:
            self._drained.set()   # a sender waiting for room sees the connection closed
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = self._sweep_at = None
        self._deadlines.clear()
        self._events_ready.set()   # events() ends once it has taken what is queued
        conn = self._conn
        if conn is not None and self._loop is not None:
            if self._watch is not None and conn.channel.fileno() >= 0:
                self._watch.close()
            dropped = conn.close()
            conn.channel.on_queued = None   # no cycle through the channel keeps us alive
            if dropped:
                log.warning("connection to %s closed with %d bytes of queued frames unsent",
                            self.path, dropped)


async def _connect_off_loop(loop: asyncio.AbstractEventLoop, path: str,
                            timeout: float | None, ssl_context: ssl.SSLContext | None) -> Any:
    """``connect(path, timeout)`` in the loop's executor. Cancelled meanwhile, the socket the
    thread still opens is closed, not left to the garbage collector."""
    lock = threading.Lock()
    state: dict[str, Any] = {"cancelled": False, "sock": None}

    def attempt() -> Any:
        sock = connect(path, timeout, ssl_context)
        with lock:
            if state["cancelled"]:
                sock.close()
                raise ConnectionClosed(f"connecting to {path} was cancelled")
            state["sock"] = sock
        return sock

    try:
        return await loop.run_in_executor(None, attempt)
    except asyncio.CancelledError:
        with lock:
            state["cancelled"] = True
            if state["sock"] is not None:
                state["sock"].close()
        raise
