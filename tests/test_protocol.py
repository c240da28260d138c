"""The sans-IO connection rules (Endpoint), fed frames directly: the hello, and what a peer's
control Events can and cannot change."""

from __future__ import annotations

import pytest

from hintens.protocol import shm as _shm
from hintens.protocol.endpoint import (
    FEATURE_COMPRESSION,
    FEATURE_SHM,
    SCATTER_THRESHOLD_BYTES,
    Endpoint,
    Hello,
)


@pytest.fixture
def frame(core):
    return lambda type_, payload, request_id=0, flags=0: core.Frame(type_, flags, 0x0100,
                                                                    request_id, payload)


def test_only_the_first_hello_counts(frame):
    endpoint = Endpoint(features=FEATURE_SHM)
    endpoint.admit([frame(3, Hello(features=FEATURE_SHM, max_payload=5000).encode())])
    assert endpoint.negotiated(FEATURE_SHM) and endpoint.peer.max_payload == 5000
    # A second hello would take shared memory away under segments already lent: ignored.
    endpoint.admit([frame(3, Hello(features=0, max_payload=100_000).encode())])
    assert endpoint.negotiated(FEATURE_SHM) and endpoint.peer.max_payload == 5000
    endpoint.close_shm()


def test_the_peers_limit_bounds_what_goes_the_small_way(frame):
    endpoint = Endpoint()
    assert endpoint.small_max == SCATTER_THRESHOLD_BYTES
    endpoint.admit([frame(3, Hello(max_payload=1500).encode())])
    assert endpoint.small_max == 1501            # a 1501-byte payload is checked, not packed


def test_a_hello_announcing_our_receive_bounds_caps_our_pool(frame):
    endpoint = Endpoint(features=FEATURE_SHM, shm_pool_bytes=1 << 30)
    endpoint.admit([frame(3, Hello(features=FEATURE_SHM, shm_receive_bytes=8 << 20,
                                   shm_receive_segments=3).encode())])
    assert (endpoint.pool.max_bytes, endpoint.pool.max_segments) == (8 << 20, 3)
    endpoint.close_shm()


def test_stray_releases_change_nothing(frame):
    endpoint = Endpoint(features=FEATURE_SHM)
    endpoint.admit([frame(3, Hello(features=FEATURE_SHM).encode())])
    pool = endpoint.pool
    segment_id = pool.try_acquire(1 << 20)[0]         # lent to the peer
    pool.hold(segment_id)                             # and a local view of an echo of it
    for ids in ([0], [999], [segment_id], [segment_id]):   # the second is a repeat
        endpoint.admit([frame(3, _shm.encode_control(_shm.RELEASE_MAGIC, ids))])
    assert segment_id not in pool._free               # our own view still holds it
    pool.unhold(segment_id)
    assert segment_id in pool._free
    endpoint.close_shm()


def test_a_control_event_with_flags_is_not_a_control_event(frame):
    endpoint = Endpoint(features=FEATURE_SHM | FEATURE_COMPRESSION)
    hello = Hello(features=FEATURE_SHM).encode()
    items = endpoint.admit([frame(3, hello, flags=2)])           # a "compressed" hello
    assert endpoint.peer_hello is None and len(items) == 1 and not items[0].fatal
    sent = []
    endpoint.on_writes = lambda: sent.extend(   # the control Events' payloads
        bytes(frame)[24:] for buffers, _ in endpoint.take_writes() for frame in buffers)
    endpoint.admit([frame(3, hello)])
    descriptor = _shm.encode_descriptor(4, 1 << 20, 0, 10, False)
    items = endpoint.admit([frame(3, descriptor, flags=1)])      # an SHM "control Event"
    assert [type(item).__name__ for item in items] == ["UnsupportedFlagsError"]
    assert [_shm.decode_control(p) for p in sent] == [(_shm.REJECT_MAGIC, [4])]
    endpoint.close_shm()


@pytest.mark.parametrize("ours, theirs", [
    (0, dict()),
    (FEATURE_SHM, dict(features=FEATURE_SHM)),
    (FEATURE_SHM, dict(features=FEATURE_SHM, max_payload=70_000)),
    (FEATURE_SHM, dict(features=0, max_payload=70_000)),
    (FEATURE_COMPRESSION, dict(features=FEATURE_COMPRESSION)),
    (0, None),   # no hello yet
    (FEATURE_SHM, None),
])
def test_inline_max_says_what_writes_would_send_as_one_plain_frame(frame, core, ours, theirs):
    # The compiled serve loop answers a bytes result under inline_max without asking
    # writes(): the two must agree on every size.
    if ours == FEATURE_COMPRESSION:
        pytest.importorskip("zstandard")
    endpoint = Endpoint(features=ours, shm_threshold=64 * 1024,
                        compress_threshold=32 * 1024)
    if theirs is not None:
        endpoint.admit([frame(3, Hello(**theirs).encode())])
    for size in (0, 1, 32 * 1024 - 1, 32 * 1024, 64 * 1024 - 1, 64 * 1024, 70_000, 70_001,
                 16 << 20, (16 << 20) + 1):
        payload = b"\x07" * size
        try:
            writes = endpoint.writes(2, payload, 1)
        except Exception:
            writes = None
        plain = writes is not None and len(writes) == 1 and not writes[0][1] and \
            b"".join(writes[0][0]) == core.encode_frame(2, payload, 1)
        if size < endpoint.inline_max:
            assert plain, size
        else:   # before the hello, larger payloads go to writes(): shared memory may carry
            # them, or the peer's limit refuse them (the client waits for the hello first)
            assert not plain or theirs is None, size
    endpoint.close_shm()
