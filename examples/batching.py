"""Batching: many small Events leave in few writes, a block of Events leaves together, and
``request_many`` sends several requests in one write and returns the replies in order.

Run it: ``python examples/batching.py``.
"""

import os
import tempfile
import threading
import time

import hintens

PATH = os.path.join(tempfile.mkdtemp(), "batch.sock")
ticks = []
all_in = threading.Event()


def on_event(payload, connection):
    ticks.append(len(payload))
    if len(ticks) == 100_002:               # the ticks, then "a" and "b"
        all_in.set()


with hintens.Server(PATH, on_event=on_event) as server:
    start = time.perf_counter()
    with hintens.Client(PATH) as client:
        for n in range(100_000):
            client.send_event(b"tick %d" % n)   # batched: many Events per write
        client.flush()                          # or let the 1 ms flush deadline do it

        with client.batch():                    # hold Events, write them together at the end
            client.send_event(b"a")
            client.send_event(b"b")

        replies = client.request_many([b"x", b"y", b"z"])   # one write out, replies in order
        print("request_many:", [bytes(reply) for reply in replies])   # [b'x', b'y', b'z']

        all_in.wait(10)
    seconds = time.perf_counter() - start
    print(f"server received {len(ticks):,} events in {seconds:.2f} s")
