"""Compression: with ``compress=True`` on both sides, inline payloads of 4 KiB or more travel
zstd-compressed when that makes them smaller. It pays across machines (TCP), where payloads
travel inline; a relay between client and server counts the bytes on the wire.

Run it: ``python examples/compression.py``.
"""
# needs: zstandard

import json
import socket
import threading

import hintens

# 1 MB of JSON records: repetitive, as real data often is.
records = [{"id": n, "status": "ok", "region": "eu-west-1", "latency_ms": n % 17}
           for n in range(14_000)]
payload = json.dumps(records).encode()


class CountingRelay:
    """Forwards TCP connections to ``target`` and counts the bytes that pass through."""

    def __init__(self, target):
        self.target = target
        self.bytes = 0
        self._lock = threading.Lock()       # two pumps per connection add to the count
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink):
        while data := source.recv(1 << 16):
            with self._lock:
                self.bytes += len(data)
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)


with hintens.Server("tcp://127.0.0.1:0", compress=True) as server:   # an echo server
    host, port = server.addresses[0][len("tcp://"):].rsplit(":", 1)
    for compress in (False, True):
        relay = CountingRelay((host, int(port)))
        with hintens.Client(relay.address, compress=compress) as client:
            client.wait_for_hello(5)         # compression is agreed in the hello
            assert client.request(payload) == payload
        print(f"compress={compress}: {len(payload):,} bytes each way, "
              f"{relay.bytes:,} bytes on the wire in all")
