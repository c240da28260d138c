"""One accepted client of a sync Server, and the loop that serves it on its own thread.

The thread that read a request runs the handler and writes the reply, with no queue in
between. Plain requests are answered inside the core (``Channel.serve``), with thresholds
and message types from the protocol layer; everything else (Events, hellos, violations, a
session's requests and their replay window, replies through shared memory) comes up here.
"""

from __future__ import annotations

import logging
import socket
import threading
from time import monotonic
from typing import TYPE_CHECKING, Any

from .. import _impl
from .._checks import call_timeout_s, deadline_after
from .._codecs import join
from .._constants import ErrorCode, Flags, MessageType
from .._errors import ConnectionClosed, ProtocolError, RemoteError, Timeout
from ..protocol.endpoint import Endpoint
from ..protocol.hello import FEATURE_SHM, Hello, HelloKey
from ..protocol.replay import ANSWERED, NEW, TOO_LARGE, ReplayWindow, refusal
from ..transport.unix import PeerCredentials
from .connection import Connection

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("hintens")



def _is_echo(endpoint: Endpoint, result: Any) -> bool:
    """The handler returned the payload it was lent: the reply points back at its segment."""
    return type(result) is memoryview and endpoint.lends(result)


class ServerConnection:
    """One accepted client, as callbacks see it.

    Attributes:
        id: a number unique within this server.
        peer: the client's pid, uid and gid from SO_PEERCRED.
        events_dropped: Events this client did not get because its outgoing queue was full
            (``slow_consumer="drop"``).
    """

    def __init__(self, server: Server, sock: socket.socket, peer: PeerCredentials,
                 connection_id: int) -> None:
        self.id = connection_id
        self.peer = peer
        self.events_dropped = 0
        self._server = server
        endpoint = server._new_endpoint()
        endpoint.decoder.budget = server._pending_budget
        # Pushed Events left unread this long with the socket full: the flusher cuts.
        self._conn = Connection(sock, endpoint, shm=server.shm,
                                stall_timeout=server.send_timeout)
        self._sock, self._channel, self._endpoint = sock, self._conn.channel, endpoint
        self._endpoint.writable_all = server.writable
        self._endpoint.hello.entries[HelloKey.INSTANCE_ID] = server.instance_id
        #: The replay window of the client's session, once its hello announced one.
        self.window: ReplayWindow | None = None
        self.session = b""
        # Without an on_event handler, plain Events are dropped inside the decoder: no Frame,
        # no Python call per Event.
        self._endpoint.decoder.skip_events = server.on_event is None
        self._open = True
        self._dropping = False       # in an episode of dropped Events (logged once)
        self._cut = False            # cut (and counted) for falling behind
        # Items a read made while a reply waited for a shared-memory segment: served next.
        self._backlog: list[Any] = []
        self.thread: threading.Thread | None = None

    @property
    def peer_hello(self) -> Hello | None:
        """The client's capability hello, once it has arrived."""
        return self._endpoint.peer_hello

    @property
    def shm(self) -> bool:
        """Shared memory was negotiated with this client (its hello offered it, and so did
        the server)."""
        return self._endpoint.negotiated(FEATURE_SHM)

    def send_event(self, payload: Any) -> bool:
        """Push an Event to this client without waiting for it to read: into this
        connection's outgoing queue (``send_queue_bytes``), through shared memory when large
        (inline, when the client holds every segment it was lent and the Event fits its
        limit).

        Returns:
            True when queued; False when dropped because the queue is full and the server's
            ``slow_consumer`` policy is "drop" (counted in ``events_dropped``).

        Raises:
            ConnectionClosed: the connection is closed, or was cut now because its queue is
                full (``slow_consumer="cut"``).
            FrameTooLargeError: over the client's limit, and shared memory was not negotiated.
            TypeError: ``payload`` is not bytes-like (or not encodable by the codec).
        """
        if self._server.codec is not None:
            payload = join(self._server.codec.encode(payload, "event"))
        return self._push(payload, self._server._next_event_id())

    def _push(self, payload: Any, event_id: int, small: list[Any] | None = None) -> bool:
        # ``small``: the writes of a small bytes payload, built once for a whole broadcast.
        if not self._open:
            raise ConnectionClosed(f"connection {self.id} is closed")
        endpoint, channel = self._endpoint, self._channel
        if type(payload) is bytes and len(payload) < endpoint.small_max:
            writes: list[Any] | None = small or [([_impl.core.encode_frame(
                MessageType.EVENT, payload, event_id)], [])]
        else:
            writes = endpoint.writes(MessageType.EVENT, payload, event_id)
            if writes is None and memoryview(payload).nbytes <= endpoint.peer.max_payload:
                # Every segment is lent out (the client holds the Events it was lent): this
                # one goes inline, into the bounded queue, rather than wait.
                writes = [(endpoint.inline(MessageType.EVENT, payload, event_id), [])]
        try:
            if writes is not None and self._conn.offer(writes, self._server.send_queue_bytes):
                self._dropping = False
                return True
        except OSError as error:
            self.close()
            raise ConnectionClosed(f"connection {self.id} lost while sending: {error}") \
                from error
        if writes is not None:
            endpoint.unsent(writes)
        return self._overflowed(
            f"its outgoing queue is full ({channel.queued} bytes unread, "
            f"send_queue_bytes={self._server.send_queue_bytes})" if writes is not None
            else "every shared-memory segment of its connection is lent out")

    def close(self) -> None:
        """Cut this connection now; its serving thread ends."""
        self._open = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        """The connection's thread: say hello, serve until the connection ends, close it."""
        server, channel = self._server, self._channel
        why = ""
        try:
            self._say_hello()   # the hello goes first, always
            if not server._register(self):
                return
            why = self._serve_frames()
        except ConnectionClosed as error:
            why = str(error)
        except Exception:
            log.exception("connection %r failed", self)
        finally:
            if channel.aborted is not None and not self._cut:
                # Cut by the flusher: the client read nothing for send_timeout.
                server._count("slow_consumers_cut")
                log.warning("cut %r: %s", self, channel.aborted)
            elif why:
                log.debug("%r ended: %s", self, why)
            self._close_transport()
            server._unregister(self)

    def _overflowed(self, why: str) -> bool:
        """An Event did not fit the outgoing queue: the server's slow-consumer policy.
        Returns False (dropped), or raises ConnectionClosed (cut)."""
        server = self._server
        if server.slow_consumer == "drop":
            server._count("events_dropped", self)
            if not self._dropping:
                self._dropping = True
                log.warning("dropping Events for %r: %s", self, why)
            return False
        self._cut_behind(why)
        raise ConnectionClosed(f"connection {self.id} was cut: {why}")

    def _cut_behind(self, why: str) -> None:
        """Cut a client that fell behind, once, with a logged reason and a counter."""
        if not self._cut:
            self._cut = True
            self._channel.abort(why)
            self._open = False
            self._server._count("slow_consumers_cut")
            log.warning("cut %r: %s", self, why)

    def _say_hello(self) -> None:
        self._send([self._endpoint.hello_frame()])

    def _close_transport(self) -> None:
        """The end: Events pushed before the client went are written if the socket takes
        them, then the socket, our segments, the client's mappings and an unfinished frame's
        memory (and budget) go."""
        channel = self._channel
        if self._open and channel.queued and not channel.broken:
            try:
                channel.flush()
            except OSError:
                pass
        self.close()
        self._conn.close()
        self._backlog.clear()

    def _send(self, frames: list[Any]) -> None:
        if not self._open:
            raise _ClientGone(f"connection {self.id} is closed")
        try:
            self._channel.send(frames)
        except OSError as error:   # BlockingIOError: the send timeout expired
            self.close()
            raise _ClientGone(f"connection {self.id} lost while sending: {error}") from error

    def _send_writes(self, writes: list[Any]) -> None:
        if not self._open:
            raise _ClientGone(f"connection {self.id} is closed")
        try:
            self._conn.send_writes(writes)
        except OSError as error:   # BlockingIOError: the send timeout expired
            self.close()
            raise _ClientGone(f"connection {self.id} lost while sending: {error}") from error

    def _reply_writes(self, request_id: int, result: Any) -> list[Any]:
        """The writes that answer a Request (Endpoint.reply_writes), waiting up to
        ``send_timeout`` for a shared-memory segment if they need one, and reading meanwhile:
        the release that frees one arrives on this connection, and this thread is its only
        reader. After that, the answer is UNAVAILABLE.

        Raises:
            RemoteError: the handler's result is not bytes-like (a HANDLER_ERROR that says so).
            ConnectionClosed: the client went while we waited.
        """
        if type(result) is not bytes and result is not None and not is_bytes_like(result):
            raise RemoteError(ErrorCode.HANDLER_ERROR, f"handler must return a bytes-like "
                                                       f"object, got {type(result).__name__}")
        endpoint = self._endpoint
        writes = endpoint.reply_writes(request_id, result)
        if writes is None:
            writes = self._conn.until_free(lambda: endpoint.reply_writes(request_id, result),
                                           deadline_after(self._server.send_timeout),
                                           self._read_aside)
        if writes is None:
            pool = endpoint.pool
            assert pool is not None
            return [([endpoint.error_frame(
                ErrorCode.UNAVAILABLE, f"no shared memory for the reply: all "
                f"{pool.total_bytes} bytes of this connection's segments stayed lent out",
                request_id)], [])]
        return writes

    def allocate(self, size: int, timeout: float | None = None) -> memoryview:
        """A writable buffer inside a shared-memory segment of this connection: fill it and
        return it from the handler as the response (or pass it to ``send_event``), and
        nothing is copied. For the thread that serves this connection (its handlers and
        callbacks): waiting for a segment reads this connection's stream.

        Args:
            size: bytes.
            timeout: seconds to wait for a free segment; default the server's
                ``send_timeout``.

        Raises:
            ShmError: this client did not negotiate shared memory, or ``size`` is more than
                the pool (or the client) takes.
            Timeout: every segment of the connection's pool stayed lent out.
            ValueError, TypeError: ``size`` is not a positive int.
        """
        deadline = deadline_after(call_timeout_s(timeout, self._server.send_timeout))
        endpoint = self._endpoint
        view = self._conn.until_free(lambda: endpoint.allocate(size), deadline,
                                     self._read_aside)
        if view is None:
            assert endpoint.pool is not None
            raise Timeout(f"no shared-memory segment came free in time "
                          f"({endpoint.pool.total_bytes} bytes lent out)")
        return view

    def _read_aside(self, generation: int, seconds: float) -> None:
        """One read while a reply waits for a segment: control Events (the releases) take
        effect now, and whatever else came is kept, in order, to be served next.

        Raises:
            ConnectionClosed: the client hung up.
        """
        self._conn.set_receive_timeout(seconds)
        try:
            items = self._conn.read()
        except BlockingIOError:
            return
        except OSError as error:
            raise _ClientGone(f"connection {self.id} lost: {error}") from error
        if items is None:
            raise _ClientGone(f"connection {self.id} closed by the client")
        self._backlog += items

    def _take_backlog(self) -> list[Any]:
        items, self._backlog = self._backlog, []
        return items

    # Serving ----------------------------------------------------------------------------

    def _serve_frames(self) -> str:
        """Read and answer until the connection ends; returns why it ended."""
        server, conn = self._server, self._conn
        channel, endpoint = self._channel, self._endpoint
        decoder = endpoint.decoder
        handler = server._call
        reply_writes = self._reply_writes

        def on_error(request_id: int, error: Exception) -> bytes:
            return self._error_answer(endpoint, request_id, error)

        frame_started = 0.0
        frame_timeout, idle_timeout = server.frame_timeout, server.idle_timeout
        joined = False   # looked for the session its hello announces
        while True:
            timeout: float | None
            if decoder.in_frame and frame_timeout is not None:
                timeout = max(0.001, frame_timeout - (monotonic() - frame_started))
            else:
                timeout = idle_timeout
            conn.set_receive_timeout(timeout)
            was_in_frame, decoded = decoder.in_frame, decoder.frames_decoded
            try:
                # Plain Requests are answered inside the core, read after read, until a
                # read brings something else: that comes back here. (Not while a frame is
                # open: its timeout is on the socket, and the idle one must come back after
                # it.) A session's requests all go through _handle and its replay window.
                if self.window is None and not endpoint.compressing:
                    rest = channel.serve(handler, on_error, reply_writes, endpoint.small_max,
                                         endpoint.inline_max, not was_in_frame)
                else:
                    rest = channel.receive()
                if rest is None:
                    if decoder.in_frame:
                        return (f"hung up inside a frame ({decoder.pending} bytes of it "
                                f"received)")
                    return "closed by the client"
                items = conn.admit(rest)
            except BlockingIOError:
                what = "inside a frame" if decoder.in_frame else "idle"
                log.info("closing %r: %s for too long", self, what)
                return f"{what} for too long"
            except ProtocolError as error:
                items = conn.after_error(error)
            except OSError as error:
                return str(error)
            if not joined and endpoint.peer_hello is not None:
                joined = True
                self._join_session()
            if self._backlog:
                # Replies that waited for shared memory read on meanwhile: serve that too.
                items += self._take_backlog()
            while items:
                if not self._handle(items):
                    return "closed after a fatal protocol error"
                items = self._take_backlog()
            conn.drop_unclaimed()   # descriptors an answered frame left
            if decoder.in_frame and (not was_in_frame or decoder.frames_decoded != decoded
                                     or conn.receive_timeout is None):
                # A frame completed (or an error ended one) in this read, or none was open:
                # the unfinished one began in this read.
                frame_started = monotonic()

    def _join_session(self) -> None:
        """Once the client's hello is in: the replay window of the session it announced, so
        that all its requests go through it (none through the core's fast path)."""
        server = self._server
        assert self._endpoint.peer_hello is not None
        session = self._endpoint.peer_hello.entries.get(HelloKey.SESSION_ID)
        if server._replay is not None and session is not None and len(session) == 16:
            self.session = session
            self.window = server._replay.window_for(session)

    def _handle(self, items: list[Any]) -> bool:
        """Serve items the core did not: Events, hellos, violations, and Requests after them.
        False when the connection must close."""
        frame_type = _impl.core.Frame
        out: list[Any] = []   # inline answers, written together, in order
        for index in range(len(items)):
            item = items[index]
            if type(item) is not frame_type:
                if not self._violation(item, out):
                    break
            elif item.type == MessageType.REQUEST:
                item = None   # _answer drops the request (and its lent payload) when it may
                out = self._answer(items, index, out)
            elif item.type == MessageType.EVENT:
                self._deliver_event(item)
            else:
                log.debug("%r sent an unsolicited %s frame; ignored", self,
                          MessageType(item.type).name)
        else:
            if out:
                self._send(out)
            return True
        if out:
            self._send(out)
        return False

    def _answer(self, items: list[Any], index: int,
                out: list[Any]) -> list[Any]:
        """Answer the Request ``items[index]``. An inline reply joins ``out``; one through
        shared memory goes at once, after what ``out`` held. Returns what is left in ``out``."""
        server = self._server
        endpoint = self._endpoint
        item = items[index]
        request_id = item.request_id
        try:
            if self.window is None:
                result = server._call(item.payload)
            else:
                ok, result = self._replay_or_run(item)
                if not ok:
                    out.append(result)   # the Error frame that answers it
                    return out
            writes = self._reply_writes(request_id, result)
            if len(writes) == 1 and not _impl.core.unpack_header(
                    writes[0][0][0]).flags & Flags.SHM:
                out += writes[0][0]   # inline: goes with the others, in order
                return out
            if not _is_echo(endpoint, result):
                # The reply was copied out: drop the request's lent payload now, so that its
                # release reaches the client before the reply does.
                items[index] = item = result = None
            # (An echo names the client's own segment: the release must follow the reply, or
            # the client would free the segment before it.)
            if out:
                self._send(out)
                out = []
            self._send_writes(writes)
            items[index] = item = result = None
        except Exception as error:
            out.append(self._error_answer(endpoint, request_id, error))
        return out

    def _replay_or_run(self, item: Any) -> tuple[bool, Any]:
        """For a connection with a session: run the Request if it is new, or answer it from
        the replay window (``ReplayMemory.claim``). Returns ``(True, result)``, or ``(False,
        error_frame)``."""
        server = self._server
        assert self.window is not None and server._replay is not None
        request_id = item.request_id
        self.window, state, kept = server._replay.claim(self.session, self.window, request_id,
                                                        server.send_timeout)
        if state == NEW:
            ok, data, result = self._run_once(self._endpoint, self.window, item)
            return (True, result) if ok else (False, data)
        if state == ANSWERED:
            return kept   # (ok, the answer's bytes or its Error frame)
        return False, self._endpoint.error_frame(ErrorCode.UNAVAILABLE,
                                                 refusal(request_id, state), request_id)

    def _deliver_event(self, item: Any) -> None:
        server = self._server
        if server.on_event is not None:
            try:
                server.on_event(item.payload if server.codec is None else
                                server.codec.decode(item.payload, "event"), self)
            except Exception:
                log.exception("on_event callback raised")

    def _violation(self, error: Any, out: list[Any]) -> bool:
        """A frame that broke the protocol: its Error reply joins ``out``. False if it is
        fatal (the connection closes)."""
        log.info("%r broke the protocol: %s", self, error)
        reply = self._endpoint.error_reply(error)
        if reply is not None:
            out.append(reply)
        return not error.fatal

    def _run_once(self, endpoint: Endpoint, window: ReplayWindow,
                  item: Any) -> tuple[bool, bytes, Any]:
        """Run a session's request claimed NEW and remember its answer.

        Returns:
            ``(ok, error_frame, result)``: whether the handler answered, the Error frame that
            answers it when it did not, and the handler's own result, sent as it is (shared
            memory included). The window keeps a copy of the answer, if it is small enough.
        """
        server = self._server
        answer: tuple[bool, bytes] = (False, endpoint.error_frame(
            ErrorCode.HANDLER_ERROR, "the handler did not finish", item.request_id))
        try:
            result = server._call(item.payload)
            result = b"" if result is None else result
            if not is_bytes_like(result):   # the same Error as without replay
                raise RemoteError(ErrorCode.HANDLER_ERROR, f"handler must return a bytes-like "
                                                           f"object, got {type(result).__name__}")
            with memoryview(result) as view:
                # Copied only if it can be kept: an echo of a (sparse) lent gigabyte must not
                # cost a gigabyte here.
                answer = (True, view.tobytes()) if view.nbytes <= window.max_bytes \
                    else TOO_LARGE
            return True, b"", result
        except Exception as error:
            answer = (False, self._error_answer(endpoint, item.request_id, error))
            return False, answer[1], None
        finally:
            window.finish(item.request_id, answer)

    @staticmethod
    def _error_answer(endpoint: Endpoint, request_id: int, error: Exception) -> bytes:
        """The Error frame for a handler that raised (or returned something unsendable).

        Raises:
            ConnectionClosed: the client went while we answered it: no answer is due, and
                nothing else on this connection is.
        """
        if isinstance(error, _ClientGone):
            raise error
        if isinstance(error, RemoteError):
            return endpoint.error_frame(error.code, error.message, request_id)
        log.warning("handler failed on request %d", request_id, exc_info=True)
        return endpoint.error_frame(ErrorCode.HANDLER_ERROR, f"{type(error).__name__}: {error}",
                                    request_id)


    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} pid={self.peer.pid} uid={self.peer.uid}>"


class _ClientGone(ConnectionClosed):
    """The client went while we answered it: the connection ends, quietly. (Raised by our
    own writes and reads; a handler's ConnectionClosed is the handler's failure.)"""


def is_bytes_like(value: Any) -> bool:
    if type(value) is bytes:
        return True
    try:
        memoryview(value).release()
        return True
    except TypeError:
        return False
