"""A ClientPool with retries and exactly-once: a request whose answer was lost is retried,
and the server answers the retry from its replay window instead of running it twice. Then
the server restarts, and the pool reconnects by itself.

Run it: ``python examples/pool_retries.py``.
"""

import logging
import os
import sys
import tempfile

import hintens

# The pool logs each retry (INFO) to the "hintens" logger.
logging.basicConfig(stream=sys.stdout, format="log: %(message)s")
logging.getLogger("hintens").setLevel(logging.INFO)

PATH = os.path.join(tempfile.mkdtemp(), "pool.sock")
charges = []                                # what the server really did


def handler(payload):
    request = bytes(payload)
    if request.startswith(b"charge"):
        charges.append(request)
        if len(charges) == 1:
            # Lose the answer: the connection drops after the charge ran, before the reply
            # left, as when a network or a process fails at the worst moment.
            server.current_connection().close()
        return b"charged"
    return b"balance: 58"


server = hintens.Server(PATH, handler).start()
pool = hintens.ClientPool(PATH, size=4,
                          retry=hintens.RetryPolicy(max_attempts=5, backoff=0.05),
                          exactly_once=True)
print(bytes(pool.request(b"charge card 42")))   # safe to retry: never runs twice
print(bytes(pool.request(b"read balance", idempotent=True, timeout=2.0)))
print("the card was charged", len(charges), "time(s)")   # 1, though the request went twice

server.close()                              # the server goes away...
server = hintens.Server(PATH, handler).start()   # ...and a new one takes its place
print(bytes(pool.request(b"read balance", idempotent=True)))   # a fresh connection
pool.close()                                # lets requests in flight finish
server.close()
