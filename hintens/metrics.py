"""Prometheus export of hintens stats (the optional extra ``prometheus``).

Register a ``PrometheusCollector`` over the servers, clients and pools to watch, and
``prometheus_client`` serves their ``stats`` in the standard way::

    from prometheus_client import REGISTRY, start_http_server
    from hintens.metrics import PrometheusCollector

    REGISTRY.register(PrometheusCollector(server))
    start_http_server(9100)

Each scrape reads every source's ``stats`` once. Counters end in ``_total``; each metric has
the labels ``kind`` (``server``, ``client`` or ``pool``) and ``address``, and Error counters
a ``code`` label. A server's handler times are the histogram ``hintens_handler_seconds``.
``hintens serve --metrics-port N`` does all of this for the server it runs.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from ._stats import HANDLER_BUCKETS_S

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector
except ImportError:   # the extra is not installed: PrometheusCollector() says so
    Collector = object  # type: ignore[assignment,misc]
    _MISSING = True
else:
    _MISSING = False

__all__ = ["PrometheusCollector"]

# Each stats key a metric, with its help text: counters (exported with _total), then gauges.
_COUNTERS = {
    "requests_sent": "Requests sent",
    "requests_received": "Requests received",
    "responses_sent": "Responses sent",
    "responses_received": "Responses received",
    "events_sent": "Events sent (control Events not counted)",
    "events_received": "Events received (control Events not counted)",
    "errors_received": "Error frames received",
    "bytes_sent": "Bytes written to the socket",
    "bytes_received": "Bytes read from the socket",
    "shm_bytes_sent": "Payload bytes sent through shared memory",
    "shm_bytes_received": "Payload bytes received through shared memory",
    "timeouts": "Requests that timed out",
    "retries": "Requests a pool retried",
    "reconnects": "Connections a pool opened to replace lost ones",
    "connections_opened": "Connections a pool opened",
    "connections_closed": "Connections a server saw end",
    "connections_refused": "Connections a server refused",
    "slow_consumers_cut": "Clients a server cut for falling behind",
    "events_dropped": "Events a server dropped for slow clients",
}
_GAUGES = {
    "in_flight": "Requests waiting for their replies",
    "queued_bytes": "Bytes waiting in the outgoing queues",
    "shm_segments": "Shared-memory segments this side owns",
    "shm_segment_bytes": "Bytes of the shared-memory segments this side owns",
    "shm_segments_in_use": "Segments this side owns that are in use",
    "peer_segments": "The peer's shared-memory segments mapped here",
    "peer_segment_bytes": "Bytes of the peer's segments mapped here",
    "connections": "Connections a server has open",
    "open": "Connections a pool has open",
    "busy": "Connections of a pool lent out",
    "idle": "Idle connections of a pool",
}
_BY_CODE = {
    "errors_sent": ("errors_sent", "Error frames sent, by code"),
    "errors": ("errors_raised", "RemoteErrors raised to callers, by code"),
}


def _kind(source: Any) -> str:
    name = type(source).__name__
    return "pool" if name.endswith("Pool") else "server" if "Server" in name else "client"


def _address(source: Any) -> str:
    addresses = getattr(source, "addresses", None)
    return " ".join(addresses) if addresses else str(getattr(source, "path", ""))


class PrometheusCollector(Collector):  # type: ignore[misc,valid-type]
    """A Prometheus collector over the ``stats`` of hintens objects.

    Args:
        *sources: ``Server``, ``Client`` and ``ClientPool`` objects, sync or asyncio.
        prefix: the metric names' prefix.

    Raises:
        ImportError: the ``prometheus_client`` package is not installed
            (``pip install 'hintens[prometheus]'``).
    """

    def __init__(self, *sources: Any, prefix: str = "hintens") -> None:
        if _MISSING:
            raise ImportError("hintens.metrics needs prometheus_client "
                              "(pip install 'hintens[prometheus]')")
        self.prefix = prefix
        self._sources = list(sources)
        self._lock = threading.Lock()

    def add(self, source: Any) -> None:
        """Watch one more ``Server``, ``Client`` or ``ClientPool``."""
        with self._lock:
            self._sources.append(source)

    def remove(self, source: Any) -> None:
        """Stop watching ``source``.

        Raises:
            ValueError: it was not watched.
        """
        with self._lock:
            self._sources.remove(source)

    def collect(self) -> Iterator[Any]:
        """The metric families of one scrape (called by ``prometheus_client``)."""
        with self._lock:
            sources = list(self._sources)
        labels = ["kind", "address"]
        families: dict[str, Any] = {}

        def family(key: str, make: Any, help_text: str, extra: tuple[str, ...] = ()) -> Any:
            if key not in families:
                families[key] = make(f"{self.prefix}_{key}", help_text, labels=[*labels, *extra])
            return families[key]

        for source in sources:
            stats = source.stats
            ident = [_kind(source), _address(source)]
            for key, help_text in _COUNTERS.items():
                if key in stats:
                    family(key, CounterMetricFamily, help_text).add_metric(ident, stats[key])
            for key, help_text in _GAUGES.items():
                if key in stats:
                    family(key, GaugeMetricFamily, help_text).add_metric(ident, stats[key])
            for key, (name, help_text) in _BY_CODE.items():
                metric = family(name, CounterMetricFamily, help_text, ("code",))
                for code, count in stats.get(key, {}).items():
                    metric.add_metric([*ident, str(code)], count)
            handler = stats.get("handler")
            if handler is not None:
                buckets = [(_bound(bound), handler["buckets"][bound])
                           for bound in (*HANDLER_BUCKETS_S, float("inf"))]
                family("handler_seconds", HistogramMetricFamily,
                       "Time handlers took to answer Requests").add_metric(
                    ident, buckets, sum_value=handler["seconds"])
        yield from families.values()


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
