"""Request and response: a server in a background thread, a client, and errors that cross
the wire.

Run it: ``python examples/request_response.py``.
"""

import logging
import os
import sys
import tempfile

import hintens

# The server logs a handler's exception, with its traceback, to the "hintens" logger.
logging.basicConfig(stream=sys.stdout, format="server log: %(levelname)s %(message)s")

PATH = os.path.join(tempfile.mkdtemp(), "demo.sock")   # a fresh socket path for this run


def handler(payload):
    """Gets each Request's payload (a buffer) and returns the Response payload."""
    text = bytes(payload)
    if text == b"divide by zero":
        return b"%d" % (1 // 0)              # any exception reaches the client...
    if text.startswith(b"withdraw"):
        # ...and a RemoteError with a code of 1000 or more keeps its code.
        raise hintens.RemoteError(1001, "insufficient funds")
    return text.upper()


with hintens.Server(PATH, handler) as server:   # `with` starts serving in a background thread
    with hintens.Client(PATH, timeout=5.0) as client:
        reply = client.request(b"hello")
        # A raw reply is always a memoryview: equal to bytes, and `with reply:` releases it.
        with reply:
            print("reply:", bytes(reply))        # reply: b'HELLO'

        try:
            client.request(b"divide by zero")
        except hintens.HandlerError as error:    # the handler raised: code 5, HANDLER_ERROR
            print("handler error:", error.message)

        try:
            client.request(b"withdraw 100")
        except hintens.RemoteError as error:
            print("remote error:", error.code, error.message)   # 1001 insufficient funds

        # The connection stays usable after errors.
        print("still works:", bytes(client.request(b"again")))  # b'AGAIN'
