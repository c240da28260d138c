"""Channel (both cores) over a real socketpair: send, receive, receive_reply, serve."""

from __future__ import annotations

import array
import errno
import fcntl
import gc
import os
import socket
import threading

import pytest

from hintens import ChecksumError
from hintens.transport import unix as _unix


def channel(core, sock):
    return core.Channel(sock, core.FrameDecoder())


def test_send_many_buffers_in_order(core, pair):
    left, right = pair
    chunks = [b"a" * 10, b"", bytearray(b"b" * 5), memoryview(b"c" * 7)]
    channel(core, left).send(chunks)
    assert right.recv(100) == b"a" * 10 + b"b" * 5 + b"c" * 7


def test_send_larger_than_the_socket_buffer(core, pair):
    left, right = pair
    big = bytes(range(256)) * 20_000       # 5 MB, far over the socket buffer
    received = bytearray()

    def drain():
        while len(received) < len(big) + 3:
            received.extend(right.recv(1 << 20))

    reader = threading.Thread(target=drain)
    reader.start()
    channel(core, left).send([b"xyz", big])
    reader.join(30)
    assert bytes(received) == b"xyz" + big


def test_receive_and_reply_fast_path(core, pair):
    left, right = pair
    ours = channel(core, left)
    right.sendall(core.encode_frame(2, b"pong", 7))
    assert ours.receive_reply(7) == b"pong"
    right.sendall(core.encode_frame(2, b"other", 8) + core.encode_frame(3, b"event", 9))
    assert ours.receive_reply(7) is None
    assert [(f.type, f.request_id) for f in ours.pending] == [(2, 8), (3, 9)]
    right.sendall(core.encode_frame(3, b"ev", 1))
    assert [f.payload for f in ours.receive()] == [b"ev"]


def test_reply_in_many_pieces(core, pair):
    left, right = pair
    ours = channel(core, left)
    frame = core.encode_frame(2, bytes(300_000), 5)

    def drip():
        for start in range(0, len(frame), 70_000):
            right.sendall(frame[start:start + 70_000])

    writer = threading.Thread(target=drip)
    writer.start()
    reads = 1
    reply = ours.receive_reply(5)
    while reply is None:       # one read per call: the caller re-checks its deadline between
        assert ours.pending == []
        reads += 1
        reply = ours.receive_reply(5)
    assert bytes(reply) == bytes(300_000) and reads > 1
    writer.join(10)


def test_end_of_stream(core, pair):
    left, right = pair
    ours = channel(core, left)
    right.shutdown(socket.SHUT_WR)
    assert ours.receive() is None
    assert ours.receive_reply(1) is None and ours.pending is None


def test_kernel_timeout_raises_blocking_io_error(core, pair):
    left, _ = pair
    _unix.set_kernel_timeouts(left, 0.05)
    with pytest.raises(BlockingIOError):
        channel(core, left).receive()
    with pytest.raises(BlockingIOError):
        channel(core, left).receive(socket.MSG_DONTWAIT)


def test_protocol_errors_propagate(core, pair):
    left, right = pair
    good = core.encode_frame(2, b"ok", 1)
    bad = bytearray(core.encode_frame(2, b"bad", 2))
    bad[14:16] = b"\0\0"
    right.sendall(good + bytes(bad))
    with pytest.raises(ChecksumError) as caught:
        channel(core, left).receive()
    assert [f.request_id for f in caught.value.frames] == [1]


SMALL = 16 * 1024


def inline_reply(core):
    """A reply_writes that sends every result inline, header and payload scattered."""
    return lambda request_id, result: [([core.encode_header(2, result, request_id), result], [])]


def test_serve_answers_leading_requests_and_returns_the_rest(core, pair):
    left, right = pair
    ours = channel(core, left)

    def handler(payload):
        if payload == b"boom":
            raise ValueError("boom")
        if payload == b"big":
            return memoryview(bytes(20_000))
        return None if payload == b"none" else payload.upper()

    errors = []

    def on_error(request_id, error):
        errors.append((request_id, str(error)))
        return core.encode_frame(4, b"err", request_id)

    right.sendall(b"".join([
        core.encode_frame(1, b"a", 1), core.encode_frame(1, b"boom", 2),
        core.encode_frame(1, b"none", 3), core.encode_frame(1, b"big", 4),
        core.encode_frame(3, b"event", 5), core.encode_frame(1, b"after", 6),
    ]))
    rest = ours.serve(handler, on_error, inline_reply(core), SMALL, SMALL)
    assert [(f.type, f.request_id) for f in rest] == [(3, 5), (1, 6)]
    assert errors == [(2, "boom")]
    decoder = core.FrameDecoder()
    replies = []
    while len(replies) < 4:
        replies += decoder.feed(right.recv(1 << 20))
    assert [(f.type, f.request_id, bytes(f.payload)) for f in replies] == [
        (2, 1, b"A"), (4, 2, b"err"), (2, 3, b""), (2, 4, bytes(20_000))]


def test_serve_leaves_a_read_with_a_control_event_to_the_caller(core, pair):
    # A release later in the read must take effect before any reply is made (a reply may
    # be waiting for the segment it frees): the caller admits the whole read first.
    left, right = pair
    ours = channel(core, left)
    ran = []
    frames = [core.encode_frame(1, b"a", 1), core.encode_frame(3, b"HREL\0\0\0\0", 0)]
    right.sendall(b"".join(frames))
    rest = ours.serve(ran.append, None, inline_reply(core), SMALL, SMALL)
    assert [(f.type, f.request_id) for f in rest] == [(1, 1), (3, 0)] and ran == []


def test_serve_sends_larger_or_other_results_the_way_reply_writes_says(core, pair):
    left, right = pair
    ours = channel(core, left)
    asked = []

    def reply_writes(request_id, result):
        asked.append((request_id, type(result).__name__))
        return [([core.encode_frame(4, b"no", request_id)], [])]

    right.sendall(core.encode_frame(1, b"x" * 100, 1) + core.encode_frame(1, b"y", 2))
    ours.serve(lambda p: bytes(p) if p == b"y" else bytearray(p), None, reply_writes, 50, 50)
    assert asked == [(1, "bytearray")]   # b"y" is bytes and under small_max: answered in C
    decoder = core.FrameDecoder()
    replies = []
    while len(replies) < 2:
        replies += decoder.feed(right.recv(1 << 20))
    assert [(f.type, f.request_id) for f in replies] == [(4, 1), (2, 2)]


def test_serve_sends_bytes_under_inline_max_itself_as_plain_frames(core, pair):
    # Between small_max and inline_max a bytes result leaves as a plain frame of its own,
    # written at once (with the small replies before it), without asking reply_writes.
    left, right = pair
    ours = channel(core, left)
    asked = []

    def reply_writes(request_id, result):
        asked.append(request_id)
        return [([core.encode_frame(4, b"big", request_id)], [])]

    sizes = {1: 10, 2: 5_000, 3: 20, 4: 9_000, 5: 8_000}
    right.sendall(b"".join(core.encode_frame(1, str(n).encode(), n) for n in sizes))
    ours.serve(lambda p: bytes([65]) * sizes[int(bytes(p))], None, reply_writes, 100, 9_000)
    assert asked == [4]   # 9_000 is not under inline_max
    decoder = core.FrameDecoder()
    replies = []
    while len(replies) < 5:
        replies += decoder.feed(right.recv(1 << 20))
    assert [(f.type, f.request_id, f.flags, bytes(f.payload)) for f in replies] == [
        (2, 1, 0, b"A" * 10), (2, 2, 0, b"A" * 5_000), (2, 3, 0, b"A" * 20), (4, 4, 0, b"big"),
        (2, 5, 0, b"A" * 8_000)]


def test_serve_does_not_answer_a_failed_send_as_a_handler_error(core, pair):
    left, right = pair
    ours = channel(core, left)
    errors = []
    right.sendall(core.encode_frame(1, b"x", 1))
    right.close()   # the reply's write fails: that is the caller's to see, not on_error's
    with pytest.raises(OSError):
        ours.serve(lambda p: b"A" * 5_000, lambda *a: errors.append(a), None, 100, 9_000)
    assert errors == []


def test_serve_end_of_stream_and_partial(core, pair):
    left, right = pair
    ours = channel(core, left)
    right.sendall(core.encode_frame(1, b"x", 1)[:10])
    assert ours.serve(lambda p: p, None, inline_reply(core), SMALL, SMALL) == []
    right.shutdown(socket.SHUT_WR)
    assert ours.serve(lambda p: p, None, inline_reply(core), SMALL, SMALL) is None


def test_serve_repeat_reads_on_while_the_handler_alone_answers(core, pair):
    # Each request comes in a read of its own (the peer waits for each reply): with repeat,
    # serve() answers read after read, and returns only for a read with something else in it.
    left, right = pair
    ours = channel(core, left)
    decoder = core.FrameDecoder()
    returned = []
    worker = threading.Thread(target=lambda: returned.append(
        ours.serve(lambda payload: payload, None, inline_reply(core), SMALL, SMALL, True)))
    worker.start()
    for n in (1, 2, 3):
        right.sendall(core.encode_frame(1, b"r%d" % n, n))
        (reply,) = decoder.feed(right.recv(1 << 16))
        assert (reply.request_id, bytes(reply.payload)) == (n, b"r%d" % n)
        assert worker.is_alive() and returned == []     # still serving, in the core
    right.sendall(core.encode_frame(3, b"event", 9))
    worker.join(10)
    (rest,) = returned
    assert [(f.type, f.request_id) for f in rest] == [(3, 9)]


@pytest.mark.parametrize("case", ["reply_writes", "on_error", "partial frame", "end"])
def test_serve_repeat_returns_when_the_caller_has_something_to_see(core, pair, case):
    # After reply_writes or on_error (the caller may have work waiting, such as requests read
    # while a reply waited for shared memory), inside a frame (its timeout is the caller's),
    # and at the end of the stream.
    left, right = pair
    ours = channel(core, left)

    def handler(payload):
        if case == "on_error":
            raise ValueError("no")
        return memoryview(payload) if case == "reply_writes" else payload

    if case == "partial frame":
        right.sendall(core.encode_frame(1, b"whole", 1) + core.encode_frame(1, b"cut", 2)[:20])
    elif case == "end":
        right.sendall(core.encode_frame(1, b"whole", 1))
        right.shutdown(socket.SHUT_WR)
    else:
        right.sendall(core.encode_frame(1, b"whole", 1))
    on_error = lambda request_id, error: core.encode_frame(4, b"err", request_id)  # noqa: E731
    result = ours.serve(handler, on_error, inline_reply(core), SMALL, SMALL, True)
    if case == "end":   # the whole request was answered; then the stream ended
        assert result is None
    else:
        assert result == []
    assert ours.decoder.in_frame == (case == "partial frame")


def test_send_to_a_closed_peer(core, pair):
    left, right = pair
    right.close()
    with pytest.raises(OSError):
        channel(core, left).send([b"x" * 100])


def test_buffer_size_must_hold_a_header(core, pair):
    with pytest.raises(ValueError):
        core.Channel(pair[0], core.FrameDecoder(), 10)


# Descriptor passing (SCM_RIGHTS) ----------------------------------------------------------

def _open_fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_travel_with_the_bytes(core, pair):
    left, right = pair
    sender, receiver = channel(core, left), channel(core, right)
    receiver.max_fds = 4
    read_end, write_end = os.pipe()
    try:
        sender.send([core.encode_frame(3, b"with fd", 1)], fds=[write_end])
        (frame,) = receiver.receive()
        assert frame.payload == b"with fd" and len(receiver.fds) == 1
        theirs = receiver.fds.pop()
        assert theirs != write_end
        assert fcntl.fcntl(theirs, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(theirs, b"through the copy")
        os.close(theirs)
        assert os.read(read_end, 100) == b"through the copy"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_too_many_descriptors_are_refused_on_send(core, pair):
    with pytest.raises(ValueError):
        channel(core, pair[0]).send([b"x"], fds=[0] * 17)


def test_unclaimed_descriptors_are_capped_and_closed(core, pair):
    left, right = pair
    receiver = channel(core, right)
    receiver.max_fds = 1000            # more than the hard cap of 64
    baseline = _open_fd_count()
    read_end, write_end = os.pipe()
    try:
        for i in range(10):       # 10 sends of 8 descriptors: 80 arrive, 64 may wait
            left.sendmsg([core.encode_frame(3, b"%d" % i, i + 1)],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [write_end] * 8).tobytes())])
        frames = []
        while len(frames) < 10:
            frames += receiver.receive()
        assert len(receiver.fds) == 64 and receiver.fds_dropped == 16
        assert _open_fd_count() == baseline + 2 + 64
        receiver.close_fds()
        assert receiver.fds == [] and _open_fd_count() == baseline + 2
    finally:
        os.close(read_end)
        os.close(write_end)


def test_descriptors_left_unclaimed_are_closed_with_the_channel(core, pair):
    left, right = pair
    baseline = _open_fd_count()
    read_end, write_end = os.pipe()
    receiver = channel(core, right)
    receiver.max_fds = 2
    channel(core, left).send([core.encode_frame(3, b"x", 1)], fds=[write_end, read_end])
    receiver.receive()
    assert _open_fd_count() == baseline + 4
    del receiver
    gc.collect()
    assert _open_fd_count() == baseline + 2
    os.close(read_end)
    os.close(write_end)


def test_descriptors_are_refused_by_default(core, pair):
    """Until shared memory is negotiated nobody claims descriptors: they are closed at once."""
    left, right = pair
    receiver = channel(core, right)
    baseline = _open_fd_count()
    read_end, write_end = os.pipe()
    channel(core, left).send([core.encode_frame(3, b"x", 1)], fds=[write_end, read_end])
    assert [f.payload for f in receiver.receive()] == [b"x"]
    assert receiver.fds == [] and receiver.fds_dropped == 2
    assert _open_fd_count() == baseline + 2
    os.close(read_end)
    os.close(write_end)


def test_close_waits_for_senders_and_refuses_afterwards(core, pair):
    left, right = pair
    ours = channel(core, left)
    ours.close()
    ours.close()                      # idempotent
    assert ours.closed and left.fileno() == -1
    with pytest.raises(OSError) as caught:
        ours.send([b"x"])
    assert caught.value.errno == errno.EBADF
    with pytest.raises(OSError):
        ours.receive()


# A large payload is read straight into its buffer (compiled core) ---------------------------

def _stream_in(sock, data):
    threading.Thread(target=sock.sendall, args=(data,), daemon=True).start()


def test_large_payloads_and_what_follows_them_arrive_whole(core, pair):
    """Large frames (read into their own buffer a chunk at a time on the compiled core) with
    small frames before, between and after them, all in one stream: every frame whole, in
    order, and the byte count exact."""
    left, right = pair
    ours = core.Channel(left, core.FrameDecoder(8 << 20), buffer_size=64 * 1024)
    big = [os.urandom(n) for n in (3 << 20, 64 * 1024, 5 << 20)]
    stream = b"".join([core.encode_frame(2, b"first", 1), core.encode_frame(2, big[0], 2),
                       core.encode_frame(2, b"between", 3), core.encode_frame(2, big[1], 4),
                       core.encode_frame(2, big[2], 5), core.encode_frame(2, b"last", 6)])
    _stream_in(right, stream)
    got = []
    while len(got) < 6:
        got += [(f.request_id, bytes(f.payload)) for f in ours.receive()]
    assert got == [(1, b"first"), (2, big[0]), (3, b"between"), (4, big[1]), (5, big[2]),
                   (6, b"last")]
    assert ours.decoder.bytes_fed == len(stream)
    assert ours.decoder.frame_counts()[2] == 6


@pytest.mark.parametrize("buffer_size", [64 * 1024, 256 * 1024])
def test_a_bad_crc_in_a_large_payload_keeps_the_frames_after_it(core, pair, buffer_size):
    """(With the larger buffer, the payload's last 100 KiB are usually read straight into it
    together with the frame after it.)"""
    left, right = pair
    ours = core.Channel(left, core.FrameDecoder(8 << 20), buffer_size=buffer_size)
    big = bytearray(core.encode_frame(2, os.urandom((1 << 20) + 100 * 1024), 9))
    big[-1] ^= 0xFF                                  # the last payload byte: CRC mismatch
    stream = bytes(big) + core.encode_frame(2, b"after", 10)
    _stream_in(right, stream)
    got, errors = [], []
    while not any(f.request_id == 10 for f in got):
        try:
            got += ours.receive()
        except ChecksumError as error:   # what was read after it: as Endpoint.after_error
            errors.append(error)
            got += ours.decoder.feed(b"")
    assert len(errors) == 1 and errors[0].request_id == 9
    assert [(f.request_id, f.payload) for f in got] == [(10, b"after")]
    assert ours.decoder.bytes_fed == len(stream)
