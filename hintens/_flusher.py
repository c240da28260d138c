"""The flush deadline: one daemon thread per process writes out Events left waiting.

A channel queues an Event that arrives soon after its last write, so that the Events after it
share one write. When it queues the first such Event it calls ``FLUSHER.schedule(channel)``.
``flush_interval`` seconds later this thread writes the queue out if nothing else has
(a request, a full batch or ``flush()``). One thread serves every connection of the process,
it sleeps while no queue waits, and it ends after a second with nothing to do.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
from time import monotonic
from typing import Any

log = logging.getLogger("hintens")

#: The thread ends after this many seconds with nothing to flush.
IDLE_EXIT_S = 1.0
#: How soon to try again when the socket would not take a queue.
RETRY_S = 0.001


class Flusher:
    """A timer queue of channels whose queued Events must leave by a deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._due: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, channel: Any, retry: bool = False) -> None:
        """Call ``channel.flush_due()`` once ``channel.flush_interval`` has passed (at least
        ``RETRY_S`` for a retry after the socket was full, so that a 0 interval never spins)."""
        delay = channel.flush_interval
        deadline = monotonic() + (max(delay, RETRY_S) if retry else delay)
        with self._cond:
            heapq.heappush(self._due, (deadline, next(self._order), channel))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hintens-flusher",
                                                daemon=True)
                self._thread.start()
            elif self._due[0][2] is channel:
                self._cond.notify()   # a new earliest deadline

    def _run(self) -> None:
        while True:
            empty: list[Any] = []
            channel = None
            with self._cond:
                if not self._due:
                    self._cond.wait(IDLE_EXIT_S)
                    if not self._due:   # idle: end; the next schedule() starts another
                        self._thread = None
                        return
                    continue
                delay = self._due[0][0] - monotonic()
                if delay <= 0:
                    channel = heapq.heappop(self._due)[2]
                else:
                    self._cond.wait(min(delay, IDLE_EXIT_S))
                    # Channels written out (or closed) before their deadline need no timer:
                    # drop them, so a long flush_interval does not keep this thread alive.
                    empty = [entry[2] for entry in self._due if not entry[2].queued]
                    if empty:
                        self._due = [entry for entry in self._due if entry[2].queued]
                        heapq.heapify(self._due)
            for waiting in ([channel] if channel is not None else empty):
                try:
                    # Clears the channel's "scheduled" mark; writes what was queued meanwhile.
                    if waiting.flush_due():
                        self.schedule(waiting, retry=True)   # the socket was full: later
                except Exception:
                    log.exception("flushing queued frames failed")

    def _after_fork(self) -> None:
        # The thread did not survive the fork; the child's channels start a new one.
        self._cond = threading.Condition(threading.Lock())
        self._due = []
        self._thread = None


FLUSHER = Flusher()
os.register_at_fork(after_in_child=FLUSHER._after_fork)
