"""The server's replay windows: exactly-once answers for client sessions.

A client that announces a session id in its hello (a ``ClientPool`` with ``exactly_once``)
draws its request ids from that session, across reconnects. The server remembers, per
session, the answers it gave to the most recent requests. A request whose id it has already
answered is answered again from memory, and a request still running on another connection is
waited for, so that a retry after a lost connection never runs a handler twice.

Bounds, per server (all configurable on ``Server``):

* ``replay_window`` answers per session (default 1024), and at most ``replay_bytes`` of
  answer payloads per session (default 16 MiB); the oldest answers are forgotten first, but
  the newest one is always kept;
* ``replay_sessions`` sessions (default 1024). Past that, the session used least recently
  (with no request running) gives up its window, and leaves a tombstone: the highest request
  id it had seen. Tombstones are kept for 16 times as many sessions;
* ``replay_total_bytes`` of answer payloads across all sessions (default 256 MiB). Past that,
  sessions used least recently (none running) give up their windows the same way, and if that
  is not enough the session that just answered forgets its own oldest answers.

A request whose id is at or below the highest id a session forgot (or its tombstone says it
saw), and that is not remembered, may have run already: it is refused with UNAVAILABLE rather
than run. Answers larger than ``replay_bytes`` are not kept: a retry of such a request is
refused the same way. A session gone from the tombstones too is unknown: its retries run.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from time import monotonic
from typing import Any

DEFAULT_REPLAY_WINDOW = 1024
DEFAULT_REPLAY_BYTES = 16 * 1024 * 1024
DEFAULT_REPLAY_SESSIONS = 1024
DEFAULT_REPLAY_TOTAL_BYTES = 256 * 1024 * 1024
#: Tombstones kept per session slot.
TOMBSTONES_PER_SESSION = 16

NEW = "new"                # run it, then call finish()
ANSWERED = "answered"      # answer it with the remembered answer
RUNNING = "running"        # still running elsewhere after the wait: refuse
FORGOTTEN = "forgotten"    # may have run, and its answer is gone: refuse
MOVED = "moved"            # this window was given up: ask the memory for the session's new one

#: The kept answer of a request whose answer was too large to keep.
TOO_LARGE = (False, b"")
#: Claimed: it ran, and its answer was too large to keep, so it cannot be replayed.
ANSWERED_TOO_LARGE = "answered, too large to keep"

_REFUSALS = {
    RUNNING: "is still running on another connection of its session",
    FORGOTTEN: "may have run already, and is older than its session's replay window",
    ANSWERED_TOO_LARGE: "ran already, and its answer was too large to keep for a replay",
}


def refusal(request_id: int, state: str) -> str:
    """Why a retried request is not run again (the message of its UNAVAILABLE Error)."""
    return f"request {request_id} {_REFUSALS[state]}; it is not run again"


class ReplayWindow:
    """The recent answers of one session, by request id.

    An answer is a tuple ``(ok, data)``: ``(True, payload)`` for a Response, ``(False, frame)``
    for the encoded Error frame that answered it.
    """

    def __init__(self, max_entries: int = DEFAULT_REPLAY_WINDOW,
                 max_bytes: int = DEFAULT_REPLAY_BYTES, floor: int = 0,
                 memory: ReplayMemory | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._memory = memory
        self._lock = threading.Lock()
        self._answers: OrderedDict[int, tuple[bool, bytes]] = OrderedDict()
        self._running: dict[int, threading.Event] = {}
        self._bytes = 0
        #: The highest request id forgotten so far.
        self.floor = floor
        #: The highest request id claimed so far.
        self.highest = floor
        #: When a request last came (for the memory's least-recently-used choice).
        self.last_used = monotonic()
        #: Given up by the memory: claims answer MOVED.
        self.evicted = False

    def claim(self, request_id: int, wait: float | None) -> tuple[str, Any]:
        """What to do with a request: ``(NEW, None)``, ``(ANSWERED, answer)``,
        ``(RUNNING, None)``, ``(FORGOTTEN, None)`` or ``(MOVED, None)``. Waits up to ``wait``
        seconds (None: for ever) for a run of the same request on another connection to
        finish."""
        with self._lock:
            if self.evicted:
                return MOVED, None
            self.last_used = monotonic()
            if request_id > self.highest:
                self.highest = request_id
            answer = self._answers.get(request_id)
            if answer is not None:
                return ANSWERED, answer
            running = self._running.get(request_id)
            if running is None:
                if request_id <= self.floor:
                    return FORGOTTEN, None
                self._running[request_id] = threading.Event()
                return NEW, None
        if not running.wait(wait):
            return RUNNING, None
        with self._lock:
            answer = self._answers.get(request_id)
        return (ANSWERED, answer) if answer is not None else (FORGOTTEN, None)

    def finish(self, request_id: int, answer: tuple[bool, bytes]) -> None:
        """Remember the answer of a request claimed NEW (``TOO_LARGE`` for one too large to
        keep), and wake retries waiting for it."""
        with self._lock:
            before = self._bytes
            running = self._running.pop(request_id, None)
            if len(answer[1]) > self.max_bytes:
                answer = TOO_LARGE
            self._answers[request_id] = answer
            self._bytes += len(answer[1])
            self._forget_oldest(self.max_bytes)
            grown = self._bytes - before
        if running is not None:
            running.set()
        if self._memory is not None:
            self._memory._account(grown, self)

    def _forget_oldest(self, max_bytes: int) -> int:
        # Under the lock: the oldest answers go until the window is within its bounds; the
        # newest one stays. Returns the bytes let go.
        freed = 0
        while len(self._answers) > 1 and (len(self._answers) > self.max_entries
                                          or self._bytes > max_bytes):
            old_id, (_, data) = self._answers.popitem(last=False)
            self._bytes -= len(data)
            freed += len(data)
            self.floor = max(self.floor, old_id)
        return freed

    def shrink(self, excess: int) -> int:
        """Forget the oldest answers until ``excess`` bytes went, or only the newest is left.
        Returns the bytes let go."""
        with self._lock:
            return self._forget_oldest(max(0, self._bytes - excess))

    @property
    def kept_bytes(self) -> int:
        return self._bytes

    def evict(self) -> int | None:
        """Give the window up, unless a request of it is running. Returns the highest id it
        saw (the tombstone), or None when it must stay."""
        with self._lock:
            if self._running:
                return None
            self.evicted = True
            return self.highest

    def __len__(self) -> int:
        return len(self._answers)


class ReplayMemory:
    """The replay windows of every session, least recently used forgotten first."""

    def __init__(self, sessions: int = DEFAULT_REPLAY_SESSIONS,
                 window: int = DEFAULT_REPLAY_WINDOW,
                 max_bytes: int = DEFAULT_REPLAY_BYTES,
                 total_bytes: int = DEFAULT_REPLAY_TOTAL_BYTES) -> None:
        self.sessions = sessions
        self.window = window
        self.max_bytes = max_bytes
        self.total_bytes = total_bytes
        self._used = 0   # answer bytes kept by all windows
        self._lock = threading.Lock()
        self._windows: dict[bytes, ReplayWindow] = {}
        self._tombstones: OrderedDict[bytes, int] = OrderedDict()

    def window_for(self, session_id: bytes) -> ReplayWindow:
        """The window of ``session_id``: created if new, after a tombstone if it had one."""
        with self._lock:
            window = self._windows.get(session_id)
            if window is not None and not window.evicted:
                return window
            floor = self._tombstones.pop(session_id, 0)
            window = self._windows[session_id] = ReplayWindow(self.window, self.max_bytes, floor,
                                                              self)
            if len(self._windows) > self.sessions:
                self._evict_one(keep=session_id)
            return window

    def claim(self, session_id: bytes, window: ReplayWindow, request_id: int,
              wait: float | None) -> tuple[ReplayWindow, str, Any]:
        """The exactly-once rule for one Request of a session: claim it in ``window`` (or in
        the session's new window, if the memory gave that one up meanwhile).

        Returns:
            ``(window, state, kept)``: the session's window now; NEW (run it, then
            ``window.finish``), ANSWERED (``kept`` is the remembered ``(ok, answer)``), or a
            refusal (RUNNING, FORGOTTEN, ANSWERED_TOO_LARGE), worded by ``refusal``.
        """
        state, kept = window.claim(request_id, wait)
        while state == MOVED:   # the memory gave that window up
            window = self.window_for(session_id)
            state, kept = window.claim(request_id, wait)
        if state == ANSWERED and kept is TOO_LARGE:
            state = ANSWERED_TOO_LARGE
        return window, state, kept

    def _account(self, grown: int, window: ReplayWindow) -> None:
        """A window's kept bytes changed by ``grown``: keep the total within bounds, evicting
        the sessions used least recently (not ``window``), then ``window``'s oldest answers."""
        with self._lock:
            self._used += grown
            if self._used <= self.total_bytes:
                return
            keep = next((sid for sid, w in self._windows.items() if w is window), b"")
            while self._used > self.total_bytes and self._evict_one(keep):
                pass
            if self._used > self.total_bytes:
                self._used -= window.shrink(self._used - self.total_bytes)

    def _evict_one(self, keep: bytes) -> bool:
        # The least recently used window with nothing running; if every one is busy, the
        # bound is exceeded until one is not. True when one went.
        for session_id, window in sorted(self._windows.items(),
                                         key=lambda item: item[1].last_used):
            if session_id == keep:
                continue
            highest = window.evict()
            if highest is not None:
                del self._windows[session_id]
                self._used -= window.kept_bytes
                self._tombstones[session_id] = highest
                while len(self._tombstones) > TOMBSTONES_PER_SESSION * self.sessions:
                    self._tombstones.popitem(last=False)
                return True
        return False
