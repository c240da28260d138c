"""Retries, for the sync and the asyncio ``ClientPool``: ``RetryPolicy`` (how often, how
long between tries, which failures) and the rule of what is safe to try again, which the
``retry_on`` argument of its docstring states:

* a connect failure, or a request whose frame never left whole (``request_sent`` False): no
  server can have run it;
* a request that was sent and then lost its connection: only when it is marked idempotent, or
  when the pool runs exactly-once sessions and the retry reaches the same server process,
  whose replay window then answers it without running it again;
* a request that timed out: only when it is marked idempotent.
"""

from __future__ import annotations

import random
from typing import Iterable

from ._errors import ConnectError, ConnectionClosed, Timeout, UntrustedServerError


# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
class RetryPolicy:
    """Which failed requests a ``ClientPool`` tries again, and how long it waits in between.

    Args:
        max_attempts: tries in all, the first included (1: never retry).
        backoff: seconds before the first retry. Each further retry waits twice as long.
        max_backoff: the longest wait between two tries.
        jitter: the fraction (0 to 1) of each wait that is random, so that clients that
            failed together do not all retry at the same instant.
        retry_on: the exception types that may be retried. Whatever it lists, a request is
            only retried when that is safe: after a connect failure, or when its frame never
            left whole (``request_sent`` False), as no server can have run it; after a
            Timeout only if it is idempotent; after a ConnectionClosed once it was sent only
            if it is idempotent, or in an exactly-once session whose retry reaches the same
            server process (its replay window then answers without running it again); after
            any other type (a ``RemoteError`` such as ``UnavailableError``, say) only if it
            is idempotent.

    Raises:
        ValueError: a negative or inconsistent setting.
    """

    __module__ = "hintens"

    DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (ConnectError, ConnectionClosed, Timeout)

    def __init__(self, max_attempts: int = 3, backoff: float = 0.05, max_backoff: float = 2.0,
                 jitter: float = 0.5,
                 retry_on: Iterable[type[BaseException]] = DEFAULT_RETRY_ON) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must not be negative")
        if not 0 <= jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.retry_on = tuple(retry_on)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        wait = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return wait * (1 - self.jitter * random.random())

    def __repr__(self) -> str:
        return (f"RetryPolicy(max_attempts={self.max_attempts}, backoff={self.backoff}, "
                f"max_backoff={self.max_backoff}, jitter={self.jitter})")


#: Never retry.
NO_RETRY = RetryPolicy(max_attempts=1)


def may_retry(error: BaseException, idempotent: bool, exactly_once: bool,
              pool_closed: bool) -> bool:
    """Whether a request that failed with ``error`` may safely go again (the policy's count
    and ``retry_on`` aside)."""
    if isinstance(error, UntrustedServerError):
        return False   # the same server would be refused again
    if isinstance(error, ConnectError):
        return True
    if isinstance(error, Timeout):
        # Also a Timeout waiting for a free connection: nothing was sent, but waiting
        # again would only double the wait the caller chose.
        return idempotent and error.request_id is not None
    if isinstance(error, ConnectionClosed):
        if pool_closed:
            return False
        return error.request_sent is False or idempotent or exactly_once
    # Another type the caller listed in retry_on (a RemoteError, say): the server may
    # have run the request, so only an idempotent one goes again.
    return idempotent or getattr(error, "request_sent", None) is False


def needs_same_server(error: BaseException, idempotent: bool) -> bool:
    """A retry allowed by ``may_retry`` that only the same server process may answer (its
    replay window), under the same request id: a request that was sent, then lost its
    connection, and is not idempotent (exactly-once)."""
    return isinstance(error, ConnectionClosed) and bool(error.request_sent) and not idempotent


def restarted_error(path: str, request_id: int | None) -> ConnectionClosed:
    """The error for an exactly-once retry that found another server process at ``path``:
    the request was sent to the one before, which may or may not have run it."""
    gone = ConnectionClosed(f"the server at {path} restarted after request {request_id} was "
                            f"sent; it may or may not have run")
    gone.request_sent, gone.request_id = True, request_id
    return gone
