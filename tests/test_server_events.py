"""A sync server delivers Events inside its read loop (the core's serve), between the
Requests around them: stream order holds, a raising ``on_event`` is logged and the
connection serves on, a codec decodes them first. Over the socket and over the ring."""

from __future__ import annotations

import json
import logging
import threading

import pytest

import hintens

from .peers import (
    RawPeer,
    open_fds,
    raw_frame,
    server_log,
    settled_fds,
    start_server,
    status_kib,
    stop_server,
    wait_until,
)
from .test_ring import needs_ring


def recording_server(sock_path, seen, codec=None, fail_on=None, ring=False):
    """A server that notes each Request (``("req", value)``) and Event (``("ev", value)``)
    in ``seen``, in the order it handles them; an Event equal to ``fail_on`` raises."""
    def handler(value):
        seen.append(("req", value if codec else bytes(value)))
        return value

    def on_event(value, connection):
        value = value if codec else bytes(value)
        seen.append(("ev", value))
        if value == fail_on:
            raise ValueError("this event is bad")

    return hintens.Server(sock_path, handler, on_event=on_event, codec=codec,
                          ring=ring).start()


def test_events_and_requests_in_one_write_are_served_in_stream_order(sock_path):
    seen = []
    frames = [(3, b"e1", 101), (1, b"r1", 1), (3, b"e2", 102), (3, b"e3", 103),
              (1, b"r2", 2), (3, b"e4", 104), (1, b"r3", 3)]
    with recording_server(sock_path, seen):
        peer = RawPeer(sock_path)
        peer.send(b"".join(raw_frame(p, msg_type=t, request_id=i) for t, p, i in frames))
        replies = [peer.next_frame() for _ in range(3)]
        assert [(f.type, f.request_id, bytes(f.payload)) for f in replies] == [
            (2, 1, b"r1"), (2, 2, b"r2"), (2, 3, b"r3")]
        peer.close()
    assert seen == [("ev" if t == 3 else "req", p) for t, p, _ in frames]


def test_an_on_event_that_raises_is_logged_and_the_connection_serves_on(sock_path, caplog):
    seen = []
    with caplog.at_level(logging.ERROR, logger="hintens"):
        with recording_server(sock_path, seen, fail_on=b"bad"):
            peer = RawPeer(sock_path)
            peer.send(raw_frame(b"e1", msg_type=3, request_id=7)
                      + raw_frame(b"bad", msg_type=3, request_id=8)
                      + raw_frame(b"e2", msg_type=3, request_id=9)
                      + raw_frame(b"r1", request_id=1))
            reply = peer.next_frame()
            assert (reply.type, reply.request_id, bytes(reply.payload)) == (2, 1, b"r1")
            peer.close()
    assert seen == [("ev", b"e1"), ("ev", b"bad"), ("ev", b"e2"), ("req", b"r1")]
    failures = [r for r in caplog.records if r.getMessage() == "on_event callback raised"]
    assert len(failures) == 1 and isinstance(failures[0].exc_info[1], ValueError), \
        caplog.records


def test_a_codec_decodes_events_before_on_event_sees_them(sock_path, caplog):
    seen = []
    with caplog.at_level(logging.ERROR, logger="hintens"):
        with recording_server(sock_path, seen, codec="json"):
            peer = RawPeer(sock_path)
            peer.send(raw_frame(json.dumps({"n": 1}).encode(), msg_type=3, request_id=5)
                      + raw_frame(b"{not json", msg_type=3, request_id=6)
                      + raw_frame(json.dumps([2]).encode(), request_id=1))
            reply = peer.next_frame()
            assert (reply.request_id, json.loads(bytes(reply.payload))) == (1, [2])
            peer.close()
    # The Event that does not decode is logged as on_event's failure, and skipped.
    assert seen == [("ev", {"n": 1}), ("req", [2])]
    assert [r.getMessage() for r in caplog.records] == ["on_event callback raised"]


@pytest.mark.parametrize("ring", [False, pytest.param(True, marks=needs_ring)])
def test_a_client_s_events_and_requests_keep_their_order(sock_path, ring):
    seen = []
    expected = []
    with recording_server(sock_path, seen, ring=ring):
        with hintens.Client(sock_path, ring=ring) as client:
            for round_ in range(200):
                for k in range(round_ % 7):
                    payload = b"e%d.%d" % (round_, k)
                    client.send_event(payload)
                    expected.append(("ev", payload))
                payload = b"r%d" % round_
                assert bytes(client.request(payload)) == payload
                expected.append(("req", payload))
            if ring:
                assert client.ring_active
    assert seen == expected


def test_events_from_many_clients_all_arrive(sock_path):
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def on_event(payload, connection):
        with lock:
            counts[id(connection)] = counts.get(id(connection), 0) + 1

    with hintens.Server(sock_path, on_event=on_event).start():
        clients = [hintens.Client(sock_path) for _ in range(4)]
        try:
            for client in clients:
                for _ in range(5000):
                    client.send_event(b"x" * 100)
            for client in clients:
                client.flush()
                assert bytes(client.request(b"sync")) == b"sync"
        finally:
            for client in clients:
                client.close()
    assert sorted(counts.values()) == [5000] * 4


def test_a_slow_on_event_does_not_hold_back_the_replies_before_it(sock_path):
    # [R1, E1, R2] in one write: R1's reply leaves before on_event runs, and on_event
    # blocks until the test has read it; R2 is answered once on_event returns.
    release = threading.Event()
    seen = []

    def on_event(payload, connection):
        seen.append(bytes(payload))
        assert release.wait(10)

    with hintens.Server(sock_path, on_event=on_event).start():
        peer = RawPeer(sock_path)
        peer.send(raw_frame(b"r1", request_id=1) + raw_frame(b"e1", msg_type=3, request_id=2)
                  + raw_frame(b"r2", request_id=3))
        first = peer.next_frame()
        assert (first.request_id, bytes(first.payload)) == (1, b"r1")
        release.set()
        second = peer.next_frame()
        assert (second.request_id, bytes(second.payload)) == (3, b"r2")
        peer.close()
    assert seen == [b"e1"]


def test_a_peer_whose_every_event_makes_on_event_raise_leaves_nothing_behind(sock_path):
    # A hostile raw peer: large inline Events (8 MiB, no shared memory) and floods of small
    # ones, every one of which makes the server's on_event raise, with Requests between.
    # Each failure is logged once; the connection and the server serve on; descriptors and
    # resident memory come back to where they were.
    process = start_server(sock_path, "--on-event", "tests.handlers:refuse_event")
    try:
        fds = settled_fds(sock_path, process.pid)
        rss = status_kib("VmRSS", process.pid)
        peer = RawPeer(sock_path, timeout=30)
        sent = 0
        for round_ in range(4):
            burst = [raw_frame(bytes(8 << 20), msg_type=3, request_id=1)]
            burst += [raw_frame(b"e" * 100, msg_type=3, request_id=2 + i) for i in range(500)]
            burst.append(raw_frame(b"echo:%d" % round_, request_id=10_000 + round_))
            peer.send(b"".join(burst))
            sent += 501
            reply = peer.next_frame()
            assert (reply.type, reply.request_id, bytes(reply.payload)) == \
                (2, 10_000 + round_, b"%d" % round_)
        peer.close()
        with hintens.Client(sock_path) as client:
            assert bytes(client.request(b"echo:still")) == b"still"
        assert wait_until(lambda: open_fds(process.pid) <= fds), (open_fds(process.pid), fds)
        assert status_kib("VmRSS", process.pid) - rss < 32 * 1024
        assert server_log(process).count("on_event callback raised") == sent
    finally:
        stop_server(process)
