"""`hintens demo`: run a server process, exchange messages with it, and print the numbers.

Also measured, as baselines in the same run: a raw-socket ping-pong written with the stdlib
(the floor for Python), and the core's kernels against binascii and struct. The helpers here
(server processes, latency sampling, the core workloads) are reused by bench/; this module
needs nothing beyond the standard library.
"""

from __future__ import annotations

import binascii
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

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

    def ours_header() -> None:
        core.pack_header_into(buffer, 0, 1, 100, 0x1234, 42)
        core.unpack_header(buffer, 0)

    def struct_header() -> None:
        STRUCT_HEADER.pack_into(buffer, 0, 0x4850, 0x0100, 1, 0, 100, 0x1234, 42)
        STRUCT_HEADER.unpack_from(buffer, 0)

    ours, base = best_seconds(ours_header), best_seconds(struct_header)
    yield ("header pack+unpack", "struct.Struct", ours, base, f"{ours * 1e9:.0f} ns")
    stream, count = small_frames_stream(core)
    ours = best_seconds(lambda: core.FrameDecoder().feed(stream))
    base = best_seconds(lambda: struct_crc_decode(stream))
    yield ("decode 1 MiB of 100 B frames", "struct + crc_hqx loop", ours, base,
           f"{count / ours / 1e6:.2f} M frames/s")


# Processes and sampling, shared with bench/ ---------------------------------------------

def spawn(argv: Sequence[str], socket_file: str, timeout_s: float = 15.0) -> subprocess.Popen:
    """Start a server process and wait until it accepts connections on ``socket_file``.

    Raises:
        RuntimeError: the process died or did not listen in time (its stderr is included).
    """
    process = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr is not None else b""
            raise RuntimeError(f"{argv[:3]} exited with {process.returncode}: "
                               f"{stderr.decode(errors='replace')[-2000:]}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(socket_file)
            return process
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    process.kill()
    raise RuntimeError(f"{argv[:3]} did not listen on {socket_file} in {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM a server process and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


def sample(call: Callable[[], Any], count: int, warmup: int = 200) -> list[float]:
    """Seconds taken by each of ``count`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    clock = time.perf_counter
    samples = []
    for _ in range(count):
        start = clock()
        call()
        samples.append(clock() - start)
    return samples


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def raw_echo_server(path: str) -> None:
    """The Python floor: length-prefixed echo with plain sockets, one connection at a time."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                if not _read_exactly(conn, view[:4]):
                    break
                (size,) = struct.unpack_from("<I", buffer)
                if not _read_exactly(conn, view[4:4 + size]):
                    break
                conn.sendall(view[:4 + size])


def _read_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        count = conn.recv_into(view[got:])
        if not count:
            return False
        got += count
    return True


class RawClient:
    """Client side of the raw floor: sendall the message, read the whole echo back."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buffer = memoryview(bytearray(1 << 20))

    def request(self, payload: bytes) -> memoryview:
        self.sock.sendall(struct.pack("<I", len(payload)) + payload)
        _read_exactly(self.sock, self.buffer[:4 + len(payload)])
        return self.buffer[4:4 + len(payload)]

    def close(self) -> None:
        self.sock.close()


# The demo -----------------------------------------------------------------------------------

ROUND_TRIPS = 3000
ROUNDS = 6
SIZES = (("64 B", 64), ("4 KiB", 4096), ("60 KiB", 60 * 1024))


def _round_trip_rows(directory: str) -> Iterable[tuple[str, list[float], list[float]]]:
    from ._client import Client

    ours_path, raw_path = os.path.join(directory, "hintens.sock"), os.path.join(directory, "raw.sock")
    server = spawn([sys.executable, "-m", "hintens", "serve", "--socket", ours_path], ours_path)
    raw = spawn([sys.executable, "-m", "hintens._demo", "raw-echo", raw_path], raw_path)
    try:
        with Client(ours_path) as client:
            floor = RawClient(raw_path)
            try:
                for name, size in SIZES:
                    payload = os.urandom(size)
                    assert bytes(client.request(payload)) == payload
                    ours: list[float] = []
                    base: list[float] = []
                    # Interleaved rounds: this kind of machine drifts between long blocks.
                    for _ in range(ROUNDS):
                        ours += sample(lambda: client.request(payload), ROUND_TRIPS // ROUNDS, 20)
                        base += sample(lambda: floor.request(payload), ROUND_TRIPS // ROUNDS, 20)
                    yield name, ours, base
            finally:
                floor.close()
    finally:
        stop(server)
        stop(raw)


def run(write: Callable[[str], Any], socket_dir: str | None = None) -> None:
    """Run the demo, writing the tables line by line through ``write``."""
    write(f"hintens core: {_impl.implementation}, CRC16 kernel: {_impl.core.crc16_backend()}")
    write("")
    write(f"Request round trips to a server process ({ROUND_TRIPS} each in {ROUNDS} interleaved "
          "rounds, one thread), against a raw-socket ping-pong (the floor for Python)")
    write(f"{'payload':<8} {'median':>10} {'p99':>10} {'req/s':>9} {'MB/s':>8}   "
          f"{'raw median':>10} {'raw p99':>10}  {'vs raw':>6}")
    with tempfile.TemporaryDirectory(prefix="hintens-demo-", dir=socket_dir) as directory:
        for name, ours, base in _round_trip_rows(directory):
            size = dict(SIZES)[name]
            median, floor = statistics.median(ours), statistics.median(base)
            write(f"{name:<8} {median * 1e6:>7.1f} us {percentile(ours, 0.99) * 1e6:>7.1f} us "
                  f"{1 / statistics.mean(ours):>9.0f} {2 * size / statistics.mean(ours) / 1e6:>8.1f}   "
                  f"{floor * 1e6:>7.1f} us {percentile(base, 0.99) * 1e6:>7.1f} us  "
                  f"{median / floor:>5.2f}x")
    write("")
    write("Core kernels, in this process")
    write(f"{'workload':<30} {'hintens':>12} {'baseline':>12} {'speed-up':>9}  "
          f"{'rate':<18} baseline")
    for name, baseline, ours_s, base_s, rate in _rows():
        write(f"{name:<30} {ours_s * 1e6:>9.3f} us {base_s * 1e6:>9.3f} us "
              f"{base_s / ours_s:>8.1f}x  {rate:<18} {baseline}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["raw-echo"]:
        raw_echo_server(sys.argv[2])
