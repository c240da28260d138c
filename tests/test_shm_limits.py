"""What a peer may make us map: per-connection and server-wide caps on shared memory, checked
before anything is mapped; no descriptor kept per segment; checked descriptor arithmetic; and
the rule that hands every refused segment back (HREL if mapped, HREJ if not).

The hostile peers here are raw sockets sending hand-made hellos, descriptors and memfds, at
servers in their own processes, so that the server's descriptors, mappings and memory can be
read from /proc while it keeps serving.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import socket
import struct
import threading
import time

import pytest

import hintens
from hintens import ErrorCode
from hintens.protocol import shm as _shm
from hintens.protocol.endpoint import FEATURE_SHM, Hello

from .peers import (
    RawPeer,
    ShmPeer,
    fd_table,
    memfd,
    memfd_fds,
    memfd_mappings,
    open_fds,
    raw_frame,
    raw_listener,
    read_requests,
    server_log,
    settled_fds,
    start_server_with,
    status_kib,
    stop_server,
    wait_until,
)

MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
SEALED = fcntl.F_SEAL_SHRINK
CYTHON = hintens.implementation == "cython"


@pytest.fixture
def server(sock_path):
    process = start_server_with(sock_path)
    process.fds = settled_fds(sock_path, process.pid)
    yield process
    stop_server(process, signal.SIGKILL)


def answer(peer, request_id):
    """The Response or Error that answers ``request_id`` (control Events before it noted)."""
    frames = peer.until(lambda f: f.type in (2, 4) and f.request_id == request_id)
    return frames[-1], peer.controls(frames)


def error_of(frame):
    assert frame.type == 4, frame
    return hintens.wire.decode_error_payload(frame.payload)


def assert_serves(peer, request_id=999):
    peer.send(raw_frame(b"echo:alive", request_id=request_id))
    frame, _ = answer(peer, request_id)
    assert (frame.type, bytes(frame.payload)) == (2, b"alive")


def baseline(server):
    """The server's descriptors (at rest, from the fixture) and resident memory (KiB)."""
    return server.fds, status_kib("VmRSS", server.pid)


def assert_near_baseline(pid, before, rss_slack_kib=32 * 1024):
    fds, rss = before
    assert wait_until(lambda: open_fds(pid) <= fds and not memfd_mappings(pid)), \
        (open_fds(pid), fds, len(memfd_mappings(pid)))
    assert memfd_fds(pid) == 0
    assert status_kib("VmRSS", pid) - rss < rss_slack_kib


# One connection's caps -----------------------------------------------------------------------

def test_a_sparse_terabyte_segment_is_refused_before_it_is_mapped(sock_path, server):
    before = baseline(server)
    peer = ShmPeer(sock_path)
    fd = memfd(TIB, SEALED, b"echo:x")          # sealed, 1 TiB declared, nothing allocated
    peer.send_shm(5, 1, TIB, 0, 6, True, fd)
    os.close(fd)
    frame, controls = answer(peer, 5)
    code, message = error_of(frame)
    assert code == ErrorCode.SHM_ERROR and "shm_receive_bytes" in message
    assert (_shm.REJECT_MAGIC, [1]) in controls        # not mapped: introduce it again, or not
    assert memfd_mappings(server.pid) == []             # nothing was mapped, even for a moment
    assert_serves(peer)
    peer.close()
    assert_near_baseline(server.pid, before)


def test_repeated_huge_segments_cannot_exhaust_address_space(sock_path, server):
    before = baseline(server)
    vm_before = status_kib("VmSize", server.pid)
    peer = ShmPeer(sock_path)
    for n in range(1, 201):                            # 200 x 1 TiB: 200 TiB if mapped
        fd = memfd(TIB, SEALED)
        peer.send_shm(n, n, TIB, 0, 10, True, fd)
        os.close(fd)
    for n in range(1, 201):
        frame, _ = answer(peer, n)
        assert error_of(frame)[0] == ErrorCode.SHM_ERROR
    assert status_kib("VmSize", server.pid) - vm_before < 256 * 1024   # KiB: no TiB mapped
    with hintens.Client(sock_path) as other:           # and it still accepts and serves
        assert other.request(b"echo:next") == b"next"
    peer.close()
    assert_near_baseline(server.pid, before)


def test_thousands_of_small_segments_pin_no_descriptors(sock_path, server):
    before = baseline(server)
    peer = ShmPeer(sock_path)
    count = 3000
    served, refused, controls = 0, 0, []
    for n in range(1, count + 1):
        fd = memfd(4096, SEALED, b"echo:%d" % n)
        peer.send_shm(n, n, 4096, 0, len(b"echo:%d" % n), True, fd)
        os.close(fd)
        frame, found = answer(peer, n)
        controls += found
        if frame.type == 2:
            served += 1
        else:
            code, message = error_of(frame)
            assert code == ErrorCode.SHM_ERROR and "shm_receive_segments" in message
            refused += 1
    # The first 64 were mapped (each payload released after its reply); the rest refused
    # unmapped, each handed back with an HREJ.
    assert served == 64 and refused == count - 64
    rejected = {i for magic, ids in controls if magic == _shm.REJECT_MAGIC for i in ids}
    assert rejected == set(range(65, count + 1))
    if CYTHON:   # the compiled core keeps no descriptor for a mapped segment
        assert memfd_fds(server.pid) == 0
    assert len(memfd_mappings(server.pid)) <= 64
    # The connection, and the flusher's epoll set and wake-up pipe while it runs.
    assert open_fds(server.pid) <= before[0] + 1 + 3 + (64 if not CYTHON else 0)
    assert_serves(peer)
    peer.close()
    assert_near_baseline(server.pid, before)


@pytest.mark.parametrize("offset, length", [
    (0, 2**63), (2**63, 2**63), (2**64 - 1, 1), (1, 2**64 - 1), (MIB, 1), (MIB + 1, 0),
])
def test_descriptor_arithmetic_cannot_overflow(sock_path, server, offset, length):
    peer = ShmPeer(sock_path)
    fd = memfd(MIB, SEALED, b"echo:mapped")
    peer.send_shm(1, 3, MIB, 0, 11, True, fd)            # a good segment, mapped and used
    os.close(fd)
    assert bytes(answer(peer, 1)[0].payload) == b"mapped"
    peer.send_shm(2, 3, MIB, offset, length, False)      # now the same segment, out of range
    frame, controls = answer(peer, 2)
    code, message = error_of(frame)
    assert code == ErrorCode.SHM_ERROR and "outside" in message
    assert_serves(peer)                                  # the connection stays
    assert (_shm.RELEASE_MAGIC, [3]) in controls + peer.controls(peer.frames)
    peer.close()


def test_a_segment_size_that_disagrees_with_the_mapping_is_refused(sock_path, server):
    peer = ShmPeer(sock_path)
    fd = memfd(MIB, SEALED, b"echo:ok")
    peer.send_shm(1, 3, MIB, 0, 7, True, fd)
    os.close(fd)
    assert bytes(answer(peer, 1)[0].payload) == b"ok"
    peer.send_shm(2, 3, TIB, TIB - 10, 10, False)         # claims the segment grew to 1 TiB
    code, message = error_of(answer(peer, 2)[0])
    assert code == ErrorCode.SHM_ERROR and "not 1099511627776" in message
    assert_serves(peer)
    peer.close()


# Across connections ----------------------------------------------------------------------------

def test_the_server_wide_cap_bounds_all_connections_together(sock_path):
    process = start_server_with(sock_path, shm_receive_total_bytes=3 * MIB)
    try:
        first, second = ShmPeer(sock_path), ShmPeer(sock_path)
        fd = memfd(2 * MIB, SEALED, b"echo:first")
        first.send_shm(1, 1, 2 * MIB, 0, 10, True, fd)
        os.close(fd)
        assert bytes(answer(first, 1)[0].payload) == b"first"
        fd = memfd(2 * MIB, SEALED, b"echo:second")
        second.send_shm(1, 1, 2 * MIB, 0, 11, True, fd)
        os.close(fd)
        code, message = error_of(answer(second, 1)[0])
        assert code == ErrorCode.SHM_ERROR and "shm_receive_total_bytes" in message
        first.close()                 # its mapping goes: the budget comes back
        assert wait_until(lambda: not memfd_mappings(process.pid))
        fd = memfd(2 * MIB, SEALED, b"echo:again")
        second.send_shm(2, 1, 2 * MIB, 0, 10, True, fd)   # introduced again, after the HREJ
        os.close(fd)
        assert bytes(answer(second, 2)[0].payload) == b"again"
        second.close()
    finally:
        stop_server(process, signal.SIGKILL)


def test_caps_are_announced_and_a_hintens_client_keeps_to_them(sock_path):
    with hintens.Server(sock_path, shm_receive_segments=2, shm_receive_bytes=4 * MIB).start():
        with hintens.Client(sock_path, timeout=30) as client:
            client.request(b"hello")
            assert (client.peer_hello.shm_receive_segments,
                    client.peer_hello.shm_receive_bytes) == (2, 4 * MIB)
            pool = client._endpoint.pool
            assert (pool.max_segments, pool.max_bytes) == (2, 4 * MIB)
            errors = []

            def work(seed):
                try:
                    for i in range(6):
                        payload = bytes([seed, i]) * (MIB // 2)
                        reply = client.request(payload)
                        assert bytes(reply) == payload
                        if isinstance(reply, memoryview):
                            reply.release()
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert errors == []
            assert len(pool._segments) <= 2


# The same caps on the client side, against a hostile server --------------------------------------

class HostileServer:
    """A raw server that speaks just enough: a hello announcing shared memory, then for each
    Request the reply ``respond(request_id, conn)`` writes."""

    def __init__(self, path, respond):
        self.listener = raw_listener(path)
        self.respond = respond
        self.seen = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        self.conn = conn
        conn.sendall(raw_frame(Hello(features=FEATURE_SHM).encode(), msg_type=3, request_id=0))
        decoder = hintens._python_core.FrameDecoder()
        try:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    return
                for frame in decoder.feed(data):
                    self.seen.append(frame)
                    if frame.type == 1:
                        self.respond(frame.request_id, conn)
        except OSError:
            return

    def close(self):
        try:
            self.conn.close()
        except (AttributeError, OSError):
            pass
        self.listener.close()
        self.thread.join(5)


def _shm_response(request_id, segment_id, size, offset, length, new, fd=None):
    frame = raw_frame(_shm.encode_descriptor(segment_id, size, offset, length, new), flags=1,
                      msg_type=2, request_id=request_id)
    return [frame], [] if fd is None else [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]


@pytest.mark.parametrize("case", ["sparse_terabyte", "overflow", "bad_flags"])
def test_the_client_refuses_hostile_replies_with_a_shm_error(sock_path, case):
    def respond(request_id, conn):
        if request_id == 1:        # the attack
            if case == "sparse_terabyte":
                fd = memfd(TIB, SEALED)
                conn.sendmsg(*_shm_response(1, 9, TIB, 0, TIB, True, fd))
                os.close(fd)
            elif case == "overflow":
                fd = memfd(MIB, SEALED)
                conn.sendmsg(*_shm_response(1, 9, MIB, 0, 10, True, fd))   # fine...
                os.close(fd)
            else:
                conn.sendall(raw_frame(struct.pack("<IIQQQ", 9, 0x80, MIB, 0, 10), flags=1,
                                       msg_type=2, request_id=1))
        elif request_id == 2 and case == "overflow":
            conn.sendmsg(*_shm_response(2, 9, MIB, 2**63, 2**63, False))   # ...then this
        else:
            conn.sendall(raw_frame(b"fine", msg_type=2, request_id=request_id))

    hostile = HostileServer(sock_path, respond)
    try:
        with hintens.Client(sock_path, timeout=10) as client:
            if case == "overflow":
                reply = client.request(b"first")
                assert len(reply) == 10
                if isinstance(reply, memoryview):
                    reply.release()
            with pytest.raises(hintens.ShmError) as caught:
                client.request(b"attack")
            assert not caught.value.fatal
            assert client.request(b"after") == b"fine"      # the connection stays
            assert not client.closed
            assert len(client._endpoint.segments) <= 1
        controls = [_shm.decode_control(f.payload) for f in hostile.seen
                    if f.type == 3 and f.request_id == 0 and f.payload[:4] != b"HELO"]
        expected = {"sparse_terabyte": (_shm.REJECT_MAGIC, [9]),
                    "overflow": (_shm.RELEASE_MAGIC, [9]), "bad_flags": (_shm.REJECT_MAGIC, [9])}
        assert expected[case] in controls
    finally:
        hostile.close()


def test_a_reject_makes_the_sender_introduce_the_segment_again(sock_path):
    listener = raw_listener(sock_path)
    result = {}

    def serve():
        conn, _ = listener.accept()
        conn.sendall(raw_frame(Hello(features=FEATURE_SHM).encode(), msg_type=3, request_id=0))
        first = _read_shm_request(conn)
        # Refuse the segment as if over our cap, and answer.
        conn.sendall(raw_frame(_shm.encode_control(_shm.REJECT_MAGIC, [first["segment"]]),
                               msg_type=3, request_id=0)
                     + raw_frame(b"refused", msg_type=2, request_id=first["request_id"]))
        second = _read_shm_request(conn)
        conn.sendall(raw_frame(b"mapped", msg_type=2, request_id=second["request_id"]))
        result.update(first=first, second=second)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with hintens.Client(sock_path, timeout=10) as client:
            assert client.request(bytes(MIB)) == b"refused"
            assert client.request(bytes(MIB)) == b"mapped"
        thread.join(10)
        first, second = result["first"], result["second"]
        assert first["new"] and first["fd"]
        # The same segment, reused, but introduced again: NEW_SEGMENT with its descriptor.
        assert second["segment"] == first["segment"] and second["new"] and second["fd"]
    finally:
        listener.close()


def _read_shm_request(conn):
    """Read until an SHM Request arrives; what it says, and whether a descriptor came."""
    decoder = hintens._python_core.FrameDecoder()
    got_fd = False
    while True:
        data, ancillary, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 16))
        for level, kind, fds in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got_fd = True
                for (fd,) in struct.iter_unpack("i", fds[:len(fds) - len(fds) % 4]):
                    os.close(fd)
        assert data, "the client hung up"
        for frame in decoder.feed(data):
            if frame.type == 1 and frame.flags & 1:
                segment, flags = _shm.DESCRIPTOR.unpack(bytes(frame.payload))[:2]
                return {"request_id": frame.request_id, "segment": segment,
                        "new": bool(flags & _shm.NEW_SEGMENT), "fd": got_fd}


# Handing refused segments back, exactly as the spec says -------------------------------------

@pytest.mark.parametrize("case, expected", [
    ("unsealed", (_shm.REJECT_MAGIC, [1])),
    ("undersized", (_shm.REJECT_MAGIC, [1])),
    ("no_descriptor", (_shm.REJECT_MAGIC, [1])),
    ("unknown_segment", (_shm.REJECT_MAGIC, [42])),
    ("unknown_flag_bits", (_shm.REJECT_MAGIC, [1])),
    ("not_negotiated", (_shm.REJECT_MAGIC, [1])),
    ("out_of_range_on_a_new_segment", (_shm.REJECT_MAGIC, [1])),   # checked before mapping
    ("short_descriptor", None),
    ("segment_id_zero", None),
    ("peer_segment_never_lent", None),
    ("error_frame_with_shm", (_shm.REJECT_MAGIC, [1])),
])
def test_every_refusal_hands_the_segment_back_as_the_spec_says(sock_path, server, case,
                                                                expected):
    before = server.fds
    peer = RawPeer(sock_path) if case == "not_negotiated" else ShmPeer(sock_path)
    fd = None
    if case == "unsealed":
        fd = memfd(MIB)
        peer.send_shm(5, 1, MIB, 0, 10, True, fd)
    elif case == "undersized":
        fd = memfd(4096, SEALED)
        peer.send_shm(5, 1, MIB, 0, 10, True, fd)
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
        fd = memfd(MIB, SEALED)
        peer.send_shm(5, 1, MIB, MIB - 5, 10, True, fd)
    elif case == "short_descriptor":
        peer.send(raw_frame(b"\x01" * 31, flags=1, request_id=5))
    elif case == "segment_id_zero":
        peer.send_shm(5, 0, MIB, 0, 10, False)
    elif case == "peer_segment_never_lent":
        peer.send_shm(5, 7, MIB, 0, 10, False, descriptor_flags=_shm.PEER_SEGMENT)
    elif case == "error_frame_with_shm":
        fd = memfd(MIB, SEALED)
        peer.send_shm(5, 1, MIB, 0, 10, True, fd, msg_type=4)
    if case == "error_frame_with_shm":   # Errors are never answered: look for the hand-back
        frames = peer.until(lambda f: f.type == 3 and f.request_id == 0
                            and bytes(f.payload[:4]) in (b"HREL", b"HREJ"))
        assert peer.controls(frames)[-1] == expected
    else:
        frame, controls = answer(peer, 5)
        assert error_of(frame)[0] == ErrorCode.SHM_ERROR
        handed_back = [c for c in controls if c[0] in (_shm.RELEASE_MAGIC, _shm.REJECT_MAGIC)]
        assert handed_back == ([] if expected is None else [expected])
    assert_serves(peer)
    if fd is not None:
        os.close(fd)
    peer.close()
    assert wait_until(lambda: open_fds(server.pid) <= before), \
        (before, fd_table(server.pid))   # the descriptor was closed


def test_received_segments_keep_no_descriptor_on_either_side(sock_path):
    # In one process: every memfd descriptor open is a segment some side created (the
    # descriptor passes to the peer with NEW_SEGMENT); none is kept for a segment received.
    gc.collect()
    before = memfd_fds()      # other tests' leftovers, if any
    with hintens.Server(sock_path, lambda payload: bytes(payload)).start() as server:
        with hintens.Client(sock_path, timeout=30) as client:
            replies = [client.request(bytes([n]) * MIB) for n in range(3)]
            assert client._endpoint.segments                  # the server's, mapped here
            (connection,) = server.connections
            assert connection._endpoint.segments              # the client's, mapped there
            created = len(client._endpoint.pool._segments) \
                + len(connection._endpoint.pool._segments)
            if CYTHON:
                # A write queued with its descriptor holds a duplicate until the flusher has
                # written it (a reply behind a queued release): gone a moment later.
                wait_until(lambda: memfd_fds() - before == created, timeout_s=2.0)
                assert memfd_fds() - before == created
            else:   # mmap.mmap keeps a duplicate per mapping
                assert memfd_fds() - before > created
            for reply in replies:
                if isinstance(reply, memoryview):
                    reply.release()


# The sender's pool: what a refused or forged hand-back cannot do ---------------------------------

def _negotiated_endpoint(**options):
    from hintens.protocol.endpoint import Endpoint

    endpoint = Endpoint(features=FEATURE_SHM, **options)
    hello = Hello(features=FEATURE_SHM).encode()
    endpoint.admit([hintens._impl.core.Frame(3, 0, 0x0100, 0, hello)])
    return endpoint


def _descriptor(write):
    buffers, fds = write
    return _shm.DESCRIPTOR.unpack(bytes(memoryview(buffers[0])[24:56])), list(fds)


def test_retirements_refused_with_their_frame_go_with_the_next_one():
    endpoint = _negotiated_endpoint(shm_pool_bytes=4 * MIB)
    pool = endpoint.pool
    one = endpoint.writes(3, bytes(100_000), 1)              # segment 1, 1 MiB
    two = endpoint.writes(3, bytes(1_500_000), 2)            # segment 2, 2 MiB
    for segment_id in (1, 2):
        pool.release(segment_id)                             # both free again
    del one, two
    big = endpoint.writes(3, bytes(3_000_000), 3)            # 4 MiB: retires 1 and 2
    assert _shm.decode_control(bytes(memoryview(big[0][0][0])[24:])) == (_shm.RETIRE_MAGIC,
                                                                          [1, 2])
    endpoint.unsent(big)                                     # an offer refused it all
    nxt = endpoint.writes(3, bytes(100_000), 4)
    control = _shm.decode_control(bytes(memoryview(nxt[0][0][0])[24:]))
    assert control == (_shm.RETIRE_MAGIC, [1, 2])            # not lost with the dropped frame
    (segment_id, flags, *_), fds = _descriptor(nxt[1])
    assert flags & _shm.NEW_SEGMENT and len(fds) == 1
    del nxt
    endpoint.close_shm()


def test_a_forged_release_cannot_send_a_stale_descriptor():
    endpoint = _negotiated_endpoint()
    pool = endpoint.pool
    acquired = pool.try_acquire(MIB)
    segment_id = acquired[0]
    pool.release(segment_id)           # a peer "releases" what it has not been sent yet...
    pool.try_acquire(MIB)              # ...and another send takes it (or it is retired)
    with pytest.raises(hintens.ShmError, match="released before it was sent"):
        pool.descriptor_for(5)         # never an fd for a segment not lent
    pool.release(segment_id)
    pool.close()
    with pytest.raises(hintens.ShmError):
        pool.descriptor_for(segment_id)
    del acquired


def test_the_descriptor_a_write_carries_is_its_own_and_closes_with_it():
    endpoint = _negotiated_endpoint()
    before = open_fds()
    writes = endpoint.writes(3, bytes(100_000), 1)
    (_, fds) = writes[-1]
    assert len(fds) == 1 and fds[0] != endpoint.pool._segments[1].fd   # a duplicate
    with_write = open_fds()
    del writes, fds
    assert open_fds() == with_write - 1      # the write's own, closed with it
    endpoint.close_shm()
    assert open_fds() == before


# Descriptors are claimed by their frames in stream order -----------------------------------------

def test_a_reply_waiting_for_a_segment_does_not_cross_wire_later_segments(sock_path):
    # The server's only segment is lent to the client, so the reply to "need" waits, reading
    # on; meanwhile two Events introduce the client's segments 1 and 2. Each must be read from
    # its own descriptor, whatever the order in which the server's reads admit them.
    seen = []

    def handler(payload):
        if bytes(payload) == b"sleep":
            time.sleep(0.3)
            return b"ok"
        return b"R" * 100_000

    with hintens.Server(sock_path, handler, on_event=lambda p, c: seen.append(bytes(p[:4])),
                        shm_pool_bytes=MIB).start():
        peer = ShmPeer(sock_path)
        peer.send(raw_frame(b"hold", request_id=1))
        assert answer(peer, 1)[0].flags & 1           # lent, and kept: no release
        fd_a, fd_b = memfd(MIB, SEALED, b"AAAA" * 16), memfd(MIB, SEALED, b"BBBB" * 16)
        peer.send(raw_frame(b"sleep", request_id=2))
        time.sleep(0.05)
        peer.send(raw_frame(b"need", request_id=3))
        peer.send_shm(11, 1, MIB, 0, 64, True, fd_a, msg_type=3)
        time.sleep(0.6)
        peer.send_shm(12, 2, MIB, 0, 64, True, fd_b, msg_type=3)
        time.sleep(0.3)
        peer.send(raw_frame(_shm.encode_control(_shm.RELEASE_MAGIC, [1]), msg_type=3,
                            request_id=0))
        assert wait_until(lambda: len(seen) == 2)
        peer.send_shm(13, 1, MIB, 0, 64, False, msg_type=3)   # segment 1 again, by id
        assert wait_until(lambda: len(seen) == 3)
        assert seen == [b"AAAA", b"BBBB", b"AAAA"]
        os.close(fd_a)
        os.close(fd_b)
        peer.close()


# A client that goes while it is answered; echoes on the exactly-once path ----------------------

def test_a_client_that_hangs_up_while_answered_is_not_a_handler_failure(sock_path, caplog):
    # Its replies wait for the server's only segment, which it never gives back; then it
    # goes. That ends the connection quietly: no "handler failed" per queued request.
    with caplog.at_level(logging.INFO, logger="hintens"):
        with hintens.Server(sock_path, shm_pool_bytes=MIB, send_timeout=5).start() as server:
            peer = ShmPeer(sock_path)
            for n in range(1, 21):
                peer.send(raw_frame(b"e" * 66_000, request_id=n))
            answer(peer, 1)                       # the first reply took the segment
            time.sleep(0.2)                       # the second waits for it, reading
            peer.close()
            assert wait_until(lambda: not server.connections)
    assert "handler failed" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("ring", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        getattr(hintens._impl.core, "Ring", None) is None,
        reason="only the compiled core speaks the shared-memory ring")),
])
def test_a_reply_through_a_new_segment_to_a_client_gone_leaves_no_descriptor(sock_path, ring):
    # The handler answers after the client gave up and closed: the reply's write, with the
    # duplicate of its new segment's descriptor, fails. That descriptor must close with the
    # connection, not wait for the garbage collector (which an idle server may never run).
    process = start_server_with(sock_path, ring=ring)
    try:
        with hintens.Client(sock_path, ring=ring, timeout=10) as client:   # the pool, warm
            assert len(client.request(b"sleep:0:" + b"w" * 100_000)) == 100_000
        assert wait_until(lambda: memfd_fds(process.pid) == 0
                          and not memfd_mappings(process.pid))
        client = hintens.Client(sock_path, ring=ring, timeout=0.3)
        with pytest.raises(hintens.Timeout):
            client.request(b"sleep:1.5:" + b"t" * 100_000)    # answered through a segment
        client.close()
        time.sleep(1.5)                                       # the reply meets nobody
        assert wait_until(lambda: memfd_fds(process.pid) == 0
                          and not memfd_mappings(process.pid)), \
            (memfd_fds(process.pid), memfd_mappings(process.pid))
        with hintens.Client(sock_path, ring=ring, timeout=10) as client:
            assert bytes(client.request(b"echo:alive")) == b"alive"
        assert "Traceback" not in server_log(process), server_log(process)
    finally:
        stop_server(process, signal.SIGKILL)


@pytest.mark.skipif(not CYTHON, reason="the pure-Python core copies: no lent view is held")
def test_an_exactly_once_echo_of_a_huge_sparse_segment_costs_no_copy(sock_path):
    # A session's answers are kept for retries, but only when small enough to keep: the
    # echo of a sparse 512 MiB segment must not be copied to find that out.
    process = start_server_with(sock_path, handler="hintens.sync.server:echo")
    try:
        peer = ShmPeer(sock_path, entries={4: b"s" * 16})   # a session id: the replay path
        peer.send(raw_frame(b"warm", request_id=99))
        assert bytes(answer(peer, 99)[0].payload) == b"warm"
        rss = status_kib("VmRSS", process.pid)
        fd = memfd(512 * MIB, SEALED, b"head")
        peer.send_shm(1, 1, 512 * MIB, 0, 512 * MIB, True, fd)
        os.close(fd)
        frame, _ = answer(peer, 1)
        segment_id, flags = _shm.DESCRIPTOR.unpack(bytes(frame.payload))[:2]
        assert frame.type == 2 and flags & _shm.PEER_SEGMENT and segment_id == 1   # an echo
        assert status_kib("VmRSS", process.pid) - rss < 64 * 1024
        peer.close()
    finally:
        stop_server(process, signal.SIGKILL)
