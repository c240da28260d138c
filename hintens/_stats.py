"""Stats: what a client, pool, server or served connection has done, as plain dicts.

Every ``stats`` property returns a fresh snapshot: a dict of ints (and floats), with two
nested dicts, ``errors`` (Error frames by code) and ``handler`` (a server's handler times).
The keys are listed in the README ("Seeing what happens"); ``hintens.metrics`` exports them
to Prometheus.

Counting stays off the round trip's cost. The frame decoder counts the frames it returns
by type, and the bytes it is fed, in the compiled core; the Channel times the handlers its
own serve loop runs in C. The rest are Python counters bumped where something rare happens
(an Error, a timeout, a shared-memory send) or under a lock that is taken anyway.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Iterable

from ._constants import HANDLER_BUCKETS_S

__all__ = ["HANDLER_BUCKETS_S", "ClientCounts", "PoolTally", "connection_stats",
           "handler_stats", "merge_stats", "public_name"]


def connection_stats(endpoint: Any, channel: Any, *, requests_sent: int = 0,
                     responses_sent: int = 0, events_sent: int = 0) -> dict[str, Any]:
    """The counters every connection has, on either side. Frames each way: Requests,
    Responses and Events (control Events not included), Error frames sent by code
    (``errors_sent``) and received (a count); bytes on the socket each way, and payload
    bytes through shared memory each way; the segments this side owns (all, their bytes,
    those in use) and the peer's it maps; bytes waiting in the outgoing queue.

    Args:
        endpoint: the connection's ``Endpoint`` (its decoder counts what arrived).
        channel: its transport ``Channel``, or None before it connects.
        requests_sent, responses_sent, events_sent: what the front end counted.
    """
    decoder = endpoint.decoder
    _controls, requests, responses, events, errors = decoder.frame_counts()
    pool = endpoint.pool
    segments, segment_bytes, in_use = pool.usage() if pool is not None else (0, 0, 0)
    peer = list(endpoint.segments.values())
    return {
        "requests_sent": requests_sent,
        "requests_received": requests,
        "responses_sent": responses_sent + endpoint.responses_sent,
        "responses_received": responses,
        "events_sent": events_sent,
        "events_received": events + decoder.events_skipped,
        "errors_sent": dict(endpoint.errors_sent),
        "errors_received": errors,
        "bytes_sent": channel.written if channel is not None else 0,
        "bytes_received": decoder.bytes_fed,
        "shm_bytes_sent": endpoint.shm_bytes_sent,
        "shm_bytes_received": endpoint.shm_bytes_received,
        "shm_segments": segments,
        "shm_segment_bytes": segment_bytes,
        "shm_segments_in_use": in_use,
        "peer_segments": len(peer),
        "peer_segment_bytes": sum(segment.size for segment in peer),
        "queued_bytes": channel.queued if channel is not None else 0,
    }


def handler_stats(times: tuple[int, float, tuple[int, ...]]) -> dict[str, Any]:
    """A served connection's handler times (``Channel.handler_times()``) for stats:
    ``count``, ``seconds`` (their sum) and ``buckets``, a dict from each bound of
    ``HANDLER_BUCKETS_S`` (and ``inf``) to how many runs took at most that long (cumulative,
    as Prometheus histograms count)."""
    count, seconds, buckets = times
    cumulative: dict[float, int] = {}
    running = 0
    for bound, n in zip((*HANDLER_BUCKETS_S, float("inf")), buckets):
        running += n
        cumulative[bound] = running
    return {"count": count, "seconds": seconds, "buckets": cumulative}


def merge_stats(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add ``part`` into ``total`` (numbers summed, nested dicts merged key by key);
    returns ``total``."""
    for key, value in part.items():
        if isinstance(value, dict):
            merge_stats(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def public_name(obj: Any) -> str:
    """How ``repr`` names a hintens object: by where users import it from
    (``hintens.Client``, ``hintens.aio.Server``), a codec client as its plain class."""
    cls = type(obj)
    package = "hintens.aio" if cls.__module__.startswith("hintens.aio") else "hintens"
    return f"{package}.{cls.__name__.replace('Coded', '', 1)}"


class PoolTally:
    """A pool's counters beyond its open connections' own: what the connections it closed
    had counted (summed once each), retries, connections opened, and reconnects (opened to
    replace one that was found closed, or dead, rather than closed by the pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended: dict[str, Any] = {}
        self._lost = 0                    # lost connections not replaced yet
        self.retries = 0
        self.opened = 0
        self.reconnects = 0

    def closing(self, client: Any, lost: bool = False) -> None:
        """``client`` is being closed by the pool (``lost``: it had died on its own)."""
        stats = client.stats
        with self._lock:
            if getattr(client, "_tallied", False):
                return
            client._tallied = True   # its stats are in _ended from now on
            merge_stats(self._ended, stats)
            self._lost += lost

    def opening(self) -> None:
        """The pool opens a connection."""
        with self._lock:
            self.opened += 1
            if self._lost:
                self._lost -= 1
                self.reconnects += 1

    def retrying(self) -> None:
        """The pool retries a request."""
        with self._lock:
            self.retries += 1

    def snapshot(self, clients: Iterable[Any], **own: int) -> dict[str, Any]:
        """The pool's stats: every connection's counters summed (those open, ``clients``,
        and those closed), its own counts, and ``own``."""
        live = [(client, client.stats) for client in clients]
        with self._lock:
            total = merge_stats({}, self._ended)
            for client, stats in live:
                if not getattr(client, "_tallied", False):
                    merge_stats(total, stats)
            total.update(retries=self.retries, connections_opened=self.opened,
                         reconnects=self.reconnects, **own)
        return total


class ClientCounts:
    """A client's own counters (sync or asyncio), kept in one small object: a client with
    one attribute more per counter would pass CPython's limit for shared instance dicts,
    and every attribute access on the request path would get slower.

    Attributes:
        requests: Requests sent (the sync client counts them under its lock).
        events: Events sent (besides those the channel counts, ``small_events``).
        timeouts: requests that timed out.
        errors: RemoteErrors raised to callers, by code.
    """

    __slots__ = ("requests", "events", "timeouts", "errors", "_lock")

    def __init__(self) -> None:
        self.requests = self.events = self.timeouts = 0
        self.errors: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> None:
        """Count a request's failure: a timeout, or a RemoteError by its code."""
        code = getattr(error, "code", None)
        if isinstance(error, TimeoutError):
            with self._lock:
                self.timeouts += 1
        elif isinstance(code, int):
            with self._lock:
                self.errors[code] += 1

    def stats(self, endpoint: Any, channel: Any, in_flight: int) -> dict[str, Any]:
        """The client's stats: its connection's counters, and its own."""
        with self._lock:
            errors, timeouts = dict(self.errors), self.timeouts
        stats = connection_stats(
            endpoint, channel, requests_sent=self.requests,
            events_sent=self.events + (channel.small_events if channel is not None else 0))
        stats.update(errors=errors, timeouts=timeouts, in_flight=in_flight)
        return stats
