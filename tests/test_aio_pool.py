"""hintens.aio.ClientPool against real server processes, sync (``hintens.Server``) and asyncio
(``hintens.aio.Server``), killed with SIGKILL and restarted where the test says so: sizing,
retries (``hintens/_retry.py``, shared with the sync pool), exactly-once through the server's
replay window, Events, close, and cancellation; some tests also on uvloop.

The server processes run ``handler`` (sync server) or ``async_handler`` (asyncio server) below,
which add a few verbs to ``tests.handlers.command``:

* ``runs:key``: how many times this server process ran ``slow:S:key``, ``once:S:key`` or
  ``cut:key`` (not counting itself);
* ``slow:S:key``: count a run of ``key``, sleep S seconds, answer ``ran N``;
* ``once:S:key``: as ``slow``, but only the first run sleeps;
* ``cut:key``: count a run; the first run cuts its own connection (the answer is lost while
  the server process lives on) and still answers ``ran N``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import signal
import sys
import time

import pytest

import hintens
import hintens.aio

from .handlers import async_command, command
from .peers import _spawn, raw_listener, start_aio_server_with, start_server, \
    start_server_with, stop_server

try:
    import uvloop
except ImportError:   # pragma: no cover - the test extra has it
    uvloop = None

# Server side: the handlers the server processes run ------------------------------------------

#: Runs of each key in this (server) process.
RUNS: dict = {}


def _ran(key: bytes) -> int:
    RUNS[key] = RUNS.get(key, 0) + 1
    return RUNS[key]


def _cut_current_connection() -> None:
    from hintens.aio.serving import current

    connection = current.get()   # an asyncio server's handler
    if connection is None:       # the sync server of start_server_with: `server` in __main__
        connection = sys.modules["__main__"].server.current_connection()
    connection.close()


def _verb(data: bytes):
    verb, _, rest = data.partition(b":")
    if verb in (b"slow", b"once"):
        seconds, _, key = rest.partition(b":")
        return verb, float(seconds), key
    return verb, 0.0, rest


def handler(payload):
    """The sync server's handler (see the module docstring)."""
    data = bytes(payload)
    verb, seconds, key = _verb(data)
    if verb == b"runs":
        return b"%d" % RUNS.get(key, 0)
    if verb in (b"slow", b"once"):
        runs = _ran(key)
        if verb == b"slow" or runs == 1:
            time.sleep(seconds)
        return b"ran %d" % runs
    if verb == b"cut":
        runs = _ran(key)
        if runs == 1:
            _cut_current_connection()
        return b"ran %d" % runs
    return command(payload)


async def async_handler(payload):
    """The asyncio server's handler: as ``handler``, but sleeps await."""
    data = bytes(payload)
    verb, seconds, key = _verb(data)
    if verb in (b"slow", b"once"):
        runs = _ran(key)
        if verb == b"slow" or runs == 1:
            await asyncio.sleep(seconds)
        return b"ran %d" % runs
    if verb in (b"runs", b"cut"):
        return handler(payload)
    return await async_command(payload)


# Test side -----------------------------------------------------------------------------------

PATIENT = hintens.aio.RetryPolicy(max_attempts=1000, backoff=0.01, max_backoff=0.05,
                                  jitter=0.5)
QUICK = hintens.aio.RetryPolicy(max_attempts=3, backoff=0.01)

LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param("uvloop", id="uvloop", marks=pytest.mark.skipif(
        uvloop is None, reason="uvloop is not installed (it is in the test extra)")),
]


def occupancy(pool):
    """The pool's connections open and requests in flight, out of its stats."""
    stats = pool.stats
    return {"open": stats["open"], "in_flight": stats["in_flight"]}


def run(coroutine, loop="asyncio", timeout=60):
    """Run ``coroutine`` to its end on a fresh event loop: asyncio's default, or uvloop's."""
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coroutine, timeout))


def retries(caplog):
    return [r for r in caplog.records if r.getMessage().startswith("retrying a request")]


class Served:
    """A server process of one kind at one path, that a test may kill and restart."""

    def __init__(self, kind: str, path: str) -> None:
        self.kind, self.path = kind, path
        self.process = self._start()

    def _start(self):
        if self.kind == "sync":
            return start_server_with(self.path, handler="tests.test_aio_pool:handler")
        return start_aio_server_with(self.path, handler="tests.test_aio_pool:async_handler")

    def kill(self) -> None:
        stop_server(self.process, signal.SIGKILL)

    def restart(self) -> None:
        self.process = self._start()

    def stop(self) -> None:
        stop_server(self.process, signal.SIGKILL)


@pytest.fixture(params=["sync", "aio"])
def served(request, sock_path):
    """A server process: the sync ``hintens.Server``, then ``hintens.aio.Server``."""
    server = Served(request.param, sock_path)
    yield server
    server.stop()


async def runs(path, key: bytes) -> int:
    """How many times the server process at ``path`` ran ``key`` (asked on a connection of its
    own, outside any pool)."""
    async with hintens.aio.Client(path, timeout=10) as side:
        return int(await side.request(b"runs:" + key))


async def until(predicate, timeout_s=10.0):
    """Poll ``predicate`` (its result awaited if it is awaitable) until it is true; False if
    ``timeout_s`` passes first."""
    async def check():
        result = predicate()
        return bool(await result if inspect.isawaitable(result) else result)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.01)
    return await check()


# 1, 2, 10: basics, against both servers (and on uvloop) ---------------------------------------

@pytest.mark.parametrize("loop", LOOPS)
def test_a_burst_of_concurrent_requests_on_a_fresh_pool_stays_within_size(served, sock_path,
                                                                           loop):
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=3) as pool:
            assert occupancy(pool) == {"open": 0, "in_flight": 0}
            most = 0

            async def one(n):
                nonlocal most
                reply = await pool.request(b"echo:%d" % n)
                most = max(most, pool.stats["open"])
                return reply

            requests = [asyncio.ensure_future(one(n)) for n in range(500)]
            await asyncio.sleep(0)           # every request has started
            most = max(most, pool.stats["open"])
            replies = await asyncio.gather(*requests)
            assert replies == [b"%d" % n for n in range(500)]
            assert most <= 3, f"{most} connections open at once on a pool of size 3"
            assert pool.stats["open"] <= 3
            assert pool.stats["in_flight"] == 0

    run(main(), loop)


def test_sequential_requests_use_one_connection_and_busy_ones_add_more(served, sock_path):
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=3) as pool:
            for n in range(50):
                assert await pool.request(b"echo:%d" % n) == b"%d" % n
            assert occupancy(pool) == {"open": 1, "in_flight": 0}
            # One busy connection: the next request opens another, up to size.
            slow = asyncio.ensure_future(pool.request(b"sleep:0.5:slow"))
            await until(lambda: pool.stats["in_flight"] == 1)
            assert await pool.request(b"echo:beside") == b"beside"
            assert pool.stats["open"] == 2
            assert await slow == b"slow"
            # All idle again: sequential requests open nothing more.
            for n in range(20):
                assert await pool.request(b"echo:%d" % n) == b"%d" % n
            assert occupancy(pool) == {"open": 2, "in_flight": 0}
            # Six at once, each long enough that all overlap: three connections, no more.
            replies = await asyncio.gather(*(pool.request(b"sleep:0.2:%d" % n)
                                             for n in range(6)))
            assert sorted(map(bytes, replies)) == [b"%d" % n for n in range(6)]
            assert occupancy(pool) == {"open": 3, "in_flight": 0}

    run(main())


def test_many_concurrent_requests_on_a_warm_pool(served, sock_path):
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=3) as pool:
            assert await pool.request(b"echo:warm") == b"warm"   # one connection open
            replies = await asyncio.gather(*(pool.request(b"echo:%d" % n)
                                             for n in range(500)))
            assert replies == [b"%d" % n for n in range(500)]
            assert 1 <= pool.stats["open"] <= 3
            assert pool.stats["in_flight"] == 0

    run(main())


# 3, 10: exactly-once across a SIGKILL, a restart, and a cut connection --------------------------

@pytest.mark.parametrize("loop", LOOPS)
def test_exactly_once_a_request_cut_by_sigkill_is_not_run_by_the_restarted_server(
        served, sock_path, loop, caplog):
    """The server is SIGKILLed while it runs the request, and restarted. The new process has
    no memory of it: the pool must not run it there, and says the server restarted (the sync
    pool's test_exactly_once_refuses_to_retry_on_a_restarted_server)."""
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=2, exactly_once=True,
                                          retry=PATIENT, timeout=30) as pool:
            assert await pool.request(b"echo:warm") == b"warm"
            task = asyncio.ensure_future(pool.request(b"slow:30:k"))
            assert await until(lambda: _positive(runs(sock_path, b"k")))   # it runs now
            await asyncio.to_thread(served.kill)
            await asyncio.to_thread(served.restart)
            with pytest.raises(hintens.ConnectionClosed, match="restarted") as caught:
                await task
            assert caught.value.request_sent is True
            assert caught.value.request_id is not None
            assert await runs(sock_path, b"k") == 0          # the new process never ran it
            assert pool.stats["in_flight"] == 0
            assert await pool.request(b"count:after") == b"1"   # the pool goes on
        assert retries(caplog)

    with caplog.at_level(logging.INFO, "hintens"):
        run(main(), loop)


async def _positive(count):
    return await count > 0


@pytest.mark.parametrize("loop", LOOPS)
def test_exactly_once_a_server_killed_before_the_request_is_sent(served, sock_path, loop,
                                                                 caplog, no_hangup_check):
    """The server dies (SIGKILL) and is restarted while the pool's connection is idle: the
    request's write fails, nothing was sent, so it goes again to the new server, once."""
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=1, exactly_once=True) as pool:
            assert await pool.request(b"echo:1") == b"1"
            # Blocking, on purpose: the loop does not run, so the pool cannot have seen the
            # hang-up when the request goes out on the dead connection.
            served.kill()
            served.restart()
            with caplog.at_level(logging.INFO, "hintens"):
                assert await pool.request(b"count:a") == b"1"
            assert len(retries(caplog)) == 1
            assert await pool.request(b"count:a") == b"2"    # it ran once before this
            assert occupancy(pool) == {"open": 1, "in_flight": 0}

    run(main(), loop)


def test_exactly_once_a_lost_answer_is_answered_from_the_replay_window(served, sock_path,
                                                                      caplog):
    """The connection is cut after the request ran, the server process lives on: the retry
    (same request id, same server instance) is answered from the replay window, not run
    again."""
    async def main():
        async with hintens.aio.ClientPool(sock_path, exactly_once=True) as pool:
            assert await pool.request(b"cut:x") == b"ran 1"
            assert await pool.request(b"cut:y") == b"ran 1"   # a new request runs
            assert await runs(sock_path, b"x") == 1
            assert pool.stats["in_flight"] == 0

    with caplog.at_level(logging.INFO, "hintens"):
        run(main())
    assert len(retries(caplog)) == 2     # cut:x, then cut:y, lost their first answer


def test_without_exactly_once_a_lost_answer_is_an_error_unless_idempotent(served, sock_path):
    async def main():
        async with hintens.aio.ClientPool(sock_path, retry=PATIENT) as pool:
            with pytest.raises(hintens.ConnectionClosed) as caught:
                await pool.request(b"cut:x")
            assert caught.value.request_sent is True
            assert await runs(sock_path, b"x") == 1          # not retried
            # Marked idempotent, it is retried, and runs twice.
            assert await pool.request(b"cut:y", idempotent=True) == b"ran 2"
            assert await runs(sock_path, b"y") == 2

    run(main())


# 4, 5: timeouts and retry policies -----------------------------------------------------------

def test_an_idempotent_request_is_retried_after_a_timeout(sock_path, caplog):
    # The asyncio server: the first (sleeping) run does not hold up the retry.
    served = Served("aio", sock_path)
    try:
        async def main():
            async with hintens.aio.ClientPool(sock_path, retry=QUICK) as pool:
                with caplog.at_level(logging.INFO, "hintens"):
                    assert await pool.request(b"once:2:k", timeout=0.3,
                                              idempotent=True) == b"ran 2"
                assert len(retries(caplog)) == 1
                assert await runs(sock_path, b"k") == 2
                assert pool.stats["in_flight"] == 0

        run(main())
    finally:
        served.stop()


def test_a_timeout_is_not_retried_unless_idempotent(served, sock_path, caplog):
    async def main():
        async with hintens.aio.ClientPool(sock_path, retry=QUICK) as pool:
            with caplog.at_level(logging.INFO, "hintens"):
                with pytest.raises(hintens.Timeout) as caught:
                    await pool.request(b"slow:0.5:k", timeout=0.1)
            assert caught.value.request_sent is True
            assert not retries(caplog)
            await asyncio.sleep(0.6)                        # its one run is over
            assert await runs(sock_path, b"k") == 1
            assert await pool.request(b"echo:after") == b"after"   # still usable

    run(main())


def test_retry_policy_max_attempts_counts_every_attempt(served, sock_path, caplog):
    policy = hintens.aio.RetryPolicy(max_attempts=4, backoff=0.01)

    async def main():
        async with hintens.aio.ClientPool(sock_path, retry=policy) as pool:
            with caplog.at_level(logging.INFO, "hintens"):
                with pytest.raises(hintens.Timeout):
                    await pool.request(b"slow:0.3:k", timeout=0.1, idempotent=True)
            assert len(retries(caplog)) == 3
            # Each attempt reached the server and ran (the sync server runs them one after
            # the other on its connection): four runs, then no more.
            assert await until(lambda: _equal(runs(sock_path, b"k"), 4))
            await asyncio.sleep(0.5)
            assert await runs(sock_path, b"k") == 4

    run(main())


async def _equal(count, expected):
    return await count == expected


def test_no_server_is_retried_per_policy_then_a_connect_error(sock_path, caplog):
    async def main():
        policy = hintens.aio.RetryPolicy(max_attempts=5, backoff=0.01)
        async with hintens.aio.ClientPool(sock_path, retry=policy) as pool:
            with caplog.at_level(logging.INFO, "hintens"):
                with pytest.raises(hintens.ConnectError):
                    await pool.request(b"echo:x")
            assert len(retries(caplog)) == 4
            assert occupancy(pool) == {"open": 0, "in_flight": 0}
        caplog.clear()
        async with hintens.aio.ClientPool(sock_path, retry=hintens.aio.NO_RETRY) as pool:
            with caplog.at_level(logging.INFO, "hintens"):
                with pytest.raises(hintens.ConnectError):
                    await pool.request(b"echo:x")
            assert not retries(caplog)

    run(main())


def test_no_retry_raises_the_first_failure(served, sock_path, caplog, no_hangup_check):
    """NO_RETRY: a request that could safely go again (its write failed on a connection the
    server had dropped: request_sent False) raises at once, and did not run."""
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=1,
                                          retry=hintens.aio.NO_RETRY) as pool:
            assert await pool.request(b"echo:1") == b"1"
            served.kill()          # blocking: the pool has not seen the hang-up
            served.restart()
            with caplog.at_level(logging.INFO, "hintens"):
                with pytest.raises(hintens.ConnectionClosed) as caught:
                    await pool.request(b"count:a")
            assert caught.value.request_sent is False
            assert not retries(caplog)
            assert await pool.request(b"count:a") == b"1"    # it had not run
            assert occupancy(pool) == {"open": 1, "in_flight": 0}

    run(main())


# 6: request_many, Events ---------------------------------------------------------------------

def test_request_many_through_the_pool(served, sock_path):
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=2) as pool:
            assert await pool.request_many([b"echo:%d" % n for n in range(100)]) == \
                [b"%d" % n for n in range(100)]
            assert await pool.request_many([]) == []
            assert pool.stats["in_flight"] == 0

    run(main())


def _start_events_server(kind, path):
    """A server whose on_event is tests.handlers:record_event (``events:`` summarises)."""
    if kind == "sync":
        return start_server(path, "--on-event", "tests.handlers:record_event")
    script = (
        "import asyncio, logging, hintens.aio\n"
        "from tests.handlers import async_command, record_event\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "async def main():\n"
        f"    server = hintens.aio.Server({path!r}, async_command, on_event=record_event)\n"
        "    await server.serve_forever()\n"
        "asyncio.run(main())\n")
    return _spawn([sys.executable, "-c", script], path)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_events_through_one_connection_arrive_in_order(sock_path, kind):
    process = _start_events_server(kind, sock_path)

    async def main():
        async with hintens.aio.ClientPool(sock_path, size=2) as pool:
            async with pool.connection() as client:
                for n in range(1000):
                    await client.send_event(b"%d" % n)
            await pool.send_event(b"1000")
            await pool.flush()
            seen = {}

            async def all_there():
                seen.update(json.loads(bytes(await pool.request(b"events:"))))
                return seen["count"] == 1001

            assert await until(all_there), seen
            assert seen["in_order"]

    try:
        run(main())
    finally:
        stop_server(process, signal.SIGKILL)


# 7: close ------------------------------------------------------------------------------------

def test_close_waits_for_requests_in_flight(served, sock_path):
    async def main():
        pool = hintens.aio.ClientPool(sock_path, size=2)
        slow = asyncio.ensure_future(pool.request(b"sleep:0.3:done"))
        await until(lambda: pool.stats["in_flight"] == 1)
        await pool.close(timeout=10)
        assert slow.done() and slow.result() == b"done"
        assert occupancy(pool) == {"open": 0, "in_flight": 0}
        with pytest.raises(hintens.ConnectionClosed, match="closed"):
            await pool.request(b"echo:x")
        with pytest.raises(hintens.ConnectionClosed, match="closed"):
            async with pool.connection():
                pass
        await pool.close()   # idempotent
        await pool.close(timeout=0.1)

    run(main())


def test_close_cuts_requests_still_running_at_its_deadline(served, sock_path, caplog):
    async def main():
        pool = hintens.aio.ClientPool(sock_path, size=2, retry=PATIENT)
        slow = asyncio.ensure_future(pool.request(b"slow:5:late"))
        await until(lambda: pool.stats["in_flight"] == 1)
        started = time.monotonic()
        await pool.close(timeout=0.2)
        with pytest.raises(hintens.ConnectionClosed) as caught:   # not retried: closed
            await slow
        assert caught.value.request_sent is True
        assert time.monotonic() - started < 4
        assert occupancy(pool) == {"open": 0, "in_flight": 0}

    with caplog.at_level(logging.INFO, "hintens"):
        run(main())
    assert not retries(caplog)


# 8: broken connections are replaced ----------------------------------------------------------

def test_a_connection_to_a_killed_server_is_replaced(served, sock_path):
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=2,
                                          retry=hintens.aio.NO_RETRY) as pool:
            async with pool.connection() as first:
                assert await first.request(b"echo:1") == b"1"
            await asyncio.to_thread(served.kill)
            assert await until(lambda: first.closed)   # the loop saw the hang-up
            await asyncio.to_thread(served.restart)
            # No retry allowed: it succeeds at once, on a fresh connection.
            assert await pool.request(b"count:n") == b"1"
            async with pool.connection() as second:
                assert second is not first and not second.closed
            assert occupancy(pool) == {"open": 1, "in_flight": 0}

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_burst_after_a_restart_stays_within_size(served, sock_path, loop):
    """Every connection broke: a burst of requests opens new ones, still at most ``size``."""
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=2, retry=PATIENT) as pool:
            assert await pool.request(b"echo:warm") == b"warm"
            # One connection open and busy: the second one opens, no more.
            await asyncio.gather(*(pool.request(b"sleep:0.1:%d" % n) for n in range(4)))
            assert pool.stats["open"] == 2
            await asyncio.to_thread(served.kill)
            await asyncio.to_thread(served.restart)
            most = 0

            async def one(n):
                nonlocal most
                reply = await pool.request(b"echo:%d" % n, idempotent=True)
                most = max(most, pool.stats["open"])
                return reply

            requests = [asyncio.ensure_future(one(n)) for n in range(50)]
            await asyncio.sleep(0)
            most = max(most, pool.stats["open"])
            assert await asyncio.gather(*requests) == [b"%d" % n for n in range(50)]
            assert most <= 2, f"{most} connections open at once on a pool of size 2"

    run(main(), loop)


# 9: cancellation -----------------------------------------------------------------------------

def test_a_cancelled_request_leaves_the_pool_usable(served, sock_path):
    async def main():
        async with hintens.aio.ClientPool(sock_path, size=2) as pool:
            assert await pool.request(b"echo:warm") == b"warm"
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.request(b"sleep:0.5:x"), 0.1)
            assert pool.stats["in_flight"] == 0
            assert await pool.request(b"echo:after") == b"after"
            # Cancelled outright, several at once.
            tasks = [asyncio.ensure_future(pool.request(b"sleep:0.3:%d" % n))
                     for n in range(5)]
            await until(lambda: pool.stats["in_flight"] == 5)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            assert pool.stats["in_flight"] == 0
            assert await pool.request(b"echo:again") == b"again"
            assert pool.stats["open"] <= 2
            # The late replies of the cancelled requests are dropped, not misdelivered.
            await asyncio.sleep(0.6)
            assert await pool.request_many([b"echo:%d" % n for n in range(10)]) == \
                [b"%d" % n for n in range(10)]

    run(main())


def test_a_request_cancelled_during_its_retry_backoff(sock_path):
    """Cancelled between attempts (no server yet): nothing stays counted in flight."""
    async def main():
        slow_retry = hintens.aio.RetryPolicy(max_attempts=100, backoff=0.2, jitter=0)
        async with hintens.aio.ClientPool(sock_path, retry=slow_retry) as pool:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.request(b"echo:x"), 0.3)
            assert occupancy(pool) == {"open": 0, "in_flight": 0}

    run(main())


def test_a_request_cancelled_while_its_connection_opens_leaks_no_connection(sock_path):
    """A listener that accepts but never says hello: the new connection waits for the hello
    when the request is cancelled. The half-open connection must be closed, not left on the
    loop."""
    listener = raw_listener(sock_path)

    async def main():
        async with hintens.aio.ClientPool(sock_path, size=1) as pool:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.request(b"echo:x"), 0.3)
            assert occupancy(pool) == {"open": 0, "in_flight": 0}
            conn, _ = await asyncio.to_thread(listener.accept)
            conn.settimeout(3)
            received = b""
            try:
                while chunk := await asyncio.to_thread(conn.recv, 65536):
                    received += chunk
                hung_up = True
            except TimeoutError:
                hung_up = False
            finally:
                conn.close()
            assert received, "the client's hello never came"
            assert hung_up, "the cancelled request's connection was left open"

    try:
        run(main())
    finally:
        listener.close()
