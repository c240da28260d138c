"""FrameDecoder: whole, byte by byte, with trailing data; malformed input; both cores agree."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import hintens
from hintens import (
    BadHeaderError,
    ChecksumError,
    ErrorCode,
    FrameTooLargeError,
    IncompleteFrameError,
    ProtocolError,
    UnsupportedFlagsError,
)
from hintens import _python_core as _core_py

HEADER = struct.Struct(">HHIHIHQ")


def raw_frame(payload=b"", *, magic=0x4850, version=0x0100, msg_type=1, flags=0,
              length=None, checksum=None, request_id=1) -> bytes:
    """A frame with any field forced, valid or not."""
    length = len(payload) if length is None else length
    checksum = _core_py.crc16(payload) if checksum is None else checksum
    return HEADER.pack(magic, version, msg_type, flags, length, checksum, request_id) + payload


def as_tuple(frame):
    return (frame.type, frame.flags, frame.version, frame.request_id, bytes(frame.payload))


def drive(decoder, chunks):
    """Feed chunks, continuing after recoverable errors as documented; return what happened."""
    events = []
    for chunk in [*chunks, None]:
        data = chunk
        while True:
            try:
                frames = decoder.feed_eof() if chunk is None else decoder.feed(data)
            except ProtocolError as error:
                events += [as_tuple(f) for f in error.frames]
                events.append((type(error).__name__, int(error.code), error.request_id,
                               error.msg_type))
                if error.fatal:
                    return events
                data = b""
                continue
            except IncompleteFrameError as error:
                events.append(("incomplete", error.pending_bytes))
                return events
            events += [as_tuple(f) for f in frames]
            break
    return events


def three_ways(stream):
    """Whole, one byte at a time, and with trailing data (the h11 habit)."""
    return {
        "whole": [stream],
        "bytewise": [stream[i:i + 1] for i in range(len(stream))],
        "trailing": [stream + raw_frame(b"tail", request_id=999)],
    }


def test_three_ways(core):
    frames = [(1, b"", 1), (2, b"x" * 100, 2), (3, b"y" * 5000, 3), (4, b"z", 2**64 - 1)]
    stream = b"".join(core.encode_frame(t, p, r) for t, p, r in frames)
    expected = [(t, 0, 0x0100, r, p) for t, p, r in frames]
    for how, chunks in three_ways(stream).items():
        events = drive(core.FrameDecoder(), chunks)
        if how == "trailing":
            assert events == expected + [(1, 0, 0x0100, 999, b"tail")]
        else:
            assert events == expected, how


def test_many_small_frames_in_one_buffer(core):
    stream = b"".join(core.encode_frame(3, bytes([i % 256]) * 100, i) for i in range(10_000))
    decoder = core.FrameDecoder()
    frames = decoder.feed(stream)
    assert decoder.frames_decoded == 10_000
    assert [f.request_id for f in frames] == list(range(10_000))
    assert all(bytes(f.payload) == bytes([f.request_id % 256]) * 100 for f in frames)


def test_payload_sharing_rules(core):
    small = core.encode_frame(1, b"s" * 1023, 1)
    large = core.encode_frame(1, b"L" * 1024, 2)
    frames = core.FrameDecoder().feed(small + large)
    assert type(frames[0].payload) is bytes
    payload = frames[1].payload
    assert type(payload) is memoryview and payload.readonly
    assert payload.obj is not None and bytes(payload) == b"L" * 1024
    # Mutable input is always copied, so the caller may reuse its buffer.
    buffer = bytearray(large)
    frame, = core.FrameDecoder().feed(buffer)
    buffer[30:40] = b"!" * 10
    assert type(frame.payload) is bytes and frame.payload == b"L" * 1024


def test_zero_copy_view_points_into_the_input(core):
    numpy = pytest.importorskip("numpy")
    stream = core.encode_frame(2, numpy.arange(1000, dtype=numpy.float64), 5)
    frame, = core.FrameDecoder().feed(stream)
    array = numpy.frombuffer(frame.payload, dtype=numpy.float64)
    assert array[999] == 999.0
    assert numpy.shares_memory(array, numpy.frombuffer(stream, dtype=numpy.uint8))


@pytest.mark.parametrize("buffer_type", [bytearray, memoryview])
def test_other_input_types(core, buffer_type):
    stream = core.encode_frame(1, b"a" * 2000, 1) + core.encode_frame(1, b"b", 2)
    frames = core.FrameDecoder().feed(buffer_type(stream))
    assert [bytes(f.payload) for f in frames] == [b"a" * 2000, b"b"]


def test_minor_versions_are_accepted(core):
    frame, = core.FrameDecoder().feed(raw_frame(b"hi", version=0x01FF))
    assert frame.version == 0x01FF


@pytest.mark.parametrize("stream, error, code, request_id, fatal", [
    (raw_frame(b"x", magic=0x4851), BadHeaderError, ErrorCode.BAD_HEADER, None, True),
    (raw_frame(b"x", version=0x0200), BadHeaderError, ErrorCode.BAD_HEADER, None, True),
    (raw_frame(b"x", version=0x0001), BadHeaderError, ErrorCode.BAD_HEADER, None, True),
    (raw_frame(b"x", msg_type=0, request_id=4), BadHeaderError, ErrorCode.BAD_HEADER, 4, True),
    (raw_frame(b"x", msg_type=5, request_id=4), BadHeaderError, ErrorCode.BAD_HEADER, 4, True),
    (raw_frame(b"", length=1001, request_id=6), FrameTooLargeError, ErrorCode.TOO_LARGE, 6, True),
    (raw_frame(b"x", flags=0x0004, request_id=7), UnsupportedFlagsError,
     ErrorCode.UNSUPPORTED_FLAGS, 7, False),
    (raw_frame(b"x", flags=0x8000, request_id=7), UnsupportedFlagsError,
     ErrorCode.UNSUPPORTED_FLAGS, 7, False),
    (raw_frame(b"x", checksum=0, request_id=8), ChecksumError, ErrorCode.CHECKSUM, 8, False),
    (raw_frame(b"", checksum=0, request_id=8), ChecksumError, ErrorCode.CHECKSUM, 8, False),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", BadHeaderError, ErrorCode.BAD_HEADER, None, True),
])
def test_malformed(core, stream, error, code, request_id, fatal):
    for how, chunks in three_ways(stream).items():
        decoder = core.FrameDecoder(max_payload=1000)
        with pytest.raises(error) as caught:
            for chunk in chunks:
                decoder.feed(chunk)
        assert caught.value.code == code and caught.value.fatal is fatal, how
        assert caught.value.request_id == request_id, how
        assert caught.value.msg_type == (None if request_id is None or error is BadHeaderError
                                         else 1), how
        assert caught.value.frames == []


def test_garbage_is_refused_after_two_bytes(core):
    with pytest.raises(BadHeaderError, match="magic"):
        core.FrameDecoder().feed(b"\x00\x00")
    with pytest.raises(BadHeaderError, match="major version 2"):
        core.FrameDecoder().feed(b"HP\x02")
    decoder = core.FrameDecoder()
    assert decoder.feed(b"H") == [] and decoder.pending == 1


@given(st.binary(min_size=1, max_size=200))
def test_random_garbage_never_crashes_or_hangs(core, garbage):
    decoder = core.FrameDecoder(max_payload=4096)
    try:
        decoder.feed(garbage)
        decoder.feed_eof()
    except (ProtocolError, IncompleteFrameError):
        pass


def test_too_large_is_refused_before_the_payload_arrives(core):
    decoder = core.FrameDecoder(max_payload=64 * 1024 * 1024)
    header = raw_frame(length=64 * 1024 * 1024 + 1)
    with pytest.raises(FrameTooLargeError):
        decoder.feed(header)
    assert decoder.pending == 0


def test_limit_itself_is_accepted(core):
    frame, = core.FrameDecoder(max_payload=10).feed(raw_frame(b"0123456789"))
    assert frame.payload == b"0123456789"
    with pytest.raises(ValueError):
        core.FrameDecoder(max_payload=-1)
    with pytest.raises(ValueError):
        core.FrameDecoder(max_payload=2**32)


def test_fatal_error_poisons_the_decoder(core):
    decoder = core.FrameDecoder()
    good = raw_frame(b"ok")
    with pytest.raises(BadHeaderError) as first:
        decoder.feed(good + b"XX" + good)
    assert [bytes(f.payload) for f in first.value.frames] == [b"ok"]
    with pytest.raises(BadHeaderError) as again:
        decoder.feed(good)
    assert again.value is not first.value and again.value.frames == []


@pytest.mark.parametrize("bad, unread", [
    (raw_frame(b"bad", checksum=1, request_id=2), 0),
    (raw_frame(b"bad", flags=0x0100, request_id=2), 3),   # its payload is skipped later
])
def test_recoverable_error_keeps_the_rest_of_the_input(core, bad, unread):
    before, after = raw_frame(b"one", request_id=1), raw_frame(b"three", request_id=3)
    decoder = core.FrameDecoder()
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(before + bad + after)
    assert not caught.value.fatal and caught.value.request_id == 2
    assert [f.request_id for f in caught.value.frames] == [1]
    assert decoder.pending == len(after) + unread
    assert [f.request_id for f in decoder.feed(b"")] == [3]
    assert decoder.frames_decoded == 2
    assert decoder.pending == 0


def test_reserved_flags_payload_is_skipped_unbuffered(core):
    decoder = core.FrameDecoder()
    with pytest.raises(UnsupportedFlagsError):
        decoder.feed(raw_frame(length=10_000_000, flags=0x0010, checksum=0)[:24])
    for _ in range(10):
        assert decoder.feed(bytes(1_000_000)) == []
        assert decoder.pending == 0
    frame, = decoder.feed(raw_frame(b"after"))
    assert frame.payload == b"after"


def test_eof(core):
    decoder = core.FrameDecoder()
    assert decoder.feed_eof() == []
    decoder.feed(raw_frame(b"abcdef")[:-2])
    with pytest.raises(IncompleteFrameError) as caught:
        decoder.feed_eof()
    assert caught.value.pending_bytes == 28 and isinstance(caught.value, EOFError)
    decoder = core.FrameDecoder()
    decoder.feed(b"HP\x01")
    with pytest.raises(IncompleteFrameError):
        decoder.feed_eof()


def test_large_frame_in_pieces(core):
    payload = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    stream = core.encode_frame(2, payload, 77)
    decoder = core.FrameDecoder()
    frames = []
    for start in range(0, len(stream), 65_536 + 3):
        frames += decoder.feed(stream[start:start + 65_536 + 3])
        assert decoder.pending == (0 if frames else min(start + 65_539, len(stream)))
    frame, = frames
    assert frame.request_id == 77 and bytes(frame.payload) == payload


def test_frame_objects(core):
    frame = core.Frame(1, 0, 0x0100, 5, b"p")
    assert (frame.type, frame.request_id, frame.payload) == (1, 5, b"p")
    assert "request_id=5" in repr(frame)
    assert frame.type == hintens.wire.MessageType.REQUEST



def test_decoded_frames_of_bytes_are_left_out_of_the_collector(cython_core):
    """A decoded frame whose payload is a bytes cannot be in a reference cycle, so the
    compiled decoder takes it out of the garbage collector's lists (a stream of small Events
    made each young-generation collection walk hundreds of them). One that shares the input
    (a memoryview) or that the application built stays tracked: either may reach anything."""
    import gc
    import sys

    small, assembled, shared = b"s" * 100, b"a" * 70_000, b"m" * 5000
    decoder = cython_core.FrameDecoder(max_payload=1 << 20)
    frames = decoder.feed(raw_frame(small, request_id=1) + raw_frame(shared, request_id=2)
                          + raw_frame(b"", request_id=3))
    whole = raw_frame(assembled, request_id=4)
    frames += decoder.feed(whole[:30_000]) + decoder.feed(whole[30_000:])
    kinds = [(f.request_id, type(f.payload).__name__, gc.is_tracked(f)) for f in frames]
    assert kinds == [(1, "bytes", False), (2, "memoryview", True), (3, "bytes", False),
                     (4, "bytes", False)]
    assert [bytes(f.payload) for f in frames] == [small, shared, b"", assembled]
    payload = frames[0].payload
    held = sys.getrefcount(payload)
    del frames   # an untracked frame is still freed with its last reference
    assert sys.getrefcount(payload) == held - 1
    assert gc.is_tracked(cython_core.Frame(1, 0, 0x0100, 5, b"p"))
    # __init__ called again on a decoded frame may give it any payload: tracked again.
    (again,) = cython_core.FrameDecoder().feed(raw_frame(small, request_id=7))
    assert not gc.is_tracked(again)
    holder: list = []
    again.__init__(1, 0, 0x0100, 7, holder)
    assert gc.is_tracked(again)

# Property test: random streams with random faults, random chunking, both cores.

FAULTS = ["none", "none", "none", "crc", "flags", "magic", "version", "type", "too_large"]


@st.composite
def streams(draw):
    parts = []
    for request_id in range(draw(st.integers(1, 12))):
        payload = draw(st.one_of(st.binary(max_size=40), st.binary(min_size=1000, max_size=1100),
                                 st.just(b"")))
        fault = draw(st.sampled_from(FAULTS))
        fields = {"payload": payload, "request_id": request_id,
                  "msg_type": draw(st.integers(1, 4)),
                  "flags": draw(st.sampled_from([0, 1, 2, 3])),
                  "version": draw(st.sampled_from([0x0100, 0x0101, 0x01FF]))}
        fields.update({
            "none": {}, "crc": {"checksum": _core_py.crc16(payload) ^ 0x5A5A},
            "flags": {"flags": 0x0004 << draw(st.integers(0, 13))},
            "magic": {"magic": 0x4851}, "version": {"version": 0x0000},
            "type": {"msg_type": 9}, "too_large": {"length": 5000},
        }[fault])
        parts.append(raw_frame(**fields))
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    return stream, chunks


@given(streams())
def test_property_chunking_and_cores_agree(cython_core, case):
    stream, chunks = case
    expected = drive(_core_py.FrameDecoder(max_payload=4096), [stream])
    assert drive(_core_py.FrameDecoder(max_payload=4096), chunks) == expected
    assert drive(cython_core.FrameDecoder(max_payload=4096), [stream]) == expected
    assert drive(cython_core.FrameDecoder(max_payload=4096), chunks) == expected


@given(st.lists(st.tuples(st.integers(1, 4), st.binary(max_size=3000), st.integers(0, 2**64 - 1),
                          st.sampled_from([0, 1, 2, 3])), max_size=10),
       st.integers(1, 5000))
def test_property_round_trip(core, frames, chunk_size):
    stream = b"".join(core.encode_frame(t, p, r, f) for t, p, r, f in frames)
    chunks = [stream[i:i + chunk_size] for i in range(0, len(stream), chunk_size)]
    decoded = drive(core.FrameDecoder(), chunks)
    assert decoded == [(t, f, 0x0100, r, p) for t, p, r, f in frames]


# -- the compiled decoder's spare buffer for large payloads -----------------------------------

SPARE_SIZE = 8 << 20


def _pieces(frame: bytes, size: int = 1 << 18):
    """A frame fed as a transport would: in reads of ``size`` bytes."""
    view = memoryview(frame)
    return [bytes(view[i:i + size]) for i in range(0, len(frame), size)]


def _decode_one(decoder, frame):
    frames = []
    for piece in _pieces(frame):
        frames += decoder.feed(piece)
    assert len(frames) == 1
    return frames[0]


@pytest.fixture()
def spare_module(cython_core):
    from hintens.wire import _wire
    _wire.drop_spare()
    yield _wire
    _wire.drop_spare()


def test_a_released_large_payload_is_reused_for_the_next(spare_module):
    decoder = spare_module.FrameDecoder(max_payload=16 << 20)
    first, second = bytes([1]) * SPARE_SIZE, bytes([2]) * (SPARE_SIZE - 5)
    payload = _decode_one(decoder, raw_frame(first, request_id=1)).payload
    assert payload == first
    kept = id(payload)
    assert spare_module.spare_bytes() == SPARE_SIZE
    hash(payload)   # a cached hash must not outlive the bytes it was taken of
    del payload
    again = _decode_one(decoder, raw_frame(second, request_id=2)).payload
    assert id(again) == kept   # assembled in the same buffer, at its new length
    assert len(again) == len(second) and again == second
    assert hash(again) == hash(bytes(second))
    assert spare_module.spare_bytes() == SPARE_SIZE   # still room for the larger one


def test_a_payload_still_held_is_never_overwritten(spare_module):
    decoder = spare_module.FrameDecoder(max_payload=16 << 20)
    first, second = bytes([1]) * SPARE_SIZE, bytes([2]) * SPARE_SIZE
    held = _decode_one(decoder, raw_frame(first, request_id=1)).payload
    view = memoryview(held)[10:20]          # a view keeps it, as the reference does
    again = _decode_one(decoder, raw_frame(second, request_id=2)).payload
    assert again == second and again is not held
    assert held == first and bytes(view) == first[10:20]
    # The spare is now the second payload, the first belongs to the application alone.
    assert spare_module.spare_bytes() == SPARE_SIZE


def test_spare_limits_and_drop(spare_module):
    decoder = spare_module.FrameDecoder(max_payload=80 << 20)
    small = _decode_one(decoder, raw_frame(bytes(1 << 20))).payload   # under SPARE_MIN
    assert small == bytes(1 << 20) and spare_module.spare_bytes() == 0
    big = _decode_one(decoder, raw_frame(bytes(SPARE_SIZE))).payload
    del big
    assert spare_module.spare_bytes() == SPARE_SIZE
    # Too large for the spare: a fresh buffer, and the spare (free) is let go at once.
    larger = _decode_one(decoder, raw_frame(bytes([3]) * (SPARE_SIZE + 1))).payload
    assert larger == bytes([3]) * (SPARE_SIZE + 1)
    assert spare_module.spare_bytes() == SPARE_SIZE + 1
    # Over 64 MiB (SPARE_MAX) is never kept.
    del larger
    huge = _decode_one(decoder, raw_frame(bytes((64 << 20) + 1))).payload
    assert len(huge) == (64 << 20) + 1 and spare_module.spare_bytes() == 0
    big = _decode_one(decoder, raw_frame(bytes(SPARE_SIZE))).payload
    del big
    assert spare_module.spare_bytes() == SPARE_SIZE
    spare_module.drop_spare()
    assert spare_module.spare_bytes() == 0


def test_a_bad_crc_in_a_reused_buffer(spare_module):
    decoder = spare_module.FrameDecoder(max_payload=16 << 20)
    _decode_one(decoder, raw_frame(bytes(SPARE_SIZE)))   # delivered, then dropped
    bad = raw_frame(bytes([7]) * SPARE_SIZE, checksum=0x1234, request_id=9)
    frames = []
    with pytest.raises(ChecksumError) as caught:
        for piece in _pieces(bad):
            frames += decoder.feed(piece)
    assert caught.value.request_id == 9 and not frames
    ok = _decode_one(decoder, raw_frame(bytes([8]) * SPARE_SIZE, request_id=10))
    assert ok.request_id == 10 and ok.payload == bytes([8]) * SPARE_SIZE


@pytest.mark.parametrize("flip", [0, (10 << 20) + 1, (20 << 20) + 2])
def test_a_whole_frame_of_20_mib_with_one_bad_byte(core, flip):
    # A frame fed whole from 16 MiB on has its CRC taken on several threads by the compiled
    # core (_crc16_threads.h): one changed byte anywhere, the first of a block or the last,
    # is a recoverable CHECKSUM error, and the frame after it decodes.
    payload = bytearray(random.Random(flip).randbytes((20 << 20) + 3))
    good = raw_frame(bytes(payload), request_id=4)
    payload[flip] ^= 0x40
    bad = good[:24] + bytes(payload)
    decoder = core.FrameDecoder(max_payload=32 << 20)
    with pytest.raises(ChecksumError) as caught:
        decoder.feed(bad + good)
    assert caught.value.request_id == 4 and not caught.value.fatal and caught.value.frames == []
    (frame,) = decoder.feed(b"")
    assert frame.request_id == 4 and frame.payload == good[24:]
