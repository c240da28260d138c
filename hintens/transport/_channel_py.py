"""Pure-Python twin of the compiled socket transport, ``hintens.transport._channel``.

Same names, same signatures and the same exceptions as the Cython module: the Channel (a
socket's receive buffer and decoder, over its Outbox: send lock and outgoing queue; in
``_outbox_py``), Mapping and SharedRegion (in ``_memory_py``). Frames are
decoded and packed by the wire kernels' twin, ``hintens.wire._wire_py``. Speed is not its
goal: agreement with the compiled transport is, and the test-suite runs every core test
against both.
"""

from __future__ import annotations

import bisect
import errno
import os
import select
import socket
import struct
from time import monotonic
from typing import Any

from .._constants import (
    HANDLER_BUCKETS_S,
    HEADER_SIZE,
    MSG_CMSG_CLOEXEC,
    MSG_CTRUNC,
)
from ._memory_py import SEES_VIEW_RELEASE, Mapping, SharedRegion
from ._outbox_py import FDS_PER_SEND, Outbox
from ..wire._wire_py import (
    Frame,
    FrameDecoder,
    encode_header,
)


__all__ = [
    "Channel",
    "DRIVES_TLS",
    "Mapping",
    "Ring",
    "SharedRegion",
    "SEES_VIEW_RELEASE",
    "call_with_stack_size",
]

#: Whether the Channel drives a TlsStream's OpenSSL object itself (the compiled one does).
#: This one does not: over TLS, hintens/transport/tls.py gives it a socket interface.
DRIVES_TLS = False

#: The shared-memory ring (docs/PROTOCOL.md section 9b) is the compiled core's alone: its
#: waits spin and sleep on futexes without the GIL, which Python code cannot. None here, and
#: hintens then offers and asks for no ring.
Ring: Any = None


def call_with_stack_size(stack_bytes: int, function: Any, *args: Any) -> Any:
    """``function(*args)``; the compiled core runs it with the interpreter's stack size for
    new threads set to ``stack_bytes`` for that call alone. Pure Python cannot change that
    size without a moment in which another thread could start one with it, so this twin
    leaves the size alone (new threads get the platform's default stack).

    Returns:
        What ``function`` returns.
    """
    return function(*args)


_FDS_PER_READ = FDS_PER_SEND
_MAX_PENDING_FDS = 64
_INT = struct.Struct("i")

class Channel(Outbox):
    """A connected stream socket: its receive side (buffer and decoder) over the sending
    half, the ``Outbox`` (send lock and outgoing queue).

    The socket stays owned by the caller, who also sets its kernel timeouts (SO_RCVTIMEO,
    SO_SNDTIMEO): an expired one raises BlockingIOError.

    Args:
        sock: a connected, blocking stream socket.
        decoder: the FrameDecoder for what arrives.
        buffer_size: bytes read per recv.
    """


    _encode_header = staticmethod(encode_header)

    def __init__(self, sock: Any, decoder: FrameDecoder, buffer_size: int = 256 * 1024) -> None:
        #: Descriptors received (SCM_RIGHTS), oldest first, close-on-exec.
        self.fds: list[int] = []
        if buffer_size < HEADER_SIZE:
            raise ValueError("buffer_size must hold at least a header")
        super().__init__(sock)
        #: Descriptors received beyond the cap (closed at once) or cut by MSG_CTRUNC.
        self.fds_dropped = 0
        #: How many received descriptors may wait unclaimed (0: none, at most 64).
        self.max_fds = 0
        self.decoder = decoder
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self.pending: list[Frame] | None = []
        #: Responses ``serve()`` answered itself (small or inline).
        self.responses_sent = 0
        #: Handler runs noted (``note_handler``), and their total time in seconds.
        self.handler_calls = 0
        self.handler_seconds = 0.0
        self._handler_buckets = [0] * (len(HANDLER_BUCKETS_S) + 1)
        #: ``receive_reply`` may spin a moment before its read blocks: with the compiled core,
        #: it tries the socket with MSG_DONTWAIT, yielding the CPU between tries, for up to
        #: 100 us (an adaptive budget: see ``spin_stats``), and only while no frame is half
        #: read, and not while this thread and the peer are pinned to one same CPU. A reply from a peer on another CPU then costs no wake-up of this thread. A
        #: signal that comes while it spins is handled before the read blocks. Over TLS it
        #: polls the socket while it spins. Not here: this core always blocks at once (a
        #: Python loop would hold the GIL).
        self.reply_spin = False

    def note_handler(self, seconds: float) -> None:
        """Count one handler run of ``seconds`` in the stats (``handler_times``)."""
        self._handler_buckets[bisect.bisect_left(HANDLER_BUCKETS_S, seconds)] += 1
        self.handler_calls += 1
        self.handler_seconds += seconds

    def handler_times(self) -> tuple[int, float, tuple[int, ...]]:
        """The handler runs noted so far: ``(count, seconds, buckets)``, where ``buckets``
        holds how many took at most each bound of ``HANDLER_BUCKETS_S``, then the rest (not
        cumulative)."""
        return self.handler_calls, self.handler_seconds, tuple(self._handler_buckets)

    def __del__(self) -> None:
        self.close_fds()

    def close(self) -> None:
        """Close the socket (and unclaimed descriptors). Waits for a send in progress to end,
        so no write can reach a descriptor number the kernel has handed out again. Idempotent.
        """
        super().close()
        self.close_fds()

    def close_fds(self) -> None:
        """Close every received descriptor nobody claimed."""
        while self.fds:
            os.close(self.fds.pop())

    def switch_rx(self, ring: Any) -> None:
        """The compiled core's switch to a shared-memory ring: this core has none.

        Raises:
            NotImplementedError: always (hintens offers no ring over this core).
        """
        raise NotImplementedError("the pure-Python core has no shared-memory ring")

    def switch_tx(self, ring: Any, frame: bytes, fd: int = -1) -> None:
        """The compiled core's switch to a shared-memory ring: this core has none.

        Raises:
            NotImplementedError: always (hintens offers no ring over this core).
        """
        raise NotImplementedError("the pure-Python core has no shared-memory ring")

    #: Frames come from / go into a shared-memory ring: never over this core.
    ring_rx = False
    ring_tx = False
    #: An event loop drives the channel (over a ring, its waits arm wake records): no ring
    #: here, so nothing changes.
    ring_socket_wakes = False
    ring_wakes_taken = 0

    def ring_pending(self) -> bool:
        """A ring's bytes wait to be read: never over this core (it has no ring)."""
        return False

    def take_ring_records(self) -> bool:
        """Take a ring's records off the socket: nothing to take over this core.

        Returns:
            False (the stream did not end by this).
        """
        return False

    def stop_reading(self) -> None:
        """Read what has arrived, then see the end of the stream (``shutdown(SHUT_RD)``): a
        server that closes still answers what was sent."""
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def wait_readable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds, without reading, until a read would not wait
        (bytes arrived, or the stream ended or broke): a poll of the socket.

        Returns:
            True when a read would not wait; False at the timeout.
        """
        fd = self.fileno()
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def receive(self, flags: int = 0) -> list[Frame] | None:
        """One recv, decoded: the frames it completed (maybe none), or None at end of stream.

        Raises:
            BlockingIOError: the receive timeout expired, or nothing to read with MSG_DONTWAIT.
            OSError: the connection broke.
            ProtocolError: from the decoder, as FrameDecoder.feed raises it.
        """
        if self._closed:
            raise OSError(errno.EBADF, "the channel is closed")
        count, ancillary, message_flags, _ = self._sock.recvmsg_into(
            [self._buffer], socket.CMSG_SPACE(_FDS_PER_READ * _INT.size),
            flags | MSG_CMSG_CLOEXEC)
        if ancillary or message_flags & MSG_CTRUNC:
            self._keep_fds(ancillary, message_flags)
        if not count:
            return None
        return self.decoder.feed(self._view[:count])

    def _keep_fds(self, ancillary: list[tuple[int, int, bytes]], message_flags: int) -> None:
        if message_flags & MSG_CTRUNC:
            self.fds_dropped += 1     # the kernel closed what did not fit
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for (fd,) in _INT.iter_unpack(data[:len(data) - len(data) % _INT.size]):
                    if len(self.fds) < min(self.max_fds, _MAX_PENDING_FDS):
                        self.fds.append(fd)
                    else:
                        os.close(fd)
                        self.fds_dropped += 1

    def spin_stats(self) -> dict[str, int]:
        """Counters of the spins before blocking reads (``reply_spin``): ``spins`` (waits
        that spun), ``spins_won`` (those that bytes ended; over TLS, the socket becoming
        readable, its end included), and ``spin_budget_ns`` (how long the next one may spin;
        0: it sleeps at once, but for a probe now and then). The
        budget is full while replies come within 100 us of the spin's start, halves after
        each wait that lasted longer (a wait the receive timeout ended included), and once
        spent is tried again in full every 8th wait, then every 16th, up to every 1,024th while
        the tries do not pay. Always zeros here."""
        return {"spins": 0, "spins_won": 0, "spin_budget_ns": 0}

    def receive_reply(self, request_id: int) -> Any:
        """One read, for a reply to a request the caller sent.

        Returns:
            The payload when the read completed exactly one frame, a Response to
            ``request_id`` without flags; otherwise None, with the frames it completed (maybe
            none) in ``pending``, or ``pending`` None at end of stream.

        Raises:
            As ``receive``.
        """
        frames = self.receive()
        if frames is not None and len(frames) == 1:
            only = frames[0]
            if only.type == 2 and only.flags == 0 and only.request_id == request_id:
                return only.payload
        self.pending = frames
        return None

    def serve(self, handler: Any, on_error: Any, reply_writes: Any,
              small_max: int, inline_max: int, repeat: bool = False,
              events: tuple[Any, Any, Any] | None = None) -> list[Frame] | None:
        """Read once; answer the leading run of plain Requests (and deliver the plain Events
        among them, given ``events``); return the frames after it.

        ``handler(payload)`` returns the Response's payload (None for an empty one). A bytes
        result shorter than ``small_max`` is answered here, packed with the other small
        replies; one shorter than ``inline_max`` (``Endpoint.inline_max``) is answered here
        too, as a plain frame of its own that leaves at once; any other result goes to
        ``reply_writes(request_id, result)``, which returns the writes ``[(buffers, fds), ...]``
        that answer it (inline, through shared memory, or an Error frame), following the
        protocol's one rule for replies. If ``handler`` or ``reply_writes`` raises an
        Exception, ``on_error(request_id, exception)`` returns the Error frame to send instead.
        Replies leave in request order, small ones together in one write. A read that holds
        a control Event (request id 0) or a frame with flags is answered by none of this: all
        of it goes back.

        With ``repeat``, it reads again, for as long as each read was wholly answered here by
        ``handler`` alone (no ``reply_writes``, no ``on_error``), ended on a frame boundary and
        brought no descriptor: the caller's loop runs only when there is something for it to
        see (descriptors no frame claimed are the caller's to close).

        With ``events``, a ``(callback, context, failed)`` triple, the plain Events (no
        flags, a request id other than 0) of the run are delivered here too, in stream order
        with the Requests around them, as ``callback(payload, context)``: an Exception it
        raises goes to ``failed(exception)``, and the run goes on. Without it, an Event ends
        the run.

        Returns:
            The frames that follow the run, for the caller (often empty), or None at end of
            stream.

        Raises:
            As ``send`` and ``receive``, and what ``failed`` raises.
        """
        while True:
            frames, slow = self._serve_once(handler, on_error, reply_writes, small_max,
                                            inline_max, events)
            if not repeat or frames is None or frames or slow or self.decoder.in_frame \
                    or self.fds:
                return frames

    def _serve_once(self, handler: Any, on_error: Any, reply_writes: Any, small_max: int,
                    inline_max: int, events: tuple[Any, Any, Any] | None
                    ) -> tuple[list[Frame] | None, bool]:
        # One read of serve(), and whether anything beyond the handler ran.
        frames = self.receive()
        if not frames:
            return frames, True
        if any(frame.flags or (frame.type == 3 and frame.request_id == 0) for frame in frames):
            # A control Event (a release, say) or a frame with flags (shared memory) anywhere
            # in this read: the caller admits the whole read, in stream order, before
            # answering any of it. A reply that must wait for a segment reads on; a later
            # release must take effect, and descriptors must be claimed by their frames in
            # order.
            return frames, True
        out: list[Any] = []
        done = 0
        flush = slow = False
        for frame in frames:
            if frame.type == 3 and events is not None:   # plain: controls returned above
                on_event, context, failed = events
                # Replies to the Requests before it leave first: on_event may take its time.
                if out:
                    self.send(out)
                    out = []
                try:
                    on_event(frame.payload, context)
                except Exception as error:
                    slow = True
                    failed(error)
                done += 1
                continue
            if frame.type != 1 or frame.flags != 0:
                break
            writes = None
            try:
                started = monotonic()
                try:
                    result = handler(frame.payload)
                finally:
                    self.note_handler(monotonic() - started)
                if result is None:
                    result = b""
                if type(result) is bytes and len(result) < small_max:
                    out.append(self._encode_frame(2, result, frame.request_id))
                    self.responses_sent += 1
                elif type(result) is bytes and len(result) < inline_max:
                    out.append(self._encode_header(2, result, frame.request_id))
                    out.append(result)   # not copied into a frame; nor held past this write
                    self.responses_sent += 1
                    flush = True
                else:
                    writes = reply_writes(frame.request_id, result)
                    slow = True
            except Exception as error:   # the handler's or the reply rule's, not a send's
                out.append(on_error(frame.request_id, error))
                slow = True
            result = None
            if flush:   # a send's error is not the handler's: it leaves this loop
                self.send(out)
                out = []
                flush = False
            elif writes is not None:
                if out:
                    self.send(out)
                    out = []
                for buffers, fds in writes:
                    self.send(buffers, fds)
                writes = None
            done += 1
        if out:
            self.send(out)
        return frames[done:], slow
