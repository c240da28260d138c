"""Large messages through shared memory, with numpy: a 64 MB array goes to the server in
one copy, and the reply is a read-only view of the shared pages, not a copy.

Run it: ``python examples/shm_numpy.py``.
"""
# needs: numpy

import os
import tempfile
import time

import numpy as np

import hintens

PATH = os.path.join(tempfile.mkdtemp(), "shm.sock")


def echo(payload):
    # The handler is lent a view of the client's segment; returning it replies by pointing
    # back into that segment, so nothing is copied on the way back either.
    return payload


with hintens.Server(PATH, echo) as server:
    with hintens.Client(PATH) as client:
        start = time.perf_counter()
        reply = client.request(np.arange(8_000_000, dtype=np.float64))   # 64 MB: one copy in
        with reply:                                     # a read-only memoryview of the mapping
            values = np.frombuffer(reply, dtype=np.float64)   # a view, not a copy
            total = values.sum()
            del values                                  # drop arrays before the view is released
        # leaving the block releases the view, and the segment goes back to the server
        seconds = time.perf_counter() - start
        print(f"sum {total:.0f}, a 64 MB round trip in {seconds * 1000:.0f} ms")
        if hintens.implementation == "cython":
            print("cython core: the reply was a view of the shared segment, no copy")
        else:   # the pure-Python core cannot see when a view is released
            print("python core: the shared payload was copied into bytes on arrival")
