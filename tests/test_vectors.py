"""The Python implementation against the protocol test vectors in tests/vectors.

The vectors are language-neutral JSON written by tools/vectors/generate.py from
docs/PROTOCOL.md alone (tests/vectors/README.md gives their schemas); Go and Rust ports check
the same files. Frame-level vectors run against both cores (the ``core`` fixture); the
connection-level ones (descriptor decisions) run an ``Endpoint`` on each core in turn.
"""

from __future__ import annotations

import ast
import fcntl
import filecmp
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hintens import _impl
from hintens import _python_core as _core_py
from hintens.protocol import ring as _ring
from hintens.protocol import shm as _shm
from hintens.protocol.hello import FEATURE_RING
from hintens._errors import ProtocolError, ShmError, decode_error_payload, encode_error_payload
from hintens.protocol.endpoint import Endpoint, Hello

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
GENERATOR = ROOT / "tools" / "vectors" / "generate.py"
FILES = ["control.json", "crc16.json", "descriptors.json", "errors.json", "frames.json",
         "headers.json", "hellos.json", "malformed.json", "ring.json"]


def load(name: str) -> dict:
    with open(VECTORS / name, encoding="utf-8") as file:
        return json.load(file)


def cases(name: str, key: str, where=lambda vector: True) -> list:
    chosen = [vector for vector in load(name)[key] if where(vector)]
    return [pytest.param(vector, id=vector["name"]) for vector in chosen]


def pattern(length: int, mul: int = 1, add: int = 0, mod: int = 251) -> bytes:
    return bytes((mul * i + add) % mod for i in range(length))


# --- the files themselves -------------------------------------------------------------------

def test_the_generator_reproduces_the_vectors(tmp_path):
    # Vectors change only together with the generator (and so with the spec it encodes).
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)], check=True)
    assert sorted(os.listdir(tmp_path)) == FILES
    assert sorted(p.name for p in VECTORS.glob("*.json")) == FILES
    match, mismatch, errors = filecmp.cmpfiles(VECTORS, tmp_path, FILES, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_the_generator_does_not_import_hintens():
    # It encodes the spec, not the code under test.
    imported = set()
    for node in ast.walk(ast.parse(GENERATOR.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "argparse", "json", "os", "struct"}


# --- crc16.json, headers.json ---------------------------------------------------------------

@pytest.mark.parametrize("vector", cases("crc16.json", "vectors"))
def test_crc16(core, vector):
    assert core.crc16(bytes.fromhex(vector["input"])) == vector["crc"]


@pytest.mark.parametrize("vector", cases("crc16.json", "patterns"))
def test_crc16_patterns(core, vector):
    data = pattern(vector["length"], vector["mul"], vector["add"], vector["mod"])
    assert core.crc16(data) == vector["crc"]


@pytest.mark.parametrize("vector", cases("headers.json", "headers"))
def test_header(core, vector):
    buffer = bytearray(24)
    core.pack_header_into(buffer, 0, vector["type"], vector["length"], vector["checksum"],
                          vector["request_id"], vector["flags"], vector["version"])
    assert buffer.hex() == vector["hex"]
    header = core.unpack_header(bytes.fromhex(vector["hex"]))
    assert (header.magic, header.version, header.type, header.flags, header.length,
            header.checksum, header.request_id) == (
        0x4850, vector["version"], vector["type"], vector["flags"], vector["length"],
        vector["checksum"], vector["request_id"])


# --- frames.json, malformed.json: the FrameDecoder ------------------------------------------

def as_dict(frame) -> dict:
    return {"type": frame.type, "flags": frame.flags, "version": frame.version,
            "request_id": frame.request_id, "payload": bytes(frame.payload).hex()}


def decode_whole(core, stream: bytes, limit: int):
    """(frames before the first error, the error or None, frames after it or None, where)."""
    decoder = core.FrameDecoder(limit)
    try:
        return [as_dict(f) for f in decoder.feed(stream)], None, None, None
    except ProtocolError as error:
        before = [as_dict(f) for f in error.frames]
        after = None if error.fatal else [as_dict(f) for f in decoder.feed(b"")]
        return before, error, after, None


def decode_bytewise(core, stream: bytes, limit: int):
    """As decode_whole, fed one byte at a time; ``where`` counts the bytes fed at the error."""
    decoder = core.FrameDecoder(limit)
    before: list = []
    for at in range(len(stream)):
        try:
            before += [as_dict(f) for f in decoder.feed(stream[at:at + 1])]
        except ProtocolError as error:
            before += [as_dict(f) for f in error.frames]
            if error.fatal:
                return before, error, None, at + 1
            after = [as_dict(f) for f in decoder.feed(b"")]
            for rest in range(at + 1, len(stream)):
                after += [as_dict(f) for f in decoder.feed(stream[rest:rest + 1])]
            return before, error, after, at + 1
    return before, None, None, None


@pytest.mark.parametrize("vector", cases("frames.json", "frames"))
def test_frame_encodes(core, vector):
    payload = bytes.fromhex(vector["payload"])
    if vector["version"] == 0x0100:   # what encode_frame writes
        args = (vector["type"], payload, vector["request_id"], vector["flags"])
        assert core.encode_frame(*args).hex() == vector["frame"]
        assert core.encode_header(*args).hex() == vector["frame"][:48]
    buffer = bytearray(24)
    core.pack_header_into(buffer, 0, vector["type"], len(payload), core.crc16(payload),
                          vector["request_id"], vector["flags"], vector["version"])
    assert (bytes(buffer) + payload).hex() == vector["frame"]


@pytest.mark.parametrize("vector", cases("frames.json", "frames"))
def test_frame_decodes(core, vector):
    expected = {key: vector[key] for key in ("type", "flags", "version", "request_id",
                                             "payload")}
    stream = bytes.fromhex(vector["frame"])
    assert decode_whole(core, stream, 64 << 20) == ([expected], None, None, None)
    assert decode_bytewise(core, stream, 64 << 20) == ([expected], None, None, None)


def test_compressed_frame_holds_a_zstd_frame():
    zstandard = pytest.importorskip("zstandard")
    vector = next(v for v in load("frames.json")["frames"] if v["name"] == "compressed_response")
    assert zstandard.ZstdDecompressor().decompress(bytes.fromhex(vector["payload"])) == b"hello"


@pytest.mark.parametrize("vector", cases("frames.json", "streams"))
def test_stream_decodes(core, vector):
    stream = bytes.fromhex(vector["stream"])
    assert decode_whole(core, stream, 64 << 20) == (vector["frames"], None, None, None)
    assert decode_bytewise(core, stream, 64 << 20) == (vector["frames"], None, None, None)


def check_malformed(vector, outcome) -> None:
    before, error, after, where = outcome
    assert before == vector["frames_before"]
    if vector["error"] is None:
        assert error is None
        return
    assert error is not None, "no error raised"
    expected = vector["error"]
    assert (error.code.name, int(error.code), error.fatal, error.request_id) == (
        expected["name"], expected["code"], expected["fatal"], expected["request_id"])
    assert after == vector["frames_after"]


@pytest.mark.parametrize("vector", cases("malformed.json", "cases"))
def test_malformed_whole_stream(core, vector):
    check_malformed(vector, decode_whole(core, bytes.fromhex(vector["stream"]),
                                         vector["max_payload"]))


@pytest.mark.parametrize("vector", cases("malformed.json", "cases"))
def test_malformed_byte_by_byte(core, vector):
    outcome = decode_bytewise(core, bytes.fromhex(vector["stream"]), vector["max_payload"])
    check_malformed(vector, outcome)
    assert outcome[3] == vector["error_at"]   # as soon as the bytes that show it arrive


# --- hellos.json, control.json, errors.json --------------------------------------------------

@pytest.mark.parametrize("vector", cases("hellos.json", "hellos"))
def test_hello_decodes(vector):
    hello = Hello.decode(bytes.fromhex(vector["payload"]))
    if not vector["understood"]:
        assert hello is None
        return
    assert hello is not None
    assert (hello.minor, hello.features, hello.max_payload, hello.shm_receive_bytes,
            hello.shm_receive_segments) == (
        vector["minor"], vector["features"], vector["max_payload"],
        vector["shm_receive_bytes"], vector["shm_receive_segments"])
    assert hello.entries == {key: bytes.fromhex(value) for key, value in vector["entries"]}


@pytest.mark.parametrize("vector", cases("hellos.json", "hellos", lambda v: "encode" in v))
def test_hello_encodes(vector):
    settings = vector["encode"]
    hello = Hello(settings["minor"], settings["features"], settings["max_payload"],
                  {key: bytes.fromhex(value) for key, value in settings["extra_entries"]},
                  shm_receive_bytes=settings["shm_receive_bytes"],
                  shm_receive_segments=settings["shm_receive_segments"])
    assert hello.encode().hex() == vector["payload"]


@pytest.mark.parametrize("vector", cases("control.json", "controls"))
def test_control_payload(vector):
    payload = bytes.fromhex(vector["payload"])
    decoded = _shm.decode_control(payload)
    if vector["ignored"]:
        assert decoded is None
    else:
        assert decoded == (vector["magic"].encode(), vector["ids"])
        assert _shm.encode_control(vector["magic"].encode(), vector["ids"]) == payload
    # Whatever it holds, a control Event never reaches the application (section 5, 8a).
    assert Endpoint().admit([_impl.core.Frame(3, 0, 0x0100, 0, payload)]) == []


@pytest.mark.parametrize("vector", cases("errors.json", "valid"))
def test_error_payload(vector):
    payload = encode_error_payload(vector["code"], vector["message"])
    assert payload.hex() == vector["payload"]
    assert decode_error_payload(payload) == (vector["code"], vector["message"])


@pytest.mark.parametrize("vector", cases("errors.json", "hintens_truncation"))
def test_error_payload_truncation(vector):
    payload = encode_error_payload(vector["code"], vector["message"])
    assert payload.hex() == vector["payload"]
    assert decode_error_payload(payload) == (vector["code"], vector["sent_message"])


@pytest.mark.parametrize("vector", cases("errors.json", "invalid_utf8"))
def test_error_payload_invalid_utf8_is_replaced(vector):
    code, message = decode_error_payload(bytes.fromhex(vector["payload"]))
    assert code == vector["code"]
    assert message.startswith(vector["message_prefix"]) and "\ufffd" in message


@pytest.mark.parametrize("vector", cases("errors.json", "malformed"))
def test_error_payload_malformed(vector):
    with pytest.raises(ValueError):
        decode_error_payload(bytes.fromhex(vector["payload"]))


# --- descriptors.json ------------------------------------------------------------------------

@pytest.mark.parametrize("vector", cases("descriptors.json", "descriptors"))
def test_descriptor(vector):
    data = bytes.fromhex(vector["hex"])
    if not vector["valid"]:
        with pytest.raises(ShmError):
            _shm.decode_descriptor(data)
        return
    fields = (vector["segment_id"], vector["flags"], vector["size"], vector["offset"],
              vector["length"])
    assert _shm.decode_descriptor(data) == fields
    assert _shm.encode_descriptor(vector["segment_id"], vector["size"], vector["offset"],
                                  vector["length"], bool(vector["flags"] & 1),
                                  peer=bool(vector["flags"] & 2)) == data


SEALS = {"SHRINK": fcntl.F_SEAL_SHRINK, "GROW": fcntl.F_SEAL_GROW, "SEAL": fcntl.F_SEAL_SEAL}
FILLED = 64 * 1024   # segments hold byte p % 251 at every position p below this


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def segment_fd(spec: dict, directory: Path) -> int:
    """A descriptor as the vector's ``fd`` describes it."""
    if spec["kind"] == "pipe":
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end
    if spec["kind"] == "file":
        fd = os.open(directory / "plain-file", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    else:
        fd = os.memfd_create("vector", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, spec["size"])
    os.pwrite(fd, pattern(min(spec["size"], FILLED)), 0)
    seals = sum(SEALS[name] for name in spec["seals"])
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def release(payload) -> None:
    if isinstance(payload, memoryview):
        payload.release()


@pytest.fixture
def endpoint_core(core, monkeypatch, young_heap):
    """Endpoints (and the segments they map) built on ``core``."""
    monkeypatch.setattr(_impl, "core", core)
    monkeypatch.setattr(_impl, "implementation", "python" if core is _core_py else "cython")
    return core


@pytest.mark.parametrize("vector", cases("descriptors.json", "decisions"))
def test_descriptor_decision(endpoint_core, vector, tmp_path):
    core = endpoint_core
    receiver, expect = vector["receiver"], vector["expect"]
    gc.collect()
    fds_before = open_fds()
    endpoint = Endpoint(features=receiver["features"],
                        shm_receive_bytes=receiver["shm_receive_bytes"],
                        shm_receive_segments=receiver["shm_receive_segments"])
    captured: list[bytes] = []
    endpoint.on_writes = lambda: captured.extend(   # the control Events' payloads
        bytes(frame)[24:] for buffers, _ in endpoint.take_writes() for frame in buffers)
    fds: list[int] = []   # descriptors received and not yet claimed, as a transport keeps them
    try:
        if vector["peer_hello"] is not None:
            hello = core.Frame(3, 0, 0x0100, 0, bytes.fromhex(vector["peer_hello"]))
            assert endpoint.admit([hello]) == []
        # The peer's segments the receiver maps: introduced as the peer would (NEW_SEGMENT,
        # an empty payload), so that they count against the receiver's bounds.
        for segment_id, size in receiver["mapped"].items():
            fds.append(segment_fd(
                {"kind": "memfd", "size": size, "seals": ["SHRINK", "GROW", "SEAL"]}, tmp_path))
            introduce = core.Frame(3, 1, 0x0100, 1, _shm.encode_descriptor(
                int(segment_id), size, 0, 0, True))
            (item,) = endpoint.admit([introduce], fds)
            assert not isinstance(item, ProtocolError), item
            release(item.payload)
            del item
        # The receiver's own segments, created in id order; those not lent are handed back.
        own = sorted([(int(k), v, True) for k, v in receiver["lent"].items()]
                     + [(int(k), v, False) for k, v in receiver["own_not_lent"].items()])
        for segment_id, size, lent in own:
            assert endpoint.pool is not None
            acquired = endpoint.pool.try_acquire(size)
            assert acquired is not None and acquired[0] == segment_id
            assert acquired[1].size == size
            with memoryview(acquired[1].map) as whole:
                whole[:FILLED] = pattern(FILLED)
            if not lent:
                endpoint.pool.release(segment_id)
        gc.collect()
        captured.clear()

        if vector["fd"] is not None:
            fds.append(segment_fd(vector["fd"], tmp_path))
        frame = vector["frame"]
        items = endpoint.admit([core.Frame(frame["type"], frame["flags"], 0x0100,
                                           frame["request_id"], bytes.fromhex(frame["payload"]))],
                               fds)
        # What the receiver did, in the vector's terms, compared in one go.
        actual = {"items": len(items), "fds_unclaimed": len(fds),
                  "mapped_after": {str(sid): segment.size
                                   for sid, segment in endpoint.segments.items()}}
        wanted = {"items": 1, "fds_unclaimed": 0,   # a NEW_SEGMENT's descriptor: used or closed
                  "mapped_after": expect["mapped_after"]}
        item = items[0]
        if isinstance(item, ProtocolError):
            actual.update(outcome=item.code.name, code=int(item.code), fatal=item.fatal,
                          request_id=item.request_id, payload=None)
        else:
            actual.update(outcome="lend", code=None, fatal=None, request_id=item.request_id,
                          payload=bytes(item.payload).hex())
            assert item.type == frame["type"]
            assert expect["offset"] + expect["length"] <= FILLED or expect["length"] == 0
            release(item.payload)
        wanted.update(outcome=expect["outcome"], code=expect["code"],
                      fatal=None if expect["code"] is None else False,
                      request_id=frame["request_id"], payload=expect["payload"])
        del item, items
        gc.collect()   # lent payloads released: their hand-back is due now
        actual["hand_back"] = [payload.hex() for payload in captured]
        wanted["hand_back"] = [] if expect["hand_back"] is None else [
            expect["hand_back_payload"]]
        assert actual == wanted
        for payload in captured:
            assert _shm.decode_control(payload) == (
                expect["hand_back"].encode(), [frame["descriptor"]["segment_id"]])
    finally:
        while fds:
            os.close(fds.pop())
        endpoint.close_shm()
        del endpoint
        gc.collect()
    assert open_fds() == fds_before


# --- ring.json ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vector", cases("ring.json", "switches"))
def test_ring_switch_payload(vector):
    payload = bytes.fromhex(vector["payload"])
    assert _ring.is_switch(payload)
    if not vector["valid"]:
        with pytest.raises(ValueError):
            _ring.decode_switch(payload)
        return
    assert _ring.decode_switch(payload) == vector["capacity"]
    assert _ring.encode_switch(vector["capacity"]) == payload


def test_ring_layout_and_carriers_match_the_implementation():
    data = load("ring.json")
    layout = data["layout"]
    assert layout["feature_bit"] == FEATURE_RING
    assert layout["header_bytes"] == _ring.RING_HEADER_BYTES
    assert _ring.ring_bytes(4096) == layout["header_bytes"] + 2 * 4096
    assert bytes.fromhex(data["header"]["bytes"]) == _ring.encode_switch(
        data["header"]["capacity"])   # the header holds what the HRNG says
    for carrier in data["carriers"]:
        assert int.from_bytes(bytes.fromhex(carrier["bytes"]), "little") == carrier["offset"]
    if getattr(_impl.core, "Ring", None) is None:
        return   # the compiled core's layout is checked where it is built
    import os
    import socket as socket_module

    from hintens.transport import ring as transport_ring

    a, b = socket_module.socketpair()
    try:
        ring, fd = transport_ring.create(4096, a)
        os.close(fd)
        shared = ring._shared()
        assert bytes(shared[:16]) == _ring.encode_switch(4096)   # the server's header
        assert len(shared) == layout["header_bytes"] + 2 * 4096
        del shared
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("vector", cases("ring.json", "records"))
def test_ring_socket_record(vector):
    """Each 8-byte record on the socket after an HRNG, as a reader that drains them takes it:
    a wake record is dropped, a carrier is kept for its frame, anything else is fatal."""
    if getattr(_impl.core, "Ring", None) is None:
        pytest.skip("only the compiled core speaks the ring")
    import socket as socket_module

    from hintens.transport import ring as transport_ring

    layout = load("ring.json")["layout"]
    assert layout["record_bytes"] == 8 and layout["sleeps_bits"] == {"futex": 1, "socket": 2}
    ours, theirs = socket_module.socketpair()
    fds = [os.memfd_create("vector") for _ in range(vector["fds"])]
    try:
        ring, ring_fd = transport_ring.create(4096, ours)
        os.close(ring_fd)
        channel = _impl.core.Channel(ours, _impl.core.FrameDecoder(), 65536)
        channel.switch_rx(ring)
        fds_before = len(os.listdir("/proc/self/fd"))
        record = bytes.fromhex(vector["bytes"])
        ancillary = [(socket_module.SOL_SOCKET, socket_module.SCM_RIGHTS,
                      b"".join(fd.to_bytes(4, "little") for fd in fds))] if fds else []
        theirs.sendmsg([record], ancillary)
        if vector["kind"] == "fatal":
            with pytest.raises(ProtocolError):
                channel.take_ring_records()
        else:
            assert channel.take_ring_records() is False
            assert ring.carriers_received == (1 if vector["kind"] == "carrier" else 0)
            assert not channel.take_ring_records()   # nothing more waits
        channel.close()
        del channel, ring
        gc.collect()
        # The carrier's descriptor (kept until its frame) is closed with the ring; a fatal
        # record's are closed at once.
        assert len(os.listdir("/proc/self/fd")) <= fds_before
    finally:
        for fd in fds:
            os.close(fd)
        ours.close()
        theirs.close()
