"""Codecs on Client, Server and ClientPool, with real sockets: JSON, bincode, pickle with
out-of-band buffers through shared memory, a codec of one's own, and the errors."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Union

import pytest

import hintens
from hintens import bincode as b


@dataclass
class Add:
    a: b.i64
    b: b.i64


@dataclass
class Echo:
    text: str


@dataclass
class Result:
    value: b.i64
    note: str


Request = Union[Add, Echo]


def serve(sock_path, handler, **options):
    return hintens.Server(sock_path, handler, **options).start()


def test_json_both_ways(sock_path):
    with serve(sock_path, lambda doc: {"sum": sum(doc["xs"]), "echo": doc}, codec="json"):
        with hintens.Client(sock_path, codec="json") as client:
            assert client.request({"xs": [1, 2, 3]}) == {"sum": 6, "echo": {"xs": [1, 2, 3]}}
            assert client.request_many([{"xs": [1]}, {"xs": []}]) == [
                {"sum": 1, "echo": {"xs": [1]}}, {"sum": 0, "echo": {"xs": []}}]


@pytest.mark.parametrize("codec", [None, "raw", "json"])
def test_a_codec_makes_a_coded_client_with_methods_of_its_own(sock_path, codec):
    with serve(sock_path, lambda value: value, codec=codec):
        with hintens.Client(sock_path, codec=codec) as client:
            # A subclass whose methods are methods: nothing is patched onto the instance.
            assert type(client) is (hintens.Client if codec is None else hintens.CodedClient)
            assert not {"request", "request_many", "send_event"} & set(vars(client))
            value = {"x": 1} if codec == "json" else b"raw"
            assert client.request(value) == value
            assert client.request_many([value, value]) == [value, value]
            client.send_event(value)
        with hintens.CodedClient(sock_path, codec=codec) as named:   # also by its name
            assert named.request(value) == value


def test_bincode_with_request_and_response_types(sock_path):
    def handler(request):
        if isinstance(request, Add):
            return Result(request.a + request.b, "added")
        return Result(len(request.text), request.text)

    codec = hintens.BincodeCodec(Request, Result)
    with serve(sock_path, handler, codec=codec):
        with hintens.Client(sock_path, codec=codec) as client:
            assert client.request(Add(2, -5)) == Result(-3, "added")
            assert client.request(Echo("héllo")) == Result(5, "héllo")
        with hintens.Client(sock_path) as raw:    # what a Rust peer would send
            reply = raw.request(b.encode(Add(1, 1), Request))
            assert b.decode(reply, Result) == Result(2, "added")


def test_pickle_sends_numpy_arrays_out_of_band_through_shared_memory(sock_path):
    np = pytest.importorskip("numpy")
    seen = {}

    def handler(obj):
        array = obj["array"]
        seen["owns"] = array.flags.owndata       # a view of the received memory?
        seen["writeable"] = array.flags.writeable
        return {"doubled": array * 2, "tag": obj["tag"]}

    array = np.arange(2_000_000, dtype=np.float64)   # 16 MB
    with serve(sock_path, handler, codec="pickle"):
        with hintens.Client(sock_path, codec="pickle") as client:
            reply = client.request({"array": array, "tag": "x"})
            assert reply["tag"] == "x"
            assert np.array_equal(reply["doubled"], array * 2)
            assert not reply["doubled"].flags.owndata    # a view of the received payload
            assert client._endpoint.segments             # which came through shared memory
    assert seen == {"owns": False, "writeable": False}


def test_pickle_small_values_and_events(sock_path):
    got = []
    done = threading.Event()

    def on_event(value, connection):
        got.append(value)
        done.set()

    with serve(sock_path, lambda obj: obj, codec="pickle", on_event=on_event) as server:
        with hintens.Client(sock_path, codec=hintens.PickleCodec()) as client:
            assert client.request({1: (2, 3)}) == {1: (2, 3)}
            client.send_event({"kind": "ping"})
            client.flush()
            assert done.wait(10)
            assert got == [{"kind": "ping"}]
            assert server.broadcast({"to": "all"}) == 1


def test_events_from_the_server_are_decoded(sock_path):
    got = []
    done = threading.Event()

    def push(doc):
        hintens_server.current_connection().send_event({"pushed": doc})
        return "ok"

    hintens_server = serve(sock_path, push, codec="json")
    try:
        def on_event(value):
            got.append(value)
            done.set()

        with hintens.Client(sock_path, codec="json", on_event=on_event) as client:
            assert client.request([1]) == "ok"
            assert done.wait(10)
        assert got == [{"pushed": [1]}]
    finally:
        hintens_server.close()


def test_a_codec_of_ones_own(sock_path):
    class Upper:
        def encode(self, value, kind):
            return value.upper().encode() if kind == "request" else value.encode()

        def decode(self, payload, kind):
            return bytes(payload).decode()

    with serve(sock_path, lambda text: text + "!", codec=Upper()):
        with hintens.Client(sock_path, codec=Upper()) as client:
            assert client.request("hey") == "HEY!"


def test_a_payload_the_server_cannot_decode_is_a_handler_error(sock_path):
    with serve(sock_path, lambda doc: doc, codec="json"):
        with hintens.Client(sock_path) as raw:
            with pytest.raises(hintens.HandlerError, match="JSONDecodeError"):
                raw.request(b"{not json")
            assert raw.request(b"[1]") == b"[1]"   # the connection stays


def test_the_pool_takes_a_codec(sock_path):
    with serve(sock_path, lambda doc: doc["n"] + 1, codec="json"):
        with hintens.ClientPool(sock_path, codec="json") as pool:
            assert pool.request({"n": 41}) == 42
            assert pool.request_many([{"n": 1}, {"n": 2}]) == [2, 3]


@pytest.mark.parametrize("spec, error", [("bincode", ValueError), ("yaml", ValueError),
                                         (object(), TypeError)])
def test_bad_codecs(sock_path, spec, error):
    with pytest.raises(error):
        hintens.Server(sock_path, codec=spec)


def test_malformed_out_of_band_pickle():
    codec = hintens.PickleCodec()
    head = codec.MAGIC + (1).to_bytes(4, "little") + (28).to_bytes(4, "little")
    bad = head + (10**9).to_bytes(8, "little") + (5).to_bytes(8, "little")
    with pytest.raises(ValueError, match="out of bounds"):
        codec.decode(bad, "request")
    with pytest.raises(ValueError, match="malformed"):
        codec.decode(codec.MAGIC + (99).to_bytes(4, "little") + bytes(4), "request")
