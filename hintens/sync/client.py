"""Sync, thread-safe client over a Unix socket: the public API. How it reads, dispatches
and fails is ``ClientDriver``'s (hintens/sync/driver.py), over the ``Connection`` it shares
with the server side (hintens/sync/connection.py).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import os
import ssl
import threading
from time import monotonic
from typing import (TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, TypeVar, overload)

from .._constants import (
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_MAX_PAYLOAD_BYTES,
    MessageType,
)
from .._errors import (
    ConnectionClosed,
    Timeout,
)
from .._codecs import CodecSpec, codec_from
from .connection import Connection
from .driver import FOREVER, Waiter
from .sender import ClientSender
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
    Hello,
    HelloKey,
)
from .._checks import (
    call_timeout_s,
    deadline_after,
    non_negative_s,
    optional_callable,
    path_like,
    timeout_s,
    uids,
)
from ..transport.address import check_ssl_context, connect, is_tcp, resolve, server_check
from ..transport.ring import available as ring_available
from ..transport.unix import socket_alive

if TYPE_CHECKING:
    from .._codecs import Codec

log = logging.getLogger("hintens")

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0


# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
class Session:
    """A client identity that outlives connections: the request-id counter that a
    ClientPool's connections share, so that an id names one request for the whole session,
    and (``exactly_once``) the id they announce in their hello, so that a server recognises a
    retried request and answers it from its replay window instead of running it again.

    Args:
        exactly_once: announce the session in each hello. False: the connections only share
            the id counter.

    Attributes:
        id: 16 random bytes.
        exactly_once: whether connections announce it.
    """

    __module__ = "hintens"

    def __init__(self, exactly_once: bool = True) -> None:
        self.id = os.urandom(16)
        self.ids = itertools.count(1)
        self.exactly_once = bool(exactly_once)

    def __repr__(self) -> str:
        return f"<Session {self.id.hex()}>"


_R = TypeVar("_R")


class Client(ClientSender, Generic[_R]):
    """A connection to a hintens server.

    Args:
        path: the server's address: a Unix socket path (or ``unix:/path``), or
            ``tcp://host:port`` (``tcp://[::1]:7400`` for IPv6). A Unix socket's default is
            ``$HINTENS_SOCKET``, else ``$XDG_RUNTIME_DIR/hintens.sock``, else
            ``/tmp/hintens-$UID/hintens.sock``. Over TCP there is no shared memory (``shm``
            is off) and no server credentials to check (``server_credentials`` is None).
        ssl_context: TLS over a ``tcp://`` address: an ``ssl.SSLContext`` for the client side
            (``ssl.create_default_context(cafile=...)``; ``load_cert_chain`` on it for a
            server that requires client certificates). The handshake happens on connect; a
            failed one raises ``ConnectError`` with the reason.
        timeout: default seconds to wait for a reply, and for the server to take our bytes;
            None (or ``math.inf``) waits for ever.
        connect_timeout: seconds to wait for the connection, a full accept queue included;
            None waits for ever.
        on_event: called with the payload of each Event the server pushes.
        max_payload: the largest inline payload accepted from the server.
        shm: offer shared memory; payloads of ``shm_threshold`` bytes or more then travel
            through sealed memfd segments toward a server that offers it too.
        shm_threshold: the size from which payloads go through shared memory.
        shm_pool_bytes: the most memory this connection's sending segments may hold; a send
            that finds it all lent out waits for a release until its timeout (reading
            meanwhile, so that the release can arrive). The server's hello can lower it.
        shm_receive_bytes, shm_receive_segments: the most of the server's shared memory this
            connection maps at once (1 GiB, 64 segments). Announced in our hello, so a hintens
            server stays under them; a segment past them is refused (SHM_ERROR) unmapped.
        flush_interval: seconds an Event may wait to share a write with the ones after it
            (default 1 ms). An Event that comes this long or more after the previous one
            leaves at once; a request or ``flush()`` takes queued Events with it. 0 writes
            every Event at once.
        session: draw request ids from this ``Session``, and announce it in the hello if it
            is ``exactly_once`` (a ``ClientPool`` shares one between its connections).
        compress: offer zstd compression (the ``compression`` extra): toward a server that
            offers it too, inline payloads of ``compress_threshold`` bytes (4 KiB) or more
            are compressed when that makes them smaller. Shared memory is never compressed.
        codec: how values become payloads (see ``hintens.Codec``): ``request``,
            ``request_many`` and ``send_event`` then take values and return decoded
            responses, and ``on_event`` gets decoded events. Default: raw bytes.
        server_uids: uids whose servers this client trusts besides its own uid and root. The
            server's uid (SO_PEERCRED) is checked right after connecting, before anything is
            sent, so another local user cannot impersonate the server by binding its path.
        ring: ask for a shared-memory ring (docs/PROTOCOL.md section 9b): toward a server
            that offers one too, over a Unix socket, frames then travel through shared memory
            instead of the socket, and a waiting side spins a moment before it sleeps, so a
            busy pair makes no system calls. Needs the compiled core; ignored over TCP.
        spin: while a request waits for its reply on the socket, try the socket again
            (without the GIL, yielding the CPU between tries) for up to 100 µs before the
            thread sleeps: a reply from a server on another CPU then costs no wake-up of this
            thread, which on a VM is tens of microseconds. The budget adapts: it stays full
            while replies come within 100 µs, halves after each wait that lasted longer (a
            slow server soon costs no spinning), and is tried again now and then; a reply
            that comes in pieces is spun for only until its first bytes. At most one thread
            per CPU beyond the first spins in a process, none while this thread and the
            server are pinned to one same CPU. False: sleep at once. Needs the compiled core
            (over TLS too); a ring spins on its own.

    Raises:
        ConnectError: no server at ``path``.
        UntrustedServerError: the server runs as a uid this client does not trust.
        SocketPathError: ``path`` is too long for the OS, or the default directory is unsafe.
        Timeout: the connection was not accepted in ``connect_timeout``.
        ValueError, TypeError: a bad argument (a timeout that is not positive, say).
    """

    __module__ = "hintens"

    def __new__(cls, *args: Any, codec: CodecSpec = None, **options: Any) -> Any:
        # A codec makes a CodedClient: its request, request_many and send_event take and give
        # values. Without one, the methods are the raw ones, typed as bytes.
        if codec is not None and cls is Client:
            from .coded import CodedClient
            cls = CodedClient
        return object.__new__(cls)

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
                 session: Session | None = None, codec: None = None,
                 compress: bool = False,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES,
                 server_uids: Iterable[int] = (),
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS,
                 ssl_context: ssl.SSLContext | None = None, ring: bool = False,
                 spin: bool = True) -> None: ...

    @overload
    def __init__(self: Client[Any], path: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
                 on_event: Callable[[Any], Any] | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, shm: bool = True,
                 shm_threshold: int = DEFAULT_SHM_THRESHOLD_BYTES,
                 shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
                 session: Session | None = None, codec: str | Codec,
                 compress: bool = False,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES,
                 server_uids: Iterable[int] = (),
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS,
                 ssl_context: ssl.SSLContext | None = None, ring: bool = False,
                 spin: bool = True) -> None: ...

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
                 on_event: Callable[[Any], Any] | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, shm: bool = True,
                 shm_threshold: int = DEFAULT_SHM_THRESHOLD_BYTES,
                 shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
                 session: Session | None = None, codec: CodecSpec = None,
                 compress: bool = False,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES,
                 server_uids: Iterable[int] = (),
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS,
                 ssl_context: ssl.SSLContext | None = None, ring: bool = False,
                 spin: bool = True) -> None:
        checked_timeout = timeout_s(timeout, "timeout")
        connect_timeout = timeout_s(connect_timeout, "connect_timeout")
        flush_interval = non_negative_s(flush_interval, "flush_interval")
        on_event = optional_callable(on_event, "on_event")
        trusted = uids(server_uids, "server_uids")
        self.path = resolve(path_like(path))
        shm = shm and not is_tcp(self.path)   # no shared memory across hosts
        ring = ring and not is_tcp(self.path) and ring_available()
        check_ssl_context(self.path, ssl_context)
        #: Default seconds a request waits for its reply, and a send for the server to take
        #: our bytes (None: for ever).
        self.timeout = checked_timeout
        endpoint = Endpoint(max_payload=max_payload,
                            features=(FEATURE_SHM if shm else 0)
                            | (FEATURE_COMPRESSION if compress else 0)
                            | (FEATURE_RING if ring else 0),
                            shm_threshold=shm_threshold, shm_pool_bytes=shm_pool_bytes,
                            compress_threshold=compress_threshold,
                            shm_receive_bytes=shm_receive_bytes,
                            shm_receive_segments=shm_receive_segments)
        self.session = session
        if session is not None and session.exactly_once:
            endpoint.hello.entries[HelloKey.SESSION_ID] = session.id
        #: The codec (None: raw bytes). With one, the instance is a ``CodedClient``.
        self.codec = codec_from(codec)
        if self.codec is not None and on_event is not None:
            on_raw_event, decode = on_event, self.codec.decode
            on_event = lambda payload: on_raw_event(decode(payload, "event"))  # noqa: E731
        sock = connect(self.path, connect_timeout, ssl_context)
        try:
            #: The server process's pid, uid and gid (SO_PEERCRED), checked before any byte
            #: was sent: our own uid, root, or one of ``server_uids``. None over TCP.
            self.server_credentials = server_check(sock, self.path, trusted)
            connection = Connection(sock, endpoint, shm=shm, stall_timeout=checked_timeout)
            connection.channel.reply_spin = bool(spin)
            self._start(connection,
                        ids=session.ids if session is not None else itertools.count(1),
                        on_event=on_event, flush_interval=flush_interval)
        except BaseException:
            sock.close()
            raise

    # Public API -------------------------------------------------------------------------

    def request(self, payload: Any, timeout: float | None = None, *,
                writable: bool = False, request_id: int | None = None) -> _R:
        """Send a Request and wait for its reply.

        Args:
            payload: any C-contiguous buffer (or a buffer from ``allocate``, sent uncopied).
            timeout: seconds to wait for the reply; default ``self.timeout``.
            writable: a reply through shared memory comes as a writable copy-on-write view
                (MAP_PRIVATE): nothing is copied until written, and writes stay here.
            request_id: retry an earlier attempt under its id (1 to 2**64-1): through an
                exactly-once ``Session``, a server that already ran it answers from its
                replay window instead of running it again. Default: the next id.

        Returns:
            The Response payload, always a ``memoryview`` (so ``with reply:`` and
            ``reply.release()`` work whichever way it came): over the bytes of an inline
            reply, or lent from shared memory (read-only unless ``writable``) until it is
            released or collected. With a codec: the decoded value.

        Raises:
            RemoteError: the server answered with an Error frame (a subclass per code).
            Timeout: no reply in time. The connection stays usable; a late reply is dropped.
            ConnectionClosed: the connection is or became closed.
            ProtocolError: the reply itself was corrupt (for example a bad CRC).
            ValueError: ``request_id`` is out of range, or a request of this client is
                waiting under it.
        """
        seconds = self.timeout if timeout is None else call_timeout_s(timeout, self.timeout)
        deadline = FOREVER if seconds is None else monotonic() + seconds
        retry = request_id is not None
        if not retry:
            request_id = next(self._ids)
        elif type(request_id) is not int or not 0 < request_id < 1 << 64:
            raise ValueError(f"request_id must be an int from 1 to 2**64-1, not {request_id!r}")
        endpoint = self._endpoint
        small = type(payload) is bytes and len(payload) < endpoint.small_max
        writes: Any = ()
        if small:
            pass
        elif type(payload) is bytes and len(payload) < endpoint.inline_max:   # as writes()
            writes = [([self._encode_header(1, payload, request_id), payload], ())]
        else:   # refused here (too large, not bytes-like) before anything is sent
            writes = self._writes(MessageType.REQUEST, payload, request_id, deadline)
        waiter = Waiter()
        # acquire()/release() rather than ``with``: on this path, a ``with`` costs two bound
        # method objects each time.
        lock = self._lock
        lock.acquire()
        try:
            if self._closed_reason is not None:
                raise self._closed_error()
            if retry and request_id in self._waiters:
                endpoint.unsent(writes)
                raise ValueError(f"request {request_id} of this client is waiting already")
            self._waiters[request_id] = waiter
            self._counts.requests += 1
            if writable:
                self._endpoint.writable_ids.add(request_id)
        finally:
            lock.release()
        end = 0   # the stream offset just past our frame, once known
        try:
            # Send first, read after: a thread blocked in send must never hold the reader
            # role, or a peer blocked writing replies to us would never be drained.
            try:
                if small:   # packed into the outbox, behind queued Events, in one write
                    end = self._post(1, payload, request_id)
                else:
                    for buffers, fds in writes:
                        end = self._channel.send(buffers, fds)
            except BaseException as error:
                end = getattr(error, "stream_end", 0)
                self._send_failed(error)
            lock.acquire()   # nobody reading: read our own reply now, no _wait round
            try:
                # (Unless another reader has handed it over already, and so taken it out of
                # _waiters: reading then would wait for bytes that never come.)
                leading = not self._reading and request_id in self._waiters \
                    and self._closed_reason is None
                if leading:
                    self._reading = True
            finally:
                lock.release()
            if leading:
                self._read(deadline - monotonic(), request_id)
            if not waiter.done:
                self._wait(waiter, request_id, deadline)
        except (Timeout, ConnectionClosed) as error:
            self._mark_sent(error, end, request_id)
            self._counts.failed(error)
            raise
        finally:
            if not waiter.done or writable:
                with self._lock:
                    self._waiters.pop(request_id, None)
                    self._endpoint.writable_ids.discard(request_id)
        if waiter.error is not None:
            failure, waiter.error = waiter.error, None
            self._mark_sent(failure, end, request_id)
            self._counts.failed(failure)
            try:
                raise failure
            finally:
                # Its traceback has this frame: were the frame (its waiter) to keep it, the
                # cycle would hold the request's payload until a full collection.
                del failure
        reply = waiter.payload
        # One shape for every raw reply, inline or lent from shared memory: a memoryview,
        # which ``with`` and ``release()`` work on. A codec gets the payload as it came.
        return reply if type(reply) is memoryview or self.codec is not None \
            else memoryview(reply)  # type: ignore[return-value]

    def request_many(self, payloads: Iterable[Any], timeout: float | None = None, *,
                     return_exceptions: bool = False) -> list[Any]:
        """Send several Requests in one write and wait for every reply.

        Args:
            payloads: the request payloads. Small ones are packed into one buffer and leave
                in a single write; large ones travel as ``request`` sends them, in order.
            timeout: seconds for all the replies; default ``self.timeout``.
            return_exceptions: put a request's ``RemoteError`` in its place in the list
                instead of raising the first one.

        Returns:
            The replies, in the order of ``payloads``.

        Raises:
            RemoteError: a request failed (the first in order), unless ``return_exceptions``.
            Timeout: not every reply arrived in time.
            ConnectionClosed: the connection is or became closed.
        """
        deadline = deadline_after(call_timeout_s(timeout, self.timeout))
        items = list(payloads)
        if not items:
            return []
        ids = [next(self._ids) for _ in items]
        waiters = [Waiter() for _ in items]
        with self._lock:
            if self._closed_reason is not None:
                raise self._closed_error()
            self._waiters.update(zip(ids, waiters))
            self._counts.requests += len(ids)
        # Where the batch starts in the stream, or earlier (others may post before us): if
        # any byte after it left, some request of the batch may have run.
        start = self._channel.submitted
        end = 0
        try:
            try:
                small_max = self._endpoint.small_max
                if all(type(p) is bytes and len(p) < small_max for p in items):
                    end = self._channel.post_many(MessageType.REQUEST, items, ids)
                else:
                    for payload, request_id in zip(items, ids):
                        end = self._send_large(MessageType.REQUEST, payload, request_id,
                                               deadline)
            except BaseException as error:
                end = getattr(error, "stream_end", end)
                self._send_failed(error)
            for request_id, waiter in zip(ids, waiters):
                if not waiter.done:
                    self._wait(waiter, request_id, deadline)
        except (Timeout, ConnectionClosed) as error:
            self._mark_sent(error, max(end, start + 1), ids[-1], start)
            self._counts.failed(error)
            raise
        finally:
            with self._lock:
                for request_id in ids:
                    self._waiters.pop(request_id, None)
        replies = []
        raw = self.codec is None
        for waiter in waiters:
            if waiter.error is not None:
                self._counts.failed(waiter.error)
        for waiter in waiters:
            if waiter.error is not None and not return_exceptions:
                failure, waiter.error = waiter.error, None
                try:
                    raise failure
                finally:
                    del failure   # no cycle through this frame (see ``request``)
            reply = waiter.payload if waiter.error is None else waiter.error
            replies.append(memoryview(reply) if raw and type(reply) is bytes else reply)
        return replies

    def send_event(self, payload: Any) -> None:
        """Send an Event; there is no reply.

        Small Events are batched: one that follows the previous Event by less than
        ``flush_interval`` waits in the connection's queue (at most that long) so that the
        Events after it share its write. A request, ``flush()``, ``close()`` or a full queue
        (64 KiB) writes them out sooner; order on the connection is always kept.

        Raises:
            ConnectionClosed: the connection is closed.
            Timeout: the server did not take the bytes within ``self.timeout``.
        """
        if self._closed_reason is None:
            # The common case, a small bytes, in one C call (the channel counts it): this
            # method's own Python steps cost as much as the queueing itself.
            try:
                if self._event_small(payload, self._endpoint.small_max):
                    return
            except BaseException as error:
                self._send_failed(error)
                return
        with self._lock:
            if self._closed_reason is not None:
                raise self._closed_error()
        self._counts.events += 1
        try:
            if type(payload) is not bytes \
                    and memoryview(payload).nbytes < self._endpoint.small_max:
                self._channel.event(payload)
            else:
                self._send_large(MessageType.EVENT, payload, next(self._ids),
                                 deadline_after(self.timeout))
        except (ConnectionClosed, Timeout):
            raise
        except BaseException as error:
            self._send_failed(error)

    def flush(self) -> None:
        """Write out the Events waiting in the queue now, rather than at the flush deadline.

        Raises:
            ConnectionClosed: the connection is or became closed.
            Timeout: the server did not take the bytes within ``self.timeout``.
        """
        if self._closed_reason is not None:
            raise self._closed_error()
        try:
            self._channel.flush()
        except BaseException as error:
            self._send_failed(error)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Client]:
        """Hold the Events sent inside the block and write them together at its end.

        ``with client.batch(): ...`` keeps Events in the connection's queue (bounded: a full
        queue is written out) instead of writing a lone Event at once or at the flush
        deadline. A request inside the block still leaves at once, with the Events before
        it. The hold covers every thread's Events on this connection. The Events are written
        when the block ends, also when it ends by an exception.

        Raises:
            ConnectionClosed, Timeout: as ``flush``, when the block ends.
        """
        self._channel.cork()
        try:
            yield self
        except BaseException:
            self._channel.uncork()
            try:
                self.flush()
            except (ConnectionClosed, Timeout) as error:
                log.warning("events of a failed batch were not sent: %s", error)
            raise
        self._channel.uncork()
        self.flush()

    def allocate(self, size: int, timeout: float | None = None) -> memoryview:
        """A writable buffer inside a shared-memory segment: fill it, then pass it to
        ``request`` or ``send_event`` as the payload, and nothing is copied.

        Once sent, the buffer belongs to the receiver until it releases the segment: do not
        write to it again, and allocate a new one for the next message.

        Args:
            size: bytes.
            timeout: seconds to wait for a free segment; default ``self.timeout``.

        A buffer dropped without being sent (released, or collected) gives its segment
        back to the pool.

        Raises:
            ShmError: the server did not negotiate shared memory (or ``shm=False``), or
                ``size`` is more than the pool (or the server) takes.
            Timeout: every segment of the pool stayed lent out.
            ValueError, TypeError: ``size`` is not a positive int.
        """
        deadline = deadline_after(call_timeout_s(timeout, self.timeout))
        if self._endpoint.peer_hello is None and self._endpoint.pool is not None:
            self._await_hello(min(deadline, self._conn.hello_by))
        return self._until_released(lambda: self._endpoint.allocate(size), deadline)

    @property
    def ring_active(self) -> bool:
        """The connection's frames travel through a shared-memory ring (``ring=True``, and
        the server offered one): true from the server's switch on, which comes before its
        reply to our first request."""
        return self._conn.channel.ring is not None

    @property
    def peer_hello(self) -> Hello | None:
        """The server's capability hello, once it has arrived."""
        return self._endpoint.peer_hello

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost (a send cut mid-frame included)."""
        return self._closed_reason is not None or self._channel.broken

    def is_alive(self) -> bool:
        """Whether this connection can still carry a request: it is not ``closed``, and the
        server has not hung up. The socket is asked now (poll for a hang-up, reading
        nothing), so this sees a server that went away while the connection sat idle.

        Returns:
            False if the connection is closed, lost, or closed by the server.
        """
        return not self.closed and socket_alive(self._sock)

    def wait_for_hello(self, timeout: float) -> Hello | None:
        """Wait until the server's hello (its capabilities, ``peer_hello``) has arrived. A
        hintens server sends it on accept; shared memory and compression are negotiated once
        it is here.

        Args:
            timeout: seconds to wait at most.

        Returns:
            The server's hello, or None if it did not come in time or the connection closed.

        Raises:
            ValueError, TypeError: ``timeout`` is not a positive number of seconds.
        """
        seconds = timeout_s(timeout, "timeout")
        self._await_hello(FOREVER if seconds is None else monotonic() + seconds)
        return self._endpoint.peer_hello

    def close(self) -> None:
        """Write out queued Events, then close the connection. Waiting requests raise
        ConnectionClosed. Idempotent."""
        if self._closed_reason is None and self._channel.queued:
            try:
                self._channel.flush()
            except Exception as error:
                log.warning("closing %s: queued events could not be written: %s", self.path,
                            error)
        self._fail(ConnectionClosed("the client was closed"))
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# help() and inspect show what Client takes, not __new__'s catch-all (*args, **options).
Client.__signature__ = inspect.signature(Client.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(Client.__init__).parameters.values())[1:])
