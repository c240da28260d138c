"""Seeing what happens: the ``stats`` every client, pool and server keeps, and the same
counters served to Prometheus.

Run it: ``python examples/stats_metrics.py``.
"""
# needs: prometheus_client

import os
import tempfile
import urllib.request

import hintens

PATH = os.path.join(tempfile.mkdtemp(), "stats.sock")


def handler(payload):
    if bytes(payload) == b"fail":
        raise hintens.RemoteError(1001, "no such order")
    return payload


with hintens.Server(PATH, handler) as server:
    with hintens.Client(PATH) as client:
        for n in range(100):
            client.request(b"order %d" % n)
        try:
            client.request(b"fail")
        except hintens.RemoteError:
            pass
        print(client)
        stats = client.stats
        print("client sent", stats["requests_sent"], "requests; errors by code:",
              stats["errors"])
        handler_times = server.stats["handler"]
        print("server ran the handler", handler_times["count"], "times,",
              handler_times["buckets"][1e-3], "of them in 1 ms or less")

        from prometheus_client import REGISTRY, start_http_server
        from hintens.metrics import PrometheusCollector

        REGISTRY.register(PrometheusCollector(server, client))
        http_server, _ = start_http_server(0, "127.0.0.1")   # port 0: any free one
        port = http_server.server_address[1]
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        print(*[line for line in page.splitlines()
                if line.startswith("hintens_requests_received_total")], sep="\n")
        http_server.shutdown()
