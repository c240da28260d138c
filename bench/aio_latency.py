"""asyncio round trips: hintens.aio.Client against a raw asyncio floor and zmq.asyncio, each
server in its own process, all in one run (issue 12's benchmark; numbers are printed, never
asserted).

    python bench/aio_latency.py [--count 5000] [--rounds 5]

Rows:
* 64 B round trip from one task (median of the rounds' per-request means);
* requests/s with 100 concurrent tasks on one connection;
* the 64 MiB echo against one memcpy of 64 MiB (hintens only: it is the shared-memory path).

Peers:
* ``raw asyncio``: the floor, an ``asyncio.Protocol`` client and server over a Unix socket
  speaking the same 24-byte frames (decoded with hintens.wire, echoed as Responses);
* ``zmq.asyncio``: DEALER to a ROUTER echo server (if pyzmq is installed);
* ``hintens sync``: the sync ``hintens.Client``, for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import harness

import hintens
import hintens.aio
from hintens import wire

TASKS = 100
SMALL = b"x" * 64


# Servers, each run as `python bench/aio_latency.py serve KIND PATH` ------------------------

def serve(kind: str, path: str) -> None:
    if kind == "raw":
        asyncio.run(_serve_raw(path))
    elif kind == "zmq":
        import zmq

        sock = zmq.Context().socket(zmq.ROUTER)
        sock.bind("ipc://" + path)
        while True:
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    else:
        raise SystemExit(f"unknown kind {kind}")


class _EchoFrames(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.decoder = wire.FrameDecoder()

    def data_received(self, data: bytes) -> None:
        out = [wire.encode_frame(wire.MessageType.RESPONSE, frame.payload, frame.request_id)
               for frame in self.decoder.feed(data) if frame.type == wire.MessageType.REQUEST]
        if out:
            self.transport.write(b"".join(out))


async def _serve_raw(path: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(_EchoFrames, path)
    async with server:
        await server.serve_forever()


def start(kind: str, path: str) -> Any:
    if kind == "hintens":
        argv = [sys.executable, "-m", "hintens", "serve", "--socket", path]
    else:
        argv = [sys.executable, os.path.abspath(__file__), "serve", kind, path]
    if kind == "zmq":
        process = harness.spawn(argv, path)   # ipc:// binds a socket file at path
        return process
    return harness.spawn(argv, path)


# Clients ------------------------------------------------------------------------------------

class _RawClient(asyncio.Protocol):
    """The floor's client: frames out, futures matched by request id."""

    def __init__(self) -> None:
        self.decoder = wire.FrameDecoder()
        self.waiters: dict[int, asyncio.Future[Any]] = {}
        self.ids = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            future = self.waiters.pop(frame.request_id, None)
            if future is not None and not future.done():
                future.set_result(frame.payload)

    async def request(self, payload: bytes) -> Any:
        self.ids += 1
        future = asyncio.get_running_loop().create_future()
        self.waiters[self.ids] = future
        self.transport.write(wire.encode_frame(wire.MessageType.REQUEST, payload, self.ids))
        return await future


class _ZmqClient:
    """DEALER with a request-id frame, so that many requests are in flight at once; a task
    reads the replies and wakes their futures."""

    def __init__(self, path: str) -> None:
        import zmq
        import zmq.asyncio

        self.context = zmq.asyncio.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.connect("ipc://" + path)
        self.waiters: dict[bytes, asyncio.Future[Any]] = {}
        self.ids = 0
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            request_id, payload = await self.sock.recv_multipart()
            future = self.waiters.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(payload)

    async def request(self, payload: bytes) -> Any:
        self.ids += 1
        request_id = self.ids.to_bytes(8, "little")
        future = asyncio.get_running_loop().create_future()
        self.waiters[request_id] = future
        await self.sock.send_multipart([request_id, payload])
        return await future

    async def close(self) -> None:
        self.reader.cancel()
        self.sock.close(0)
        self.context.term()


async def _one_task(request: Any, count: int, rounds: int) -> float:
    for _ in range(200):
        await request(SMALL)
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(count):
            await request(SMALL)
        means.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(means)


async def _many_tasks(request: Any, count: int, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await request(SMALL)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(TASKS)))
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


async def _measure(kind: str, path: str, count: int, rounds: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    if kind == "hintens":
        async with hintens.aio.Client(path) as client:
            return (await _one_task(client.request, count, rounds),
                    await _many_tasks(client.request, count * 4, rounds))
    if kind == "raw":
        transport, protocol = await loop.create_unix_connection(_RawClient, path)
        try:
            return (await _one_task(protocol.request, count, rounds),
                    await _many_tasks(protocol.request, count * 4, rounds))
        finally:
            transport.close()
    zmq_client = _ZmqClient(path)
    try:
        return (await _one_task(zmq_client.request, count, rounds),
                await _many_tasks(zmq_client.request, count * 4, rounds))
    finally:
        await zmq_client.close()


def _sync_one(path: str, count: int, rounds: int) -> float:
    with hintens.Client(path) as client:
        for _ in range(200):
            client.request(SMALL)
        means = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(count):
                client.request(SMALL)
            means.append((time.perf_counter() - started) / count * 1e6)
        return statistics.median(means)


async def _echo_64mib(path: str, rounds: int) -> tuple[float, float]:
    payload = os.urandom(1 << 20) * 64
    target = bytearray(payload)   # touched: no page faults in the timed copies
    copies = []
    for _ in range(rounds):
        started = time.perf_counter()
        memoryview(target)[:] = payload   # one plain memcpy
        copies.append(time.perf_counter() - started)
    echoes = []
    async with hintens.aio.Client(path) as client:
        for _ in range(rounds + 1):
            buffer = client.allocate(len(payload))
            started = time.perf_counter()
            buffer[:] = payload   # the one copy a sender makes
            reply = await client.request(buffer)
            echoes.append(time.perf_counter() - started)
            if isinstance(reply, memoryview):
                reply.release()
    return statistics.median(echoes[1:]) * 1e3, statistics.median(copies) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kinds = ["hintens", "raw"]
    try:
        import zmq.asyncio  # noqa: F401
        kinds.append("zmq")
    except ImportError:
        print("zmq.asyncio: pyzmq is not installed (the bench extra)")
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        for kind in kinds:
            path = os.path.join(directory, f"{kind}.sock")
            process = start(kind, path)
            try:
                results[kind] = asyncio.run(_measure(kind, path, args.count, args.rounds))
                if kind == "hintens":
                    sync_us = _sync_one(path, args.count, args.rounds)
                    echo_ms, copy_ms = asyncio.run(_echo_64mib(path, args.rounds))
            finally:
                harness.stop(process)
    print(f"asyncio, 64 B requests; one task: {args.rounds} rounds of {args.count}, medians; "
          f"{TASKS} tasks: {args.count * 4} requests a round")
    print(f"  {'peer':22} {'one task':>12} {'100 tasks':>16}")
    names = {"hintens": "hintens.aio", "raw": "raw asyncio Protocol", "zmq": "zmq.asyncio"}
    for kind, (one_us, rate) in results.items():
        print(f"  {names[kind]:22} {one_us:9.1f} us {rate / 1e3:11.1f} K/s")
    print(f"  {'hintens sync Client':22} {sync_us:9.1f} us")
    one, rate = results["hintens"]
    print(f"  hintens.aio / raw asyncio floor, one task:   {one / results['raw'][0]:.2f}x "
          f"(target <= 1.3x)")
    if "zmq" in results:
        print(f"  hintens.aio / zmq.asyncio, one task:         {one / results['zmq'][0]:.2f}x "
              f"(target <= 0.5x)")
        print(f"  hintens.aio / zmq.asyncio, 100 tasks:        {rate / results['zmq'][1]:.2f}x "
              f"(target >= 2x)")
    print(f"64 MiB echo through shared memory: {echo_ms:.2f} ms, one memcpy {copy_ms:.2f} ms: "
          f"{echo_ms / copy_ms:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
