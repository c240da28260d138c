"""Large payloads through shared memory between real processes, and hostile SHM peers."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import hintens
from hintens import ErrorCode
from hintens.protocol import shm as _shm
from hintens.protocol.endpoint import FEATURE_SHM, Hello

from .peers import REPO, RawPeer, ShmPeer, memfd, raw_frame, start_server, stop_server

MIB = 1 << 20
# The compiled core lends shared payloads as memoryviews; the pure-Python one cannot see a
# view's release, so it copies them out (bytes) and gives the segment back at once.
LENT = memoryview if hintens.implementation == "cython" else bytes


def done(reply):
    """Give a received payload back (a no-op for copies)."""
    if isinstance(reply, memoryview):
        reply.release()








@pytest.mark.parametrize("size", [64 * 1024 - 1, 64 * 1024, MIB, 64 * MIB])
def test_round_trips(client, size):
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    reply = client.request(b"echo:" + payload)
    assert bytes(reply) == payload
    shared = size >= 64 * 1024          # the reply is `size` bytes; the request 5 more
    # A reply is a memoryview either way: over the shared pages, or over inline bytes.
    assert type(reply) is memoryview
    assert (type(reply.obj) is not bytes) == (shared and LENT is memoryview)
    assert client.peer_hello.features & FEATURE_SHM
    if shared and LENT is memoryview:
        assert reply.readonly
    done(reply)


@pytest.mark.skipif(hintens.implementation != "cython", reason="the pure-Python core copies")
def test_numpy_views_without_a_copy(sock_path):
    with hintens.Server(sock_path).start():
        with hintens.Client(sock_path, timeout=30) as client:
            array = np.arange(4 * MIB, dtype=np.float64)
            reply = client.request(array)
            received = np.frombuffer(reply, dtype=np.float64)
            assert received[-1] == array[-1] and not received.flags.writeable
            assert type(reply.obj).__name__ == "SharedRegion"   # lent, not copied
            del received
            reply.release()


def test_segments_are_reused_after_warm_up(sock_path):
    with hintens.Server(sock_path).start():
        with hintens.Client(sock_path, timeout=30) as client:
            payload = bytes(2 * MIB)
            for _ in range(3):
                done(client.request(payload))
            client.request(b"x")         # reads the releases still on the stream
            pool = client._endpoint.pool
            created = pool._next_id
            for _ in range(50):
                done(client.request(payload))
                # An echo's release follows its reply, so the next request may find that
                # segment still held and take one more; never a third: the release of the one
                # before always precedes the next reply on the stream.
                assert len(pool._segments) <= 2
            assert pool._next_id - created <= 1   # 50 messages, at most one new mmap


def test_concurrent_large_requests_from_many_threads(sock_path):
    with hintens.Server(sock_path).start():
        with hintens.Client(sock_path, timeout=60) as client:
            errors = []

            def work(seed):
                try:
                    for i in range(10):
                        payload = bytes([seed, i]) * (MIB // 2)
                        reply = client.request(payload)
                        assert bytes(reply) == payload
                        done(reply)
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert errors == []


def test_large_events_arrive_through_shared_memory(sock_path):
    got, arrived = [], threading.Event()

    def on_event(payload, connection):
        got.append((type(payload).__name__, bytes(payload[:3]), len(payload)))
        arrived.set()

    with hintens.Server(sock_path, on_event=on_event).start():
        with hintens.Client(sock_path) as client:
            client.request(b"x")                      # the hellos have crossed
            client.send_event(b"abc" + bytes(MIB))
            assert arrived.wait(10)
    assert got == [(LENT.__name__, b"abc", MIB + 3)]


def test_shared_memory_can_be_declined(sock_path):
    with hintens.Server(sock_path, shm=False).start():
        with hintens.Client(sock_path) as client:
            reply = client.request(bytes(MIB))
            assert type(reply.obj) is bytes and not client.peer_hello.features & FEATURE_SHM


# Hostile peers -------------------------------------------------------------------------------

def assert_still_serving(peer, request_id=99):
    peer.send(raw_frame(b"echo:alive", request_id=request_id))
    frame = peer.next_frame()
    while frame.type == 3:          # release messages may come first
        frame = peer.next_frame()
    assert (frame.type, frame.request_id, frame.payload) == (2, request_id, b"alive")


def test_a_well_formed_raw_shm_request_is_served(sock_path, server_process):
    peer = ShmPeer(sock_path)
    fd = memfd(MIB, fcntl.F_SEAL_SHRINK, b"echo:from a raw peer")
    peer.send_shm(1, 7, MIB, 0, 20, True, fd)
    os.close(fd)
    frame = peer.next_frame()
    while frame.type == 3 and frame.request_id == 0:   # our segment's release
        frame = peer.next_frame()
    assert frame.type == 2 and frame.payload == b"from a raw peer"
    peer.close()


@pytest.mark.parametrize("case", [
    "unsealed", "unsealed_then_shrunk", "undersized", "offset_out_of_range",
    "length_out_of_range", "no_descriptor", "unknown_segment", "not_negotiated", "pipe",
])
def test_hostile_shm_frames_get_shm_error(sock_path, server_process, case):
    peer = RawPeer(sock_path) if case == "not_negotiated" else ShmPeer(sock_path)
    fd = None
    if case in ("unsealed", "unsealed_then_shrunk"):
        fd = memfd(MIB)
        peer.send_shm(5, 1, MIB, 0, 100, True, fd)
        if case == "unsealed_then_shrunk":
            os.ftruncate(fd, 0)
    elif case == "undersized":
        fd = memfd(4096, fcntl.F_SEAL_SHRINK)
        peer.send_shm(5, 1, MIB, 0, 100, True, fd)
    elif case in ("offset_out_of_range", "length_out_of_range"):
        fd = memfd(MIB, fcntl.F_SEAL_SHRINK)
        offset, length = (MIB + 1, 1) if case == "offset_out_of_range" else (10, MIB)
        peer.send_shm(5, 1, MIB, offset, length, True, fd)
    elif case == "no_descriptor":
        peer.send_shm(5, 1, MIB, 0, 100, True)
    elif case == "unknown_segment":
        peer.send_shm(5, 42, MIB, 0, 100, False)
    elif case == "not_negotiated":
        peer.send(raw_frame(_shm.encode_descriptor(1, MIB, 0, 100, False), flags=1,
                            request_id=5))
    elif case == "pipe":
        read_end, fd = os.pipe()
        os.close(read_end)
        peer.send_shm(5, 1, MIB, 0, 100, True, fd)
    frame = peer.next_frame()
    while frame.type == 3:            # a release of the refused segment may come first
        frame = peer.next_frame()
    assert frame.type == 4
    request_id, code, message = (frame.request_id, *hintens.wire.decode_error_payload(frame.payload))
    assert (request_id, code) == (5, ErrorCode.SHM_ERROR) and message
    assert_still_serving(peer)
    if fd is not None:
        os.close(fd)
    peer.close()
    assert server_process.poll() is None


def _memfd_mappings(pid):
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if "memfd:" in line]


def test_client_killed_mid_stream_leaves_nothing_behind(sock_path, server_process):
    assert _memfd_mappings(server_process.pid) == []
    script = (
        "import hintens, sys\n"
        f"c = hintens.Client({sock_path!r}, timeout=30)\n"
        "payload = bytes(8 << 20)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    c.request(b'echo:' + payload)\n")
    before = set(os.listdir("/dev/shm"))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=REPO))
    assert child.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 10
    while not _memfd_mappings(server_process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _memfd_mappings(server_process.pid), "the stream never used shared memory"
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    deadline = time.monotonic() + 10
    while _memfd_mappings(server_process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _memfd_mappings(server_process.pid) == []
    assert set(os.listdir("/dev/shm")) == before
    with hintens.Client(sock_path) as other:          # and the server carries on
        assert other.request(b"echo:ok") == b"ok"


def _rss_mib(kind):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) // 1024
    raise LookupError(kind)


@pytest.mark.slow
def test_one_gib_round_trip_without_private_memory_growth(sock_path):
    process = start_server(sock_path, handler="hintens.sync.server:echo")
    try:
        with hintens.Client(sock_path, timeout=120) as client:
            payload = np.zeros(1 << 30, dtype=np.uint8)
            payload[::4096] = 7                          # one byte per page, known values
            payload[-1] = 9
            client.request(b"warm up")
            anon_before = _rss_mib("RssAnon")
            reply = client.request(payload)
            assert len(reply) == 1 << 30
            received = np.frombuffer(reply, dtype=np.uint8)
            assert received[-1] == 9 and int(received[::4096].sum()) == 7 * (1 << 18)
            if LENT is memoryview:
                # Lent, not copied: what grew is the shared mapping, not private memory.
                assert _rss_mib("RssAnon") - anon_before < 64
            del received
            done(reply)
    finally:
        stop_server(process, signal.SIGKILL)


def test_allocate_fill_send_round_trip_copies_nothing(sock_path):
    seen = {}
    holder = {}

    def handler(payload):
        seen["lent"] = type(payload) is LENT
        seen["first"] = bytes(payload[:4])
        reply = holder["server"].allocate(len(payload))
        reply[:4] = b"pong"                       # filled in place on the server side too
        return reply

    holder["server"] = hintens.Server(sock_path, handler).start()
    try:
        with hintens.Client(sock_path, timeout=30) as client:
            buffer = client.allocate(4 * MIB)
            array = np.frombuffer(buffer, dtype=np.uint8)
            array[:4] = list(b"ping")
            del array
            pool = client._endpoint.pool
            segments_before = len(pool._segments)
            reply = client.request(buffer)
            assert bytes(reply[:4]) == b"pong" and len(reply) == 4 * MIB
            assert seen == {"lent": True, "first": b"ping"}
            assert len(pool._segments) == segments_before   # the send took no second segment
            assert client._endpoint._allocations == {}
            done(reply)
    finally:
        holder["server"].close()


def test_allocate_needs_shared_memory(sock_path):
    with hintens.Server(sock_path, shm=False).start() as server:
        with hintens.Client(sock_path) as client:
            with pytest.raises(hintens.ShmError, match="negotiate"):
                client.allocate(MIB)
        with pytest.raises(RuntimeError, match="handlers"):
            server.allocate(MIB)


def test_writable_replies_are_private_copies_on_write(sock_path):
    holder = {}

    def handler(payload):
        reply = holder["server"].allocate(MIB)
        reply[:5] = b"fresh"
        return reply

    holder["server"] = hintens.Server(sock_path, handler).start()
    try:
        with hintens.Client(sock_path, timeout=30) as client:
            reply = client.request(b"x", writable=True)
            array = np.frombuffer(reply, dtype=np.uint8)
            assert array.flags.writeable
            array[:5] = list(b"MINE!")                 # lands in our private pages only
            assert bytes(reply[:5]) == b"MINE!"
            del array
            done(reply)
            time.sleep(0.2)                            # the segment travels back
            again = client.request(b"x")               # the server reuses its segment
            assert bytes(again[:5]) == b"fresh"        # our writes never reached it
            done(again)
    finally:
        holder["server"].close()


@pytest.mark.skipif(hintens.implementation != "cython", reason="the pure-Python core copies")
def test_server_handlers_can_receive_writable_views(sock_path):
    seen = {}

    def handler(payload):
        array = np.frombuffer(payload, dtype=np.uint8)
        seen["writable"] = array.flags.writeable
        array[:2] = 1                                  # allowed: a private copy
        return bytes(payload[:2])

    with hintens.Server(sock_path, handler, writable=True).start():
        with hintens.Client(sock_path, timeout=30) as client:
            assert client.request(bytes(MIB)) == b"\x01\x01"
    assert seen == {"writable": True}


def _address(buffer):
    anchor = ctypes.c_char.from_buffer(buffer) if not isinstance(buffer, memoryview) \
        else None
    if anchor is None:
        return np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    address = ctypes.addressof(anchor)
    del anchor
    return address


def test_an_echo_returns_in_the_requesters_own_segment(sock_path):
    with hintens.Server(sock_path).start():                  # the default handler echoes
        with hintens.Client(sock_path, timeout=30) as client:
            payload = np.arange(MIB, dtype=np.uint64)        # 8 MiB
            pool = client._endpoint.pool
            for _ in range(5):
                reply = client.request(payload)
                assert np.frombuffer(reply, dtype=np.uint64)[-1] == MIB - 1
                if LENT is memoryview:
                    # The reply's bytes lie inside one of our own segments: not copied back.
                    where = _address(reply)
                    assert any(_address(seg.map) <= where < _address(seg.map) + seg.size
                               for seg in pool._segments.values())
                done(reply)
            assert len(pool._segments) <= 2   # a release may still be in flight
            # The server's last release follows its last reply on the stream; an idle client
            # reads nothing, so one more round trip brings it in, deterministically.
            assert client.request(b"x") == b"x"
            assert not pool._peer and not pool._local and len(pool._free) == len(pool._segments)


def test_descriptor_flags_are_checked():
    with pytest.raises(hintens.ShmError):
        _shm.decode_descriptor(_shm.DESCRIPTOR.pack(1, 3, MIB, 0, 1))   # NEW and PEER
    with pytest.raises(hintens.ShmError):
        _shm.decode_descriptor(_shm.DESCRIPTOR.pack(1, 4, MIB, 0, 1))   # unknown bit
    with pytest.raises(hintens.ShmError):
        _shm.decode_descriptor(b"short")


def test_a_peer_segment_we_never_lent_gets_shm_error(sock_path, server_process):
    peer = ShmPeer(sock_path)
    peer.send(raw_frame(_shm.encode_descriptor(9, MIB, 0, 10, False, peer=True), flags=1,
                        request_id=5))
    frame = peer.next_frame()
    while frame.type == 3:
        frame = peer.next_frame()
    assert frame.type == 4 and frame.request_id == 5
    assert hintens.wire.decode_error_payload(frame.payload)[0] == ErrorCode.SHM_ERROR
    assert_still_serving(peer)
    peer.close()


def test_a_retired_segment_id_may_be_introduced_again(sock_path):
    """HRET (section 9): the receiver forgets the retired ids at once, so the sender may
    introduce the same id again with another memfd; an id it does not map is ignored; and
    nothing of the retired segments stays mapped."""
    from .peers import memfd_mappings, wait_until

    def hostile_mappings():
        return [line for line in memfd_mappings() if "memfd:hostile" in line]

    with hintens.Server(sock_path, lambda payload: bytes(payload)).start():
        peer = ShmPeer(sock_path)
        try:
            for request_id, text in ((1, b"first"), (2, b"second")):
                fd = memfd(MIB, fcntl.F_SEAL_SHRINK, text)
                try:
                    peer.send_shm(request_id, 5, MIB, 0, len(text), True, fd)
                finally:
                    os.close(fd)
                seen = peer.until(lambda f, r=request_id: f.type == 2 and f.request_id == r)
                assert bytes(seen[-1].payload) == text
                peer.send(raw_frame(_shm.encode_control(_shm.RETIRE_MAGIC, [5, 99]),
                                    msg_type=3, request_id=0))
            peer.send(raw_frame(b"still", request_id=3))
            seen = peer.until(lambda f: f.type == 2 and f.request_id == 3)
            assert bytes(seen[-1].payload) == b"still"
            assert not [f for f in seen if f.type == 4]   # no Error for the unknown id 99
            assert wait_until(lambda: not hostile_mappings())
        finally:
            peer.close()
