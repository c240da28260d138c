"""The client's send policy, over its driver: how a payload that is not small travels
(through shared memory, waiting for a segment while the connection's reads go on, or
inline; the protocol's ``Endpoint.writes`` decides), waiting for the server's hello when that
decides it, and whether a failed request's frame may have reached the server.
"""

from __future__ import annotations

from time import monotonic
from typing import Any, Callable

from .._errors import ShmError, no_free_segment
from .connection import mark_sent
from .driver import ClientDriver


class ClientSender(ClientDriver):
    """The sending side of a client connection, over its reading side (``ClientDriver``)."""

    def _mark_sent(self, error: BaseException, end: int, request_id: int,
                   start: int | None = None) -> None:
        """Say on a failed request's error whether the server may have it
        (``connection.mark_sent``)."""
        mark_sent(error, self._channel, self._closed_reason is None, end, request_id, start)

    def _send_large(self, msg_type: int, payload: Any, request_id: int,
                    deadline: float) -> int:
        """Send one frame whose payload is not small: through shared memory or inline."""
        end = 0
        for buffers, fds in self._writes(msg_type, payload, request_id, deadline):
            end = self._channel.send(buffers, fds)
        return end

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
        if endpoint.peer_hello is None:
            # A large payload waits (briefly) for the server's hello: its limit, and whether
            # shared memory may carry it, are known only then.
            try:
                size = memoryview(payload).nbytes
            except TypeError:
                size = 0   # Endpoint.writes says what is wrong with it
            if size >= endpoint.shm_threshold:
                self._await_hello(min(deadline, self._conn.hello_by))
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
        def checked() -> Any:
            if self._closed_reason is not None:
                raise self._closed_error()
            try:
                return attempt()
            except ShmError:
                if self._closed_reason is not None:
                    raise self._closed_error() from None
                raise

        result = self._conn.until_free(checked, deadline, self._read_aside)
        if result is None:
            raise no_free_segment(self._endpoint.pool)
        return result

    def _read_aside(self, generation: int, seconds: float) -> None:
        """While a sender waits for a segment: read, if nobody is reading (that admits the
        releases, and hands replies to their threads); else wait for the reader to admit
        one."""
        with self._lock:
            leading = not self._reading and self._closed_reason is None
            if leading:
                self._reading = True
        if leading:
            self._read(seconds)
        else:
            pool = self._endpoint.pool
            assert pool is not None
            pool.wait(generation, seconds)

    def _await_hello(self, until: float) -> None:
        """Read until the server's hello has arrived, or ``until``: shared memory is only
        negotiated once it has. A hintens server sends its hello on accept. Past ``until``
        the socket is still read once without waiting: a client that has read nothing since
        it connected (no ``on_event``) has the hello there, unread."""
        looked = False
        while self._endpoint.peer_hello is None and self._closed_reason is None:
            remaining = until - monotonic()
            if remaining <= 0:
                if looked:
                    return
                remaining = 0.0
            with self._lock:
                if self._reading:   # another thread reads; it will admit the hello
                    if remaining <= 0:
                        return
                    self._sleepers += 1
                    try:
                        self._cond.wait(min(remaining, 0.05))
                    finally:
                        self._sleepers -= 1
                    continue
                self._reading = True
            looked = True
            self._read(remaining if remaining > 0 else None)   # None: without waiting
