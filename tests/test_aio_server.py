"""hintens.aio.Server: every combination of sync and asyncio client and server (servers in
their own processes), concurrency on one connection, shared memory both ways with numpy,
allocate(), a cancellation storm, slow callbacks, threaded handlers, codecs and a graceful
close. Also on uvloop, when it is installed."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time

import pytest

import hintens
import hintens.aio

from .peers import open_fds, start_aio_server_with, start_server_with, stop_server

CYTHON = hintens.implementation == "cython"

try:
    import uvloop
except ImportError:   # the uvloop extra is not installed
    uvloop = None

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    uvloop is None, reason="uvloop is not installed (the uvloop extra)"))]


def run(coroutine, loop="asyncio", timeout=120):
    """Run ``coroutine`` to its end on a fresh event loop of the kind named."""
    if loop == "uvloop":
        event_loop = uvloop.new_event_loop()
        try:
            return event_loop.run_until_complete(asyncio.wait_for(coroutine, timeout))
        finally:
            event_loop.close()
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.fixture(params=["sync", "aio", "aio-threaded"])
def any_server(request, sock_path):
    """A server process of each kind, with tests.handlers' command (as a coroutine for the
    asyncio one; as a plain function run in the executor for aio-threaded)."""
    if request.param == "sync":
        process = start_server_with(sock_path)
    elif request.param == "aio":
        process = start_aio_server_with(sock_path)
    else:
        process = start_aio_server_with(sock_path, handler="tests.handlers:command",
                                        threaded=True)
    yield request.param
    stop_server(process)


def _exercise_sync(path):
    with hintens.Client(path, timeout=20) as client:
        assert client.request(b"echo:hello") == b"hello"
        assert client.request(b"size:0") == b""
        assert client.request(b"none:") == b""
        big = client.request(b"size:1048576")   # through shared memory
        assert len(big) == 1 << 20 and not any(bytes(big[:4096]))
        del big
        with pytest.raises(hintens.RemoteError, match="boom"):
            client.request(b"raise:boom")
        with pytest.raises(hintens.RemoteError) as raised:
            client.request(b"app:1234:nope")
        assert raised.value.code == 1234 and raised.value.message == "nope"
        with pytest.raises(hintens.RemoteError, match="bytes-like"):
            client.request(b"bad-return:")
        sent = bytes(range(256)) * 4096   # 1 MiB up through shared memory, echoed back
        assert bytes(client.request(b"echo:" + sent)) == sent
        assert client.request_many([b"echo:%d" % i for i in range(50)]) == \
            [b"%d" % i for i in range(50)]


async def _exercise_aio(path):
    async with hintens.aio.Client(path, timeout=20) as client:
        assert await client.request(b"echo:hello") == b"hello"
        assert await client.request(b"size:0") == b""
        big = await client.request(b"size:1048576")
        assert len(big) == 1 << 20 and not any(bytes(big[:4096]))
        del big
        with pytest.raises(hintens.RemoteError, match="boom"):
            await client.request(b"raise:boom")
        with pytest.raises(hintens.RemoteError) as raised:
            await client.request(b"app:1234:nope")
        assert raised.value.code == 1234
        sent = bytes(range(256)) * 4096
        assert bytes(await client.request(b"echo:" + sent)) == sent
        assert await client.request_many([b"echo:%d" % i for i in range(50)]) == \
            [b"%d" % i for i in range(50)]


@pytest.mark.parametrize("client_kind", ["sync", "aio"])
def test_every_client_with_every_server(any_server, client_kind, sock_path):
    if client_kind == "sync":
        _exercise_sync(sock_path)
    else:
        run(_exercise_aio(sock_path))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_thousand_concurrent_requests_on_one_connection(sock_path, loop):
    # The asyncio server runs each request of the coroutine handler as a task: a thousand
    # requests sleeping 0.2 s each finish together, not one after the other (200 s).
    process = start_aio_server_with(sock_path, max_concurrency=1000, loop=loop)
    try:
        async def main():
            async with hintens.aio.Client(sock_path, timeout=60) as client:
                started = time.monotonic()
                replies = await asyncio.gather(*(client.request(b"sleep:0.2:%d" % i)
                                                 for i in range(1000)))
                assert replies == [b"%d" % i for i in range(1000)]
                assert time.monotonic() - started < 30
                assert not client._waiters

        run(main(), loop)
    finally:
        stop_server(process)


class _Sleepy:
    """A handler object whose calls return coroutines (the server awaits them as tasks),
    counting how many run at once."""

    def __init__(self):
        self.running = 0
        self.most = 0

    def __call__(self, payload):
        return self._run(payload)

    async def _run(self, payload):
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0.05)
        self.running -= 1
        return payload


def test_requests_of_one_connection_overlap_up_to_max_concurrency(sock_path):
    async def main():
        sleepy = _Sleepy()
        async with hintens.aio.Server(sock_path, sleepy, max_concurrency=4):
            async with hintens.aio.Client(sock_path, timeout=30) as client:
                replies = await asyncio.gather(*(client.request(b"%d" % i)
                                                 for i in range(20)))
        assert replies == [b"%d" % i for i in range(20)]
        assert sleepy.most == 4

    run(main())


def _all_given_back(client):
    """Every segment the client lent is back, and it holds no view lent by the server."""
    endpoint = client._endpoint
    return not endpoint.pool._peer and not endpoint._lent


@pytest.mark.skipif(not CYTHON, reason="zero-copy views need the compiled core")
@pytest.mark.parametrize("loop", LOOPS)
def test_shared_memory_both_ways_with_numpy(sock_path, loop):
    np = pytest.importorskip("numpy")

    async def main():
        async def double(payload):
            data = np.frombuffer(payload, dtype=np.float64)   # a view of the client's segment
            out = srv.allocate(data.nbytes)                   # a view of one of ours
            np.multiply(data, 2, out=np.frombuffer(out, dtype=np.float64))
            return out

        srv = hintens.aio.Server(sock_path, double)
        async with srv:
            async with hintens.aio.Client(sock_path, timeout=20) as client:
                array = np.arange(1 << 17, dtype=np.float64)          # 1 MiB
                buffer = client.allocate(array.nbytes)               # sent uncopied
                np.frombuffer(buffer, dtype=np.float64)[:] = array
                reply = await client.request(buffer)
                assert isinstance(reply, memoryview) and reply.readonly
                result = np.frombuffer(reply, dtype=np.float64)
                assert np.array_equal(result, array * 2)
                del result
                reply.release()
                # Plain arrays go too (copied once into a segment).
                reply = await client.request(array)
                assert np.array_equal(np.frombuffer(reply, dtype=np.float64), array * 2)
                del reply
                gc.collect()
                for _ in range(100):   # the releases travel back
                    if _all_given_back(client):
                        break
                    await asyncio.sleep(0.01)
                assert _all_given_back(client)

    run(main(), loop)


def test_cancellation_storm_loses_nothing(sock_path):
    # 10,000 requests (some of them answered through shared memory) cancelled at random
    # points: afterwards the connection works, and no waiter, deadline or segment is left.
    process = start_aio_server_with(sock_path, max_concurrency=2000)
    rng = random.Random(20261202)
    try:
        async def main():
            async with hintens.aio.Client(sock_path, timeout=30) as client:
                for _ in range(20):
                    tasks = []
                    for i in range(500):
                        payload = b"size:131072" if i % 50 == 0 else \
                            b"sleep:%.3f:%d" % (rng.random() * 0.02, i)
                        tasks.append(asyncio.ensure_future(client.request(payload)))
                    for _ in range(rng.randrange(0, 3)):
                        await asyncio.sleep(rng.random() * 0.01)
                    for task in tasks:
                        if rng.random() < 0.9:
                            task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    del tasks   # (a task keeps the frames of its end alive)
                assert await client.request(b"echo:still here") == b"still here"
                assert not client._waiters
                gc.collect()
                for _ in range(200):
                    if _all_given_back(client):
                        break
                    await asyncio.sleep(0.01)
                assert _all_given_back(client)

        run(main())
    finally:
        stop_server(process)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_slow_async_on_event_does_not_hold_up_replies(sock_path, loop):
    async def main():
        got = []

        async def slow(payload):
            await asyncio.sleep(1.0)
            got.append(bytes(payload))

        async with hintens.aio.Server(sock_path) as server:
            async with hintens.aio.Client(sock_path, on_event=slow, timeout=10) as client:
                while not server.connections:
                    await asyncio.sleep(0.005)
                for i in range(5):
                    assert server.broadcast(b"e%d" % i) == 1
                started = time.monotonic()
                for i in range(20):
                    assert await client.request(b"r%d" % i) == b"r%d" % i
                assert time.monotonic() - started < 1.0   # none waited for a callback
                while len(got) < 5:
                    await asyncio.sleep(0.05)
                assert sorted(got) == [b"e%d" % i for i in range(5)]

    run(main(), loop)


def test_a_threaded_handler_that_blocks_does_not_stop_the_loop(sock_path):
    def blocking(payload):
        time.sleep(0.5)
        return payload

    async def main():
        async with hintens.aio.Server(sock_path, blocking, threaded=True):
            async with hintens.aio.Client(sock_path, timeout=10) as first, \
                    hintens.aio.Client(sock_path, timeout=10) as second:
                started = time.monotonic()
                replies = await asyncio.gather(*(c.request(b"x") for c in (first, second)
                                                 for _ in range(2)))
                assert replies == [b"x"] * 4
                assert time.monotonic() - started < 1.9   # in parallel, not 2 s in a row

    run(main())


def test_handlers_see_their_connection_and_push_events(sock_path):
    async def main():
        seen = []

        async def handler(payload):
            connection = server.current_connection()
            seen.append(connection.id)
            assert connection.send_event(b"before-" + bytes(payload))
            return payload

        server = hintens.aio.Server(sock_path, handler)
        events = []
        async with server:
            async with hintens.aio.Client(sock_path, on_event=events.append,
                                          timeout=10) as client:
                assert await client.request(b"a") == b"a"
                await asyncio.sleep(0.05)
                assert events == [b"before-a"]   # sent before the reply, arrives before it
                assert seen == [server.connections[0].id]
        with pytest.raises(RuntimeError):
            server.current_connection()

    run(main())


def test_events_from_clients_reach_on_event_sync_and_async(sock_path):
    async def main():
        plain, coroutine = [], []

        def on_plain(payload, connection):
            plain.append(bytes(payload))

        async def on_async(payload, connection):
            await asyncio.sleep(0)
            coroutine.append(bytes(payload))

        for on_event, into in ((on_plain, plain), (on_async, coroutine)):
            async with hintens.aio.Server(sock_path, on_event=on_event):
                async with hintens.aio.Client(sock_path, timeout=10) as client:
                    for i in range(100):
                        await client.send_event(b"%d" % i)
                    await client.flush()
                    assert await client.request(b"sync") == b"sync"
                    for _ in range(100):
                        if len(into) == 100:
                            break
                        await asyncio.sleep(0.01)
            assert into == [b"%d" % i for i in range(100)]

    run(main())


def test_a_codec_on_both_sides(sock_path):
    async def main():
        async def add(value):
            return {"sum": value["a"] + value["b"]}

        async with hintens.aio.Server(sock_path, add, codec="json"):
            async with hintens.aio.Client(sock_path, codec="json", timeout=10) as client:
                assert await client.request({"a": 2, "b": 3}) == {"sum": 5}
            with hintens.Client(sock_path, codec="json", timeout=10) as sync_client:
                reply = await asyncio.get_running_loop().run_in_executor(
                    None, sync_client.request, {"a": 1, "b": 1})
                assert reply == {"sum": 2}

    run(main())


def test_close_answers_what_is_in_flight_then_ends(sock_path):
    async def main():
        async def slow(payload):
            await asyncio.sleep(0.3)
            return payload

        server = await hintens.aio.Server(sock_path, slow).start()
        async with hintens.aio.Client(sock_path, timeout=10) as client:
            pending = [asyncio.ensure_future(client.request(b"%d" % i)) for i in range(10)]
            await asyncio.sleep(0.1)   # they reached the server
            await server.close()
            assert await asyncio.gather(*pending) == [b"%d" % i for i in range(10)]
            with pytest.raises(hintens.ConnectionClosed):
                await client.request(b"after")
        await server.close()   # idempotent
        with pytest.raises(hintens.ConnectError):
            await hintens.aio.Client.connect(sock_path, connect_timeout=1)

    run(main())


def test_close_cuts_what_outlasts_its_timeout(sock_path):
    async def main():
        async def forever(payload):
            await asyncio.sleep(60)

        server = await hintens.aio.Server(sock_path, forever).start()
        async with hintens.aio.Client(sock_path, timeout=10) as client:
            pending = asyncio.ensure_future(client.request(b"x"))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await server.close(timeout=0.3)
            assert time.monotonic() - started < 3
            with pytest.raises(hintens.ConnectionClosed):
                await pending
        assert not server.connections

    run(main())


def test_serve_forever_until_cancelled(sock_path):
    async def main():
        server = hintens.aio.Server(sock_path)
        serving = asyncio.ensure_future(server.serve_forever())
        async with hintens.aio.Client(sock_path, timeout=10) as client:
            assert await client.request(b"x") == b"x"
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        with pytest.raises(RuntimeError, match="closed"):
            await server.start()

    run(main())


def test_connect_and_disconnect_callbacks(sock_path):
    async def main():
        log = []

        async def on_connect(connection):
            log.append(("connect", connection.id, connection.peer.pid))

        def on_disconnect(connection):
            log.append(("disconnect", connection.id))

        async with hintens.aio.Server(sock_path, on_connect=on_connect,
                                      on_disconnect=on_disconnect) as server:
            async with hintens.aio.Client(sock_path, timeout=10) as client:
                await client.request(b"x")
                connection_id = server.connections[0].id
            for _ in range(100):
                if len(log) == 2:
                    break
                await asyncio.sleep(0.01)
        import os
        assert log == [("connect", connection_id, os.getpid()), ("disconnect", connection_id)]

    run(main())


def test_nothing_is_left_open(sock_path):
    async def main():
        async with hintens.aio.Server(sock_path):
            for _ in range(20):
                async with hintens.aio.Client(sock_path, timeout=10) as client:
                    assert len(await client.request(bytes(200_000))) == 200_000
            await asyncio.sleep(0.05)

    run(main())   # warm up: the first run opens what stays open (the flusher, imports)
    gc.collect()
    before = open_fds()
    run(main())
    gc.collect()
    assert open_fds() == before


def test_bad_arguments_are_refused_before_the_socket_exists(sock_path):
    import os

    with pytest.raises(ValueError):
        hintens.aio.Server(sock_path, max_concurrency=0)
    with pytest.raises(TypeError):
        hintens.aio.Server(sock_path, executor=object())
    with pytest.raises(TypeError):
        hintens.aio.Server(sock_path, handler=42)
    assert not os.path.exists(sock_path)


def test_a_sync_server_in_this_process_and_an_aio_client(sock_path):
    server = hintens.Server(sock_path).start()
    try:
        async def main():
            async with hintens.aio.Client(sock_path, timeout=10) as client:
                assert await client.request(b"x" * 100) == b"x" * 100

        run(main())
    finally:
        server.close()


def test_an_aio_server_on_a_thread_and_sync_clients(sock_path):
    # The loop on a thread of its own; sync clients on this one.
    ready = threading.Event()
    box = {}

    def serve():
        async def main():
            box["server"] = server = await hintens.aio.Server(sock_path).start()
            box["loop"] = asyncio.get_running_loop()
            ready.set()
            await server.serve_forever()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        clients = [hintens.Client(sock_path, timeout=10) for _ in range(4)]
        for round_ in range(50):
            for index, client in enumerate(clients):
                assert client.request(b"%d-%d" % (round_, index)) == b"%d-%d" % (round_, index)
        for client in clients:
            client.close()
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].close(), box["loop"]).result(10)
        thread.join(10)


def test_an_ended_connection_is_freed_without_waiting_for_the_garbage_collector(sock_path):
    # A connection holds a 256 KiB receive buffer: a cycle through its channel would keep
    # every ended one until a full collection (the fuzzer saw hundreds, and their memory).
    import weakref

    async def main():
        async with hintens.aio.Server(sock_path) as server:
            async with hintens.aio.Client(sock_path, timeout=10) as client:
                assert await client.request(b"x") == b"x"
                gone = weakref.ref(server.connections[0])
            for _ in range(200):
                if not server.connections:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert gone() is None
        return weakref.ref(client)

    gc.disable()
    try:
        client_ref = run(main())
        assert client_ref() is None
    finally:
        gc.enable()
