"""ClientPool and RetryPolicy against real server processes (killed and restarted where the
test says so), and exactly-once through the server's replay windows."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import pytest

import hintens
from hintens.protocol.replay import (
    ANSWERED,
    FORGOTTEN,
    MOVED,
    NEW,
    RUNNING,
    TOO_LARGE,
    ReplayMemory,
    ReplayWindow,
)

from .peers import raw_listener, start_server, stop_server, wait_until

PATIENT = hintens.RetryPolicy(max_attempts=100, backoff=0.01, max_backoff=0.1, jitter=0.5)



def occupancy(pool):
    """The pool's connections open, lent out and idle, out of its stats."""
    stats = pool.stats
    return {key: stats[key] for key in ("open", "busy", "idle")}

def retries(caplog):
    return [r for r in caplog.records if r.getMessage().startswith("retrying a request")]


# RetryPolicy ---------------------------------------------------------------------------------

def test_retry_policy_backoff_doubles_up_to_the_cap_with_bounded_jitter():
    policy = hintens.RetryPolicy(max_attempts=5, backoff=0.1, max_backoff=0.3, jitter=0.5)
    for retry, full in [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)]:
        for _ in range(50):
            assert full * 0.5 <= policy.delay(retry) <= full
    assert hintens.RetryPolicy(backoff=0.1, jitter=0).delay(2) == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"backoff": -1}, {"jitter": 2}])
def test_retry_policy_validates(kwargs):
    with pytest.raises(ValueError):
        hintens.RetryPolicy(**kwargs)


# The pool ------------------------------------------------------------------------------------

def test_connections_open_lazily_up_to_size(server_process, sock_path):
    with hintens.ClientPool(sock_path, size=3) as pool:
        assert occupancy(pool) == {"open": 0, "busy": 0, "idle": 0}
        assert pool.request(b"echo:a") == b"a"
        assert occupancy(pool) == {"open": 1, "busy": 0, "idle": 1}
        results = []
        barrier = threading.Barrier(6)

        def work(n):
            barrier.wait()
            results.append(pool.request(b"sleep:0.05:%d" % n))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(map(bytes, results)) == [b"%d" % n for n in range(6)]
        assert pool.stats["open"] == 3 and pool.stats["busy"] == 0


def test_waiting_for_a_busy_pool_is_bounded(server_process, sock_path):
    with hintens.ClientPool(sock_path, size=1, acquire_timeout=0.2) as pool:
        with pool.connection() as held:
            assert held.request(b"echo:x") == b"x"
            started = time.monotonic()
            with pytest.raises(hintens.Timeout, match="busy"):
                pool.request(b"echo:y")
            assert time.monotonic() - started < 5
        assert pool.request(b"echo:y") == b"y"   # free again


def test_connections_idle_too_long_are_closed_and_replaced(server_process, sock_path):
    with hintens.ClientPool(sock_path, size=1, idle_timeout=0.1) as pool:
        with pool.connection() as first:
            assert first.request(b"echo:1") == b"1"
        time.sleep(0.3)
        with pool.connection() as second:
            assert second is not first and first.closed
            assert second.request(b"echo:2") == b"2"
        assert occupancy(pool) == {"open": 1, "busy": 0, "idle": 1}


def test_a_connection_the_server_dropped_is_replaced(sock_path):
    process = start_server(sock_path)
    try:
        with hintens.ClientPool(sock_path, size=1, retry=hintens.NO_RETRY) as pool:
            assert pool.request(b"echo:1") == b"1"
            stop_server(process, signal.SIGKILL)
            process = start_server(sock_path)
            time.sleep(1.1)   # idle past the hang-up check: found dead before it is lent
            assert pool.request(b"echo:2") == b"2"
            assert pool.stats["open"] == 1
    finally:
        stop_server(process, signal.SIGKILL)


def test_a_request_that_never_left_is_retried_even_if_not_idempotent(sock_path, caplog,
                                                                    no_hangup_check):
    process = start_server(sock_path)
    try:
        with hintens.ClientPool(sock_path, size=1) as pool:
            assert pool.request(b"echo:1") == b"1"
            stop_server(process, signal.SIGKILL)
            process = start_server(sock_path)
            with caplog.at_level(logging.INFO, "hintens"):
                # At once, before any hang-up check: the write fails, nothing was sent.
                assert pool.request(b"count:a") == b"1"
            assert len(retries(caplog)) == 1
    finally:
        stop_server(process, signal.SIGKILL)


def test_a_sent_request_is_not_retried_unless_idempotent(sock_path, caplog):
    process = start_server(sock_path)
    try:
        with hintens.ClientPool(sock_path, size=1, retry=PATIENT) as pool:
            killer = threading.Timer(0.3, stop_server, (process, signal.SIGKILL))
            killer.start()
            with pytest.raises(hintens.ConnectionClosed) as caught:
                pool.request(b"sleep:5:late")
            killer.join()
            assert caught.value.request_sent is True
            assert not retries(caplog)
    finally:
        stop_server(process, signal.SIGKILL)


def test_timeouts_are_retried_only_when_idempotent(server_process, sock_path, caplog):
    policy = hintens.RetryPolicy(max_attempts=3, backoff=0.01)
    with hintens.ClientPool(sock_path, size=2, retry=policy) as pool:
        with caplog.at_level(logging.INFO, "hintens"):
            with pytest.raises(hintens.Timeout) as caught:
                pool.request(b"sleep:1:x", timeout=0.1)
            assert caught.value.request_sent is True and not retries(caplog)
            with pytest.raises(hintens.Timeout):
                pool.request(b"sleep:1:x", timeout=0.1, idempotent=True)
            assert len(retries(caplog)) == 2


def test_no_server_retries_then_raises_connect_error(sock_path, caplog):
    policy = hintens.RetryPolicy(max_attempts=3, backoff=0.01)
    with hintens.ClientPool(sock_path, retry=policy) as pool:
        with caplog.at_level(logging.INFO, "hintens"):
            with pytest.raises(hintens.ConnectError):
                pool.request(b"echo:x")
        assert len(retries(caplog)) == 2
        assert occupancy(pool) == {"open": 0, "busy": 0, "idle": 0}


def test_kill_and_restart_mid_stream_loses_and_duplicates_nothing(sock_path, caplog):
    """Idempotent pooled requests from 8 threads while the server is SIGKILLed and restarted:
    every request gets exactly its own answer, once."""
    process = start_server(sock_path)
    answered = []
    errors = []
    lock = threading.Lock()
    total = 8 * 60

    def work(t):
        for n in range(60):
            tag = b"%d-%d" % (t, n)
            try:
                reply = pool.request(b"sleep:0.002:" + tag, idempotent=True)
            except Exception as error:   # collected: the test fails on any
                errors.append(error)
                return
            with lock:
                answered.append((tag, reply))

    try:
        with caplog.at_level(logging.INFO, "hintens"):
            with hintens.ClientPool(sock_path, size=4, retry=PATIENT, timeout=10) as pool:
                threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
                for thread in threads:
                    thread.start()
                while len(answered) < total // 3:
                    time.sleep(0.005)
                stop_server(process, signal.SIGKILL)       # requests are in flight
                process = start_server(sock_path)
                for thread in threads:
                    thread.join(60)
        assert not errors, errors[:3]
        assert len(answered) == total
        assert all(tag == reply for tag, reply in answered)
        assert len({tag for tag, _ in answered}) == total
        assert retries(caplog), "the kill did not hit any request"
    finally:
        stop_server(process, signal.SIGKILL)


def test_close_lets_requests_in_flight_finish(server_process, sock_path):
    pool = hintens.ClientPool(sock_path, size=2)
    result = []
    worker = threading.Thread(target=lambda: result.append(pool.request(b"sleep:0.3:done")))
    worker.start()
    while pool.stats["busy"] == 0:
        time.sleep(0.005)
    pool.close(timeout=10)
    worker.join()
    assert result == [b"done"]
    with pytest.raises(hintens.ConnectionClosed, match="closed"):
        pool.request(b"echo:x")


def test_close_cuts_requests_still_running_at_its_deadline(server_process, sock_path):
    pool = hintens.ClientPool(sock_path, size=2)
    failure = []

    def slow():
        try:
            pool.request(b"sleep:5:late")
        except hintens.ConnectionClosed as error:
            failure.append(error)

    worker = threading.Thread(target=slow)
    worker.start()
    while pool.stats["busy"] == 0:
        time.sleep(0.005)
    started = time.monotonic()
    pool.close(timeout=0.2)
    worker.join(10)
    assert time.monotonic() - started < 4
    assert len(failure) == 1


def test_pool_events_and_ordered_events_through_one_connection(sock_path):
    import json

    process = start_server(sock_path, "--on-event", "tests.handlers:record_event")
    try:
        with hintens.ClientPool(sock_path, size=2) as pool:
            with pool.connection() as client:
                for n in range(1000):
                    client.send_event(b"%d" % n)
            pool.send_event(b"1000")
            pool.flush()
            deadline = time.monotonic() + 10
            while True:
                seen = json.loads(bytes(pool.request(b"events:")))
                if seen["count"] == 1001 or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert seen["count"] == 1001 and seen["in_order"]
    finally:
        stop_server(process, signal.SIGKILL)


def test_request_many_through_the_pool(server_process, sock_path):
    with hintens.ClientPool(sock_path) as pool:
        assert pool.request_many([b"echo:%d" % n for n in range(100)]) == \
            [b"%d" % n for n in range(100)]


# Exactly-once ---------------------------------------------------------------------------------

class CuttingServer:
    """An in-process server whose handler counts runs per payload, and, the first time it runs
    ``cut:...``, cuts its own connection after running: the answer never reaches the client."""

    def __init__(self, path):
        self.runs = {}
        self.server = hintens.Server(path, self.handle).start()

    def handle(self, payload):
        key = bytes(payload)
        self.runs[key] = self.runs.get(key, 0) + 1
        if key.startswith(b"cut:") and self.runs[key] == 1:
            self.server.current_connection().close()
        return b"ran %d" % self.runs[key]

    def close(self):
        self.server.close()


def test_exactly_once_answers_a_retry_from_the_replay_window(sock_path, caplog):
    served = CuttingServer(sock_path)
    try:
        with caplog.at_level(logging.INFO, "hintens"):
            with hintens.ClientPool(sock_path, exactly_once=True) as pool:
                assert pool.request(b"cut:1") == b"ran 1"
                assert pool.request(b"plain") == b"ran 1"
        assert served.runs[b"cut:1"] == 1
        assert len(retries(caplog)) == 1
    finally:
        served.close()


def test_without_exactly_once_a_lost_answer_is_an_error(sock_path):
    served = CuttingServer(sock_path)
    try:
        with hintens.ClientPool(sock_path) as pool:
            with pytest.raises(hintens.ConnectionClosed) as caught:
                pool.request(b"cut:1")
            assert caught.value.request_sent is True
            # Marked idempotent, it is retried, and runs twice.
            assert pool.request(b"cut:2", idempotent=True) == b"ran 2"
        assert served.runs == {b"cut:1": 1, b"cut:2": 2}
    finally:
        served.close()


def test_exactly_once_refuses_to_retry_on_a_restarted_server(sock_path):
    """The answer is lost and the server restarts: the new one has no memory of the request,
    so the retry must not run it there."""
    def run_then_die(payload):
        first.current_connection().close()   # the answer is lost...
        first.close()                          # ...and the server goes
        return b"lost"

    first = hintens.Server(sock_path, run_then_die).start()
    replacement = []

    def restart():
        first._done.wait(10)
        replacement.append(hintens.Server(sock_path, lambda payload: b"ran again").start())

    restarter = threading.Thread(target=restart)
    restarter.start()
    try:
        with hintens.ClientPool(sock_path, exactly_once=True, retry=PATIENT) as pool:
            with pytest.raises(hintens.ConnectionClosed, match="restarted") as caught:
                pool.request(b"once")
            assert caught.value.request_sent is True
    finally:
        restarter.join()
        for server in replacement:
            server.close()


def test_replay_window_states():
    window = ReplayWindow(max_entries=3, max_bytes=100)
    assert window.claim(1, 0) == (NEW, None)
    assert window.claim(1, 0.01) == (RUNNING, None)      # a second try while the first runs
    window.finish(1, (True, b"one"))
    assert window.claim(1, 0) == (ANSWERED, (True, b"one"))
    for n in (2, 3, 4):
        assert window.claim(n, 0)[0] == NEW
        window.finish(n, (True, b"x"))
    assert len(window) == 3 and window.floor == 1
    assert window.claim(1, 0) == (FORGOTTEN, None)       # may have run: never again
    assert window.claim(5, 0)[0] == NEW
    window.finish(5, (True, b"y" * 200))                 # too large to keep
    assert window.claim(5, 0) == (ANSWERED, TOO_LARGE)
    assert window.claim(6, 0)[0] == NEW
    window.finish(6, (True, b"z" * 60))
    window.claim(7, 0)
    window.finish(7, (True, b"w" * 60))                  # 120 bytes: the oldest goes
    assert window.claim(6, 0) == (FORGOTTEN, None) and window.floor == 6


def test_replay_window_retry_waits_for_the_first_run():
    window = ReplayWindow()
    assert window.claim(9, 0)[0] == NEW
    threading.Timer(0.05, window.finish, (9, (True, b"done"))).start()
    assert window.claim(9, 5) == (ANSWERED, (True, b"done"))


def test_replay_memory_forgets_the_least_recently_used_session():
    memory = ReplayMemory(sessions=2)
    a, b = memory.window_for(b"a" * 16), memory.window_for(b"b" * 16)
    b.claim(1, 0)
    b.finish(1, (True, b""))
    time.sleep(0.01)
    a.claim(1, 0)                                        # a is now the most recent
    a.finish(1, (True, b""))
    memory.window_for(b"c" * 16)
    assert memory.window_for(b"a" * 16) is a
    assert memory.window_for(b"b" * 16) is not b         # b was forgotten


def test_listed_remote_errors_are_retried_only_when_idempotent(server_process, sock_path,
                                                                 caplog):
    policy = hintens.RetryPolicy(max_attempts=3, backoff=0.01,
                                 retry_on=(*hintens.RetryPolicy.DEFAULT_RETRY_ON,
                                           hintens.HandlerError))
    with hintens.ClientPool(sock_path, retry=policy) as pool:
        with caplog.at_level(logging.INFO, "hintens"):
            with pytest.raises(hintens.HandlerError):
                pool.request(b"raise:boom")          # it ran: never again
            assert not retries(caplog)
            with pytest.raises(hintens.HandlerError):
                pool.request(b"raise:boom", idempotent=True)
            assert len(retries(caplog)) == 2


def test_a_batch_cut_in_the_middle_is_not_retried(sock_path):
    """Part of a request_many batch reached a server that then went away: some of it may have
    run, so the batch counts as sent, and a pool does not retry it unless idempotent."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(4)
    accepted = []

    def serve_then_vanish():
        conn, _ = listener.accept()
        accepted.append(conn)
        got = 0
        while got < 3000:          # the hello, and surely some requests of the batch
            got += len(conn.recv(3000 - got))
        conn.close()

    server = threading.Thread(target=serve_then_vanish)
    server.start()
    try:
        with hintens.ClientPool(sock_path, retry=PATIENT, timeout=10) as pool:
            with pytest.raises(hintens.ConnectionClosed) as caught:
                pool.request_many([b"x" * 100] * 2000)
            assert caught.value.request_sent is True
        server.join(10)
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()      # no second connection: no retry
        assert len(accepted) == 1
    finally:
        listener.close()


def test_an_evicted_session_keeps_a_tombstone():
    memory = ReplayMemory(sessions=1)
    a = memory.window_for(b"a" * 16)
    for n in (1, 2, 3):
        assert a.claim(n, 0)[0] == NEW
        a.finish(n, (True, b"%d" % n))
    memory.window_for(b"b" * 16)                        # a's window is given up
    assert a.claim(4, 0) == (MOVED, None)               # its old holders must look again
    again = memory.window_for(b"a" * 16)
    assert again is not a
    assert again.claim(2, 0) == (FORGOTTEN, None)       # may have run: refused, not run
    assert again.claim(4, 0) == (NEW, None)


def test_a_window_with_a_running_request_is_not_evicted():
    memory = ReplayMemory(sessions=1)
    a = memory.window_for(b"a" * 16)
    assert a.claim(1, 0)[0] == NEW                      # still running
    memory.window_for(b"b" * 16)
    assert memory.window_for(b"a" * 16) is a
    a.finish(1, (True, b"done"))


def test_a_session_retry_on_a_forgotten_window_never_runs_twice(sock_path):
    """End to end: the request runs, its answer is lost, and before the retry comes (half a
    second later) another session pushes ours out of the server's memory. The retry is
    refused, not run again."""
    served = CuttingServer(sock_path)
    memory = served.server._replay = ReplayMemory(sessions=1)
    slow_retry = hintens.RetryPolicy(max_attempts=3, backoff=0.5, jitter=0)
    outcome = []

    def call():
        try:
            outcome.append(pool.request(b"cut:x"))
        except Exception as error:
            outcome.append(error)

    try:
        with hintens.ClientPool(sock_path, exactly_once=True, retry=slow_retry) as pool:
            caller = threading.Thread(target=call)
            caller.start()
            window = None
            while window is None or len(window) == 0:   # until the run has finished
                window = memory._windows.get(pool.session.id)
                time.sleep(0.001)
            memory.window_for(b"z" * 16)                 # another session: ours goes
            caller.join(10)
        assert isinstance(outcome[0], hintens.UnavailableError), outcome
        assert "may have run" in str(outcome[0])
        assert served.runs[b"cut:x"] == 1
    finally:
        served.close()


def test_replay_memory_bounds_answer_bytes_across_sessions():
    memory = ReplayMemory(sessions=100, max_bytes=1000, total_bytes=2500)
    windows = []
    for n in range(5):
        window = memory.window_for(bytes([n]) * 16)
        windows.append(window)
        assert window.claim(1, 0)[0] == NEW
        window.finish(1, (True, bytes(1000)))             # each session keeps 1000 bytes
        time.sleep(0.001)
        assert memory._used <= 2500
    # The oldest sessions gave their windows up (with tombstones: their retries are refused,
    # never run again); the newest ones are kept.
    assert memory.window_for(bytes([4]) * 16) is windows[4]
    assert memory.window_for(bytes([0]) * 16).claim(1, 0) == (FORGOTTEN, None)
    # One busy session alone: it forgets its own oldest answers, keeping the newest.
    lone = ReplayMemory(sessions=10, max_bytes=1000, total_bytes=1500)
    window = lone.window_for(b"x" * 16)
    for n in (1, 2, 3):
        window.claim(n, 0)
        window.finish(n, (True, bytes(700)))
    assert lone._used <= 1500 and window.claim(3, 0)[0] == ANSWERED


def test_replay_total_bytes_is_checked(sock_path):
    with pytest.raises(ValueError, match="replay_total_bytes"):
        hintens.Server(sock_path, replay_bytes=1 << 20, replay_total_bytes=1000)


# The Client interfaces a pool is built on ----------------------------------------------------

class CountingServer:
    """An in-process server that counts how often each payload ran."""

    def __init__(self, path):
        self.runs = {}
        self.entered = threading.Event()
        self.release = threading.Event()
        self.server = hintens.Server(path, self.handle).start()

    def handle(self, payload):
        payload = bytes(payload)
        if payload == b"block":
            self.entered.set()
            self.release.wait(10)
        self.runs[payload] = self.runs.get(payload, 0) + 1
        return b"ran %d" % self.runs[payload]

    def close(self):
        self.release.set()
        self.server.close()


@pytest.mark.parametrize("exactly_once", [True, False])
def test_a_request_retried_under_its_id_runs_once_through_an_exactly_once_session(
        sock_path, exactly_once):
    served = CountingServer(sock_path)
    try:
        with hintens.Client(sock_path,
                            session=hintens.Session(exactly_once=exactly_once)) as client:
            assert client.request(b"once", request_id=5) == b"ran 1"
            again = client.request(b"once", request_id=5)
            (connection,) = served.server.connections
            if exactly_once:
                assert again == b"ran 1" and served.runs[b"once"] == 1
                assert connection.session == client.session.id
            else:   # the ids are shared, the session is not announced: it runs again
                assert again == b"ran 2" and served.runs[b"once"] == 2
                assert connection.session == b""
            assert client.request(b"next") == b"ran 1"   # the counter goes on meanwhile
    finally:
        served.close()


@pytest.mark.parametrize("bad", [0, -1, 1 << 64, "5", 5.0, True])
def test_a_request_id_out_of_range_is_refused_before_sending(sock_path, bad):
    served = CountingServer(sock_path)
    try:
        with hintens.Client(sock_path) as client:
            with pytest.raises(ValueError, match="request_id"):
                client.request(b"x", request_id=bad)
            assert client.request(b"x") == b"ran 1"
        assert served.runs == {b"x": 1}
    finally:
        served.close()


def test_a_request_id_already_waiting_is_refused(sock_path):
    served = CountingServer(sock_path)
    try:
        # One segment in all: a refused attempt that kept it would starve the next send.
        with hintens.Client(sock_path, shm_threshold=4096, shm_pool_bytes=1 << 20,
                            timeout=3) as client:
            first = []
            worker = threading.Thread(
                target=lambda: first.append(client.request(b"block", request_id=7)))
            worker.start()
            assert served.entered.wait(10)
            for payload in (b"small", bytes(1 << 20)):   # inline, and through shared memory
                with pytest.raises(ValueError, match="waiting already"):
                    client.request(payload, request_id=7)
            served.release.set()
            worker.join(10)
            assert first == [b"ran 1"]
            # The refused shared-memory attempt gave its segment back.
            assert client.request(bytes(1 << 20)) == b"ran 1"
            assert client.request(bytes(1 << 20)) == b"ran 2"
        assert bytes(1 << 20) in served.runs and b"small" not in served.runs
    finally:
        served.close()


def test_is_alive_sees_a_server_that_hung_up_without_reading(sock_path):
    served = CountingServer(sock_path)
    try:
        with hintens.Client(sock_path) as client:
            assert client.request(b"x") == b"ran 1"
            assert client.is_alive()
            served.server.connections[0].close()
            assert wait_until(lambda: not client.is_alive())
            assert not client.closed   # nothing was read: the client does not know yet
        assert not client.is_alive()   # closed
    finally:
        served.close()


def test_wait_for_hello(sock_path):
    served = CountingServer(sock_path)
    try:
        with hintens.Client(sock_path) as client:
            hello = client.wait_for_hello(5)
            assert hello is not None and hello is client.peer_hello
            for bad in (0, -1, float("nan")):
                with pytest.raises(ValueError):
                    client.wait_for_hello(bad)
    finally:
        served.close()


def test_wait_for_hello_from_a_silent_server_gives_none(sock_path):
    listener = raw_listener(sock_path)
    try:
        with hintens.Client(sock_path) as client:
            conn, _ = listener.accept()
            started = time.monotonic()
            assert client.wait_for_hello(0.2) is None
            assert 0.15 < time.monotonic() - started < 5
            conn.close()
    finally:
        listener.close()
