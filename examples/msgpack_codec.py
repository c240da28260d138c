"""A custom codec: any object with ``encode(value, kind)`` and ``decode(payload, kind)``
turns values into payloads. Here msgpack; the client and server then exchange dicts.

Run it: ``python examples/msgpack_codec.py``.
"""
# needs: msgpack

import os
import tempfile

import msgpack

import hintens

PATH = os.path.join(tempfile.mkdtemp(), "msgpack.sock")


class MsgpackCodec:
    """``kind`` is "request", "response" or "event", for codecs that type each differently."""

    def encode(self, value, kind):
        return msgpack.packb(value)

    def decode(self, payload, kind):
        return msgpack.unpackb(payload)      # payload: bytes, or a view lent from shared memory


def handler(order):
    """Gets a decoded request (a dict) and returns a value to encode."""
    return {"order": order["id"], "total": sum(order["prices"]), "status": "accepted"}


codec = MsgpackCodec()
with hintens.Server(PATH, handler, codec=codec):
    with hintens.Client(PATH, codec=codec) as client:   # a hintens.CodedClient
        print(client.request({"id": 7, "prices": [1.5, 2.25]}))
        # {'order': 7, 'total': 3.75, 'status': 'accepted'}
        print(client.request_many([{"id": n, "prices": [n]} for n in range(3)]))
