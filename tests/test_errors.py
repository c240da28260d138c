"""Error frame payloads (bincode (u32, String)) and the code-to-exception table."""

from __future__ import annotations

import pickle

import pytest

import hintens
from hintens import ErrorCode, RemoteError
from hintens.wire import decode_error_payload, encode_error_payload
from hintens._errors import ERROR_TABLE, MAX_ERROR_MESSAGE_BYTES


def test_known_bytes():
    assert encode_error_payload(5, "boom") == (
        bytes.fromhex("05000000") + bytes.fromhex("0400000000000000") + b"boom")
    assert decode_error_payload(bytes.fromhex("e8030000 0200000000000000") + b"\xc3\xa9") == (
        1000, "\u00e9")


def test_round_trip_and_limits():
    assert decode_error_payload(encode_error_payload(2**32 - 1, "")) == (2**32 - 1, "")
    long = "\u20ac" * MAX_ERROR_MESSAGE_BYTES  # 3 UTF-8 bytes each: cut on a boundary
    code, message = decode_error_payload(encode_error_payload(7, long))
    assert code == 7 and long.startswith(message) and len(message.encode()) <= MAX_ERROR_MESSAGE_BYTES
    with pytest.raises(OverflowError):
        encode_error_payload(2**32, "x")
    with pytest.raises(OverflowError):
        encode_error_payload(-1, "x")


@pytest.mark.parametrize("payload", [
    b"", b"\x01\x00\x00\x00", bytes.fromhex("01000000 0500000000000000") + b"abc",
    bytes.fromhex("01000000 0100000000000000") + b"ab",
    bytes.fromhex("01000000 ffffffffffffffff"),
])
def test_malformed_payloads(payload):
    with pytest.raises(ValueError):
        decode_error_payload(payload)


def test_invalid_utf8_is_replaced_not_fatal():
    assert decode_error_payload(bytes.fromhex("01000000 0100000000000000 ff")) == (1, "\ufffd")


@pytest.mark.parametrize("code, cls", [
    (1, hintens.RemoteProtocolError), (2, hintens.RemoteProtocolError),
    (3, hintens.RemoteProtocolError), (4, hintens.RemoteProtocolError),
    (5, hintens.HandlerError), (6, hintens.RemoteTimeoutError),
    (7, hintens.RemoteProtocolError), (8, hintens.UnavailableError),
    (1000, RemoteError), (999, RemoteError),
])
def test_remote_error_classes(code, cls):
    error = hintens.remote_error(code, "msg", 42)
    assert type(error) is cls and error.code == code and error.request_id == 42
    assert error.message == "msg" and "msg" in str(error)


def test_table_covers_every_code():
    assert set(ERROR_TABLE) == set(ErrorCode)
    for code, (local, _) in ERROR_TABLE.items():
        if local is not None:
            assert local.code == code
    assert "APP_1000" in str(hintens.remote_error(1000, "x"))


@pytest.mark.parametrize("error", [
    hintens.RemoteError(1001, "mine", 5), hintens.HandlerError(5, "boom", 7),
    hintens.UnavailableError(8, "busy"), hintens.ChecksumError("bad crc", 3),
    hintens.IncompleteFrameError("cut", 10), hintens.Timeout("late"),
    hintens.ConnectionClosed("gone")], ids=lambda error: type(error).__name__)
def test_errors_survive_pickling(error):
    """A process pool returns exceptions by pickling them: each comes back whole, with what
    was set on it since (request_sent, for one)."""
    error.request_sent = True
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)
