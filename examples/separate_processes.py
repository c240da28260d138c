"""Two processes: ``hintens serve`` runs as a process of its own (an echo server), and this
one talks to it, as separate programs on one machine do.

Run it: ``python examples/separate_processes.py``.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

import hintens

PATH = os.path.join(tempfile.mkdtemp(), "demo.sock")

# The same as running `hintens serve --socket PATH` in another terminal.
server = subprocess.Popen([sys.executable, "-m", "hintens", "serve", "--socket", PATH],
                          stderr=subprocess.DEVNULL)
try:
    deadline = time.monotonic() + 10
    while True:                                     # wait until the server is listening
        try:
            client = hintens.Client(PATH, timeout=5.0)
            break
        except hintens.ConnectError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.02)
    with client:
        print(bytes(client.request(b"hello from pid %d" % os.getpid())))
        # SO_PEERCRED: the server's pid and uid, checked before anything was sent.
        pid = client.server_credentials.pid
        print(f"served by pid {pid}, the subprocess: {pid == server.pid}")
finally:
    server.send_signal(signal.SIGTERM)              # it removes its socket file and exits
    print("server exit code:", server.wait(10))
