"""`hintens bench`: a quick side-by-side of hintens and the floors a user would otherwise reach
for, each an echo server in its own process on a Unix socket, and a client here:

* ``raw``: the stdlib floor, a length-prefixed ping-pong over a plain socket (``_demo``);
* ``multiprocessing``: ``multiprocessing.connection`` Listener/Client over AF_UNIX;
* ``pyzmq``: REQ/REP over ``ipc://``, when pyzmq is installed;
* ``hintens``: ``hintens serve`` with its default echo handler.

It measures 64-byte round trips and 1 MiB echoes with the peers interleaved round by round, so
that drift hits all of them alike, and prints medians and ratios to the raw floor. It is a
quick check, not the benchmark suite: ``bench/`` (not shipped) measures more, with these same
peers (``bench/rpc_peers.py`` takes them from here).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from . import _impl
from ._demo import RawClient, raw_echo_server, sample, spawn, stop

KINDS = ("raw", "multiprocessing", "pyzmq", "hintens")
LABELS = {"hintens": "hintens", "raw": "raw socket (stdlib)",
          "multiprocessing": "multiprocessing.connection", "pyzmq": "pyzmq REQ/REP"}

SMALL_BYTES = 64
LARGE_BYTES = 1 << 20
#: Round trips per peer in each interleaved round, 64 B and 1 MiB.
SMALL_BATCH, LARGE_BATCH = 200, 4
#: Without --count, measuring takes about this long (start-up not included); 64 B round
#: trips take this share of it, 1 MiB echoes the rest.
DEFAULT_SECONDS = 2.0
SMALL_SHARE = 0.6
#: With --count N (64 B round trips per peer), each peer does N // LARGE_PER_SMALL 1 MiB
#: echoes, at least LARGE_BATCH.
LARGE_PER_SMALL = 50


# The peers ----------------------------------------------------------------------------------

def serve(kind: str, path: str) -> None:
    """Run the echo server of ``kind`` (not hintens) on the Unix socket ``path``, forever."""
    if kind == "raw":
        raw_echo_server(path)
    elif kind == "multiprocessing":
        from multiprocessing.connection import Listener

        with Listener(path, family="AF_UNIX") as listener:
            while True:   # the first connection is spawn()'s readiness probe
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


def start(kind: str, path: str) -> Any:
    """Start the server process of ``kind``; it accepts connections on ``path`` on return."""
    if kind == "hintens":
        argv = [sys.executable, "-m", "hintens", "serve", "--socket", path]
    else:
        argv = [sys.executable, "-m", "hintens._quickbench", "serve", kind, path]
    return spawn(argv, path)


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
    """A client of the ``kind`` server at ``path``, with ``request(payload)`` and ``close()``."""
    if kind == "raw":
        return RawClient(path)
    if kind == "multiprocessing":
        return _MpClient(path)
    if kind == "pyzmq":
        return _ZmqClient(path)
    from .sync.client import Client

    return Client(path)


def available_kinds() -> list[str]:
    """The kinds this interpreter can run, hintens first: all but pyzmq when it is not
    installed."""
    try:
        with_zmq = importlib.util.find_spec("zmq") is not None
    except ValueError:   # sys.modules["zmq"] is None: blocked on purpose
        with_zmq = False
    kinds = ["hintens"] + [kind for kind in KINDS if kind != "hintens"]
    return [kind for kind in kinds if kind != "pyzmq" or with_zmq]


# Measuring ----------------------------------------------------------------------------------

class Row(NamedTuple):
    """One peer's results: the median 64 B round trip (seconds) and 1 MiB echo rate (B/s,
    the payload counted both ways)."""
    kind: str
    small_median_s: float
    large_bytes_per_s: float


def _interleaved(clients: dict[str, Any], payload: bytes, batch: int,
                 more: Callable[[int], bool]) -> dict[str, list[float]]:
    """Round trips of ``payload``, ``batch`` per peer and round, rounds while ``more(done)``
    (at least one)."""
    samples: dict[str, list[float]] = {kind: [] for kind in clients}
    rounds = 0
    while True:
        for kind, peer in clients.items():
            samples[kind] += sample(functools.partial(peer.request, payload), batch, warmup=2)
        rounds += 1
        if not more(rounds):
            return samples


def _until(seconds: float, batch: int, count: int | None) -> Callable[[int], bool]:
    """``more`` for ``_interleaved``: rounds up to ``count`` round trips per peer, or else
    until ``seconds`` have gone."""
    if count is not None:
        return lambda rounds: rounds * batch < count
    deadline = time.monotonic() + seconds
    return lambda rounds: time.monotonic() < deadline


def measure(kinds: Sequence[str], count: int | None = None,
            seconds: float = DEFAULT_SECONDS) -> list[Row]:
    """Start a server of each kind, measure them interleaved, stop them.

    Args:
        kinds: which peers, from ``KINDS``.
        count: 64 B round trips per peer (and ``count // LARGE_PER_SMALL`` 1 MiB echoes);
            None: measure for about ``seconds`` instead.
        seconds: the time budget without ``count``.

    Returns:
        One row per kind, in the order given.

    Raises:
        RuntimeError: a server process did not start, or a peer echoed wrong bytes.
    """
    small, large = os.urandom(SMALL_BYTES), os.urandom(LARGE_BYTES)
    with tempfile.TemporaryDirectory(prefix="hintens-bench-") as directory, \
            _peers(kinds, directory) as clients:
        for kind, peer in clients.items():
            for payload in (small, large):
                if bytes(peer.request(payload)) != payload:
                    raise RuntimeError(f"{LABELS[kind]} echoed different bytes")
        small_samples = _interleaved(clients, small, SMALL_BATCH,
                                     _until(seconds * SMALL_SHARE, SMALL_BATCH, count))
        large_count = None if count is None else max(LARGE_BATCH, count // LARGE_PER_SMALL)
        large_samples = _interleaved(clients, large, LARGE_BATCH,
                                     _until(seconds * (1 - SMALL_SHARE), LARGE_BATCH,
                                            large_count))
    return [Row(kind, statistics.median(small_samples[kind]),
                2 * LARGE_BYTES / statistics.median(large_samples[kind])) for kind in kinds]


@contextlib.contextmanager
def _peers(kinds: Sequence[str], directory: str) -> Iterator[dict[str, Any]]:
    """Server processes and connected clients for ``kinds``, closed and stopped on exit."""
    servers: list[Any] = []
    clients: dict[str, Any] = {}
    try:
        for kind in kinds:
            path = os.path.join(directory, f"{kind}.sock")
            servers.append(start(kind, path))
            clients[kind] = client(kind, path)
        yield clients
    finally:
        for peer in clients.values():
            peer.close()
        for server in servers:
            stop(server)


# Output -------------------------------------------------------------------------------------

def table(rows: Sequence[Row]) -> Iterator[str]:
    """The results as lines of text: one row per peer, ratios to the raw floor."""
    floor = {row.kind: row for row in rows}["raw"]
    yield (f"{'peer':<28} {'64 B round trip':>15} {'vs raw':>7}   "
           f"{'1 MiB echo':>11} {'vs raw':>7}")
    for row in rows:
        yield (f"{LABELS[row.kind]:<28} {row.small_median_s * 1e6:>12.1f} us "
               f"{row.small_median_s / floor.small_median_s:>6.2f}x   "
               f"{row.large_bytes_per_s / 1e6:>7.0f} MB/s "
               f"{row.large_bytes_per_s / floor.large_bytes_per_s:>6.2f}x")
    yield ("64 B: median round trip, lower is better; 1 MiB: echoes per second x 2 MiB "
           "(both ways), higher is better.")


def plot(rows: Sequence[Row], path: str) -> None:
    """Draw the results as two bar charts into the image file ``path`` (matplotlib).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")   # no display needed
    from matplotlib import pyplot

    labels = [LABELS[row.kind] for row in rows]
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    left.barh(labels, [row.small_median_s * 1e6 for row in rows], color="tab:blue")
    left.set_xlabel("64 B round trip, median (µs); lower is better")
    right.barh(labels, [row.large_bytes_per_s / 1e6 for row in rows], color="tab:green")
    right.set_xlabel("1 MiB echo (MB/s, both ways); higher is better")
    right.set_yticklabels([])
    for axes in (left, right):
        axes.invert_yaxis()   # the first row on top, as in the table
    figure.suptitle("hintens bench: each server in its own process, Unix sockets")
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def run(write: Callable[[str], Any], count: int | None = None,
        seconds: float = DEFAULT_SECONDS, plot_path: str | None = None) -> None:
    """Measure the peers installed (as ``measure``), write the table line by line through
    ``write``, and draw it into ``plot_path`` if given (as ``plot``)."""
    kinds = available_kinds()
    write(f"hintens bench ({_impl.implementation} core): "
          f"{', '.join(LABELS[kind] for kind in kinds)}; each server in its own process, "
          "peers interleaved")
    if "pyzmq" not in kinds:
        write("(pyzmq is not installed: no pyzmq row)")
    rows = measure(kinds, count, seconds)
    for line in table(rows):
        write(line)
    if plot_path:
        plot(rows, plot_path)
        write(f"plot written to {plot_path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
