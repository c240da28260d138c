"""The shared-memory ring (issue 16, PROTOCOL.md section 9b) against the socket path, the raw
Python socket floor and iceoryx2 busy-polling, in one run, server and client in separate
processes, the server's handler in Python.

    python bench/ring_latency.py [--rounds 5] [--batch 2000] [--events 200000]

Prints per kind the 64 B round trip's median and p99, the ring's ratios (to the raw floor, to
iceoryx2, p99 to p50), 100 B Events/s over the ring and over the socket, and the ring's futex
counts (system calls a round trip costs). Kinds:

* ``raw``: length-prefixed echo over a Unix socket with plain ``socket`` calls (the floor);
* ``socket``: hintens ``Client``/``Server``, as shipped (no ring);
* ``ring``: hintens with ``ring=True`` on both sides;
* ``iceoryx2``: request-response, both sides busy-polling (``receive()`` in a loop, no sleep),
  the fastest way its Python API allows. Its server spins a core for as long as it runs, so it
  runs only while it is measured;
* ``aio-socket``, ``aio-ring``: ``hintens.aio.Client`` against ``hintens.aio.Server`` (a plain
  handler, on the loop), without and with the ring; over the ring both are socket waiters
  (wake records, no spinning). Besides the round trip, 64 B requests/s with 100 in flight.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

KINDS = ("raw", "socket", "ring", "iceoryx2", "aio-socket", "aio-ring")
AIO_WINDOW = 100
PAYLOAD_BYTES = 64
EVENT_BYTES = 100


def serve(kind: str, path: str) -> None:
    if kind == "raw":
        harness.raw_echo_server(path)
    elif kind in ("socket", "ring"):
        import hintens

        events = [0]

        def on_event(payload, connection):
            events[0] += 1

        def handler(payload):
            if bytes(payload[:6]) == b"count?":
                return str(events[0]).encode()
            return payload

        hintens.Server(path, handler, on_event=on_event, ring=kind == "ring").serve_forever()
    elif kind in ("aio-socket", "aio-ring"):
        import asyncio

        import hintens.aio

        async def main() -> None:
            async with hintens.aio.Server(path, lambda payload: payload,
                                          ring=kind == "aio-ring") as server:
                await server.serve_forever()

        asyncio.run(main())
    elif kind == "iceoryx2":
        iox, _, service = _iceoryx2_service(path)
        server = service.server_builder().initial_max_slice_len(4096).create()
        import socket

        ready = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # tells spawn() it is up
        ready.bind(path)
        ready.listen(1)
        while True:   # busy-poll: no sleep between polls
            active = server.receive()
            if active is None:
                continue
            request = active.payload().as_memory_view().cast("B")
            response = active.loan_slice_uninit(len(request))
            response.payload().as_memory_view().cast("B")[:] = request
            response.assume_init().send()
            del request, active
    else:
        raise SystemExit(f"unknown kind {kind}")


def _iceoryx2_service(path: str):
    import ctypes

    import iceoryx2 as iox

    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    service = (node.service_builder(iox.ServiceName.new("hintens-bench-" + os.path.basename(path)))
               .request_response(iox.Slice[ctypes.c_uint8], iox.Slice[ctypes.c_uint8])
               .open_or_create())
    return iox, node, service


class _Iceoryx2Client:
    def __init__(self, path: str) -> None:
        _, self.node, service = _iceoryx2_service(path)
        self.client = service.client_builder().initial_max_slice_len(4096).create()

    def request(self, payload: bytes) -> memoryview:
        request = self.client.loan_slice_uninit(len(payload))
        request.payload().as_memory_view().cast("B")[:] = payload
        pending = request.assume_init().send()
        while True:   # busy-poll
            response = pending.receive()
            if response is not None:
                return response.payload().as_memory_view().cast("B")

    def close(self) -> None:
        self.client = None


def client(kind: str, path: str):
    if kind == "raw":
        return harness.RawClient(path)
    if kind == "iceoryx2":
        return _Iceoryx2Client(path)
    import hintens

    return hintens.Client(path, ring=kind == "ring")


def aio_samples(kind: str, path: str, payload: bytes, count: int,
                warmup: int) -> tuple[list[float], float]:
    """``count`` round trips one at a time (seconds each), then requests/s with AIO_WINDOW in
    flight, from a ``hintens.aio.Client`` on a loop of its own."""
    import asyncio

    import hintens.aio

    async def main() -> tuple[list[float], float]:
        async with hintens.aio.Client(path, ring=kind == "aio-ring") as peer:
            assert bytes(await peer.request(payload)) == payload
            assert peer.ring_active is (kind == "aio-ring"), "the ring was not negotiated"
            clock = time.perf_counter
            for _ in range(warmup):
                await peer.request(payload)
            times = []
            for _ in range(count):
                started = clock()
                await peer.request(payload)
                times.append(clock() - started)
            started = clock()
            for _ in range(count // AIO_WINDOW):
                await asyncio.gather(*[peer.request(payload) for _ in range(AIO_WINDOW)])
            return times, count // AIO_WINDOW * AIO_WINDOW / (clock() - started)

    return asyncio.run(main())


def start(kind: str, path: str):
    return harness.spawn([sys.executable, os.path.abspath(__file__), "serve", kind, path], path)


def events_per_second(kind: str, path: str, count: int) -> float:
    peer = client(kind, path)
    try:
        payload = os.urandom(EVENT_BYTES)
        before = int(bytes(peer.request(b"count?")))
        started = time.perf_counter()
        send = peer.send_event
        for _ in range(count):
            send(payload)
        peer.flush()
        while int(bytes(peer.request(b"count?"))) < before + count:
            pass
        return count / (time.perf_counter() - started)
    finally:
        peer.close()


BUSY_CLIENT = """
import sys, time, hintens
client = hintens.Client(sys.argv[1], ring=sys.argv[2] == "ring")
payload = bytes(64)
client.request(payload)
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
done, end = 0, time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end:
    client.request(payload)
    done += 1
print(done, flush=True)
"""


def busy_throughput(kind: str, path: str, clients: int, seconds: float) -> float:
    """Round trips per second of ``clients`` client processes at once, each in a loop."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, "-c", BUSY_CLIENT, path, kind, str(seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(clients)]
    try:
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:   # all start together
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return sum(int(proc.stdout.readline()) for proc in procs) / seconds
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--busy", type=int, default=8,
                        help="client processes for the busy test (0: skip it)")
    parser.add_argument("--busy-seconds", type=float, default=3.0)
    args = parser.parse_args()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if "iceoryx2" in kinds:
        try:
            import iceoryx2  # noqa: F401
        except ImportError:
            print("iceoryx2 is not installed (the bench extra): left out")
            kinds.remove("iceoryx2")
    payload = os.urandom(PAYLOAD_BYTES)
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    rates: dict[str, list[float]] = {"socket": [], "ring": []}
    busy: dict[str, list[float]] = {"socket": [], "ring": []}
    pipelined: dict[str, list[float]] = {"aio-socket": [], "aio-ring": []}
    futex: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hintens-ring-bench-") as directory:
        servers = {}
        try:
            for kind in kinds:
                if kind != "iceoryx2":
                    servers[kind] = start(kind, os.path.join(directory, kind + ".sock"))
            for _ in range(args.rounds):
                for kind in kinds:
                    path = os.path.join(directory, kind + ".sock")
                    process = start(kind, path) if kind == "iceoryx2" else None
                    if kind.startswith("aio-"):
                        times, rate = aio_samples(kind, path, payload, args.batch, 200)
                        samples[kind] += times
                        pipelined[kind].append(rate)
                        continue
                    try:
                        peer = client(kind, path)
                        try:
                            assert bytes(peer.request(payload)) == payload, kind
                            if kind == "ring":
                                ring = peer._conn.channel.ring
                                assert ring is not None, "the ring was not negotiated"
                                before = ring.stats()
                            samples[kind] += harness.sample(lambda: peer.request(payload),
                                                            args.batch, warmup=200)
                            if kind == "ring":
                                after = ring.stats()
                                calls = sum(after[k] - before[k]
                                            for k in ("futex_waits", "futex_wakes"))
                                futex.setdefault("per_rt", 0.0)
                                futex["per_rt"] += calls / (args.batch + 200) / args.rounds
                        finally:
                            peer.close()
                    finally:
                        if process is not None:
                            harness.stop(process)
                            os.unlink(path)
                for kind in ("socket", "ring"):
                    if kind in kinds:
                        rates[kind].append(events_per_second(
                            kind, os.path.join(directory, kind + ".sock"), args.events))
                        if args.busy:
                            busy[kind].append(busy_throughput(
                                kind, os.path.join(directory, kind + ".sock"), args.busy,
                                args.busy_seconds))
        finally:
            for process in servers.values():
                harness.stop(process)
    print(f"64 B round trips, {args.rounds} x {args.batch} per kind (us)")
    medians = {}
    for kind in kinds:
        s = sorted(samples[kind])
        medians[kind] = statistics.median(s)
        p99 = harness.percentile(s, 0.99)
        print(f"  {kind:10s} p50 {medians[kind] * 1e6:8.2f}  p99 {p99 * 1e6:8.2f}  "
              f"p99/p50 {p99 / medians[kind]:5.2f}")
    if "ring" in medians:
        for base in ("raw", "socket", "iceoryx2"):
            if base in medians:
                print(f"  ring / {base}: {medians['ring'] / medians[base]:.2f}x")
        print(f"  ring futex calls (waits + wakes, this client) per round trip: "
              f"{futex.get('per_rt', 0):.3f}")
    for kind in ("socket", "ring"):
        if rates.get(kind):
            print(f"100 B Events/s, {kind}: {statistics.median(rates[kind]):,.0f}")
    if rates.get("socket") and rates.get("ring"):
        print(f"  ring / socket: {statistics.median(rates['ring']) / statistics.median(rates['socket']):.2f}x")
    for kind in ("socket", "ring"):
        if busy.get(kind):
            print(f"{args.busy} busy clients, 64 B round trips/s in all, {kind}: "
                  f"{statistics.median(busy[kind]):,.0f}")
    if busy.get("socket") and busy.get("ring"):
        print(f"  ring / socket: {statistics.median(busy['ring']) / statistics.median(busy['socket']):.2f}x")
    if "aio-ring" in medians and "aio-socket" in medians:
        print(f"  aio-ring / aio-socket (round trip): "
              f"{medians['aio-ring'] / medians['aio-socket']:.2f}x")
    for kind in ("aio-socket", "aio-ring"):
        if pipelined.get(kind):
            print(f"asyncio, {AIO_WINDOW} in flight, 64 B requests/s, {kind}: "
                  f"{statistics.median(pipelined[kind]):,.0f}")
    if pipelined.get("aio-socket") and pipelined.get("aio-ring"):
        print(f"  aio-ring / aio-socket: "
              f"{statistics.median(pipelined['aio-ring']) / statistics.median(pipelined['aio-socket']):.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
