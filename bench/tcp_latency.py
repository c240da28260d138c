"""hintens over loopback TCP, then over TLS, against a raw floor speaking the same frames,
pyzmq (TCP only) and grpc.aio, each server in its own process, all in one run (numbers are
printed, never asserted).

    python bench/tcp_latency.py [--count 3000] [--rounds 8] [--big-count 3]
                                [--events 300000] [--tls-events N] [--pin none|same|split]

1. 64 B round trips, the peers interleaved round by round (``--rounds`` rounds of ``--count``
   requests each), median and p99 of the per-request latencies:
   * ``hintens``: the sync ``hintens.Client`` to ``hintens serve --listen tcp://...`` (echo);
   * ``hintens spin=False``: the same with ``Client(spin=False)``, whose thread sleeps at
     once while it waits for a reply (over TLS too);
   * ``raw TCP floor``: a Python client that ``sendall``s an encoded Request frame and
     ``recv_into``s until the whole reply frame has arrived, against a Python echo server
     that decodes frames with ``hintens.wire.FrameDecoder`` and answers with
     ``hintens.wire.encode_frame`` Responses (TCP_NODELAY on both sides);
   * ``pyzmq REQ/REP``: over ``tcp://`` (if pyzmq is installed);
   * ``grpc.aio``: a generic unary-unary bytes echo, identity serializers, over TCP (if
     grpcio is installed), sampled one request at a time from one task.
2. 100 B Events per second from one thread (``--events`` a round): hintens
   ``Client.send_event`` then one request that returns the count the server's ``on_event``
   kept (checked against what was sent), against pyzmq PUSH/PULL, where the puller counts
   and answers a final ``done`` on a PUSH back.
3. 64 MiB echo (``--big-count`` of each peer a round, alternating, after one untimed):
   hintens (client and server both with ``max_payload=80 MiB``; over TCP the payload travels
   inline) against a raw floor that ``sendall``s 64 MiB and ``recv_into``s a preallocated
   buffer, with an echo server that does the same. The header says on how many threads the
   compiled CRC of 64 MiB runs here (one under ``--pin same``: a sender's CRC uses the CPUs
   it may run on).

4.-6. The same three over TLS (``ssl_context=`` on the hintens Client and Server; the
   certificates are made at run time by trustme, a CA and a server certificate for
   127.0.0.1, written as PEM files into a temporary directory whose path each server process
   gets on its command line; no client certificates):
   * round trips: hintens (a ``hintens.Server`` with ``ssl_context``, the counting server
     below: the CLI has no TLS option) against the ``raw TLS floor``, the raw TCP floor's
     client and echo server with their sockets wrapped by ``ssl`` (blocking
     ``ssl.SSLSocket``s), and grpc.aio with ``grpc.ssl_channel_credentials`` /
     ``grpc.ssl_server_credentials``; pyzmq has no TLS;
   * Events (``--tls-events`` a round, default ``--events``): hintens against a raw TLS
     client that ``sendall``s each Event frame on its own (a TLS record each) to a Python
     server that counts them; no target, as hintens batches and this client does not;
   * 64 MiB echo: hintens against the raw floor's ``sendall``/``recv_into`` over
     ``ssl.SSLSocket`` on both sides.
   Targets: a round trip <= 1.3x the raw TLS floor, 64 MiB throughput >= 0.8x. Over TLS
   the compiled Channel calls the ``ssl`` module's OpenSSL object for each read and write
   (``TlsStream.tls_parts``), as the raw floor's ``SSLSocket`` does underneath.

Placement matters more than anything else here: on a VM, waking a process on the other core
costs tens of microseconds, so a 64 B round trip takes about 7 us when the client and server
share a core and 60-70 us when they do not. By default (``--pin none``, as the other
benchmarks) the scheduler decides: the interleaved rounds spread drift over every peer, but
a connection may keep one placement for a whole run (the raw TLS floor's round trip came out
at 15 us in one default run and 56 us in another, hintens over TLS at 92 and 105 us);
``--pin same`` runs the client and every server on CPU 0, ``--pin split``
the client on CPU 0 and the servers on CPU 1, to show how much of a ratio is placement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

HOST = "127.0.0.1"
SMALL = 64
EVENT_BYTES = 100
BIG = 64 << 20
BIG_LIMIT = 80 << 20          # max_payload of the hintens client and server for the 64 MiB echo
COUNT_REQUEST = b"count"      # asks the counting hintens server for its Event count
RAW_TLS_EVENTS = "raw TLS, a sendall per Event"
GRPC_METHOD, GRPC_OPTIONS = harness.GRPC_METHOD, harness.GRPC_OPTIONS
_SIZE = struct.Struct("<Q")
#: The server processes pin themselves to the CPUs this variable lists (``--pin``).
CPUS_VARIABLE = "HINTENS_TCP_BENCH_CPUS"
#: The PEM files ``make_certificates`` writes into its directory.
CA_PEM, SERVER_CERT, SERVER_KEY = "ca.pem", "server.pem", "server.key"


# TLS ------------------------------------------------------------------------------------------

def make_certificates() -> str:
    """A fresh trustme CA and a server certificate for 127.0.0.1, written as PEM files into a
    new temporary directory; returns its path (the caller removes it)."""
    import trustme

    directory = tempfile.mkdtemp(prefix="hintens-tls-bench-")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(os.path.join(directory, CA_PEM))
    leaf = ca.issue_cert(HOST, "localhost")
    leaf.private_key_pem.write_to_path(os.path.join(directory, SERVER_KEY))
    for index, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(os.path.join(directory, SERVER_CERT), append=index > 0)
    return directory


def _pem(cert_dir: str, name: str) -> bytes:
    with open(os.path.join(cert_dir, name), "rb") as pem:
        return pem.read()


def server_context(cert_dir: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.path.join(cert_dir, SERVER_CERT),
                            os.path.join(cert_dir, SERVER_KEY))
    return context


def client_context(cert_dir: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(os.path.join(cert_dir, CA_PEM))
    return context


# Processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def spawn_tcp(argv: Sequence[str], port: int, timeout_s: float = 15.0) -> subprocess.Popen:
    """harness.spawn for a TCP server: start it, wait until ``HOST:port`` accepts."""
    process = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr is not None else b""
            raise RuntimeError(f"{argv[:4]} exited with {process.returncode}: "
                               f"{stderr.decode(errors='replace')[-2000:]}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.02)
    harness.stop(process)
    raise RuntimeError(f"{argv[:4]} did not listen on {HOST}:{port} in {timeout_s} s")


def start(kind: str, *ports: int, cert_dir: str | None = None) -> subprocess.Popen:
    """The server for ``kind`` (over TLS with the certificates in ``cert_dir``); ready once
    the last of ``ports`` accepts (a plain TCP connect: a TLS server sees a failed
    handshake)."""
    argv = [sys.executable, os.path.abspath(__file__), "serve", kind,
            *(["--tls", cert_dir] if cert_dir else []), *map(str, ports)]
    return spawn_tcp(argv, ports[-1])


# Servers, each run as `python bench/tcp_latency.py serve KIND [--tls DIR] PORT [PORT]` ---------

def _accept_forever(port: int, serve_one: Callable[[socket.socket], None],
                    context: ssl.SSLContext | None = None) -> None:
    """One connection at a time (the readiness probe is one), TCP_NODELAY on each; with
    ``context``, each wrapped as TLS (a blocking ``ssl.SSLSocket``, handshake on accept)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            try:
                conn = context.wrap_socket(conn, server_side=True)
            except OSError:   # the readiness probe: a plain connect, closed at once
                conn.close()
                continue
        with conn:
            try:
                serve_one(conn)
            except (ConnectionError, ssl.SSLError):
                pass


def serve_raw_frames(port: int, context: ssl.SSLContext | None = None) -> None:
    """The round-trip floor's server: Request frames in, the same payloads out as Responses."""
    from hintens import wire

    request, response, encode = wire.MessageType.REQUEST, wire.MessageType.RESPONSE, \
        wire.encode_frame

    def serve_one(conn: socket.socket) -> None:
        decoder, recv, sendall = wire.FrameDecoder(), conn.recv, conn.sendall
        while True:
            data = recv(1 << 16)
            if not data:
                return
            out = [encode(response, frame.payload, frame.request_id)
                   for frame in decoder.feed(data) if frame.type == request]
            if out:
                sendall(out[0] if len(out) == 1 else b"".join(out))

    _accept_forever(port, serve_one, context)


def serve_raw_counter(port: int, context: ssl.SSLContext | None = None) -> None:
    """The Events floor's server: counts Event frames, answers a ``count`` Request with the
    count (as the hintens counting server does) and echoes any other Request."""
    from hintens import wire

    event, request, response, encode = wire.MessageType.EVENT, wire.MessageType.REQUEST, \
        wire.MessageType.RESPONSE, wire.encode_frame

    def serve_one(conn: socket.socket) -> None:
        decoder, recv, sendall, received = wire.FrameDecoder(), conn.recv, conn.sendall, 0
        while True:
            data = recv(1 << 16)
            if not data:
                return
            for frame in decoder.feed(data):
                if frame.type == event:
                    received += 1
                elif frame.type == request:
                    payload = frame.payload
                    if bytes(payload) == COUNT_REQUEST:
                        payload = b"%d" % received
                    sendall(encode(response, payload, frame.request_id))

    _accept_forever(port, serve_one, context)


def serve_raw_bulk(port: int, context: ssl.SSLContext | None = None) -> None:
    """The 64 MiB floor's server: an 8-byte size, then that many bytes into a preallocated
    buffer (recv_into), echoed with one sendall."""
    buffer = bytearray(BIG_LIMIT)
    view = memoryview(buffer)
    head = memoryview(bytearray(_SIZE.size))

    def serve_one(conn: socket.socket) -> None:
        while True:
            if not _fill(conn, head):   # (an SSLSocket takes no MSG_WAITALL)
                return
            (size,) = _SIZE.unpack(head)
            if not _fill(conn, view[:size]):
                return
            conn.sendall(view[:size])

    _accept_forever(port, serve_one, context)


def _fill(conn: socket.socket, view: memoryview) -> bool:
    got, end, recv_into = 0, len(view), conn.recv_into
    while got < end:
        count = recv_into(view[got:])
        if not count:
            return False
        got += count
    return True


def serve_hintens_counter(port: int, context: ssl.SSLContext | None = None) -> None:
    """A hintens server that counts Events (``on_event``), answers ``count`` with the count
    and echoes every other request; payloads up to BIG_LIMIT; over TLS with ``context``."""
    import hintens

    received = 0

    def on_event(payload: Any, connection: Any) -> None:
        nonlocal received
        received += 1          # one connection: its thread alone calls this

    def handler(payload: Any) -> Any:
        if len(payload) == len(COUNT_REQUEST) and bytes(payload) == COUNT_REQUEST:
            return b"%d" % received
        return payload

    with hintens.Server(f"tcp://{HOST}:{port}", handler, on_event=on_event,
                        max_payload=BIG_LIMIT, ssl_context=context) as server:
        server.serve_forever()


def serve_zmq_rep(port: int) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.REP)
    sock.bind(f"tcp://{HOST}:{port}")
    while True:
        sock.send(sock.recv(copy=False), copy=False)


def serve_zmq_pull(port: int, ack_port: int) -> None:
    """PULL on ``port``, counting; answers each b"done" with the count on a PUSH bound to
    ``ack_port``."""
    import zmq

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(f"tcp://{HOST}:{port}")
    ack = context.socket(zmq.PUSH)
    ack.bind(f"tcp://{HOST}:{ack_port}")
    received = 0
    while True:
        message = pull.recv(copy=False)
        if len(message) == 4 and message.bytes == b"done":
            ack.send(b"%d" % received)
            received = 0
        else:
            received += 1


async def _serve_grpc(port: int, cert_dir: str | None = None) -> None:
    import grpc

    server = harness.grpc_echo_server()
    if cert_dir is None:
        server.add_insecure_port(f"{HOST}:{port}")
    else:
        credentials = grpc.ssl_server_credentials(
            [(_pem(cert_dir, SERVER_KEY), _pem(cert_dir, SERVER_CERT))])
        server.add_secure_port(f"{HOST}:{port}", credentials)
    await server.start()
    await server.wait_for_termination()


def serve(kind: str, ports: list[int], cert_dir: str | None = None) -> None:
    cpus = os.environ.get(CPUS_VARIABLE)
    if cpus:   # before any thread starts
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    context = None if cert_dir is None else server_context(cert_dir)
    if cert_dir is not None and kind not in ("raw-frames", "raw-counter", "raw-bulk",
                                             "hintens-counter", "grpc"):
        raise SystemExit(f"{kind} has no TLS")
    if kind == "hintens":
        # `python -m hintens serve --listen tcp://...`, in this (perhaps pinned) process.
        import runpy

        sys.argv = ["hintens", "serve", "--listen", f"tcp://{HOST}:{ports[0]}"]
        runpy.run_module("hintens", run_name="__main__", alter_sys=True)
    elif kind == "raw-frames":
        serve_raw_frames(ports[0], context)
    elif kind == "raw-counter":
        serve_raw_counter(ports[0], context)
    elif kind == "raw-bulk":
        serve_raw_bulk(ports[0], context)
    elif kind == "hintens-counter":
        serve_hintens_counter(ports[0], context)
    elif kind == "zmq-rep":
        serve_zmq_rep(*ports)
    elif kind == "zmq-pull":
        serve_zmq_pull(*ports)
    elif kind == "grpc":
        asyncio.run(_serve_grpc(ports[0], cert_dir))
    else:
        raise SystemExit(f"unknown kind {kind}")


# Clients --------------------------------------------------------------------------------------

def _connect(port: int, cert_dir: str | None = None) -> socket.socket:
    """A TCP_NODELAY connection; with ``cert_dir``, a blocking ``ssl.SSLSocket`` that
    verifies the server (handshake done)."""
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cert_dir is not None:
        sock = client_context(cert_dir).wrap_socket(sock, server_hostname=HOST)
    return sock


class RawFramesClient:
    """The floor: sendall an encoded Request frame, recv_into until the whole reply frame
    (header, then the length its header gives) is in; ``send_event``: one sendall of an
    encoded Event frame. Over TLS with ``cert_dir``."""

    def __init__(self, port: int, cert_dir: str | None = None) -> None:
        from hintens import wire

        self.wire = wire
        self.sock = _connect(port, cert_dir)
        self.buffer = memoryview(bytearray(1 << 20))
        self.ids = 0

    def send_event(self, payload: bytes) -> None:
        wire = self.wire
        self.sock.sendall(wire.encode_frame(wire.MessageType.EVENT, payload, 0))

    def request(self, payload: bytes) -> memoryview:
        wire, buffer, recv_into = self.wire, self.buffer, self.sock.recv_into
        self.ids += 1
        self.sock.sendall(wire.encode_frame(wire.MessageType.REQUEST, payload, self.ids))
        got, end = 0, wire.HEADER_SIZE
        while got < end:
            count = recv_into(buffer[got:])
            if not count:
                raise ConnectionError("the raw server closed the connection")
            got += count
            if end == wire.HEADER_SIZE and got >= end:
                end += wire.unpack_header(buffer).length
        return buffer[wire.HEADER_SIZE:end]

    def close(self) -> None:
        self.sock.close()


class ZmqReqClient:
    def __init__(self, port: int) -> None:
        import zmq

        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.REQ)
        self.sock.connect(f"tcp://{HOST}:{port}")

    def request(self, payload: bytes) -> Any:
        self.sock.send(payload)
        return self.sock.recv()

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()


class GrpcClient:
    """A grpc.aio channel on its own event loop, kept across rounds; ``sample`` runs one
    round's requests on that loop, one at a time, each timed."""

    def __init__(self, port: int, cert_dir: str | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._connect(port, cert_dir))

    async def _connect(self, port: int, cert_dir: str | None) -> None:
        import grpc
        import grpc.aio

        if cert_dir is None:
            self.channel = grpc.aio.insecure_channel(f"{HOST}:{port}", options=GRPC_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(cert_dir, CA_PEM))
            self.channel = grpc.aio.secure_channel(f"{HOST}:{port}", credentials,
                                                   options=GRPC_OPTIONS)
        self.call = self.channel.unary_unary(GRPC_METHOD, request_serializer=None,
                                             response_deserializer=None)
        await self.channel.channel_ready()

    async def _sample(self, payload: bytes, count: int, warmup: int) -> list[float]:
        call, clock = self.call, time.perf_counter
        for _ in range(warmup):
            await call(payload)
        samples = []
        for _ in range(count):
            started = clock()
            await call(payload)
            samples.append(clock() - started)
        return samples

    def request(self, payload: bytes) -> Any:
        return self.loop.run_until_complete(self.call(payload))

    def sample(self, payload: bytes, count: int, warmup: int) -> list[float]:
        return self.loop.run_until_complete(self._sample(payload, count, warmup))

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# 1. Round trips -------------------------------------------------------------------------------

NO_SPIN = "hintens spin=False"


def measure_round_trips(count: int, rounds: int,
                        cert_dir: str | None = None) -> dict[str, list[float]]:
    """Over TLS with ``cert_dir``: hintens (``hintens.Server`` with ``ssl_context``: the CLI
    has no TLS option), the raw floor over ``ssl.SSLSocket`` and grpc.aio with SSL
    credentials; pyzmq has no TLS."""
    import hintens

    tls = cert_dir is not None
    floor = "raw TLS floor" if tls else "raw TCP floor"
    kinds = ["hintens", NO_SPIN, floor]
    if not tls:   # pyzmq has no TLS
        if _have("zmq"):
            kinds.append("pyzmq REQ/REP")
        else:
            print("pyzmq: not installed (the bench extra); no pyzmq rows")
    if _have("grpc.aio"):
        kinds.append("grpc.aio")
    elif not tls:
        print("grpc.aio: grpcio is not installed (the bench extra); no grpc row")
    server_kinds = {"hintens": "hintens-counter" if tls else "hintens",
                    NO_SPIN: "hintens-counter" if tls else "hintens",
                    floor: "raw-frames",
                    "pyzmq REQ/REP": "zmq-rep", "grpc.aio": "grpc"}
    payload = os.urandom(SMALL)
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    processes: list[subprocess.Popen] = []
    clients: dict[str, Any] = {}
    context = None if cert_dir is None else client_context(cert_dir)
    try:
        for kind in kinds:
            port = free_port()
            processes.append(start(server_kinds[kind], port, cert_dir=cert_dir))
            clients[kind] = (
                hintens.Client(f"tcp://{HOST}:{port}", ssl_context=context)
                if kind == "hintens" else
                hintens.Client(f"tcp://{HOST}:{port}", ssl_context=context, spin=False)
                if kind == NO_SPIN else
                RawFramesClient(port, cert_dir) if kind == floor else
                ZmqReqClient(port) if kind == "pyzmq REQ/REP" else
                GrpcClient(port, cert_dir))
        for kind, peer in clients.items():
            if bytes(peer.request(payload)) != payload:
                raise RuntimeError(f"{kind}: the echo differs from the request")
        for _ in range(rounds):
            for kind, peer in clients.items():
                if kind == "grpc.aio":
                    samples[kind] += peer.sample(payload, count, warmup=50)
                else:
                    samples[kind] += harness.sample(lambda peer=peer: peer.request(payload),
                                                    count, warmup=50)
    finally:
        for peer in clients.values():
            peer.close()
        for process in processes:
            harness.stop(process)
    return samples


def report_round_trips(samples: dict[str, list[float]], count: int, rounds: int,
                       tls: bool = False) -> None:
    medians = {kind: statistics.median(s) for kind, s in samples.items()}
    link, floor = ("TLS", "raw TLS floor") if tls else ("TCP", "raw TCP floor")
    print(f"\n{'4' if tls else '1'}. {SMALL} B round trips over loopback {link}, {rounds} "
          f"rounds x {count} per peer, interleaved (us)")
    for kind, s in samples.items():
        print(f"  {kind:<18} median {medians[kind] * 1e6:8.1f}  "
              f"p99 {harness.percentile(s, 0.99) * 1e6:8.1f}")
    ours = medians["hintens"]
    print(f"  hintens / {floor}   {ours / medians[floor]:5.2f}x   (target <= 1.3x)")
    if NO_SPIN in medians:
        print(f"  {NO_SPIN} / {floor}   {medians[NO_SPIN] / medians[floor]:5.2f}x   "
              f"(the client's thread sleeps at once while it waits)")
    if "pyzmq REQ/REP" in medians:
        print(f"  hintens / pyzmq REQ/REP   {ours / medians['pyzmq REQ/REP']:5.2f}x   "
              f"(target <= 0.5x)")
    if "grpc.aio" in medians:
        print(f"  hintens / grpc.aio        {ours / medians['grpc.aio']:5.2f}x")


# 2. Events ------------------------------------------------------------------------------------

def events_hintens(client: Any, payload: bytes, count: int) -> float:
    """A hintens Client, or a RawFramesClient (the same two calls)."""
    before = int(bytes(client.request(COUNT_REQUEST)))
    send = client.send_event
    started = time.perf_counter()
    for _ in range(count):
        send(payload)
    after = int(bytes(client.request(COUNT_REQUEST)))   # behind every Event on the connection
    elapsed = time.perf_counter() - started
    if after - before != count:
        raise RuntimeError(f"{type(client).__name__}: the server counted {after - before} "
                           f"Events of {count}")
    return elapsed


def events_zmq(push: Any, ack: Any, payload: bytes, count: int) -> float:
    send = push.send
    started = time.perf_counter()
    for _ in range(count):
        send(payload)
    push.send(b"done")
    received = int(ack.recv())
    elapsed = time.perf_counter() - started
    if received != count:
        raise RuntimeError(f"pyzmq: the puller counted {received} messages of {count}")
    return elapsed


def measure_events(count: int, rounds: int,
                   cert_dir: str | None = None) -> dict[str, list[float]]:
    """Over TLS with ``cert_dir``: hintens against a raw TLS client that sends each Event frame
    with its own ``sendall`` (one TLS record each) to a Python server that counts them
    (``raw-counter``); pyzmq has no TLS."""
    import hintens

    payload = os.urandom(EVENT_BYTES)
    rates: dict[str, list[float]] = {"hintens": []}
    processes: list[subprocess.Popen] = []
    runs: dict[str, Callable[[], float]] = {}
    closers: list[Callable[[], Any]] = []
    try:
        port = free_port()
        processes.append(start("hintens-counter", port, cert_dir=cert_dir))
        client = hintens.Client(f"tcp://{HOST}:{port}", timeout=120, ssl_context=None
                                if cert_dir is None else client_context(cert_dir))
        closers.append(client.close)
        runs["hintens"] = lambda: events_hintens(client, payload, count)
        if cert_dir is not None:
            raw_port = free_port()
            processes.append(start("raw-counter", raw_port, cert_dir=cert_dir))
            raw = RawFramesClient(raw_port, cert_dir)
            closers.append(raw.close)
            rates[RAW_TLS_EVENTS] = []
            runs[RAW_TLS_EVENTS] = lambda: events_hintens(raw, payload, count)
        elif _have("zmq"):
            import zmq

            pull_port, ack_port = free_port(), free_port()
            processes.append(start("zmq-pull", pull_port, ack_port))
            context = zmq.Context()
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 0)
            push.connect(f"tcp://{HOST}:{pull_port}")
            ack = context.socket(zmq.PULL)
            ack.connect(f"tcp://{HOST}:{ack_port}")
            closers += [lambda: push.close(linger=0), lambda: ack.close(linger=0),
                        context.term]
            rates["pyzmq PUSH/PULL"] = []
            runs["pyzmq PUSH/PULL"] = lambda: events_zmq(push, ack, payload, count)
        for run in runs.values():   # warm up every path once
            run()
        for _ in range(rounds):
            for name, run in runs.items():
                rates[name].append(count / run())
    finally:
        for close in closers:
            close()
        for process in processes:
            harness.stop(process)
    return rates


def report_events(rates: dict[str, list[float]], count: int, rounds: int,
                  tls: bool = False) -> None:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n{'5' if tls else '2'}. one-way {EVENT_BYTES} B Events over loopback "
          f"{'TLS' if tls else 'TCP'}, one sender thread, {rounds} rounds of {count} (every one "
          f"counted by the receiver)")
    for name, values in rates.items():
        print(f"  {name:<16} median {medians[name] / 1e6:6.3f} M/s   "
              f"min {min(values) / 1e6:6.3f}   max {max(values) / 1e6:6.3f}")
    if RAW_TLS_EVENTS in medians:
        print(f"  hintens / {RAW_TLS_EVENTS} {medians['hintens'] / medians[RAW_TLS_EVENTS]:5.2f}x"
              f"   (no target: the raw client writes a record per Event, hintens batches)")
    if "pyzmq PUSH/PULL" in medians:
        print(f"  hintens / pyzmq PUSH/PULL {medians['hintens'] / medians['pyzmq PUSH/PULL']:5.2f}x"
              f"   (target >= 1.5x)")


# 3. 64 MiB echo -------------------------------------------------------------------------------

def _crc_threads(length: int) -> int:
    """The threads the compiled core's CRC takes for ``length`` bytes here (1 for the twin)."""
    import hintens

    if hintens.implementation != "cython":
        return 1
    from hintens.wire import _wire
    return _wire.crc16_threads(length)


def measure_big(rounds: int, count: int, cert_dir: str | None = None) -> dict[str, list[float]]:
    """``count`` echoes of each a round, alternating. Over TLS with ``cert_dir``: hintens with
    ``ssl_context`` against the raw floor over ``ssl.SSLSocket`` (its ``sendall`` and
    ``recv_into``, on both sides)."""
    import hintens

    floor = "raw TCP floor" if cert_dir is None else "raw TLS floor"
    payload = os.urandom(1 << 20) * (BIG >> 20)
    times: dict[str, list[float]] = {"hintens": [], floor: []}
    processes: list[subprocess.Popen] = []
    client = raw = None
    try:
        hintens_port, raw_port = free_port(), free_port()
        processes.append(start("hintens-counter", hintens_port, cert_dir=cert_dir))
        processes.append(start("raw-bulk", raw_port, cert_dir=cert_dir))
        client = hintens.Client(f"tcp://{HOST}:{hintens_port}", timeout=120,
                                max_payload=BIG_LIMIT, ssl_context=None
                                if cert_dir is None else client_context(cert_dir))
        raw = _connect(raw_port, cert_dir)
        target = memoryview(bytearray(BIG))   # the floor's preallocated receive buffer

        def echo_hintens() -> float:
            started = time.perf_counter()
            reply = client.request(payload)
            elapsed = time.perf_counter() - started
            size = len(reply)
            if isinstance(reply, memoryview):
                reply.release()
            if size != BIG:
                raise RuntimeError(f"hintens: a 64 MiB echo came back with {size} bytes")
            return elapsed

        def echo_raw() -> float:
            started = time.perf_counter()
            raw.sendall(_SIZE.pack(BIG))
            raw.sendall(payload)
            if not _fill(raw, target):
                raise ConnectionError("the raw bulk server closed the connection")
            return time.perf_counter() - started

        if bytes(client.request(payload)) != payload:
            raise RuntimeError("hintens: the 64 MiB echo differs from the request")
        echo_raw()
        if target != payload:
            raise RuntimeError("raw: the 64 MiB echo differs from the request")
        for _ in range(rounds * count):
            times["hintens"].append(echo_hintens())
            times[floor].append(echo_raw())
    finally:
        if client is not None:
            client.close()
        if raw is not None:
            raw.close()
        for process in processes:
            harness.stop(process)
    return times


def report_big(times: dict[str, list[float]], rounds: int, count: int,
               tls: bool = False) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    link, floor = ("TLS", "raw TLS floor") if tls else ("TCP", "raw TCP floor")
    print(f"\n{'6' if tls else '3'}. {BIG >> 20} MiB echo over loopback {link} (inline, no "
          f"shared memory), {rounds} rounds x {count}, interleaved; throughput = payload bytes "
          f"/ round trip; the client's CRC of {BIG >> 20} MiB on {_crc_threads(BIG)} thread(s)")
    for name, values in times.items():
        print(f"  {name:<16} median {medians[name] * 1e3:8.1f} ms  "
              f"min {min(values) * 1e3:8.1f}  max {max(values) * 1e3:8.1f}  "
              f"{BIG / medians[name] / (1 << 30):5.2f} GiB/s")
    ratio = medians[floor] / medians["hintens"]
    print(f"  hintens / {floor} throughput {ratio:5.2f}x   (target >= 0.8x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000,
                        help="64 B round trips per peer and round")
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds of each section")
    parser.add_argument("--big-count", type=int, default=3,
                        help="64 MiB echoes of each peer a round")
    parser.add_argument("--events", type=int, default=300_000, help="Events a round")
    parser.add_argument("--tls-events", type=int, default=None,
                        help="Events a round over TLS (default: --events)")
    parser.add_argument("--pin", choices=("none", "same", "split"), default="none",
                        help="none: leave placement to the scheduler; same: client and servers "
                             "all on CPU 0; split: client on CPU 0, servers on CPU 1")
    args = parser.parse_args()
    if args.pin != "none":   # before this process starts any thread (zmq, grpc, hintens)
        os.sched_setaffinity(0, {0})
        os.environ[CPUS_VARIABLE] = "0" if args.pin == "same" else "1"
    print(f"placement: --pin {args.pin}" + {
        "none": " (the scheduler's)", "same": " (client and servers on CPU 0)",
        "split": " (client on CPU 0, servers on CPU 1)"}[args.pin])
    report_round_trips(measure_round_trips(args.count, args.rounds), args.count, args.rounds)
    report_events(measure_events(args.events, args.rounds), args.events, args.rounds)
    report_big(measure_big(args.rounds, args.big_count), args.rounds, args.big_count)
    if args.tls_events is None:
        args.tls_events = args.events
    cert_dir = make_certificates()
    try:
        print(f"\nTLS ({ssl.OPENSSL_VERSION}; certificates made now by trustme, the server's "
              f"for {HOST}; no client certificates)")
        report_round_trips(measure_round_trips(args.count, args.rounds, cert_dir),
                           args.count, args.rounds, tls=True)
        report_events(measure_events(args.tls_events, args.rounds, cert_dir), args.tls_events,
                      args.rounds, tls=True)
        report_big(measure_big(args.rounds, args.big_count, cert_dir), args.rounds,
                   args.big_count, tls=True)
    finally:
        shutil.rmtree(cert_dir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "serve":
        rest = sys.argv[3:]
        tls_dir = None
        if rest[0] == "--tls":
            tls_dir, rest = rest[1], rest[2:]
        serve(sys.argv[2], [int(port) for port in rest], tls_dir)
    else:
        main()
