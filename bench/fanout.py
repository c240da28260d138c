"""Broadcast fan-out with a slow subscriber: does one slow client slow the others?

    python bench/fanout.py [--rounds 5] [--events 100000] [--delay 0.01]

A server process pushes ``--events`` 100-byte messages to two subscribers as fast as it can.
The fast subscriber (this process) records when each arrives. The other runs in its own
process, started afresh for each measurement: first as fast (it does nothing per message),
then slow (it sleeps ``--delay`` seconds per message). The same fan-out work either way, so
the ratio of the two isolates what a slow subscriber costs the others. Measured at the fast
subscriber: messages per second from the start of the broadcast to the last arrival, and the
longest gap between two arrivals.

* hintens: ``Server.broadcast`` in a handler; the subscribers are ``Client(on_event=)``;
* pyzmq PUB/SUB (no high-water mark, so the fast subscriber is sent everything).

Prints medians over the rounds; the ratio of "other slow" to "other fast" for each (1.0: a
slow subscriber costs the others nothing), and hintens against pyzmq with a slow subscriber.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import harness

PAYLOAD = bytes(100)


# Processes ------------------------------------------------------------------------------------

def serve_hintens(path: str) -> None:
    import hintens

    server: hintens.Server

    def handle(payload):
        count = int(payload.split()[1]) if payload.startswith(b"go ") else 0
        for _ in range(count):
            server.broadcast(PAYLOAD)
        return b"ok"

    server = hintens.Server(path, handler=handle)
    server.serve_forever()


def serve_zmq(path: str) -> None:
    import zmq

    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.SNDHWM, 0)
    publisher.bind("ipc://" + path + ".pub")
    control = context.socket(zmq.REP)
    control.bind("ipc://" + path)
    while True:
        request = control.recv()
        count = int(request.split()[1]) if request.startswith(b"go ") else 0
        if request == b"ping":
            publisher.send(b"ping")
        for _ in range(count):
            publisher.send(PAYLOAD)
        control.send(b"ok")


def slow_hintens(path: str, delay: float) -> None:
    import hintens

    def on_event(payload):
        if delay:
            time.sleep(delay)

    with hintens.Client(path, on_event=on_event) as client:
        client.request(b"ready")
        print("ready", flush=True)
        sys.stdin.read()


def slow_zmq(path: str, delay: float) -> None:
    import zmq

    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.RCVHWM, 0)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect("ipc://" + path + ".pub")
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            if subscriber.poll(100):
                subscriber.recv()
                if delay:
                    time.sleep(delay)

    threading.Thread(target=drain, daemon=True).start()
    time.sleep(0.3)   # let the subscription reach the publisher
    print("ready", flush=True)
    sys.stdin.read()
    stop.set()


def start_slow(kind: str, path: str, delay: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "slow-" + kind, path, str(delay)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"the slow {kind} subscriber did not start")
    return process


def end_slow(process: subprocess.Popen) -> None:
    assert process.stdin is not None
    process.kill()
    process.wait()
    process.stdin.close()
    if process.stdout is not None:
        process.stdout.close()


# Measurements ---------------------------------------------------------------------------------

def summarize(started: float, stamps: list[float]) -> tuple[float, float]:
    """(messages per second, longest gap in seconds) from the start and the arrival times."""
    gaps = [b - a for a, b in zip([started] + stamps, stamps)]
    return len(stamps) / (stamps[-1] - started), max(gaps)


def run_hintens(path: str, count: int) -> tuple[float, float]:
    import hintens

    stamps: list[float] = []
    clock = time.perf_counter
    with hintens.Client(path, timeout=600, on_event=lambda p: stamps.append(clock())) as client:
        client.request(b"ready")
        started = clock()
        client.request(b"go %d" % count)
        deadline = time.monotonic() + 600
        while len(stamps) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(stamps)} of {count} Events arrived")
            time.sleep(0.001)
    return summarize(started, stamps)


def run_zmq(path: str, count: int) -> tuple[float, float]:
    import zmq

    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.RCVHWM, 0)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect("ipc://" + path + ".pub")
    control = context.socket(zmq.REQ)
    control.connect("ipc://" + path)
    try:
        while True:   # the subscription takes a moment to reach the publisher
            control.send(b"ping")
            control.recv()
            if subscriber.poll(50):
                subscriber.recv()
                break
        while subscriber.poll(0):
            subscriber.recv()
        clock = time.perf_counter
        stamps = []
        started = clock()
        control.send(b"go %d" % count)
        for _ in range(count):
            subscriber.recv()
            stamps.append(clock())
        control.recv()
        return summarize(started, stamps)
    finally:
        subscriber.close(linger=0)
        control.close(linger=0)
        context.term()


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] in ("serve-hintens", "serve-zmq"):
        (serve_hintens if sys.argv[1] == "serve-hintens" else serve_zmq)(sys.argv[2])
        return
    if len(sys.argv) == 4 and sys.argv[1] in ("slow-hintens", "slow-zmq"):
        (slow_hintens if sys.argv[1] == "slow-hintens" else slow_zmq)(sys.argv[2],
                                                                      float(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--delay", type=float, default=0.01,
                        help="seconds the slow subscriber sleeps per message")
    args = parser.parse_args()
    configs = [(kind, delay) for delay in (0.0, args.delay) for kind in ("hintens", "zmq")]
    results: dict[tuple[str, float], list[tuple[float, float]]] = {c: [] for c in configs}
    runs = {"hintens": run_hintens, "zmq": run_zmq}
    with tempfile.TemporaryDirectory(prefix="hintens-bench-") as directory:
        paths = {kind: os.path.join(directory, kind + ".sock") for kind in ("hintens", "zmq")}
        servers = [
            harness.spawn([sys.executable, __file__, "serve-hintens", paths["hintens"]],
                        paths["hintens"]),
            harness.spawn([sys.executable, __file__, "serve-zmq", paths["zmq"]], paths["zmq"]),
        ]
        try:
            run_hintens(paths["hintens"], 1000)   # warm up
            for _ in range(args.rounds):
                for kind, delay in configs:
                    other = start_slow(kind, paths[kind], delay)
                    try:
                        results[(kind, delay)].append(runs[kind](paths[kind], args.events))
                    finally:
                        end_slow(other)
        finally:
            for process in servers:
                harness.stop(process)
    print(f"\nbroadcast of {args.events} 100-byte messages to two subscribers, {args.rounds} "
          f"rounds. At the fast subscriber, with the other one fast, then slow (it sleeps "
          f"{args.delay * 1000:g} ms per message):")
    rates = {c: statistics.median(r for r, _ in runs) for c, runs in results.items()}
    for (kind, delay), runs_ in results.items():
        gaps = [g for _, g in runs_]
        name = f"{'pyzmq' if kind == 'zmq' else kind}, other {'slow' if delay else 'fast'}"
        print(f"  {name:<22} median {rates[(kind, delay)] / 1e3:8.1f} K msg/s   "
              f"longest gap median {statistics.median(gaps) * 1e3:7.2f} ms, "
              f"worst {max(gaps) * 1e3:7.2f} ms")
    slow = args.delay
    print(f"  hintens, other slow / other fast   "
          f"{rates[('hintens', slow)] / rates[('hintens', 0.0)]:5.2f}x   (1.00: it costs nothing)")
    print(f"  pyzmq, other slow / other fast     "
          f"{rates[('zmq', slow)] / rates[('zmq', 0.0)]:5.2f}x")
    print(f"  hintens / pyzmq, other slow        "
          f"{rates[('hintens', slow)] / rates[('zmq', slow)]:5.2f}x")


if __name__ == "__main__":
    main()
