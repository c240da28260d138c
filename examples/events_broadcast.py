"""Events: one-way messages with no reply, from a client to the server, and pushed from the
server to every connected client (``broadcast``) or to one (``ServerConnection.send_event``).

Run it: ``python examples/events_broadcast.py``.
"""

import os
import tempfile
import threading

import hintens

PATH = os.path.join(tempfile.mkdtemp(), "events.sock")
received = {"alice": [], "bob": []}
all_in = threading.Event()                  # set once both clients saw every Event
logged = threading.Event()
connected = threading.Semaphore(0)


def on_connect(connection):
    """Called once a client's connection is served (and listed in server.connections)."""
    print("server: connection", connection.id, "from pid", connection.peer.pid)
    connected.release()


def on_event(payload, connection):
    """The server's Event handler: called with each Event a client sends, no reply."""
    print("server got event:", bytes(payload))
    logged.set()


def subscriber(name):
    """Each client's on_event is called with the payload of each Event the server pushes."""
    def on_event(payload):
        received[name].append(bytes(payload))   # copy: the payload is only lent to us
        if all(len(events) == 3 for events in received.values()):
            all_in.set()
    return on_event


with hintens.Server(PATH, on_event=on_event, on_connect=on_connect) as server:
    with hintens.Client(PATH, on_event=subscriber("alice")) as alice, \
            hintens.Client(PATH, on_event=subscriber("bob")) as bob:
        for _ in range(2):
            connected.acquire(timeout=5)         # a broadcast reaches the connections served
        alice.send_event(b"alice logged in")    # fire and forget: returns at once
        alice.flush()                            # write it now, not at the 1 ms deadline
        logged.wait(5)

        for n in range(2):
            # Queued per client, never waiting for any of them.
            count = server.broadcast(b"price update %d" % n)
            print("broadcast queued for", count, "clients")
        # One client only: the connections, with their peer credentials, are listed.
        for connection in server.connections:
            connection.send_event(b"just for connection %d" % connection.id)

        all_in.wait(5)
        for name, events in received.items():
            print(name, "received", events)
