"""The client side of a sync connection: the reading, dispatching and failing that a
``Client`` stands on. Its public methods are ``Client``'s; this holds the machinery.

Reading uses leader/follower, not a reader thread. A thread that waits for a reply becomes
the reader if nobody is reading. It reads (through the shared ``Connection``), hands every
item to its waiter, and gives the role back. A single thread that issues request after
request therefore reads its own replies: no thread hand-off, no queue. Many threads can share
a client. Replies are matched by request id and may come in any order.

Events from the server go to ``on_event``. They are delivered by the thread that read them,
after it has released the reader role, so a callback may itself call ``request()``. While no
request is in flight, a small pump thread (started only when ``on_event`` is given) reads
them.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import threading
from time import monotonic
from typing import Any, Callable, Iterator, NoReturn, Sequence

from .._constants import MSG_DONTWAIT
from .. import _impl
from .._errors import (
    ConnectionClosed,
    ProtocolError,
    Timeout,
    closed_error,
    detached,
    lost_message,
)
from .._checks import lock_wait_s
from .._stats import ClientCounts, public_name as _public_name
from ..transport.unix import set_kernel_timeouts
from ..protocol.roles import sort_for_client
from .connection import Connection


log = logging.getLogger("hintens")

#: How long after connecting a large send may wait for the server's hello (a hintens server
#: sends it on accept); past that, the server is taken to send none, and no send waits again.
HELLO_WAIT_S = 1.0
#: A kernel receive timeout may overshoot a request's deadline by this much at most.
_TIMEOUT_SLACK_S = 0.01
FOREVER = math.inf

_NOTHING: tuple[tuple[()], tuple[()]] = ((), ())


class Waiter:
    """One request's wait for its reply."""
    # Class-level defaults and no __init__: creating one runs no Python frame.
    done = False
    payload: Any = None
    error: BaseException | None = None
    # A lock of its own, held while parked, released by the thread that wakes it. Waking one
    # thread at a time (its reply came, or it is to read next) avoids waking every waiter.
    wake: Any = None


class ClientDriver:
    """The state and the steps of a client's connection, under one lock.

    Attributes (set by ``_start``): ``_conn`` (the shared ``Connection``), and for the hot
    path its parts: ``_sock``, ``_channel``, ``_endpoint``.
    """

    path: str
    timeout: float | None

    def _start(self, conn: Connection, *, ids: Iterator[int],
               on_event: Callable[[Any], Any] | None, flush_interval: float) -> None:
        """Take over a connected, checked socket: say hello, start the event pump."""
        self._conn = conn
        conn.hello_by = monotonic() + HELLO_WAIT_S
        self._sock, self._channel, self._endpoint = conn.sock, conn.channel, conn.endpoint
        self._ids = ids
        self._on_event = on_event
        self._encode_header = _impl.core.encode_header
        # State lives under one C-level lock. Threads that must sleep use a Condition over the
        # same lock, and are notified only when ``_sleepers`` says some exist: the lone-thread
        # path never enters threading.Condition's Python code.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sleepers = 0   # threads in _cond.wait (the hello and event-pump waits)
        self._parked: dict[int, Waiter] = {}   # request threads asleep, by request id
        self._reading = False
        self._waiters: dict[int, Waiter] = {}
        self._closed_reason: BaseException | None = None
        self._server_error: BaseException | None = None
        self._close_pending = False
        # The kernel receive timeout is changed only when a read's remaining time falls
        # outside [low, high]: the current timeout overshoots it by no more than the slack,
        # and is at least half of it. (No timeout yet: an empty window.)
        self._timeout_low, self._timeout_high = math.inf, -math.inf
        self._channel.flush_interval = flush_interval
        self._post = self._channel.post
        self._receive_reply = self._channel.receive_reply
        self._event_small = self._channel.event_small
        self._pump: threading.Thread | None = None
        self._counts = ClientCounts()   # for stats
        set_kernel_timeouts(self._sock, None, self.timeout, set_send=True)
        self._send([self._endpoint.hello_frame()])
        if on_event is not None:
            self._pump = threading.Thread(target=self._pump_events, name="hintens-client-events",
                                          daemon=True)
            self._pump.start()

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of this connection's counters, a new dict each time: frames each way
        (``requests_sent``, ``responses_received``, ``events_sent``, ...), Error frames
        (``errors_sent`` by code, ``errors_received``), bytes on the socket and through
        shared memory, segments, ``queued_bytes``; and the client's own: ``errors`` (the
        RemoteErrors raised to callers, by code), ``timeouts`` and ``in_flight`` (requests
        waiting for replies). The README's "Seeing what happens" lists every key."""
        with self._lock:
            in_flight = len(self._waiters)
        return self._counts.stats(self._endpoint, self._channel, in_flight)

    def __repr__(self) -> str:
        state = "closed" if self._closed_reason is not None else "connected"
        return f"<{_public_name(self)} {self.path} {state}, {len(self._waiters)} in flight>"

    def _close_channel(self) -> None:
        dropped = self._conn.close()
        if dropped:
            log.warning("connection to %s closed with %d bytes of queued frames unsent",
                        self.path, dropped)

    def _closed_error(self) -> ConnectionClosed:
        reason = self._closed_reason
        if reason is None:   # not closed after all: the channel broke under a send
            return ConnectionClosed(f"connection to {self.path} is broken")
        return closed_error(reason, self.path)

    def _send(self, frames: list[Any]) -> None:
        try:
            self._channel.send(frames)
        except BaseException as error:
            self._send_failed(error)

    def _send_failed(self, error: BaseException) -> NoReturn:
        """Classify a failed send, fail the connection where the stream may be cut, raise."""
        raised: BaseException = error
        try:
            if isinstance(error, (TypeError, ValueError, ProtocolError)):
                # Refused before a byte was written: too large for the server, not bytes-like,
                # more than shared memory takes. The connection is untouched.
                raise error
            if isinstance(error, BlockingIOError):
                # SO_SNDTIMEO expired; part of a frame may have left: the stream is unusable.
                raised = Timeout("the server did not read in time (send timed out)")
                self._fail(ConnectionClosed(f"connection to {self.path} closed: {raised}"),
                           raised)
                raise raised from error
            if isinstance(error, OSError):
                self._salvage_server_error()
                self._fail(ConnectionClosed(self._lost_message(error)), error)
                raise self._closed_error() from error
            # A signal handler raised mid-write: part of a frame may have left.
            self._fail(ConnectionClosed(f"connection to {self.path} closed: a send was "
                                        f"interrupted ({type(error).__name__})"), error)
            raise error
        finally:
            # What this raises has this frame in its traceback: holding it (or the error it
            # was raised from) here would make a cycle that keeps the failed send's frames,
            # and the payloads and descriptors they hold, until a full collection.
            del error, raised

    def _salvage_server_error(self) -> None:
        """After a failed send: the reason the server gave before it hung up, if any.

        A server that refuses us (or fails) writes an Error frame with request id 0 and then
        closes; the kernel still holds those bytes. Read only if no other thread is reading.
        """
        with self._lock:
            if self._reading or self._server_error is not None:
                return
            self._reading = True
        items: list[Any] = []
        try:
            while True:   # what the kernel holds, up to the end of the stream
                frames = self._channel.receive(MSG_DONTWAIT)
                if not frames:
                    break
                items += self._conn.admit(frames)
        except (OSError, ProtocolError):
            pass
        finally:
            self._finish_read(items, salvaged=True)

    def _wait(self, waiter: Waiter, request_id: int, deadline: float) -> None:
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
        try:
            if remaining is None:
                frames = self._channel.receive(MSG_DONTWAIT)
            elif remaining <= 0:
                return
            else:
                if not self._timeout_low <= remaining <= self._timeout_high:
                    self._conn.set_receive_timeout(remaining)   # a setsockopt, now and then
                    self._timeout_low = remaining - _TIMEOUT_SLACK_S
                    self._timeout_high = remaining * 2
                if request_id:
                    reply = self._receive_reply(request_id)
                    if reply is not None:   # handed over here, in one step under the lock
                        items = None
                        lock = self._lock
                        lock.acquire()   # not ``with``: see Client.request
                        try:
                            self._reading = False
                            waiter = self._waiters.pop(request_id, None)
                            if waiter is not None:
                                waiter.payload, waiter.done = reply, True
                            close_now = (self._parked or self._sleepers or self._close_pending) \
                                and self._reader_left()
                        finally:
                            lock.release()
                        if close_now:
                            self._close_channel()
                        return
                    frames = self._channel.pending
                else:
                    frames = self._channel.receive()
            items = self._arrived(frames)
        except Exception as error:
            items = self._read_failed(error)
        finally:
            if items is not None:
                self._finish_read(items)

    def _arrived(self, frames: list[Any] | None) -> list[Any]:
        """Items for frames just read; None (end of stream) fails the connection."""
        if frames is None:
            self._fail(ConnectionClosed(self._lost_message(None)), self._server_error)
            return []
        return self._conn.admit(frames)

    def _read_failed(self, error: BaseException) -> list[Any]:
        """What a read that raised leaves to dispatch. Other exceptions propagate."""
        if isinstance(error, BlockingIOError):
            return []   # the kernel timeout expired, or nothing to read: the caller re-checks
        if isinstance(error, ProtocolError):
            return self._conn.after_error(error)
        if isinstance(error, OSError):
            self._fail(ConnectionClosed(self._lost_message(error)), error)
            return []
        try:
            raise error
        finally:
            del error   # else error -> traceback -> this frame -> error: a cycle

    def _finish_read(self, items: Any, salvaged: bool = False) -> None:
        """Give the reader role back and hand ``items`` to their waiters (``salvaged``: read
        after a send failed). Then run callbacks, outside the lock."""
        events: Sequence[Any]
        replies: Sequence[bytes]
        with self._lock:
            self._reading = False
            events, replies = self._dispatch(items, salvaged) if items else _NOTHING
            close_now = self._reader_left()
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

    def _reader_left(self) -> bool:
        """Under the lock, once the reader role is given back: wake the threads whose reply
        came, one more to read next, and the sleepers. Returns whether the socket is to be
        closed now (by the caller, outside the lock)."""
        if self._parked:
            self._wake_parked()
        if self._sleepers:
            self._cond.notify_all()
        close_now = self._close_pending
        self._close_pending = False
        return close_now

    def _lost_message(self, error: OSError | None) -> str:
        """Why the connection ended: the server's own word where it gave one, or ours."""
        return lost_message(self.path, self._server_error, self._channel.aborted, error,
                            self._endpoint.peer_hello is None)

    def _dispatch(self, items: list[Any],
                  salvaged: bool = False) -> tuple[list[Any], list[bytes]]:
        """Under the lock: hand a read's items to their waiters, by the client's rules
        (``sort_for_client``). Returns the Events to deliver and the Error frames to send,
        both for after the lock."""
        sorted_items = sort_for_client(self._endpoint, items, salvaged)
        waiters = self._waiters
        for request_id, payload in sorted_items.replies:
            waiter = waiters.pop(request_id, None)
            if waiter is None:
                log.debug("dropping a late reply to request %d", request_id)
            else:
                waiter.payload, waiter.done = payload, True
        for request_id, error in sorted_items.failures:
            waiter = waiters.pop(request_id, None)
            if waiter is not None:
                waiter.error, waiter.done = error, True
        for dropped in sorted_items.dropped:
            log.warning("dropped a bad frame from %s: %s", self.path, dropped)
        if sorted_items.server_error is not None:
            self._server_said(sorted_items.server_error)
        if sorted_items.fatal is not None:
            # No Error frame back (PROTOCOL.md allows it): writing here, under the state lock,
            # could interleave with another thread's frame or wait on a blocked sender.
            error = sorted_items.fatal
            log.warning("closing the connection to %s: the server broke the protocol: %s",
                        self.path, error)
            self._fail_locked(ConnectionClosed(
                f"connection to {self.path} closed: the server broke the protocol: {error}"),
                error)
        events = sorted_items.events if self._on_event is not None else []
        return events, sorted_items.answers

    def _server_said(self, error: BaseException) -> None:
        """The server's word about the whole connection: it closes next; say why then."""
        self._server_error = error
        log.warning("server at %s reports: %s", self.path, error)

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
            reason.__cause__ = detached(cause)
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
        wait_readable = self._channel.wait_readable   # the socket's, or the ring's
        while True:
            ready = wait_readable(0.25)
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

