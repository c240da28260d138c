"""Each side honours the limit the other announced in its hello (key 3): a payload over it goes
through shared memory when that was negotiated, and otherwise fails locally with
FrameTooLargeError before a byte is sent; a reply that cannot reach the client is an Error."""

from __future__ import annotations

import mmap
import signal

import pytest

import hintens
from hintens import ErrorCode
from hintens.protocol.endpoint import FEATURE_SHM, Hello

from .peers import RawPeer, ShmPeer, raw_frame, start_server, stop_server

MIB = 1 << 20
CYTHON = hintens.implementation == "cython"


def done(reply):
    if isinstance(reply, memoryview):
        reply.release()


def _answer(peer, request_id):
    frames = peer.until(lambda f: f.type in (2, 4) and f.request_id == request_id)
    return frames[-1]


@pytest.mark.parametrize("shm", [False, True])
def test_the_server_keeps_to_the_clients_announced_limit(sock_path, server_process, shm):
    # A raw client announcing max_payload 1024: a 2000-byte reply may not reach it inline.
    peer = ShmPeer(sock_path, max_payload=1024, features=FEATURE_SHM if shm else 0)
    peer.send(raw_frame(b"size:1000", request_id=1))
    frame = _answer(peer, 1)
    assert (frame.type, len(frame.payload)) == (2, 1000)
    peer.send(raw_frame(b"size:2000", request_id=2))
    frame = _answer(peer, 2)
    if shm:   # over its limit, but shared memory was negotiated: a descriptor
        assert frame.type == 2 and frame.flags & 1 and len(frame.payload) == 32
    else:
        assert frame.type == 4
        code, message = hintens.wire.decode_error_payload(frame.payload)
        assert code == ErrorCode.TOO_LARGE and "1024" in message
    peer.send(raw_frame(b"echo:still", request_id=3))   # the connection stays
    assert bytes(_answer(peer, 3).payload) == b"still"
    peer.close()


def test_an_oversized_reply_to_a_client_without_shm_is_an_error_reply(client, sock_path):
    with hintens.Client(sock_path, shm=False, timeout=30) as plain:
        with pytest.raises(hintens.RemoteProtocolError) as caught:
            plain.request(b"size:80000000")            # 80 MB, over 64 MiB
        assert caught.value.code == ErrorCode.TOO_LARGE
        assert plain.request(b"echo:after") == b"after"    # not a dead connection


def test_the_client_refuses_locally_what_the_server_would_refuse(sock_path):
    with hintens.Server(sock_path, max_payload=MIB, shm=False).start() as server:
        with hintens.Client(sock_path, timeout=10) as client:
            client.request(b"hello")                         # the server's hello is in
            assert client.peer_hello.max_payload == MIB
            with pytest.raises(hintens.FrameTooLargeError, match="nothing was sent") as caught:
                client.request(bytes(MIB + 1))
            assert not caught.value.fatal
            sent = client._channel.submitted
            with pytest.raises(hintens.FrameTooLargeError):
                client.send_event(bytes(2 * MIB))
            assert client._channel.submitted == sent         # not a byte
            assert client.request(b"fine") == b"fine"       # the connection stays
            assert len(server.connections) == 1


def test_two_gib_inline_fails_before_a_byte_is_read_or_sent(sock_path):
    # 2 GiB of untouched anonymous memory: refused from its length alone.
    huge = mmap.mmap(-1, 2 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(huge)
    try:
        with hintens.Server(sock_path, shm=False).start():
            with hintens.Client(sock_path, timeout=10) as client:
                client.request(b"hello")
                with pytest.raises(hintens.FrameTooLargeError, match="67108864"):
                    client.request(view)
                assert client.request(b"ok") == b"ok"
    finally:
        view.release()
        huge.close()


def test_over_the_peers_limit_goes_through_shared_memory_when_negotiated(sock_path):
    seen = []

    def handler(payload):
        seen.append(type(payload).__name__)
        return b"%d" % len(payload)

    with hintens.Server(sock_path, handler, max_payload=4096).start():
        with hintens.Client(sock_path, timeout=10) as client:
            client.request(b"hello")
            # 5000 bytes: far under the 64 KiB threshold, but over the server's 4096.
            assert client.request(bytes(5000)) == b"5000"
    assert seen[-1] == ("memoryview" if CYTHON else "bytes")


def test_events_keep_to_the_limit_both_ways(sock_path):
    got = []
    with hintens.Server(sock_path, shm=False, max_payload=4096,
                        on_event=lambda p, c: got.append(len(p))).start() as server:
        received = []
        with hintens.Client(sock_path, shm=False, max_payload=2048,
                            on_event=lambda p: received.append(len(p))) as client:
            client.request(b"hello")
            with pytest.raises(hintens.FrameTooLargeError):
                client.send_event(bytes(5000))
            (connection,) = server.connections
            with pytest.raises(hintens.FrameTooLargeError):
                connection.send_event(bytes(3000))
            assert server.broadcast(bytes(3000)) == 0          # skipped, logged
            assert server.broadcast(bytes(100)) == 1
            client.send_event(bytes(10))
            assert client.request(b"x") == b"x"
        assert received == [100] and got == [10]


def test_a_client_announcing_a_tiny_limit_still_gets_errors_and_releases(sock_path,
                                                                         server_process):
    # Error frames and control Events are accepted up to 4108 bytes whatever the limit: a
    # raw client that announced 1024 bytes gets a long Error message whole.
    peer = RawPeer(sock_path)
    peer.send(raw_frame(Hello(max_payload=1024).encode(), msg_type=3, request_id=0))
    peer.send(raw_frame(b"raise:" + b"x" * 3000, request_id=7))
    frame = _answer(peer, 7)
    assert frame.type == 4 and len(frame.payload) > 1024
    peer.close()


def test_the_decoder_accepts_control_frames_over_its_limit(core):
    decoder = core.FrameDecoder(max_payload=16)
    error = core.encode_frame(4, hintens.wire.encode_error_payload(5, "x" * 4096), 3)
    control = core.encode_frame(3, b"HREL" + bytes(4 + 4 * 1024), 0)
    assert [f.type for f in decoder.feed(error + control)] == [4, 3]
    with pytest.raises(hintens.FrameTooLargeError):
        decoder.feed(core.encode_frame(3, bytes(17), 1))        # a plain Event is not


def test_the_decoder_refuses_control_frames_over_the_control_limit(core):
    decoder = core.FrameDecoder(max_payload=16)
    with pytest.raises(hintens.FrameTooLargeError):
        decoder.feed(core.encode_frame(4, bytes(4109), 3))
