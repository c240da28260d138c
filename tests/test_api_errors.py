"""Errors at the API: each bad argument fails with a clear ValueError or TypeError before
anything is sent or bound, and leaves the connection (or the file system) as it was."""

from __future__ import annotations

import math
import os
import socket
import threading
import time

import pytest

import hintens

from .peers import raw_listener

BAD_TIMEOUTS = [
    (-1, ValueError), (0, ValueError), (0.0, ValueError), (math.nan, ValueError),
    (-math.inf, ValueError), ("1", TypeError), (True, TypeError), (b"1", TypeError),
]


def runs(client, key):
    """How many times the server's ``count:`` handler ran for ``key`` (this call included)."""
    return int(client.request(b"count:" + key))


# Timeouts: one rule for every parameter -------------------------------------------------------

@pytest.mark.parametrize("value, error", BAD_TIMEOUTS)
def test_a_bad_request_timeout_fails_before_anything_is_sent(client, value, error):
    before = runs(client, b"t")
    for call in (lambda: client.request(b"count:t", timeout=value),
                 lambda: client.request_many([b"count:t"], timeout=value),
                 lambda: client.allocate(100, timeout=value)):
        with pytest.raises(error, match="timeout"):
            call()
    assert runs(client, b"t") == before + 1      # none of them ran
    assert client._waiters == {}                 # and none left a waiter behind


@pytest.mark.parametrize("value", [math.inf, 1e20, 1e300, 10**30])
def test_inf_and_huge_timeouts_mean_no_timeout(client, value):
    assert client.request(b"echo:x", timeout=value) == b"x"
    assert client.request_many([b"echo:a", b"echo:b"], timeout=value) == [b"a", b"b"]
    assert client.request(b"sleep:0.2:slept", timeout=value) == b"slept"


@pytest.mark.parametrize("value", [None, math.inf, 1e20])
def test_a_client_without_timeouts_works(server_process, sock_path, value):
    with hintens.Client(sock_path, timeout=value, connect_timeout=value) as client:
        assert client.timeout is None
        assert client.request(b"echo:forever") == b"forever"
        client.send_event(b"e" * 100_000)        # a large send, with no send timeout
        assert client.request(b"echo:after") == b"after"


@pytest.mark.parametrize("name", ["timeout", "connect_timeout"])
@pytest.mark.parametrize("value, error", BAD_TIMEOUTS)
def test_bad_client_timeouts(sock_path, name, value, error):
    with pytest.raises(error, match=name):
        hintens.Client(sock_path, **{name: value})


@pytest.mark.parametrize("name", ["timeout", "connect_timeout", "acquire_timeout",
                                  "idle_timeout"])
@pytest.mark.parametrize("value, error", BAD_TIMEOUTS[:4])
def test_bad_pool_timeouts(sock_path, name, value, error):
    with pytest.raises(error, match=name):
        hintens.ClientPool(sock_path, **{name: value})


def test_bad_pool_close_timeout(sock_path):
    pool = hintens.ClientPool(sock_path)
    with pytest.raises(ValueError, match="timeout"):
        pool.close(timeout=-1)
    pool.close(timeout=math.inf)


@pytest.mark.parametrize("name", ["idle_timeout", "frame_timeout", "send_timeout"])
@pytest.mark.parametrize("value, error", BAD_TIMEOUTS)
def test_bad_server_timeouts_leave_no_socket_file(sock_path, name, value, error):
    with pytest.raises(error, match=name):
        hintens.Server(sock_path, **{name: value})
    assert not os.path.exists(sock_path)


def test_server_close_timeouts(sock_path):
    server = hintens.Server(sock_path).start()
    with pytest.raises(ValueError, match="timeout"):
        server.close(timeout=0)
    server.close(timeout=math.inf)
    assert not os.path.exists(sock_path)


def test_a_server_without_deadlines_serves(sock_path):
    with hintens.Server(sock_path, frame_timeout=None, send_timeout=None).start():
        with hintens.Client(sock_path) as client:
            assert client.request(b"x" * 200_000) == b"x" * 200_000


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (math.inf, ValueError),
                                          (math.nan, ValueError), ("0", TypeError)])
def test_bad_flush_interval(sock_path, value, error):
    with pytest.raises(error, match="flush_interval"):
        hintens.Client(sock_path, flush_interval=value)


# Connecting ----------------------------------------------------------------------------------

def test_a_full_accept_queue_is_waited_out_until_connect_timeout(sock_path):
    listener = raw_listener(sock_path)
    listener.listen(0)                       # one pending connection fills the queue
    filler = socket.socket(socket.AF_UNIX)
    filler.connect(sock_path)
    try:
        started = time.monotonic()
        with pytest.raises(hintens.Timeout, match="accept queue"):
            hintens.Client(sock_path, connect_timeout=0.5)
        assert time.monotonic() - started >= 0.45    # waited, did not fail at once
    finally:
        filler.close()
        listener.close()


def test_a_connect_that_waits_succeeds_when_the_queue_drains(sock_path):
    listener = raw_listener(sock_path)
    listener.listen(0)
    filler = socket.socket(socket.AF_UNIX)
    filler.connect(sock_path)
    accepted = []

    def drain():
        time.sleep(0.3)
        for _ in range(2):
            accepted.append(listener.accept()[0])

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        started = time.monotonic()
        client = hintens.Client(sock_path, connect_timeout=5)
        assert 0.25 <= time.monotonic() - started < 4
        client.close()
    finally:
        thread.join()
        for conn in accepted:
            conn.close()
        filler.close()
        listener.close()


# Server construction ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, text", [
    ({"handler": 123}, TypeError, "handler must be callable"),
    ({"handler": None}, TypeError, "handler must be callable"),
    ({"on_event": "print"}, TypeError, "on_event"),
    ({"on_connect": 1}, TypeError, "on_connect"),
    ({"mode": "600"}, TypeError, "mode must be an int"),
    ({"mode": 0o1000}, ValueError, "mode must be in"),
    ({"mode": -1}, ValueError, "mode"),
    ({"mode": 6.0}, TypeError, "mode"),
    ({"allow_uids": "0"}, TypeError, "allow_uids"),
    ({"allow_gids": [-5]}, ValueError, "allow_gids"),
    ({"backlog": 0}, ValueError, "backlog"),
    ({"max_payload": 10}, ValueError, "max_payload"),
    ({"max_payload": 2**32}, ValueError, "max_payload"),
    ({"shm_threshold": -1}, ValueError, "shm_threshold"),
    ({"shm_pool_bytes": 0}, ValueError, "shm_pool_bytes"),
    ({"path": 5}, TypeError, "path"),
])
def test_bad_server_arguments_fail_before_the_socket_exists(sock_path, kwargs, error, text):
    kwargs = dict(kwargs)
    path = kwargs.pop("path", sock_path)
    handler = kwargs.pop("handler", hintens.sync.server.echo)
    with pytest.raises(error, match=text):
        hintens.Server(path, handler, **kwargs)
    assert not os.path.exists(sock_path)


@pytest.mark.parametrize("kwargs, error", [
    ({"on_event": 3}, TypeError), ({"max_payload": -1}, ValueError),
    ({"shm_pool_bytes": "big"}, TypeError), ({"path": 3.5}, TypeError),
])
def test_bad_client_arguments(sock_path, kwargs, error):
    kwargs = dict(kwargs)
    path = kwargs.pop("path", sock_path)
    with pytest.raises(error):
        hintens.Client(path, **kwargs)
# Handlers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("result, name", [("text", "str"), (12345, "int"), ([b"x"], "list")])
@pytest.mark.parametrize("exactly_once", [False, True])   # the core's path, the replay path
def test_a_handler_that_returns_no_bytes_is_a_clear_handler_error(sock_path, result, name,
                                                                   exactly_once):
    def handler(payload):
        return result if bytes(payload) == b"bad" else payload

    with hintens.Server(sock_path, handler).start():
        with hintens.ClientPool(sock_path, exactly_once=exactly_once) as pool:
            for _ in range(3):
                with pytest.raises(hintens.HandlerError) as caught:
                    pool.request(b"bad")
                assert caught.value.message == \
                    f"handler must return a bytes-like object, got {name}"
                assert pool.request(b"fine") == b"fine"      # the connection stays


def test_close_takes_the_largest_timeout_it_accepts(sock_path):
    server = hintens.Server(sock_path).start()
    server.close(timeout=threading.TIMEOUT_MAX - 1)     # not an OverflowError
    assert not os.path.exists(sock_path)


@pytest.mark.parametrize("value", [2**63, 1 << 31])
def test_thread_stack_bytes_has_an_upper_bound(sock_path, value):
    with pytest.raises(ValueError, match="thread_stack_bytes"):
        hintens.Server(sock_path, thread_stack_bytes=value)
    assert not os.path.exists(sock_path)
