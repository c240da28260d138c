"""Shared-memory sends that wait: a sender that finds every segment lent out keeps its
connection's reads going so that the release can arrive; allocate() gives back what it took
and what is dropped; a writable echo is copy-on-write; a server out of segments answers
UNAVAILABLE."""

from __future__ import annotations

import gc
import socket
import struct
import threading
import time

import numpy as np
import pytest

import hintens
from hintens.protocol import shm as _shm
from hintens.protocol.endpoint import FEATURE_SHM, Hello

from .peers import raw_frame, raw_listener

MIB = 1 << 20
CYTHON = hintens.implementation == "cython"


def done(reply):
    if isinstance(reply, memoryview):
        reply.release()


class ReleasingLater:
    """A raw server that answers each SHM Request inline at once, and sends the release of
    its segment only ``delay_s`` later, on its own: the client must be reading to see it."""

    def __init__(self, path, delay_s):
        self.listener = raw_listener(path)
        self.delay_s = delay_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        conn.sendall(raw_frame(Hello(features=FEATURE_SHM).encode(), msg_type=3, request_id=0))
        decoder = hintens._python_core.FrameDecoder()
        try:
            while True:
                data, ancillary, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(64))
                for level, kind, fds in ancillary:
                    for (fd,) in struct.iter_unpack("i", fds[:len(fds) - len(fds) % 4]):
                        __import__("os").close(fd)
                if not data:
                    return
                for frame in decoder.feed(data):
                    if frame.type != 1:
                        continue
                    conn.sendall(raw_frame(b"ok", msg_type=2, request_id=frame.request_id))
                    if frame.flags & 1:
                        segment = _shm.DESCRIPTOR.unpack(bytes(frame.payload))[0]
                        threading.Timer(self.delay_s, self._release, (conn, segment)).start()
        except OSError:
            return

    @staticmethod
    def _release(conn, segment):
        try:
            conn.sendall(raw_frame(_shm.encode_control(_shm.RELEASE_MAGIC, [segment]),
                                   msg_type=3, request_id=0))
        except OSError:
            pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("how", ["request", "allocate"])
def test_a_sender_out_of_segments_reads_until_the_release_comes(sock_path, how):
    server = ReleasingLater(sock_path, delay_s=0.3)
    try:
        # One segment in all: the second send must wait for the first one's release, which
        # the server sends after its reply, while the client reads nothing else.
        with hintens.Client(sock_path, timeout=5, shm_pool_bytes=MIB) as client:
            assert client.request(bytes(MIB)) == b"ok"
            started = time.monotonic()
            if how == "request":
                assert client.request(bytes(MIB)) == b"ok"
            else:
                buffer = client.allocate(MIB)
                assert client.request(buffer) == b"ok"
            waited = time.monotonic() - started
            assert 0.2 <= waited < 4      # it waited for the release, and got it
            assert len(client._endpoint.pool._segments) == 1
    finally:
        server.close()


def test_python_to_python_with_a_small_pool(sock_path):
    # The echo's release follows its reply (PROTOCOL.md 9): with one segment per side, each
    # next request needs that release, which only a reading sender receives.
    with hintens.Server(sock_path, shm_pool_bytes=MIB).start():
        with hintens.Client(sock_path, timeout=10, shm_pool_bytes=MIB) as client:
            errors = []

            def work(seed):
                try:
                    for i in range(8):
                        payload = bytes([seed, i]) * (MIB // 4)
                        reply = client.request(payload)
                        assert bytes(reply) == payload
                        done(reply)
                except Exception as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert errors == []


def test_a_server_reply_waits_for_a_release_that_comes_after_the_request(sock_path):
    # Request 2 leaves while reply 1 is still held; reply 1 is released afterwards. The
    # server, out of segments, must read that release while request 2 waits for one.
    with hintens.Server(sock_path, lambda p: bytes(MIB), shm_pool_bytes=MIB).start():
        with hintens.Client(sock_path, timeout=10) as client:
            first = client.request(b"one")
            second = []
            worker = threading.Thread(target=lambda: second.append(client.request(b"two")))
            worker.start()
            time.sleep(0.3)             # request 2 is with the server, waiting
            done(first)                 # its release goes out now
            worker.join(10)
            assert len(second[0]) == MIB
            done(second[0])


@pytest.mark.skipif(not CYTHON, reason="the pure-Python core copies replies: none is held")
def test_a_server_out_of_segments_answers_unavailable(sock_path):
    with hintens.Server(sock_path, lambda p: bytes(MIB), shm_pool_bytes=MIB,
                        send_timeout=0.5).start():
        with hintens.Client(sock_path, timeout=10) as client:
            held = client.request(b"one")          # holds the server's only segment
            with pytest.raises(hintens.UnavailableError, match="no shared memory"):
                client.request(b"two")
            done(held)
            reply = client.request(b"three")      # released: served again
            assert len(reply) == MIB
            done(reply)


# allocate() ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, error", [(-5, ValueError), (0, ValueError), (1.5, TypeError),
                                         ("1", TypeError), (True, TypeError)])
def test_a_bad_allocate_takes_nothing(sock_path, size, error):
    with hintens.Server(sock_path).start():
        with hintens.Client(sock_path) as client:
            client.request(b"x")
            with pytest.raises(error, match="size"):
                client.allocate(size)
            pool = client._endpoint.pool
            assert pool._segments == {} and not pool._peer


def test_an_allocation_over_the_pool_takes_nothing(sock_path):
    with hintens.Server(sock_path).start():
        with hintens.Client(sock_path, shm_pool_bytes=4 * MIB) as client:
            client.request(b"x")
            with pytest.raises(hintens.ShmError, match="exceeds"):
                client.allocate(5 * MIB)
            assert client._endpoint.pool._segments == {}


def test_dropped_buffers_give_their_segments_back(sock_path):
    with hintens.Server(sock_path).start():
        with hintens.Client(sock_path, timeout=2, shm_pool_bytes=64 * MIB) as client:
            client.request(b"x")
            for _ in range(64):                 # 64 x 1 MiB: the whole pool, 64 times over
                buffer = client.allocate(MIB)
                buffer[:1] = b"a"
                del buffer                      # never sent
            gc.collect()                        # (the pure-Python core: a finalizer)
            pool = client._endpoint.pool
            assert not pool._peer and len(pool._free) == len(pool._segments) == 1
            buffer = client.allocate(MIB)
            buffer[:5] = b"echo:"
            reply = client.request(buffer)      # introduced again: the server maps it fine
            assert bytes(reply[:5]) == b"echo:"
            done(reply)


def test_release_gives_a_buffer_back_at_once(sock_path):
    with hintens.Server(sock_path).start():
        with hintens.Client(sock_path, shm_pool_bytes=MIB) as client:
            client.request(b"x")
            for _ in range(5):
                buffer = client.allocate(MIB)
                if CYTHON:
                    buffer.release()          # explicit: back in the pool now
                else:
                    del buffer
                    gc.collect()
            assert not client._endpoint.pool._peer


# Writable echoes --------------------------------------------------------------------------

@pytest.mark.skipif(not CYTHON, reason="the pure-Python core copies: trivially writable")
def test_a_writable_echo_is_a_copy_on_write_view_of_our_own_segment(sock_path):
    with hintens.Server(sock_path).start():                 # the default handler echoes
        with hintens.Client(sock_path, timeout=10) as client:
            buffer = client.allocate(2 * MIB)
            np.frombuffer(buffer, dtype=np.uint8)[:] = 7
            reply = client.request(buffer, writable=True)   # PEER_SEGMENT: our own segment
            assert not reply.readonly
            reply[:3] = b"new"                              # private: the segment is not
            assert bytes(reply[:4]) == b"new\x07"
            assert bytes(buffer[:4]) == b"\x07" * 4
            reply.release()
            buffer.release()
            client.request(b"x")                          # reads the server's release
            assert not client._endpoint.pool._peer and not client._endpoint.pool._local
