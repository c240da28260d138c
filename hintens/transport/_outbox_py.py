"""Pure-Python twin of the compiled outbox (hintens/transport/_outbox.pxi): the sending half
of a Channel. Whoever holds the send lock writes; small frames are packed back to back into
one queue and leave together; descriptors queued with frames ride on their frame's first byte.
Same names, same signatures and the same exceptions as the compiled class.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import struct
import threading
from time import monotonic
from typing import Any

from .._constants import (
    BATCH_WRITE_BYTES, DEFAULT_FLUSH_INTERVAL_S, DEFAULT_MAX_QUEUE_BYTES, MSG_DONTWAIT,
    MSG_NOSIGNAL)
from ..wire._wire_py import encode_frame


__all__ = ["Outbox", "Writer"]

_MAX_IOV = 1024            # IOV_MAX on Linux
#: Descriptors one send passes at most (and one read accepts).
FDS_PER_SEND = 16
_INT = struct.Struct("i")


class Writer:
    """A connected stream socket's sending end: the send lock, and the writing of the queue
    of frames waiting for it (which the ``Outbox`` fills).

    Args:
        sock: a connected, blocking stream socket (its kernel send timeout, SO_SNDTIMEO, is
            the caller's: an expired one raises BlockingIOError).
    """


    #: How frames are encoded (a subclass may bring the compiled kernels: the TLS channel).
    _encode_frame = staticmethod(encode_frame)

    def __init__(self, sock: Any) -> None:
        #: A send stopped mid-frame: the stream is shut for good.
        self.broken = False
        self._written = 0
        self._closed = False
        self._sock = sock
        self._send_lock = threading.Lock()
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
        #: The shared-memory ring: the compiled core only (this one never sets one up).
        self.ring = None
        # Descriptors queued with frames (offer): (stream offset of the frame, offset past it,
        # a duplicate we own), in stream order.
        self._fd_slots: list[tuple[int, int, int]] = []
        self._corked = 0
        self._scheduled = False
        self._last_lazy = -math.inf   # when the newest non-urgent frame was posted (never yet)
        self._event_id = 0
        #: Events queued by ``event_small``.
        self.small_events = 0

    def close(self) -> None:
        """Close the socket. Waits for a send in progress to end, so no write can reach a
        descriptor number the kernel has handed out again. Idempotent."""
        with self._send_lock:
            if not self._closed:
                self._closed = True
                with self._queue_lock:
                    self.dropped += len(self._queue)
                    self._queue = bytearray()
                    while self._fd_slots:
                        os.close(self._fd_slots.pop()[2])
                self._sock.close()

    def abort(self, reason: str) -> None:
        """Cut the stream in both directions now, from any thread, without waiting for a
        writer: readers see its end, writers an error. ``aborted`` keeps the first reason.
        The descriptor itself stays open until ``close``."""
        if self.aborted is None:
            self.aborted = reason
        self.broken = True
        if not self._closed:
            self._shut()

    def _shut(self) -> None:
        # Shut the stream both ways; as in C, a failure (ENOTCONN: the peer reset it
        # already) changes nothing: it is over either way.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return self._closed

    def fileno(self) -> int:
        """The socket's descriptor, or -1 once closed."""
        return -1 if self._closed else self._sock.fileno()

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
        if len(fds) > FDS_PER_SEND:
            raise ValueError(f"at most {FDS_PER_SEND} descriptors per send")
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
                        self._shut()
                raise
            self.written += self._written
            if self._queue:
                self._drain_quietly()   # queued while we wrote
        self._write_leftovers()
        return end

    def settled_written(self) -> int:
        """``written`` once no write is in progress (waits for one to end): whether a frame
        left can then be told exactly, for example after the connection failed."""
        with self._send_lock:
            return self.written

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
                                self._shut()
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
                                flags | MSG_NOSIGNAL)
                            if sent:
                                self._fd_slots.pop(0)
                                os.close(fd)
                        else:
                            sent = self._sock.send(view[done:done + chunk],
                                                   flags | MSG_NOSIGNAL)
                        done += sent
                        self.written += sent
            except BaseException as error:
                with self._queue_lock:   # in front of what came meanwhile
                    self._queue[0:0] = data[done:]
                if flags & MSG_DONTWAIT and isinstance(error, BlockingIOError):
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
            sent = self._sock.sendmsg(pending[:_MAX_IOV], ancillary, MSG_NOSIGNAL)
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


class Outbox(Writer):
    """A connected stream socket's outgoing queue, over its ``Writer``: small frames packed
    back to back leave together. ``Channel`` is an Outbox with a receive side."""

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

    def event_small(self, payload: Any, small_max: int) -> bool:
        """``Client.send_event``'s common case in one call: a bytes shorter than
        ``small_max`` is queued as ``event`` queues it, and counted in ``small_events``.

        Returns:
            True if it was queued; False, with nothing done, for anything else.

        Raises:
            As ``event``.
        """
        if type(payload) is not bytes or len(payload) >= small_max:
            return False
        self._event_id += 1
        self._post(3, payload, self._event_id)
        self.small_events += 1
        self._after_post(False)
        return True

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
            left = self._drain(MSG_DONTWAIT)
        except OSError:
            left = False
            self.broken = True
            self._shut()
        finally:
            self._send_lock.release()
        if not left and not self.broken:
            left = self._write_leftovers(MSG_DONTWAIT)
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

    @property
    def queued(self) -> int:
        """Bytes waiting in the outbox."""
        return len(self._queue)

    def _post(self, msg_type: int, payload: Any, request_id: int) -> int:
        frame = self._encode_frame(msg_type, payload, request_id)
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
                left = self._drain(MSG_DONTWAIT)
            finally:
                self._send_lock.release()
            if not left and not self._write_leftovers(MSG_DONTWAIT):
                return
        if not self._scheduled and self.on_queued is not None:
            self._schedule()
