"""Request/response peers for the round-trip benchmarks, each an echo server plus a client.

Run a server with ``python bench/rpc_peers.py serve KIND PATH``. Kinds:

* ``raw``: the stdlib floor, a length-prefixed ping-pong over a Unix socket;
* ``multiprocessing``: ``multiprocessing.connection`` Listener/Client over AF_UNIX;
* ``pyzmq``: REQ/REP over ``ipc://``;
* ``hintens``: ``hintens serve`` with its default echo handler.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import harness

KINDS = ("raw", "multiprocessing", "pyzmq", "hintens")


def serve(kind: str, path: str) -> None:
    if kind == "raw":
        harness.raw_echo_server(path)
    elif kind == "multiprocessing":
        from multiprocessing.connection import Listener

        with Listener(path, family="AF_UNIX") as listener:
            while True:
                with listener.accept() as conn:
                    try:
                        while True:
                            conn.send_bytes(conn.recv_bytes())
                    except EOFError:
                        pass
    elif kind == "pyzmq":
        import zmq

        sock = zmq.Context().socket(zmq.REP)
        sock.bind("ipc://" + path)
        while True:
            sock.send(sock.recv(copy=False), copy=False)
    else:
        raise SystemExit(f"unknown kind {kind}")


def start(kind: str, path: str):
    """Start the server process for ``kind`` listening on ``path``."""
    if kind == "hintens":
        argv = [sys.executable, "-m", "hintens", "serve", "--socket", path]
    else:
        argv = [sys.executable, os.path.abspath(__file__), "serve", kind, path]
    return harness.spawn(argv, path)


class _MpClient:
    def __init__(self, path: str) -> None:
        from multiprocessing.connection import Client

        self.conn = Client(path, family="AF_UNIX")

    def request(self, payload: bytes) -> Any:
        self.conn.send_bytes(payload)
        return self.conn.recv_bytes()

    def close(self) -> None:
        self.conn.close()


class _ZmqClient:
    def __init__(self, path: str) -> None:
        import zmq

        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.REQ)
        self.sock.connect("ipc://" + path)

    def request(self, payload: bytes) -> Any:
        self.sock.send(payload)
        return self.sock.recv()

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()


def client(kind: str, path: str) -> Any:
    """A connected client with ``request(payload)`` and ``close()``."""
    if kind == "raw":
        return harness.RawClient(path)
    if kind == "multiprocessing":
        return _MpClient(path)
    if kind == "pyzmq":
        return _ZmqClient(path)
    import hintens

    return hintens.Client(path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
