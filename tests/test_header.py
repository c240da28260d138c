"""The 24-byte header: exact bytes, packing at offsets, and field validation."""

from __future__ import annotations

import mmap
import struct

import pytest

from hintens.wire import Flags, MessageType

# Written by hand from docs/PROTOCOL.md: REQUEST, request id 0x0102030405060708, b"123456789".
KNOWN_FRAME = bytes.fromhex(
    "4850"              # magic "HP"
    "0100"              # version 1.0
    "00000001"          # type REQUEST
    "0000"              # flags
    "00000009"          # payload length
    "29b1"              # CRC-16/IBM-3740 of the payload
    "0102030405060708"  # request id
) + b"123456789"


def test_known_frame_bytes(core):
    assert core.encode_frame(MessageType.REQUEST, b"123456789", 0x0102030405060708) == KNOWN_FRAME
    assert core.encode_header(1, b"123456789", 0x0102030405060708) == KNOWN_FRAME[:24]


def test_flags_and_types_land_in_their_fields(core):
    frame = core.encode_frame(MessageType.ERROR, b"", 2**64 - 1, flags=Flags.SHM | Flags.COMPRESSED)
    assert frame == bytes.fromhex("4850 0100 00000004 0003 00000000 ffff ffffffffffffffff")


def test_matches_struct_layout(core):
    header = core.encode_header(MessageType.EVENT, b"abc", 99, Flags.SHM)
    assert struct.unpack(">HHIHIHQ", header) == (
        0x4850, 0x0100, 3, 1, 3, core.crc16(b"abc"), 99)


def test_pack_into_at_offset_and_unpack(core):
    buffer = bytearray(100)
    core.pack_header_into(buffer, 37, 2, 1234, 0xBEEF, 2**63 + 5, flags=2, version=0x0107)
    assert buffer[:37] == bytes(37) and buffer[61:] == bytes(39)
    header = core.unpack_header(buffer, 37)
    assert (header.magic, header.version, header.type, header.flags, header.length,
            header.checksum, header.request_id) == (0x4850, 0x0107, 2, 2, 1234, 0xBEEF, 2**63 + 5)
    assert "length=1234" in repr(header)


def test_pack_into_mmap_and_memoryview(core):
    with mmap.mmap(-1, 64) as mapped:
        core.pack_header_into(mapped, 0, 1, 0, 0xFFFF, 1)
        core.pack_header_into(memoryview(mapped)[24:], 0, 1, 0, 0xFFFF, 2)
        assert core.unpack_header(mapped, 24).request_id == 2
        assert mapped[:24] == core.encode_header(1, b"", 1)


def test_unpack_does_not_validate(core):
    header = core.unpack_header(b"XY" + bytes(22))
    assert header.magic == 0x5859 and header.type == 0


@pytest.mark.parametrize("call", [
    lambda c: c.pack_header_into(bytearray(30), 7, 1, 0, 0, 0),
    lambda c: c.pack_header_into(bytearray(30), -1, 1, 0, 0, 0),
    lambda c: c.unpack_header(bytes(23)),
    lambda c: c.unpack_header(bytes(30), 7),
    lambda c: c.unpack_header(bytes(30), -1),
    lambda c: c.encode_frame(0, b"", 1),
    lambda c: c.encode_frame(5, b"", 1),
    lambda c: c.encode_frame(1, b"", 1, flags=0x0004),
    lambda c: c.encode_header(1, b"", 1, flags=0x8000),
])
def test_value_errors(core, call):
    with pytest.raises(ValueError):
        call(core)


@pytest.mark.parametrize("call", [
    lambda c: c.pack_header_into(bytearray(30), 0, 2**32, 0, 0, 0),
    lambda c: c.pack_header_into(bytearray(30), 0, 1, 2**32, 0, 0),
    lambda c: c.pack_header_into(bytearray(30), 0, 1, 0, 2**16, 0),
    lambda c: c.pack_header_into(bytearray(30), 0, 1, 0, 0, 2**64),
    lambda c: c.pack_header_into(bytearray(30), 0, 1, 0, 0, -1),
    lambda c: c.pack_header_into(bytearray(30), 0, 1, 0, 0, 0, flags=2**16),
    lambda c: c.pack_header_into(bytearray(30), 0, 1, 0, 0, 0, version=-1),
    lambda c: c.encode_frame(1, b"", -1),
    lambda c: c.encode_frame(1, b"", 2**64),
    lambda c: c.encode_frame(2**32 + 1, b"", 1),
])
def test_overflow_errors(core, call):
    with pytest.raises(OverflowError):
        call(core)


@pytest.mark.parametrize("call", [
    lambda c: c.pack_header_into(b"x" * 30, 0, 1, 0, 0, 0),   # read-only
    lambda c: c.pack_header_into(bytearray(30), 0.0, 1, 0, 0, 0),
    lambda c: c.unpack_header("x" * 30),
    lambda c: c.encode_frame(1.0, b"", 1),
    lambda c: c.encode_frame(1, "text", 1),
    lambda c: c.encode_frame(1, b"", 1.5),
])
def test_type_errors(core, call):
    with pytest.raises(TypeError):
        call(core)


def test_payload_over_4_gib_is_refused_before_it_is_read(core):
    # An anonymous mapping is never touched: the length check comes first.
    with mmap.mmap(-1, 2**32) as huge:
        with pytest.raises(ValueError, match="u32"):
            core.encode_header(1, huge, 1)
        with pytest.raises(ValueError, match="u32"):
            core.encode_frame(1, huge, 1)


def test_integer_like_values_are_accepted(core):
    numpy = pytest.importorskip("numpy")
    assert core.encode_frame(numpy.uint32(1), b"x", numpy.uint64(9)) == core.encode_frame(1, b"x", 9)
