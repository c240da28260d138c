"""Small messages through the shared-memory ring: the server and the client each ask for
it, and the connection's frames then travel through shared memory instead of the socket
(docs/PROTOCOL.md section 9b). The server runs in its own process, as it would in a service.

Run it: ``python examples/ring.py``.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

import hintens



def wait_until_listening(path, server, timeout_s=10.0):
    """Until the server accepts connections: its socket file appears a moment before."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.02)
        finally:
            probe.close()


DIR = tempfile.mkdtemp()
PATH = os.path.join(DIR, "ring.sock")
# An echo server in its own process: ``hintens serve --ring``.
server = subprocess.Popen([sys.executable, "-m", "hintens", "serve", "--ring", "-q",
                           "--socket", PATH])
try:
    wait_until_listening(PATH, server)
    with hintens.Client(PATH, ring=True) as client:   # ring=True on both sides
        assert bytes(client.request(b"ping")) == b"ping"
        started, count = time.perf_counter(), 20_000
        for _ in range(count):
            client.request(b"x" * 64)
        elapsed = time.perf_counter() - started
        print(f"ring negotiated: {client.ring_active}")
        print(f"64 B round trip: {elapsed / count * 1e6:.1f} us on average")
finally:
    server.terminate()
    server.wait()
