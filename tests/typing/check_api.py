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
    assert_type(client, hintens.Client[bytes | memoryview])
    assert_type(client.request(b"x"), bytes | memoryview)


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
