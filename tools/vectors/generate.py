#!/usr/bin/env python3
"""Writes the protocol test vectors, tests/vectors/*.json, from docs/PROTOCOL.md alone.

This script does not import hintens, on purpose: every byte below comes from the spec's tables
(header, CRC, Error payload, hello, control Events, SHM descriptor), and every expected outcome
of a bad input is written by hand next to its case, with the rule it follows ("§6.4" is
section 6, check 4). The Python tests (tests/test_vectors.py) and the Go and Rust ports check
their implementations against the same files; tests/vectors/README.md gives their schemas.

Usage: python tools/vectors/generate.py [--out DIR]     (default: tests/vectors)

The output is deterministic: sorted keys, indent 1, lowercase hex, UTF-8, a final newline.
"""

from __future__ import annotations

import argparse
import json
import os
import struct

# --- §2 frame layout, §3 checksum, §4 message types, §7 error codes ------------------------

HEADER = struct.Struct(">HHIHIHQ")   # magic, version, type, flags, length, checksum, request id
MAGIC, VERSION = 0x4850, 0x0100
REQUEST, RESPONSE, EVENT, ERROR = 1, 2, 3, 4
SHM, COMPRESSED = 0x0001, 0x0002
U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1
DEFAULT_LIMIT = 64 * 1024 * 1024     # §6.4: hintens's default inline limit
CONTROL_LIMIT = 4108                 # §6.4: Error frames and control Events, whatever the limit
CODES = {"CHECKSUM": 1, "BAD_HEADER": 2, "TOO_LARGE": 3, "UNSUPPORTED_FLAGS": 4,
         "HANDLER_ERROR": 5, "TIMEOUT": 6, "SHM_ERROR": 7, "UNAVAILABLE": 8}
KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def crc16(data: bytes) -> int:
    """CRC-16/IBM-3740, §3's bit-at-a-time reference line for line."""
    crc = 0xFFFF
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = (crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def pattern(length: int, mul: int = 1, add: int = 0, mod: int = 251) -> bytes:
    """Byte i is (mul * i + add) % mod."""
    return bytes((mul * i + add) % mod for i in range(length))


def header(msg_type: int, length: int, checksum: int, request_id: int, flags: int = 0,
           version: int = VERSION, magic: int = MAGIC) -> bytes:
    return HEADER.pack(magic, version, msg_type, flags, length, checksum, request_id)


class Frame:
    """A frame built by the rules of §2-3: length and CRC computed from the payload."""

    def __init__(self, msg_type: int, payload: bytes, request_id: int, flags: int = 0,
                 version: int = VERSION) -> None:
        self.type, self.payload, self.request_id = msg_type, payload, request_id
        self.flags, self.version = flags, version

    def wire(self) -> bytes:
        return header(self.type, len(self.payload), crc16(self.payload), self.request_id,
                      self.flags, self.version) + self.payload

    def obj(self) -> dict:
        return {"type": self.type, "flags": self.flags, "version": self.version,
                "request_id": self.request_id, "payload": self.payload.hex()}


# --- §7 Error payload, §8 hello, §8a control Events, §9 descriptor ---------------------------

def error_payload(code: int, message: bytes) -> bytes:
    return struct.pack("<IQ", code, len(message)) + message


def hintens_error_message(message: str) -> bytes:
    """§7: hintens cuts messages to 4096 bytes on a UTF-8 character boundary."""
    data = message.encode("utf-8")
    if len(data) <= 4096:
        return data
    cut = 4096
    while data[cut] & 0xC0 == 0x80:   # data[cut] continues the character cut in two
        cut -= 1
    return data[:cut]


def hello_payload(entries: list, count: int | None = None, magic: bytes = b"HELO") -> bytes:
    """§8: magic, u64 LE count, then per entry u16 LE key, u64 LE length, value. An entry may
    be (key, value, declared length) to lie about its length."""
    out = magic + struct.pack("<Q", len(entries) if count is None else count)
    for entry in entries:
        key, value = entry[0], entry[1]
        out += struct.pack("<HQ", key, entry[2] if len(entry) > 2 else len(value)) + value
    return out


def hintens_hello(minor: int, features: int, max_payload: int, shm_bytes: int = GIB,
                  shm_segments: int = 64, extra: dict | None = None) -> bytes:
    """The hello hintens sends: keys 1-3, 6-7 only with SHM (§8), each once, in order."""
    entries = dict(extra or {})
    entries[1] = bytes([minor])
    entries[2] = struct.pack("<I", features)
    entries[3] = struct.pack("<I", max_payload)
    if features & 1:
        entries[6] = struct.pack("<Q", shm_bytes)
        entries[7] = struct.pack("<I", shm_segments)
    return hello_payload(sorted(entries.items()))


def control(magic: bytes, ids: list, count: int | None = None) -> bytes:
    """§8a: magic, u32 LE count, count x u32 LE segment ids."""
    return magic + struct.pack("<I", len(ids) if count is None else count) + b"".join(
        struct.pack("<I", i) for i in ids)


NEW_SEGMENT, PEER_SEGMENT = 0x1, 0x2
DESCRIPTOR = struct.Struct("<IIQQQ")   # §9: id, flags, size, offset, length; little-endian


def descriptor(segment_id: int, flags: int, size: int, offset: int, length: int) -> bytes:
    return DESCRIPTOR.pack(segment_id, flags, size, offset, length)


def fields(segment_id: int, flags: int, size: int, offset: int, length: int) -> dict:
    return {"segment_id": segment_id, "flags": flags, "size": size, "offset": offset,
            "length": length}


# --- crc16.json -------------------------------------------------------------------------------

def crc_file() -> dict:
    vectors = [{"name": "empty", "input": "", "crc": crc16(b"")},
               {"name": "check_123456789", "input": b"123456789".hex(),
                "crc": crc16(b"123456789")}]
    assert vectors[0]["crc"] == 0xFFFF and vectors[1]["crc"] == 0x29B1   # §3's table
    vectors += [{"name": f"byte_{b:02x}", "input": bytes([b]).hex(), "crc": crc16(bytes([b]))}
                for b in range(256)]
    for n in range(1, 65):
        data = pattern(n, 37, 11, 256)
        vectors.append({"name": f"pattern37_{n}", "input": data.hex(), "crc": crc16(data)})
    for name, data in [("zeros_32", bytes(32)), ("ones_32", b"\xff" * 32),
                       ("ascii_hello", b"hello"), ("frame_magic", b"HP"),
                       ("pattern251_4096", pattern(4096))]:
        vectors.append({"name": name, "input": data.hex(), "crc": crc16(data)})
    patterns = []
    for length, mul, add, mod in [(65535, 1, 0, 251), (65536, 1, 0, 251), (65537, 1, 0, 251),
                                  (70000, 1, 0, 251), (70000, 7, 3, 256), (4097, 1, 0, 256),
                                  (100003, 13, 5, 256)]:
        patterns.append({"name": f"pattern_{mul}i_{add}_mod{mod}_{length}", "length": length,
                         "mul": mul, "add": add, "mod": mod,
                         "rule": f"byte i = ({mul} * i + {add}) % {mod}",
                         "crc": crc16(pattern(length, mul, add, mod))})
    return {"description": "CRC-16/IBM-3740 of payload bytes", "spec": "section 3",
            "vectors": vectors, "patterns": patterns}


# --- headers.json -----------------------------------------------------------------------------

def header_file() -> dict:
    cases = [("request_example", 0x0100, REQUEST, 0, 9, 0x29B1, 0x0102030405060708),
             ("response", 0x0100, RESPONSE, 0, 2, 0x1234, 1),
             ("event_control", 0x0100, EVENT, 0, 0, 0xFFFF, 0),
             ("error", 0x0100, ERROR, 0, 12, 0xABCD, 7),
             ("flags_shm", 0x0100, REQUEST, SHM, 32, 0x0F0F, 2),
             ("flags_compressed", 0x0100, RESPONSE, COMPRESSED, 100, 0x8001, 3),
             ("flags_both", 0x0100, EVENT, SHM | COMPRESSED, 1, 0x0001, 4),
             ("minor_5", 0x0105, REQUEST, 0, 0, 0xFFFF, 5),
             ("minor_5_all_max", 0x0105, ERROR, 3, U32_MAX, 0xFFFF, U64_MAX),
             ("length_max", 0x0100, REQUEST, 0, U32_MAX, 0, 1),
             ("request_id_max", 0x0100, RESPONSE, 0, 0, 0xFFFF, U64_MAX),
             ("request_id_high_bit", 0x0100, REQUEST, 0, 0, 0xFFFF, 1 << 63),
             ("length_one_checksum_zero", 0x0100, EVENT, 0, 1, 0, 0x00000000FFFFFFFF),
             ("fields_distinct_bytes", 0x0100, REQUEST, 1, 0x0A0B0C0D, 0x0E0F, 0x1112131415161718)]
    return {"description": "24-byte frame headers: field values <-> bytes (big-endian)",
            "spec": "section 2",
            "headers": [{"name": n, "version": v, "type": t, "flags": f, "length": ln,
                         "checksum": c, "request_id": r,
                         "hex": header(t, ln, c, r, f, v).hex()}
                        for n, v, t, f, ln, c, r in cases]}


# --- frames.json ------------------------------------------------------------------------------

# A zstd frame (RFC 8878) holding "hello": magic, header descriptor 0x20 (single segment, a
# 1-byte content size), content size 5, one last raw block of 5 bytes, no checksum (§9a).
ZSTD_HELLO = bytes.fromhex("28b52ffd" "20" "05" "290000") + b"hello"
SPEC_EXAMPLE = ("4850 0100 00000001 0000 00000009 29b1 0102030405060708 313233343536373839"
                .replace(" ", ""))   # §2's example, as the spec prints it


def frame_file() -> dict:
    hello = hintens_hello(0, 1, DEFAULT_LIMIT)
    named = [
        ("section2_example", Frame(REQUEST, b"123456789", 0x0102030405060708)),
        ("empty_request", Frame(REQUEST, b"", 1)),
        ("empty_event", Frame(EVENT, b"", 99)),
        ("response", Frame(RESPONSE, b"ok", 1)),
        ("hello_event", Frame(EVENT, hello, 0)),
        ("control_release_event", Frame(EVENT, control(b"HREL", [1, 2]), 0)),
        ("app_event", Frame(EVENT, b"tick", 42)),
        ("error_handler", Frame(ERROR, error_payload(5, b"boom"), 7)),
        ("error_request_id_0", Frame(ERROR, error_payload(8, b"shutting down"), 0)),
        ("shm_request", Frame(REQUEST, descriptor(1, NEW_SEGMENT, MIB, 0, 100000), 3, SHM)),
        ("compressed_response", Frame(RESPONSE, ZSTD_HELLO, 4, COMPRESSED)),
        ("minor_version_5", Frame(REQUEST, b"from 1.5", 5, version=0x0105)),
        ("minor_version_ff", Frame(RESPONSE, b"from 1.255", 5, version=0x01FF)),
        ("request_id_max", Frame(REQUEST, b"\x00", U64_MAX)),
        ("payload_looks_like_header", Frame(REQUEST, Frame(REQUEST, b"x", 9).wire(), 10)),
        ("payload_1024", Frame(RESPONSE, pattern(1024), 11)),
        ("payload_4096", Frame(EVENT, pattern(4096, 3, 1, 256), 12)),
    ]
    assert named[0][1].wire().hex() == SPEC_EXAMPLE                  # §2's example, verbatim
    assert named[1][1].wire()[14:16] == b"\xff\xff"                  # §2: empty -> 0xFFFF
    frames = [dict(f.obj(), name=n, frame=f.wire().hex()) for n, f in named]
    by_name = dict(named)
    streams = []
    for name, parts in [
            ("session_start", ["hello_event", "section2_example", "response", "app_event"]),
            ("mixed_types", ["empty_request", "error_handler", "shm_request",
                             "compressed_response", "control_release_event",
                             "minor_version_5", "request_id_max"]),
            ("empties_back_to_back", ["empty_request", "empty_event", "empty_request"]),
            ("with_lookalike_payload", ["payload_looks_like_header", "payload_1024",
                                        "payload_4096", "error_request_id_0"])]:
        chosen = [by_name[p] for p in parts]
        streams.append({"name": name, "stream": b"".join(f.wire() for f in chosen).hex(),
                        "frames": [f.obj() for f in chosen]})
    return {"description": "valid whole frames, and streams of frames back to back",
            "spec": "sections 2-4", "frames": frames, "streams": streams}


# --- malformed.json ---------------------------------------------------------------------------

def err(name: str, request_id: int | None) -> dict:
    # §6: BAD_HEADER and TOO_LARGE are fatal; UNSUPPORTED_FLAGS and CHECKSUM are recoverable.
    return {"name": name, "code": CODES[name], "request_id": request_id,
            "fatal": name in ("BAD_HEADER", "TOO_LARGE")}


def malformed_file() -> dict:
    a = Frame(REQUEST, b"first", 1)
    b = Frame(RESPONSE, b"after", 2)
    c = Frame(EVENT, b"", 3)
    cases = []

    def case(name, rule, stream_parts, error, error_at, before=(), after=None,
             limit=DEFAULT_LIMIT):
        cases.append({"name": name, "rule": rule, "max_payload": limit,
                      "stream": b"".join(stream_parts).hex(),
                      "frames_before": [f.obj() for f in before], "error": error,
                      "error_at": error_at,
                      "frames_after": None if after is None else [f.obj() for f in after]})

    def bad_crc(frame: Frame) -> bytes:
        good = frame.wire()
        wrong = crc16(frame.payload) ^ 0x0001
        return good[:14] + struct.pack(">H", wrong) + good[16:]

    A = len(a.wire())
    # §6.1-2: bad magic or major version; the header is unreadable (request id null), and the
    # error is due as soon as those bytes arrive (2 bytes for the magic, 3 for the version).
    case("bad_magic_two_bytes_only", "6.1", [b"HX"], err("BAD_HEADER", None), 2)
    case("bad_magic_http", "6.1", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
         err("BAD_HEADER", None), 2)
    case("bad_magic_little_endian", "6.1", [header(REQUEST, 0, 0xFFFF, 1, magic=0x5048)],
         err("BAD_HEADER", None), 2)
    case("bad_magic_lowercase_after_a_frame", "6.1",
         [a.wire(), b"hp", header(REQUEST, 0, 0xFFFF, 1)[2:]], err("BAD_HEADER", None), A + 2,
         before=[a])
    case("major_version_2_three_bytes_only", "6.2", [b"HP\x02"], err("BAD_HEADER", None), 3)
    case("major_version_0", "6.2", [header(REQUEST, 0, 0xFFFF, 1, version=0x0001)],
         err("BAD_HEADER", None), 3)
    case("major_version_ff_after_a_frame", "6.2",
         [a.wire(), header(REQUEST, 0, 0xFFFF, 1, version=0xFF00)],
         err("BAD_HEADER", None), A + 3, before=[a])
    case("bad_version_and_type_reports_version", "6.2 before 6.3",
         [header(0, 0, 0xFFFF, 1, version=0x0200)], err("BAD_HEADER", None), 3)
    # §6.3: message type 1-4 only. The header was read: the frame's request id is reported.
    case("type_0", "6.3", [header(0, 0, 0xFFFF, 7)], err("BAD_HEADER", 7), 24)
    case("type_5", "6.3", [header(5, 1, crc16(b"x"), 8), b"x"], err("BAD_HEADER", 8), 24)
    case("type_1_little_endian", "6.3", [header(0x01000000, 0, 0xFFFF, 9)],
         err("BAD_HEADER", 9), 24)
    case("type_max_after_a_frame", "6.3", [a.wire(), header(U32_MAX, 0, 0xFFFF, 10)],
         err("BAD_HEADER", 10), A + 24, before=[a])
    case("bad_type_and_too_large_reports_type", "6.3 before 6.4",
         [header(6, U32_MAX, 0, 11, flags=0x0100)], err("BAD_HEADER", 11), 24)
    # §6.4: over the limit -> TOO_LARGE, fatal, before any payload byte (none follow here).
    case("request_over_limit", "6.4", [header(REQUEST, 1025, 0, 12)],
         err("TOO_LARGE", 12), 24, limit=1024)
    case("length_max_default_limit", "6.4", [header(RESPONSE, U32_MAX, 0, U64_MAX)],
         err("TOO_LARGE", U64_MAX), 24)
    case("request_at_limit_accepted", "6.4", [Frame(REQUEST, pattern(1024), 13).wire()],
         None, None, before=[Frame(REQUEST, pattern(1024), 13)], limit=1024)
    case("event_nonzero_id_over_limit", "6.4: the limit binds Events with request id != 0",
         [header(EVENT, 1025, 0, 1)], err("TOO_LARGE", 1), 24, limit=1024)
    case("request_id_0_over_limit", "6.4: only Events with request id 0 are control Events",
         [header(REQUEST, 1025, 0, 0)], err("TOO_LARGE", 0), 24, limit=1024)
    case("response_id_0_over_limit", "6.4", [header(RESPONSE, 2000, 0, 0)],
         err("TOO_LARGE", 0), 24, limit=1024)
    big_error = Frame(ERROR, error_payload(3, b"e" * 4096), 14)
    big_control = Frame(EVENT, pattern(CONTROL_LIMIT, 5, 2, 256), 0)
    assert len(big_error.payload) == len(big_control.payload) == CONTROL_LIMIT
    case("error_4108_over_small_limit_accepted", "6.4: Errors up to 4,108 whatever the limit",
         [a.wire(), big_error.wire()], None, None, before=[a, big_error], limit=1024)
    case("control_event_4108_over_small_limit_accepted",
         "6.4: control Events up to 4,108 whatever the limit",
         [big_control.wire(), a.wire()], None, None, before=[big_control, a], limit=1024)
    case("error_4109_limit_1024", "6.4: over both the limit and 4,108: TOO_LARGE",
         [header(ERROR, CONTROL_LIMIT + 1, 0, 15)], err("TOO_LARGE", 15), 24, limit=1024)
    case("control_event_4109_limit_1024", "6.4: over both the limit and 4,108: TOO_LARGE",
         [header(EVENT, CONTROL_LIMIT + 1, 0, 0)], err("TOO_LARGE", 0), 24, limit=1024)
    # Under a larger limit, the limit itself applies to them: 4,108 is a floor, not a cap.
    long_error = Frame(ERROR, error_payload(3, b"e" * 4097), 15)
    long_control = Frame(EVENT, pattern(CONTROL_LIMIT + 1, 5, 2, 256), 0)
    case("error_4109_default_limit_accepted", "6.4: the larger of the limit and 4,108",
         [long_error.wire()], None, None, before=[long_error])
    case("control_event_4109_default_limit_accepted", "6.4: the larger of the limit and 4,108",
         [long_control.wire()], None, None, before=[long_control])
    case("too_large_and_reserved_flags_reports_too_large", "6.4 before 6.5",
         [header(REQUEST, 2048, 0, 16, flags=0x0004)], err("TOO_LARGE", 16), 24, limit=1024)
    # §6.5: reserved flag bits -> UNSUPPORTED_FLAGS, recoverable: the payload is skipped (here
    # it is itself a whole frame, which must not be decoded) and the stream goes on.
    hidden = Frame(REQUEST, b"must not appear", 99).wire()
    case("reserved_flag_0004_payload_skipped", "6.5",
         [a.wire(), header(REQUEST, len(hidden), crc16(hidden), 17, flags=0x0004), hidden,
          b.wire()], err("UNSUPPORTED_FLAGS", 17), A + 24, before=[a], after=[b])
    case("reserved_flag_8000_empty_event", "6.5",
         [header(EVENT, 0, 0xFFFF, 18, flags=0x8000), b.wire(), c.wire()],
         err("UNSUPPORTED_FLAGS", 18), 24, after=[b, c])
    case("reserved_flags_ffff_response", "6.5",
         [header(RESPONSE, 3, crc16(b"abc"), 19, flags=0xFFFF), b"abc", b.wire()],
         err("UNSUPPORTED_FLAGS", 19), 24, after=[b])
    case("reserved_flag_and_bad_crc_reports_flags", "6.5 before 6.6",
         [header(REQUEST, 3, 0x0000, 20, flags=0x0010), b"abc", b.wire()],
         err("UNSUPPORTED_FLAGS", 20), 24, after=[b])
    case("reserved_flag_on_error_frame", "6.5",
         [header(ERROR, 12, 0, 21, flags=0x0400), error_payload(1, b"")],
         err("UNSUPPORTED_FLAGS", 21), 24, after=[])
    # §6.6: a bad CRC -> CHECKSUM, recoverable, once the whole payload has arrived.
    bad = Frame(REQUEST, b"hello", 22)
    case("bad_crc", "6.6", [a.wire(), bad_crc(bad), b.wire(), c.wire()],
         err("CHECKSUM", 22), A + 24 + 5, before=[a], after=[b, c])
    case("bad_crc_empty_payload", "6.6: the CRC of no bytes is 0xFFFF",
         [header(REQUEST, 0, 0x0000, 23), b.wire()], err("CHECKSUM", 23), 24, after=[b])
    case("bad_crc_byte_swapped", "6.6: the checksum is big-endian",
         [header(REQUEST, 9, 0xB129, 24), b"123456789"], err("CHECKSUM", 24), 33, after=[])
    case("bad_crc_control_event", "6.6",
         [bad_crc(Frame(EVENT, control(b"HREL", [1]), 0)), b.wire()],
         err("CHECKSUM", 0), 24 + 12, after=[b])
    case("bad_crc_shm_descriptor", "6.6 and 3: the CRC covers the descriptor bytes",
         [bad_crc(Frame(REQUEST, descriptor(1, 0, MIB, 0, 1), 25, SHM))],
         err("CHECKSUM", 25), 24 + 32, after=[])
    case("minor_versions_accepted", "6.2: every minor version of major 1",
         [Frame(REQUEST, b"a", 26, version=0x0101).wire(),
          Frame(EVENT, b"", 27, version=0x01FF).wire()], None, None,
         before=[Frame(REQUEST, b"a", 26, version=0x0101),
                 Frame(EVENT, b"", 27, version=0x01FF)])
    return {"description": "byte streams and the first error a receiver reports (section 6)",
            "spec": "section 6", "cases": cases}


# --- hellos.json ------------------------------------------------------------------------------

def understood(minor=0, features=0, max_payload=DEFAULT_LIMIT, shm_bytes=GIB, shm_segments=64):
    # §8's table: "if absent" column for every key left out.
    return {"understood": True, "minor": minor, "features": features,
            "max_payload": max_payload, "shm_receive_bytes": shm_bytes,
            "shm_receive_segments": shm_segments}


NOT_UNDERSTOOD = {"understood": False, "minor": None, "features": None, "max_payload": None,
                  "shm_receive_bytes": None, "shm_receive_segments": None}


def hello_file() -> dict:
    u8, u32, u64 = (lambda v: bytes([v])), (lambda v: struct.pack("<I", v)), (
        lambda v: struct.pack("<Q", v))
    session, instance = bytes(range(16)), bytes(range(0xA0, 0xB0))
    hellos = []

    def add(name, rule, entries, expect, count=None, magic=b"HELO", raw=None, encode=None):
        payload = raw if raw is not None else hello_payload(entries, count, magic)
        vector = dict(expect, name=name, rule=rule, payload=payload.hex(),
                      entries=[[e[0], e[1].hex()] for e in entries]
                      if expect["understood"] else None)
        if encode is not None:   # also what hintens's encoder writes for these settings
            vector["encode"] = encode
            assert hintens_hello(encode["minor"], encode["features"], encode["max_payload"],
                                 encode["shm_receive_bytes"], encode["shm_receive_segments"],
                                 {k: bytes.fromhex(v) for k, v in encode["extra_entries"]}
                                 ) == payload
        hellos.append(vector)

    def enc(minor, features, max_payload, shm_bytes=GIB, shm_segments=64, extra=()):
        return {"minor": minor, "features": features, "max_payload": max_payload,
                "shm_receive_bytes": shm_bytes, "shm_receive_segments": shm_segments,
                "extra_entries": [[k, v.hex()] for k, v in extra]}

    full = [(1, u8(0)), (2, u32(3)), (3, u32(DEFAULT_LIMIT)), (4, session), (5, instance),
            (6, u64(GIB)), (7, u32(64))]
    add("all_keys", "8", full, understood(0, 3), encode=enc(
        0, 3, DEFAULT_LIMIT, extra=[(4, session), (5, instance)]))
    add("hintens_client_shm", "8: keys 6-7 only with SHM",
        [(1, u8(0)), (2, u32(1)), (3, u32(8 * MIB)), (4, session), (6, u64(4 * MIB)),
         (7, u32(2))], understood(0, 1, 8 * MIB, 4 * MIB, 2),
        encode=enc(0, 1, 8 * MIB, 4 * MIB, 2, extra=[(4, session)]))
    add("hintens_server_no_features", "8", [(1, u8(0)), (2, u32(0)), (3, u32(DEFAULT_LIMIT)),
                                            (5, instance)],
        understood(), encode=enc(0, 0, DEFAULT_LIMIT, extra=[(5, instance)]))
    add("hintens_compression_only", "8", [(1, u8(0)), (2, u32(2)), (3, u32(1024))],
        understood(0, 2, 1024), encode=enc(0, 2, 1024))
    add("max_values", "8", [(1, u8(255)), (2, u32(U32_MAX)), (3, u32(U32_MAX)),
                            (6, u64(U64_MAX)), (7, u32(U32_MAX))],
        understood(255, U32_MAX, U32_MAX, U64_MAX, U32_MAX),
        encode=enc(255, U32_MAX, U32_MAX, U64_MAX, U32_MAX))
    add("minimal_no_entries", "8: every key absent", [], understood())
    add("minor_only", "8", [(1, u8(5))], understood(minor=5))
    add("unknown_keys_skipped", "8: receivers skip keys they do not know",
        [(0, b"zero"), (2, u32(1)), (8, b""), (999, bytes(100)), (0xFFFF, b"\x01")],
        understood(features=1))
    add("keys_out_of_order", "8: receivers accept keys in any order",
        [(7, u32(3)), (3, u32(2048)), (1, u8(1)), (6, u64(8192)), (2, u32(1))],
        understood(1, 1, 2048, 8192, 3))
    for key, value in [(1, b""), (1, b"\x00\x01"), (2, u8(1)), (2, u64(1)), (3, bytes(2)),
                       (6, u32(5)), (7, u64(5)), (4, bytes(15)), (5, bytes(17))]:
        # §8: a known key whose value has another size is read as absent; the rest counts.
        add(f"key_{key}_wrong_size_{len(value)}", "8: wrong size reads as absent",
            [(2, u32(1)) if key != 2 else (3, u32(4096)), (key, value)],
            understood(features=1) if key != 2 else understood(max_payload=4096))
    add("repeated_known_key", "8: repeats a key -> not understood",
        [(1, u8(0)), (2, u32(1)), (2, u32(1))], NOT_UNDERSTOOD)
    add("repeated_unknown_key", "8: repeats a key -> not understood",
        [(100, b"a"), (100, b"b")], NOT_UNDERSTOOD)
    add("repeated_key_out_of_order", "8", [(3, u32(1)), (1, u8(0)), (3, u32(1))],
        NOT_UNDERSTOOD)
    add("trailing_byte", "8: trailing bytes",
        [], NOT_UNDERSTOOD, raw=hello_payload([(1, u8(0))]) + b"\x00")
    add("no_entries_trailing_bytes", "8: trailing bytes", [], NOT_UNDERSTOOD,
        raw=hello_payload([]) + b"HELO")
    add("value_overruns_payload", "8: a length that overruns the payload", [],
        NOT_UNDERSTOOD, raw=hello_payload([(1, u8(0), 2)]))
    add("value_length_u64_max", "8: a length that overruns the payload", [], NOT_UNDERSTOOD,
        raw=hello_payload([(2, u32(1)), (9, b"", U64_MAX)]))
    add("count_overruns_payload", "8: a length that overruns the payload", [],
        NOT_UNDERSTOOD, raw=hello_payload([(1, u8(0))], count=2))
    add("entry_header_cut", "8: a length that overruns the payload", [], NOT_UNDERSTOOD,
        raw=hello_payload([(1, u8(0))], count=2) + b"\x02\x00\x04")
    add("count_cut", "8: a length that overruns the payload", [], NOT_UNDERSTOOD,
        raw=b"HELO\x00\x00\x00")
    add("magic_only", "8: a length that overruns the payload", [], NOT_UNDERSTOOD,
        raw=b"HELO")
    add("empty_payload", "8: does not start with HELO", [], NOT_UNDERSTOOD, raw=b"")
    add("entries_64", "8: at most 64 entries", [(100 + i, b"") for i in range(64)],
        understood())
    add("entries_65", "8: more than 64 entries", [], NOT_UNDERSTOOD,
        raw=hello_payload([(100 + i, b"") for i in range(65)]))
    add("count_u64_max", "8: more than 64 entries", [], NOT_UNDERSTOOD,
        raw=hello_payload([], count=U64_MAX))
    filler = 4096 - 12 - 10 - 10 - 4   # key 2 entry (14 bytes) + one unknown key
    add("size_4096", "8: at most 4096 bytes", [(2, u32(1)), (300, pattern(filler))],
        understood(features=1))
    add("size_4097", "8: over 4096 bytes", [], NOT_UNDERSTOOD,
        raw=hello_payload([(2, u32(1)), (300, pattern(filler + 1))]))
    for name, magic in [("magic_hell", b"HELL"), ("magic_lowercase", b"helo"),
                        ("magic_release", b"HREL")]:
        add(f"wrong_{name}", "8: does not start with HELO", [], NOT_UNDERSTOOD,
            raw=hello_payload([(1, u8(0))], magic=magic))
    sizes = {h["name"]: len(h["payload"]) // 2 for h in hellos}
    assert (sizes["size_4096"], sizes["size_4097"]) == (4096, 4097)
    return {"description": "capability hello payloads and what a receiver understands",
            "spec": "section 8", "hellos": hellos}


# --- control.json -----------------------------------------------------------------------------

def control_file() -> dict:
    vectors = []

    def add(name, rule, payload, expect):
        vectors.append({"name": name, "rule": rule, "payload": payload.hex(),
                        "ignored": expect is None,
                        "magic": None if expect is None else expect[0].decode(),
                        "ids": None if expect is None else expect[1]})

    for magic in (b"HREL", b"HREJ", b"HRET"):
        for label, ids in [("one", [1]), ("three", [1, 7, 0xFFFFFFFF]), ("none", [])]:
            add(f"{magic.decode().lower()}_{label}", "8a", control(magic, ids), (magic, ids))
    ids = list(range(1, 1025))
    add("hrel_1024_ids", "8a: at most 1024 ids", control(b"HREL", ids), (b"HREL", ids))
    # §8a: anything but "magic, count <= 1024, exactly 8 + 4 x count bytes" is ignored.
    add("hrel_1025_ids", "8a: over 1024 ids", control(b"HREL", list(range(1, 1026))), None)
    add("hrej_count_u32_max", "8a: over 1024 ids", control(b"HREJ", [1], count=U32_MAX), None)
    add("hrel_count_2_one_id", "8a: length mismatch", control(b"HREL", [1], count=2), None)
    add("hret_count_1_two_ids", "8a: length mismatch", control(b"HRET", [1, 2], count=1), None)
    add("hrel_trailing_byte", "8a: length mismatch", control(b"HREL", [1]) + b"\x00", None)
    add("hrel_count_cut", "8a: length mismatch", b"HREL\x01\x00\x00", None)
    add("hrel_magic_only", "8a: length mismatch", b"HREL", None)
    add("unknown_magic", "8a: any other magic", control(b"HXXX", [1]), None)
    add("lowercase_magic", "8a: any other magic", control(b"hrel", [1]), None)
    add("empty", "8a: any other magic", b"", None)
    return {"description": "control Event payloads (HREL, HREJ, HRET)", "spec": "section 8a",
            "controls": vectors}


# --- errors.json ------------------------------------------------------------------------------

def error_file() -> dict:
    valid = []
    for name, code, message in [
            ("checksum", 1, "payload CRC16 is 0x0000 but the header says 0x29b1"),
            ("code_0_empty", 0, ""), ("unavailable_empty", 8, ""),
            ("multibyte_utf8", 5, "h\u00e9llo w\u00f6rld \u2014 \u20ac \U0001D11E \u65e5\u672c"),
            ("code_u32_max", U32_MAX, "x"), ("application_code", 1000, "app says no"),
            ("control_characters", 5, "line 1\nline 2\x00\t"),
            ("message_4096_bytes", 3, "m" * 4096)]:
        data = message.encode("utf-8")
        valid.append({"name": name, "code": code, "message": message,
                      "payload": error_payload(code, data).hex()})
    truncated = []
    for name, message in [("ascii_5000", "a" * 5000),
                          ("euro_across_4096", "a" * 4095 + "\u20ac"),
                          ("clef_across_4096", "a" * 4094 + "\U0001D11E" + "b"),
                          ("euro_ends_at_4096", "a" * 4093 + "\u20ac" + "tail")]:
        cut = hintens_error_message(message)
        truncated.append({"name": name, "code": 6, "message": message,
                          "sent_message": cut.decode("utf-8"),
                          "payload": error_payload(6, cut).hex()})
    lossy = [{"name": n, "code": 5, "payload": error_payload(5, m).hex(), "message_prefix": p}
             for n, m, p in [("invalid_byte_ff", b"ab\xffcd", "ab"),
                             ("cut_sequence", b"abc\xe2\x82", "abc"),
                             ("lone_continuation", b"\x80", "")]]
    # §7: "not a well-formed (u32, String)": too short, a length that disagrees with its size.
    malformed = [{"name": n, "payload": p.hex(), "reported_code": 0} for n, p in [
        ("empty", b""), ("eleven_bytes", error_payload(1, b"")[:11]),
        ("length_1_no_message", struct.pack("<IQ", 1, 1)),
        ("length_5_four_bytes", struct.pack("<IQ", 1, 5) + b"four"),
        ("trailing_byte", error_payload(1, b"ab") + b"c"),
        ("length_u64_max", struct.pack("<IQ", 1, U64_MAX) + b"x"),
        ("length_high_bits", struct.pack("<IQ", 1, (1 << 32) + 2) + b"ab")]]
    return {"description": "Error frame payloads: bincode (u32 code, String message)",
            "spec": "section 7", "valid": valid, "hintens_truncation": truncated,
            "invalid_utf8": lossy, "malformed": malformed}


# --- descriptors.json -------------------------------------------------------------------------

def descriptor_file() -> dict:
    codec = []
    for name, f, valid in [
            ("new_segment", fields(1, NEW_SEGMENT, MIB, 0, 100000), True),
            ("plain", fields(2, 0, 2 * MIB, 4096, 12345), True),
            ("peer_segment", fields(3, PEER_SEGMENT, MIB, 10, 20), True),
            ("zero_length", fields(4, 0, 4096, 4096, 0), True),
            ("max_fields", fields(U32_MAX, 0, U64_MAX, U64_MAX, U64_MAX), True),
            ("distinct_bytes", fields(0x04030201, 0, 0x0C0B0A0908070605, 0x14131211100F0E0D,
                                      0x1C1B1A1918171615), True),
            # §9 Receiving, first bullet: no unknown flag bits, not both, id other than 0.
            ("id_0", fields(0, NEW_SEGMENT, MIB, 0, 1), False),
            ("both_flags", fields(1, 3, MIB, 0, 1), False),
            ("unknown_flag_4", fields(1, 4, MIB, 0, 1), False),
            ("unknown_flag_high", fields(1, 0x80000001, MIB, 0, 1), False)]:
        codec.append(dict(f, name=name, valid=valid, hex=descriptor(**f).hex()))
    for name, raw in [("short_31", descriptor(1, 0, MIB, 0, 1)[:31]),
                      ("long_33", descriptor(1, 0, MIB, 0, 1) + b"\x00"), ("empty", b"")]:
        codec.append({"name": name, "valid": False, "hex": raw.hex(), "segment_id": None,
                      "flags": None, "size": None, "offset": None, "length": None})
    return {"description": "SHM descriptors (32 bytes, little-endian) and receiver decisions",
            "spec": "section 9", "descriptors": codec, "decisions": decisions()}


SHM_HELLO = hintens_hello(0, 1, DEFAULT_LIMIT)
SHM_ZSTD_HELLO = hintens_hello(0, 3, DEFAULT_LIMIT)
PLAIN_HELLO = hintens_hello(0, 0, DEFAULT_LIMIT)
MEMFD = {"kind": "memfd", "seals": ["SHRINK", "GROW", "SEAL"]}


def decisions() -> list:
    cases = []

    def case(name, rule, desc, outcome, hand_back, *, mapped=None, lent=None, own_free=None,
             fd=None, caps=(GIB, 64), msg_type=REQUEST, flags=SHM, features=1,
             peer_hello=SHM_HELLO, raw=None, mapped_after=None, request_id=5):
        mapped = mapped or {}
        assert sum(mapped.values()) <= caps[0] and len(mapped) <= caps[1]
        payload = raw if raw is not None else descriptor(**desc)
        lend = outcome == "lend"
        segment_id = desc["segment_id"] if desc else None
        cases.append({
            "name": name, "rule": rule,
            "receiver": {"features": features, "shm_receive_bytes": caps[0],
                         "shm_receive_segments": caps[1],
                         "mapped": {str(k): v for k, v in mapped.items()},
                         "lent": {str(k): v for k, v in (lent or {}).items()},
                         "own_not_lent": {str(k): v for k, v in (own_free or {}).items()}},
            "peer_hello": None if peer_hello is None else peer_hello.hex(),
            "frame": {"type": msg_type, "flags": flags, "request_id": request_id,
                      "descriptor": desc, "payload": payload.hex()},
            "fd": fd,
            "expect": {
                "outcome": outcome, "code": None if lend else CODES[outcome],
                "offset": desc["offset"] if lend else None,
                "length": desc["length"] if lend else None,
                "payload": pattern(desc["length"], add=desc["offset"]).hex() if lend else None,
                "hand_back": hand_back,
                "hand_back_payload": None if hand_back is None
                else control(hand_back.encode(), [segment_id]).hex(),
                "mapped_after": {str(k): v for k, v in
                                 (mapped if mapped_after is None else mapped_after).items()}}})

    d = fields
    new9 = d(9, NEW_SEGMENT, 4096, 0, 16)
    # §9 Receiving, bullet 1: the descriptor's shape. §9 Refused: a short descriptor, id 0, or
    # PEER_SEGMENT -> nothing is sent back; else HREL if the receiver maps the id, HREJ if not.
    case("short_descriptor", "9 bullet 1; refused: short -> nothing", d(1, 0, 4096, 0, 1),
         "SHM_ERROR", None, mapped={1: 4096}, raw=descriptor(1, 0, 4096, 0, 1)[:31])
    case("long_descriptor", "9 bullet 1: exactly 32 bytes; refused: not 32 -> nothing",
         d(1, 0, 4096, 0, 1), "SHM_ERROR", None, mapped={1: 4096},
         raw=descriptor(1, 0, 4096, 0, 1) + b"\x00")
    case("empty_descriptor", "9 bullet 1", None, "SHM_ERROR", None, raw=b"")
    case("unknown_flag_bit_mapped", "9 bullet 1; refused: mapped -> HREL",
         d(1, 0x4, 4096, 0, 1), "SHM_ERROR", "HREL", mapped={1: 4096})
    case("unknown_high_bit_new", "9 bullet 1; refused NEW_SEGMENT -> HREJ, fd closed",
         d(9, 0x80000001, 4096, 0, 1), "SHM_ERROR", "HREJ", fd=dict(MEMFD, size=4096))
    case("both_flag_bits", "9 bullet 1; refused: PEER_SEGMENT set -> nothing",
         d(1, 3, 4096, 0, 1), "SHM_ERROR", None, mapped={1: 4096}, fd=dict(MEMFD, size=4096))
    case("id_0_new", "9 bullet 1; refused: id 0 -> nothing", d(0, NEW_SEGMENT, 4096, 0, 1),
         "SHM_ERROR", None, fd=dict(MEMFD, size=4096))
    case("id_0_plain", "9 bullet 1", d(0, 0, 4096, 0, 1), "SHM_ERROR", None)
    case("id_0_peer", "9 bullet 1", d(0, PEER_SEGMENT, MIB, 0, 1), "SHM_ERROR", None,
         lent={1: MIB})
    # Bullet 2: a NEW_SEGMENT frame brought a descriptor, and the id is not already mapped.
    case("new_without_fd", "9 bullet 2; refused NEW_SEGMENT -> HREJ", new9, "SHM_ERROR", "HREJ")
    case("new_id_already_mapped", "9 bullet 2; refused, id mapped -> HREL",
         d(1, NEW_SEGMENT, 4096, 0, 16), "SHM_ERROR", "HREL", mapped={1: 4096},
         fd=dict(MEMFD, size=4096))
    case("new_valid", "9: all checks pass", new9, "lend", "HREL", fd=dict(MEMFD, size=4096),
         mapped_after={9: 4096})
    case("new_valid_only_shrink_seal", "9 bullet 5: F_SEAL_SHRINK is enough",
         d(9, NEW_SEGMENT, 4096, 100, 50), "lend", "HREL",
         fd={"kind": "memfd", "seals": ["SHRINK"], "size": 4096}, mapped_after={9: 4096})
    case("new_whole_segment", "9 bullet 8: offset + length = size",
         d(9, NEW_SEGMENT, 4096, 0, 4096), "lend", "HREL", fd=dict(MEMFD, size=4096),
         mapped_after={9: 4096})
    case("new_zero_length", "9: a zero-length payload is valid", d(9, NEW_SEGMENT, 4096, 0, 0),
         "lend", "HREL", fd=dict(MEMFD, size=4096), mapped_after={9: 4096})
    case("new_zero_length_at_end", "9: offset = size, length 0",
         d(9, NEW_SEGMENT, 4096, 4096, 0), "lend", "HREL", fd=dict(MEMFD, size=4096),
         mapped_after={9: 4096})
    case("new_file_larger_than_size", "9 bullet 6: at least the segment size",
         d(9, NEW_SEGMENT, 4096, 4000, 96), "lend", "HREL", fd=dict(MEMFD, size=8192),
         mapped_after={9: 4096})
    case("new_size_0", "9 Segments: a size more than 0", d(9, NEW_SEGMENT, 0, 0, 0),
         "SHM_ERROR", "HREJ", fd=dict(MEMFD, size=4096))
    # Bullets 4-6: a regular file, sealed against shrinking, at least the segment size.
    case("new_pipe", "9 bullet 4: a regular file", new9, "SHM_ERROR", "HREJ",
         fd={"kind": "pipe", "seals": [], "size": None})
    case("new_plain_file", "9 bullet 5: a file that cannot carry F_SEAL_SHRINK", new9,
         "SHM_ERROR", "HREJ", fd={"kind": "file", "seals": [], "size": 4096})
    case("new_unsealed", "9 bullet 5: F_SEAL_SHRINK", new9, "SHM_ERROR", "HREJ",
         fd={"kind": "memfd", "seals": [], "size": 4096})
    case("new_sealed_without_shrink", "9 bullet 5: F_SEAL_SHRINK", new9, "SHM_ERROR", "HREJ",
         fd={"kind": "memfd", "seals": ["GROW", "SEAL"], "size": 4096})
    case("new_file_smaller_than_size", "9 bullet 6", d(9, NEW_SEGMENT, 8192, 0, 16),
         "SHM_ERROR", "HREJ", fd=dict(MEMFD, size=4096))
    case("new_size_u64_max", "9 bullets 6-7", d(9, NEW_SEGMENT, U64_MAX, 0, 16), "SHM_ERROR",
         "HREJ", fd=dict(MEMFD, size=4096))
    # Bullet 7: the receiver's per-connection bounds (hello keys 6 and 7), by declared size.
    case("sparse_1tib_over_1gib_cap", "9 bullet 7: bound by size, not by what the file holds",
         d(9, NEW_SEGMENT, TIB, 0, 16), "SHM_ERROR", "HREJ", fd=dict(MEMFD, size=TIB))
    case("new_over_bytes_cap", "9 bullet 7", d(9, NEW_SEGMENT, 2 * MIB, 0, 16), "SHM_ERROR",
         "HREJ", fd=dict(MEMFD, size=2 * MIB), caps=(MIB, 64))
    case("new_over_bytes_cap_with_mapped", "9 bullet 7: counts what is mapped",
         d(9, NEW_SEGMENT, MIB, 0, 16), "SHM_ERROR", "HREJ", fd=dict(MEMFD, size=MIB),
         mapped={1: MIB}, caps=(MIB + MIB // 2, 64))
    case("new_at_bytes_cap", "9 bullet 7", d(9, NEW_SEGMENT, MIB, 0, 16), "lend", "HREL",
         fd=dict(MEMFD, size=MIB), mapped={1: MIB}, caps=(2 * MIB, 64),
         mapped_after={1: MIB, 9: MIB})
    case("new_over_segments_cap", "9 bullet 7", new9, "SHM_ERROR", "HREJ",
         fd=dict(MEMFD, size=4096), mapped={1: 4096, 2: 4096}, caps=(GIB, 2))
    case("new_at_segments_cap", "9 bullet 7", new9, "lend", "HREL", fd=dict(MEMFD, size=4096),
         mapped={1: 4096}, caps=(GIB, 2), mapped_after={1: 4096, 9: 4096})
    # Bullet 8, with arithmetic that cannot overflow. Every check comes before anything is
    # mapped, so a NEW_SEGMENT refused here is not mapped: HREJ.
    for label, offset, length in [("2^63_2^63", 1 << 63, 1 << 63), ("max_1", U64_MAX, 1),
                                  ("1_max", 1, U64_MAX), ("0_max", 0, U64_MAX),
                                  ("size_1", 4096, 1), ("4000_97", 4000, 97)]:
        case(f"new_region_{label}", "9 bullet 8, checked before mapping -> HREJ",
             d(9, NEW_SEGMENT, 4096, offset, length), "SHM_ERROR", "HREJ",
             fd=dict(MEMFD, size=4096))
        case(f"mapped_region_{label}", "9 bullet 8; refused, mapped -> HREL",
             d(1, 0, 4096, offset, length), "SHM_ERROR", "HREL", mapped={1: 4096})
    # Bullet 3: without NEW_SEGMENT, a mapped segment with the size it was mapped with.
    case("mapped_valid", "9 bullet 3", d(1, 0, 4096, 1000, 64), "lend", "HREL",
         mapped={1: 4096, 2: 8192})
    case("mapped_zero_length", "9: a zero-length payload is valid", d(2, 0, 8192, 0, 0),
         "lend", "HREL", mapped={1: 4096, 2: 8192})
    case("mapped_size_larger", "9 bullet 3: the size it was mapped with", d(1, 0, 8192, 0, 16),
         "SHM_ERROR", "HREL", mapped={1: 4096})
    case("mapped_size_smaller", "9 bullet 3", d(2, 0, 4096, 0, 16), "SHM_ERROR", "HREL",
         mapped={2: 8192})
    case("unknown_id", "9 bullet 3; refused, unknown id -> HREJ", d(7, 0, 4096, 0, 16),
         "SHM_ERROR", "HREJ", mapped={1: 4096})
    # PEER_SEGMENT: one of the receiver's own segments still lent out, region in bounds. Nothing
    # is handed back, on refusal or after the lent view goes (the echo's sender sends HREL).
    case("peer_valid", "9 Echoes", d(1, PEER_SEGMENT, MIB, 10, 20), "lend", None,
         lent={1: MIB})
    case("peer_zero_length", "9 Echoes", d(1, PEER_SEGMENT, MIB, MIB, 0), "lend", None,
         lent={1: MIB})
    case("peer_not_lent", "9 bullet 3: still lent out; refused: PEER -> nothing",
         d(1, PEER_SEGMENT, MIB, 0, 16), "SHM_ERROR", None, own_free={1: MIB})
    case("peer_unknown_id", "9 bullet 3", d(2, PEER_SEGMENT, MIB, 0, 16), "SHM_ERROR", None,
         lent={1: MIB})
    case("peer_id_of_mapped_segment", "9 bullet 3: the receiver's own, not the peer's",
         d(1, PEER_SEGMENT, 4096, 0, 16), "SHM_ERROR", None, mapped={1: 4096})
    case("peer_region_overflow", "9 bullet 8", d(1, PEER_SEGMENT, MIB, 1 << 63, 1 << 63),
         "SHM_ERROR", None, lent={1: MIB})
    case("peer_region_past_end", "9 bullet 8", d(1, PEER_SEGMENT, MIB, MIB - 8, 9),
         "SHM_ERROR", None, lent={1: MIB})
    case("peer_size_mismatch", "9 descriptor table: the size is the segment's own",
         d(1, PEER_SEGMENT, 2 * MIB, 0, 16), "SHM_ERROR", None, lent={1: MIB})
    # Refused on other paths: no SHM negotiated (§8, §9 Refused: HREJ), SHM on an Error frame
    # (§7: UNSUPPORTED_FLAGS, then handed back as in §9), COMPRESSED with SHM (§9a).
    case("not_negotiated_peer_without_shm", "8 Negotiated; 9 Refused -> HREJ", new9,
         "SHM_ERROR", "HREJ", fd=dict(MEMFD, size=4096), peer_hello=PLAIN_HELLO)
    case("not_negotiated_no_peer_hello", "8; 9 Refused -> HREJ", d(3, 0, 4096, 0, 16),
         "SHM_ERROR", "HREJ", peer_hello=None)
    case("not_negotiated_receiver_without_shm", "8; 9 Refused -> HREJ", new9, "SHM_ERROR",
         "HREJ", fd=dict(MEMFD, size=4096), features=0)
    case("not_negotiated_peer_flag", "8; 9 Refused: PEER -> nothing",
         d(1, PEER_SEGMENT, MIB, 0, 16), "SHM_ERROR", None, peer_hello=PLAIN_HELLO)
    case("error_frame_shm_mapped", "7; 9 Refused, mapped -> HREL", d(1, 0, 4096, 0, 16),
         "UNSUPPORTED_FLAGS", "HREL", msg_type=ERROR, mapped={1: 4096})
    case("error_frame_shm_new", "7; 9 Refused NEW_SEGMENT -> HREJ", new9, "UNSUPPORTED_FLAGS",
         "HREJ", msg_type=ERROR, fd=dict(MEMFD, size=4096))
    case("compressed_shm_mapped", "9a; 9 Refused: mapped -> HREL",
         d(1, 0, 4096, 0, 16), "UNSUPPORTED_FLAGS", "HREL", flags=SHM | COMPRESSED,
         features=3, peer_hello=SHM_ZSTD_HELLO, mapped={1: 4096})
    case("compressed_shm_new", "9a; 9 Refused: a NEW_SEGMENT is not mapped -> HREJ", new9,
         "UNSUPPORTED_FLAGS", "HREJ", flags=SHM | COMPRESSED, features=3,
         peer_hello=SHM_ZSTD_HELLO, fd=dict(MEMFD, size=4096))
    case("compressed_shm_new_unsealed", "9a; 9 Refused: not mapped -> HREJ",
         new9, "UNSUPPORTED_FLAGS", "HREJ", flags=SHM | COMPRESSED, features=3,
         peer_hello=SHM_ZSTD_HELLO, fd={"kind": "memfd", "seals": [], "size": 4096})
    case("control_event_with_shm_mapped", "8a: control Events never carry flags; 9 Refused",
         d(1, 0, 4096, 0, 16), "UNSUPPORTED_FLAGS", "HREL", msg_type=EVENT, request_id=0,
         mapped={1: 4096})
    case("compressed_not_negotiated_shm_mapped",
         "6: COMPRESSED not negotiated; 9 Refused (every path), mapped -> HREL",
         d(1, 0, 4096, 0, 16), "UNSUPPORTED_FLAGS", "HREL", flags=SHM | COMPRESSED,
         mapped={1: 4096})
    for c in cases:
        if c["fd"] is not None:
            assert c["frame"]["descriptor"]["flags"] & NEW_SEGMENT   # fds go with NEW frames
    return cases


# --- ring.json ------------------------------------------------------------------------------

def ring_switch(capacity: int, version: int = 2, magic: bytes = b"HRNG") -> bytes:
    return magic + struct.pack("<IQ", version, capacity)


def ring_file() -> dict:
    switches = []

    def add(name, rule, payload, capacity):
        switches.append({"name": name, "rule": rule, "payload": payload.hex(),
                         "valid": capacity is not None, "capacity": capacity})

    for capacity in (4096, 8192, 256 * 1024, 64 * 1024 * 1024):
        add(f"capacity_{capacity}", "9b: the switch", ring_switch(capacity), capacity)
    add("capacity_2048", "9b: capacity from 4096", ring_switch(2048), None)
    add("capacity_128_mib", "9b: capacity to 67108864", ring_switch(128 << 20), None)
    add("capacity_not_power_of_two", "9b: a power of two", ring_switch(3 * 4096), None)
    add("capacity_zero", "9b: a power of two", ring_switch(0), None)
    add("capacity_u64_max", "9b: a power of two", ring_switch(U64_MAX), None)
    add("layout_version_1", "9b: layout version 2", ring_switch(4096, version=1), None)
    add("layout_version_3", "9b: layout version 2", ring_switch(4096, version=3), None)
    add("layout_version_0", "9b: layout version 2", ring_switch(4096, version=0), None)
    add("short", "9b: a 16-byte payload", ring_switch(4096)[:15], None)
    add("trailing_byte", "9b: a 16-byte payload", ring_switch(4096) + b"\x00", None)
    layout = {"header_bytes": 4096, "magic_offset": 0, "version_offset": 4,
              "capacity_offset": 8, "direction_stride": 256,
              "tail": 64, "carriers": 72, "closed": 80, "head": 128,
              "consumer_sleeps": 192, "producer_sleeps": 196,
              "data": "4096 + d * capacity", "memfd_bytes": "4096 + 2 * capacity",
              "feature_bit": 4, "carrier_bytes": 8, "record_bytes": 8,
              "sleeps_bits": {"futex": 1, "socket": 2}}
    carriers = [{"name": f"offset_{offset}", "offset": offset,
                 "bytes": struct.pack("<Q", offset).hex()}
                for offset in (0, 1, 4096, 0x0102030405060708, U64_MAX)]
    header = {"name": "header_256_kib", "capacity": 256 * 1024,
              "bytes": (b"HRNG" + struct.pack("<IQ", 2, 256 * 1024)).hex()}
    # What a receiver makes of each 8-byte record on the socket after the sender's HRNG, by
    # its bytes and the number of descriptors that came with it.
    records = [
        {"name": "wake", "bytes": struct.pack("<Q", U64_MAX).hex(), "fds": 0, "kind": "wake"},
        {"name": "carrier_0", "bytes": struct.pack("<Q", 0).hex(), "fds": 1, "kind": "carrier",
         "offset": 0},
        {"name": "carrier_4096", "bytes": struct.pack("<Q", 4096).hex(), "fds": 1,
         "kind": "carrier", "offset": 4096},
        {"name": "wake_with_a_descriptor", "bytes": struct.pack("<Q", U64_MAX).hex(),
         "fds": 1, "kind": "fatal"},
        {"name": "carrier_without_descriptor", "bytes": struct.pack("<Q", 4096).hex(),
         "fds": 0, "kind": "fatal"},
        {"name": "carrier_two_descriptors", "bytes": struct.pack("<Q", 4096).hex(), "fds": 2,
         "kind": "fatal"},
        {"name": "almost_wake", "bytes": struct.pack("<Q", U64_MAX - 1).hex(), "fds": 0,
         "kind": "fatal"},
    ]
    return {"description": "the shared-memory ring: HRNG payloads, the memfd's layout (offsets "
                           "of direction d's fields are the given ones + d * direction_stride), "
                           "its header, descriptor carriers, the bits of a sleeps word, and "
                           "the 8-byte records on the socket after an HRNG (a carrier, a wake "
                           "record, or fatal)",
            "spec": "section 9b", "switches": switches, "layout": layout,
            "header": header, "carriers": carriers, "records": records}


# --- output -----------------------------------------------------------------------------------

FILES = {"crc16.json": crc_file, "headers.json": header_file, "frames.json": frame_file,
         "malformed.json": malformed_file, "hellos.json": hello_file,
         "control.json": control_file, "errors.json": error_file,
         "descriptors.json": descriptor_file, "ring.json": ring_file}


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(root, "tests", "vectors"))
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    for name, build in FILES.items():
        text = json.dumps(build(), sort_keys=True, indent=1, ensure_ascii=False) + "\n"
        with open(os.path.join(out, name), "w", encoding="utf-8", newline="\n") as file:
            file.write(text)


if __name__ == "__main__":
    main()
