"""stats on every front end, the Prometheus collector, ``serve --metrics-port`` and reprs:
real servers and clients, counts checked exactly."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request

import pytest

import hintens
import hintens.aio
from hintens._constants import HANDLER_BUCKETS_S

from .handlers import async_command, command
from .peers import free_port, start_server, stop_server, wait_until

BIG = 200_000   # over the 64 KiB threshold: through shared memory


def _exercise(client) -> None:
    """Seven requests: three good ones (one large), two that fail with codes 5 and 1001, one
    that times out (its late reply is read, and dropped, by the last); and two Events."""
    assert client.request(b"echo:a") == b"a"
    assert client.request(b"size:%d" % BIG) == bytes(BIG)
    assert client.request_many([b"echo:b"]) == [b"b"]
    with pytest.raises(hintens.HandlerError):
        client.request(b"raise:no")
    with pytest.raises(hintens.RemoteError) as caught:
        client.request(b"app:1001:mine")
    assert caught.value.code == 1001
    with pytest.raises(hintens.Timeout):
        client.request(b"sleep:0.3:late", timeout=0.05)
    client.send_event(b"one")
    client.send_event(b"two")
    client.flush()
    time.sleep(0.4)
    assert client.request(b"echo:") == b""


ERRORS = {hintens.ErrorCode.HANDLER_ERROR: 1, 1001: 1}


def test_every_kind_of_event_is_counted_once(sock_path):
    """Small bytes Events go through the channel's one-call path (counted there), the others
    (another buffer type, a large one through shared memory) through the client's own:
    events_sent adds both, each Event once, and not one refused by a closed client."""
    received = []
    with hintens.Server(sock_path, command,
                        on_event=lambda payload, connection: received.append(bytes(payload))):
        client = hintens.Client(sock_path)
        client.send_event(b"small")
        client.send_event(bytearray(b"array"))
        client.send_event(memoryview(b"view"))
        client.send_event(bytes(BIG))
        client.send_event(b"")
        client.flush()
        assert wait_until(lambda: len(received) == 5)
        assert received == [b"small", b"array", b"view", bytes(BIG), b""]
        assert client.stats["events_sent"] == 5
        client.close()
        with pytest.raises(hintens.ConnectionClosed):
            client.send_event(b"after")
        assert client.stats["events_sent"] == 5   # as a request, not counted when refused

def test_sync_client_and_server_count_what_happened(sock_path):
    with hintens.Server(sock_path, command, on_event=lambda payload, connection: None) \
            as server:
        with hintens.Client(sock_path) as client:
            _exercise(client)
            stats = client.stats
            assert (stats["requests_sent"], stats["responses_received"], stats["timeouts"],
                    stats["events_sent"], stats["errors_received"], stats["in_flight"]) \
                == (7, 5, 1, 2, 2, 0)
            assert stats["errors"] == ERRORS
            assert stats["shm_bytes_received"] == BIG
            assert stats["bytes_sent"] > 7 * 24 and stats["bytes_received"] > 7 * 24
            assert wait_until(lambda: server.stats["events_received"] == 2)
            connection, = server.connections
            assert connection.stats["requests_received"] == 7
            assert server.stats["connections"] == 1
        # The connection's counts stay in the server's after it ends.
        assert wait_until(lambda: server.stats["connections"] == 0)
        stats = server.stats
        assert (stats["connections_closed"], stats["requests_received"],
                stats["responses_sent"], stats["events_received"]) == (1, 7, 5, 2)
        assert stats["errors_sent"] == ERRORS
        assert stats["shm_bytes_sent"] == BIG
        handler = stats["handler"]
        assert handler["count"] == 7 and handler["seconds"] >= 0.3
        assert list(handler["buckets"]) == [*HANDLER_BUCKETS_S, float("inf")]
        assert handler["buckets"][float("inf")] == 7     # cumulative
        assert handler["buckets"][0.1] == 6              # all but the 0.3 s sleep
        with hintens.Client(sock_path) as second:
            second.request(b"echo:x")
            assert server.stats["requests_received"] == 8


def test_a_server_has_every_key_before_any_connection(sock_path):
    with hintens.Server(sock_path) as server:
        stats = server.stats
        assert stats["requests_received"] == 0 and stats["connections"] == 0
        assert stats["handler"]["count"] == 0 and stats["errors_sent"] == {}


def test_asyncio_client_and_server_count_what_happened(sock_path):
    async def main():
        server = await hintens.aio.Server(
            sock_path, async_command, on_event=lambda payload, connection: None).start()
        try:
            async with hintens.aio.Client(sock_path) as client:
                assert await client.request(b"echo:a") == b"a"
                assert await client.request(b"size:%d" % BIG) == bytes(BIG)
                with pytest.raises(hintens.HandlerError):
                    await client.request(b"raise:no")
                with pytest.raises(hintens.RemoteError):
                    await client.request(b"app:1001:mine")
                with pytest.raises(hintens.Timeout):
                    await client.request(b"sleep:0.3:late", timeout=0.05)
                await client.send_event(b"one")
                await client.send_event(b"two")
                await client.flush()
                await asyncio.sleep(0.4)
                assert await client.request(b"echo:") == b""
                stats = client.stats
                assert (stats["requests_sent"], stats["responses_received"],
                        stats["timeouts"], stats["events_sent"]) == (6, 4, 1, 2)
                assert stats["errors"] == {hintens.ErrorCode.HANDLER_ERROR: 1, 1001: 1}
                assert stats["shm_bytes_received"] == BIG
                served = server.stats
                assert (served["requests_received"], served["responses_sent"],
                        served["events_received"]) == (6, 4, 2)
                assert served["errors_sent"] == {hintens.ErrorCode.HANDLER_ERROR: 1, 1001: 1}
                assert served["handler"]["count"] == 6
                assert served["handler"]["seconds"] >= 0.3
                assert repr(client) == f"<hintens.aio.Client {sock_path} connected, 0 in flight>"
        finally:
            await server.close()
        assert server.stats["connections_closed"] == 1
        assert server.stats["requests_received"] == 6

    asyncio.run(main())


def test_a_pool_counts_retries_reconnects_and_its_closed_connections(sock_path):
    process = start_server(sock_path)
    try:
        pool = hintens.ClientPool(sock_path, size=2, retry=hintens.RetryPolicy(
            max_attempts=5, backoff=0.05))
        with pool:
            assert pool.request(b"echo:1") == b"1"
            stop_server(process)
            process = start_server(sock_path)
            # The old connection is dead: a retry on a new one answers it.
            assert pool.request(b"echo:2", idempotent=True) == b"2"
            stats = pool.stats
            assert stats["retries"] >= 1 and stats["reconnects"] == 1
            assert stats["connections_opened"] == 2
            assert stats["requests_sent"] >= 2 and stats["responses_received"] == 2
            assert (stats["open"], stats["busy"]) == (1, 0)
            assert repr(pool) == f"<hintens.ClientPool {sock_path} size=2 1 open, 0 busy>"
    finally:
        stop_server(process)


def test_the_prometheus_collector_exposes_the_stats(sock_path):
    prometheus_client = pytest.importorskip("prometheus_client")
    from hintens.metrics import PrometheusCollector

    with hintens.Server(sock_path, command) as server:
        with hintens.Client(sock_path) as client:
            client.request(b"echo:a")
            with pytest.raises(hintens.RemoteError):
                client.request(b"app:1001:mine")
            registry = prometheus_client.CollectorRegistry()
            registry.register(PrometheusCollector(server, client))
            text = prometheus_client.generate_latest(registry).decode()
    where = f'address="{sock_path}"'
    assert f'hintens_requests_received_total{{{where},kind="server"}} 2.0' in text
    assert f'hintens_requests_sent_total{{{where},kind="client"}} 2.0' in text
    assert re.search(r'hintens_errors_sent_total\{[^}]*code="1001"[^}]*kind="server"\} 1\.0',
                     text)
    assert re.search(r'hintens_errors_raised_total\{[^}]*code="1001"[^}]*kind="client"\} 1\.0',
                     text)
    assert re.search(r'hintens_handler_seconds_bucket\{.*le="\+Inf"\} 2\.0', text)
    assert re.search(r'hintens_handler_seconds_count\{.*kind="server"\} 2\.0', text)


def test_serve_metrics_port_serves_prometheus_text(sock_path):
    pytest.importorskip("prometheus_client")
    port = free_port()
    process = start_server(sock_path, "--metrics-port", str(port))
    try:
        with hintens.Client(sock_path) as client:
            client.request(b"echo:a")
            client.request(b"echo:b")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert re.search(rb'hintens_requests_received_total\{[^}]*kind="server"\} 2\.0', body)
    finally:
        stop_server(process)


def test_serve_metrics_port_without_prometheus_client_is_a_one_line_error(sock_path):
    blocked = ("import sys; sys.modules['prometheus_client'] = None; "
               "from hintens._cli import main; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", blocked, "serve", "--socket", sock_path,
                           "--metrics-port", "9999"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "needs prometheus_client" in done.stderr and "Traceback" not in done.stderr


def test_reprs_say_what_and_where(sock_path):
    with hintens.Server(sock_path, command) as server:
        assert repr(server) == f"<hintens.Server unix:{sock_path}, 0 connections>" \
            or repr(server) == f"<hintens.Server {sock_path}, 0 connections>"
        client = hintens.Client(sock_path)
        client.request(b"echo:")
        assert repr(client) == f"<hintens.Client {sock_path} connected, 0 in flight>"
        connection, = server.connections
        assert re.fullmatch(r"<hintens\.ServerConnection \d+ pid=\d+ uid=\d+>",
                            repr(connection))
        assert "1 connection>" in repr(server)
        client.close()
        assert repr(client) == f"<hintens.Client {sock_path} closed, 0 in flight>"
