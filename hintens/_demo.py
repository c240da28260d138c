"""`hintens demo`: run a server process, exchange messages with it, and print the numbers,
against a raw-socket ping-pong written with the stdlib (the floor for Python) measured in the
same run. The benchmarks (bench/, which is not shipped) measure the same way with the process
and sampling helpers here; this module needs nothing beyond the standard library.
"""

from __future__ import annotations

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

# Processes and sampling (bench/harness.py uses them too) -------------------------------------

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
                if 4 + size > len(buffer):   # a larger message: grow, keep the header read
                    buffer = bytearray(buffer[:4]) + bytearray(size)
                    view = memoryview(buffer)
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


#: The raw client joins header and payload (one write) below this size, writes both above it.
COPY_BELOW_BYTES = 64 * 1024


class RawClient:
    """Client side of the raw floor: sendall the message, read the whole echo back."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buffer = memoryview(bytearray(1 << 20))

    def request(self, payload: bytes) -> memoryview:
        if 4 + len(payload) > len(self.buffer):
            self.buffer = memoryview(bytearray(4 + len(payload)))
        if len(payload) < COPY_BELOW_BYTES:   # one write; a large payload is not copied
            self.sock.sendall(struct.pack("<I", len(payload)) + payload)
        else:
            self.sock.sendall(struct.pack("<I", len(payload)))
            self.sock.sendall(payload)
        _read_exactly(self.sock, self.buffer[:4 + len(payload)])
        return self.buffer[4:4 + len(payload)]

    def close(self) -> None:
        self.sock.close()


# The demo -----------------------------------------------------------------------------------

ROUND_TRIPS = 3000
ROUNDS = 6
SIZES = (("64 B", 64), ("4 KiB", 4096), ("60 KiB", 60 * 1024))


def _round_trip_rows(directory: str) -> Iterable[tuple[str, list[float], list[float]]]:
    from .sync.client import Client

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


if __name__ == "__main__":
    if sys.argv[1:2] == ["raw-echo"]:
        raw_echo_server(sys.argv[2])
