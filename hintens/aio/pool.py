"""An asyncio pool of client connections, with retries and exactly-once.

An asyncio connection carries many requests at once, so the pool does not lend a connection
to one request at a time as the sync ``ClientPool`` does: each request goes on the open
connection with the fewest requests in flight, and a new one is opened (up to ``size``) only
when every open one is busy. Broken connections are dropped and replaced on demand. What is
retried, and when a retry must reach the same server, is the sync pool's rule
(``RetryPolicy``'s docstring); a retry of an exactly-once session carries the same request
id, so that the server's replay window answers it instead of running it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

from .._checks import count, path_like, timeout_s
from .._errors import ConnectionClosed
from .._retry import RetryPolicy, may_retry, needs_same_server, restarted_error
from .._stats import PoolTally
from ..protocol.hello import HelloKey
from ..sync.client import Session
from ..transport.address import resolve
from .client import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, Client

log = logging.getLogger("hintens")

DEFAULT_POOL_SIZE = 4
DEFAULT_CLOSE_TIMEOUT_S = 5.0
#: A connection unused this long is checked for a hang-up (one poll) before it is used.
_HANGUP_CHECK_S = 1.0
#: How long a retry waits for the new connection's hello to learn which server it reached.
_INSTANCE_WAIT_S = 1.0

__all__ = ["ClientPool", "DEFAULT_POOL_SIZE"]


# __module__ is the public name (hintens.aio.X): help(), tracebacks and pickles show it.
class ClientPool:
    """Up to ``size`` asyncio connections to one server, shared by any number of tasks of
    one event loop.

    Args:
        path: the server's address (a Unix socket path, ``unix:/path`` or
            ``tcp://host:port``, as for ``Client``).
        size: the most connections open at once.
        timeout: default seconds a request waits for its reply (each attempt).
        connect_timeout: seconds to wait for a new connection.
        idle_timeout: close a connection left unused this many seconds (default: never).
        retry: the ``RetryPolicy`` (default: 3 attempts, only what is safe). ``NO_RETRY``
            turns retries off.
        exactly_once: announce a session in each connection's hello, so that a server
            answers a retried request it already ran from its replay window instead of
            running it again. Retries after a lost connection then cover every request.
        **client_options: passed to each ``hintens.aio.Client`` (``shm``, ``codec``, ...).

    Use it with ``async with``, or ``await close()`` when done.
    """

    __module__ = "hintens.aio"

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 size: int = DEFAULT_POOL_SIZE, *,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
                 idle_timeout: float | None = None, retry: RetryPolicy | None = None,
                 exactly_once: bool = False, **client_options: Any) -> None:
        self.size = count(size, "size")
        self.timeout = timeout_s(timeout, "timeout")
        self.connect_timeout = timeout_s(connect_timeout, "connect_timeout")
        self.idle_timeout = timeout_s(idle_timeout, "idle_timeout")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {type(retry).__name__}")
        if "session" in client_options:
            raise TypeError("the pool's connections share the pool's own session")
        self.path = resolve(path_like(path))
        self.retry = RetryPolicy() if retry is None else retry
        self.exactly_once = bool(exactly_once)
        #: The pool's session: every connection draws request ids from it (an id names one
        #: request pool-wide), and announces it if ``exactly_once``.
        self.session = Session(self.exactly_once)
        self._client_options = client_options
        self._clients: list[Client] = []
        self._in_flight: dict[Client, int] = {}
        self._last_used: dict[Client, float] = {}
        self._opening = 0
        self._tally = PoolTally()
        self._busy = 0                      # requests in flight across the pool
        self._idle = asyncio.Event()        # set while nothing is in flight
        self._idle.set()
        self._opened = asyncio.Event()      # set (and replaced) each time an opening ends
        self._closed = False

    # Public API -------------------------------------------------------------------------

    async def request(self, payload: Any, timeout: float | None = None, *,
                      idempotent: bool = False) -> Any:
        """Send a Request on the least busy connection and wait for its reply, retrying per
        policy.

        Args:
            payload: as for ``Client.request``.
            timeout: seconds each attempt waits for its reply; default ``self.timeout``.
            idempotent: running this request twice is harmless, so it may be retried after a
                timeout or a lost connection even without exactly-once.

        Returns:
            The Response payload, as ``Client.request`` returns it.

        Raises:
            RemoteError: the server answered with an Error frame.
            Timeout: no reply in time (after the retries allowed).
            ConnectionClosed: the connection was lost and the request could not be retried
                safely (``request_sent`` says whether the server may have run it), the server
                restarted in between, or the pool is closed.
            ConnectError: no server, after the retries.
        """
        seconds = self.timeout if timeout is None else timeout
        return await self._call(lambda client, request_id: client.request(
            payload, seconds, request_id=request_id), idempotent)

    async def request_many(self, payloads: Iterable[Any], timeout: float | None = None, *,
                           idempotent: bool = False) -> list[Any]:
        """Send several Requests together on one connection; the replies, in order. The
        whole batch is retried, so mark it idempotent only if every request in it is.

        Raises:
            RemoteError, Timeout, ConnectionClosed, ConnectError: as ``request``.
        """
        items = list(payloads)
        seconds = self.timeout if timeout is None else timeout
        return await self._call(lambda client, _: client.request_many(items, seconds),
                                idempotent, same_ids=False)

    async def send_event(self, payload: Any) -> None:
        """Send an Event on the least busy connection. Events sent through the pool keep
        their order only through one connection: use ``connection()`` for that.

        Raises:
            ConnectionClosed: the pool is closed, or the connection broke.
            ConnectError: no server.
        """
        async with self.connection() as client:
            await client.send_event(payload)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Client]:
        """One connection for a sequence of calls (Events whose order matters, say):
        ``async with pool.connection() as client: ...``. No retries happen inside.

        Raises:
            ConnectionClosed: the pool is closed.
            ConnectError: no server.
        """
        client = await self._acquire()
        try:
            yield client
        finally:
            self._release(client)

    async def flush(self) -> None:
        """Write out the Events waiting in every connection's queue."""
        for client in list(self._clients):
            if not client.closed:
                await client.flush()

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: the counters of every connection (``Client.stats``) summed over those
        open now and those closed; ``retries``, ``connections_opened``, ``reconnects``; and
        connections ``open`` (or opening) and requests ``in_flight`` right now."""
        return self._tally.snapshot(list(self._clients),
                                    open=len(self._clients) + self._opening,
                                    in_flight=self._busy)

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Stop taking requests, let those in flight finish (for ``timeout`` seconds at
        most; the rest raise ConnectionClosed), then close every connection. Idempotent.
        """
        seconds = timeout_s(timeout, "timeout")
        self._closed = True
        if self._busy:
            try:
                await asyncio.wait_for(self._idle.wait(), seconds)
            except asyncio.TimeoutError:
                log.warning("closing the pool to %s with %d requests still in flight",
                            self.path, self._busy)
        clients, self._clients = self._clients, []
        self._in_flight.clear()    # requests still running find their client gone: no _drop
        self._last_used.clear()
        for client in clients:
            await client.close()
            self._tally.closing(client)

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else \
            f"{len(self._clients) + self._opening} open, {self._busy} in flight"
        return f"<hintens.aio.ClientPool {self.path} size={self.size} {state}>"

    # Internals --------------------------------------------------------------------------

    async def _acquire(self) -> Client:
        """The open connection with the fewest requests in flight, or a new one when every
        open one is busy and the pool has room."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise ConnectionClosed(f"the pool to {self.path} is closed")
            now = loop.time()
            best: Client | None = None
            for client in list(self._clients):
                idle = now - self._last_used.get(client, now)
                if client.closed or (not self._in_flight[client] and (
                        (self.idle_timeout is not None and idle > self.idle_timeout)
                        or (idle > _HANGUP_CHECK_S and not client.is_alive()))):
                    self._drop(client)
                    continue
                if best is None or self._in_flight[client] < self._in_flight[best]:
                    best = client
            room = len(self._clients) + self._opening < self.size
            if best is not None and (not self._in_flight[best] or not room):
                break
            if room:
                best = await self._open()
                break
            # Every free slot is a connection being opened: wait for one, then look again.
            await self._opened.wait()
        self._in_flight[best] += 1
        self._last_used[best] = now
        self._busy += 1
        self._idle.clear()
        return best

    async def _open(self) -> Client:
        self._opening += 1
        self._tally.opening()
        try:
            client = await Client.connect(self.path, timeout=self.timeout,
                                          connect_timeout=self.connect_timeout,
                                          session=self.session, **self._client_options)
        finally:
            self._opening -= 1
            self._opened.set()
            self._opened = asyncio.Event()
        if self._closed:
            await client.close()
            raise ConnectionClosed(f"the pool to {self.path} is closed")
        self._clients.append(client)
        self._in_flight[client] = 0
        return client

    def _release(self, client: Client) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()
        if client in self._in_flight:
            self._in_flight[client] -= 1
            self._last_used[client] = asyncio.get_running_loop().time()
            if client.closed and not self._in_flight[client]:
                self._drop(client)

    def _drop(self, client: Client) -> None:
        if client in self._in_flight:
            self._clients.remove(client)
            del self._in_flight[client]
            self._last_used.pop(client, None)
            lost = client.closed or not client.is_alive()
            if not client.closed:
                task = asyncio.ensure_future(client.close())
                task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._tally.closing(client, lost)

    async def _call(self, attempt: Callable[[Client, int | None], Awaitable[Any]],
                    idempotent: bool, same_ids: bool = True) -> Any:
        """``await attempt(client, request_id)`` with retries per the policy."""
        policy = self.retry
        request_id: int | None = None   # set when a retry must reach the same server
        instance: bytes | None = None   # that server's instance id
        last: BaseException | None = None
        tries = 0
        try:
            while True:
                tries += 1
                client: Client | None = None
                restarted = False
                try:
                    client = await self._acquire()
                    if instance is not None and await _instance(client) != instance:
                        restarted = True
                    else:
                        return await attempt(client, request_id)
                except policy.retry_on as error:
                    if tries >= policy.max_attempts or not may_retry(
                            error, idempotent, self.exactly_once, self._closed):
                        raise
                    if needs_same_server(error, idempotent):
                        # Exactly-once: the server may have run it. Only its replay window
                        # may answer a retry, so the retry carries the same id to the same
                        # server.
                        instance = await _instance(client) if client is not None else None
                        request_id = getattr(error, "request_id", None) if same_ids else None
                        if instance is None or request_id is None:
                            raise
                    log.info("retrying a request to %s after: %s", self.path, error)
                    self._tally.retrying()
                    last = error
                finally:
                    if client is not None:
                        self._release(client)
                if restarted:
                    raise restarted_error(self.path, request_id) from last
                await asyncio.sleep(policy.delay(tries))
        finally:
            # ``last`` has this frame in its traceback: kept here, that cycle would hold the
            # attempt (and its payload) until a full collection, even after a success.
            last = None


async def _instance(client: Client) -> bytes | None:
    """The id of the server process behind ``client`` (waiting briefly for its hello)."""
    hello = await client.wait_for_hello(_INSTANCE_WAIT_S)
    return None if hello is None else hello.entries.get(HelloKey.INSTANCE_ID)
