"""A pool of client connections, with retries.

``ClientPool`` lends each request a connection of its own for the request's duration, opens
connections lazily up to ``size``, replaces the ones that broke, and makes callers wait (with
a timeout) when every connection is busy. ``RetryPolicy`` decides which failures are tried
again, and only what is safe is retried (the rule is in ``RetryPolicy``'s docstring).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from time import monotonic
from typing import Any, Iterable, Iterator

from .._checks import call_timeout_s, count, deadline_after, path_like, timeout_s, wait_s
from .client import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, Client, Session
from .._errors import ConnectionClosed, Timeout
from .._retry import RetryPolicy, may_retry, needs_same_server, restarted_error
from .._stats import PoolTally
from ..protocol.hello import HelloKey
from ..transport.address import resolve

log = logging.getLogger("hintens")

DEFAULT_POOL_SIZE = 4
DEFAULT_CLOSE_TIMEOUT_S = 5.0
#: A connection idle this long is checked for a hang-up (one poll) before it is lent.
_HANGUP_CHECK_S = 1.0
#: How long a retry waits for the new connection's hello to learn which server it reached.
_INSTANCE_WAIT_S = 1.0


# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
class ClientPool:
    """Up to ``size`` connections to one server, shared safely by any number of threads.

    Args:
        path: the server's address (a Unix socket path, ``unix:/path`` or
            ``tcp://host:port``, as for ``Client``).
        size: the most connections open at once.
        timeout: default seconds a request waits for its reply (each attempt).
        connect_timeout: seconds to wait for a new connection.
        acquire_timeout: seconds to wait for a free connection when all ``size`` are busy
            (default: ``timeout``); then ``Timeout`` is raised.
        idle_timeout: close a connection left unused this many seconds (default: never);
            the next request opens a fresh one.
        retry: the ``RetryPolicy`` (default: 3 attempts, only what is safe). ``NO_RETRY``
            turns retries off.
        exactly_once: announce a session in each connection's hello, so that a server
            answers a retried request it already ran from its replay window instead of
            running it again. Retries after a lost connection then cover every request.
        **client_options: passed to each ``Client`` (``shm``, ``max_payload``,
            ``flush_interval``, ...).

    The pool is a context manager; leaving it calls ``close()``.
    """

    __module__ = "hintens"

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 size: int = DEFAULT_POOL_SIZE, *,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
                 acquire_timeout: float | None = None, idle_timeout: float | None = None,
                 retry: RetryPolicy | None = None, exactly_once: bool = False,
                 **client_options: Any) -> None:
        self.size = count(size, "size")
        self.timeout = timeout_s(timeout, "timeout")
        self.connect_timeout = timeout_s(connect_timeout, "connect_timeout")
        self.acquire_timeout = self.timeout if acquire_timeout is None \
            else timeout_s(acquire_timeout, "acquire_timeout")
        self.idle_timeout = timeout_s(idle_timeout, "idle_timeout")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {type(retry).__name__}")
        self.path = resolve(path_like(path))
        self.retry = RetryPolicy() if retry is None else retry
        self.exactly_once = exactly_once
        #: The pool's session: request ids are drawn from it by every connection (so that an
        #: id names one request pool-wide), which announce it if ``exactly_once``.
        self.session = Session(exactly_once)
        self._client_options = client_options
        # The fast paths take the plain lock (C); only waiting and waking go through the
        # Condition (Python code), and a release notifies only when somebody waits.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        self._tally = PoolTally()
        # An idle connection younger than this is lent without a look (hang-up, idle time).
        self._fresh_s = min(_HANGUP_CHECK_S, _HANGUP_CHECK_S if idle_timeout is None
                            else idle_timeout)
        self._idle: list[tuple[Client, float]] = []   # (client, idle since), newest last
        self._open = 0        # connections open or being opened
        self._busy = 0        # connections lent out
        self._lent: set[Client] = set()
        self._closed = False

    # Public API -------------------------------------------------------------------------

    def request(self, payload: Any, timeout: float | None = None, *,
                idempotent: bool = False) -> Any:
        """Send a Request on a free connection and wait for its reply, retrying per policy.

        Args:
            payload: as for ``Client.request``.
            timeout: seconds each attempt waits for its reply; default ``self.timeout``.
            idempotent: running this request twice is harmless, so it may be retried after a
                timeout or a lost connection even without exactly-once.

        Returns:
            The Response payload, as ``Client.request`` returns it.

        Raises:
            RemoteError: the server answered with an Error frame.
            Timeout: no reply in time (after the retries allowed), or no connection came free
                within ``acquire_timeout``.
            ConnectionClosed: the connection was lost and the request could not be retried
                safely, or the pool is closed.
            ConnectError: no server, after the retries.
        """
        client = self._take_idle()
        if client is not None:   # the common case: one attempt on an idle connection
            try:
                return client.request(payload, timeout)
            except self.retry.retry_on as error:
                first = (error, client)
            finally:
                self._release(client)
        else:
            first = None
        return self._call(lambda client, request_id: client.request(
            payload, timeout, request_id=request_id), idempotent, first=first)

    def request_many(self, payloads: Iterable[Any], timeout: float | None = None, *,
                     idempotent: bool = False, return_exceptions: bool = False) -> list[Any]:
        """Send several Requests in one write on one connection; the replies, in order.

        Args and Raises: as ``Client.request_many``, with retries as ``request`` (the whole
        batch is retried, so mark it idempotent only if every request in it is).
        """
        items = list(payloads)
        return self._call(lambda client, _: client.request_many(
            items, timeout, return_exceptions=return_exceptions), idempotent, same_ids=False)

    def send_event(self, payload: Any) -> None:
        """Send an Event on a free connection (batched as ``Client.send_event`` batches).

        Events sent through the pool keep their order only if they go through one
        connection: use ``connection()`` for a sequence whose order matters.

        Raises:
            Timeout: no connection came free in time, or the server did not take the bytes.
            ConnectionClosed: the pool is closed, or the connection broke while sending.
            ConnectError: no server.
        """
        client = self._acquire()
        try:
            client.send_event(payload)
        finally:
            self._release(client)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Client]:
        """Borrow one connection for a sequence of calls, for example Events whose order
        matters: ``with pool.connection() as client: ...``. No retries happen inside.

        Raises:
            Timeout: no connection came free within ``timeout`` (default ``acquire_timeout``).
        """
        client = self._acquire(timeout)
        try:
            yield client
        finally:
            self._release(client)

    def flush(self) -> None:
        """Write out the Events waiting in every idle connection's queue."""
        with self._cond:
            idle = [client for client, _ in self._idle]
        for client in idle:
            try:
                client.flush()
            except (ConnectionClosed, Timeout) as error:
                log.warning("pool connection to %s: queued events not written: %s",
                            self.path, error)

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: the counters of every connection (``Client.stats``) summed over those
        open now and those closed; ``retries``, ``connections_opened``, ``reconnects``; and
        connections ``open`` (or opening), ``busy`` (lent out) and ``idle`` right now."""
        with self._cond:
            clients = [client for client, _ in self._idle] + list(self._lent)
            own = {"open": self._open, "busy": self._busy, "idle": len(self._idle)}
        return self._tally.snapshot(clients, **own)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Stop lending connections, let requests in flight finish, then close everything.

        Args:
            timeout: seconds to wait for requests in flight. Connections still busy then are
                closed under them (their requests raise ConnectionClosed).

        Idempotent. Queued Events are written before each connection closes.
        """
        deadline = deadline_after(timeout_s(timeout, "timeout"))
        with self._cond:
            self._closed = True
            self._cond.notify_all()   # callers waiting for a connection: the pool is closed
            self._waiting += 1
            try:
                while self._busy and monotonic() < deadline:
                    self._cond.wait(wait_s(deadline - monotonic()))
            finally:
                self._waiting -= 1
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            busy = self._busy
        for client, _ in idle:
            self._close(client)
        if busy:
            log.warning("closing the pool to %s with %d requests still in flight",
                        self.path, busy)
            with self._cond:
                lent = list(self._lent)
            for client in lent:
                self._close(client)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._cond:
            state = "closed" if self._closed else f"{self._open} open, {self._busy} busy"
        return f"<hintens.ClientPool {self.path} size={self.size} {state}>"

    # Internals --------------------------------------------------------------------------

    def _acquire(self, timeout: float | None = None) -> Client:
        deadline = deadline_after(call_timeout_s(timeout, self.acquire_timeout))
        stale: list[Client] = []
        try:
            with self._lock:
                while True:
                    if self._closed:
                        raise ConnectionClosed(f"the pool to {self.path} is closed")
                    while self._idle:
                        client, since = self._idle.pop()
                        idle = monotonic() - since
                        if client.closed or (self.idle_timeout is not None
                                             and idle > self.idle_timeout) \
                                or (idle > _HANGUP_CHECK_S and not client.is_alive()):
                            self._open -= 1
                            stale.append(client)
                            continue
                        self._lend(client)
                        return client
                    if self._open < self.size:
                        self._open += 1
                        self._busy += 1
                        break
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        raise Timeout(f"all {self.size} connections to {self.path} stayed busy")
                    self._waiting += 1
                    try:
                        self._cond.wait(wait_s(remaining))
                    finally:
                        self._waiting -= 1
        finally:
            for client in stale:   # outside the lock: close may flush
                self._close(client, lost=client.closed or not client.is_alive())
        self._tally.opening()
        try:
            client = Client(self.path, timeout=self.timeout,
                            connect_timeout=self.connect_timeout,
                            session=self.session,
                            **self._client_options)
        except BaseException:
            with self._lock:
                self._open -= 1
                self._busy -= 1
                if self._waiting:
                    self._cond.notify()
            raise
        with self._lock:
            self._lent.add(client)
        return client

    def _lend(self, client: Client) -> None:
        self._busy += 1
        self._lent.add(client)

    def _release(self, client: Client) -> None:
        with self._lock:
            self._busy -= 1
            self._lent.discard(client)
            lost = client.closed
            if lost or self._closed:
                self._open -= 1
                close = True
            else:
                self._idle.append((client, monotonic()))
                close = False
            if self._waiting:
                self._cond.notify()
        if close:
            self._close(client, lost)

    def _close(self, client: Client, lost: bool = False) -> None:
        """Close a connection the pool lets go (``lost``: it had closed or died on its own),
        keeping what it counted."""
        client.close()
        self._tally.closing(client, lost)

    def _take_idle(self) -> Client | None:
        """The fast path: the newest idle connection, if it needs no check; else None."""
        with self._lock:
            if self._closed or not self._idle:
                return None
            client, since = self._idle[-1]
            if client.closed or monotonic() - since > self._fresh_s:
                return None   # _acquire looks closer
            self._idle.pop()
            self._busy += 1
            self._lent.add(client)
            return client

    def _retry_plan(self, error: BaseException, client: Client | None, idempotent: bool,
                    same_ids: bool, tries: int) -> tuple[bytes | None, int | None]:
        """Raise ``error`` unless it may be retried; else what the retry must reach: the
        server instance and request id (exactly-once), or (None, None)."""
        # Raised from here, ``error`` has this frame in its traceback: the frame must let go
        # of it (and of ``client``) first, or the cycle keeps them until a full collection.
        refused = tries >= self.retry.max_attempts or not may_retry(
            error, idempotent, self.exactly_once, self._closed)
        planned: tuple[bytes | None, int | None] = (None, None)
        if not refused and needs_same_server(error, idempotent):
            instance = _instance(client) if client is not None else None
            request_id = getattr(error, "request_id", None) if same_ids else None
            refused = instance is None or request_id is None
            planned = (instance, request_id)
        if refused:
            try:
                raise error
            finally:
                del error, client
        log.info("retrying a request to %s after: %s", self.path, error)
        self._tally.retrying()
        return planned

    def _call(self, attempt: Any, idempotent: bool, same_ids: bool = True,
              first: tuple[BaseException, Client] | None = None) -> Any:
        """Run ``attempt(client, request_id)`` with retries per the policy. ``first`` is the
        failure of a first attempt made on the fast path."""
        policy = self.retry
        request_id: int | None = None   # set when a retry must reach the same server
        instance: bytes | None = None   # that server's instance id
        last: BaseException | None = None
        tries = 0
        try:
            if first is not None:
                tries = 1
                last, failed = first
                instance, request_id = self._retry_plan(last, failed, idempotent, same_ids, 1)
                time.sleep(policy.delay(1))
            while True:
                tries += 1
                client = None
                restarted = False
                try:
                    client = self._acquire()
                    if instance is not None and _instance(client) != instance:
                        restarted = True
                    else:
                        return attempt(client, request_id)
                except policy.retry_on as error:
                    planned = self._retry_plan(error, client, idempotent, same_ids, tries)
                    if planned != (None, None):
                        instance, request_id = planned
                    last = error
                finally:
                    if client is not None:
                        self._release(client)
                if restarted:
                    raise restarted_error(self.path, request_id) from last
                time.sleep(policy.delay(tries))
        finally:
            # ``last`` has this frame in its traceback: kept here, that cycle would hold the
            # attempt (and its payload) until a full collection, even after a success.
            last = first = None


def _instance(client: Client) -> bytes | None:
    """The id of the server process behind ``client`` (waiting briefly for its hello)."""
    hello = client.wait_for_hello(_INSTANCE_WAIT_S)
    return None if hello is None else hello.entries.get(HelloKey.INSTANCE_ID)
