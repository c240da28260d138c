"""Zero-copy sends with ``allocate()``: write a message straight into a shared-memory
segment, send it, and only a 32-byte descriptor travels on the socket. (A handler can reply
the same way: ``server.allocate(n)``, filled, then returned.)

Run it: ``python examples/allocate.py``.
"""

import hashlib
import os
import tempfile

import hintens

DIR = tempfile.mkdtemp()
PATH = os.path.join(DIR, "allocate.sock")
SIZE = 16 << 20                            # 16 MiB


def handler(payload):
    """Answer a file's bytes (a view of the client's segment) with their SHA-256."""
    return hashlib.sha256(payload).digest()


# A file to send, made up for the example.
file_path = os.path.join(DIR, "data.bin")
with open(file_path, "wb") as f:
    f.write(os.urandom(SIZE))

with hintens.Server(PATH, handler):
    with hintens.Client(PATH) as client:
        buffer = client.allocate(SIZE)      # a writable buffer inside a shared segment
        with open(file_path, "rb") as f:
            f.readinto(buffer)              # the file's bytes land in shared memory...
        reply = client.request(buffer)      # ...and only a descriptor is sent
        # The buffer belongs to the server now: allocate a new one for the next message.
        with open(file_path, "rb") as f:
            expected = hashlib.sha256(f.read()).digest()
        print("server's sha256:", bytes(reply).hex())
        print("matches:", reply == expected)

        spare = client.allocate(1 << 20)
        spare.release()                     # dropped without being sent: back to the pool
