"""The server survives resource exhaustion: a thread that cannot start refuses one connection;
threads have small stacks; connections are bounded; unfinished frames grow as their bytes
arrive and are bounded across connections (max_pending_bytes); a closed connection's memory
is freed at once, without the cyclic GC."""

from __future__ import annotations

import array
import gc
import os
import resource
import shutil
import signal
import socket
import tempfile
import threading
import time
import weakref

import pytest

import hintens
from hintens import ErrorCode

from .peers import (
    RawPeer,
    fork_server_as,
    open_fds,
    raw_frame,
    start_server_with,
    status_kib,
    stop_server,
    wait_until,
)

MIB = 1 << 20
NOBODY = 65534


def _tasks_of(uid):
    """Threads of all processes of ``uid`` (what RLIMIT_NPROC counts)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            pass
    return total


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the server as another uid")
def test_a_thread_that_cannot_start_refuses_one_connection_and_serving_goes_on():
    directory = tempfile.mkdtemp(dir="/tmp")      # reachable by NOBODY (pytest's is not)
    os.chown(directory, NOBODY, NOBODY)
    path = os.path.join(directory, "nproc.sock")

    def limit_threads():
        # Room for the server's own thread and two connection threads, no more.
        limit = _tasks_of(NOBODY) + 2
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))

    pid = fork_server_as(NOBODY, path, limit_threads)
    try:
        # The probe that saw the socket accept had a thread; the kernel stops counting it a
        # little after it ends, so the first two connections may be refused until then.
        first = _held_connection(path)
        second = _held_connection(path)
        third = RawPeer(path)              # no thread for it: refused, with a reason
        request_id, code, message = third.next_error()
        assert (request_id, code) == (0, ErrorCode.UNAVAILABLE)
        assert "cannot start a thread" in message
        assert third.at_eof()
        third.close()
        first.close()                      # a thread ends: room for one more, once the
        assert wait_until(lambda: threads_of(pid) <= 2)   # kernel has counted it gone
        assert wait_until(lambda: _served(path, b"4"), timeout_s=10)
        assert second.request(b"still") == b"still"
        second.close()
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)   # the server process lives on
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(directory, ignore_errors=True)


def _held_connection(path):
    """A Client of NOBODY's server that has been served once (retried while refused)."""
    deadline = time.monotonic() + 10
    while True:
        client = hintens.Client(path, timeout=10, server_uids=[NOBODY])
        try:
            assert client.request(b"held") == b"held"
            return client
        except hintens.ConnectionClosed:
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _served(path, payload):
    """One request on a new connection to the server of NOBODY; False if it was refused."""
    try:
        with hintens.Client(path, timeout=10, server_uids=[NOBODY]) as client:
            return client.request(payload) == payload
    except hintens.ConnectionClosed:
        return False


def threads_of(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def test_max_connections_refuses_the_extra_ones_with_a_reason(sock_path):
    with hintens.Server(sock_path, max_connections=2).start() as server:
        a, b = hintens.Client(sock_path), hintens.Client(sock_path)
        assert a.request(b"a") == b"a" and b.request(b"b") == b"b"
        extra = RawPeer(sock_path)
        request_id, code, message = extra.next_error()
        assert (request_id, code) == (0, ErrorCode.UNAVAILABLE)
        assert "max_connections" in message
        extra.close()
        assert server.stats["connections_refused"] == 1
        a.close()
        assert wait_until(lambda: len(server.connections) == 1)
        with hintens.Client(sock_path) as c:
            assert c.request(b"c") == b"c"
        b.close()


@pytest.mark.skipif(hintens.implementation != "cython",
                    reason="only the compiled core can size thread stacks without a race")
def test_connection_threads_have_small_stacks_and_leave_the_default_alone(sock_path):
    process = start_server_with(sock_path, thread_stack_bytes=256 * 1024)
    try:
        # The first threads each get a malloc arena (64 MiB of address space, up to 8 per
        # core): open enough that the next ones show their own cost only.
        idle = [hintens.Client(sock_path) for _ in range(60)]
        for client in idle:
            client.request(b"warm")
        before = status_kib("VmSize", process.pid)
        more = [hintens.Client(sock_path) for _ in range(100)]
        for client in more:
            client.request(b"x")
        per_connection_kib = (status_kib("VmSize", process.pid) - before) / 100
        # A 256 KiB stack, a guard page and a 256 KiB receive buffer: far from 8 MiB.
        assert per_connection_kib < 1024, per_connection_kib
        for client in idle + more:
            client.close()
    finally:
        stop_server(process, signal.SIGKILL)
    # In this process: starting connection threads does not change the process default.
    with hintens.Server(sock_path + "2", thread_stack_bytes=128 * 1024).start():
        with hintens.Client(sock_path + "2") as client:
            client.request(b"x")
        assert threading.stack_size() == 0


@pytest.mark.parametrize("value", [1024, 0, -1])
def test_thread_stack_bytes_is_checked(sock_path, value):
    with pytest.raises(ValueError, match="thread_stack_bytes"):
        hintens.Server(sock_path, thread_stack_bytes=value)


# Unfinished frames ----------------------------------------------------------------------------

def _stall(path, request_id, declared, sent):
    """A raw peer that starts a Request of ``declared`` bytes and sends ``sent`` of them."""
    peer = RawPeer(path, timeout=30)
    header = raw_frame(b"", length=declared, request_id=request_id)[:24]
    peer.send(header + bytes(sent))
    return peer


def test_unfinished_frames_are_bounded_across_connections(sock_path):
    # Six peers each start a 16 MiB frame and stall 12 MiB into it; the server holds at most
    # 32 MiB of unfinished frames: two are admitted, the other four refused at once.
    process = start_server_with(sock_path, max_payload=16 * MIB,
                                max_pending_bytes=32 * MIB, frame_timeout=60)
    try:
        with hintens.Client(sock_path) as probe:
            probe.request(b"echo:warm")
        rss_before = status_kib("VmRSS", process.pid)
        peers = [_stall(sock_path, n, 16 * MIB, 12 * MIB) for n in range(1, 7)]
        refused = []
        for n, peer in enumerate(peers, 1):
            peer.sock.settimeout(0.5)
            try:
                frame = peer.next_frame()
            except socket.timeout:
                continue                    # admitted: the server waits for the rest
            request_id, code, message = (frame.request_id,
                                         *hintens.wire.decode_error_payload(frame.payload))
            assert (request_id, code) == (n, ErrorCode.UNAVAILABLE)
            assert "no room" in message
            refused.append(n)
        assert len(refused) == 4
        assert status_kib("VmRSS", process.pid) - rss_before < 40 * 1024   # KiB
        with hintens.Client(sock_path) as other:             # small frames still served
            assert other.request(b"echo:small") == b"small"
        for peer in peers:
            peer.close()
        # Freed at once when they leave (no reference cycle waiting for the cyclic GC).
        assert wait_until(lambda: status_kib("VmRSS", process.pid) - rss_before < 8 * 1024,
                          timeout_s=3)
        # With the room back, a large frame is admitted whole.
        with hintens.Client(sock_path, shm=False, timeout=30) as big:
            assert big.request(b"echo:" + bytes(15 * MIB)) == bytes(15 * MIB)
    finally:
        stop_server(process, signal.SIGKILL)


def test_a_refused_frame_is_skipped_and_the_stream_goes_on(core):
    decoder = core.FrameDecoder()
    decoder.budget = core.MemoryBudget(100_000)
    big = core.encode_frame(1, bytes(200_000), 7)
    after = core.encode_frame(1, b"after", 8)
    with pytest.raises(hintens.ProtocolError) as caught:
        decoder.feed(big[:1000])              # not whole in this read: it needs the budget
    assert caught.value.code == ErrorCode.UNAVAILABLE and not caught.value.fatal
    assert caught.value.request_id == 7
    assert decoder.budget.used == 0
    frames = decoder.feed(big[1000:] + after)  # its payload is skipped unbuffered
    assert [(f.request_id, bytes(f.payload)) for f in frames] == [(8, b"after")]


def test_an_admitted_frame_holds_its_length_until_it_completes_or_closes(core):
    budget = core.MemoryBudget(1 << 20)
    decoder, other = core.FrameDecoder(), core.FrameDecoder()
    decoder.budget = other.budget = budget
    frame = core.encode_frame(1, bytes(600_000), 1)
    assert decoder.feed(frame[:50_000]) == []
    assert budget.used == 600_000
    with pytest.raises(hintens.ProtocolError):  # no room for a second one now
        other.feed(frame[:50_000])
    (done,) = decoder.feed(frame[50_000:])
    assert len(done.payload) == 600_000 and budget.used == 0
    decoder.feed(frame[:50_000])
    decoder.close()                              # a connection that ends inside it
    assert budget.used == 0


def test_payload_buffers_grow_as_bytes_arrive(core):
    decoder = core.FrameDecoder()
    frame = core.encode_frame(1, bytes(range(256)) * 4096, 3)     # 1 MiB
    frames = []
    for start in range(0, len(frame), 70_000):
        frames += decoder.feed(frame[start:start + 70_000])
    (whole,) = frames
    assert bytes(whole.payload) == bytes(range(256)) * 4096


def test_max_pending_bytes_must_cover_max_payload(sock_path):
    with pytest.raises(ValueError, match="max_pending_bytes"):
        hintens.Server(sock_path, max_payload=8 * MIB, max_pending_bytes=4 * MIB)


# A closed connection is freed at once -----------------------------------------------------------

def test_a_closed_connection_is_freed_without_the_cyclic_gc(sock_path):
    gc.disable()
    try:
        with hintens.Server(sock_path).start() as server:
            with hintens.Client(sock_path) as client:
                client.request(b"x")
                client.request(bytes(2 * MIB))      # shared memory, lent and released
                (connection,) = server.connections
                watched = [weakref.ref(connection), weakref.ref(connection._endpoint)]
                del connection
            assert wait_until(lambda: not server.connections)
            assert wait_until(lambda: all(ref() is None for ref in watched), timeout_s=3), \
                [gc.get_referrers(ref()) for ref in watched if ref() is not None]
    finally:
        gc.enable()


@pytest.mark.parametrize("shm", [True, False])
def test_a_peer_that_passes_its_own_socket_cannot_keep_its_connection_open(sock_path, shm):
    # A descriptor that came with a plain frame is claimed by nothing and closed at once,
    # even while the core answers read after read: kept, a copy of the peer's own socket end
    # would hold the connection open after the peer closed it (no end of stream, ever).
    with hintens.Server(sock_path, shm=shm).start() as server:
        gc.collect()
        baseline = open_fds()
        peer = RawPeer(sock_path)
        assert wait_until(lambda: len(server.connections) == 1)
        for request_id in (1, 2):
            peer.sock.sendmsg([raw_frame(b"ping", request_id=request_id)], [(
                socket.SOL_SOCKET, socket.SCM_RIGHTS,
                array.array("i", [peer.sock.fileno()]).tobytes())])
            reply = peer.next_frame()
            assert (reply.request_id, bytes(reply.payload)) == (request_id, b"ping")
        peer.close()
        assert wait_until(lambda: not server.connections, timeout_s=5)
        assert wait_until(lambda: open_fds() <= baseline, timeout_s=5)
