"""The flusher: one daemon thread per process writes out what connections left queued.

Two cases bring a channel here:

* **A flush deadline.** A channel queues an Event that arrives soon after its last write, so
  that the Events after it share one write. When it queues the first such Event it calls
  ``FLUSHER.schedule(channel)``; ``flush_interval`` seconds later this thread writes the
  queue out if nothing else has (a request, a full batch or ``flush()``).
* **A full socket.** The flusher never blocks on a socket: what a socket will not take now
  waits for the socket to become writable (epoll, EPOLLOUT), and is written then. A server's
  pushed Events get there this way, so that one slow reader never holds up a writer.

A channel whose queued bytes make no progress for its ``stall_timeout`` (the peer reads
nothing) is aborted: its stream is cut, with the reason in ``channel.aborted``.

One thread serves every connection of the process. It sleeps while nothing waits, and ends
after a second with nothing to do; the next ``schedule`` starts another.
"""

from __future__ import annotations

import fcntl
import heapq
import itertools
import logging
import os
import select
import struct
import termios
import threading
from time import monotonic
from typing import Any

log = logging.getLogger("hintens")

#: The thread ends after this many seconds with nothing to flush or watch.
IDLE_EXIT_S = 1.0


class _Watch:
    """A channel waiting for its socket to take more, and when it last made progress: we
    wrote more, or the peer read some of what the socket holds."""

    __slots__ = ("channel", "written", "unread", "since")

    def __init__(self, channel: Any, written: int, unread: int, since: float) -> None:
        self.channel = channel
        self.written = written
        self.unread = unread
        self.since = since


def _unread(fd: int) -> int:
    """Bytes (kernel accounting) our socket holds that the peer has not read (SIOCOUTQ); a
    Unix socket reports writable only once most of its buffer drained, so what we wrote is not
    the measure of a peer that reads slowly."""
    try:
        return _INT.unpack(fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * _INT.size))[0]
    except OSError:
        return 0


_INT = struct.Struct("i")


class Flusher:
    """Flush deadlines (a timer queue) and full sockets (epoll) of many channels."""

    def __init__(self) -> None:
        # Re-entrant: a release can reach schedule() from the garbage collector while this
        # thread is inside schedule() or _run() already (an allocation there ran the GC); the
        # heap is whole between the statements that may allocate, so the nested push is safe.
        self._lock = threading.RLock()
        self._starting = False
        self._due: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._epoll: select.epoll | None = None
        self._wake_r = self._wake_w = -1
        self._watched: dict[int, _Watch] = {}   # by descriptor; only this thread touches it

    def schedule(self, channel: Any, soon: bool = False) -> None:
        """Call ``channel.flush_due()`` once ``channel.flush_interval`` has passed, or at once
        on this thread's next turn when ``soon`` (control Events: releases must not wait).

        If the flusher's thread cannot be started (RLIMIT_NPROC, a pids cgroup), the queue is
        written now, as far as the socket takes it without waiting; the rest leaves with the
        channel's next write. That is logged; nothing is raised to the caller, whose frame is
        queued already.
        """
        deadline = monotonic() + (0.0 if soon else channel.flush_interval)
        with self._lock:
            heapq.heappush(self._due, (deadline, next(self._order), channel))
            if self._starting:   # a release from the GC while _start() runs: it will see ours
                return
            if self._thread is None:
                try:
                    self._start()
                except (RuntimeError, OSError) as error:
                    self._due = [entry for entry in self._due if entry[2] is not channel]
                    heapq.heapify(self._due)
                    started = error
                else:
                    return
            elif self._due[0][2] is not channel:
                return
            else:
                self._wake()   # a new earliest deadline (under the lock: the pipe is open)
                return
        log.error("cannot start the flusher thread (%s): writing queued frames now", started)
        try:
            # What the socket will not take now leaves with the connection's next write; the
            # channel is not marked as ours, so its next Event asks for a flusher again.
            channel.flush_due(False)
        except Exception:
            log.exception("flushing queued frames failed")

    def _start(self) -> None:
        # Under the lock. The epoll set and the wake-up pipe live as long as the thread.
        self._starting = True
        try:
            self._start_polling()
        finally:
            self._starting = False

    def _start_polling(self) -> None:
        self._epoll = select.epoll()
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._epoll.register(self._wake_r, select.EPOLLIN)
            thread = threading.Thread(target=self._run, args=(self._epoll,),
                                      name="hintens-flusher", daemon=True)
            thread.start()
        except BaseException:
            self._close_polling()
            raise
        self._thread = thread

    def _close_polling(self) -> None:
        # Under the lock.
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        # Under the lock, so that the pipe cannot be closed (and its number reused) meanwhile.
        try:
            os.write(self._wake_w, b"\0")
        except OSError:   # full: a wake is pending anyway
            pass

    def _run(self, epoll: select.epoll) -> None:
        idle_since = monotonic()
        while True:
            now = monotonic()
            with self._lock:
                due = []
                while self._due and self._due[0][0] <= now:
                    due.append(heapq.heappop(self._due)[2])
                if any(not entry[2].queued for entry in self._due):
                    # Written out (or closed) before their deadline: they need no timer, and
                    # a long flush_interval must not keep this thread alive. (Flushed once
                    # below all the same: that clears their "scheduled" mark.)
                    due += [entry[2] for entry in self._due if not entry[2].queued]
                    self._due = [entry for entry in self._due if entry[2].queued]
                    heapq.heapify(self._due)
                next_deadline = self._due[0][0] if self._due else None
                if due or self._due or self._watched:
                    idle_since = now
                elif now - idle_since >= IDLE_EXIT_S:   # idle: end, leaving no descriptor
                    self._thread = None
                    self._close_polling()
                    return
            for channel in due:
                self._flush(channel, None)
            timeout = self._check_stalls(now)
            if next_deadline is not None:
                timeout = min(timeout, next_deadline - now)
            if not self._watched and next_deadline is None:
                timeout = min(timeout, IDLE_EXIT_S)
            try:
                events = epoll.poll(max(0.0, timeout))
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                watch = self._watched.pop(fd, None)
                if watch is not None:
                    self._flush(watch.channel, watch)

    def _flush(self, channel: Any, watch: _Watch | None) -> None:
        """Write what ``channel`` has queued without blocking; watch its socket if it would
        not take all of it."""
        try:
            # Clears the channel's "scheduled" mark; writes what was queued meanwhile.
            left = channel.flush_due()
        except Exception:
            log.exception("flushing queued frames failed")
            return
        if not left:
            return
        fd = channel.fileno()
        if fd < 0:
            return
        now = monotonic()
        if watch is None or channel.written != watch.written:
            # Progress: the clock starts again.
            watch = _Watch(channel, channel.written, _unread(fd), now)
        assert self._epoll is not None
        try:
            try:
                self._epoll.register(fd, select.EPOLLOUT | select.EPOLLONESHOT)
            except FileExistsError:   # registered before; a one-shot event disarmed it
                self._epoll.modify(fd, select.EPOLLOUT | select.EPOLLONESHOT)
        except OSError as error:   # closed meanwhile
            log.debug("cannot watch a channel's socket: %s", error)
            return
        self._watched[fd] = watch

    def _check_stalls(self, now: float) -> float:
        """Abort watched channels that made no progress for their stall_timeout; drop the
        ones that closed or emptied. Returns seconds until the next such check is due."""
        soonest = IDLE_EXIT_S
        for fd, watch in list(self._watched.items()):
            channel = watch.channel
            if channel.closed or channel.broken:
                self._unwatch(fd)
                continue
            if not channel.queued:   # another writer emptied it: clear its mark, let it go
                self._unwatch(fd)
                self._flush(channel, None)
                continue
            unread = _unread(fd)
            if channel.written != watch.written or unread < watch.unread:
                watch.written, watch.unread, watch.since = channel.written, unread, now
            limit = channel.stall_timeout
            if not limit:
                continue
            left = watch.since + limit - now
            if left <= 0:
                channel.abort(f"it read nothing for {limit:g} s while {channel.queued} bytes "
                              f"waited to be sent to it")
                self._unwatch(fd)
            else:
                soonest = min(soonest, left)
        return soonest

    def _unwatch(self, fd: int) -> None:
        self._watched.pop(fd, None)
        assert self._epoll is not None
        try:
            self._epoll.unregister(fd)
        except OSError:   # closed: the kernel dropped it already
            pass

    def _after_fork(self) -> None:
        # The thread did not survive the fork; the child's channels start a new one, with an
        # epoll set of their own.
        self._lock = threading.RLock()
        self._starting = False
        self._due = []
        self._thread = None
        self._watched = {}
        self._close_polling()


FLUSHER = Flusher()
os.register_at_fork(after_in_child=FLUSHER._after_fork)
