"""Batching through Client and Server, against a real server process that records Events:
order, the flush deadline, batch(), flush(), close(), request_many, and many threads."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

import hintens

from .peers import start_server, stop_server


@pytest.fixture
def recording_server(sock_path):
    process = start_server(sock_path, "--on-event", "tests.handlers:record_event")
    yield process
    stop_server(process, signal.SIGKILL)


@pytest.fixture
def observer(recording_server, sock_path):
    """A second connection, to ask the server what it received without touching the first."""
    with hintens.Client(sock_path, timeout=30) as other:
        yield other


def summary(client):
    return json.loads(bytes(client.request(b"events:")))


def wait_for_count(observer, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        seen = summary(observer)
        if seen["count"] >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.01)


def test_a_request_after_many_events_is_answered_after_all_of_them(recording_server, sock_path):
    with hintens.Client(sock_path, timeout=30) as client:
        for n in range(20_000):
            client.send_event(b"%d" % n)
        seen = summary(client)    # same connection: the request leaves behind the Events
    assert seen == {"count": 20_000, "in_order": True, "sizes": [1, 2, 3, 4, 5]}


@pytest.mark.parametrize("flush_interval", [3600, 1e12])
def test_a_lone_event_is_not_held(observer, sock_path, flush_interval):
    # 1e12 s is longer than any machine's uptime: the first Event must not be compared
    # with a clock origin of 0 (CLOCK_MONOTONIC counts from boot).
    with hintens.Client(sock_path, flush_interval=flush_interval) as client:
        client.send_event(b"0")
        assert wait_for_count(observer, 1)["count"] == 1   # long before any deadline


def test_the_flush_deadline_writes_what_waits(observer, sock_path):
    with hintens.Client(sock_path, flush_interval=0.05) as client:
        client.send_event(b"0")
        client.send_event(b"1")     # right after another: queued until the deadline
        assert wait_for_count(observer, 2) == {"count": 2, "in_order": True, "sizes": [1]}


def test_flush_and_close_write_what_waits(observer, sock_path):
    client = hintens.Client(sock_path, flush_interval=3600)
    client.send_event(b"0")
    client.send_event(b"1")
    client.flush()
    assert wait_for_count(observer, 2)["count"] == 2
    client.send_event(b"2")
    client.close()
    assert wait_for_count(observer, 3) == {"count": 3, "in_order": True, "sizes": [1]}


def test_batch_holds_events_until_the_block_ends(observer, sock_path):
    with hintens.Client(sock_path, flush_interval=0.0) as client:
        with client.batch():
            for n in range(100):
                client.send_event(b"%d" % n)
            time.sleep(0.05)
            assert summary(observer)["count"] == 0   # held, though the interval is 0
        assert wait_for_count(observer, 100) == {"count": 100, "in_order": True,
                                                 "sizes": [1, 2]}


def test_batch_still_sends_its_events_when_the_block_raises(observer, sock_path):
    with hintens.Client(sock_path) as client:
        with pytest.raises(KeyError):
            with client.batch():
                client.send_event(b"0")
                raise KeyError("application error")
        assert wait_for_count(observer, 1)["count"] == 1


def test_many_threads_share_one_client(observer, sock_path):
    with hintens.Client(sock_path, timeout=30) as client:
        def work(t):
            for n in range(2000):
                client.send_event(b"t%d" % t)
                if n % 250 == 0:
                    assert client.request(b"echo:%d" % n) == b"%d" % n

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert summary(client)["count"] == 8000


def test_request_many_answers_in_order(client):
    payloads = [b"echo:%d" % n for n in range(500)]
    assert client.request_many(payloads) == [b"%d" % n for n in range(500)]
    assert client.request_many([]) == []


def test_request_many_with_large_and_shared_memory_payloads(client):
    big, huge = b"a" * 20_000, b"b" * 200_000
    replies = client.request_many([b"echo:x", big, huge, b"echo:y"])
    assert [bytes(r) for r in replies] == [b"x", big, huge, b"y"]


def test_request_many_errors(client):
    with pytest.raises(hintens.HandlerError, match="boom"):
        client.request_many([b"echo:a", b"raise:boom", b"echo:b"])
    replies = client.request_many([b"echo:a", b"raise:boom", b"echo:b"],
                                  return_exceptions=True)
    assert replies[0] == b"a" and replies[2] == b"b"
    assert isinstance(replies[1], hintens.HandlerError)
    with pytest.raises(hintens.Timeout):
        client.request_many([b"echo:a", b"sleep:2:late"], timeout=0.2)
    assert client.request(b"echo:still fine") == b"still fine"


def test_events_to_a_dead_server_end_in_connection_closed(sock_path):
    process = start_server(sock_path)
    client = hintens.Client(sock_path, flush_interval=0.001)
    client.send_event(b"0")
    stop_server(process, signal.SIGKILL)
    deadline = time.monotonic() + 10
    with pytest.raises(hintens.ConnectionClosed):
        while time.monotonic() < deadline:
            client.send_event(b"x" * 100)
            time.sleep(0.001)
    with pytest.raises(hintens.ConnectionClosed):
        client.flush()
    client.close()


def test_server_without_on_event_drops_events_and_keeps_serving(client):
    for n in range(10_000):
        client.send_event(b"%d" % n)
    assert client.request(b"echo:after") == b"after"


def test_server_pushes_batched_events_in_order(sock_path):
    got = []
    done = threading.Event()

    def on_event(payload):
        got.append(bytes(payload))
        if len(got) == 1000:
            done.set()

    def handler(payload):
        connection = server.current_connection()
        for n in range(1000):
            connection.send_event(b"%d" % n)
        return b"pushed"

    server = hintens.Server(sock_path, handler).start()
    try:
        with hintens.Client(sock_path, on_event=on_event) as client:
            assert client.request(b"go") == b"pushed"
            assert done.wait(10)
        assert got == [b"%d" % n for n in range(1000)]
    finally:
        server.close()


def test_current_connection_outside_a_handler(sock_path):
    with hintens.Server(sock_path) as server:
        with pytest.raises(RuntimeError, match="handlers"):
            server.current_connection()


def test_a_thread_woken_to_read_after_its_deadline_hands_the_role_on(sock_path):
    """The reader gives its role to the first parked thread, whose deadline has just passed:
    that thread must pass the role on, or the next one waits out its own deadline although
    its reply is in (found in review)."""
    with hintens.Server(sock_path) as server:
        server.start()
        client = hintens.Client(sock_path)
        outcome = {}

        def ask(name, timeout):
            started = time.monotonic()
            try:
                client.request(name.encode(), timeout=timeout)
                outcome[name] = ("reply", time.monotonic() - started)
            except hintens.Timeout:
                outcome[name] = ("timeout", time.monotonic() - started)

        with client._lock:
            client._reading = True            # a reader that is busy elsewhere
        early = threading.Thread(target=ask, args=("early", 0.3))
        early.start()
        while len(client._parked) < 1:
            time.sleep(0.001)
        late = threading.Thread(target=ask, args=("late", 30))
        late.start()
        while len(client._parked) < 2:
            time.sleep(0.001)
        with client._lock:                    # hold the state past early's deadline...
            time.sleep(0.5)
            client._reading = False           # ...then give the role up, to early first
            client._wake_parked()
        early.join(10)
        late.join(10)
        client.close()
    assert outcome["early"][0] == "timeout"
    assert outcome["late"][0] == "reply" and outcome["late"][1] < 5


def test_a_timed_out_request_still_queued_counts_as_maybe_sent(sock_path):
    """A request queued behind a writer the server is not reading from times out; its frame
    stays queued on a live connection and will run, so it must not say it was never sent."""
    release = threading.Event()
    runs = []

    def handler(payload):
        runs.append(bytes(payload[:5]))
        if bytes(payload[:5]) == b"block":
            release.wait(10)                  # the serving thread reads nothing meanwhile
        return b"ok"

    with hintens.Server(sock_path, handler) as server:
        server.start()
        client = hintens.Client(sock_path, shm=False, timeout=30)
        blocker = threading.Thread(target=client.request, args=(b"block",))
        blocker.start()
        while not runs:
            time.sleep(0.001)
        big = threading.Thread(target=client.request, args=(b"big.." + b"x" * (8 << 20),))
        big.start()
        channel = client._channel
        while channel.submitted - channel.written < (1 << 20):   # it is stuck in send
            time.sleep(0.001)
        with pytest.raises(hintens.Timeout) as caught:
            client.request(b"small", timeout=0.3)
        assert caught.value.request_sent is True
        release.set()
        blocker.join(10)
        big.join(30)
        assert client.request(b"after") == b"ok"
        client.close()
    assert runs.count(b"small") == 1          # it did run, once
