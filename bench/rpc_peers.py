"""Request/response peers for the round-trip benchmarks, each an echo server plus a client.

Run a server with ``python bench/rpc_peers.py serve KIND PATH``. Kinds:

* ``raw``: the stdlib floor, a length-prefixed ping-pong over a Unix socket;
* ``multiprocessing``: ``multiprocessing.connection`` Listener/Client over AF_UNIX;
* ``pyzmq``: REQ/REP over ``ipc://``;
* ``hintens``: ``hintens serve`` with its default echo handler.

They live in ``hintens._quickbench``, which `hintens bench` runs on, so that the quick check
and the benchmarks measure the same peers; this module keeps the benchmarks' names for them.
"""

from __future__ import annotations

import sys

from hintens._quickbench import KINDS, client, serve, start

__all__ = ["KINDS", "client", "serve", "start"]

if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
