"""One accepted client of an asyncio Server, driven by the event loop: ``add_reader`` on its
socket reads (``recvmsg``, descriptors included), replies leave through the core Channel's
outgoing queue, and what the socket does not take at once leaves when ``add_writer`` says
it can. The protocol rules are the protocol layer's (``Endpoint``, ``protocol.answers``,
the replay memory); this module only decides when things run.

How a Request is answered:

* a plain function as handler (and ``threaded=False``) runs right in the read callback, and
  the replies of one read leave in one write: the lowest latency, for handlers that do not
  block;
* an ``async def`` handler (or one that returns an awaitable) runs as a task per Request,
  so that many run at once; at most ``max_concurrency`` per connection, after which the
  connection is not read until one finishes;
* with ``threaded=True``, a plain handler runs in the server's executor, as a task too;
* a session's Requests (``ClientPool(exactly_once=True)``) go through its replay window.

Time limits are one timer per connection, moved lazily: a frame may take ``frame_timeout``
from its first byte to its last, a connection with nothing in flight may stay silent for
``idle_timeout``, and a client that leaves our bytes unread for ``send_timeout`` is cut.
While the outgoing queue holds more than ``send_queue_bytes``, the connection is not read:
a client that sends requests but never reads its replies cannot make us buffer without end.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import socket
from time import monotonic
from typing import TYPE_CHECKING, Any

from .. import _impl
from .._constants import EVENT, MSG_DONTWAIT, REQUEST, RESPONSE, ErrorCode, Flags, MessageType
from .._errors import ProtocolError, no_free_segment
from .._stats import public_name
from .._server_common import Pushing
from ..protocol.answers import (
    checked_result,
    failure_frame,
    is_echo,
    kept_answer,
    no_segment_reply,
)
from ..protocol.hello import FEATURE_RING, FEATURE_SHM, Hello, HelloKey
from ..protocol.replay import ANSWERED, NEW, RUNNING, ReplayWindow, refusal
from ..sync.connection import Connection
from ..transport.tls import client_hello_hint, note_broken_stream
from ..transport.unix import PeerCredentials
from ._loop import on_loop
from ._watch import SocketWatch

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("hintens")

#: A reply waiting for a shared-memory segment, or a retry for its first run to finish,
#: looks again this often.
_POLL_S = 0.005
_UNBOUNDED = 1 << 62
_SHM = int(Flags.SHM)
#: Inline replies of one read leave in batches of at most this many frames, so that the
#: outgoing queue's size (send_queue_bytes) sees them as they pile up.
_BATCH_FRAMES = 64

#: The connection whose handler or callback is running (``Server.current_connection``).
current: contextvars.ContextVar[ServerConnection | None] = contextvars.ContextVar(
    "hintens_aio_connection", default=None)


# __module__ is the public name (hintens.aio.X): help(), tracebacks and pickles show it.
class ServerConnection(Pushing):
    """One accepted client of an asyncio ``Server``, as handlers and callbacks see it. Use it
    from the loop's thread (``send_event`` and ``allocate`` may also be called from a
    handler running in the executor).

    Attributes:
        id: a number unique within this server.
        peer: the client's pid, uid and gid from SO_PEERCRED (-1 each over TCP).
        address: where the client is: ``tcp://host:port``, or ``unix:`` and the socket path.
        events_dropped: Events this client did not get because its outgoing queue was full
            (``slow_consumer="drop"``).
    """

    __module__ = "hintens.aio"

    def __init__(self, server: Server, sock: socket.socket, peer: PeerCredentials,
                 connection_id: int, loop: asyncio.AbstractEventLoop, address: str = "", *,
                 shm: bool = True) -> None:
        self.id = connection_id
        self.peer = peer
        self.address = address
        #: The client certificate's subject under TLS (``CN=...,O=...``), else None.
        self.subject: str | None = None
        self.events_dropped = 0
        self._server = server
        self._loop = loop
        endpoint = server._new_endpoint(shm, ring=shm)
        endpoint.decoder.budget = server._pending_budget
        endpoint.writable_all = server.writable
        endpoint.hello.entries[HelloKey.INSTANCE_ID] = server.instance_id
        # Without an on_event handler, plain Events are dropped inside the decoder.
        endpoint.decoder.skip_events = server.on_event is None
        self._conn = Connection(sock, endpoint, shm=server.shm and shm, stall_timeout=None)
        self._sock, self._channel, self._endpoint = sock, self._conn.channel, endpoint
        self._channel.on_queued = self._queued_threadsafe
        if endpoint.hello.features & FEATURE_RING:
            self._channel.ring_socket_wakes = True   # the loop waits on the socket
        self._fd = self._channel.fileno()
        self._loop_thread = server._loop_thread
        #: The replay window of the client's session, once its hello announced one.
        self.window: ReplayWindow | None = None
        self.session = b""
        self._joined = False
        self._open = True
        self._dropping = False
        self._cut = False
        # What the loop watches for (reading, writing) is the watch's state.
        self._watch = SocketWatch(loop, self._fd, self._channel, self._readable,
                                  self._writable, self._watch_failed, self._conn.more_buffered)
        self._eof = False            # the client's half is over: answer what came, then end
        self._tasks: set[asyncio.Future[Any]] = set()
        # Tasks whose handler waits to start until the client has read our queue down to
        # send_queue_bytes (_room).
        self._room_waiters: list[asyncio.Future[None]] = []
        # Items a read brought while the connection was busy (_busy): served, in order,
        # once it is not.
        self._held: list[Any] = []
        self._held_handle: asyncio.Handle | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._soon_handle: asyncio.Handle | None = None
        self._in_read = False        # replies of this read leave together at its end
        # Time limits: one timer, at the earliest deadline that may apply.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._last_activity = loop.time()
        self._frame_started = 0.0
        self._stall_since: float | None = None   # our bytes waited for the socket since
        self._stall_mark = 0                     # channel.written then
        self.ended = loop.create_future()        # set when the connection is over

    # As callbacks see it -------------------------------------------------------------------

    @property
    def peer_hello(self) -> Hello | None:
        """The client's capability hello, once it has arrived."""
        return self._endpoint.peer_hello

    @property
    def shm(self) -> bool:
        """Shared memory was negotiated with this client."""
        return self._endpoint.negotiated(FEATURE_SHM)

    @property
    def ring_active(self) -> bool:
        """This connection's frames travel through a shared-memory ring (the client asked,
        and the server offers rings): true from our switch on."""
        return self._channel.ring is not None

    @property
    def closed(self) -> bool:
        """True once the connection is over (or being cut)."""
        return not self._open

    def allocate(self, size: int) -> memoryview:
        """A writable buffer inside a shared-memory segment of this connection: fill it and
        return it from the handler as the response (or pass it to ``send_event``), and
        nothing is copied. It does not wait: the releases that free segments arrive on the
        loop, which a handler must not block.

        Raises:
            ShmError: this client did not negotiate shared memory, or ``size`` is more than
                the pool (or the client) takes.
            Timeout: every segment of the connection's pool is lent out right now.
            ValueError, TypeError: ``size`` is not a positive int.
        """
        view = self._endpoint.allocate(size)
        if view is None:
            raise no_free_segment(self._endpoint.pool, waited=False)
        return view

    def close(self) -> None:
        """Cut this connection now: requests in flight are not answered."""
        self._open = False
        self._channel.abort("closed by the server")
        on_loop(self._loop, self._loop_thread, self._end, "closed by the server")

    def __repr__(self) -> str:
        if self.peer.pid < 0:
            who = self.address if self.subject is None else f"{self.address} {self.subject}"
        else:
            who = f"pid={self.peer.pid} uid={self.peer.uid}"
        return f"<{public_name(self)} {self.id} {who}>"   # the same for its whole life (logs)

    # The connection's life -----------------------------------------------------------------

    def start(self) -> None:
        """Say hello (first, always), then read."""
        self._send_frames([self._endpoint.hello_frame()])
        self._resume()
        self._arm(self._next_deadline())

    def drain(self) -> None:
        """The server is closing: what the client sent already is read and answered, nothing
        more (the socket's read side is shut; its end comes after those bytes)."""
        try:
            self._channel.stop_reading()   # over a ring too: it reads what was published
        except OSError:
            pass

    def _end(self, why: str) -> None:
        """The connection is over: stop reading and writing, cancel what runs for it, write
        what is queued if the socket takes it now, close, and tell the server. Once."""
        if self.ended.done():
            return
        self._open = False
        self.ended.set_result(why)
        loop = self._loop
        for handle in (self._timer, self._flush_handle, self._soon_handle, self._held_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = self._soon_handle = self._held_handle = None
        self._held = []
        self._room_waiters = []   # their tasks are cancelled below
        if self._fd >= 0:
            self._watch.close()
        for task in list(self._tasks):
            task.cancel()
        channel = self._channel
        if channel.aborted is not None and not self._cut and why != "closed by the server":
            self._server._count("slow_consumers_cut")
            log.warning("cut %r: %s", self, channel.aborted)
        else:
            log.debug("%r ended: %s", self, why)
        if channel.queued and not channel.broken:
            try:
                channel.flush_due(False)
            except OSError:
                pass
        self._conn.close()
        # The channel called back into this object: without that cycle, the connection (and
        # its buffers) goes as soon as nobody holds it, not at the next full collection.
        channel.on_queued = None
        self._server._unregister(self)

    # Reading -------------------------------------------------------------------------------

    def _resume(self) -> None:
        if not self._watch.reading and self._open and not self._eof:
            self._watch.want_read(True)

    def _pause(self) -> None:
        if self._watch.reading:
            self._watch.want_read(False)

    def _watch_failed(self, error: BaseException) -> None:
        if isinstance(error, ProtocolError):
            log.info("%r broke the protocol: %s", self, error)
            self._end("closed after a fatal protocol error")
        else:
            self._end(str(error))

    def _readable(self) -> None:
        conn, endpoint = self._conn, self._endpoint
        decoder = endpoint.decoder
        was_in_frame, decoded = decoder.in_frame, decoder.frames_decoded
        try:
            items = conn.read(MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as error:
            note_broken_stream(self, error)
            self._end(str(error))
            return
        now = self._last_activity = self._loop.time()
        if items is None:
            self._eof = True
            self._pause()
            if decoder.in_frame:
                self._end(f"hung up inside a frame ({decoder.pending} bytes of it received)")
            else:
                self._maybe_done()
            return
        if decoder.in_frame and (not was_in_frame or decoder.frames_decoded != decoded):
            self._frame_started = now   # the unfinished frame began in this read
            if self._server.frame_timeout is not None:
                self._arm(now + self._server.frame_timeout)
        if not self._joined and endpoint.peer_hello is not None:
            self._joined = True
            self._join_session()
        if items:
            self._in_read = True
            try:
                self._handle(items)
            finally:
                self._in_read = False
            self._flush()   # (which looks at the back-pressure once all is written)
        if self._tasks or self._held or self._channel.queued:
            self._check_backpressure()
        if self._watch.reading and conn.more_buffered():
            # Decrypted TLS bytes, or a ring's: the fd will not tell of them.
            self._watch.read_soon()

    def _join_session(self) -> None:
        server = self._server
        assert self._endpoint.peer_hello is not None
        session = self._endpoint.peer_hello.entries.get(HelloKey.SESSION_ID)
        if server._replay is not None and session is not None and len(session) == 16:
            self.session = session
            self.window = server._replay.window_for(session)

    def _handle(self, items: list[Any]) -> None:
        """Serve what one read brought, in order. Replies that are ready now leave together
        (``out``); the rest are tasks."""
        server, endpoint = self._server, self._endpoint
        frame_type = _impl.core.Frame
        inline = server._inline and self.window is None
        out: list[Any] = []
        for index in range(len(items)):
            item = items[index]
            if type(item) is not frame_type:
                log.info("%r broke the protocol: %s%s", self, item, client_hello_hint(item))
                reply = endpoint.error_reply(item)
                if reply is not None:
                    out.append(reply)
                if item.fatal:
                    self._send_frames(out)
                    self._end("closed after a fatal protocol error")
                    return
            elif item.type == REQUEST:
                if len(out) >= _BATCH_FRAMES:   # the queue's size must see these replies
                    self._send_frames(out)
                    out = []
                if self._busy():
                    # max_concurrency tasks run, or send_queue_bytes wait for the client:
                    # the rest of this read waits (and the socket is not read meanwhile).
                    self._held = items[index:]
                    self._pause()
                    break
                if inline:
                    items[index] = None
                    out = self._answer_now(item, out)
                else:
                    self._spawn(self._answer(item))
            elif item.type == EVENT:
                self._deliver_event(item.payload)
            else:
                log.debug("%r sent an unsolicited %s frame; ignored", self,
                          MessageType(item.type).name)
        if out:
            self._send_frames(out)

    def _answer_now(self, item: Any, out: list[Any]) -> list[Any]:
        """A plain handler, run here: an inline reply joins ``out``; one through shared
        memory goes at once, after what ``out`` held; an awaitable result, or a reply that
        must wait for a segment, becomes a task."""
        request_id = item.request_id
        endpoint = self._endpoint
        token = current.set(self)
        try:
            started = monotonic()
            try:
                result = self._server._call(item.payload)
            finally:
                self._channel.note_handler(monotonic() - started)
            if type(result) is bytes and len(result) < endpoint.small_max:
                out.append(_impl.core.encode_frame(RESPONSE, result, request_id))   # common
                endpoint.responses_sent += 1
                return out
            if inspect.isawaitable(result):
                self._spawn(self._finish(request_id, result, item))
                return out
            if type(result) is not bytes:
                result = checked_result(result)
            writes = endpoint.reply_writes(request_id, result)
        except Exception as error:
            out.append(failure_frame(endpoint, request_id, error))
            return out
        finally:
            current.reset(token)
        if writes is None:   # every segment is lent out: wait for one, as a task
            self._spawn(self._finish(request_id, result, item))
            return out
        if len(writes) == 1 and not _impl.core.unpack_header(writes[0][0][0]).flags & _SHM:
            # Inline, but not small: queued now with what came before it, so that the queue's
            # size (_busy) sees it before the next Request of this read is run. Left in
            # ``out``, up to _BATCH_FRAMES of them (32 MB of 1 MB replies) went unseen.
            out += writes[0][0]
            self._send_frames(out)
            return []
        if not is_echo(self._endpoint, result):
            item = result = None   # the request's lent payload is released before the reply
        if out:
            self._send_frames(out)
            out = []
        self._send_writes(writes)
        return out

    async def _answer(self, item: Any) -> None:
        """A Request answered in a task of its own."""
        current.set(self)
        request_id = item.request_id
        if self._channel.queued > self._server.send_queue_bytes:
            await self._room()
        try:
            if self.window is not None:
                ok, result = await self._replay_or_run(item)
                if not ok:
                    self._send_frames([result])
                    return
            else:
                started = monotonic()
                try:
                    result = await self._server._run(item.payload)
                finally:
                    self._channel.note_handler(monotonic() - started)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._send_frames([failure_frame(self._endpoint, request_id, error)])
            return
        await self._finish(request_id, result, item)

    async def _finish(self, request_id: int, result: Any, item: Any) -> None:
        """Send the reply for ``result`` (awaited first, if it is awaitable), waiting up to
        ``send_timeout`` for a shared-memory segment if it needs one."""
        try:
            if inspect.isawaitable(result):
                if self._channel.queued > self._server.send_queue_bytes:
                    await self._room()
                result = await result
            result = checked_result(result)
            endpoint = self._endpoint
            writes = endpoint.reply_writes(request_id, result)
            if writes is None:
                seconds = self._server.send_timeout
                deadline = None if seconds is None else self._loop.time() + seconds
                while writes is None and (deadline is None or self._loop.time() < deadline):
                    await asyncio.sleep(_POLL_S)   # the releases arrive through _readable
                    writes = endpoint.reply_writes(request_id, result)
                if writes is None:
                    writes = no_segment_reply(endpoint, request_id)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            writes = [([failure_frame(self._endpoint, request_id, error)], [])]
        self._send_writes(writes)
        # The request's payload, which an echo's reply points back at, is held until the
        # reply is queued: its release must not overtake the reply.
        del item

    async def _replay_or_run(self, item: Any) -> tuple[bool, Any]:
        """A session's Request: run it if it is new, else answer from the replay window (a
        retry whose first run is still going waits for it, up to ``send_timeout``).
        Returns ``(True, result)`` or ``(False, error_frame)``."""
        server, endpoint = self._server, self._endpoint
        replay = server._replay
        assert self.window is not None and replay is not None
        request_id = item.request_id
        seconds = server.send_timeout
        deadline = None if seconds is None else self._loop.time() + seconds
        while True:
            self.window, state, kept = replay.claim(self.session, self.window, request_id, 0)
            if state == NEW:
                return await self._run_once(self.window, item)
            if state == ANSWERED:
                return kept
            if state != RUNNING or (deadline is not None and self._loop.time() >= deadline):
                return False, endpoint.error_frame(ErrorCode.UNAVAILABLE,
                                                   refusal(request_id, state), request_id)
            await asyncio.sleep(_POLL_S)   # its first run, on another connection, goes on

    async def _run_once(self, window: ReplayWindow, item: Any) -> tuple[bool, Any]:
        """Run a session's Request claimed NEW and remember its answer (``window.finish``),
        whatever happens, a cancellation included."""
        endpoint = self._endpoint
        answer: tuple[bool, bytes] = (False, endpoint.error_frame(
            ErrorCode.HANDLER_ERROR, "the handler did not finish", item.request_id,
            counted=False))   # made in case: counted only if it is the answer
        try:
            started = monotonic()
            try:
                result = await self._server._run(item.payload)
            finally:
                self._channel.note_handler(monotonic() - started)
            result = checked_result(result)
            answer = kept_answer(result, window.max_bytes)
            return True, result
        except asyncio.CancelledError:
            raise
        except Exception as error:
            answer = (False, failure_frame(endpoint, item.request_id, error))
            return answer
        finally:
            window.finish(item.request_id, answer)

    def _deliver_event(self, payload: Any) -> None:
        server = self._server
        if server.on_event is None:
            return
        token = current.set(self)
        try:
            if server.codec is not None:
                payload = server.codec.decode(payload, "event")
            result = server.on_event(payload, self)
        except Exception:
            log.exception("on_event callback raised")
            return
        finally:
            current.reset(token)
        if inspect.isawaitable(result):
            self._spawn(logged(result, "on_event callback raised"))

    def _spawn(self, awaitable: Any) -> None:
        """Run ``awaitable`` as a task of this connection (cancelled when it ends). At
        ``max_concurrency`` of them, the connection is not read until one finishes."""
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self._tasks) >= self._server.max_concurrency:
            self._pause()

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%r: a task failed", self, exc_info=task.exception())
        if not self._tasks:
            self._last_activity = self._loop.time()
            self._arm(self._next_deadline())   # the idle limit applies again
        self._check_backpressure()
        self._maybe_done()

    async def _room(self) -> None:
        """Wait while more than ``send_queue_bytes`` wait for the client to read: a handler
        started now would only add its reply to them. Without this, a client that never
        reads made us hold a reply per task of its read (``max_concurrency`` of them). Tasks
        whose handler awaits before it answers still all start before the first reply is
        queued: for those ``max_concurrency`` stays the bound. One that never reads is cut
        at ``send_timeout``, which cancels the waiting tasks."""
        while self._open and self._channel.queued > self._server.send_queue_bytes:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._room_waiters.append(waiter)
            await waiter

    def _wake_room(self) -> None:
        """Let the tasks waiting in ``_room`` start, if the queue is down to
        ``send_queue_bytes``."""
        if self._room_waiters and self._channel.queued <= self._server.send_queue_bytes:
            waiters, self._room_waiters = self._room_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _busy(self) -> bool:
        """Too much is under way to take more from this client: ``max_concurrency`` tasks,
        or more than ``send_queue_bytes`` waiting for it to read."""
        return len(self._tasks) >= self._server.max_concurrency \
            or self._channel.queued > self._server.send_queue_bytes

    def _serve_held(self) -> None:
        """Serve what a read brought while the connection was busy, now that it is not."""
        self._held_handle = None
        if not self._open or not self._held or self._busy():
            return
        items, self._held = self._held, []
        self._in_read = True
        try:
            self._handle(items)
        finally:
            self._in_read = False
        self._flush()
        self._check_backpressure()
        self._maybe_done()

    def _check_backpressure(self) -> None:
        """Read while we may: fewer than ``max_concurrency`` tasks, and the outgoing queue
        under ``send_queue_bytes``."""
        if not self._open:
            return
        self._wake_room()
        if self._held:
            self._pause()
            if self._held_handle is None and not self._busy():
                self._held_handle = self._loop.call_soon(self._serve_held)
        elif self._busy():
            self._pause()
        else:
            self._resume()

    def _maybe_done(self) -> None:
        """After the client's end of the stream: once nothing runs and nothing waits to be
        written, the connection is over."""
        if self._eof and self._open and not self._tasks and not self._held \
                and not self._channel.queued:
            self._end("closed by the client")

    # Writing -------------------------------------------------------------------------------

    def _send_frames(self, frames: list[Any]) -> None:
        self._send_writes([(frames, [])])

    def _send_writes(self, writes: list[Any]) -> None:
        """Queue writes; they leave at the end of this read, or on the loop's next turn
        (replies of tasks that finish together share it)."""
        if not self._open:
            return
        try:
            self._channel.offer(writes, _UNBOUNDED, False)
        except OSError as error:
            self._end(f"lost while sending: {error}")

    def _queued_threadsafe(self, channel: Any, soon: bool = False) -> None:
        """The channel's ``on_queued``, from any thread (a release is queued by whichever
        thread drops a lent view)."""
        on_loop(self._loop, self._loop_thread, self._queued, soon)

    def _queued(self, soon: bool) -> None:
        if not self._open:
            return
        if soon:
            if not self._in_read and self._soon_handle is None:
                self._soon_handle = self._loop.call_soon(self._flush_soon)
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_later(self._channel.flush_interval,
                                                       self._flush_due)

    def _flush_soon(self) -> None:
        self._soon_handle = None
        self._flush()

    def _flush_due(self) -> None:
        self._flush_handle = None
        self._flush()

    def _flush(self) -> None:
        if not self._open:
            return
        channel = self._channel
        try:
            left = channel.flush_due(False)
        except OSError as error:
            self._end(f"lost while sending: {error}")
            return
        if channel.broken:
            self._end("lost while sending")
            return
        if left:
            if not self._watch.writing:
                self._watch.want_write(True)
            if self._stall_since is None:
                self._stall_since, self._stall_mark = self._loop.time(), channel.written
                if self._server.send_timeout is not None:
                    self._arm(self._stall_since + self._server.send_timeout)
        else:
            self._stall_since = None
            if self._watch.writing:
                self._watch.want_write(False)
            self._check_backpressure()
            self._maybe_done()

    def _writable(self) -> None:
        channel = self._channel
        if self._stall_since is not None and channel.written != self._stall_mark:
            self._stall_since, self._stall_mark = self._loop.time(), channel.written
        self._flush()
        self._wake_room()
        if self._held:
            self._check_backpressure()   # the queue may have drained below send_queue_bytes

    # Time limits ---------------------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        """The earliest time limit that applies now (loop time), or None."""
        server = self._server
        deadlines = []
        if self._endpoint.decoder.in_frame:
            if server.frame_timeout is not None:
                deadlines.append(self._frame_started + server.frame_timeout)
        elif server.idle_timeout is not None and not self._tasks:
            deadlines.append(self._last_activity + server.idle_timeout)
        if self._stall_since is not None and server.send_timeout is not None:
            deadlines.append(self._stall_since + server.send_timeout)
        return min(deadlines) if deadlines else None

    def _arm(self, at: float | None) -> None:
        if at is None or not self._open:
            return
        if self._timer is not None:
            if self._timer_at <= at:
                return   # it wakes first and looks again
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._tick)

    def _tick(self) -> None:
        """A time limit may have passed: act on the one that did, or wait for the next."""
        self._timer = None
        if not self._open:
            return
        server, now = self._server, self._loop.time()
        if self._stall_since is not None and server.send_timeout is not None \
                and now >= self._stall_since + server.send_timeout:
            why = (f"it read nothing for {server.send_timeout:g} s while "
                   f"{self._channel.queued} bytes waited for it (send_timeout)")
            self._cut = True
            self._channel.abort(why)
            server._count("slow_consumers_cut")
            log.warning("cut %r: %s", self, why)
            self._end(why)
            return
        if self._endpoint.decoder.in_frame:
            if server.frame_timeout is not None \
                    and now >= self._frame_started + server.frame_timeout:
                log.info("closing %r: inside a frame for too long", self)
                self._end("inside a frame for too long")
                return
        elif server.idle_timeout is not None and not self._tasks \
                and now >= self._last_activity + server.idle_timeout:
            log.info("closing %r: idle for too long", self)
            self._end("idle for too long")
            return
        self._arm(self._next_deadline())


async def logged(awaitable: Any, what: str) -> None:
    """Await a callback's awaitable; what it raises is logged, not lost."""
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception(what)

