"""What the benchmarks share: server processes, latency sampling, and the core's workloads
with their stdlib baselines.

The process and sampling helpers are the ones `hintens demo` runs on (``hintens._demo``), so
the demo and the benchmarks measure the same way; the rest is for the benchmarks only and does
not ship in the package.
"""

from __future__ import annotations

import binascii
import os
import struct
from typing import Any

from hintens import _impl
from hintens.wire import MessageType
from hintens._constants import HEADER_SIZE
from hintens._demo import RawClient, percentile, raw_echo_server, sample, spawn, stop

__all__ = ["GRPC_METHOD", "GRPC_OPTIONS", "RawClient", "grpc_echo_server", "percentile",
           "raw_echo_server", "sample", "small_frames_stream", "spawn", "stop",
           "struct_crc_decode"]

SMALL_FRAME_PAYLOAD_BYTES = 100
STREAM_BYTES = 1 << 20
STRUCT_HEADER = struct.Struct(">HHIHIHQ")


def small_frames_stream(core: Any = None, total_bytes: int = STREAM_BYTES,
                        payload_bytes: int = SMALL_FRAME_PAYLOAD_BYTES) -> tuple[bytes, int]:
    """About ``total_bytes`` of back-to-back Request frames; returns (stream, frame count)."""
    core = core or _impl.core
    payload = os.urandom(payload_bytes)
    frame = core.encode_frame(MessageType.REQUEST, payload, 1)
    count = max(1, total_bytes // len(frame))
    return frame * count, count


def struct_crc_decode(stream: bytes) -> list[tuple[int, int, int, bytes]]:
    """Baseline decoder: struct for the header and binascii.crc_hqx for the payload."""
    out = []
    unpack_from, crc_hqx, pos, end = STRUCT_HEADER.unpack_from, binascii.crc_hqx, 0, len(stream)
    while pos < end:
        magic, version, msg_type, flags, length, checksum, request_id = unpack_from(stream, pos)
        if magic != 0x4850 or version >> 8 != 1:
            raise ValueError("bad header")
        payload = stream[pos + HEADER_SIZE:pos + HEADER_SIZE + length]
        if crc_hqx(payload, 0xFFFF) != checksum:
            raise ValueError("bad crc")
        out.append((msg_type, flags, request_id, payload))
        pos += HEADER_SIZE + length
    return out


# grpc.aio, a peer of the asyncio and TCP benchmarks ----------------------------------------

GRPC_METHOD = "/hintens.bench.Echo/Echo"
#: Messages up to 128 MiB both ways (grpc's default is 4 MiB).
GRPC_OPTIONS = [("grpc.max_send_message_length", 128 << 20),
                ("grpc.max_receive_message_length", 128 << 20)]


def grpc_echo_server() -> Any:
    """A grpc.aio server, not yet bound nor started, whose one unary method echoes its bytes
    (no protobuf: without (de)serializers, bytes go as they are)."""
    import grpc
    import grpc.aio

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    service, method = GRPC_METHOD.strip("/").split("/")
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(echo)}),))
    return server
