"""One slow subscriber must not slow the others: each connection has its own bounded outgoing
queue, pushes never wait for a client, and a client that falls behind is cut (or its Events
dropped), with a logged reason and a counter. Large pushes go through shared memory."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

import hintens

from .peers import RawPeer, raw_listener, wait_until

MIB = 1 << 20
CYTHON = hintens.implementation == "cython"


class Reader(threading.Thread):
    """A subscriber on a raw socket that reads (and decodes) as fast as it can."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.peer = RawPeer(path, timeout=60)
        self.payloads = []
        self.start()

    def run(self):
        while True:
            try:
                frame = self.peer.next_frame()
            except OSError:
                return
            if frame is None:
                return
            if frame.type == 3:
                self.payloads.append(bytes(frame.payload))


def stalled(path):
    """A subscriber that never reads, with the smallest receive buffer: full at once."""
    peer = RawPeer(path)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return peer


@pytest.mark.parametrize("policy", ["cut", "drop"])
def test_a_stalled_subscriber_does_not_hold_up_a_broadcast(sock_path, policy, caplog):
    count = 100_000
    with hintens.Server(sock_path, send_timeout=60, send_queue_bytes=256 * 1024,
                        slow_consumer=policy).start() as server:
        fast = Reader(sock_path)
        slow = stalled(sock_path)
        assert wait_until(lambda: len(server.connections) == 2)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="hintens"):
            for n in range(count):
                server.broadcast(b"%d" % n)
            elapsed = time.monotonic() - started
        # Blocking on the stalled one would take send_timeout (60 s) per full write.
        assert elapsed < 30
        assert wait_until(lambda: len(fast.payloads) == count, timeout_s=60)
        assert fast.payloads == [b"%d" % n for n in range(count)]   # all, in order
        if policy == "cut":
            assert server.stats["slow_consumers_cut"] == 1
            assert "outgoing queue is full" in caplog.text
            # The stalled one learns it: its stream ends after what it had been sent.
            slow.sock.settimeout(10)
            frames = 0
            while (frame := slow.next_frame()) is not None:
                frames += 1
            assert 0 < frames < count
        else:
            assert server.stats["slow_consumers_cut"] == 0
            assert server.stats["events_dropped"] > 0
            assert "dropping Events" in caplog.text
            dropped = [c.events_dropped for c in server.connections]
            assert sorted(dropped)[0] == 0 and sorted(dropped)[1] > 0
        slow.close()
        fast.peer.close()


def test_a_slow_reader_gets_its_events_at_its_own_pace_and_in_order(sock_path):
    got, fast_got = [], []

    def slow_event(payload):
        time.sleep(0.001)
        got.append(bytes(payload))

    with hintens.Server(sock_path, send_queue_bytes=64 * MIB).start() as server:
        with hintens.Client(sock_path, on_event=slow_event) as slow, \
                hintens.Client(sock_path, on_event=lambda p: fast_got.append(bytes(p))) as fast:
            slow.request(b"x")
            fast.request(b"x")
            for n in range(3000):
                server.broadcast(b"%d" % n)
            assert wait_until(lambda: len(fast_got) == 3000, timeout_s=30)
            assert len(got) < 3000                       # the slow one is still behind...
            assert wait_until(lambda: len(got) == 3000, timeout_s=60)   # ...and catches up
            assert got == fast_got == [b"%d" % n for n in range(3000)]


def test_a_subscriber_that_reads_nothing_is_cut_after_send_timeout(sock_path, caplog):
    with hintens.Server(sock_path, send_timeout=0.5).start() as server:
        peer = stalled(sock_path)
        assert wait_until(lambda: len(server.connections) == 1)
        (connection,) = server.connections
        with caplog.at_level(logging.WARNING, logger="hintens"):
            for n in range(2000):            # more than the socket takes, under the queue bound
                connection.send_event(bytes(1000))
            assert wait_until(lambda: not server.connections, timeout_s=10)
        assert server.stats["slow_consumers_cut"] == 1
        assert "read nothing for 0.5 s" in caplog.text
        peer.close()


def test_a_client_whose_server_reads_nothing_is_cut_after_its_timeout(sock_path):
    listener = raw_listener(sock_path)   # a server that accepts, then reads nothing
    try:
        with hintens.Client(sock_path, timeout=0.5, flush_interval=0.001) as client:
            conn, _ = listener.accept()                  # accepted, never read
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with pytest.raises((hintens.ConnectionClosed, hintens.Timeout)):
                for _ in range(100_000):
                    client.send_event(bytes(100))
            assert wait_until(lambda: client.closed, timeout_s=10)
            with pytest.raises(hintens.ConnectionClosed):
                client.request(b"x")
            conn.close()
    finally:
        listener.close()


def test_queued_events_on_a_full_socket_are_cut_by_the_flusher(sock_path):
    # Events that keep arriving within the flush interval wait for the flusher, which writes
    # them without blocking; toward a server that stopped reading, it gives up after the
    # client's timeout instead of trying for ever.
    listener = raw_listener(sock_path)   # a server that accepts, then reads nothing
    try:
        with hintens.Client(sock_path, timeout=0.5, flush_interval=0.05) as client:
            conn, _ = listener.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # full soon
            deadline = time.monotonic() + 20
            with pytest.raises(hintens.ConnectionClosed, match="read nothing for 0.5 s"):
                # 50 KB/s: the queue stays under the 64 KiB at which a sender writes itself
                # for longer than the flusher's 0.5 s.
                while time.monotonic() < deadline:
                    client.send_event(bytes(500))
                    time.sleep(0.01)
            assert "read nothing" in client._channel.aborted
            conn.close()
    finally:
        listener.close()


# Large pushes ---------------------------------------------------------------------------------

def test_large_broadcasts_and_events_go_through_shared_memory(sock_path):
    received = []
    with hintens.Server(sock_path).start() as server:
        with hintens.Client(sock_path, on_event=lambda p: received.append(
                (type(p).__name__, len(p), bytes(p[:1])))) as client:
            client.request(b"x")
            assert server.broadcast(b"b" * (2 * MIB)) == 1
            (connection,) = server.connections
            assert connection.send_event(b"e" * MIB) is True
            assert wait_until(lambda: len(received) == 2)
            assert connection._endpoint.pool._segments        # the server lent segments
    kind = "memoryview" if CYTHON else "bytes"
    assert received == [(kind, 2 * MIB, b"b"), (kind, MIB, b"e")]


def test_a_push_too_large_for_a_client_without_shm_skips_it(sock_path, caplog):
    got_shm, got_plain = [], []
    with hintens.Server(sock_path).start() as server:
        with hintens.Client(sock_path, on_event=lambda p: got_shm.append(len(p))) as a, \
                hintens.Client(sock_path, shm=False, max_payload=MIB,
                               on_event=lambda p: got_plain.append(len(p))) as b:
            a.request(b"x")
            b.request(b"x")
            with caplog.at_level(logging.WARNING, logger="hintens"):
                assert server.broadcast(bytes(2 * MIB)) == 1
            assert "broadcast skipped" in caplog.text
            assert server.broadcast(b"small") == 2
            assert wait_until(lambda: got_shm == [2 * MIB, 5] and got_plain == [5])
            assert b.request(b"still") == b"still"


@pytest.mark.parametrize("value, error", [("block", ValueError), (None, ValueError)])
def test_slow_consumer_policy_is_checked(sock_path, value, error):
    with pytest.raises(error, match="slow_consumer"):
        hintens.Server(sock_path, slow_consumer=value)


def test_a_slow_but_steady_reader_is_not_cut(sock_path):
    # A Unix socket says "writable" only once most of its buffer drained: a reader slower
    # than that per send_timeout still reads, and must not be taken for one that stopped.
    with hintens.Server(sock_path, send_timeout=1.0).start() as server:
        peer = RawPeer(sock_path)
        assert wait_until(lambda: len(server.connections) == 1)
        (connection,) = server.connections
        for _ in range(100):                    # 400 KB: the socket fills, the rest queues
            connection.send_event(b"e" * 4000)
        peer.sock.settimeout(2)
        started, got = time.monotonic(), 0
        while time.monotonic() - started < 3.5:
            data = peer.sock.recv(4096)         # ~40 KB/s, never stopping
            assert data, "the server cut a client that was reading"
            got += len(data)
            time.sleep(0.1)
        assert server.stats["slow_consumers_cut"] == 0 and len(server.connections) == 1
        peer.close()


@pytest.mark.skipif(not CYTHON, reason="the pure-Python core copies: no lent view is held")
def test_a_client_holding_its_lent_events_gets_the_next_ones_inline(sock_path):
    kept = []
    with hintens.Server(sock_path).start() as server:
        with hintens.Client(sock_path, on_event=kept.append, shm_receive_segments=4) as client:
            client.request(b"x")
            for n in range(7):                  # 4 segments lent and held, then inline
                assert server.broadcast(bytes([n]) * 100_000) == 1
            assert wait_until(lambda: len(kept) == 7)
            assert [bytes(p[:1]) for p in kept] == [bytes([n]) for n in range(7)]
            assert [type(p).__name__ for p in kept] == ["memoryview"] * 4 + ["bytes"] * 3
            assert server.stats["slow_consumers_cut"] == 0 and not client.closed
            for view in kept[:4]:
                view.release()


def test_send_queue_bytes_covers_what_batching_holds(sock_path):
    with pytest.raises(ValueError, match="send_queue_bytes"):
        hintens.Server(sock_path, send_queue_bytes=8192)
    with hintens.Server(sock_path, send_queue_bytes=128 * 1024).start() as server:
        got = []
        with hintens.Client(sock_path, on_event=got.append) as client:
            client.request(b"x")
            for _ in range(100):
                server.broadcast(b"e" * 200)    # held for batching, never "falling behind"
            assert wait_until(lambda: len(got) == 100)
            stats = server.stats
            assert (stats["slow_consumers_cut"], stats["events_dropped"],
                    stats["connections_refused"], stats["events_sent"]) == (0, 0, 0, 100)


def test_a_client_that_leaves_a_reply_unread_past_send_timeout_is_cut_cleanly(sock_path):
    # The reply's write times out with nothing of it taken: the connection ends, and what the
    # client reads afterwards is whole frames, then the end (never bytes out of place).
    with hintens.Server(sock_path, lambda p: b"B" * 20_000, send_timeout=0.5).start() as server:
        peer = RawPeer(sock_path)
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            for n in range(1, 200):             # replies pile up unread; the server stalls
                peer.send(hintens.wire.encode_frame(1, b"r", n))
        except (BrokenPipeError, ConnectionResetError):
            pass                                # cut while we were still sending
        assert wait_until(lambda: not server.connections, timeout_s=10)
        peer.sock.settimeout(5)
        frames = 0
        try:
            while (frame := peer.next_frame()) is not None:   # whole frames, to the end
                assert (frame.type, len(frame.payload)) == (2, 20_000)
                frames += 1
        except ConnectionResetError:   # the end, as a Unix socket reports it when our
            pass                       # requests were left unread there
        assert frames < 199
        with hintens.Client(sock_path) as other:
            assert len(other.request(b"x")) == 20_000
        peer.close()
