"""Large-message echo round trips across two processes: hintens (shared memory) against
multiprocessing.connection, pyzmq with copy=False, multiprocessing.shared_memory with a new
segment per message, and iceoryx2 request-response (a copy each way, like hintens's copying
path; its Python API polls); plus one plain memcpy of the same size, the target's yardstick.

    python bench/shm_latency.py [--sizes 1,16,64,256] [--rounds 5]

Each peer echoes; a round trip ends when the client holds the reply readable. Peers are
interleaved round by round. Prints medians in ms, GB/s (both directions) and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rpc_peers  # noqa: E402

import harness  # noqa: E402

MIB = 1 << 20
KINDS = ("hintens", "multiprocessing", "pyzmq", "mp_shared_memory", "iceoryx2")
#: iceoryx2 slices are sized up front: the largest message the run may send.
ICEORYX2_MAX_BYTES = 256 * MIB


def _iceoryx2_service(name: str):
    import ctypes

    import iceoryx2 as iox

    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    service = (node.service_builder(iox.ServiceName.new(name))
               .request_response(iox.Slice[ctypes.c_uint8], iox.Slice[ctypes.c_uint8])
               .open_or_create())
    return iox, node, service


def _serve_iceoryx2(name: str) -> None:
    """Echo over iceoryx2 request-response: one copy into a loaned response slice."""
    iox, node, service = _iceoryx2_service(name)
    server = service.server_builder().initial_max_slice_len(ICEORYX2_MAX_BYTES).create()
    print("ready", flush=True)
    while True:
        active = server.receive()
        if active is None:
            # iceoryx2's Python API is pull-based. Spinning would take a whole core from the
            # other peers on a small machine, so idle polls sleep 50 us (added to its latency).
            time.sleep(50e-6)
            continue
        request = active.payload().as_memory_view().cast("B")   # ctypes says "<B"
        response = active.loan_slice_uninit(len(request))
        response.payload().as_memory_view().cast("B")[:] = request
        response.assume_init().send()
        del request, active


class _Iceoryx2Client:
    """Loan a request slice, copy the payload in (one copy), send, poll for the response and
    read it in place (the same shape as hintens's copying path)."""

    def __init__(self, name: str) -> None:
        _, self.node, service = _iceoryx2_service(name)
        self.client = service.client_builder().initial_max_slice_len(ICEORYX2_MAX_BYTES).create()

    def request(self, payload: np.ndarray) -> memoryview:
        request = self.client.loan_slice_uninit(payload.nbytes)
        request.payload().as_memory_view().cast("B")[:] = memoryview(payload).cast("B")
        pending = request.assume_init().send()
        while True:
            response = pending.receive()
            if response is not None:
                return response.payload().as_memory_view().cast("B")

    def close(self) -> None:
        self.client = None


def serve(kind: str, path: str) -> None:
    if kind == "iceoryx2":
        _serve_iceoryx2(path)
    elif kind == "hintens_allocate":
        import hintens

        holder = {}

        def handler(payload):           # the reply is written in place, never copied
            return holder["server"].allocate(len(payload))

        holder["server"] = hintens.Server(path, handler)
        holder["server"].serve_forever()
    elif kind == "pyzmq":
        import zmq

        sock = zmq.Context().socket(zmq.REP)
        sock.bind("ipc://" + path)
        while True:
            sock.send(sock.recv(copy=False), copy=False)
    elif kind == "mp_shared_memory":
        from multiprocessing.connection import Listener
        from multiprocessing.shared_memory import SharedMemory

        with Listener(path, family="AF_UNIX") as listener:
            while True:                # the first connection is spawn()'s readiness probe
                with listener.accept() as conn:
                    try:
                        while True:
                            name, size = conn.recv()
                            request = SharedMemory(name)
                            reply = SharedMemory(create=True, size=size)
                            reply.buf[:size] = request.buf[:size]
                            request.close()
                            conn.send((reply.name, size))
                            reply.close()          # the client unlinks it
                    except EOFError:
                        pass
    else:
        rpc_peers.serve(kind, path)


class _ShmClient:
    def __init__(self, path: str) -> None:
        from multiprocessing.connection import Client

        self.conn = Client(path, family="AF_UNIX")

    def request(self, payload: np.ndarray) -> memoryview:
        from multiprocessing.shared_memory import SharedMemory

        request = SharedMemory(create=True, size=payload.nbytes)
        request.buf[:payload.nbytes] = memoryview(payload).cast("B")
        self.conn.send((request.name, payload.nbytes))
        name, size = self.conn.recv()
        request.close()
        request.unlink()
        reply = SharedMemory(name)
        view = bytes(reply.buf[:16])      # readable; a reply is held only this long
        reply.close()
        reply.unlink()
        return memoryview(view)

    def close(self) -> None:
        self.conn.close()


class _ZmqCopyFree:
    def __init__(self, path: str) -> None:
        import zmq

        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.REQ)
        self.sock.connect("ipc://" + path)

    def request(self, payload: np.ndarray) -> memoryview:
        self.sock.send(payload, copy=False)
        return self.sock.recv(copy=False).buffer

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()


def allocate_ratio(rounds: int) -> None:
    """Round trips with allocate() on both sides: does the cost stay flat as size grows?"""
    import hintens

    with tempfile.TemporaryDirectory(prefix="hintens-alloc-bench-") as directory:
        path = os.path.join(directory, "alloc.sock")
        server = start("hintens_allocate", path)
        try:
            with hintens.Client(path, timeout=120) as peer:
                times: dict[int, list[float]] = {64 * 1024: [], 64 * MIB: []}
                for _ in range(3):              # warm-up: both pools reach their sizes
                    for size in times:
                        peer.request(peer.allocate(size)).release()
                for _ in range(rounds * 4):
                    for size in times:
                        start_s = time.perf_counter()
                        peer.request(peer.allocate(size)).release()
                        times[size].append(time.perf_counter() - start_s)
        finally:
            harness.stop(server)
    small, large = (statistics.median(times[n]) for n in (64 * 1024, 64 * MIB))
    print(f"\nallocate() on both sides: 64 KiB {small * 1e3:.3f} ms, 64 MiB {large * 1e3:.3f} ms"
          f" -> {large / small:.2f}x (target <= 3x)")


def start(kind: str, path: str):
    if kind == "hintens":
        return rpc_peers.start(kind, path)
    if kind == "iceoryx2":             # no socket file: wait for the server's "ready" line
        import subprocess

        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", kind,
                                    _iceoryx2_name(path)], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
        if process.stdout is None or process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the iceoryx2 server did not start")
        return process
    return harness.spawn([sys.executable, os.path.abspath(__file__), "serve", kind, path], path)


def _iceoryx2_name(path: str) -> str:
    return "hintens-bench/" + os.path.basename(os.path.dirname(path))


def client(kind: str, path: str):
    if kind == "iceoryx2":
        return _Iceoryx2Client(_iceoryx2_name(path))
    if kind == "pyzmq":
        return _ZmqCopyFree(path)
    if kind == "mp_shared_memory":
        return _ShmClient(path)
    if kind == "hintens":
        import hintens

        return hintens.Client(path, timeout=120)
    return rpc_peers.client(kind, path)


def round_trip(peer, payload: np.ndarray) -> None:
    reply = peer.request(payload)
    if isinstance(reply, memoryview):
        reply.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,64,256", help="MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) * MIB for s in args.sizes.split(",")]
    results: dict[int, dict[str, list[float]]] = {n: {k: [] for k in KINDS} for n in sizes}
    memcpy: dict[int, list[float]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory(prefix="hintens-shm-bench-") as directory:
        servers, peers = [], {}
        try:
            for kind in KINDS:
                path = os.path.join(directory, f"{kind}.sock")
                servers.append(start(kind, path))
                peers[kind] = client(kind, path)
            for size in sizes:
                payload = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8)
                target = np.empty_like(payload)
                for kind, peer in peers.items():       # warm-up: pools, page faults
                    for _ in range(2):
                        round_trip(peer, payload)
                for _ in range(args.rounds):
                    start_s = time.perf_counter()
                    np.copyto(target, payload)
                    memcpy[size].append(time.perf_counter() - start_s)
                    for kind, peer in peers.items():
                        start_s = time.perf_counter()
                        round_trip(peer, payload)
                        results[size][kind].append(time.perf_counter() - start_s)
        finally:
            for peer in peers.values():
                peer.close()
            for server in servers:
                harness.stop(server)
    print(f"echo round trips, {args.rounds} rounds after warm-up, medians")
    for size in sizes:
        copy = statistics.median(memcpy[size])
        print(f"\n{size // MIB} MiB   (one plain memcpy: {copy * 1e3:.2f} ms)")
        medians = {kind: statistics.median(s) for kind, s in results[size].items()}
        for kind, median in medians.items():
            print(f"  {kind:<18} {median * 1e3:9.2f} ms  {2 * size / median / 1e9:6.2f} GB/s  "
                  f"{median / copy:6.1f}x memcpy")
        ours = medians["hintens"]
        print(f"  hintens vs multiprocessing.connection: {medians['multiprocessing'] / ours:.1f}x "
              f"faster (target >= 20x);  vs pyzmq copy=False: {medians['pyzmq'] / ours:.1f}x")
    allocate_ratio(args.rounds)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
    else:
        main()
