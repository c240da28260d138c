"""Throughput across two processes, every peer measured in the same run, interleaved.

    python bench/throughput.py [--rounds 5] [--events 500000] [--requests 4000]

1. One-way 100-byte Events from one sender thread, in messages per second:
   * hintens: ``Client.send_event`` in a loop (automatic batching), to ``hintens serve``;
   * pyzmq PUSH/PULL;
   * raw: a Unix socket, one ``sendall`` per length-prefixed message, which the receiver
     delimits one by one (in Python, as a raw-socket user would);
   * raw coalesced: the same messages, 64 per ``sendall``.
   Each measurement ends when a final request comes back, which proves the receiver read
   every earlier message (hintens: a Request on the same connection; pyzmq: a "done" message
   the PULL side answers on a PUSH back; raw: the receiver answers once it has counted every
   byte).
2. Eight threads doing 64-byte requests, in aggregate requests per second: a ClientPool of 4
   connections, one Client shared by all eight, and pyzmq (one REQ socket per thread, the
   REP echo server of rpc_peers).

Prints the medians over the rounds and hintens's ratios against each peer.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rpc_peers  # noqa: E402

import harness  # noqa: E402

EVENT_BYTES = 100
THREADS = 8
POOL_SIZE = 4
_COUNT = struct.Struct("<Q")


# Receivers, each in its own process -----------------------------------------------------------

def serve_raw_counter(path: str) -> None:
    """Per connection: an 8-byte message count, then that many u32-length-prefixed messages,
    each delimited (as any receiver must) but not copied; answers b"k" after the last."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    buffer = bytearray(1 << 20)
    length_at = struct.Struct("<I").unpack_from
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    break
                (left,) = _COUNT.unpack(head)
                filled = 0
                while left:
                    got = conn.recv_into(memoryview(buffer)[filled:])
                    if not got:
                        return
                    filled += got
                    pos = 0
                    while left and filled - pos >= 4:
                        end = pos + 4 + length_at(buffer, pos)[0]
                        if end > filled:
                            break
                        pos = end
                        left -= 1
                    buffer[:filled - pos] = buffer[pos:filled]
                    filled -= pos
                conn.sendall(b"k")


def serve_zmq_pull(path: str) -> None:
    """PULL on ``path``; answers every b"done" on a PUSH to ``path + '.ack'``."""
    import zmq

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind("ipc://" + path)
    ack = context.socket(zmq.PUSH)
    ack.bind("ipc://" + path + ".ack")
    received = 0
    while True:
        message = pull.recv(copy=False)
        if len(message) == 4 and message.bytes == b"done":
            ack.send(b"%d" % received)
            received = 0
        else:
            received += 1


def start_receiver(kind: str, path: str):
    argv = [sys.executable, os.path.abspath(__file__), "serve", kind, path]
    return harness.spawn(argv, path)


# Senders ----------------------------------------------------------------------------------------

def events_hintens(client, payload: bytes, count: int) -> float:
    send = client.send_event
    started = time.perf_counter()
    for _ in range(count):
        send(payload)
    client.request(b"")      # behind every Event on the connection
    return time.perf_counter() - started


def events_zmq(push, ack, payload: bytes, count: int) -> float:
    send = push.send
    started = time.perf_counter()
    for _ in range(count):
        send(payload)
    push.send(b"done")
    received = int(ack.recv())
    elapsed = time.perf_counter() - started
    assert received == count, (received, count)
    return elapsed


def events_raw(sock, payload: bytes, count: int, per_write: int) -> float:
    message = struct.pack("<I", len(payload)) + payload
    sendall = sock.sendall
    started = time.perf_counter()
    sendall(_COUNT.pack(count))
    if per_write == 1:
        for _ in range(count):
            sendall(message)
    else:
        full, rest = divmod(count, per_write)
        for _ in range(full):
            sendall(b"".join([message] * per_write))
        if rest:
            sendall(message * rest)
    assert sock.recv(1) == b"k"
    return time.perf_counter() - started


def measure_events(rounds: int, count: int, directory: str) -> dict[str, list[float]]:
    import zmq

    import hintens

    payload = os.urandom(EVENT_BYTES)
    rates: dict[str, list[float]] = {"hintens": [], "pyzmq PUSH/PULL": [],
                                     "raw sendall each": [], "raw coalesced x64": []}
    paths = {kind: os.path.join(directory, f"ev-{kind}.sock")
             for kind in ("hintens", "zmq", "raw")}
    processes = [rpc_peers.start("hintens", paths["hintens"]),
                 start_receiver("zmq", paths["zmq"]), start_receiver("raw", paths["raw"])]
    context = zmq.Context()
    try:
        client = hintens.Client(paths["hintens"], timeout=120)
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect("ipc://" + paths["zmq"])
        ack = context.socket(zmq.PULL)
        ack.connect("ipc://" + paths["zmq"] + ".ack")
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(paths["raw"])
        runs = {
            "hintens": lambda: events_hintens(client, payload, count),
            "pyzmq PUSH/PULL": lambda: events_zmq(push, ack, payload, count),
            "raw sendall each": lambda: events_raw(raw, payload, count, 1),
            "raw coalesced x64": lambda: events_raw(raw, payload, count, 64),
        }
        for run in runs.values():   # warm up every path once
            run()
        for _ in range(rounds):
            for name, run in runs.items():
                rates[name].append(count / run())
        client.close()
        raw.close()
        push.close(linger=0)
        ack.close(linger=0)
    finally:
        context.term()
        for process in processes:
            harness.stop(process)
    return rates


def requests_threads(make_request, per_thread: int) -> float:
    """Aggregate requests/s of THREADS threads, each doing ``per_thread`` requests."""
    barrier = threading.Barrier(THREADS + 1)
    payload = os.urandom(64)

    def work():
        request = make_request()
        barrier.wait()
        for _ in range(per_thread):
            request(payload)
        barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    barrier.wait()
    elapsed = time.perf_counter() - started
    for thread in threads:
        thread.join()
    return THREADS * per_thread / elapsed


def measure_requests(rounds: int, per_thread: int, directory: str) -> dict[str, list[float]]:
    import zmq

    import hintens

    rates: dict[str, list[float]] = {"hintens pool of 4": [], "hintens one Client": [],
                                     "pyzmq REQ per thread": []}
    paths = {kind: os.path.join(directory, f"rq-{kind}.sock") for kind in ("hintens", "zmq")}
    processes = [rpc_peers.start("hintens", paths["hintens"]),
                 rpc_peers.start("pyzmq", paths["zmq"])]
    context = zmq.Context()
    try:
        pool = hintens.ClientPool(paths["hintens"], size=POOL_SIZE, timeout=120)
        shared = hintens.Client(paths["hintens"], timeout=120)

        def zmq_request():
            sock = context.socket(zmq.REQ)
            sock.connect("ipc://" + paths["zmq"])

            def request(payload):
                sock.send(payload)
                return sock.recv()
            return request

        runs = {
            "hintens pool of 4": lambda: requests_threads(lambda: pool.request, per_thread),
            "hintens one Client": lambda: requests_threads(lambda: shared.request, per_thread),
            "pyzmq REQ per thread": lambda: requests_threads(zmq_request, per_thread),
        }
        for run in runs.values():
            run()
        for _ in range(rounds):
            for name, run in runs.items():
                rates[name].append(run())
        pool.close()
        shared.close()
    finally:
        context.term()
        for process in processes:
            harness.stop(process)
    return rates


def report(title: str, rates: dict[str, list[float]], ours: str, unit: str) -> None:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n{title}")
    for name, values in rates.items():
        print(f"  {name:<22} median {medians[name] / 1e6:6.3f} M{unit}/s   "
              f"min {min(values) / 1e6:6.3f}   max {max(values) / 1e6:6.3f}")
    for name in rates:
        if name != ours:
            print(f"  {ours} / {name:<22} {medians[ours] / medians[name]:5.2f}x")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        kind, path = sys.argv[2], sys.argv[3]
        if kind == "raw":
            serve_raw_counter(path)
        elif kind == "zmq":
            serve_zmq_pull(path)
        else:
            raise SystemExit(f"unknown receiver {kind}")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--requests", type=int, default=4000, help="per thread")
    parser.add_argument("--only", choices=("events", "requests"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hintens-bench-") as directory:
        if args.only != "requests":
            events = measure_events(args.rounds, args.events, directory)
            report(f"one-way {EVENT_BYTES}-byte messages, one sender thread, {args.rounds} rounds "
                   f"of {args.events} (targets: hintens >= 2 M/s and >= 1.7x pyzmq)",
                   events, "hintens", "msg")
        if args.only != "events":
            requests = measure_requests(args.rounds, args.requests, directory)
            report(f"{THREADS} threads x {args.requests} 64-byte requests, {args.rounds} rounds",
                   requests, "hintens pool of 4", "req")


if __name__ == "__main__":
    main()
