"""The Python peer of the cross-language contract (tests/ports/README.md).

Run: ``python tests/ports/py_peer.py serve SOCKET`` or ``... client SOCKET SCENARIO`` (and the
bench commands). Each language's peer takes the same command line, so tests/test_ports.py and
bench/ports.py drive all nine client/server pairings alike.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import hintens
from hintens import bincode
from hintens.sync.driver import Waiter
from hintens.wire import encode_frame

ATTEMPT_TIMEOUT_S = 10.0
BAD_CRC_REQUEST_ID = 1 << 40
SIZES = (0, 1, 65535, 65536, 1 << 20, 64 << 20)


@dataclass
class Quote:
    id: bincode.u64
    price: bincode.f64
    venue: str
    sizes: list[bincode.u32]


def pattern(n: int) -> bytes:
    """``n`` bytes where byte ``i`` is ``(i * 31 + 7) % 251`` (the pattern repeats every 251)."""
    block = bytes((i * 31 + 7) % 251 for i in range(251))
    return (block * (n // 251 + 1))[:n]


class Failed(Exception):
    """A check of a scenario failed."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


def ready() -> None:
    print(f"READY {os.getpid()}", flush=True)


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


# -- serve -----------------------------------------------------------------------------------

def serve(path: str) -> None:
    events = [0, 0]   # count, bytes
    lock = threading.Lock()

    def on_event(payload: Any, connection: Any) -> None:
        with lock:
            events[0] += 1
            events[1] += len(payload)

    def handler(payload: memoryview) -> Any:
        head = bytes(payload[:6])
        if head.startswith(b"err:"):
            raise ValueError("boom: " + bytes(payload[4:]).decode("utf-8", "replace"))
        if head.startswith(b"app:"):
            code, _, message = bytes(payload[4:]).partition(b":")
            raise hintens.RemoteError(int(code), message.decode("utf-8", "replace"))
        if head.startswith(b"events"):
            text = bytes(payload)
            if text.startswith(b"events:"):
                n = int(text[7:])
                connection = server.current_connection()
                for i in range(n):
                    connection.send_event(b"ev-%d" % i)
                return b"sent %d" % n
        if len(payload) == 5 and bytes(payload) == b"count":
            with lock:
                return b"%d %d" % (events[0], events[1])
        if head.startswith(b"quote:"):
            quote = bincode.decode(payload[6:], Quote)
            return bincode.encode(Quote(quote.id + 1, quote.price * 2, quote.venue + "!",
                                        quote.sizes[::-1]), Quote)
        return payload

    server = hintens.Server(path, handler, on_event=on_event)
    with server:
        ready()
        wait_for_signal()


# -- client scenarios ------------------------------------------------------------------------

def counted(client: hintens.Client, payload: bytes) -> tuple[memoryview, bool, bool]:
    """Request ``payload``; also say whether it went, and its answer came, through shared
    memory (from the client's byte counters)."""
    before = client.stats
    reply = client.request(payload)
    after = client.stats
    return (reply, after["shm_bytes_sent"] > before["shm_bytes_sent"],
            after["shm_bytes_received"] > before["shm_bytes_received"])


def scenario_sizes(path: str) -> dict[str, Any]:
    shm_sent = shm_received = 0
    with hintens.Client(path, timeout=ATTEMPT_TIMEOUT_S) as client:
        for n in SIZES:
            payload = pattern(n)
            reply, sent, received = counted(client, payload)
            with reply:
                check(len(reply) == n, f"{n} B: answer of {len(reply)} B")
                check(reply == payload, f"{n} B: answer differs from the request")
            shm_sent += sent
            shm_received += received
    return {"ok": True, "shm_sent": shm_sent, "shm_received": shm_received}


def scenario_pipeline(path: str) -> dict[str, Any]:
    payloads = [b"p-%d" % i for i in range(1000)]
    results: list[Any] = [None] * len(payloads)
    with hintens.Client(path, timeout=ATTEMPT_TIMEOUT_S) as client:
        # 1,000 requests in flight at once: request_many sends them all before reading.
        for i, reply in enumerate(client.request_many(payloads)):
            results[i] = bytes(reply)
    for i, (sent, got) in enumerate(zip(payloads, results)):
        check(sent == got, f"request {i}: answer {got!r}, expected {sent!r}")
    return {"ok": True, "count": len(results)}


def expect_error(client: hintens.Client, payload: bytes, code: int, text: str) -> None:
    try:
        client.request(payload)
    except hintens.RemoteError as error:
        check(error.code == code, f"{payload!r}: code {int(error.code)}, expected {code}")
        check(text in error.message, f"{payload!r}: message {error.message!r} lacks {text!r}")
    else:
        raise Failed(f"{payload!r} was answered, not failed")


def scenario_errors(path: str) -> dict[str, Any]:
    with hintens.Client(path, timeout=ATTEMPT_TIMEOUT_S) as client:
        expect_error(client, b"err:x", 5, "boom: x")
        expect_error(client, b"app:1234:custom", 1234, "custom")
        check(bytes(client.request(b"ok")) == b"ok", "the connection did not survive")
    return {"ok": True}


def scenario_badcrc(path: str) -> dict[str, Any]:
    frame = bytearray(encode_frame(1, b"bad", BAD_CRC_REQUEST_ID))
    frame[14] ^= 0xFF
    frame[15] ^= 0xFF
    with hintens.Client(path, timeout=ATTEMPT_TIMEOUT_S) as client:
        client.request(b"warm")   # the hello exchanged; nothing of ours is left unsent
        # Test-only: the client has no public way to send a corrupt frame. Register a waiter
        # for its id, write it on the idle connection, then let the next requests read the
        # Error that answers it (the client reads only while a request waits; the protocol
        # does not make a server answer in order, so a few requests may pass first).
        waiter = Waiter()
        with client._lock:
            client._waiters[BAD_CRC_REQUEST_ID] = waiter
        client._sock.sendall(frame)
        for _ in range(50):
            check(bytes(client.request(b"ok")) == b"ok", "the connection did not survive")
            if waiter.done:
                break
            time.sleep(0.01)
        check(waiter.done, "no answer to the corrupt frame")
        error = waiter.error
        check(isinstance(error, hintens.RemoteError) and error.code == 1,
              f"the corrupt frame was answered with {error!r}, not CHECKSUM")
    return {"ok": True}


def scenario_events(path: str) -> dict[str, Any]:
    received: list[bytes] = []
    with hintens.Client(path, timeout=ATTEMPT_TIMEOUT_S,
                        on_event=lambda payload: received.append(bytes(payload))) as client:
        for i in range(5):
            client.send_event(b"c-%d" % i)
        count = bytes(client.request(b"count"))
        check(count == b"5 15", f"count answered {count!r}, expected b'5 15'")
        sent = bytes(client.request(b"events:3"))
        check(sent == b"sent 3", f"events:3 answered {sent!r}")
        # on_event runs on the thread that reads; the Events came before the answer, so they
        # were delivered by the time request() returned.
        check(received == [b"ev-0", b"ev-1", b"ev-2"], f"Events received: {received!r}")
    return {"ok": True}


def scenario_quote(path: str) -> dict[str, Any]:
    sent = bincode.encode(Quote(7, 9.5, "XNAS", [100, 200, 300]), Quote)
    expected = Quote(8, 19.0, "XNAS!", [300, 200, 100])
    with hintens.Client(path, timeout=ATTEMPT_TIMEOUT_S) as client:
        reply = bytes(client.request(b"quote:" + sent))
    got = bincode.decode(reply, Quote)
    check(got == expected, f"quote answered {got!r}")
    check(reply == bincode.encode(expected, Quote), "quote answer's bytes differ")
    return {"ok": True}


def memfd_maps() -> int:
    with open("/proc/self/maps") as maps:
        return sum("/memfd:" in line for line in maps)


def scenario_kill(path: str) -> dict[str, Any]:
    payloads = (pattern(64), pattern(1 << 20))
    client = hintens.Client(path, timeout=ATTEMPT_TIMEOUT_S)
    i = 0
    error: BaseException | None = None
    after_ms = 0.0
    try:
        while True:
            start = time.monotonic()
            try:
                reply = client.request(payloads[i % 2])
            except hintens.HintensError as caught:
                after_ms = (time.monotonic() - start) * 1000
                error = caught
                check(isinstance(error, hintens.ConnectionClosed),
                      f"failed with {error!r}, not ConnectionClosed")
                check(after_ms < 2000, f"failed after {after_ms:.0f} ms")
                break
            reply.release()
            if i == 0:
                print("RUNNING", flush=True)
            i += 1
    finally:
        client.close()
    left = memfd_maps()
    check(left == 0, f"{left} memfd mappings left")
    return {"ok": True, "error": str(error), "after_ms": round(after_ms, 3), "maps_left": left}


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    "sizes": scenario_sizes, "pipeline": scenario_pipeline, "errors": scenario_errors,
    "badcrc": scenario_badcrc, "events": scenario_events, "quote": scenario_quote,
    "kill": scenario_kill,
}


# -- benchmarks ------------------------------------------------------------------------------

def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


def timed(call: Callable[[], Any], warmup: int, count: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        call()
        times.append(clock() - start)
    times.sort()
    return times


def report(kind: str, times: list[float]) -> dict[str, Any]:
    if kind == "rt64":
        return {"median_us": percentile(times, 0.5) * 1e6, "p99_us": percentile(times, 0.99) * 1e6,
                "n": len(times)}
    return {"median_ms": percentile(times, 0.5) * 1e3, "n": len(times)}


def bench(path: str, kind: str, count: int | None) -> dict[str, Any]:
    size, warmup, default = (64, 2000, 20000) if kind == "rt64" else (64 << 20, 2, 10)
    payload = pattern(size)
    with hintens.Client(path, timeout=60.0) as client:
        def once() -> None:
            with client.request(payload) as reply:
                if len(reply) != size:
                    raise Failed(f"answer of {len(reply)} B")
        return report(kind, timed(once, warmup, count or default))


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("the peer closed")
        view = view[n:]


def send_all(sock: socket.socket, buffers: list[Any]) -> None:
    """One gathered write of ``buffers`` (more only when the kernel takes part of them)."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][sent:]


class FloorReader:
    """The floor's reads: into one buffer (allocated once, grown to the largest message), as
    much as the socket holds per recv, so a small message costs one recv."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = memoryview(bytearray(64 * 1024))
        self.start = self.end = 0

    def message(self) -> memoryview:
        """The next length-prefixed payload (valid until the next call)."""
        self._fill(4)
        (n,) = struct.unpack_from("<I", self.buffer, self.start)
        self.start += 4
        self._fill(n)
        body = self.buffer[self.start:self.start + n]
        self.start += n
        return body

    def _fill(self, n: int) -> None:
        if self.end - self.start >= n:
            return
        if len(self.buffer) - self.start < n:   # move what is there to the front (or grow)
            held = self.end - self.start
            if len(self.buffer) < n:
                bigger = memoryview(bytearray(n))
                bigger[:held] = self.buffer[self.start:self.end]
                self.buffer = bigger
            else:
                self.buffer[:held] = self.buffer[self.start:self.end]
            self.start, self.end = 0, held
        while self.end - self.start < n:
            got = self.sock.recv_into(self.buffer[self.end:])
            if not got:
                raise ConnectionError("the peer closed")
            self.end += got


def floor_serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen()

    def echo(conn: socket.socket) -> None:
        reader = FloorReader(conn)
        with conn:
            try:
                while True:
                    body = reader.message()
                    send_all(conn, [struct.pack("<I", len(body)), body])
            except (ConnectionError, OSError):
                pass

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    ready()
    wait_for_signal()


def floor_bench(path: str, kind: str, count: int | None) -> dict[str, Any]:
    size, warmup, default = (64, 2000, 20000) if kind == "rt64" else (64 << 20, 2, 10)
    payload = pattern(size)
    head = struct.pack("<I", size)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        reader = FloorReader(sock)

        def once() -> None:
            send_all(sock, [head, payload])
            if len(reader.message()) != size:
                raise Failed("the floor answered another size")
        return report(kind, timed(once, warmup, count or default))


def memcpy() -> dict[str, Any]:
    source = pattern(64 << 20)
    target = bytearray(len(source))
    view = memoryview(target)
    times = timed(lambda: view.__setitem__(slice(None), source), 1, 10)
    return {"memcpy64m_ms": percentile(times, 0.5) * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve").add_argument("socket")
    client = sub.add_parser("client")
    client.add_argument("socket")
    client.add_argument("scenario", choices=sorted(SCENARIOS))
    for name in ("bench", "floor-bench"):
        command = sub.add_parser(name)
        command.add_argument("socket")
        command.add_argument("kind", choices=("rt64", "echo64m"))
        command.add_argument("--count", type=int)
    sub.add_parser("floor-serve").add_argument("socket")
    sub.add_parser("memcpy")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            serve(args.socket)
            return 0
        if args.command == "floor-serve":
            floor_serve(args.socket)
            return 0
        if args.command == "client":
            result = SCENARIOS[args.scenario](args.socket)
        elif args.command == "bench":
            result = bench(args.socket, args.kind, args.count)
        elif args.command == "floor-bench":
            result = floor_bench(args.socket, args.kind, args.count)
        else:
            result = memcpy()
    except Failed as failure:
        print(f"py-peer {args.command}: {failure}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
