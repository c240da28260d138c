"""`hintens demo`: measure the core against the stdlib, in this process, and print a table.

The workloads here are also imported by bench/, which times them with pytest-benchmark
against more peers; this module needs nothing beyond the standard library.
"""

from __future__ import annotations

import binascii
import os
import struct
import time
from typing import Any, Callable, Iterable

from . import _impl
from ._constants import HEADER_SIZE, MessageType

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


def best_seconds(func: Callable[[], Any], *, min_time_s: float = 0.2, repeat: int = 5) -> float:
    """Best time of one call, over ``repeat`` batches each lasting at least ``min_time_s``."""
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            func()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s / 10:
            break
        loops *= 4
    loops = max(1, int(loops * (min_time_s / repeat) / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(loops):
            func()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def _rows() -> Iterable[tuple[str, str, float, float, str]]:
    core = _impl.core
    for size in (16, 4096, 1 << 20):
        data = os.urandom(size)
        ours = best_seconds(lambda: core.crc16(data))
        base = best_seconds(lambda: binascii.crc_hqx(data, 0xFFFF))
        yield (f"crc16 {size} B", "binascii.crc_hqx", ours, base,
               f"{size / ours / 1e9:.2f} GB/s" if size >= 4096 else f"{ours * 1e9:.0f} ns")
    buffer = bytearray(64)
    fields = (1, 100, 0x1234, 42)
    ours = best_seconds(lambda: core.unpack_header(core.pack_header_into(buffer, 0, *fields) or buffer))
    base = best_seconds(lambda: STRUCT_HEADER.unpack_from(
        STRUCT_HEADER.pack_into(buffer, 0, 0x4850, 0x0100, 1, 0, 100, 0x1234, 42) or buffer))
    yield ("header pack+unpack", "struct.Struct", ours, base, f"{ours * 1e9:.0f} ns")
    stream, count = small_frames_stream(core)
    ours = best_seconds(lambda: core.FrameDecoder().feed(stream))
    base = best_seconds(lambda: struct_crc_decode(stream))
    yield ("decode 1 MiB of 100 B frames", "struct + crc_hqx loop", ours, base,
           f"{count / ours / 1e6:.2f} M frames/s")


def run(write: Callable[[str], Any]) -> None:
    """Measure and write the table line by line through ``write``."""
    write(f"hintens core: {_impl.implementation}, CRC16 kernel: {_impl.core.crc16_backend()}")
    write(f"{'workload':<30} {'hintens':>12} {'baseline':>12} {'speed-up':>9}  "
          f"{'rate':<18} baseline")
    for name, baseline, ours, base, rate in _rows():
        write(f"{name:<30} {ours * 1e6:>9.3f} us {base * 1e6:>9.3f} us {base / ours:>8.1f}x  "
              f"{rate:<18} {baseline}")
