"""The sans-IO protocol core with no socket: a client-side and a server-side Endpoint paired
(h11's ConnectionPair style). What one side's ``writes`` produce is fed, as bytes, to the
other's ``receive_data``; a descriptor travels as a duplicate, the way SCM_RIGHTS gives
the receiver its own. Control Events (releases, rejections) come out of an endpoint as
writes (``take_writes``), never as I/O, and are fed back the same way.

Covered: the hello and negotiation, the limits rule, inline and shared-memory transfer,
lending and release, echoes, and violations with what each side hands back.
"""

from __future__ import annotations

import gc
import os

import pytest

from hintens import _impl
from hintens.protocol import shm as _shm
from hintens._constants import ErrorCode, Flags, MessageType
from hintens._errors import (FrameTooLargeError, ProtocolError, RemoteError, ShmError,
                             UnsupportedFlagsError)
from hintens.protocol.endpoint import FEATURE_COMPRESSION, FEATURE_SHM, Endpoint
from hintens.protocol.replay import ANSWERED, ANSWERED_TOO_LARGE, NEW, ReplayMemory, refusal
from hintens.protocol.roles import sort_for_client

MIB = 1 << 20


class Side:
    """One endpoint, the control Events it gave to send, and the descriptors it received and
    has not claimed yet (as its transport would keep them)."""

    def __init__(self, core, **options):
        self.core = core
        self.endpoint = Endpoint(**options)

    @property
    def controls(self) -> list[bytes]:
        """The payloads of the control Events our endpoint has waiting to be sent."""
        return [bytes(frame)[24:] for frame in self.endpoint.outgoing]

    def deliver(self, writes, to: Side, *, with_fds: bool = True) -> list:
        """Our ``writes`` arrive at ``to``: the items its ``receive_data`` makes of them."""
        data = b"".join(bytes(buffer) for buffers, _ in writes for buffer in buffers)
        fds = [os.dup(fd) for _, fds in writes for fd in fds] if with_fds else []
        return to.endpoint.receive_data(data, fds)

    def deliver_controls(self, to: Side) -> list:
        """Our control Events (request id 0), taken as writes, arrive at ``to``."""
        return self.deliver(self.endpoint.take_writes(), to)

    def close(self) -> None:
        self.endpoint.close_shm()


@pytest.fixture
def pair(core, monkeypatch, young_heap):
    """Build a (client, server) pair on ``core`` with the given options, hellos exchanged.
    Afterwards, no descriptor is left open."""
    monkeypatch.setattr(_impl, "core", core)
    made: list[Side] = []
    gc.collect()
    fds_before = len(os.listdir("/proc/self/fd"))

    def build(client=None, server=None):
        client_side = Side(core, **(client or {}))
        server_side = Side(core, **(server or {}))
        made.extend([client_side, server_side])
        hello = client_side.endpoint.hello_frame()
        assert client_side.deliver([([hello], [])], server_side) == []
        hello = server_side.endpoint.hello_frame()
        assert server_side.deliver([([hello], [])], client_side) == []
        return client_side, server_side

    yield build
    gc.collect()
    for side in made:
        side.close()
    del made
    gc.collect()
    # Not one more: a descriptor of ours left open. (Fewer is another test's socket that a
    # background thread, the flusher's say, closed meanwhile.)
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def only(items):
    (item,) = items
    return item


# The hello ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ours, theirs", [(FEATURE_SHM, FEATURE_SHM), (FEATURE_SHM, 0),
                                          (0, FEATURE_SHM), (FEATURE_COMPRESSION,
                                                             FEATURE_COMPRESSION | FEATURE_SHM)])
def test_the_hello_negotiates_what_both_offer(pair, ours, theirs):
    client, server = pair({"features": ours, "max_payload": 5000},
                          {"features": theirs, "max_payload": 7000})
    for side in (client, server):
        for feature in (FEATURE_SHM, FEATURE_COMPRESSION):
            assert side.endpoint.negotiated(feature) == bool(ours & theirs & feature)
    assert client.endpoint.peer.max_payload == 7000
    assert server.endpoint.peer.max_payload == 5000


# Inline ------------------------------------------------------------------------------------

def test_a_request_and_its_reply_travel_inline(pair):
    client, server = pair({"features": FEATURE_SHM}, {"features": FEATURE_SHM})
    writes = client.endpoint.writes(MessageType.REQUEST, b"ping", 7)
    assert all(not fds for _, fds in writes)
    request = only(client.deliver(writes, server))
    assert (request.type, request.request_id, bytes(request.payload)) == (1, 7, b"ping")
    reply = only(server.deliver(server.endpoint.reply_writes(7, b"pong"), client))
    assert (reply.type, reply.request_id, bytes(reply.payload)) == (2, 7, b"pong")
    assert client.controls == server.controls == []


def test_over_the_peers_limit_without_shared_memory_fails_before_anything_is_written(pair):
    client, server = pair({"features": 0}, {"features": 0, "max_payload": 4096})
    with pytest.raises(FrameTooLargeError):
        client.endpoint.writes(MessageType.REQUEST, bytes(5000), 1)
    # Nothing was produced, and the connection goes on.
    request = only(client.deliver(client.endpoint.writes(MessageType.REQUEST, b"x", 2),
                                  server))
    assert request.request_id == 2


def test_a_reply_over_the_requesters_limit_becomes_an_error_reply(pair):
    client, server = pair({"features": 0, "max_payload": 4096}, {"features": 0})
    reply = only(server.deliver(server.endpoint.reply_writes(3, bytes(5000)), client))
    assert (reply.type, reply.request_id) == (MessageType.ERROR, 3)


# Shared memory -----------------------------------------------------------------------------

def test_a_large_payload_is_lent_and_its_release_frees_the_segment(pair, core):
    client, server = pair({"features": FEATURE_SHM}, {"features": FEATURE_SHM})
    payload = os.urandom(MIB)
    writes = client.endpoint.writes(MessageType.REQUEST, payload, 1)
    assert sum(len(fds) for _, fds in writes) == 1      # a new segment, with its descriptor
    pool = client.endpoint.pool
    generation = pool.generation
    request = only(client.deliver(writes, server))
    del writes
    assert request.payload == payload
    assert server.endpoint.unclaimed_fds == []                             # the descriptor was claimed
    if core.SEES_VIEW_RELEASE:
        assert type(request.payload) is memoryview and server.endpoint.lends(request.payload)
        assert server.controls == []                    # lent: nothing handed back yet
        request.payload.release()
    else:   # the pure-Python core copies the payload out and gives the segment back at once
        assert not server.endpoint.lends(memoryview(request.payload))
    del request
    gc.collect()
    (release,) = server.controls
    assert _shm.decode_control(release)[0] == _shm.RELEASE_MAGIC
    assert server.deliver_controls(client) == []
    assert pool.generation > generation                 # the segment came free
    # The next large payload reuses it: no new descriptor this time.
    writes = client.endpoint.writes(MessageType.REQUEST, payload, 2)
    assert sum(len(fds) for _, fds in writes) == 0
    again = only(client.deliver(writes, server))
    assert again.payload == payload


def test_an_echo_points_back_at_the_senders_own_segment(pair, core):
    if not core.SEES_VIEW_RELEASE:
        pytest.skip("the pure-Python core copies lent payloads: there is no view to echo")
    client, server = pair({"features": FEATURE_SHM}, {"features": FEATURE_SHM})
    payload = os.urandom(MIB)
    request = only(client.deliver(client.endpoint.writes(MessageType.REQUEST, payload, 1),
                                  server))
    writes = server.endpoint.reply_writes(1, request.payload)
    assert sum(len(fds) for _, fds in writes) == 0      # names the client's segment
    reply = only(server.deliver(writes, client))
    assert reply.type == MessageType.RESPONSE and reply.payload == payload
    assert not client.endpoint.lends(reply.payload)     # our own memory, not the server's
    request.payload.release()
    del request, writes
    gc.collect()
    assert len(server.controls) == 1                    # the server's hold ends
    reply.payload.release()
    del reply
    gc.collect()
    assert client.controls == []                        # nothing to hand back: it was ours


def test_a_new_segment_without_its_descriptor_is_refused_and_handed_back(pair):
    client, server = pair({"features": FEATURE_SHM}, {"features": FEATURE_SHM})
    writes = client.endpoint.writes(MessageType.REQUEST, bytes(MIB), 5)
    refusal = only(client.deliver(writes, server, with_fds=False))
    assert isinstance(refusal, ShmError) and refusal.request_id == 5
    assert "without its descriptor" in str(refusal)
    (reject,) = server.controls                         # not mapped: HREJ, not HREL
    assert _shm.decode_control(reject)[0] == _shm.REJECT_MAGIC
    error = server.endpoint.error_reply(refusal)
    reply = only(server.deliver([([error], [])], client))
    assert (reply.type, reply.request_id) == (MessageType.ERROR, 5)
    generation = client.endpoint.pool.generation
    server.deliver_controls(client)
    assert client.endpoint.pool.generation > generation


def test_shared_memory_that_was_not_negotiated_is_refused_and_handed_back(pair, core):
    client, server = pair({"features": FEATURE_SHM}, {"features": 0})
    descriptor = _shm.encode_descriptor(3, MIB, 0, 10, True)
    frame = core.encode_frame(MessageType.REQUEST, descriptor, 9, Flags.SHM)
    with open("/dev/null") as null:
        writes = [([frame], [null.fileno()])]
        refusal = only(client.deliver(writes, server))
    assert isinstance(refusal, ShmError) and refusal.request_id == 9
    assert server.endpoint.unclaimed_fds == []                             # its descriptor closed at once
    (reject,) = server.controls
    assert _shm.decode_control(reject) == (_shm.REJECT_MAGIC, [3])


# Violations --------------------------------------------------------------------------------

def test_flags_that_were_not_negotiated_are_a_recoverable_violation(pair, core):
    client, server = pair({"features": 0}, {"features": 0})
    frame = core.encode_frame(MessageType.REQUEST, b"zz", 4, Flags.COMPRESSED)
    refusal = only(client.deliver([([frame], [])], server))
    assert isinstance(refusal, UnsupportedFlagsError) and refusal.request_id == 4
    assert not refusal.fatal
    error = server.endpoint.error_reply(refusal)
    reply = only(server.deliver([([error], [])], client))
    assert (reply.type, reply.request_id) == (MessageType.ERROR, 4)
    # The stream is still in step: the next frame is served.
    after = only(client.deliver(client.endpoint.writes(MessageType.REQUEST, b"ok", 5), server))
    assert after.request_id == 5


def test_a_corrupt_frame_is_fatal_and_answered(pair, core):
    client, server = pair()
    frame = bytearray(core.encode_frame(MessageType.REQUEST, b"payload", 6))
    frame[-1] ^= 0xFF                                   # the CRC no longer matches
    items = server.endpoint.receive_data(bytes(frame))
    violation = items[-1]
    assert isinstance(violation, ProtocolError) and violation.code == ErrorCode.CHECKSUM
    error = server.endpoint.error_reply(violation)
    assert error is not None
    reply = only(server.deliver([([error], [])], client))
    assert reply.type == MessageType.ERROR


# The client's rules --------------------------------------------------------------------------

def test_the_client_sorts_replies_errors_events_and_what_it_must_answer(pair, core):
    client, server = pair()
    writes = [([core.encode_frame(MessageType.RESPONSE, b"pong", 3)], []),
              ([server.endpoint.error_frame(ErrorCode.HANDLER_ERROR, "boom", 4)], []),
              ([core.encode_frame(MessageType.EVENT, b"news", 9)], []),
              ([core.encode_frame(MessageType.REQUEST, b"serve me", 5)], []),
              ([server.endpoint.error_frame(ErrorCode.UNAVAILABLE, "going away", 0)], [])]
    sorted_items = sort_for_client(client.endpoint, server.deliver(writes, client))
    assert [(rid, bytes(p)) for rid, p in sorted_items.replies] == [(3, b"pong")]
    ((rid, error),) = sorted_items.failures
    assert rid == 4 and isinstance(error, RemoteError) and error.code == ErrorCode.HANDLER_ERROR
    assert [bytes(p) for p in sorted_items.events] == [b"news"]
    (answer,) = sorted_items.answers                    # a client serves no requests
    reply = only(client.deliver([([answer], [])], server))
    assert (reply.type, reply.request_id) == (MessageType.ERROR, 5)
    assert sorted_items.server_error is not None and sorted_items.server_error.request_id == 0
    assert sorted_items.fatal is None and sorted_items.dropped == []


def test_a_fatal_error_read_after_a_failed_send_is_about_the_connection(pair):
    client, server = pair()
    frame = server.endpoint.error_frame(ErrorCode.TOO_LARGE, "frame too large", 7)
    items = server.deliver([([frame], [])], client)
    assert sort_for_client(client.endpoint, items).failures[0][0] == 7
    salvaged = sort_for_client(client.endpoint, items, salvaged=True)
    assert salvaged.failures == [] and salvaged.server_error.code == ErrorCode.TOO_LARGE


def test_the_client_fails_a_corrupt_reply_and_closes_on_a_fatal_violation(pair, core):
    client, server = pair()
    flagged = core.encode_frame(MessageType.RESPONSE, b"x", 8, Flags.COMPRESSED)
    sorted_items = sort_for_client(client.endpoint, server.deliver([([flagged], [])], client))
    ((rid, error),) = sorted_items.failures             # not negotiated: that request fails
    assert rid == 8 and isinstance(error, UnsupportedFlagsError)
    corrupt = bytearray(core.encode_frame(MessageType.RESPONSE, b"payload", 9))
    corrupt[-1] ^= 0xFF                                 # its CRC: that reply fails
    sorted_items = sort_for_client(client.endpoint, client.endpoint.receive_data(bytes(corrupt)))
    assert [(rid, e.code) for rid, e in sorted_items.failures] == [(9, ErrorCode.CHECKSUM)]
    assert sorted_items.fatal is None
    corrupt[0] ^= 0xFF                                  # its header: the stream is lost
    sorted_items = sort_for_client(client.endpoint, client.endpoint.receive_data(bytes(corrupt)))
    assert sorted_items.fatal is not None and sorted_items.fatal.code == ErrorCode.BAD_HEADER
    assert sorted_items.failures == []


# The server's exactly-once rule --------------------------------------------------------------

def test_a_retry_is_claimed_once_and_refused_when_it_cannot_be_replayed():
    memory = ReplayMemory(sessions=1, window=4, max_bytes=10)
    session = b"s" * 16
    window, state, _ = memory.claim(session, memory.window_for(session), 1, 0)
    assert state == NEW
    window.finish(1, (True, b"ok"))
    assert memory.claim(session, window, 1, 0)[1:] == (ANSWERED, (True, b"ok"))
    assert memory.claim(session, window, 2, 0)[1] == NEW
    window.finish(2, (True, b"far too large to keep"))
    assert memory.claim(session, window, 2, 0)[1] == ANSWERED_TOO_LARGE
    assert "too large to keep" in refusal(2, ANSWERED_TOO_LARGE)
    memory.window_for(b"t" * 16)                        # one session only: ours is given up
    moved_to, state, _ = memory.claim(session, window, 3, 0)
    assert moved_to is not window and state == NEW      # claimed in the session's new window
