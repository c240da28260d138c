"""Pure-Python twin of the compiled socket transport, ``hintens.transport._channel``.

Same names, same signatures and the same exceptions as the Cython module: the Channel (a
socket's receive buffer, decoder, send lock and outbox), Mapping and SharedRegion. Frames are
decoded and packed by the wire kernels' twin, ``hintens.wire._wire_py``. Speed is not its
goal: agreement with the compiled transport is, and the test-suite runs every core test
against both.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import socket
import struct
import threading
import weakref
from time import monotonic
from typing import Any

from .. import _errors
from .._constants import (
    BATCH_WRITE_BYTES,
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_MAX_QUEUE_BYTES,
    HEADER_SIZE,
)
from ..wire._wire_py import (
    Frame,
    FrameDecoder,
    MemoryBudget,
    _contiguous_bytes,
    encode_frame,
    encode_header,
)

__all__ = [
    "Channel",
    "Mapping",
    "SharedRegion",
    "SEES_VIEW_RELEASE",
    "call_with_stack_size",
]


def call_with_stack_size(stack_bytes: int, function: Any, *args: Any) -> Any:
    """``function(*args)``; the compiled core runs it with the interpreter's stack size for
    new threads set to ``stack_bytes`` for that call alone. Pure Python cannot change that
    size without a moment in which another thread could start one with it, so this twin
    leaves the size alone (new threads get the platform's default stack).

    Returns:
        What ``function`` returns.
    """
    return function(*args)



_MAX_IOV = 1024            # IOV_MAX on Linux
_FDS_PER_READ = 16
_MAX_PENDING_FDS = 64
_INT = struct.Struct("i")


class Channel:
    """A connected stream socket's receive side (buffer and decoder) and a send lock.

    The socket stays owned by the caller, who also sets its kernel timeouts (SO_RCVTIMEO,
    SO_SNDTIMEO): an expired one raises BlockingIOError.

    Args:
        sock: a connected, blocking stream socket.
        decoder: the FrameDecoder for what arrives.
        buffer_size: bytes read per recv.
    """

    def __init__(self, sock: Any, decoder: FrameDecoder, buffer_size: int = 256 * 1024) -> None:
        #: Descriptors received (SCM_RIGHTS), oldest first, close-on-exec.
        self.fds: list[int] = []
        #: Descriptors received beyond the cap (closed at once) or cut by MSG_CTRUNC.
        self.fds_dropped = 0
        #: How many received descriptors may wait unclaimed (0: none, at most 64).
        self.max_fds = 0
        #: A send stopped mid-frame: the stream is shut for good.
        self.broken = False
        self._written = 0
        self._closed = False
        if buffer_size < HEADER_SIZE:
            raise ValueError("buffer_size must hold at least a header")
        self._sock = sock
        self.decoder = decoder
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._send_lock = threading.Lock()
        self.pending: list[Frame] | None = []
        # The outbox (see the compiled core): small frames packed back to back, written by
        # whoever holds the send lock. Pure Python needs a lock of its own to append.
        self._queue = bytearray()
        self._queue_lock = threading.Lock()
        #: Bytes ever submitted: the stream offset just past the newest frame.
        self.submitted = 0
        #: Bytes the kernel has taken.
        self.written = 0
        #: Queued bytes that close() threw away unsent.
        self.dropped = 0
        #: Seconds an Event may wait in the queue for company.
        self.flush_interval = DEFAULT_FLUSH_INTERVAL_S
        #: Queued bytes past which a submitter writes them out itself.
        self.max_queue = DEFAULT_MAX_QUEUE_BYTES
        #: Called with the channel when Events wait for the flush deadline.
        self.on_queued: Any = None
        #: Why abort() cut the stream, or None.
        self.aborted: str | None = None
        #: Seconds queued bytes may wait on a full socket before the flusher aborts the
        #: channel (0: never).
        self.stall_timeout = 0.0
        # Descriptors queued with frames (offer): (stream offset of the frame, offset past it,
        # a duplicate we own), in stream order.
        self._fd_slots: list[tuple[int, int, int]] = []
        self._corked = 0
        self._scheduled = False
        self._last_lazy = -math.inf   # when the newest non-urgent frame was posted (never yet)
        self._event_id = 0

    def __del__(self) -> None:
        self.close_fds()

    def close(self) -> None:
        """Close the socket (and unclaimed descriptors). Waits for a send in progress to end,
        so no write can reach a descriptor number the kernel has handed out again. Idempotent.
        """
        with self._send_lock:
            if not self._closed:
                self._closed = True
                with self._queue_lock:
                    self.dropped += len(self._queue)
                    self._queue = bytearray()
                    while self._fd_slots:
                        os.close(self._fd_slots.pop()[2])
                self._sock.close()
        self.close_fds()

    def abort(self, reason: str) -> None:
        """Cut the stream in both directions now, from any thread, without waiting for a
        writer: readers see its end, writers an error. ``aborted`` keeps the first reason.
        The descriptor itself stays open until ``close``."""
        if self.aborted is None:
            self.aborted = reason
        self.broken = True
        if not self._closed:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def offer(self, writes: Any, limit: int, write: bool = True) -> bool:
        """Queue frames without waiting for the socket, all of them or none: a server pushes
        Events this way, so that one slow reader never holds up the writer.

        Args:
            writes: ``[(buffers, fds), ...]``, each write one frame (or several), with at most
                one descriptor, which rides on the write's first byte in a sendmsg of its own.
            limit: queue no more than this many bytes in all; an empty queue takes any.
            write: False: only queue them, and ask for them to be written soon
                (``on_queued(channel, True)``): this thread never touches the socket. For
                control Events, which any thread may give up (the last view of a payload
                dropped, the garbage collector).

        Returns:
            True when queued (written now if the socket takes them, else by the flusher, or by
            the thread writing now); False when they would take the queue over ``limit``:
            nothing was queued.

        Raises:
            OSError: the channel is closed or broken, or the socket failed.
        """
        if self._closed:
            raise OSError(errno.EBADF, "the channel is closed")
        if self.broken:
            raise OSError(errno.EPIPE, "the channel broke in the middle of a frame")
        parts = []
        for buffers, fds in writes:
            if len(fds) > 1:
                raise ValueError("at most one descriptor per write")
            views = [memoryview(b).cast("B") for b in buffers]
            if len(fds) and not any(len(view) for view in views):
                raise ValueError("a descriptor needs at least one byte to ride on")
            parts.append((views, fds))
        total = sum(len(view) for views, _ in parts for view in views)
        with self._queue_lock:
            if self._queue and len(self._queue) + total > limit:
                return False
            for views, fds in parts:
                at = self.submitted
                for view in views:
                    self._queue += view
                    self.submitted += len(view)
                if len(fds):
                    self._fd_slots.append((at, self.submitted, os.dup(fds[0])))
        if write:
            self._after_offer()
        elif self.on_queued is not None:
            self._scheduled = True
            self.on_queued(self, True)
        return True

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return self._closed

    def fileno(self) -> int:
        """The socket's descriptor, or -1 once closed."""
        return -1 if self._closed else self._sock.fileno()

    def close_fds(self) -> None:
        """Close every received descriptor nobody claimed."""
        while self.fds:
            os.close(self.fds.pop())

    def send(self, buffers: Any, fds: Any = ()) -> int:
        """Write a list of buffers, in order, as one stream of bytes, after everything queued.

        Args:
            buffers: bytes-like objects.
            fds: up to 16 descriptors to pass (SCM_RIGHTS) with the first byte. They stay
                open here; the receiver gets its own copies.

        Returns:
            The stream offset just past these bytes (compare with ``written``).

        Raises:
            BlockingIOError: the send timeout expired (part may have been written).
            OSError: the connection broke.
            ValueError: more than 16 descriptors.
        """
        if len(fds) > _FDS_PER_READ:
            raise ValueError(f"at most {_FDS_PER_READ} descriptors per send")
        ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(_INT.pack(fd) for fd in fds))]
                     if len(fds) else [])
        pending = [view for view in (memoryview(b).cast("B") for b in buffers) if len(view)]
        total = sum(len(view) for view in pending)
        with self._send_lock:
            if self._closed:
                raise OSError(errno.EBADF, "the channel is closed")
            while True:
                if self._queue:
                    self._drain(0)   # what was queued before us leaves first
                with self._queue_lock:   # our place in the stream: after an empty queue
                    if not self._queue:
                        self.submitted += total
                        end = self.submitted
                        break
            if self.broken:
                raise OSError(errno.EPIPE, "the channel broke in the middle of a frame")
            self._written = 0
            try:
                self._write_all(pending, ancillary)
            except BaseException:
                self.written += self._written
                with self._queue_lock:
                    if not self._written and self.submitted == end:
                        self.submitted -= total   # none left, nothing came after: as never sent
                    else:
                        # Part of a frame is on the wire and the rest never will be, or frames
                        # queued meanwhile were placed after ours: shut the stream (readers
                        # see EOF); the descriptor stays until close().
                        self.broken = True
                        self._sock.shutdown(socket.SHUT_RDWR)
                raise
            self.written += self._written
            if self._queue:
                self._drain_quietly()   # queued while we wrote
        self._write_leftovers()
        return end

    # The outbox -------------------------------------------------------------------------

    def post(self, msg_type: int, payload: Any, request_id: int, urgent: bool = True) -> int:
        """Queue one frame, packed straight into the outbox, behind everything submitted.

        Args:
            msg_type: a ``MessageType``.
            payload: a C-contiguous buffer (meant for small ones: it is copied once).
            request_id: u64.
            urgent: write now if no other thread is writing (else that thread writes it
                before it stops). Not urgent, it may wait up to ``flush_interval`` for company.

        Returns:
            The stream offset just past this frame (compare with ``written``).

        Raises:
            As ``send``, and ValueError or OverflowError as ``encode_frame``. An OSError raised
            once the frame was queued carries its offset as ``stream_end``.
        """
        end = self._post(msg_type, payload, request_id)
        try:
            self._after_post(urgent)
        except OSError as error:
            error.stream_end = end   # type: ignore[attr-defined]
            raise
        return end

    def post_many(self, msg_type: int, payloads: Any, request_ids: Any) -> int:
        """Queue one frame per payload, with the matching request id, and write them all now
        (urgent), in as few writes as the queue bound allows.

        Returns:
            The stream offset just past the last frame.

        Raises:
            As ``post``. ValueError: the two sequences differ in length.
        """
        end = self.submitted
        if len(payloads) != len(request_ids):
            raise ValueError("one request id per payload")
        for payload, request_id in zip(payloads, request_ids):
            end = self._post(msg_type, payload, request_id)
        try:
            self._after_post(True)
        except OSError as error:
            error.stream_end = end   # type: ignore[attr-defined]
            raise
        return end

    def event(self, payload: Any) -> None:
        """Queue an Event (request id from the channel's own count) without urgency."""
        self._event_id += 1
        self._post(3, payload, self._event_id)
        self._after_post(False)

    def flush(self) -> None:
        """Write everything queued, waiting for another writer to finish first.

        Raises:
            As ``send``; what could not be written stays queued.
        """
        with self._send_lock:
            self._drain(0)
        self._write_leftovers()

    def flush_due(self, mark: bool = True) -> bool:
        """For the deadline flusher: write the queue without blocking, unless another thread
        is writing (it will) or the channel is corked.

        Args:
            mark: with bytes left, note that the flusher has them (no new ``on_queued`` call
                until it flushes again). False when nobody will: the next Event asks anew.

        Returns:
            True when bytes are left that the socket would not take yet: call again later.
            A connection error shuts the stream (its readers see the end), as nobody is
            there to raise it to.
        """
        self._scheduled = False
        if not self._queue or self._corked or self._closed:
            return False
        if not self._send_lock.acquire(False):
            return False
        try:
            left = self._drain(socket.MSG_DONTWAIT)
        except OSError:
            left = False
            self.broken = True
            self._sock.shutdown(socket.SHUT_RDWR)
        finally:
            self._send_lock.release()
        if not left and not self.broken:
            left = self._write_leftovers(socket.MSG_DONTWAIT)
        if left and mark:
            self._scheduled = True
        return left

    def cork(self) -> None:
        """Hold Events in the queue (until ``uncork``, a request, or a full queue)."""
        with self._queue_lock:
            self._corked += 1

    def uncork(self) -> None:
        """Undo one ``cork``. The caller flushes when it wants the batch out."""
        with self._queue_lock:
            if self._corked:
                self._corked -= 1

    def settled_written(self) -> int:
        """``written`` once no write is in progress (waits for one to end): whether a frame
        left can then be told exactly, for example after the connection failed."""
        with self._send_lock:
            return self.written

    @property
    def queued(self) -> int:
        """Bytes waiting in the outbox."""
        return len(self._queue)

    def _post(self, msg_type: int, payload: Any, request_id: int) -> int:
        frame = encode_frame(msg_type, payload, request_id)
        if self._closed:
            raise OSError(errno.EBADF, "the channel is closed")
        if self.broken:
            raise OSError(errno.EPIPE, "the channel broke in the middle of a frame")
        if self._queue and len(self._queue) + len(frame) > self.max_queue:
            self.flush()   # full: this thread writes it out itself (backpressure)
        with self._queue_lock:
            self._queue += frame
            self.submitted += len(frame)
            return self.submitted

    def _after_post(self, urgent: bool) -> None:
        quiet = False
        if not urgent:
            now = monotonic()
            quiet = now - self._last_lazy >= self.flush_interval
            self._last_lazy = now
        if urgent or (not self._corked and (quiet or len(self._queue) >= BATCH_WRITE_BYTES)):
            if self._send_lock.acquire(False):
                try:
                    self._drain(0)
                finally:
                    self._send_lock.release()
                self._write_leftovers()
        elif not self._scheduled and self.on_queued is not None:
            self._schedule()

    def _after_offer(self) -> None:
        # As _after_post for an Event, but never waiting for the socket: what it will not take
        # now is left to the flusher (or to the thread that holds the send lock).
        now = monotonic()
        quiet = now - self._last_lazy >= self.flush_interval
        self._last_lazy = now
        if not self._corked and (quiet or len(self._queue) >= BATCH_WRITE_BYTES):
            if not self._send_lock.acquire(False):
                return   # the holder writes our frames before it lets go
            try:
                left = self._drain(socket.MSG_DONTWAIT)
            finally:
                self._send_lock.release()
            if not left and not self._write_leftovers(socket.MSG_DONTWAIT):
                return
        if not self._scheduled and self.on_queued is not None:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        try:
            self.on_queued(self)
        except BaseException:
            self._scheduled = False   # or no later Event would ever ask again
            raise

    def _write_leftovers(self, flags: int = 0) -> bool:
        # Unlike the compiled core, a thread may queue between our last look and our release
        # of the send lock, see it taken, and leave: look again once the lock is free. A
        # failed write stops it: the bytes stay queued for the next writer to raise about.
        # True when MSG_DONTWAIT left bytes behind.
        while self._queue and not self._closed and self._send_lock.acquire(False):
            try:
                if flags:
                    try:
                        if self._drain(flags):
                            return True
                    except OSError:
                        return False
                elif not self._drain_quietly():
                    return False
            finally:
                self._send_lock.release()
        return False

    def _drain(self, flags: int) -> bool:
        # The caller holds the send lock. True if MSG_DONTWAIT stopped it with bytes left.
        while True:
            if self._closed:
                raise OSError(errno.EBADF, "the channel is closed")
            with self._queue_lock:
                if not self._queue:
                    return False
                data, self._queue = self._queue, bytearray()
            done = 0
            try:
                with memoryview(data) as view:
                    while done < len(data):
                        # self.written is the stream offset of data[done]: a queued
                        # descriptor goes alone with the first byte of its frame.
                        chunk, fd = len(data) - done, -1
                        if self._fd_slots:
                            at, end, slot_fd = self._fd_slots[0]
                            ahead = at - self.written
                            if ahead < 0 or (ahead == 0 and end <= self.written):
                                self.broken = True   # offsets out of step: stop, as C does
                                self._sock.shutdown(socket.SHUT_RDWR)
                                raise OSError(errno.EPIPE,
                                              "the outbox lost track of a descriptor's frame")
                            if ahead == 0:
                                fd, chunk = slot_fd, min(chunk, end - self.written)
                            elif ahead < chunk:
                                chunk = ahead
                        if fd >= 0:
                            sent = self._sock.sendmsg(
                                [view[done:done + chunk]],
                                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _INT.pack(fd))],
                                flags | socket.MSG_NOSIGNAL)
                            if sent:
                                self._fd_slots.pop(0)
                                os.close(fd)
                        else:
                            sent = self._sock.send(view[done:done + chunk],
                                                   flags | socket.MSG_NOSIGNAL)
                        done += sent
                        self.written += sent
            except BaseException as error:
                with self._queue_lock:   # in front of what came meanwhile
                    self._queue[0:0] = data[done:]
                if flags & socket.MSG_DONTWAIT and isinstance(error, BlockingIOError):
                    return True
                raise

    def _drain_quietly(self) -> bool:
        try:
            self._drain(0)
            return True
        except OSError:
            if self._queue and not self._scheduled and self.on_queued is not None:
                self._schedule()
            return False

    def _write_all(self, pending: list[memoryview], ancillary: list[Any]) -> None:
        # Counts what left in self._written, so that an interrupted send knows.
        while pending:
            sent = self._sock.sendmsg(pending[:_MAX_IOV], ancillary, socket.MSG_NOSIGNAL)
            self._written += sent
            ancillary = []
            while sent and pending:
                if sent >= len(pending[0]):
                    sent -= len(pending.pop(0))
                else:
                    pending[0] = pending[0][sent:]
                    sent = 0
            while pending and not len(pending[0]):
                pending.pop(0)

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
            flags | socket.MSG_CMSG_CLOEXEC)
        if ancillary or message_flags & socket.MSG_CTRUNC:
            self._keep_fds(ancillary, message_flags)
        if not count:
            return None
        return self.decoder.feed(self._view[:count])

    def _keep_fds(self, ancillary: list[tuple[int, int, bytes]], message_flags: int) -> None:
        if message_flags & socket.MSG_CTRUNC:
            self.fds_dropped += 1     # the kernel closed what did not fit
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for (fd,) in _INT.iter_unpack(data[:len(data) - len(data) % _INT.size]):
                    if len(self.fds) < min(self.max_fds, _MAX_PENDING_FDS):
                        self.fds.append(fd)
                    else:
                        os.close(fd)
                        self.fds_dropped += 1

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
              small_max: int, inline_max: int, repeat: bool = False) -> list[Frame] | None:
        """Read once; answer the leading run of plain Requests; return the frames after it.

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

        Returns:
            The frames that follow the run, for the caller (often empty), or None at end of
            stream.

        Raises:
            As ``send`` and ``receive``.
        """
        while True:
            frames, slow = self._serve_once(handler, on_error, reply_writes, small_max,
                                            inline_max)
            if not repeat or frames is None or frames or slow or self.decoder.in_frame \
                    or self.fds:
                return frames

    def _serve_once(self, handler: Any, on_error: Any, reply_writes: Any, small_max: int,
                    inline_max: int) -> tuple[list[Frame] | None, bool]:
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
            if frame.type != 1 or frame.flags != 0:
                break
            writes = None
            try:
                result = handler(frame.payload)
                if result is None:
                    result = b""
                if type(result) is bytes and len(result) < small_max:
                    out.append(encode_frame(2, result, frame.request_id))
                elif type(result) is bytes and len(result) < inline_max:
                    out.append(encode_header(2, result, frame.request_id))
                    out.append(result)   # not copied into a frame; nor held past this write
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


class Mapping(mmap.mmap):
    """``length`` bytes of a file descriptor mapped into memory, exposing the buffer protocol.

    The compiled core's Mapping keeps no duplicate of the descriptor; this twin is an
    ``mmap.mmap``, which keeps one until it is closed. mmap counts its buffer exports itself
    (``close()`` raises BufferError while one is alive) but does not tell how many, so this
    twin has no ``exports``. Budgets charged for it with ``charge`` are given back when it is
    unmapped.

    Args:
        fd: the descriptor (the caller may close it).
        length: bytes to map, at least 1.
        writable: map with PROT_WRITE.
        private: MAP_PRIVATE (copy-on-write) instead of MAP_SHARED.
        offset: where the mapping starts in the file; a multiple of the page size.

    Raises:
        OSError: mmap failed.
        ValueError: ``length`` is not positive or ``offset`` is negative.
    """

    _charges: list[tuple[MemoryBudget, int]]
    _finalizer: weakref.finalize

    def __new__(cls, fd: int, length: int, writable: bool = False, private: bool = False,
                offset: int = 0) -> Mapping:
        if length <= 0 or offset < 0:
            raise ValueError("a mapping needs a positive length and an offset of 0 or more")
        protection = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        self = super().__new__(cls, fd, length, flags, protection, offset=offset)
        self._charges = []
        # Unmapped when closed, or when the object goes: give the charges back either way.
        self._finalizer = weakref.finalize(self, _give_back, self._charges)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass   # mmap.mmap takes its arguments in __new__

    def charge(self, budget: MemoryBudget, amount: int) -> None:
        """Note that ``amount`` was taken from ``budget`` for this mapping: it is given back
        when the mapping is unmapped (by ``close`` or when the object goes)."""
        if self.closed:
            budget.give(amount)
        else:
            self._charges.append((budget, amount))

    def close(self) -> None:
        """Unmap now. Idempotent.

        Raises:
            BufferError: a view of it is still alive.
        """
        super().close()
        self._finalizer()


def _give_back(charges: list[tuple[MemoryBudget, int]]) -> None:
    while charges:
        budget, amount = charges.pop()
        budget.give(amount)


#: Only the views ``SharedRegion.view()`` handed out are counted (slices made from them are
#: not), so the protocol copies shared payloads out rather than lend views it cannot track.
SEES_VIEW_RELEASE = False


class SharedRegion:
    """A window of a shared mapping lent to the application, with its views counted.

    The compiled core's SharedRegion exports its buffer itself (``memoryview(region)``,
    ``numpy.frombuffer(region)``) and counts every export, slices of its views included. Pure
    Python cannot export a buffer before 3.12, so here the portable ``view()`` is the way in,
    and only the views it handed out are counted, not slices made from them.

    Args:
        mapping: the object whose memory is shared (an mmap); its buffer is held until release.
        offset, length: the window, checked against the mapping.
        readonly: refuse writable views.
        on_release: called once with the region when it is released with no view alive.

    Raises:
        ShmError: the window is outside the mapping.

    numpy: ``numpy.frombuffer(memoryview)`` keeps the memoryview but no buffer export of it,
    so releasing that memoryview while the array lives leaves the array dangling. Release views
    only after the arrays made from them are gone; with the compiled core, hand the region
    itself to numpy, which then holds an export the region counts.
    """

    def __init__(self, mapping: Any, offset: int, length: int, readonly: bool = True,
                 on_release: Any = None, auto_release: bool = False) -> None:
        # auto_release cannot work here (a view's release is invisible to pure Python on
        # 3.11); connections using this core copy shared payloads out instead of lending them.
        source = memoryview(mapping).cast("B")
        if readonly:
            source = source.toreadonly()
        if offset < 0 or length < 0 or offset > len(source) or length > len(source) - offset:
            size = len(source)
            source.release()
            raise _errors.ShmError(f"region [{offset}, {offset}+{length}) is outside the "
                                   f"{size}-byte mapping")
        self._source: memoryview | None = source
        self._offset = offset
        self._length = length
        self._readonly = readonly
        self._on_release = on_release
        self._views: list[memoryview] = []
        self._copying = 0
        self.released = False

    @property
    def exports(self) -> int:
        """Views handed out and not yet released (or copies in progress)."""
        return sum(1 for view in self._views if _alive(view)) + self._copying

    def __len__(self) -> int:
        return self._length

    def view(self) -> memoryview:
        """A memoryview of the region (release it, or use ``with``, when done)."""
        if self.released or self._source is None:
            raise BufferError("this region was released")
        view = self._source[self._offset:self._offset + self._length]
        self._views = [v for v in self._views if _alive(v)] + [view]
        return view

    def copy_in(self, data: Any, offset: int = 0) -> None:
        """Copy ``data`` into the region at ``offset``: the one copy a send makes.

        Raises:
            BufferError: the region is read-only or released.
            ShmError: ``data`` does not fit.
        """
        if self.released or self._readonly or self._source is None:
            raise BufferError("cannot copy into a released or read-only region")
        source = _contiguous_bytes(data)
        if offset < 0 or len(source) > self._length - offset:
            raise _errors.ShmError(f"{len(source)} bytes at offset {offset} do not fit a "
                                   f"{self._length}-byte region")
        start = self._offset + offset
        self._copying += 1
        try:
            self._source[start:start + len(source)] = source
        finally:
            self._copying -= 1

    def release(self) -> None:
        """Give the region back. Idempotent.

        Raises:
            BufferError: a view of it is still alive (its memory may not be recycled yet).
        """
        if self.released:
            return
        alive = self.exports
        if alive:
            raise BufferError(f"{alive} view(s) of this region are still alive")
        self.released = True
        if self._source is not None:
            self._source.release()
            self._source = None
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback(self)

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _alive(view: memoryview) -> bool:
    """False for a released memoryview, which refuses every operation."""
    try:
        len(view)
        return True
    except ValueError:
        return False
