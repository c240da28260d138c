"""A hostile raw-socket peer cannot crash, hang, or make the asyncio server leak.

Each test starts a ``hintens.aio.Server`` in its own process (``start_aio_server_with``), takes
the server's descriptor count and resident memory once it is warm, attacks it with hand-made
frames, then checks that it still serves a normal client and that its descriptors and memory
come back near that baseline. At the end of each test the server is closed gracefully
(SIGTERM) and its log must hold no traceback and no "Task exception was never retrieved".

The worst values mirror the tests of the sync server: test_peer_limits.py, test_exhaustion.py,
test_slow_consumers.py, test_shm_limits.py and test_client_server.py.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

import hintens
import hintens.aio
from hintens import ErrorCode
from hintens.protocol import shm as _shm
from hintens.protocol.endpoint import FEATURE_SHM, Hello

from .peers import (
    HEADER,
    RawPeer,
    ShmPeer,
    fd_table,
    memfd,
    memfd_fds,
    memfd_mappings,
    open_fds,
    raw_frame,
    server_log,
    settled_fds,
    start_aio_server_with,
    status_kib,
    wait_until,
)

KIB = 1 << 10
MIB = 1 << 20
TIB = 1 << 40
SEALED = fcntl.F_SEAL_SHRINK
RSS_SLACK_KIB = 64 * 1024


# A handler for the concurrency test, imported by the server process -----------------------

_RUNNING = 0
_PEAK = 0


async def gauge(payload):
    """``hold:S`` awaits S seconds and answers how many ``hold`` requests ran at once when it
    started (itself included); ``peak:`` the most that ever ran at once; else ``command``."""
    global _RUNNING, _PEAK
    data = bytes(payload)
    if data.startswith(b"hold:"):
        _RUNNING += 1
        _PEAK = max(_PEAK, _RUNNING)
        running = _RUNNING
        try:
            await asyncio.sleep(float(data[5:]))
        finally:
            _RUNNING -= 1
        return b"%d" % running
    if data == b"peak:":
        return b"%d" % _PEAK
    from .handlers import command
    return command(payload)


# The server, its baseline, and its log ------------------------------------------------------

class AioServer:
    """An aio server process and what it looked like before the attack."""

    def __init__(self, path, **options):
        options.setdefault("handler", "tests.handlers:async_command")
        self.path = path
        self.process = start_aio_server_with(path, **options)
        self.pid = self.process.pid
        assert serves(path)            # warm: imports done, first connection served
        self.fds, self.rss = self.baseline()
        self.stopped = False     # the test closed it itself

    def baseline(self):
        """Descriptors and resident memory (KiB) at rest: once the warm-up connection is
        closed on the server's side too (a count that held still for a moment could still
        include it, on a loaded machine), and a served connection came and went."""
        fds = settled_fds(self.path, self.pid)
        self.fd_names = fd_table(self.pid)   # for a failure's message
        return fds, status_kib("VmRSS", self.pid)

    def alive(self):
        return self.process.poll() is None

    def assert_back_to_baseline(self, timeout_s=5.0):
        """Descriptors back to the baseline (every connection's closed, no memfd kept) and
        resident memory within RSS_SLACK_KIB of it."""
        assert self.alive(), server_log(self.process)
        assert wait_until(lambda: open_fds(self.pid) == self.fds, timeout_s=timeout_s), \
            f"{open_fds(self.pid)} descriptors: {fd_table(self.pid)}; {self.fds} before: " \
            f"{self.fd_names}"
        assert memfd_fds(self.pid) == 0
        assert wait_until(lambda: not memfd_mappings(self.pid), timeout_s=timeout_s)
        assert status_kib("VmRSS", self.pid) - self.rss < RSS_SLACK_KIB

    def stop(self):
        """Close it gracefully; returns its log."""
        process = self.process
        if self.stopped:
            return server_log(process)
        self.stopped = True
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError("the aio server did not close on SIGTERM:\n"
                                     + server_log(process))
        return server_log(process)


@pytest.fixture
def aio_server(sock_path):
    """``aio_server(**options)``: an aio server process; at the end of the test it is closed
    with SIGTERM, and must exit 0 with no traceback or lost task exception in its log."""
    started = []

    def start(**options):
        server = AioServer(sock_path, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        crashed = None if server.stopped else server.process.poll()
        text = server.stop()
        server.process.log.close()
        assert crashed is None, f"the server died (exit {crashed}):\n{text}"
        assert server.process.returncode == 0, text
        for bad in ("Traceback", "never retrieved", "was destroyed but it is pending",
                    "could not admit"):
            assert bad not in text, text


def serves(path, payload=b"echo:ok", expected=b"ok"):
    with hintens.Client(path, timeout=10) as client:
        return client.request(payload) == expected


def serves_soon(path, timeout_s=10.0):
    """``serves``, retried while the server refuses (its closed connections not yet seen)."""
    def attempt():
        try:
            return serves(path)
        except hintens.ConnectionClosed:
            return False

    return wait_until(attempt, timeout_s=timeout_s, interval_s=0.05)


def aio_serves(path):
    async def main():
        async with hintens.aio.Client(path, timeout=10) as client:
            return await client.request(b"echo:aio")

    return asyncio.run(asyncio.wait_for(main(), 20)) == b"aio"


def answer(peer, request_id):
    """The Response or Error that answers ``request_id``, and the control Events before it."""
    frames = peer.until(lambda f: f.type in (2, 4) and f.request_id == request_id)
    return frames[-1], peer.controls(frames)


def error_of(frame):
    assert frame is not None and frame.type == 4, frame
    return hintens.wire.decode_error_payload(frame.payload)


def assert_serves(peer, request_id=999):
    peer.send(raw_frame(b"echo:alive", request_id=request_id))
    frame, _ = answer(peer, request_id)
    assert (frame.type, bytes(frame.payload)) == (2, b"alive")


def ends_within(peer, seconds):
    """Read (and drop) what comes until the server ends the stream; True if it does within
    ``seconds``."""
    peer.sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not peer.sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


# 1. Header violations: the spec's error, and the connection kept or closed as sync does ------

@pytest.mark.parametrize("frame, request_id, code", [
    (raw_frame(b"x", magic=0x1234, request_id=3), 0, ErrorCode.BAD_HEADER),
    (raw_frame(b"x", version=0x0200, request_id=3), 0, ErrorCode.BAD_HEADER),
    (raw_frame(b"x", version=0x0001, request_id=3), 0, ErrorCode.BAD_HEADER),
    (raw_frame(b"x", msg_type=5, request_id=4), 4, ErrorCode.BAD_HEADER),
    (raw_frame(b"x", msg_type=0, request_id=4), 4, ErrorCode.BAD_HEADER),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", 0, ErrorCode.BAD_HEADER),
    (b"\x00" * 24, 0, ErrorCode.BAD_HEADER),
], ids=["magic", "major-2", "major-0", "type-5", "type-0", "http", "zeros"])
def test_a_fatal_header_is_answered_then_the_connection_closes(aio_server, frame, request_id,
                                                                code):
    server = aio_server()
    peer = RawPeer(server.path)
    peer.send(frame + raw_frame(b"echo:never", request_id=50))   # not read after it
    got_id, got_code, message = peer.next_error()
    assert (got_id, got_code) == (request_id, code) and message
    assert peer.at_eof()
    peer.close()
    assert serves(server.path)
    server.assert_back_to_baseline()


@pytest.mark.parametrize("frame, code", [
    (raw_frame(b"echo:x", request_id=11, checksum=0x1234), ErrorCode.CHECKSUM),
    (raw_frame(b"", request_id=11, checksum=0), ErrorCode.CHECKSUM),
    (raw_frame(b"echo:x", request_id=11, flags=0x0004), ErrorCode.UNSUPPORTED_FLAGS),
    (raw_frame(b"echo:x", request_id=11, flags=0x8000), ErrorCode.UNSUPPORTED_FLAGS),
    (raw_frame(b"echo:x", request_id=11, flags=0xFFFC), ErrorCode.UNSUPPORTED_FLAGS),
    (raw_frame(b"echo:x", request_id=11, flags=0x0002), ErrorCode.UNSUPPORTED_FLAGS),
    (raw_frame(b"echo:x", request_id=11, flags=0x0001), ErrorCode.SHM_ERROR),
], ids=["crc", "crc-empty", "flag-2", "flag-15", "all-reserved", "compressed", "shm"])
def test_a_recoverable_violation_is_answered_and_the_connection_stays(aio_server, frame, code):
    server = aio_server()
    peer = RawPeer(server.path)
    peer.send(frame)
    assert peer.next_error()[:2] == (11, code)
    peer.send(raw_frame(b"echo:y", request_id=12))
    frame = peer.next_frame()
    assert (frame.type, frame.request_id, bytes(frame.payload)) == (2, 12, b"y")
    peer.close()
    server.assert_back_to_baseline()


def test_a_stream_of_mixed_garbage_frames_is_survived(aio_server):
    # Recoverable violations, unsolicited Responses and Errors, Events with bad CRCs, all
    # in one write: each Request gets its answer, nothing else is answered.
    server = aio_server()
    peer = RawPeer(server.path)
    stream = b"".join([
        raw_frame(b"stray", msg_type=2, request_id=1),
        raw_frame(b"\x00" * 3, msg_type=4, request_id=2),            # malformed Error
        raw_frame(b"event", msg_type=3, request_id=3, checksum=1),
        raw_frame(b"event", msg_type=3, request_id=4, flags=0x0004),
        raw_frame(b"a" * 5000, msg_type=3, request_id=0),            # control: not a hello
        raw_frame(b"echo:x", request_id=5, checksum=7),
        raw_frame(b"x" * 100_000, request_id=6, flags=0x0100),       # skipped unbuffered
        raw_frame(b"echo:last", request_id=7),
    ])
    peer.send(stream)
    assert peer.next_error()[:2] == (5, ErrorCode.CHECKSUM)
    assert peer.next_error()[:2] == (6, ErrorCode.UNSUPPORTED_FLAGS)
    frame = peer.next_frame()
    assert (frame.type, frame.request_id, bytes(frame.payload)) == (2, 7, b"last")
    peer.close()
    server.assert_back_to_baseline()


# 2. Announced sizes: refused from the header, never allocated -------------------------------

@pytest.mark.parametrize("length", [MIB + 1, 0xFFFFFFFF], ids=["max+1", "4GiB"])
def test_a_header_over_max_payload_is_too_large_and_fatal(aio_server, length):
    server = aio_server(max_payload=MIB)
    peer = RawPeer(server.path)
    peer.send(raw_frame(length=length, request_id=21)[:24])     # the header alone
    assert peer.next_error()[:2] == (21, ErrorCode.TOO_LARGE)
    assert peer.at_eof()
    peer.close()
    assert serves(server.path)
    server.assert_back_to_baseline()


def test_a_four_gib_header_on_the_default_limit_allocates_nothing(aio_server):
    server = aio_server()
    peers = []
    for n in range(1, 21):
        peer = RawPeer(server.path)
        peer.send(raw_frame(length=0xFFFFFFFF, request_id=n)[:24] + b"x" * 1000)
        peers.append(peer)
    for n, peer in enumerate(peers, 1):
        assert peer.next_error()[:2] == (n, ErrorCode.TOO_LARGE)
        assert peer.at_eof()
        peer.close()
    server.assert_back_to_baseline()


def _stall(path, request_id, declared, sent):
    """A raw peer that starts a Request of ``declared`` bytes and sends ``sent`` of them."""
    peer = RawPeer(path, timeout=30)
    peer.send(raw_frame(b"", length=declared, request_id=request_id)[:24] + bytes(sent))
    return peer


def test_unfinished_frames_are_bounded_across_connections(aio_server):
    # As test_exhaustion: six peers start 16 MiB frames and stall; 32 MiB of budget admits
    # two, the other four are refused at once with UNAVAILABLE (their payloads skipped).
    server = aio_server(max_payload=16 * MIB, max_pending_bytes=32 * MIB, frame_timeout=60)
    peers = [_stall(server.path, n, 16 * MIB, 12 * MIB) for n in range(1, 7)]
    refused = []
    for n, peer in enumerate(peers, 1):
        peer.sock.settimeout(1.0)
        try:
            frame = peer.next_frame()
        except socket.timeout:
            continue                        # admitted: the server waits for the rest
        request_id, code, message = (frame.request_id,
                                     *hintens.wire.decode_error_payload(frame.payload))
        assert (request_id, code) == (n, ErrorCode.UNAVAILABLE)
        assert "no room" in message
        refused.append(n)
    assert len(refused) == 4
    assert status_kib("VmRSS", server.pid) - server.rss < 40 * 1024
    assert serves(server.path, b"echo:small", b"small")
    assert aio_serves(server.path)
    for peer in peers:
        peer.close()
    server.assert_back_to_baseline()


def test_many_connections_dripping_max_payload_frames_are_refused_not_allocated(aio_server):
    # 40 peers each announce a 16 MiB frame and drip its bytes: 640 MiB if the server
    # allocated on announcement; the 32 MiB budget admits two.
    server = aio_server(max_payload=16 * MIB, max_pending_bytes=32 * MIB, frame_timeout=30)
    peers = []
    for n in range(1, 41):
        peer = RawPeer(server.path, timeout=10)
        peer.send(raw_frame(b"", length=16 * MIB, request_id=n)[:24] + b"e")
        peers.append(peer)
    for _ in range(5):                                  # drip
        for peer in peers:
            peer.send(b"d" * 100)
        time.sleep(0.05)
    refused = 0
    for n, peer in enumerate(peers, 1):
        peer.sock.settimeout(0.3)
        try:
            frame = peer.next_frame()
        except socket.timeout:
            continue
        assert frame.request_id == n and error_of(frame)[0] == ErrorCode.UNAVAILABLE
        refused += 1
    assert refused == 38
    assert status_kib("VmRSS", server.pid) - server.rss < RSS_SLACK_KIB
    assert serves(server.path)
    for peer in peers:
        peer.close()
    server.assert_back_to_baseline()


# 3. Time limits ------------------------------------------------------------------------------

def test_a_frame_dripped_slower_than_frame_timeout_is_cut(aio_server):
    server = aio_server(frame_timeout=0.5)
    peer = RawPeer(server.path)
    frame = raw_frame(b"echo:" + b"s" * 40, request_id=1)    # 69 bytes: 6.9 s at this pace
    started = time.monotonic()
    cut = False
    try:
        for byte in frame:
            peer.send(bytes([byte]))
            if ends_within(peer, 0.1):
                cut = True
                break
    except (BrokenPipeError, ConnectionResetError):
        cut = True
    assert cut or ends_within(peer, 5)
    assert time.monotonic() - started < 6          # bounded, not the whole frame
    peer.close()
    assert serves(server.path)
    server.assert_back_to_baseline()


def test_whole_frames_each_within_frame_timeout_are_not_cut(aio_server):
    # The limit is per frame: a peer that sends each frame quickly, whatever the pauses
    # between them, stays (no idle_timeout here).
    server = aio_server(frame_timeout=1)
    peer = RawPeer(server.path)
    for n in range(1, 3):
        frame = raw_frame(b"echo:%d" % n, request_id=n)
        peer.send(frame[:10])
        time.sleep(0.1)
        peer.send(frame[10:])
        assert bytes(answer(peer, n)[0].payload) == b"%d" % n
        time.sleep(1.3)
    peer.close()
    server.assert_back_to_baseline()


def test_a_silent_connection_is_closed_after_idle_timeout(aio_server):
    server = aio_server(idle_timeout=0.5)
    silent = RawPeer(server.path)
    served = RawPeer(server.path)
    assert_serves(served, 1)
    assert ends_within(silent, 5)
    assert ends_within(served, 5)
    silent.close()
    served.close()
    server.assert_back_to_baseline()


def test_idle_timeout_spares_a_connection_whose_request_is_running(aio_server):
    server = aio_server(idle_timeout=0.5)
    peer = RawPeer(server.path)
    peer.send(raw_frame(b"sleep:1.5:late", request_id=1))
    frame, _ = answer(peer, 1)
    assert (frame.type, bytes(frame.payload)) == (2, b"late")
    assert ends_within(peer, 5)                      # then idle: closed
    peer.close()
    server.assert_back_to_baseline()


# 4. A client that never reads its replies ----------------------------------------------------

def _flood_unread(path, payload, count, seconds=3.0):
    """A raw peer with the smallest receive buffer sends ``count`` Requests without reading,
    for at most ``seconds`` (the server stops reading it); returns (peer, requests sent)."""
    peer = RawPeer(path)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.sock.setblocking(False)
    data = b"".join(raw_frame(payload, request_id=n) for n in range(1, count + 1))
    sent, deadline = 0, time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += peer.sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break
    peer.sock.setblocking(True)
    return peer, sent // len(raw_frame(payload, request_id=1))


@pytest.mark.parametrize("handler", ["tests.handlers:async_command", "tests.handlers:command"],
                         ids=["async", "plain"])
def test_a_client_that_never_reads_is_paused_then_cut_after_send_timeout(aio_server, handler):
    server = aio_server(handler=handler, send_timeout=1, send_queue_bytes=256 * KIB)
    peer, sent = _flood_unread(server.path, b"size:65536", 20_000)   # 1.3 GB of replies
    assert sent < 20_000            # it stopped reading us: no unbounded buffering
    rss_attack = status_kib("VmRSS", server.pid)
    assert rss_attack - server.rss < RSS_SLACK_KIB
    assert serves(server.path)      # others are served meanwhile
    # Cut after send_timeout of reading nothing: its descriptor goes.
    assert wait_until(lambda: open_fds(server.pid) == server.fds, timeout_s=10)
    assert ends_within(peer, 10)
    peer.close()
    server.assert_back_to_baseline()
    text = server_log(server.process)
    assert "send_timeout" in text


@pytest.mark.parametrize("handler", ["tests.handlers:async_command", "tests.handlers:command"],
                         ids=["async", "plain"])
def test_large_replies_to_a_client_that_never_reads_stop_at_the_queue_bound(aio_server,
                                                                             handler):
    """300 Requests for 1 MB each, in one write, from a client that never reads; the server
    may queue 1 MiB for it (send_queue_bytes), and holds about that much.

    An async handler's Requests become tasks, all started by that one read before any reply
    is queued: a task starts its handler only while the queue is within the bound (else a
    reply per task: 245 MiB). A plain handler's large reply is queued as soon as it is made,
    so the queue's check sees it before the next Request runs (left in the read's batch, up
    to 32 of them went unseen: 30-70 MiB)."""
    server = aio_server(handler=handler, send_timeout=3, send_queue_bytes=MIB)
    peer, sent = _flood_unread(server.path, b"size:1000000", 300)
    assert sent == 300
    worst, until = 0, time.monotonic() + 1.5   # the old server got to 240 MB within 1 s
    while time.monotonic() < until:
        worst = max(worst, status_kib("VmRSS", server.pid) - server.rss)
        time.sleep(0.05)
    assert worst < 16 * MIB // KIB, f"{worst // 1024} MiB held for a client that reads nothing"
    assert serves(server.path)
    assert wait_until(lambda: open_fds(server.pid) == server.fds, timeout_s=10)   # cut
    assert ends_within(peer, 10)
    peer.close()
    server.assert_back_to_baseline()

def test_a_client_that_reads_nothing_does_not_hold_up_others(aio_server):
    server = aio_server(send_timeout=30, send_queue_bytes=256 * KIB)
    stalled = [_flood_unread(server.path, b"size:65536", 2000, seconds=0.5)[0]
               for _ in range(3)]
    started = time.monotonic()
    for n in range(20):
        assert serves(server.path, b"echo:%d" % n, b"%d" % n)
    assert aio_serves(server.path)
    assert time.monotonic() - started < 20          # not one send_timeout (30 s) per staller
    for peer in stalled:
        peer.close()
    server.assert_back_to_baseline()


# 5. max_concurrency ---------------------------------------------------------------------------

def test_at_most_max_concurrency_requests_run_at_once(aio_server):
    # 40 Requests in one write: the server must not start more than 8 at once.
    server = aio_server(handler="tests.test_aio_hostile:gauge", max_concurrency=8)
    peer = RawPeer(server.path, timeout=30)
    peer.send(b"".join(raw_frame(b"hold:0.3", request_id=n) for n in range(1, 41)))
    running = {}
    while len(running) < 40:
        frame = peer.next_frame()
        assert frame is not None and frame.type == 2, frame
        running[frame.request_id] = int(bytes(frame.payload))
    assert sorted(running) == list(range(1, 41))
    peer.send(raw_frame(b"peak:", request_id=41))
    peak = int(bytes(answer(peer, 41)[0].payload))
    assert peak <= 8 and max(running.values()) <= 8, (peak, running)
    peer.close()
    server.assert_back_to_baseline()


def test_at_most_max_concurrency_requests_run_at_once_when_trickled(aio_server):
    # The same, one Request per write.
    server = aio_server(handler="tests.test_aio_hostile:gauge", max_concurrency=8)
    peer = RawPeer(server.path, timeout=30)
    peer.sock.setblocking(True)
    for n in range(1, 41):
        peer.send(raw_frame(b"hold:0.3", request_id=n))
        time.sleep(0.002)
    running = {}
    while len(running) < 40:
        frame = peer.next_frame()
        assert frame is not None and frame.type == 2, frame
        running[frame.request_id] = int(bytes(frame.payload))
    peer.send(raw_frame(b"peak:", request_id=41))
    peak = int(bytes(answer(peer, 41)[0].payload))
    assert peak <= 8, (peak, running)
    peer.close()
    server.assert_back_to_baseline()


@pytest.mark.slow   # ~5 s: the running requests' sleep
def test_a_flood_of_sleeping_requests_closes_cleanly(aio_server):
    # A peer that floods sleeping requests and goes: what runs finishes (or is cancelled),
    # the rest is dropped, quietly, and the connection's resources go.
    server = aio_server(max_concurrency=8)
    peer = RawPeer(server.path)
    peer.send(b"".join(raw_frame(b"sleep:5:x", request_id=n) for n in range(1, 501)))
    time.sleep(0.3)
    peer.close()
    server.assert_back_to_baseline()
    assert serves(server.path)


# 6. max_connections --------------------------------------------------------------------------

def test_max_connections_refuses_the_extra_one_and_recovers(aio_server):
    server = aio_server(max_connections=4)
    held = [hintens.Client(server.path, timeout=10) for _ in range(4)]
    for n, client in enumerate(held):
        assert client.request(b"echo:%d" % n) == b"%d" % n
    for _ in range(3):
        extra = RawPeer(server.path)
        request_id, code, message = extra.next_error()
        assert (request_id, code) == (0, ErrorCode.UNAVAILABLE)
        assert "max_connections" in message
        assert extra.at_eof()
        extra.close()
    for client in held:
        client.close()
    assert wait_until(lambda: open_fds(server.pid) == server.fds)
    again = [hintens.Client(server.path, timeout=10) for _ in range(4)]
    for client in again:
        assert client.request(b"echo:again") == b"again"
        client.close()
    server.assert_back_to_baseline()


def test_a_connect_storm_past_max_connections_is_refused_and_survived(aio_server):
    server = aio_server(max_connections=4, backlog=512)
    socks = []
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server.path)
        socks.append(sock)
    kinds = []
    for sock in socks:
        sock.settimeout(10)
        data = b""
        while len(data) < 24:
            chunk = sock.recv(24 - len(data))
            if not chunk:
                break
            data += chunk
        kinds.append(HEADER.unpack(data)[2] if len(data) == 24 else None)
    refused = kinds.count(4)
    assert kinds.count(3) == 4     # four admitted (their hello), every other one refused
    assert refused == 296
    for sock in socks:
        sock.close()
    assert serves_soon(server.path)
    server.assert_back_to_baseline()


# 7. Shared-memory descriptors ----------------------------------------------------------------

@pytest.mark.parametrize("case, expected", [
    ("unsealed", (_shm.REJECT_MAGIC, [1])),
    ("undersized", (_shm.REJECT_MAGIC, [1])),
    ("no_descriptor", (_shm.REJECT_MAGIC, [1])),
    ("unknown_segment", (_shm.REJECT_MAGIC, [42])),
    ("unknown_flag_bits", (_shm.REJECT_MAGIC, [1])),
    ("not_negotiated", (_shm.REJECT_MAGIC, [1])),
    ("out_of_range_on_a_new_segment", (_shm.REJECT_MAGIC, [1])),
    ("sparse_terabyte", (_shm.REJECT_MAGIC, [1])),
    ("a_pipe_not_a_memfd", (_shm.REJECT_MAGIC, [1])),
    ("short_descriptor", None),
    ("segment_id_zero", None),
    ("peer_segment_never_lent", None),
    ("error_frame_with_shm", (_shm.REJECT_MAGIC, [1])),
])
def test_every_refused_descriptor_is_answered_and_handed_back(aio_server, case, expected):
    server = aio_server()
    peer = RawPeer(server.path) if case == "not_negotiated" else ShmPeer(server.path)
    fds = []
    if case == "unsealed":
        fds.append(memfd(MIB))
        peer.send_shm(5, 1, MIB, 0, 10, True, fds[0])
    elif case == "undersized":
        fds.append(memfd(4096, SEALED))
        peer.send_shm(5, 1, MIB, 0, 10, True, fds[0])
    elif case == "no_descriptor":
        peer.send_shm(5, 1, MIB, 0, 10, True)
    elif case == "unknown_segment":
        peer.send_shm(5, 42, MIB, 0, 10, False)
    elif case == "unknown_flag_bits":
        peer.send_shm(5, 1, MIB, 0, 10, False, descriptor_flags=0x10)
    elif case == "not_negotiated":
        peer.send(raw_frame(_shm.encode_descriptor(1, MIB, 0, 10, False), flags=1,
                            request_id=5))
    elif case == "out_of_range_on_a_new_segment":
        fds.append(memfd(MIB, SEALED))
        peer.send_shm(5, 1, MIB, MIB - 5, 10, True, fds[0])
    elif case == "sparse_terabyte":
        fds.append(memfd(TIB, SEALED, b"echo:x"))
        peer.send_shm(5, 1, TIB, 0, 6, True, fds[0])
    elif case == "a_pipe_not_a_memfd":
        fds += os.pipe()
        peer.send_shm(5, 1, MIB, 0, 10, True, fds[0])
    elif case == "short_descriptor":
        peer.send(raw_frame(b"\x01" * 31, flags=1, request_id=5))
    elif case == "segment_id_zero":
        peer.send_shm(5, 0, MIB, 0, 10, False)
    elif case == "peer_segment_never_lent":
        peer.send_shm(5, 7, MIB, 0, 10, False, descriptor_flags=_shm.PEER_SEGMENT)
    elif case == "error_frame_with_shm":
        fds.append(memfd(MIB, SEALED))
        peer.send_shm(5, 1, MIB, 0, 10, True, fds[0], msg_type=4)
    if case == "error_frame_with_shm":   # Errors are never answered: look for the hand-back
        frames = peer.until(lambda f: f.type == 3 and f.request_id == 0
                            and bytes(f.payload[:4]) in (b"HREL", b"HREJ"))
        assert peer.controls(frames)[-1] == expected
    else:
        frame, controls = answer(peer, 5)
        assert error_of(frame)[0] == ErrorCode.SHM_ERROR
        handed_back = [c for c in controls if c[0] in (_shm.RELEASE_MAGIC, _shm.REJECT_MAGIC)]
        assert handed_back == ([] if expected is None else [expected])
    assert memfd_mappings(server.pid) == []
    assert_serves(peer)
    for fd in fds:
        os.close(fd)
    peer.close()
    server.assert_back_to_baseline()


def test_a_segment_id_introduced_twice_is_refused_and_the_first_stays_usable(aio_server):
    server = aio_server()
    peer = ShmPeer(server.path)
    first = memfd(MIB, SEALED, b"echo:first")
    peer.send_shm(1, 3, MIB, 0, 10, True, first)
    assert bytes(answer(peer, 1)[0].payload) == b"first"
    second = memfd(MIB, SEALED, b"echo:other")
    peer.send_shm(2, 3, MIB, 0, 10, True, second)           # id 3 again, NEW_SEGMENT
    frame, _ = answer(peer, 2)
    assert error_of(frame)[0] == ErrorCode.SHM_ERROR
    peer.send_shm(4, 3, MIB, 0, 10, False)                  # the mapped one, by id
    frame, _ = answer(peer, 4)
    assert (frame.type, bytes(frame.payload)) == (2, b"first")
    assert_serves(peer)
    os.close(first)
    os.close(second)
    peer.close()
    server.assert_back_to_baseline()


def test_a_flood_of_passed_descriptors_is_capped_and_closed(aio_server):
    # Descriptors attached to the bytes of a frame that never ends: at most 64 wait, the
    # extras are closed on arrival; all go with the frame, or with the connection.
    server = aio_server(frame_timeout=30)
    peer = ShmPeer(server.path)
    assert_serves(peer, 1)
    base = open_fds(server.pid)                             # with this connection
    body = b"echo:" + b"f" * 2000
    frame = raw_frame(body, request_id=2)
    read_end, write_end = os.pipe()
    fds = [read_end] * 8
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("8i", *fds))]
    peer.sock.sendall(frame[:30])
    for index in range(30, 30 + 1000):                       # 8000 descriptors, 1000 writes
        peer.sock.sendmsg([frame[index:index + 1]], ancillary)
    time.sleep(0.2)
    assert open_fds(server.pid) <= base + 64
    peer.sock.sendall(frame[1030:])
    frame_back, _ = answer(peer, 2)
    assert bytes(frame_back.payload) == b"f" * 2000
    assert wait_until(lambda: open_fds(server.pid) == base)  # none kept once it ended
    # And with no frame at all in progress: each closed once its read is over.
    for _ in range(200):
        peer.sock.sendmsg([raw_frame(b"x", msg_type=3, request_id=9)], ancillary)
    assert_serves(peer, 3)
    assert wait_until(lambda: open_fds(server.pid) == base)
    os.close(read_end)
    os.close(write_end)
    peer.close()
    server.assert_back_to_baseline()


def test_descriptors_left_waiting_go_with_a_connection_that_hangs_up(aio_server):
    server = aio_server(frame_timeout=30)
    peer = ShmPeer(server.path)
    assert_serves(peer, 1)
    fd = memfd(MIB, SEALED)
    frame = raw_frame(b"x" * 500, request_id=2)
    peer.sock.sendall(frame[:100])
    for _ in range(100):
        peer.sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   struct.pack("4i", fd, fd, fd, fd))])
    os.close(fd)
    time.sleep(0.2)
    peer.close()                                             # mid-frame, 64 fds waiting
    server.assert_back_to_baseline()
    assert serves(server.path)


def test_many_segments_pin_nothing_and_huge_ones_map_nothing(aio_server):
    server = aio_server(shm_receive_segments=16)
    vm_before = status_kib("VmSize", server.pid)
    peer = ShmPeer(server.path)
    for n in range(1, 201):                                  # 200 x 1 TiB, sparse
        fd = memfd(TIB, SEALED)
        peer.send_shm(n, n, TIB, 0, 10, True, fd)
        os.close(fd)
    for n in range(1, 201):
        assert error_of(answer(peer, n)[0])[0] == ErrorCode.SHM_ERROR
    assert status_kib("VmSize", server.pid) - vm_before < 256 * 1024
    served = refused = 0
    for n in range(1000, 1300):                              # past the 16-segment cap
        fd = memfd(4096, SEALED, b"echo:%d" % n)
        peer.send_shm(n, n, 4096, 0, len(b"echo:%d" % n), True, fd)
        os.close(fd)
        frame, _ = answer(peer, n)
        if frame.type == 2:
            served += 1
        else:
            assert "shm_receive_segments" in error_of(frame)[1]
            refused += 1
    assert (served, refused) == (16, 284)
    assert len(memfd_mappings(server.pid)) <= 16
    assert_serves(peer)
    peer.close()
    server.assert_back_to_baseline()


# 8. Hellos ------------------------------------------------------------------------------------

def _bincode_hello(entries, count=None):
    body = struct.pack("<Q", len(entries) if count is None else count)
    for key, value in entries:
        body += struct.pack("<HQ", key, len(value)) + value
    return b"HELO" + body


@pytest.mark.parametrize("payload", [
    b"not a hello at all",
    b"HELO",
    b"HELO" + struct.pack("<Q", 2**60),                              # 2^60 entries claimed
    _bincode_hello([(2, b"\xff" * 4)], count=3),                     # fewer than claimed
    _bincode_hello([(2, b"\x01")]),                                  # features too short
    _bincode_hello([(3, b"\x01")]),                                  # max_payload too short
    _bincode_hello([(3, b"\x00" * 4)]),                              # max_payload 0
    _bincode_hello([(3, b"\x01\x00\x00\x00")]),                      # max_payload 1
    _bincode_hello([(3, b"\xff" * 8)]),                              # max_payload too long
    _bincode_hello([(1, b"\xff" * 4)]),                              # minor, wrong width
    _bincode_hello([(2, b"\xff" * 4), (6, b"\x00" * 8), (7, b"\x00" * 4)]),
    _bincode_hello([(k, b"\xff" * 8) for k in range(64)]),           # every key, all ones
    _bincode_hello([(k, b"\xff" * 4) for k in range(65)]),           # one entry too many
    _bincode_hello([(999, b"z" * 60_000)]),                          # over MAX_HELLO_BYTES
    _bincode_hello([(4, b"short session")]),                         # session id, not 16
    _bincode_hello([(2, b"\x01\x00\x00\x00"), (2, b"\x00" * 4)]),   # a key twice
    Hello(features=0xFFFFFFFF).encode(),
    Hello(max_payload=0).encode(),
    Hello(max_payload=1, features=FEATURE_SHM).encode(),
], ids=lambda p: repr(p[:12]))
def test_a_garbage_hello_does_not_break_the_connection(aio_server, payload):
    server = aio_server()
    peer = RawPeer(server.path)
    peer.send(raw_frame(payload, msg_type=3, request_id=0))
    peer.send(raw_frame(payload, msg_type=3, request_id=0))          # and a second one
    peer.send(raw_frame(b"echo:ok", request_id=1))
    frame, _ = answer(peer, 1)
    if frame.type == 4:   # a hello announcing a limit under 2 bytes: TOO_LARGE, told
        assert error_of(frame)[0] == ErrorCode.TOO_LARGE
    elif frame.flags & 1:  # over its limit, but it offered shared memory: a descriptor
        assert len(frame.payload) == 32
    else:
        assert bytes(frame.payload) == b"ok"
    peer.send(raw_frame(b"size:70000", request_id=2))                # inline or shm
    frame, _ = answer(peer, 2)
    assert frame.type in (2, 4)
    peer.close()
    assert serves(server.path)
    server.assert_back_to_baseline()


def test_an_oversized_hello_is_too_large_and_fatal(aio_server):
    server = aio_server(max_payload=MIB)
    peer = RawPeer(server.path)
    hello = _bincode_hello([(999, b"h" * (2 * MIB))])
    peer.send(raw_frame(hello, msg_type=3, request_id=0)[:24 + 4096])
    request_id, code, _ = peer.next_error()
    assert (request_id, code) == (0, ErrorCode.TOO_LARGE)
    assert peer.at_eof()
    peer.close()
    server.assert_back_to_baseline()


def test_a_hello_announcing_no_room_for_segments_still_gets_answers(aio_server):
    # Shared memory offered, but room for nothing: a large reply must still come (inline,
    # as an Error, or after send_timeout), never hang the connection or the server.
    server = aio_server(send_timeout=1)
    peer = ShmPeer(server.path, shm_receive_segments=0, shm_receive_bytes=0)
    peer.send(raw_frame(b"size:200000", request_id=1))
    frame, _ = answer(peer, 1)
    assert frame.type in (2, 4)
    assert_serves(peer)
    peer.close()
    server.assert_back_to_baseline()


# 9. Vanishing peers ---------------------------------------------------------------------------

def test_peers_that_vanish_at_every_stage_leak_nothing(aio_server):
    server = aio_server(max_concurrency=8, send_timeout=5, send_queue_bytes=256 * KIB)
    # Mid-header, mid-payload, and mid-payload of a large announced frame.
    for cut in (5, 30, 24 + 100_000):
        peer = RawPeer(server.path)
        peer.send(raw_frame(b"echo:" + b"m" * 200_000, request_id=1)[:cut])
        time.sleep(0.05)
        peer.close()
    # With a request running (an async handler sleeping), and many waiting for a slot.
    peer = RawPeer(server.path)
    peer.send(b"".join(raw_frame(b"sleep:2:x", request_id=n) for n in range(1, 50)))
    time.sleep(0.2)
    peer.close()
    # While replies wait in the queue for a peer that reads nothing.
    peer, _ = _flood_unread(server.path, b"size:65536", 200, seconds=0.5)
    time.sleep(0.2)
    peer.close()
    # An SHM request whose mapped segment is still lent to the handler.
    peer = ShmPeer(server.path)
    fd = memfd(MIB, SEALED, b"sleep:2:y")
    peer.send_shm(1, 1, MIB, 0, 9, True, fd)
    os.close(fd)
    time.sleep(0.2)
    peer.close()
    # Shut with RST instead of FIN (SO_LINGER 0) while a reply is in flight.
    peer = RawPeer(server.path)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.send(b"".join(raw_frame(b"size:65536", request_id=n) for n in range(1, 20)))
    peer.close()
    assert serves(server.path)
    assert aio_serves(server.path)
    server.assert_back_to_baseline()


def test_a_half_closed_peer_gets_its_answers_then_the_end(aio_server):
    # The peer shuts its write side after its requests: they are answered, then the
    # connection ends (and nothing is leaked).
    server = aio_server()
    peer = RawPeer(server.path, timeout=10)
    peer.send(b"".join(raw_frame(b"sleep:0.2:%d" % n, request_id=n) for n in range(1, 11)))
    peer.sock.shutdown(socket.SHUT_WR)
    got = set()
    while (frame := peer.next_frame()) is not None:
        assert frame.type == 2
        got.add(frame.request_id)
    assert got == set(range(1, 11))
    peer.close()
    server.assert_back_to_baseline()


@pytest.mark.slow   # ~5 s: the shutdown deadline
def test_the_server_closes_gracefully_with_hostile_peers_connected(aio_server):
    # SIGTERM while peers are mid-frame, running requests and refusing to read: the server
    # exits within its shutdown deadline, with a clean log (the fixture checks it).
    server = aio_server(frame_timeout=60, send_timeout=60, send_queue_bytes=256 * KIB)
    mid_frame = RawPeer(server.path)
    mid_frame.send(raw_frame(b"echo:" + b"p" * 1000, request_id=1)[:100])
    running = RawPeer(server.path)
    running.send(raw_frame(b"sleep:30:x", request_id=1))
    unread, _ = _flood_unread(server.path, b"size:65536", 500, seconds=0.5)
    time.sleep(0.2)
    started = time.monotonic()
    text = server.stop()
    assert time.monotonic() - started < 15
    assert server.process.returncode == 0, text
    assert "cut at the shutdown deadline" in text or "at the shutdown deadline" in text
    for peer in (mid_frame, running, unread):
        assert ends_within(peer, 5)
        peer.close()
