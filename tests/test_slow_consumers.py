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
