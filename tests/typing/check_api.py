"""Checked by mypy (``make test`` runs it over this file), never run: the public API's static
types. A wrong declaration fails ``assert_type`` here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, assert_type

import hintens
from hintens import bincode


@dataclass
class Point:
    x: bincode.i32  # type: ignore[valid-type]
    y: bincode.i32  # type: ignore[valid-type]


def raw_client(path: str) -> None:
    client = hintens.Client(path)
    assert_type(client, hintens.Client[memoryview])
    assert_type(client.request(b"x"), memoryview)


def coded_client(path: str) -> None:
    client = hintens.Client(path, codec="json")
    assert_type(client, hintens.Client[Any])   # at run time, a hintens.CodedClient
    assert_type(client.request({"any": "value"}), Any)
    typed = hintens.CodedClient(path, codec=hintens.BincodeCodec(Point))
    assert_type(typed.request(Point(1, 2)), Any)


def bincode_decode(data: bytes) -> None:
    assert_type(bincode.decode(data, Point), Point)
    assert_type(bincode.decode(data, list[int]), list[int])
    assert_type(bincode.decode(data, bincode.u32), Any)


async def aio_api(path: str) -> None:
    import hintens.aio

    client = await hintens.aio.Client.connect(path)
    assert_type(client, hintens.aio.Client[memoryview])
    assert_type(await client.request(b"x"), memoryview)
    assert_type(await client.request_many([b"x"]), list[memoryview])
    coded = await hintens.aio.Client.connect(path, codec="json")
    assert_type(await coded.request({"any": "value"}), Any)
    async with hintens.aio.Client(path) as opened:
        assert_type(opened, hintens.aio.Client[memoryview])
    assert_type(client.allocate(10), memoryview)
    await client.close()

    async def handler(payload: memoryview) -> bytes:
        return bytes(payload)

    server = hintens.aio.Server(path, handler, threaded=False)
    assert_type(await server.start(), hintens.aio.Server)
    assert_type(server.broadcast(b"x"), int)
    assert_type(server.connections, list[hintens.aio.ServerConnection])
    await server.close()
    async with hintens.aio.ClientPool(path, 2, exactly_once=True,
                                      retry=hintens.aio.RetryPolicy(max_attempts=2)) as pool:
        assert_type(await pool.request(b"x", idempotent=True), Any)
