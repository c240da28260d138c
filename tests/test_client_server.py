"""Client and Server over real Unix sockets, with real server processes where it matters."""

from __future__ import annotations

import os
import signal
import socket
import stat
import tempfile
import threading
import time

import pytest

import hintens
from hintens import ErrorCode

from .peers import (
    RawPeer,
    raw_frame,
    raw_listener,
    read_requests,
    start_server,
    stop_server,
    wait_for_lone_thread,
)


def in_threads(target, count, timeout_s=120.0):
    """Run target(i) for i in range(count) on as many threads; return the exceptions raised.

    Fails the test if a thread is still running at the deadline (a hang)."""
    errors = []

    def run(i):
        try:
            target(i)
        except Exception as error:  # noqa: BLE001 - returned to the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    assert not any(thread.is_alive() for thread in threads), "threads hung"
    return errors








# Request / response ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 64, 4096, 60 * 1024, 64 * 1024, 1 << 20])
def test_round_trip_sizes(client, size):
    payload = os.urandom(size)
    assert bytes(client.request(b"echo:" + payload)) == payload


def test_many_sequential_requests(client):
    for i in range(500):
        assert client.request(b"echo:%d" % i) == b"%d" % i


def test_handler_error_keeps_the_connection(client):
    with pytest.raises(hintens.HandlerError) as caught:
        client.request(b"raise:no such thing")
    assert caught.value.code == ErrorCode.HANDLER_ERROR
    assert "ValueError: no such thing" in caught.value.message
    assert client.request(b"echo:still here") == b"still here"


def test_handler_bad_return_is_a_handler_error(client):
    with pytest.raises(hintens.HandlerError,
                       match="handler must return a bytes-like object, got int"):
        client.request(b"bad-return:")
    assert client.request(b"none:") == b""


def test_application_error_codes_pass_through(client):
    with pytest.raises(hintens.RemoteError) as caught:
        client.request(b"app:1001:quota exceeded")
    assert caught.value.code == 1001 and caught.value.message == "quota exceeded"
    assert type(caught.value) is hintens.RemoteError


def test_timeout_then_connection_still_usable(client):
    started = time.monotonic()
    with pytest.raises(hintens.Timeout) as caught:
        client.request(b"sleep:1.5:late", timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    assert 0.15 < time.monotonic() - started < 1.2   # did not wait for the late reply
    # The late reply arrives while this request waits, and must not be taken for its answer.
    assert client.request(b"echo:fresh") == b"fresh"


def test_server_killed_fails_every_waiter(client, server_process):
    threading.Timer(0.3, server_process.kill).start()
    errors = in_threads(lambda i: client.request(b"sleep:30:never"), 8, timeout_s=10)
    assert len(errors) == 8 and all(isinstance(e, hintens.ConnectionClosed) for e in errors)
    with pytest.raises(hintens.ConnectionClosed):
        client.request(b"echo:after")
    assert client.closed


def test_32_threads_200_requests_each(client):
    def work(worker):
        for seq in range(200):
            body = b"%d-%d" % (worker, seq)
            reply = client.request(b"echo:" + body)
            assert reply == body, (body, reply)

    assert in_threads(work, 32) == []


def test_replies_may_arrive_in_any_order(sock_path):
    """A server written by hand that answers three requests in reverse order."""
    listener = raw_listener(sock_path)

    def serve():
        conn, _ = listener.accept()
        for frame in reversed(read_requests(conn, 3)):
            conn.sendall(hintens.wire.encode_frame(2, b"re:" + frame.payload, frame.request_id))
        conn.recv(1)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    results = {}
    with hintens.Client(sock_path) as client:
        workers = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, client.request(b"%d" % i))) for i in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(10)
    thread.join(10)
    listener.close()
    assert results == {i: b"re:%d" % i for i in range(3)}


def test_a_reply_handed_over_before_its_thread_looks_is_not_read_for_again(sock_path):
    """Thread B posts its request; before it looks whether anybody reads, thread A reads B's
    reply with its own, hands both over, and stops reading. B must take its reply, not become
    the reader and wait for bytes that never come (found in the pure-Python core's runs)."""
    listener = raw_listener(sock_path)
    got_first = threading.Event()

    def serve():
        conn, _ = listener.accept()
        decoder, requests = hintens.wire.FrameDecoder(), []
        while len(requests) < 2:
            requests += [f for f in decoder.feed(conn.recv(65536)) if f.type == 1]
            if requests:
                got_first.set()
        conn.sendall(b"".join(hintens.wire.encode_frame(2, b"re:" + f.payload, f.request_id)
                              for f in reversed(requests)))   # both replies, in one write
        conn.recv(1)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    results = {}
    with hintens.Client(sock_path, timeout=30) as client:
        a = threading.Thread(target=lambda: results.__setitem__("a", client.request(b"a")))
        a.start()
        assert got_first.wait(5)
        post = client._post

        def post_then_hold(msg_type, payload, request_id):
            end = post(msg_type, payload, request_id)
            # Hold B here until A has handed B's reply over and stopped reading.
            deadline = time.monotonic() + 5
            while (request_id in client._waiters or client._reading) \
                    and time.monotonic() < deadline:
                time.sleep(0.001)
            return end

        client._post = post_then_hold
        started = time.monotonic()
        results["b"] = client.request(b"b")
        # Read for again, it would come back only at its 30 s timeout (the kernel's receive
        # timeout), with the reply handed over long before.
        assert time.monotonic() - started < 10
        a.join(5)
    thread.join(5)
    listener.close()
    assert results == {"a": b"re:a", "b": b"re:b"}


# Events and hello ---------------------------------------------------------------------------

def test_events_both_ways(sock_path):
    received, pushed = [], []
    got_event, got_push = threading.Event(), threading.Event()

    def on_event(payload, connection):
        received.append((bytes(payload), connection.peer.pid))
        got_event.set()

    with hintens.Server(sock_path, on_event=on_event).start() as server:
        with hintens.Client(sock_path, on_event=lambda p: (pushed.append(bytes(p)),
                                                           got_push.set())) as client:
            client.send_event(b"hi server")
            assert got_event.wait(5)
            assert received == [(b"hi server", os.getpid())]
            (connection,) = server.connections
            connection.send_event(b"just you")
            assert got_push.wait(5)       # delivered with no request in flight
            got_push.clear()
            assert server.broadcast(b"everyone") == 1
            assert client.request(b"x") == b"x"
            assert got_push.wait(5)
            assert pushed == [b"just you", b"everyone"]


def test_events_get_no_reply(sock_path, server_process):
    peer = RawPeer(sock_path)
    peer.send(raw_frame(b"event", msg_type=3, request_id=5))
    peer.send(raw_frame(b"bad crc event", msg_type=3, request_id=6, checksum=1))
    peer.send(raw_frame(b"echo:req", msg_type=1, request_id=7))
    frame = peer.next_frame()
    assert (frame.type, frame.request_id, frame.payload) == (2, 7, b"req")
    peer.close()


def test_hello_is_exchanged(client, sock_path):
    client.request(b"echo:x")
    assert isinstance(client.peer_hello, hintens.Hello)
    assert client.peer_hello.max_payload == hintens.DEFAULT_MAX_PAYLOAD_BYTES


def test_peer_without_hello_gets_inline_frames(sock_path, server_process):
    peer = RawPeer(sock_path)
    hello = peer.next_frame(skip_hello=False)
    assert (hello.type, hello.request_id) == (3, 0)
    assert hintens.Hello.decode(hello.payload) is not None
    payload = os.urandom(200_000)
    peer.send(raw_frame(b"echo:" + payload, request_id=9))
    frame = peer.next_frame()
    assert (frame.type, frame.flags, frame.request_id, frame.payload) == (2, 0, 9, payload)
    peer.close()


def test_unknown_hello_is_ignored(sock_path, server_process):
    peer = RawPeer(sock_path)
    peer.send(raw_frame(b"not a hello at all", msg_type=3, request_id=0))
    unknown_keys = hintens.Hello(entries={999: b"future"}).encode()
    peer.send(raw_frame(unknown_keys, msg_type=3, request_id=0))
    peer.send(raw_frame(b"echo:ok", request_id=1))
    assert peer.next_frame().payload == b"ok"
    peer.close()


def test_hello_round_trip_and_malformed():
    hello = hintens.Hello(minor=3, features=1, max_payload=1234, entries={77: b"x"})
    decoded = hintens.Hello.decode(hello.encode())
    assert (decoded.minor, decoded.features, decoded.max_payload) == (3, 1, 1234)
    assert decoded.entries[77] == b"x"
    encoded = hello.encode()
    for broken in (encoded[:-1], encoded + b"!", b"HELO", b"HELX" + encoded[4:],
                   b"HELO" + (10**6).to_bytes(8, "little")):
        assert hintens.Hello.decode(broken) is None, broken
    empty = hintens.Hello.decode(b"HELO" + bytes(8))     # no entries: a silent peer's values
    assert (empty.minor, empty.features, empty.max_payload) == (0, 0, hintens.DEFAULT_MAX_PAYLOAD_BYTES)


# Protocol errors on the server ------------------------------------------------------------

def test_bad_crc_answers_checksum_and_stays_usable(sock_path, server_process):
    peer = RawPeer(sock_path)
    peer.send(raw_frame(b"echo:x", request_id=11, checksum=0x1234))
    assert peer.next_error()[:2] == (11, ErrorCode.CHECKSUM)
    peer.send(raw_frame(b"echo:y", request_id=12))
    assert peer.next_frame().payload == b"y"
    peer.close()


@pytest.mark.parametrize("flags, code", [
    (0x0004, ErrorCode.UNSUPPORTED_FLAGS), (0x8000, ErrorCode.UNSUPPORTED_FLAGS),
    (0x0002, ErrorCode.UNSUPPORTED_FLAGS),   # COMPRESSED, defined but not negotiated
    (0x0001, ErrorCode.SHM_ERROR),           # SHM, defined but not negotiated
])
def test_unsupported_flags_answered_and_stays_usable(sock_path, server_process, flags, code):
    peer = RawPeer(sock_path)
    peer.send(raw_frame(b"echo:x", request_id=13, flags=flags))
    assert peer.next_error()[:2] == (13, code)
    peer.send(raw_frame(b"echo:y", request_id=14))
    assert peer.next_frame().payload == b"y"
    peer.close()


@pytest.mark.parametrize("frame", [
    raw_frame(b"x", magic=0x1234),
    raw_frame(b"x", version=0x0200),
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
])
def test_bad_header_answers_then_closes(sock_path, server_process, frame):
    peer = RawPeer(sock_path)
    peer.send(frame)
    request_id, code, message = peer.next_error()
    assert (request_id, code) == (0, ErrorCode.BAD_HEADER) and message
    assert peer.at_eof()
    peer.close()
    with hintens.Client(sock_path) as other:   # the server itself is fine
        assert other.request(b"echo:ok") == b"ok"


def test_minor_versions_are_accepted(sock_path, server_process):
    peer = RawPeer(sock_path)
    peer.send(raw_frame(b"echo:minor", version=0x0109, request_id=3))
    assert peer.next_frame().payload == b"minor"
    peer.close()


def test_too_large_is_refused_before_the_payload(sock_path):
    with hintens.Server(sock_path, max_payload=1024).start():
        peer = RawPeer(sock_path)
        peer.send(raw_frame(length=10_000_000, request_id=21)[:24])   # header only
        assert peer.next_error()[:2] == (21, ErrorCode.TOO_LARGE)
        assert peer.at_eof()
        peer.close()


def test_unsolicited_response_is_ignored(sock_path, server_process):
    peer = RawPeer(sock_path)
    peer.send(raw_frame(b"stray", msg_type=2, request_id=99))
    peer.send(raw_frame(b"echo:after", request_id=100))
    assert peer.next_frame().payload == b"after"
    peer.close()


# Slow, stalled and vanishing clients -----------------------------------------------------

def test_stalled_client_does_not_delay_others(sock_path):
    # The staller's frame deadline is a minute: a server that waited on it would stall the
    # others for that long, far beyond the bound below, however loaded the machine.
    with hintens.Server(sock_path, frame_timeout=60).start():
        staller = RawPeer(sock_path)
        staller.send(raw_frame(b"echo:never finished", request_id=1)[:12])  # half a header
        with hintens.Client(sock_path, timeout=10) as client:
            started = time.monotonic()
            for _ in range(50):
                assert client.request(b"fast") == b"fast"
            assert time.monotonic() - started < 10
        staller.close()


def test_stalled_client_is_cut_at_the_frame_deadline(sock_path):
    with hintens.Server(sock_path, frame_timeout=0.5).start():
        staller = RawPeer(sock_path)
        staller.send(raw_frame(b"echo:never finished", request_id=1)[:12])  # half a header
        started = time.monotonic()
        assert staller.at_eof()
        assert 0.4 < time.monotonic() - started < 5
        staller.close()


def test_slow_drip_is_cut_at_the_frame_deadline(sock_path):
    with hintens.Server(sock_path, frame_timeout=0.6).start():
        peer = RawPeer(sock_path)
        frame = raw_frame(b"echo:" + bytes(100), request_id=1)
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in frame:        # a byte every 0.1 s: never idle, never finished
                peer.send(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - started > 3:
                    break
        assert time.monotonic() - started < 2.5
        peer.close()


def test_after_a_frame_in_pieces_the_idle_timeout_is_back(sock_path):
    # While a frame is open the socket waits with frame_timeout; once it is whole, waiting is
    # idle again (idle_timeout: none here), however long the client then stays quiet.
    with hintens.Server(sock_path, frame_timeout=0.3).start():
        peer = RawPeer(sock_path, timeout=10)
        frame = raw_frame(b"in pieces", request_id=1)
        peer.send(frame[:10])
        time.sleep(0.05)
        peer.send(frame[10:])
        reply = peer.next_frame()
        assert (reply.request_id, bytes(reply.payload)) == (1, b"in pieces")
        time.sleep(1.0)                  # more than frame_timeout, with no frame open
        peer.send(raw_frame(b"still here", request_id=2))
        reply = peer.next_frame()
        assert (reply.request_id, bytes(reply.payload)) == (2, b"still here")
        peer.close()


def test_idle_timeout(sock_path):
    with hintens.Server(sock_path, idle_timeout=0.3).start():
        peer = RawPeer(sock_path)
        started = time.monotonic()
        assert peer.at_eof()
        assert 0.2 < time.monotonic() - started < 3
        peer.close()


def test_abrupt_disconnect_mid_frame(sock_path, server_process):
    for cut in (5, 24, 30):
        peer = RawPeer(sock_path)
        peer.send(raw_frame(b"echo:" + bytes(100), request_id=1)[:cut])
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        peer.close()   # RST with data in flight
    with hintens.Client(sock_path) as client:
        assert client.request(b"echo:alive") == b"alive"
    assert server_process.poll() is None


def test_connect_burst(sock_path, server_process):
    clients = []

    def connect_and_ask(n):
        c = hintens.Client(sock_path, connect_timeout=20, timeout=20)
        clients.append(c)
        assert c.request(b"echo:%d" % n) == b"%d" % n

    errors = in_threads(connect_and_ask, 300, timeout_s=60)
    for c in clients:
        c.close()
    assert errors == [] and len(clients) == 300


# Socket file, permissions, path length --------------------------------------------------

def test_socket_mode_default_and_configurable(tmp_path):
    path = str(tmp_path / "a.sock")
    with hintens.Server(path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    path = str(tmp_path / "b.sock")
    with hintens.Server(path, mode=0o660):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_stale_socket_replaced_live_one_refused(sock_path, tmp_path):
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock_path)
    dead.close()                       # the file stays: a server that died
    with hintens.Server(sock_path).start():
        with pytest.raises(hintens.ServerRunningError, match="another server"):
            hintens.Server(sock_path)
        with hintens.Client(sock_path) as client:
            assert client.request(b"ok") == b"ok"
    not_a_socket = tmp_path / "plain"
    not_a_socket.write_text("keep me")
    with pytest.raises(hintens.SocketPathError, match="not a socket"):
        hintens.Server(str(not_a_socket))
    assert not_a_socket.read_text() == "keep me"


def test_socket_file_removed_on_close(sock_path):
    server = hintens.Server(sock_path).start()
    assert os.path.exists(sock_path)
    server.close()
    assert not os.path.exists(sock_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_server_removes_socket_on_signal(sock_path, sig):
    process = start_server(sock_path)
    process.send_signal(sig)
    assert process.wait(10) == 0
    process.log.close()
    assert not os.path.exists(sock_path)


def test_a_shutdown_before_serve_forever_makes_it_drain_at_once(sock_path):
    # The CLI's signal handler may run between Server() and serve_forever(): serving must
    # then stop at once, removing the socket file, not refuse to run.
    server = hintens.Server(sock_path)
    server.shutdown()
    started = time.monotonic()
    server.serve_forever()
    assert time.monotonic() - started < 5
    assert not os.path.exists(sock_path)
    with pytest.raises(RuntimeError, match="already serving or closed"):
        server.serve_forever()


def test_serve_forever_after_close_is_an_error(sock_path):
    server = hintens.Server(sock_path)
    server.close()
    with pytest.raises(RuntimeError, match="already serving or closed"):
        server.serve_forever()


def test_path_too_long(tmp_path):
    long_path = "/tmp/" + "x" * 120
    for make in (lambda: hintens.Server(long_path), lambda: hintens.Client(long_path)):
        with pytest.raises(hintens.SocketPathError, match="107"):
            make()


def test_default_path_and_env(monkeypatch, sock_path):
    from hintens.transport.unix import default_socket_path, socket_path
    monkeypatch.delenv("HINTENS_SOCKET", raising=False)
    assert socket_path(None) == default_socket_path()
    monkeypatch.setenv("HINTENS_SOCKET", sock_path)
    assert socket_path(None) == sock_path


def test_missing_server_is_a_clear_connect_error(sock_path):
    with pytest.raises(hintens.ConnectError, match="does not exist"):
        hintens.Client(sock_path)


def _connect_as_nobody(path):
    """A forked process switches to uid/gid 65534, connects, and reports what happened.

    The server runs in its own process, so this test process has no threads to fork with
    (once the flusher thread of earlier tests' Events has ended, a second after its last work).
    """
    wait_for_lone_thread()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = b"error"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with hintens.Client(path, timeout=5) as client:
                outcome = b"served:" + client.request(b"echo:x")
        except hintens.ConnectionClosed as error:
            outcome = b"refused" if "may not connect" in str(error) else b"closed"
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            outcome = repr(error).encode()
        finally:
            os.write(write_end, outcome)
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
@pytest.mark.parametrize("allow, expected", [
    ((), "refused"), (("--allow-uid", "65534"), "served:x"), (("--allow-gid", "65534"), "served:x"),
])
def test_other_users_are_refused_unless_allowed(allow, expected):
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        os.chmod(directory, 0o777)
        path = os.path.join(directory, "perm.sock")
        # Mode 666 lets them reach the socket; SO_PEERCRED is what must stop them.
        process = start_server(path, "--mode", "666", *allow)
        try:
            assert _connect_as_nobody(path) == expected
        finally:
            stop_server(process)


# Graceful shutdown ------------------------------------------------------------------------

def test_in_flight_requests_are_answered_on_close(sock_path):
    def slow(payload):
        time.sleep(0.2)
        return payload

    server = hintens.Server(sock_path, slow).start()
    client = hintens.Client(sock_path, timeout=10)
    results = []
    # At 0.1 s all five are written and the first is being handled; then the server closes.
    closer = threading.Timer(0.1, server.close, kwargs={"timeout": 5})
    closer.start()
    errors = in_threads(lambda i: results.append(client.request(b"%d" % i)), 5, timeout_s=10)
    closer.join()
    assert errors == [] and sorted(map(bytes, results)) == [b"%d" % i for i in range(5)]
    with pytest.raises(hintens.ConnectionClosed):
        client.request(b"after close")
    client.close()
    assert not os.path.exists(sock_path)


# The shape of a reply, and a server in a ``with`` block ------------------------------------

@pytest.mark.parametrize("shm", [True, False])
@pytest.mark.parametrize("size", [5, 1 << 20])
def test_every_reply_is_a_memoryview_that_with_releases(sock_path, shm, size):
    """Inline or through shared memory, with or without shm, on either core: one shape, so
    ``with reply:`` never raises TypeError and code written against small replies holds for
    large ones."""
    with hintens.Server(sock_path, lambda payload: payload):
        with hintens.Client(sock_path, shm=shm) as client:
            with client.request(b"x" * size) as reply:
                assert type(reply) is memoryview and reply == b"x" * size
            with pytest.raises(ValueError, match="released"):
                len(reply)
            more = client.request_many([b"a", b"b" * size])
            assert [type(r) for r in more] == [memoryview, memoryview]
            assert more == [b"a", b"b" * size]
            for r in more:
                r.release()


def test_a_codec_still_gets_values_not_views(sock_path):
    with hintens.Server(sock_path, lambda payload: payload):
        with hintens.Client(sock_path, codec="json") as client:
            assert client.request({"a": [1, 2]}) == {"a": [1, 2]}


def test_with_server_serves_without_start(sock_path):
    """``with Server(...)`` starts serving (a background thread); ``start()`` inside the
    block, or before it, changes nothing; ``serve_forever()`` inside it waits for close."""
    with hintens.Server(sock_path, lambda payload: bytes(payload).upper()) as server:
        assert server.start() is server
        with hintens.Client(sock_path, timeout=5) as client:
            assert client.request(b"hi") == b"HI"
        waiter = threading.Thread(target=server.serve_forever)
        waiter.start()
        time.sleep(0.05)
        assert waiter.is_alive()
        server.close()
        waiter.join(5)
        assert not waiter.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        server.start()
    with hintens.Server(sock_path, lambda payload: payload).start() as again:
        with hintens.Client(sock_path, timeout=5) as client:
            assert client.request(b"ok") == b"ok"


def _no_hello_echo(listener):
    """Serve one connection as a minimal server (sections 1-7: no hello): echo Requests."""
    from hintens import _python_core as core

    conn, _ = listener.accept()
    with conn:
        decoder = core.FrameDecoder()
        while True:
            data = conn.recv(1 << 20)
            if not data:
                return
            for frame in decoder.feed(data):
                if frame.type == 1:   # the client's hello (an Event) goes unanswered
                    conn.sendall(core.encode_frame(2, frame.payload, frame.request_id))


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_a_server_that_sends_no_hello_is_waited_for_once_per_connection(sock_path, kind):
    """A minimal server (no hello) answers large requests inline. The client waits for its
    hello at most until 1 s after connecting (HELLO_WAIT_S), not on every large send: six
    100 KB requests take about 1 s in all, where a wait per send took 6."""
    import asyncio

    import hintens.aio

    listener = raw_listener(sock_path)
    big = os.urandom(100_000)
    server = threading.Thread(target=_no_hello_echo, args=(listener,), daemon=True)
    server.start()

    def sync_run():
        with hintens.Client(sock_path, timeout=30) as client:
            started = time.monotonic()
            for _ in range(6):
                assert client.request(big) == big
            assert client.stats["shm_bytes_sent"] == 0   # inline: nothing was negotiated
            return time.monotonic() - started

    async def aio_run():
        async with hintens.aio.Client(sock_path, timeout=30, shm=False) as client:
            started = time.monotonic()
            for _ in range(6):
                assert await client.request(big) == big
            return time.monotonic() - started

    try:
        elapsed = sync_run() if kind == "sync" else asyncio.run(aio_run())
        assert elapsed < 4.0, f"six large requests took {elapsed:.1f} s: a wait per send"
    finally:
        server.join(10)
        listener.close()


def test_a_client_idle_past_the_hello_wait_still_takes_the_hello(sock_path):
    """A client without ``on_event`` reads only when it waits for something, so the
    server's hello sits unread while it is idle. Past the hello wait (1 s after connecting)
    a large send still reads what is there first: the payload goes through shared memory,
    not inline (where this server's 1 MiB limit would refuse it), and ``allocate`` works."""
    big = os.urandom(4 << 20)
    with hintens.Server(sock_path, lambda payload: payload, max_payload=1 << 20):
        with hintens.Client(sock_path, timeout=10) as client:
            time.sleep(1.5)
            assert client.request(big) == big
            assert client.stats["shm_bytes_sent"] == len(big)
        with hintens.Client(sock_path, timeout=10) as client:
            time.sleep(1.5)
            buffer = client.allocate(1 << 20)
            buffer[:5] = b"hello"
            assert bytes(client.request(buffer)[:5]) == b"hello"
