"""The COMPRESSED flag (zstd), negotiated in the hello: on the wire against hand-written
peers, end to end between Client and Server, and the receiver's limits."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

import hintens
from hintens import _python_core as _core_py
from hintens.protocol import endpoint as _protocol
from hintens.protocol.endpoint import FEATURE_COMPRESSION, Hello

from .peers import RawPeer, raw_frame, raw_listener

zstandard = pytest.importorskip("zstandard")

TEXT = b"the quick brown fox jumps over the lazy dog. " * 1000      # 45 KB, compresses well


def hello_frame(features):
    return _core_py.encode_frame(3, Hello(features=features).encode(), 0)


def first_request(path, client_options, peer_features, payload):
    """A hand-written server announces ``peer_features``; returns the first Request frame a
    Client with ``client_options`` sends it."""
    listener = raw_listener(path)
    seen = {}

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(hello_frame(peer_features))
            decoder = _core_py.FrameDecoder()
            while "frame" not in seen:
                data = conn.recv(1 << 20)
                if not data:
                    return
                for frame in decoder.feed(data):
                    if frame.type == 1:
                        seen["frame"] = frame
                        conn.sendall(_core_py.encode_frame(2, b"ok", frame.request_id))

    server = threading.Thread(target=serve)
    server.start()
    try:
        with hintens.Client(path, **client_options) as client:
            client.wait_for_hello(5)   # negotiated before the request
            assert client.request(payload) == b"ok"
        server.join(10)
    finally:
        listener.close()
    return seen["frame"]


def test_a_compressed_request_on_the_wire(sock_path):
    frame = first_request(sock_path, {"compress": True}, FEATURE_COMPRESSION, TEXT)
    assert frame.flags == 2                            # COMPRESSED
    assert len(frame.payload) < len(TEXT) // 10        # the CRC checked the wire bytes
    assert zstandard.ZstdDecompressor().decompress(frame.payload) == TEXT
    assert zstandard.frame_content_size(frame.payload) == len(TEXT)


@pytest.mark.parametrize("options, features, payload", [
    ({"compress": True}, 0, TEXT),                     # the peer did not offer it
    ({}, FEATURE_COMPRESSION, TEXT),                   # we did not
    ({"compress": True}, FEATURE_COMPRESSION, os.urandom(40_000)),   # would not shrink
    ({"compress": True}, FEATURE_COMPRESSION, TEXT[:4000]),          # under the threshold
])
def test_no_compression_unless_negotiated_worth_it_and_large_enough(sock_path, options,
                                                                     features, payload):
    frame = first_request(sock_path, options, features, payload)
    assert frame.flags == 0 and frame.payload == payload


def test_end_to_end(sock_path):
    with hintens.Server(sock_path, lambda p: bytes(p) + b"!", compress=True).start():
        with hintens.Client(sock_path, compress=True, shm=False) as client:
            assert client.request(TEXT) == TEXT + b"!"
            big = TEXT * 3                               # over 64 KiB, inline: compressed too
            assert client.request(big) == big + b"!"
            assert client.request(b"small") == b"small!"
            assert client.request_many([TEXT, b"x"]) == [TEXT + b"!", b"x!"]


def test_compressed_events_are_inflated(sock_path):
    got = []
    done = threading.Event()

    def on_event(payload, connection):
        got.append(bytes(payload))
        done.set()

    with hintens.Server(sock_path, on_event=on_event, compress=True).start():
        with hintens.Client(sock_path, compress=True) as client:
            client.wait_for_hello(5)
            client.send_event(TEXT)
            assert done.wait(10)
    assert got == [TEXT]


def negotiated_peer(path):
    peer = RawPeer(path)
    peer.send(hello_frame(FEATURE_COMPRESSION))
    return peer


def test_a_bomb_is_refused_before_it_is_inflated(sock_path):
    with hintens.Server(sock_path, compress=True, max_payload=100_000).start():
        peer = negotiated_peer(sock_path)
        bomb = zstandard.ZstdCompressor().compress(bytes(10_000_000))    # 10 MB of zeros
        peer.send(raw_frame(bomb, flags=2, request_id=7))
        request_id, code, message = peer.next_error()
        assert (request_id, code) == (7, hintens.ErrorCode.TOO_LARGE)
        assert "over the limit" in message
        peer.send(raw_frame(b"still here", request_id=8))              # the connection goes on
        reply = peer.next_frame()
        assert (reply.type, reply.request_id, reply.payload) == (2, 8, b"still here")
        peer.close()


def _two_frames():
    return zstandard.ZstdCompressor().compress(TEXT) + zstandard.ZstdCompressor().compress(b"x")


def _empty_frame_then_garbage():
    return zstandard.ZstdCompressor().compress(b"") + b"garbage"


@pytest.mark.parametrize("payload", [b"not zstd at all", None, "two frames", "empty+garbage"])
def test_undecodable_compressed_payloads(sock_path, payload):
    if payload == "two frames":        # not exactly one frame: nothing may be dropped
        payload = _two_frames()
    elif payload == "empty+garbage":
        payload = _empty_frame_then_garbage()
    elif payload is None:   # a zstd frame that does not declare its size (streamed)
        writer = zstandard.ZstdCompressor(write_content_size=False).compressobj()
        payload = writer.compress(TEXT) + writer.flush()
        assert zstandard.frame_content_size(payload) == -1
    with hintens.Server(sock_path, compress=True).start():
        peer = negotiated_peer(sock_path)
        peer.send(raw_frame(payload, flags=2, request_id=3))
        request_id, code, _ = peer.next_error()
        assert (request_id, code) == (3, hintens.ErrorCode.UNSUPPORTED_FLAGS)
        peer.close()


def test_compressed_without_negotiation_is_refused(sock_path):
    with hintens.Server(sock_path).start():
        peer = RawPeer(sock_path)
        peer.send(raw_frame(zstandard.ZstdCompressor().compress(TEXT), flags=2, request_id=4))
        request_id, code, _ = peer.next_error()
        assert (request_id, code) == (4, hintens.ErrorCode.UNSUPPORTED_FLAGS)
        peer.close()


def test_compress_without_zstandard_is_a_clear_error(sock_path, monkeypatch):
    monkeypatch.setattr(_protocol, "zstandard", None)
    with pytest.raises(ValueError, match="zstandard"):
        hintens.Server(sock_path, compress=True)


def test_compressed_and_shm_together_is_refused_and_the_segment_given_back(sock_path):
    import fcntl

    from hintens.protocol import shm as _shm
    from hintens.protocol.endpoint import FEATURE_SHM

    from .test_shm_transfer import MIB, memfd

    with hintens.Server(sock_path, compress=True).start():
        peer = RawPeer(sock_path)
        peer.send(hello_frame(FEATURE_SHM | FEATURE_COMPRESSION))
        fd = memfd(MIB, fcntl.F_SEAL_SHRINK, b"echo:x")
        frame = raw_frame(_shm.encode_descriptor(5, MIB, 0, 6, True), flags=3, request_id=11)
        peer.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     struct.pack("i", fd))])
        os.close(fd)
        released = refused = None
        while released is None or refused is None:
            got = peer.next_frame(skip_hello=False)
            if got.type == 3 and got.request_id == 0:
                control = _shm.decode_control(got.payload)
                # A NEW_SEGMENT refused is never mapped: handed back with a reject (HREJ).
                if control is not None and control[0] == _shm.REJECT_MAGIC:
                    released = control[1]
            elif got.type == 4:
                refused = hintens.wire.decode_error_payload(got.payload)[0], got.request_id
        assert released == [5]
        assert refused == (hintens.ErrorCode.UNSUPPORTED_FLAGS, 11)
        peer.close()
