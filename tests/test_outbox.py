"""The Channel's outbox (both cores) over a real socketpair: small frames packed into one queue,
written in order by whoever holds the send lock, with the flush deadline, cork, the queue
bound, partial writes and concurrent submitters."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from hintens.transport import unix as _unix


def channel(core, sock, interval=0.001):
    ch = core.Channel(sock, core.FrameDecoder())
    ch.flush_interval = interval
    return ch


def read_frames(core, sock, count, decoder=None):
    """Read until ``count`` frames have arrived; return them (and fail on a short stream)."""
    decoder = decoder or core.FrameDecoder()
    frames = []
    sock.settimeout(5)
    while len(frames) < count:
        data = sock.recv(1 << 20)
        assert data, f"stream ended after {len(frames)} of {count} frames"
        frames += decoder.feed(data)
    return frames


def nothing_to_read(sock):
    previous = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(previous)
    return False


def test_urgent_post_leaves_at_once_and_offsets_count_bytes(core, pair):
    left, right = pair
    ours = channel(core, left)
    end = ours.post(1, b"ping", 7)
    assert end == 24 + 4 == ours.submitted == ours.written
    assert ours.queued == 0
    (frame,) = read_frames(core, right, 1)
    assert (frame.type, frame.request_id, frame.payload) == (1, 7, b"ping")


def test_events_in_quick_succession_wait_for_the_deadline_then_leave_together(core, pair):
    left, right = pair
    scheduled = []
    ours = channel(core, left, interval=60.0)
    ours.on_queued = scheduled.append
    ours.event(b"first")                 # no Event before it: at once
    assert ours.queued == 0 and not scheduled
    ours.event(b"second")                # right after another: queued for company
    ours.event(b"third")
    assert ours.queued == 2 * 24 + len(b"second") + len(b"third")
    assert scheduled == [ours]           # the flusher is asked once, not per Event
    assert read_frames(core, right, 1)[0].payload == b"first"
    assert nothing_to_read(right)
    assert ours.flush_due() is False     # what the flusher calls at the deadline
    frames = read_frames(core, right, 2)
    assert [f.payload for f in frames] == [b"second", b"third"]
    assert [f.type for f in frames] == [3, 3]
    assert frames[0].request_id != 0 and frames[1].request_id == frames[0].request_id + 1
    assert ours.written == ours.submitted


def test_the_first_event_leaves_at_once_whatever_the_uptime(core, pair):
    # An interval longer than any machine has been up: were the first Event compared with a
    # clock origin of 0 (CLOCK_MONOTONIC counts from boot), it would wait for company.
    left, right = pair
    ours = channel(core, left, interval=1e12)
    ours.on_queued = lambda _: pytest.fail("the first Event was held for the deadline")
    ours.event(b"first")
    assert ours.queued == 0 and ours.written == ours.submitted
    assert read_frames(core, right, 1)[0].payload == b"first"


def test_a_control_offer_never_writes_on_the_offering_thread(core, pair):
    # Releases reach the channel from whichever thread drops a payload's last view, the
    # garbage collector included: they are queued and handed to the flusher, never written
    # there, even when the socket is idle and takes everything.
    left, right = pair
    asked = []
    ours = channel(core, left, interval=0.0)   # even with every Event written at once
    ours.on_queued = lambda channel, soon=False: asked.append((channel, soon))
    release = core.encode_frame(3, b"HREL" + bytes(8), 0)
    assert ours.offer([([release], [])], 1 << 30, False) is True
    assert ours.queued == len(release) and ours.written == 0
    assert nothing_to_read(right)
    assert asked == [(ours, True)]              # written soon, by the flusher
    assert ours.flush_due() is False
    (frame,) = read_frames(core, right, 1)
    assert (frame.type, frame.request_id, bytes(frame.payload)) == (3, 0, b"HREL" + bytes(8))
    # The next write on the connection takes a queued release along, ahead of it.
    assert ours.offer([([release], [])], 1 << 30, False) is True
    ours.post(1, b"ping", 9)
    frames = read_frames(core, right, 2)
    assert [(f.type, f.request_id) for f in frames] == [(3, 0), (1, 9)]


def test_zero_interval_writes_every_event(core, pair):
    left, right = pair
    ours = channel(core, left, interval=0.0)
    for n in range(5):
        ours.event(b"%d" % n)
        assert ours.queued == 0
    assert [f.payload for f in read_frames(core, right, 5)] == [b"0", b"1", b"2", b"3", b"4"]


def test_event_small_takes_only_a_bytes_under_the_limit(core, pair):
    left, right = pair
    ours = channel(core, left, interval=0.0)
    assert ours.event_small(b"a" * 9, 10) is True
    assert ours.event_small(b"", 10) is True
    ours.event(b"plain")   # shares the request ids, not the count
    for refused in (b"b" * 10, bytearray(b"c"), memoryview(b"d"), "text", None):
        assert ours.event_small(refused, 10) is False
    assert ours.small_events == 2
    frames = read_frames(core, right, 3)
    assert [(f.type, f.request_id, f.payload) for f in frames] == \
        [(3, 1, b"a" * 9), (3, 2, b""), (3, 3, b"plain")]
    assert nothing_to_read(right)
    ours.close()
    with pytest.raises(OSError):
        ours.event_small(b"late", 10)
    assert ours.small_events == 2


def test_a_request_takes_queued_events_with_it(core, pair):
    left, right = pair
    ours = channel(core, left, interval=60.0)
    ours.event(b"a")
    ours.event(b"b")
    ours.event(b"c")
    assert ours.queued
    ours.post(1, b"req", 1)
    assert ours.queued == 0 and ours.written == ours.submitted
    frames = core.FrameDecoder().feed(_recv_all(right))
    assert [(f.type, f.payload) for f in frames] == [(3, b"a"), (3, b"b"), (3, b"c"),
                                                     (1, b"req")]


def _recv_all(sock):
    """Whatever has arrived (waiting for the first byte only)."""
    sock.settimeout(5)
    data = sock.recv(1 << 16)
    while not nothing_to_read(sock):
        data += sock.recv(1 << 16)
    return data


def test_send_after_queued_events_keeps_the_order(core, pair):
    left, right = pair
    ours = channel(core, left, interval=60.0)
    ours.event(b"first")
    ours.event(b"queued")
    big = b"x" * 100_000
    reader_frames = []
    reader = threading.Thread(target=lambda: reader_frames.extend(read_frames(core, right, 3)))
    reader.start()
    ours.send([core.encode_header(1, big, 5), big])
    reader.join(10)
    assert [f.payload for f in reader_frames] == [b"first", b"queued", big]


def test_cork_holds_events_until_flush(core, pair):
    left, right = pair
    ours = channel(core, left, interval=0.0)
    ours.cork()
    ours.event(b"1")
    ours.event(b"2")
    assert ours.queued and nothing_to_read(right)
    assert ours.flush_due() is False and ours.queued    # the deadline does not break a cork
    ours.uncork()
    ours.flush()
    assert [f.payload for f in read_frames(core, right, 2)] == [b"1", b"2"]


def test_the_queue_bound_makes_the_submitter_write(core, pair):
    left, right = pair
    ours = channel(core, left, interval=60.0)
    ours.max_queue = 1000
    ours.cork()
    for n in range(100):
        ours.event(b"%03d" % n)
        assert ours.queued <= 1000
    ours.uncork()
    ours.flush()
    frames = read_frames(core, right, 100)
    assert [f.payload for f in frames] == [b"%03d" % n for n in range(100)]


def test_a_full_socket_keeps_the_rest_queued_in_order(core, pair):
    """flush_due never blocks: what the socket refuses stays queued, cut mid-frame or not, and
    leaves first later. Nothing is lost or reordered."""
    left, right = pair
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours = channel(core, left, interval=60.0)
    payloads = [b"%05d" % n + b"." * 200 for n in range(2000)]    # ~450 KB
    ours.cork()
    for p in payloads:
        ours.event(p)
    ours.uncork()
    assert ours.flush_due() is True        # the socket filled: come back later
    assert 0 < ours.written < ours.submitted
    frames = []
    decoder = core.FrameDecoder()
    right.settimeout(5)
    while len(frames) < len(payloads):
        frames += decoder.feed(right.recv(1 << 16))
        ours.flush_due()
    assert [f.payload for f in frames] == payloads
    assert ours.written == ours.submitted and ours.queued == 0


def test_a_send_timeout_keeps_queued_frames_and_says_where_ours_ended(core, pair):
    left, right = pair
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    _unix.set_kernel_timeouts(left, None, send_s=0.05)
    ours = channel(core, left, interval=60.0)
    ours.cork()
    payloads = [b"%05d" % n + b"-" * 500 for n in range(1000)]
    for p in payloads[:-1]:
        ours.event(p)
    with pytest.raises(BlockingIOError) as caught:
        ours.post(1, payloads[-1], 99)
    end = caught.value.stream_end
    assert end == ours.submitted and ours.written < end
    assert not ours.broken                 # the stream is whole: the rest is still queued
    ours.uncork()
    got = []
    reader = threading.Thread(target=lambda: got.extend(read_frames(core, right, 1000)))
    reader.start()
    ours.flush()
    reader.join(10)
    assert [f.payload for f in got] == payloads
    assert got[-1].type == 1 and ours.written == end


def test_concurrent_submitters_lose_nothing_and_keep_each_threads_order(core, pair):
    left, right = pair
    ours = channel(core, left, interval=0.0005)
    threads, per_thread = 4, 2000
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(read_frames(core, right, threads * per_thread)))
    reader.start()

    def submit(t):
        for n in range(per_thread):
            if n % 100 == 99:
                ours.post(1, b"%d:%d" % (t, n), t * per_thread + n + 1)
            else:
                ours.event(b"%d:%d" % (t, n))

    workers = [threading.Thread(target=submit, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ours.flush()
    reader.join(20)
    assert len(got) == threads * per_thread
    for t in range(threads):
        mine = [int(f.payload.split(b":")[1]) for f in got if f.payload.startswith(b"%d:" % t)]
        assert mine == list(range(per_thread))
    assert ours.written == ours.submitted


def test_close_drops_and_counts_unsent_bytes(core, pair):
    left, _ = pair
    ours = channel(core, left, interval=60.0)
    ours.event(b"sent")
    ours.event(b"never")
    ours.close()
    assert ours.dropped == 24 + len(b"never")
    with pytest.raises(OSError):
        ours.event(b"after close")
    assert ours.flush_due() is False


def test_bad_frames_are_refused_before_anything_is_queued(core, pair):
    left, _ = pair
    ours = channel(core, left, interval=60.0)
    with pytest.raises(ValueError):
        ours.post(9, b"x", 1)
    with pytest.raises(ValueError):
        ours.post_many(1, [b"a", b"b"], [1])
    with pytest.raises(OverflowError):
        ours.post(1, b"x", -1)
    assert ours.queued == 0 and ours.submitted == 0


def test_post_many_writes_them_all_at_once(core, pair):
    left, right = pair
    ours = channel(core, left, interval=60.0)
    end = ours.post_many(1, [b"a", b"bb", bytearray(b"ccc")], [5, 6, 9])
    assert end == ours.written == 3 * 24 + 6
    frames = read_frames(core, right, 3)
    assert [(f.request_id, bytes(f.payload)) for f in frames] == [(5, b"a"), (6, b"bb"),
                                                                   (9, b"ccc")]


def test_decoder_skips_plain_events_only(core):
    decoder = core.FrameDecoder()
    decoder.skip_events = True
    stream = (core.encode_frame(3, b"dropped", 5) + core.encode_frame(3, b"hello", 0)
              + core.encode_frame(1, b"request", 6) + core.encode_frame(3, b"shm", 7, flags=1)
              + core.encode_frame(3, b"", 8) + core.encode_frame(2, b"response", 9))
    frames = []
    for i in range(0, len(stream), 7):   # any chunking, the payload path included
        frames += decoder.feed(stream[i:i + 7])
    assert [(f.type, f.request_id) for f in frames] == [(3, 0), (1, 6), (3, 7), (2, 9)]
    assert decoder.events_skipped == 2
    assert decoder.frames_decoded == 6
    whole = core.FrameDecoder()
    whole.skip_events = True
    assert [f.request_id for f in whole.feed(stream)] == [0, 6, 7, 9]
    assert whole.events_skipped == 2 and whole.frames_decoded == 6


def test_large_posts_from_many_threads_arrive_whole(core, pair):
    """Payloads large enough that the checksum and copy could run without the GIL: the
    queue must not move under a post (the review found a use-after-free here)."""
    left, right = pair
    ours = channel(core, left, interval=0.0)
    payloads = {t: [bytes([t]) * (300_000 + n) for n in range(10)] for t in range(4)}
    got = []
    reader = threading.Thread(target=lambda: got.extend(read_frames(core, right, 40)))
    reader.start()
    workers = [threading.Thread(target=lambda t=t: [ours.post(1, p, t) for p in payloads[t]])
               for t in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ours.flush()
    reader.join(30)
    for t in range(4):
        assert [bytes(f.payload) for f in got if f.request_id == t] == payloads[t]


# The pure-Python twin needs a lock where the compiled core relies on the GIL; these tests put
# "another thread" exactly in the windows between its locked sections.

class _HookedLock:
    """A real lock that, on its first release, first runs ``hook`` in another thread."""

    def __init__(self, hook):
        self._lock, self._hook = threading.Lock(), hook

    def acquire(self, blocking=True, timeout=-1):
        return self._lock.acquire(blocking, timeout)

    def release(self):
        hook, self._hook = self._hook, None
        if hook is not None:
            other = threading.Thread(target=hook)
            other.start()
            other.join()
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc_info):
        self.release()


def test_twin_flush_due_writes_a_request_posted_while_it_wrote(pair):
    from hintens import _python_core as core

    left, right = pair
    ours = channel(core, left, interval=60.0)
    ours.event(b"first")
    ours.event(b"waits")                 # queued for the deadline
    ours._send_lock = _HookedLock(lambda: ours.post(1, b"request", 42))
    assert ours.flush_due() is False
    frames = read_frames(core, right, 3)
    assert [f.payload for f in frames] == [b"first", b"waits", b"request"]
    assert ours.queued == 0


def test_twin_leftover_writes_stop_at_a_dead_peer(pair):
    from hintens import _python_core as core

    left, right = pair
    ours = channel(core, left, interval=0.0)

    def meanwhile():
        ours._after_post = lambda urgent: None   # queue only
        ours.post(3, b"event", 9)
        del ours._after_post
        right.close()                            # and the peer goes away

    ours._send_lock = _HookedLock(meanwhile)
    poster = threading.Thread(target=ours.post, args=(1, b"req", 1), daemon=True)
    poster.start()
    poster.join(5)
    assert not poster.is_alive(), "post() kept retrying a write to a dead peer"
    assert ours.queued == 24 + len(b"event")     # kept, for the next writer to raise about


def test_twin_send_reports_its_true_stream_offset(pair):
    from hintens import _python_core as core

    left, right = pair
    ours = channel(core, left)
    ends = {}
    big = core.encode_frame(1, b"B" * 1000, 8)
    real_lock = ours._queue_lock

    class PostBetween:
        """Lets another thread post between send()'s drain and its own queue-lock section."""

        def __init__(self):
            self.armed = True

        def __enter__(self):
            if self.armed:
                self.armed = False
                ours._queue_lock = real_lock
                other = threading.Thread(
                    target=lambda: ends.__setitem__("post", ours.post(1, b"req", 7, False)))
                other.start()
                other.join()
            return real_lock.__enter__()

        def __exit__(self, *exc_info):
            return real_lock.__exit__(*exc_info)

    ours._queue_lock = PostBetween()
    ends["send"] = ours.send([big])
    ours.flush()
    frames = read_frames(core, right, 2)
    order = [f.request_id for f in frames]
    offsets = dict(zip(order, (len(big), len(big) + 27) if order[0] == 8 else (27, 27 + len(big))))
    assert ends == {"send": offsets[8], "post": offsets[7]}


# Descriptors in the outbox, offer(), and sends that time out -------------------------------------

def _fill(sock):
    """Write to ``sock`` until the kernel takes no more; how much it took."""
    sock.setblocking(False)
    total = 0
    try:
        while True:
            total += sock.send(bytes(65536))
    except BlockingIOError:
        return total
    finally:
        sock.setblocking(True)


def test_a_send_that_times_out_with_nothing_written_leaves_the_stream_intact(core, pair):
    left, right = pair
    ours = channel(core, left)
    _unix.set_kernel_timeouts(left, None, 0.2)
    stuffed = _fill(left)
    before = ours.submitted
    with pytest.raises(BlockingIOError):
        ours.send([core.encode_frame(1, b"x" * 20_000, 5)])
    assert ours.submitted == before and not ours.broken   # never entered the stream
    decoder = core.FrameDecoder()
    received = 0
    right.settimeout(5)
    while received < stuffed:                              # the peer reads again
        received += len(right.recv(1 << 20))
    ours.send([core.encode_frame(1, b"after", 6)])
    (frame,) = read_frames(core, right, 1, decoder)
    assert (frame.request_id, frame.payload) == (6, b"after")


def test_a_timed_out_send_with_frames_queued_behind_it_breaks_the_stream(core, pair):
    # Frames queued while the send waited were placed after it in the stream: going on
    # without it would put every later descriptor on the wrong frame. The stream is cut.
    left, right = pair
    ours = channel(core, left, interval=60.0)
    _unix.set_kernel_timeouts(left, None, 0.5)
    _fill(left)
    poster = threading.Timer(0.1, lambda: ours.post(3, b"queued meanwhile", 9, False))
    poster.start()
    with pytest.raises(BlockingIOError):
        ours.send([core.encode_frame(1, b"x" * 20_000, 5)])
    poster.join()
    assert ours.broken


def test_an_offered_descriptor_rides_alone_with_its_frames_first_byte(core, pair):
    left, right = pair
    ours = channel(core, left, interval=60.0)
    fd = os.memfd_create("offered")
    before = len(os.listdir("/proc/self/fd"))
    frames = [core.encode_frame(3, b"a" * n, n) for n in (10, 20, 30)]
    assert ours.offer([([frames[0]], [])], 1 << 20)
    assert ours.offer([([frames[1]], [fd])], 1 << 20)     # the channel keeps a duplicate
    os.close(fd)
    assert ours.offer([([frames[2]], [])], 1 << 20)
    ours.flush()
    right.settimeout(5)
    received, arrivals = b"", []
    while len(received) < sum(len(f) for f in frames):
        data, ancillary, _, _ = right.recvmsg(1 << 16, socket.CMSG_SPACE(64))
        for level, kind, fds in ancillary:
            for (got,) in struct.iter_unpack("i", fds[:len(fds) - len(fds) % 4]):
                arrivals.append((len(received), len(received) + len(data)))
                os.close(got)
        received += data
    assert received == b"".join(frames)
    # Exactly one descriptor, on the read that holds frame 2's first byte, which ends where
    # frame 2 ends (the kernel may put the frame before it in the same read, never the one
    # after): frame 2 is the last frame that begins in that read (PROTOCOL.md 9).
    ((start, end),) = arrivals
    assert start <= len(frames[0]) < end == len(frames[0]) + len(frames[1])
    assert len(os.listdir("/proc/self/fd")) == before - 1   # our duplicate went with it


def test_offer_refuses_past_its_limit_and_a_descriptor_without_a_byte(core, pair):
    left, _ = pair
    ours = channel(core, left, interval=60.0)
    ours.cork()                                               # nothing leaves meanwhile
    assert ours.offer([([bytes(100)], [])], 150)              # an empty queue takes any size
    assert ours.offer([([bytes(10)], [])], 150)
    assert not ours.offer([([bytes(100)], [])], 150)          # over the limit: nothing queued
    assert ours.queued == 110
    fd = os.memfd_create("x")
    try:
        with pytest.raises(ValueError, match="byte to ride on"):
            ours.offer([([], [fd])], 1 << 20)
        with pytest.raises(ValueError, match="one descriptor"):
            ours.offer([([b"x"], [fd, fd])], 1 << 20)
    finally:
        os.close(fd)
    assert ours.queued == 110


def test_a_queued_descriptor_is_closed_when_the_channel_closes(core, pair):
    left, _ = pair
    ours = channel(core, left, interval=60.0)
    _fill(left)
    fd = os.memfd_create("x")
    before = len(os.listdir("/proc/self/fd"))
    ours.offer([([b"frame"], [fd])], 1 << 20)                 # the socket is full: it waits
    assert len(os.listdir("/proc/self/fd")) == before + 1
    ours.close()
    assert len(os.listdir("/proc/self/fd")) == before - 1     # the socket, and the duplicate
    os.close(fd)


def test_a_control_event_never_waits_for_a_writer_holding_the_send_lock(core, pair):
    # A release may be sent from any thread, the GC included, while another thread is in the
    # middle of a long write on the same channel (or the same thread holds the send lock).
    import collections

    from hintens.sync.connection import control_waker

    left, right = pair
    ours = channel(core, left)
    outgoing: collections.deque[bytes] = collections.deque()
    wake = control_waker(ours, outgoing)
    big = core.encode_frame(1, bytes(4 << 20), 1)
    writer = threading.Thread(target=ours.send, args=([big],))
    writer.start()
    time.sleep(0.2)                         # it holds the send lock, blocked on the socket
    started = time.monotonic()
    outgoing.append(core.encode_frame(3, b"HREL\x01\x00\x00\x00\x07\x00\x00\x00", 0))
    wake()
    assert time.monotonic() - started < 0.1
    frames = read_frames(core, right, 2)
    writer.join(10)
    assert [(f.type, f.request_id) for f in frames] == [(1, 1), (3, 0)]
