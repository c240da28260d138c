"""The shared-memory ring (docs/PROTOCOL.md section 9b) between real processes: negotiation,
traffic of every shape through it, timeouts, ends (close, SIGKILL either side), and idle CPU.
The suite's ring pass (HINTENS_TEST_RING=1, tests/conftest.py) runs the socket tests of
several modules again with the ring on; hostile peers are in tests/test_ring_hostile.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import hintens
import hintens.aio
from hintens import _impl
from hintens.protocol.hello import FEATURE_RING

from .peers import (
    REPO,
    _spawn,
    memfd_mappings,
    start_aio_server_with,
    start_server_with,
    stop_server,
    wait_until,
)

COMPILED = getattr(_impl.core, "Ring", None) is not None
needs_ring = pytest.mark.skipif(not COMPILED, reason="the ring needs the compiled core")
MIB = 1 << 20


def ring_maps(pid="self") -> int:
    """Mappings of a ring memfd in the process."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum("hintens-ring" in line for line in maps)


def ring_residency(pid="self") -> list[tuple[int, int]]:
    """``(size, resident)`` in KiB of each ring mapping of the process (/proc/PID/smaps)."""
    found: list[tuple[int, int]] = []
    size = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if "hintens-ring" in line:
                size = -1
            elif size == -1 and line.startswith("Size:"):
                size = int(line.split()[1])
            elif size is not None and size >= 0 and line.startswith("Rss:"):
                found.append((size, int(line.split()[1])))
                size = None
    return found


def cpu_seconds(pid) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def ring_server(sock_path):
    process = start_server_with(sock_path, ring=True)
    yield process
    stop_server(process, signal.SIGKILL)


def test_the_ring_is_negotiated_only_when_both_sides_ask(sock_path):
    with hintens.Server(sock_path, ring=True).start() as server:
        with hintens.Client(sock_path, ring=True) as client:
            assert bytes(client.request(b"one")) == b"one"
            wait_until(lambda: client._conn.channel.ring is not None, 2)
            assert bool(client.peer_hello.features & FEATURE_RING) is COMPILED
            assert (client._conn.channel.ring is not None) is COMPILED
            (connection,) = server.connections
            assert (connection._channel.ring is not None) is COMPILED
        with hintens.Client(sock_path) as client:   # the client did not ask
            assert bytes(client.request(b"two")) == b"two"
            assert client._conn.channel.ring is None
    with hintens.Server(sock_path).start():           # the server does not offer
        with hintens.Client(sock_path, ring=True) as client:
            assert bytes(client.request(b"three")) == b"three"
            assert not client.peer_hello.features & FEATURE_RING
            assert client._conn.channel.ring is None


@needs_ring
@pytest.mark.parametrize("shm", [True, False])
def test_every_size_goes_through_the_ring_byte_exact(ring_server, sock_path, shm):
    # Larger than the ring (256 KiB) inline: frames span many fills of it.
    sizes = [0, 1, 64, 64 * 1024 - 1, 64 * 1024, 300 * 1024, MIB, 8 * MIB]
    with hintens.Client(sock_path, ring=True, shm=shm, max_payload=16 * MIB) as client:
        for size in sizes:
            payload = os.urandom(size)
            assert bytes(client.request(b"echo:" + payload)) == payload, size
        assert client._conn.channel.ring is not None
        stats = client._conn.channel.ring.stats()
        assert stats["written"] > 9 * MIB or shm
        assert client.stats["shm_bytes_sent"] > 0 or not shm


@needs_ring
def test_pipelined_requests_events_both_ways_and_codecs(sock_path):
    received = []
    done = threading.Event()

    def on_event(payload, connection):
        received.append(bytes(payload))
        if len(received) == 1000:
            done.set()

    pushed = []
    got_push = threading.Event()

    def on_push(payload):
        pushed.append(bytes(payload))
        if len(pushed) == 100:
            got_push.set()

    with hintens.Server(sock_path, lambda p: bytes(p)[::-1], on_event=on_event,
                        ring=True).start() as server:
        with hintens.Client(sock_path, ring=True, on_event=on_push) as client:
            replies = client.request_many([b"%d" % i for i in range(1000)])
            assert [bytes(r) for r in replies] == [(b"%d" % i)[::-1] for i in range(1000)]
            for i in range(1000):
                client.send_event(b"e%d" % i)
            client.flush()
            assert done.wait(10) and received == [b"e%d" % i for i in range(1000)]
            (connection,) = server.connections
            for i in range(100):
                connection.send_event(b"p%d" % i)
            assert got_push.wait(10) and pushed == [b"p%d" % i for i in range(100)]
            assert client._conn.channel.ring is not None
    with hintens.Server(sock_path, lambda value: value, codec="json", ring=True).start():
        with hintens.Client(sock_path, codec="json", ring=True) as client:
            assert client.request({"a": [1, 2.5, "x"]}) == {"a": [1, 2.5, "x"]}


@needs_ring
def test_a_reply_late_past_the_timeout_raises_timeout_and_the_ring_stays_usable(
        ring_server, sock_path):
    with hintens.Client(sock_path, ring=True) as client:
        assert bytes(client.request(b"echo:a")) == b"a"
        started = time.monotonic()
        with pytest.raises(hintens.Timeout):
            client.request(b"sleep:1:late", timeout=0.2)
        assert time.monotonic() - started < 0.9
        assert bytes(client.request(b"echo:b", timeout=5)) == b"b"
        assert client._conn.channel.ring is not None


@needs_ring
def test_the_creator_populates_the_ring_and_the_peer_does_not(ring_server, sock_path):
    # The server (the creator) maps every page at once, so that the ring's first lap takes
    # no page fault inside a round trip; the client maps the server's memfd lazily, so that
    # a creator's sparse memfd cannot make it allocate what it never reads.
    with hintens.Client(sock_path, ring=True) as client:
        assert bytes(client.request(b"echo:a")) == b"a"
        assert wait_until(lambda: ring_residency(ring_server.pid), 5)
        for size, resident in ring_residency(ring_server.pid):
            assert resident == size, ring_residency(ring_server.pid)
        ((size, resident),) = ring_residency()
        assert resident < size // 4, (size, resident)


@needs_ring
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a process spins only with "
                    "two CPUs or more (on one it would keep the peer from running)")
def test_spinning_resumes_when_the_peer_becomes_fast_again(ring_server, sock_path):
    # Replies 2 ms late spend the reader's spin budget (each wait is longer than a spin);
    # fast replies must bring spinning back, even where a futex wake-up alone takes longer
    # than a spin (some VMs): the reader probes with a full spin now and then.
    from hintens.transport._channel import RING_SPIN_MAX_S

    full = round(RING_SPIN_MAX_S * 1e9)
    with hintens.Client(sock_path, ring=True) as client:
        assert bytes(client.request(b"echo:a")) == b"a"
        ring = client._conn.channel.ring
        assert ring is not None
        for _ in range(40):   # 19 halvings spend 300 us; probes fail and space out
            assert bytes(client.request(b"sleep:0.002:slow")) == b"slow"
        slow = ring.stats()
        assert slow["spin_budget_ns"] == 0, slow
        assert slow["probe_every"] > 8, slow
        # A fast reply (a won spin, or a wait shorter than a full spin) restores the whole
        # budget and the probe rate, and the reader spins again. Whether a spin then wins
        # depends on the peer getting a CPU at once, which a loaded machine does not promise
        # (CI runs other tests beside this one); and a delayed wait may halve the budget
        # again. So the check is that the full budget comes back within these round trips,
        # not that it holds at their end.
        for _ in range(1000):
            assert bytes(client.request(b"echo:b")) == b"b"
            fast = ring.stats()
            if fast["spin_budget_ns"] == full and fast["probe_every"] == 8:
                break
        else:
            raise AssertionError(("spinning did not resume", slow, fast))


def _pinned(cpu: int, main: str) -> str:
    """A Python program that may use CPU ``cpu`` only (pinned before hintens loads), then
    runs ``main``."""
    return f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nimport hintens\n{main}"


@needs_ring
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPUs are needed to pin a "
                    "client and a server apart")
@pytest.mark.parametrize("apart", [True, False], ids=["apart", "together"])
def test_a_client_pinned_to_one_cpu_spins_unless_its_server_shares_that_cpu(sock_path, apart):
    # Pinned apart, a spin sees the peer run: spinning pays. Pinned to the same one CPU, the
    # two take turns on it, and a spin could only keep the server from running: none spins.
    first, second = sorted(os.sched_getaffinity(0))[:2]
    process = _spawn([sys.executable, "-c", _pinned(
        second if apart else first,
        "from tests.handlers import command\n"
        f"hintens.Server({sock_path!r}, command, ring=True).serve_forever()\n")], sock_path)
    try:
        client = subprocess.run([sys.executable, "-c", _pinned(first, (
            "import json\n"
            f"with hintens.Client({sock_path!r}, ring=True) as client:\n"
            "    for _ in range(300):\n"
            "        assert bytes(client.request(b'echo:x')) == b'x'\n"
            "    print(json.dumps(client._conn.channel.ring.stats()))\n"))],
            capture_output=True, text=True, timeout=60,
            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    finally:
        stop_server(process, signal.SIGKILL)
    assert client.returncode == 0, client.stderr
    stats = json.loads(client.stdout)
    assert stats["may_spin"] == apart, stats
    if apart:
        assert stats["spins_won"] > 0, stats
    else:
        assert stats["spins_won"] == 0, stats


@needs_ring
def test_a_killed_server_fails_the_waiting_client_promptly_and_frees_the_ring(sock_path):
    base, base_memfds = ring_maps(), len(memfd_mappings())
    process = start_server_with(sock_path, ring=True)
    try:
        client = hintens.Client(sock_path, ring=True)
        assert bytes(client.request(b"echo:x")) == b"x"
        assert ring_maps() == base + 1
        failure = []

        def wait_for_reply():
            try:
                client.request(b"sleep:30:never")
            except hintens.HintensError as error:
                failure.append((error, time.monotonic()))

        waiter = threading.Thread(target=wait_for_reply)
        waiter.start()
        time.sleep(0.2)
        killed = time.monotonic()
        process.kill()
        waiter.join(5)
        assert not waiter.is_alive()
        (error, when), = failure
        assert isinstance(error, hintens.ConnectionClosed)
        assert when - killed < 1.0   # the liveness interval is 50 ms
        client.close()
        assert ring_maps() == base and len(memfd_mappings()) == base_memfds
    finally:
        stop_server(process, signal.SIGKILL)


CLIENT_SCRIPT = """
import sys, hintens
client = hintens.Client(sys.argv[1], ring=True)
assert bytes(client.request(b"echo:up")) == b"up"
assert client._conn.channel.ring is not None
print("ready", flush=True)
client.request(b"sleep:30:never")
"""


@needs_ring
def test_a_killed_client_frees_the_servers_ring_and_the_server_serves_on(ring_server,
                                                                         sock_path):
    client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, sock_path],
                              stdout=subprocess.PIPE)
    try:
        assert client.stdout.readline() == b"ready\n"
        assert wait_until(lambda: ring_maps(ring_server.pid) == 1, 5)
        client.kill()
        client.wait()
        # The handler sleeps 30 s; the connection's end is seen, and its ring unmapped, once
        # it returns at the latest. Meanwhile new clients are served.
        with hintens.Client(sock_path, ring=True) as other:
            assert bytes(other.request(b"echo:still")) == b"still"
    finally:
        client.kill()
        client.wait()
        client.stdout.close()


@needs_ring
def test_closing_the_client_wakes_a_thread_waiting_in_the_ring(ring_server, sock_path):
    base = ring_maps()
    client = hintens.Client(sock_path, ring=True)
    assert bytes(client.request(b"echo:x")) == b"x"
    failure = []

    def wait_for_reply():
        try:
            client.request(b"sleep:30:never")
        except hintens.HintensError as error:
            failure.append(error)

    waiter = threading.Thread(target=wait_for_reply)
    waiter.start()
    time.sleep(0.2)
    client.close()
    waiter.join(5)
    assert not waiter.is_alive() and isinstance(failure[0], hintens.ConnectionClosed)
    assert ring_maps() == base


@needs_ring
def test_a_server_that_stops_frees_every_ring(sock_path):
    base = ring_maps()
    server = hintens.Server(sock_path, ring=True).start()
    clients = [hintens.Client(sock_path, ring=True) for _ in range(4)]
    for client in clients:
        assert bytes(client.request(b"x")) == b"x"
    assert wait_until(lambda: ring_maps() == base + 8, 5)   # both sides live in this process
    server.close()
    for client in clients:
        with pytest.raises(hintens.ConnectionClosed):
            client.request(b"y", timeout=5)
        client.close()
    assert wait_until(lambda: ring_maps() == base, 5)


IDLE_SCRIPT = """
import sys, time, hintens
client = hintens.Client(sys.argv[1], ring=True)
assert bytes(client.request(b"echo:up")) == b"up"
assert client._conn.channel.ring is not None
print("ready", flush=True)
time.sleep(60)
"""


def assert_idle_pair_costs_no_cpu(client_script: str, path: str, server, seconds: float):
    """A client process running ``client_script`` (which prints "ready" once its ring is up)
    and ``server`` together use under 1% of a core for ``seconds`` once idle."""
    client = subprocess.Popen([sys.executable, "-c", client_script, path],
                              stdout=subprocess.PIPE)
    try:
        assert client.stdout.readline() == b"ready\n"
        time.sleep(0.5)   # past the spins that follow the last message
        before = cpu_seconds(client.pid) + cpu_seconds(server.pid)
        time.sleep(seconds)
        used = cpu_seconds(client.pid) + cpu_seconds(server.pid) - before
        assert used < seconds / 100, f"{used:.3f} s of CPU in {seconds:g} s"
    finally:
        client.kill()
        client.wait()
        client.stdout.close()


@needs_ring
@pytest.mark.slow
def test_an_idle_connected_pair_costs_no_measurable_cpu(ring_server, sock_path):
    assert_idle_pair_costs_no_cpu(IDLE_SCRIPT, sock_path, ring_server, 10)


# The asyncio front end: a socket waiter (wake records on the socket, never a futex or a spin) --

def _asyncio_peer(kind: str, path: str):
    """A server process of ``kind`` offering rings (the sync or the asyncio Server)."""
    if kind == "sync":
        return start_server_with(path, ring=True)
    return start_aio_server_with(path, ring=True)


async def _exercise_asyncio_client(path: str, shm: bool) -> dict:
    async with hintens.aio.Client(path, ring=True, shm=shm, max_payload=16 * MIB,
                                  timeout=20) as client:
        # Larger than the ring (256 KiB) inline: each side waits for room, woken on the socket.
        for size in [0, 1, 64, 64 * 1024 - 1, 64 * 1024, 300 * 1024, MIB, 3 * MIB]:
            payload = os.urandom(size)
            assert bytes(await client.request(b"echo:" + payload)) == payload, size
        replies = await asyncio.gather(*[client.request(b"echo:%d" % i) for i in range(500)])
        assert [bytes(r) for r in replies] == [b"%d" % i for i in range(500)]
        assert client.ring_active
        return client._conn.channel.ring.stats()


@needs_ring
@pytest.mark.parametrize("server_kind", ["sync", "aio"])
@pytest.mark.parametrize("shm", [True, False])
def test_an_asyncio_client_speaks_the_ring_byte_exact(sock_path, server_kind, shm):
    process = _asyncio_peer(server_kind, sock_path)
    try:
        stats = asyncio.run(_exercise_asyncio_client(sock_path, shm))
    finally:
        stop_server(process, signal.SIGKILL)
    # It waited on the socket only: no futex sleep, no spin.
    assert stats["futex_waits"] == 0 and stats["spins_won"] == 0, stats
    assert stats["written"] > 4 * MIB or shm
    # An asyncio server is a socket waiter too: the client sent it wake records.
    assert (stats["socket_wakes"] > 0) is (server_kind == "aio")


@needs_ring
def test_a_sync_client_speaks_the_ring_to_an_asyncio_server(sock_path):
    process = start_aio_server_with(sock_path, ring=True)
    try:
        with hintens.Client(sock_path, ring=True, shm=False, max_payload=16 * MIB) as client:
            for size in [0, 1, 64 * 1024, 300 * 1024, 3 * MIB]:
                payload = os.urandom(size)
                assert bytes(client.request(b"echo:" + payload)) == payload, size
            replies = client.request_many([b"echo:%d" % i for i in range(500)])
            assert [bytes(r) for r in replies] == [b"%d" % i for i in range(500)]
            assert client.ring_active
            assert client._conn.channel.ring.stats()["socket_wakes"] > 0
    finally:
        stop_server(process, signal.SIGKILL)


@needs_ring
def test_a_killed_server_fails_an_asyncio_client_promptly_and_frees_the_ring(sock_path):
    base = ring_maps()
    process = start_server_with(sock_path, ring=True)

    async def main():
        async with hintens.aio.Client(sock_path, ring=True, timeout=30) as client:
            assert bytes(await client.request(b"echo:up")) == b"up"
            assert client.ring_active and ring_maps() == base + 1
            waiting = asyncio.ensure_future(client.request(b"sleep:20:never"))
            await asyncio.sleep(0.2)
            process.kill()
            started = time.monotonic()
            with pytest.raises(hintens.ConnectionClosed):
                await waiting
            return time.monotonic() - started

    try:
        took = asyncio.run(main())
    finally:
        stop_server(process, signal.SIGKILL)
    assert took < 2.0, took   # the socket's end wakes the loop: no liveness slice to wait
    assert ring_maps() == base


IDLE_AIO_SCRIPT = """
import asyncio, sys, hintens.aio
async def main():
    async with hintens.aio.Client(sys.argv[1], ring=True) as client:
        assert bytes(await client.request(b"echo:x")) == b"x" and client.ring_active
        print("ready", flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


@needs_ring
@pytest.mark.slow
def test_an_idle_asyncio_ring_pair_costs_no_measurable_cpu(sock_path):
    server = start_aio_server_with(sock_path, ring=True)
    try:
        assert_idle_pair_costs_no_cpu(IDLE_AIO_SCRIPT, sock_path, server, 5)
    finally:
        stop_server(server, signal.SIGKILL)


@needs_ring
def test_an_idle_sync_reader_waits_on_the_socket_and_wakes_for_the_next_request(sock_path):
    with hintens.Server(sock_path, lambda p: bytes(p), ring=True).start() as server:
        with hintens.Client(sock_path, ring=True) as client:
            assert bytes(client.request(b"before")) == b"before"
            (connection,) = server.connections
            ring = connection._channel.ring
            before = ring.stats()
            time.sleep(1.5)   # 4 slices of 50 ms on the futex, then the socket
            idle = ring.stats()
            assert idle["socket_waits"] > before["socket_waits"]
            assert idle["futex_waits"] - before["futex_waits"] <= 8   # not one per 50 ms
            payload = os.urandom(1000)
            assert bytes(client.request(payload)) == payload   # a wake record woke it
            assert client._conn.channel.ring.stats()["socket_wakes"] >= 1
