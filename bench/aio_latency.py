"""asyncio round trips: hintens.aio.Client against a raw asyncio floor, zmq.asyncio and
grpc.aio, each server in its own process, all in one run (issue 12's benchmark; numbers are
printed, never asserted).

    python bench/aio_latency.py [--count 5000] [--rounds 5]

Columns, for each peer:
* 64 B round trip from one task (median of the rounds' per-request means);
* requests/s with 100 concurrent tasks on one connection (one channel for grpc.aio);
* 1 MiB echo from one task, the payload passed as ``bytes`` (median of the rounds' means,
  ``count // 50`` echoes a round, at least 10; hintens copies it into shared memory);
* in brackets, each against the raw floor on the same event loop (latency: times the
  floor's; requests/s: times the floor's rate, so more is faster).
Then the 64 MiB echo against one memcpy of 64 MiB (hintens only: the shared-memory path, the
buffer filled in place).

Peers:
* ``raw asyncio Protocol``: the floor, an ``asyncio.Protocol`` client and server over a Unix
  socket speaking the same 24-byte frames (decoded with hintens.wire, echoed as Responses);
* ``zmq.asyncio``: DEALER to a ROUTER echo server (if pyzmq is installed);
* ``grpc.aio``: a generic unary-unary bytes echo (no protobuf: identity serializers) on a
  ``grpc.aio.server`` at ``unix:PATH``, messages up to 128 MiB both ways (if grpcio is
  installed);
* ``hintens.aio, aio server``: the hintens.aio client against a ``hintens.aio.Server`` (its
  default echo handler, a plain function run on the loop) instead of the sync server that
  ``hintens serve`` runs (the ``hintens.aio`` row);
* ``hintens sync Client``: the sync ``hintens.Client``, one task only, for reference;
* ``hintens.aio (uvloop)`` and ``raw Protocol (uvloop)``: the hintens.aio client and the
  floor's client again on a uvloop event loop, against the same servers as their asyncio
  rows (the floor's server stays on the default loop; if uvloop is installed).
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
BIG = 1 << 20
GRPC_METHOD, GRPC_OPTIONS = harness.GRPC_METHOD, harness.GRPC_OPTIONS


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
    elif kind == "grpc":
        asyncio.run(_serve_grpc(path))
    elif kind == "hintens-aio":
        asyncio.run(_serve_hintens_aio(path))
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


async def _serve_hintens_aio(path: str) -> None:
    # The default echo handler: a plain function, run in the read callback.
    async with hintens.aio.Server(path) as server:
        await server.serve_forever()


async def _serve_grpc(path: str) -> None:
    server = harness.grpc_echo_server()
    server.add_insecure_port("unix:" + path)
    await server.start()
    await server.wait_for_termination()


def start(kind: str, path: str) -> Any:
    if kind == "hintens":
        argv = [sys.executable, "-m", "hintens", "serve", "--socket", path]
    else:
        argv = [sys.executable, os.path.abspath(__file__), "serve", kind, path]
    return harness.spawn(argv, path)   # zmq's ipc:// and grpc's unix: bind a socket file too


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


class _GrpcClient:
    """A grpc.aio channel and its echo method, bytes in and out (made in the running loop)."""

    async def connect(self, path: str) -> _GrpcClient:
        import grpc.aio

        self.channel = grpc.aio.insecure_channel("unix:" + path, options=GRPC_OPTIONS)
        self.request = self.channel.unary_unary(GRPC_METHOD, request_serializer=None,
                                                response_deserializer=None)
        await self.channel.channel_ready()
        return self

    async def close(self) -> None:
        await self.channel.close()


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


async def _big_echo(request: Any, count: int, rounds: int) -> float:
    """Microseconds per 1 MiB echo from one task (median of the rounds' means)."""
    payload = os.urandom(BIG)
    echoes = max(10, count // 50)

    async def echo() -> int:
        reply = await request(payload)
        size = len(reply)
        if isinstance(reply, memoryview):
            reply.release()   # hintens: hands a shared-memory segment back
        return size

    for _ in range(5):
        size = await echo()
        if size != BIG:
            raise RuntimeError(f"a 1 MiB echo came back with {size} bytes")
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(echoes):
            await echo()
        means.append((time.perf_counter() - started) / echoes * 1e6)
    return statistics.median(means)


async def _rows(request: Any, count: int, rounds: int) -> tuple[float, float, float]:
    return (await _one_task(request, count, rounds),
            await _many_tasks(request, count * 4, rounds),
            await _big_echo(request, count, rounds))


async def _measure(kind: str, path: str, count: int,
                   rounds: int) -> tuple[float, float, float]:
    loop = asyncio.get_running_loop()
    if kind in ("hintens", "hintens-aio"):
        async with hintens.aio.Client(path) as client:
            return await _rows(client.request, count, rounds)
    if kind == "raw":
        transport, protocol = await loop.create_unix_connection(_RawClient, path)
        try:
            return await _rows(protocol.request, count, rounds)
        finally:
            transport.close()
    if kind == "grpc":
        grpc_client = await _GrpcClient().connect(path)
        try:
            return await _rows(grpc_client.request, count, rounds)
        finally:
            await grpc_client.close()
    zmq_client = _ZmqClient(path)
    try:
        return await _rows(zmq_client.request, count, rounds)
    finally:
        await zmq_client.close()


def _run(coroutine: Any, loop: str) -> Any:
    """Run ``coroutine`` to the end on a new event loop: asyncio's default, or uvloop's."""
    if loop == "asyncio":
        return asyncio.run(coroutine)
    import uvloop

    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    new_loop = uvloop.new_event_loop()
    asyncio.set_event_loop(new_loop)
    try:
        return new_loop.run_until_complete(coroutine)
    finally:
        new_loop.run_until_complete(new_loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        new_loop.close()


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
    kinds = ["hintens", "hintens-aio", "raw"]
    try:
        import zmq.asyncio  # noqa: F401
        kinds.append("zmq")
    except ImportError:
        print("zmq.asyncio: pyzmq is not installed (the bench extra)")
    try:
        import grpc.aio  # noqa: F401
        kinds.append("grpc")
    except ImportError:
        print("grpc.aio: grpcio is not installed (the bench extra)")
    loops = ["asyncio"]
    try:
        import uvloop  # noqa: F401
        loops.append("uvloop")
    except ImportError:
        print("uvloop: not installed (the bench or uvloop extra)")
    # (kind, loop) -> (one task us, 100 tasks requests/s, 1 MiB echo us)
    results: dict[tuple[str, str], tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        for kind in kinds:
            path = os.path.join(directory, f"{kind}.sock")
            process = start(kind, path)
            try:
                for loop in loops if kind in ("hintens", "hintens-aio", "raw") \
                        else ["asyncio"]:
                    results[kind, loop] = _run(_measure(kind, path, args.count, args.rounds),
                                               loop)
                if kind == "hintens":
                    sync_us = _sync_one(path, args.count, args.rounds)
                    echo_ms, copy_ms = asyncio.run(_echo_64mib(path, args.rounds))
            finally:
                harness.stop(process)
    print(f"asyncio, 64 B requests; one task: {args.rounds} rounds of {args.count}, medians; "
          f"{TASKS} tasks: {args.count * 4} requests a round; 1 MiB echo: "
          f"{max(10, args.count // 50)} a round")
    print("  [in brackets: against the raw floor on the same event loop]")
    print(f"  {'peer':32} {'one task':>21} {'100 tasks':>22} {'1 MiB echo':>21}")
    names = {"hintens": "hintens.aio", "hintens-aio": "hintens.aio, aio server",
             "raw": "raw asyncio Protocol", "zmq": "zmq.asyncio", "grpc": "grpc.aio"}
    order = [(kind, "asyncio") for kind in kinds] + [(kind, "uvloop") for kind in kinds]
    for kind, loop in order:
        if (kind, loop) not in results:
            continue
        one_us, rate, big_us = results[kind, loop]
        floor = results["raw", loop]
        name = names[kind] if loop == "asyncio" else {
            "hintens": "hintens.aio (uvloop)", "hintens-aio": "hintens.aio, aio server (uvloop)",
            "raw": "raw Protocol (uvloop)"}[kind]
        ratios = (("", "", "") if kind == "raw" else
                  (f"[{one_us / floor[0]:5.2f}x]", f"[{rate / floor[1]:5.2f}x]",
                   f"[{big_us / floor[2]:5.2f}x]"))
        print(f"  {name:32} {one_us:9.1f} us {ratios[0]:>8} {rate / 1e3:9.1f} K/s "
              f"{ratios[1]:>8} {big_us:9.1f} us {ratios[2]:>8}".rstrip())
        if (kind, loop) == (kinds[-1], "asyncio"):   # after the default loop's rows
            ratio = f"[{sync_us / results['raw', 'asyncio'][0]:5.2f}x]"
            print(f"  {'hintens sync Client':32} {sync_us:9.1f} us {ratio:>8}")
    one, rate, _ = results["hintens", "asyncio"]
    floor_one = results["raw", "asyncio"][0]
    print(f"  hintens.aio / raw asyncio floor, one task:   {one / floor_one:.2f}x "
          f"(target <= 1.3x)")
    aio_one, aio_rate, _ = results["hintens-aio", "asyncio"]
    print(f"  both asyncio (aio server) / raw floor:       {aio_one / floor_one:.2f}x one task, "
          f"{aio_rate / results['raw', 'asyncio'][1]:.2f}x the floor's 100-task rate")
    if ("zmq", "asyncio") in results:
        zmq_one, zmq_rate, _ = results["zmq", "asyncio"]
        print(f"  hintens.aio / zmq.asyncio, one task:         {one / zmq_one:.2f}x "
              f"(target <= 0.5x)")
        print(f"  hintens.aio / zmq.asyncio, 100 tasks:        {rate / zmq_rate:.2f}x "
              f"(target >= 2x)")
    print(f"64 MiB echo through shared memory: {echo_ms:.2f} ms, one memcpy {copy_ms:.2f} ms: "
          f"{echo_ms / copy_ms:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
