"""Sync, thread-safe client over a Unix socket.

Reading uses leader/follower, not a reader thread. A thread that waits for a reply becomes
the reader if nobody is reading. It recv()s, hands every decoded frame to its waiter, and
gives the role back. A single thread that issues request after request therefore reads its
own replies: no thread hand-off, no queue. Many threads can share a client. Replies are
matched by request id and may come in any order.

Events from the server go to ``on_event``. They are delivered by the thread that read them,
after it has released the reader role, so a callback may itself call ``request()``. While no
request is in flight, a small pump thread (started only when ``on_event`` is given) reads
them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import select
import socket
import threading
from time import monotonic
from typing import (TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, NoReturn, Sequence,
                    TypeVar, overload)

from . import _impl
from ._constants import (
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_MAX_PAYLOAD_BYTES,
    ErrorCode,
    MessageType,
)
from ._errors import (
    ConnectionClosed,
    ProtocolError,
    ShmError,
    Timeout,
    decode_error_payload,
    remote_error,
)
from ._codecs import CodecSpec, codec_from, ready
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
from ._checks import (
    call_timeout_s,
    deadline_after,
    non_negative_s,
    optional_callable,
    path_like,
    timeout_s,
    lock_wait_s,
    uids,
)
from .transport.unix import check_server, connect, set_kernel_timeouts, socket_path

if TYPE_CHECKING:
    from ._codecs import Codec

log = logging.getLogger("hintens")

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: How long a large send waits for the server's hello before it goes inline (once).
HELLO_WAIT_S = 1.0
#: A kernel receive timeout may overshoot a request's deadline by this much at most.
_TIMEOUT_SLACK_S = 0.01
_FOREVER = math.inf
#: A sender waiting for a segment looks again at least this often (whether to read itself).
_RELEASE_POLL_S = 0.05
#: Codes of the Errors a server sends just before it hangs up (PROTOCOL.md 6).
_FATAL_CODES = (ErrorCode.BAD_HEADER, ErrorCode.TOO_LARGE)


_NOTHING: tuple[tuple[()], tuple[()]] = ((), ())


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

    def __init__(self, exactly_once: bool = True) -> None:
        self.id = os.urandom(16)
        self.ids = itertools.count(1)
        self.exactly_once = bool(exactly_once)

    def __repr__(self) -> str:
        return f"<Session {self.id.hex()}>"


class _Waiter:
    # Class-level defaults and no __init__: creating one runs no Python frame.
    done = False
    payload: Any = None
    error: BaseException | None = None
    # A lock of its own, held while parked, released by the thread that wakes it. Waking one
    # thread at a time (its reply came, or it is to read next) avoids waking every waiter.
    wake: Any = None


_R = TypeVar("_R")


class Client(Generic[_R]):
    """A connection to a hintens server.

    Args:
        path: the server's socket; default ``$HINTENS_SOCKET``, else
            ``$XDG_RUNTIME_DIR/hintens.sock``, else ``/tmp/hintens-$UID/hintens.sock``.
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
            leaves at once; a request or ``flush()`` takes queued Events with it. 0 writes every Event
            at once.
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

    Raises:
        ConnectError: no server at ``path``.
        UntrustedServerError: the server runs as a uid this client does not trust.
        SocketPathError: ``path`` is too long for the OS, or the default directory is unsafe.
        Timeout: the connection was not accepted in ``connect_timeout``.
        ValueError, TypeError: a bad argument (a timeout that is not positive, say).
    """

    def __new__(cls, *args: Any, codec: CodecSpec = None, **options: Any) -> Any:
        # A codec makes a CodedClient: its request, request_many and send_event take and give
        # values. Without one, the methods are the raw ones, typed as bytes.
        if codec is not None and cls is Client:
            from ._coded import CodedClient
            cls = CodedClient
        return object.__new__(cls)

    # The static type says what ``request`` returns: bytes (or a lent view) without a codec,
    # the codec's values (Any) with one.
    @overload
    def __init__(self: Client[bytes | memoryview], path: str | os.PathLike[str] | None = None, *,
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
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS) -> None: ...

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
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS) -> None: ...

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
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS) -> None:
        checked_timeout = timeout_s(timeout, "timeout")
        connect_timeout = timeout_s(connect_timeout, "connect_timeout")
        flush_interval = non_negative_s(flush_interval, "flush_interval")
        on_event = optional_callable(on_event, "on_event")
        trusted = uids(server_uids, "server_uids")
        self.path = socket_path(path_like(path))
        #: Default seconds a request waits for its reply, and a send for the server to take
        #: our bytes (None: for ever).
        self.timeout = timeout = checked_timeout
        self._endpoint = Endpoint(max_payload=max_payload,
                                  features=(FEATURE_SHM if shm else 0)
                                  | (FEATURE_COMPRESSION if compress else 0),
                                  shm_threshold=shm_threshold, shm_pool_bytes=shm_pool_bytes,
                                  compress_threshold=compress_threshold,
                                  shm_receive_bytes=shm_receive_bytes,
                                  shm_receive_segments=shm_receive_segments)
        self._frame_type = _impl.core.Frame
        self._encode_frame = _impl.core.encode_frame
        self._encode_header = _impl.core.encode_header
        # State lives under one C-level lock. Threads that must sleep use a Condition over the
        # same lock, and are notified only when ``_sleepers`` says some exist: the lone-thread
        # path never enters threading.Condition's Python code.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sleepers = 0   # threads in _cond.wait (the hello and event-pump waits)
        self._parked: dict[int, _Waiter] = {}   # request threads asleep, by request id
        self._reading = False
        self._waiters: dict[int, _Waiter] = {}
        self.session = session
        self._ids = session.ids if session is not None else itertools.count(1)
        if session is not None and session.exactly_once:
            self._endpoint.hello.entries[HelloKey.SESSION_ID] = session.id
        self._closed_reason: BaseException | None = None
        self._server_error: BaseException | None = None
        self._close_pending = False
        self._receive_timeout: float | None = None
        #: The codec (None: raw bytes). With one, the instance is a ``CodedClient``.
        self.codec = codec_from(codec)
        if self.codec is not None:
            if on_event is not None:
                on_raw_event, decode = on_event, self.codec.decode
                on_event = lambda payload: on_raw_event(decode(payload, "event"))  # noqa: E731
        self._on_event = on_event
        self._sock = connect(self.path, connect_timeout)
        try:
            #: The server process's pid, uid and gid (SO_PEERCRED), checked before any byte
            #: was sent: our own uid, root, or one of ``server_uids``.
            self.server_credentials = check_server(self._sock, self.path, trusted)
            # Events waiting on a server that reads nothing for ``timeout``: the flusher cuts.
            self._channel = open_channel(self._sock, self._endpoint, shm=shm,
                                         stall_timeout=timeout)
            self._channel.flush_interval = flush_interval
            self._post = self._channel.post
            self._event = self._channel.event
            set_kernel_timeouts(self._sock, None, timeout, set_send=True)
            self._send([self._endpoint.hello_frame()])
        except BaseException:
            self._sock.close()
            raise
        self._pump: threading.Thread | None = None
        if on_event is not None:
            self._pump = threading.Thread(target=self._pump_events, name="hintens-client-events",
                                          daemon=True)
            self._pump.start()

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
            The Response payload: ``bytes``, or a ``memoryview`` (read-only unless
            ``writable``) lent from shared memory until it is released.

        Raises:
            RemoteError: the server answered with an Error frame (a subclass per code).
            Timeout: no reply in time. The connection stays usable; a late reply is dropped.
            ConnectionClosed: the connection is or became closed.
            ProtocolError: the reply itself was corrupt (for example a bad CRC).
            ValueError: ``request_id`` is out of range, or a request of this client is
                waiting under it.
        """
        seconds = self.timeout if timeout is None else call_timeout_s(timeout, self.timeout)
        deadline = _FOREVER if seconds is None else monotonic() + seconds
        retry = request_id is not None
        if not retry:
            request_id = next(self._ids)
        elif type(request_id) is not int or not 0 < request_id < 1 << 64:
            raise ValueError(f"request_id must be an int from 1 to 2**64-1, not {request_id!r}")
        endpoint = self._endpoint
        small = type(payload) is bytes and len(payload) < endpoint.small_max
        writes: list[Any] = []
        if small:
            pass
        elif type(payload) is bytes and len(payload) < endpoint.inline_max:   # as writes()
            writes = [([self._encode_header(1, payload, request_id), payload], ())]
        else:   # refused here (too large, not bytes-like) before anything is sent
            writes = self._writes(MessageType.REQUEST, payload, request_id, deadline)
        waiter = _Waiter()
        with self._lock:
            if self._closed_reason is not None:
                raise self._closed_error()
            if retry and request_id in self._waiters:
                self._endpoint.unsent(writes)
                raise ValueError(f"request {request_id} of this client is waiting already")
            self._waiters[request_id] = waiter
            if writable:
                self._endpoint.writable_ids.add(request_id)
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
            with self._lock:   # nobody reading: read our own reply now, no _wait round
                leading = not self._reading and self._closed_reason is None
                if leading:
                    self._reading = True
            if leading:
                self._read(deadline - monotonic(), request_id)
            if not waiter.done:
                self._wait(waiter, request_id, deadline)
        except (Timeout, ConnectionClosed) as error:
            self._mark_sent(error, end, request_id)
            raise
        finally:
            if not waiter.done or writable:
                with self._lock:
                    self._waiters.pop(request_id, None)
                    self._endpoint.writable_ids.discard(request_id)
        if waiter.error is not None:
            self._mark_sent(waiter.error, end, request_id)
            raise waiter.error
        return waiter.payload

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
        waiters = [_Waiter() for _ in items]
        with self._lock:
            if self._closed_reason is not None:
                raise self._closed_error()
            self._waiters.update(zip(ids, waiters))
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
            raise
        finally:
            with self._lock:
                for request_id in ids:
                    self._waiters.pop(request_id, None)
        replies = []
        for waiter in waiters:
            if waiter.error is not None and not return_exceptions:
                raise waiter.error
            replies.append(waiter.payload if waiter.error is None else waiter.error)
        return replies

    def send_event(self, payload: Any) -> None:
        """Send an Event; there is no reply.

        Small Events are batched: one that follows the previous Event by less than
        ``flush_interval`` waits in the connection's queue (at most that long) so that the Events after it share
        its write. A request, ``flush()``, ``close()`` or a full queue (64 KiB) writes them
        out sooner; order on the connection is always kept.

        Raises:
            ConnectionClosed: the connection is closed.
            Timeout: the server did not take the bytes within ``self.timeout``.
        """
        if self._closed_reason is None and type(payload) is bytes \
                and len(payload) < self._endpoint.small_max:
            try:
                self._event(payload)
            except BaseException as error:
                self._send_failed(error)
            return
        with self._lock:
            if self._closed_reason is not None:
                raise self._closed_error()
        try:
            if type(payload) is not bytes \
                    and memoryview(payload).nbytes < self._endpoint.small_max:
                self._event(payload)
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
            self._await_hello(min(deadline, monotonic() + HELLO_WAIT_S))
        return self._until_released(lambda: self._endpoint.allocate(size), deadline)

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
        if self.closed:
            return False
        poller = select.poll()
        try:
            poller.register(self._sock.fileno(), select.POLLRDHUP)
        except ValueError:   # closed meanwhile: fileno() is -1
            return False
        return not poller.poll(0)

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
        self._await_hello(_FOREVER if seconds is None else monotonic() + seconds)
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

    # Internals --------------------------------------------------------------------------

    # Codecs ---------------------------------------------------------------------------------

    def _outgoing(self, payload: Any) -> Any:
        """A codec's payload, ready to send (see ``_codecs.ready``)."""
        endpoint = self._endpoint
        return ready(payload, endpoint.shm_threshold,
                     self.allocate if endpoint.pool is not None else None)

    def _mark_sent(self, error: BaseException, end: int, request_id: int,
                   start: int | None = None) -> None:
        """Say on a failed request's error whether the server may have it: its frame left
        whole (for a batch from ``start``: any byte of it left), or it is still queued on an
        open connection and may yet leave. False only when it never can."""
        if not isinstance(error, (Timeout, ConnectionClosed)) or error.request_sent is not None:
            return
        channel = self._channel
        # After a failure the stream is shut, so a write in progress ends at once: wait for
        # it, or a frame the kernel took could be counted as unsent.
        written = channel.settled_written() if isinstance(error, ConnectionClosed) \
            else channel.written
        if start is not None:
            sent = written > start
        else:
            sent = bool(end) and written >= end
        if not sent and end and not (channel.closed or channel.broken
                                     or self._closed_reason is not None):
            sent = True   # still queued (or being written) on a live connection
        error.request_sent = sent
        error.request_id = request_id

    def _send_large(self, msg_type: int, payload: Any, request_id: int,
                    deadline: float) -> int:
        """Send one frame whose payload is not small: through shared memory or inline."""
        end = 0
        for buffers, fds in self._writes(msg_type, payload, request_id, deadline):
            end = self._channel.send(buffers, fds)
        return end

    def _close_channel(self) -> None:
        self._channel.close()
        self._endpoint.close_shm()
        if self._channel.dropped:
            log.warning("connection to %s closed with %d bytes of queued frames unsent",
                        self.path, self._channel.dropped)

    def _closed_error(self) -> ConnectionClosed:
        reason = self._closed_reason
        error = ConnectionClosed(str(reason) if isinstance(reason, ConnectionClosed)
                                 else f"connection to {self.path} closed: {reason}")
        error.__cause__ = reason.__cause__ if isinstance(reason, ConnectionClosed) else reason
        return error

    def _writes(self, msg_type: int, payload: Any, request_id: int,
                deadline: float) -> list[Any]:
        """The writes that carry a payload that is not small, by the protocol's limits rule
        (``Endpoint.writes``), waiting for a shared-memory segment to come free if needed.

        Raises:
            FrameTooLargeError: over the server's limit without shared memory; nothing sent.
            TypeError: not a bytes-like payload.
            ShmError: more than shared memory takes.
            Timeout: no segment came free by ``deadline``.
            ConnectionClosed: the connection is closed.
        """
        endpoint = self._endpoint
        if endpoint.peer_hello is None and endpoint.pool is not None:
            try:
                size = memoryview(payload).nbytes
            except TypeError:
                size = 0   # Endpoint.writes says what is wrong with it
            if size >= endpoint.shm_threshold:
                self._await_hello(min(deadline, monotonic() + HELLO_WAIT_S))
        return self._until_released(
            lambda: endpoint.writes(msg_type, payload, request_id), deadline)

    def _until_released(self, attempt: Callable[[], Any], deadline: float) -> Any:
        """``attempt()`` until it returns something other than None (shared memory was
        exhausted), keeping this connection's reads going meanwhile: the releases that free
        segments arrive on the stream, and nobody else may be reading it.

        Raises:
            Timeout: still None at ``deadline``.
            ConnectionClosed: the connection closed meanwhile.
        """
        pool = self._endpoint.pool
        while True:
            if self._closed_reason is not None:
                raise self._closed_error()
            generation = pool.generation if pool is not None else 0
            try:
                result = attempt()
            except ShmError:
                if self._closed_reason is not None:
                    raise self._closed_error() from None
                raise
            if result is not None:
                return result
            assert pool is not None
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise Timeout(f"no shared-memory segment came free in time "
                              f"({pool.total_bytes} of {pool.max_bytes} bytes lent out)")
            wait = min(remaining, _RELEASE_POLL_S)
            with self._lock:
                leading = not self._reading and self._closed_reason is None
                if leading:
                    self._reading = True
            if leading:
                self._read(wait)   # admits releases; hands replies to their threads
            else:
                pool.wait(generation, wait)   # the reader admits them for us

    def _await_hello(self, until: float) -> None:
        """Read until the server's hello has arrived, or ``until``: shared memory is only
        negotiated once it has. A hintens server sends its hello on accept."""
        while self._endpoint.peer_hello is None and self._closed_reason is None:
            remaining = until - monotonic()
            if remaining <= 0:
                return
            with self._lock:
                if self._reading:   # another thread reads; it will admit the hello
                    self._sleepers += 1
                    try:
                        self._cond.wait(min(remaining, 0.05))
                    finally:
                        self._sleepers -= 1
                    continue
                self._reading = True
            self._read(remaining)

    def _send(self, frames: list[Any]) -> None:
        try:
            self._channel.send(frames)
        except BaseException as error:
            self._send_failed(error)

    def _send_failed(self, error: BaseException) -> NoReturn:
        """Classify a failed send, fail the connection where the stream may be cut, raise."""
        if isinstance(error, (TypeError, ValueError, ProtocolError)):
            # Refused before a byte was written: too large for the server, not bytes-like,
            # more than shared memory takes. The connection is untouched.
            raise error
        if isinstance(error, BlockingIOError):
            # SO_SNDTIMEO expired; part of a frame may have left, so the stream is unusable.
            timeout = Timeout("the server did not read in time (send timed out)")
            self._fail(ConnectionClosed(f"connection to {self.path} closed: {timeout}"), timeout)
            raise timeout from error
        if isinstance(error, OSError):
            self._salvage_server_error()
            self._fail(ConnectionClosed(self._lost_message(error)), error)
            raise self._closed_error() from error
        # A signal handler raised mid-write: part of a frame may have left.
        self._fail(ConnectionClosed(f"connection to {self.path} closed: a send was "
                                    f"interrupted ({type(error).__name__})"), error)
        raise error

    def _salvage_server_error(self) -> None:
        """After a failed send: the reason the server gave before it hung up, if any.

        A server that refuses us (or fails) writes an Error frame with request id 0 and then
        closes; the kernel still holds those bytes. Read only if no other thread is reading.
        """
        with self._lock:
            if self._reading or self._server_error is not None:
                return
            self._reading = True
        try:
            while self._server_error is None:
                frames = self._channel.receive(socket.MSG_DONTWAIT)
                if not frames:
                    break
                for item in self._endpoint.admit(frames, self._channel.fds):
                    if type(item) is self._frame_type and item.type == MessageType.ERROR:
                        self._error_frame(item, salvaged=True)
        except (OSError, ProtocolError):
            pass
        finally:
            self._finish_read(())

    def _wait(self, waiter: _Waiter, request_id: int, deadline: float) -> None:
        lock = self._lock
        while not waiter.done:   # set under the lock by a reader; a plain read is safe here
            with lock:
                while True:
                    if waiter.done:
                        return
                    if self._closed_reason is not None:
                        raise self._closed_error()
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        self._unpark(request_id)
                        raise Timeout(f"no reply to request {request_id} from {self.path} in time")
                    if not self._reading:
                        self._parked.pop(request_id, None)
                        self._reading = True
                        break
                    # Park: the reader releases our lock when our reply is in, or when it
                    # gives the reader role up while we still wait.
                    wake = waiter.wake
                    if wake is None:
                        wake = waiter.wake = threading.Lock()
                    wake.acquire(False)   # held while parked (still held after a timeout)
                    self._parked[request_id] = waiter
                    lock.release()
                    try:
                        wake.acquire(True, lock_wait_s(remaining))
                    except BaseException:   # a signal handler raised: leave, handing on
                        lock.acquire()
                        self._unpark(request_id)
                        raise
                    lock.acquire()
            self._read(remaining, request_id)

    def _unpark(self, request_id: int) -> None:
        """Under the lock, for a thread that stops waiting: if it was woken to read next, the
        role goes to another parked thread, or their replies would wait for their deadlines."""
        self._parked.pop(request_id, None)
        if self._parked and not self._reading:
            rid = next(iter(self._parked))
            self._parked.pop(rid).wake.release()

    def _wake_parked(self) -> None:
        """Under the lock, after a read: wake the parked threads whose reply came, and one more
        to take the reader role if others still wait."""
        parked = self._parked
        done = [rid for rid, waiter in parked.items() if waiter.done]
        for rid in done:
            parked.pop(rid).wake.release()
        if parked and not self._reading:
            rid = next(iter(parked))
            parked.pop(rid).wake.release()

    def _read(self, remaining: float | None, request_id: int = 0) -> None:
        """One read as the reader, then dispatch; always gives the reader role back.

        ``remaining`` None means a non-blocking read (the event pump). With a ``request_id``,
        a lone plain Response to it is handed over without the general dispatch.
        """
        items: Any = ()
        reply = None
        try:
            if remaining is None:
                frames = self._channel.receive(socket.MSG_DONTWAIT)
            elif remaining <= 0:
                return
            else:
                current = self._receive_timeout   # a setsockopt only when it must change
                if current is None or current > remaining + _TIMEOUT_SLACK_S \
                        or current < remaining / 2:
                    set_kernel_timeouts(self._sock, remaining)
                    self._receive_timeout = remaining
                if request_id:
                    reply = self._channel.receive_reply(request_id)
                    if reply is not None:
                        return
                    frames = self._channel.pending
                else:
                    frames = self._channel.receive()
            items = self._arrived(frames)
        except Exception as error:
            items = self._read_failed(error)
        finally:
            self._finish_read(items, request_id, reply)

    def _arrived(self, frames: list[Any] | None) -> list[Any]:
        """Items for frames just read; None (end of stream) fails the connection."""
        if frames is None:
            self._fail(ConnectionClosed(self._lost_message(None)), self._server_error)
            return []
        items = self._endpoint.admit(frames, self._channel.fds)
        if self._channel.fds and not self._endpoint.decoder.in_frame:
            self._channel.close_fds()   # descriptors no frame claimed: never kept
        return items

    def _read_failed(self, error: BaseException) -> list[Any]:
        """What a read that raised leaves to dispatch. Other exceptions propagate."""
        if isinstance(error, BlockingIOError):
            return []   # the kernel timeout expired, or nothing to read: the caller re-checks
        if isinstance(error, ProtocolError):
            return self._endpoint.after_error(error, self._channel.fds)
        if isinstance(error, OSError):
            self._fail(ConnectionClosed(self._lost_message(error)), error)
            return []
        raise error

    def _finish_read(self, items: Any, request_id: int = 0, reply: Any = None) -> None:
        """Give the reader role back and hand over what was read: ``reply`` to ``request_id``
        (the fast path), or ``items`` to their waiters. Then run callbacks, outside the lock."""
        events: Sequence[Any]
        replies: Sequence[bytes]
        with self._lock:
            self._reading = False
            if reply is not None:
                waiter = self._waiters.pop(request_id, None)
                if waiter is not None:
                    waiter.payload, waiter.done = reply, True
                if self._parked:
                    self._wake_parked()
                if self._sleepers:
                    self._cond.notify_all()
                if not self._close_pending:
                    return   # the common case: a lone reply, nothing else to do
                events, replies = _NOTHING
            else:
                events, replies = self._dispatch(items) if items else _NOTHING
            if self._parked:
                self._wake_parked()
            if self._sleepers:
                self._cond.notify_all()
            close_now = self._close_pending
            self._close_pending = False
        if close_now:
            self._close_channel()
        if replies:
            try:
                self._send(list(replies))
            except (ConnectionClosed, Timeout):
                pass
        for payload in events:
            try:
                self._on_event(payload)  # type: ignore[misc]
            except Exception:
                log.exception("on_event callback raised")

    def _lost_message(self, error: OSError | None) -> str:
        """Why the connection ended: the server's own word where it gave one, or ours."""
        if self._server_error is not None:
            return f"server at {self.path} closed the connection: {self._server_error}"
        if self._channel.aborted is not None:
            return f"connection to {self.path} cut: {self._channel.aborted}"
        if error is None:
            return f"server at {self.path} closed the connection"
        return f"connection to {self.path} lost: {error.strerror or error}"

    def _dispatch(self, items: list[Any]) -> tuple[list[Any], list[bytes]]:
        """Hand frames to their waiters (under the condition's lock)."""
        events: list[Any] = []
        replies: list[bytes] = []
        waiters = self._waiters
        frame_type = self._frame_type
        for item in items:
            if type(item) is frame_type:
                kind = item.type
                if kind == 2:   # MessageType.RESPONSE, compared as a plain int on the hot path
                    waiter = waiters.pop(item.request_id, None)
                    if waiter is None:
                        log.debug("dropping a late reply to request %d", item.request_id)
                    else:
                        waiter.payload, waiter.done = item.payload, True
                elif kind == MessageType.ERROR:
                    self._error_frame(item)
                elif kind == MessageType.EVENT:
                    if self._on_event is not None:
                        events.append(item.payload)
                else:
                    replies.append(self._endpoint.error_frame(
                        8, "this peer is a client and serves no requests", item.request_id))
            else:
                self._violation(item)
        return events, replies

    def _error_frame(self, frame: Any, salvaged: bool = False) -> None:
        try:
            code, message = decode_error_payload(frame.payload)
        except ValueError as malformed:   # still an answer: a generic one (PROTOCOL.md 7)
            code, message = 0, f"the server sent a malformed Error payload: {malformed}"
        error = remote_error(code, message, frame.request_id)
        if frame.request_id == 0 or (salvaged and code in _FATAL_CODES):
            # About the connection, not a request: the server closes next; say why then.
            self._server_error = error
            log.warning("server at %s reports: %s", self.path, error)
            return
        waiter = self._waiters.pop(frame.request_id, None)
        if waiter is not None:
            waiter.error, waiter.done = error, True

    def _violation(self, error: ProtocolError) -> None:
        if error.fatal:
            # No Error frame back (PROTOCOL.md allows it): writing here, under the state lock,
            # could interleave with another thread's frame or wait on a blocked sender.
            log.warning("closing the connection to %s: the server broke the protocol: %s",
                        self.path, error)
            self._fail_locked(ConnectionClosed(
                f"connection to {self.path} closed: the server broke the protocol: {error}"),
                error)
            return
        waiter = self._waiters.pop(error.request_id, None) if error.request_id else None
        if waiter is not None and error.msg_type in (MessageType.RESPONSE, MessageType.ERROR):
            waiter.error, waiter.done = error, True
        else:
            log.warning("dropped a bad frame from %s: %s", self.path, error)

    def _fail(self, reason: ConnectionClosed, cause: BaseException | None = None) -> None:
        with self._lock:
            self._fail_locked(reason, cause)
            close_now = self._close_pending and not self._reading
            if close_now:
                self._close_pending = False
        if close_now:
            # Outside the lock: Channel.close waits for a send in progress, and a failing
            # sender takes this lock.
            self._close_channel()

    def _fail_locked(self, reason: ConnectionClosed, cause: BaseException | None = None) -> None:
        if self._closed_reason is not None:
            return
        if cause is not None:
            reason.__cause__ = cause
        self._closed_reason = reason
        for waiter in self._waiters.values():
            waiter.error, waiter.done = self._closed_error(), True
        self._waiters.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes a reader blocked in recv
        except OSError:
            pass
        # The descriptor itself is closed by whoever next holds no reader role: _fail now,
        # or the reader in _finish_read. Never here, under the lock, and never under a reader.
        self._close_pending = True
        for waiter in self._parked.values():
            waiter.wake.release()
        self._parked.clear()
        if self._sleepers:
            self._cond.notify_all()

    def _pump_events(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while True:
            ready = poller.poll(250)
            with self._lock:
                if self._closed_reason is not None:
                    return
                if not ready:
                    continue
                if self._reading or self._waiters:
                    # A request thread is (or is about to be) the reader; it delivers events.
                    self._sleepers += 1
                    try:
                        self._cond.wait(0.05)
                    finally:
                        self._sleepers -= 1
                    continue
                self._reading = True
            self._read(None)
