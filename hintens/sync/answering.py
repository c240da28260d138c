"""How a served connection answers what it reads: the loop of a connection's thread (plain
Requests answered inside the core, ``Channel.serve``; the rest here), the rule for each item
(a Request through the handler and, for a session, its replay window; an Event to
``on_event``; a violation's Error reply), and replies that wait for shared memory. The base of
``ServerConnection``, which holds the connection itself.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

from .. import _impl
from .._checks import deadline_after
from .._constants import EVENT, REQUEST, ErrorCode, Flags, MessageType
from .._errors import ConnectionClosed, ProtocolError
from ..protocol.answers import (
    checked_result,
    failure_frame,
    is_echo,
    kept_answer,
    no_segment_reply,
)
from ..protocol.endpoint import Endpoint
from ..protocol.hello import HelloKey
from ..protocol.replay import ANSWERED, NEW, ReplayWindow, refusal
from ..transport.tls import client_hello_hint, note_broken_stream
from .connection import Connection

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("hintens")
_SHM = int(Flags.SHM)


class ClientGone(ConnectionClosed):
    """The client went while we answered it: the connection ends, quietly. (Raised by our
    own writes and reads; a handler's ConnectionClosed is the handler's failure.)"""


class Answering:
    """The answering side of a ``ServerConnection`` (which sets this state up)."""

    id: int
    window: ReplayWindow | None
    session: bytes
    _server: Server
    _conn: Connection
    _endpoint: Endpoint
    _channel: Any
    _backlog: list[Any]
    #: ``(callback, self, failed)`` for Channel.serve's events, set once serving starts (None
    #: without an ``on_event``); ``_deliver_event`` uses it too.
    _events: tuple[Callable[[Any, Any], Any], Any, Callable[[Exception], None]] | None = None

    if TYPE_CHECKING:   # ServerConnection's own
        def _send(self, frames: list[Any]) -> None: ...

        def _send_writes(self, writes: list[Any]) -> None: ...

    def _reply_writes(self, request_id: int, result: Any) -> list[Any]:
        """The writes that answer a Request (Endpoint.reply_writes), waiting up to
        ``send_timeout`` for a shared-memory segment if they need one, and reading meanwhile:
        the release that frees one arrives on this connection, and this thread is its only
        reader. After that, the answer is UNAVAILABLE.

        Raises:
            RemoteError: the handler's result is not bytes-like (a HANDLER_ERROR that says so).
            ConnectionClosed: the client went while we waited.
        """
        if type(result) is not bytes:
            result = checked_result(result)
        endpoint = self._endpoint
        writes = endpoint.reply_writes(request_id, result)
        if writes is None:
            writes = self._conn.until_free(lambda: endpoint.reply_writes(request_id, result),
                                           deadline_after(self._server.send_timeout),
                                           self._read_aside)
        if writes is None:
            return no_segment_reply(endpoint, request_id)
        return writes

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
            raise ClientGone(f"connection {self.id} lost: {error}") from error
        if items is None:
            raise ClientGone(f"connection {self.id} closed by the client")
        self._backlog += items

    def _take_backlog(self) -> list[Any]:
        items, self._backlog = self._backlog, []
        return items

    def _serve_frames(self) -> str:
        """Read and answer until the connection ends; returns why it ended."""
        server, conn = self._server, self._conn
        channel, endpoint = self._channel, self._endpoint
        decoder = endpoint.decoder
        handler = server._call
        reply_writes = self._reply_writes

        def on_error(request_id: int, error: Exception) -> bytes:
            try:
                return self._error_answer(endpoint, request_id, error)
            finally:
                del error   # as in _error_answer: a ClientGone it raises must not hold us

        # Plain Events are delivered inside the core too, between the Requests around them.
        events = self._events = (self._event_callback(), self, self._event_failed) \
            if server.on_event is not None else None
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
                                         endpoint.inline_max, not was_in_frame, events)
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
                note_broken_stream(self, error)
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
            elif item.type == REQUEST:
                item = None   # _answer drops the request (and its lent payload) when it may
                out = self._answer(items, index, out)
            elif item.type == EVENT:
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
                started = monotonic()
                try:
                    result = server._call(item.payload)
                finally:
                    self._channel.note_handler(monotonic() - started)
            else:
                ok, result = self._replay_or_run(item)
                if not ok:
                    out.append(result)   # the Error frame that answers it
                    return out
            writes = self._reply_writes(request_id, result)
            if len(writes) == 1 and not _impl.core.unpack_header(
                    writes[0][0][0]).flags & _SHM:
                out += writes[0][0]   # inline: goes with the others, in order
                return out
            if not is_echo(endpoint, result):
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

    def _event_callback(self) -> Callable[[Any, Any], Any]:
        """``on_event``, taking raw payloads: with a codec, it decodes them first."""
        server = self._server
        on_event = server.on_event
        assert on_event is not None
        if server.codec is None:
            return on_event
        decode = server.codec.decode

        def decoded(payload: Any, connection: Any) -> Any:
            return on_event(decode(payload, "event"), connection)
        return decoded

    def _event_failed(self, error: Exception) -> None:
        """What an Exception from ``on_event`` (or its decoding) comes to: a log record."""
        log.error("on_event callback raised", exc_info=error)

    def _deliver_event(self, item: Any) -> None:
        """An Event the core's serve loop did not deliver (a session's, say): as it would."""
        if self._events is not None:
            callback, context, failed = self._events
            try:
                callback(item.payload, context)
            except Exception as error:
                failed(error)

    def _violation(self, error: Any, out: list[Any]) -> bool:
        """A frame that broke the protocol: its Error reply joins ``out``. False if it is
        fatal (the connection closes)."""
        log.info("%r broke the protocol: %s%s", self, error, client_hello_hint(error))
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
            ErrorCode.HANDLER_ERROR, "the handler did not finish", item.request_id,
            counted=False))   # made in case: counted only if it is the answer
        try:
            started = monotonic()
            try:
                result = server._call(item.payload)
            finally:
                self._channel.note_handler(monotonic() - started)
            result = checked_result(result)
            answer = kept_answer(result, window.max_bytes)
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
        if isinstance(error, ClientGone):
            try:
                raise error
            finally:
                # This frame is in the traceback of the error it raises: were it to keep the
                # error too, that reference cycle would keep every frame of the traceback
                # (and what they hold: a reply's writes, with the descriptor each passes)
                # until the garbage collector ran.
                del error
        return failure_frame(endpoint, request_id, error)
