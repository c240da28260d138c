"""hintens.aio.Client against real servers: the sync Server in another process (the
``server_process`` fixture, tests/handlers.py:command) or in this one, and raw-socket peers."""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import threading

import pytest

import hintens
import hintens.aio

from .peers import open_fds, raw_listener

CYTHON = hintens.implementation == "cython"


def run(coroutine, timeout=60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def _registered(server, count=1):
    """The server lists the connection (after its hello went out, which the client may see
    first): a broadcast reaches it from then on."""
    while len(server.connections) < count:
        await asyncio.sleep(0.005)


def test_a_request_and_its_reply(server_process, sock_path):
    async def main():
        async with hintens.aio.Client(sock_path) as client:
            assert await client.request(b"echo:hello") == b"hello"
            assert await client.request(b"size:0") == b""
            assert client.peer_hello is not None
        assert client.closed

    run(main())


@pytest.mark.parametrize("shm", [True, False])
def test_every_reply_is_a_memoryview_that_with_releases(server_process, sock_path, shm):
    async def main():
        async with hintens.aio.Client(sock_path, shm=shm) as client:
            for size in (5, 1 << 20):
                with await client.request(b"echo:" + b"x" * size) as reply:
                    assert type(reply) is memoryview and reply == b"x" * size
                assert [type(r) for r in await client.request_many([b"echo:a", b"echo:b"])] \
                    == [memoryview, memoryview]

    run(main())


def test_connect_and_close(server_process, sock_path):
    async def main():
        client = await hintens.aio.Client.connect(sock_path, timeout=10)
        assert await client.request(b"echo:x") == b"x"
        await client.close()
        await client.close()   # idempotent
        with pytest.raises(hintens.ConnectionClosed):
            await client.request(b"echo:y")

    run(main())


def test_an_unopened_client_says_so(sock_path):
    async def main():
        client = hintens.aio.Client(sock_path)
        with pytest.raises(RuntimeError, match="not connected"):
            await client.request(b"x")

    run(main())


def test_no_server_is_a_connect_error(sock_path):
    async def main():
        with pytest.raises(hintens.ConnectError):
            await hintens.aio.Client.connect(sock_path)

    run(main())


def test_a_thousand_concurrent_requests_from_tasks_on_one_connection(server_process, sock_path):
    async def main():
        async with hintens.aio.Client(sock_path) as client:
            replies = await asyncio.gather(*(client.request(b"echo:%d" % i)
                                             for i in range(1000)))
            assert replies == [b"%d" % i for i in range(1000)]
            assert client._waiters == {}

    run(main())


def test_remote_errors_keep_their_class_and_the_connection(server_process, sock_path):
    async def main():
        async with hintens.aio.Client(sock_path) as client:
            with pytest.raises(hintens.HandlerError, match="boom"):
                await client.request(b"raise:boom")
            with pytest.raises(hintens.RemoteError) as caught:
                await client.request(b"app:1234:no such thing")
            assert caught.value.code == 1234
            assert await client.request(b"echo:still here") == b"still here"

    run(main())


def test_a_timeout_leaves_the_connection_usable_and_drops_the_late_reply(server_process,
                                                                        sock_path):
    async def main():
        async with hintens.aio.Client(sock_path) as client:
            with pytest.raises(hintens.Timeout):
                await client.request(b"sleep:0.5:late", timeout=0.05)
            assert client._waiters == {}
            assert await client.request(b"echo:next") == b"next"   # the late reply is dropped
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.request(b"sleep:0.5:late"), 0.05)
            assert await client.request(b"echo:after wait_for") == b"after wait_for"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await client.request(b"sleep:0.5:late")
            assert client._waiters == {}
            assert await client.request(b"echo:after") == b"after"

    run(main())


def test_a_cancellation_storm_leaves_nothing_behind(sock_path):
    # Large replies travel through shared memory: a cancelled request's late reply is a lent
    # view, and dropping it must give the server its segment back.
    def handler(payload):
        return bytes(payload) * 4096 if len(payload) < 64 else bytes(payload)

    with hintens.Server(sock_path, handler, shm_pool_bytes=64 << 20).start() as server:
        async def main():
            async with hintens.aio.Client(sock_path) as client:
                async def one(i):
                    reply = await client.request(b"%04d" % i * 4)
                    assert bytes(reply) == b"%04d" % i * 4 * 4096
                    if isinstance(reply, memoryview):   # lent (the pure-Python core copies)
                        reply.release()   # the application holds no more than it uses
                    return i

                rng = random.Random(12)
                answered = 0
                for _ in range(5):
                    tasks = [asyncio.ensure_future(one(i)) for i in range(400)]
                    for _ in range(rng.randrange(0, 4)):
                        await asyncio.sleep(0)
                    for task in tasks:
                        if rng.random() < 0.5:
                            task.cancel()
                    results = await asyncio.gather(*tasks, return_exceptions=True)
                    assert all(r == i or isinstance(r, asyncio.CancelledError)
                               for i, r in enumerate(results))
                    answered += sum(r == i for i, r in enumerate(results))
                    del results, tasks
                assert answered > 0 and client._waiters == {}
                gc.collect()
                reply = await client.request(b"last" * 4)
                assert bytes(reply) == b"last" * 4 * 4096
                del reply
                await asyncio.sleep(0.2)   # the last releases reach the server
                (connection,) = server.connections
                pool = connection._endpoint.pool
                assert pool is not None and not pool._peer   # every segment is back

        run(main())


def test_large_payloads_travel_through_shared_memory_both_ways(sock_path):
    with hintens.Server(sock_path, lambda payload: bytes(payload)[::-1]).start():
        async def main():
            async with hintens.aio.Client(sock_path) as client:
                payload = bytes(range(256)) * 4096   # 1 MiB
                for _ in range(20):
                    reply = await client.request(payload)
                    assert reply == payload[::-1]
                    if CYTHON:   # lent from the segment; the pure-Python core copies it out
                        assert isinstance(reply, memoryview) and reply.readonly
                        with reply:
                            pass
                assert client._endpoint.segments   # the server's, mapped here

        run(main())


def test_events_both_ways_with_sync_and_async_callbacks(sock_path):
    got, pushed_sync, pushed_async = [], [], []
    done = threading.Event()

    def on_event(payload, connection):
        got.append(bytes(payload))
        if len(got) == 50:
            done.set()

    with hintens.Server(sock_path, on_event=on_event).start() as server:
        async def main():
            arrived = asyncio.Event()

            async def on_push(payload):
                await asyncio.sleep(0)
                pushed_async.append(bytes(payload))
                if len(pushed_async) == 3:
                    arrived.set()

            async with hintens.aio.Client(sock_path, on_event=pushed_sync.append) as first, \
                    hintens.aio.Client(sock_path, on_event=on_push) as second:
                for i in range(50):
                    await first.send_event(b"%d" % i)
                await first.flush()
                assert await second.request(b"sync") == b"sync"
                await _registered(server, 2)
                for i in range(3):
                    assert server.broadcast(b"push %d" % i) == 2
                await asyncio.wait_for(arrived.wait(), 10)
                while len(pushed_sync) < 3:
                    await asyncio.sleep(0.01)

        run(main())
        assert done.wait(10)
    assert got == [b"%d" % i for i in range(50)]
    assert [bytes(p) for p in pushed_sync] == pushed_async == [b"push %d" % i for i in range(3)]


def test_a_server_that_goes_fails_waiting_requests(sock_path):
    listener = raw_listener(sock_path)

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)   # the hello, and maybe the request
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()

    async def main():
        async with hintens.aio.Client(sock_path) as client:
            with pytest.raises(hintens.ConnectionClosed):   # closed, reset, or lost writing
                await client.request(b"never answered")
            assert client.closed

    run(main())
    thread.join(5)
    listener.close()


def test_a_hostile_server_is_cut_cleanly_and_leaks_nothing(sock_path):
    listener = raw_listener(sock_path)
    before = open_fds()

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"\xff" * 24)   # not a header: the stream cannot be trusted
        try:
            conn.recv(1)
        except OSError:
            pass
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()

    async def main():
        async with hintens.aio.Client(sock_path) as client:
            with pytest.raises(hintens.ConnectionClosed, match="broke the protocol"):
                await client.request(b"x")

    run(main())
    thread.join(5)
    listener.close()
    gc.collect()
    assert open_fds() <= before


def test_the_sync_and_async_clients_share_a_server(server_process, sock_path):
    async def main():
        async with hintens.aio.Client(sock_path) as client:
            with hintens.Client(sock_path) as sync_client:
                assert sync_client.request(b"echo:sync") == b"sync"
                assert await client.request(b"echo:async") == b"async"

    run(main())


def test_the_socket_is_non_blocking_and_driven_by_the_loop(server_process, sock_path):
    async def main():
        async with hintens.aio.Client(sock_path) as client:
            sock = client._conn.sock
            assert isinstance(sock, socket.socket) and not sock.getblocking()
            assert await client.request(b"echo:ok") == b"ok"

    run(main())


def test_allocate_sends_without_a_copy_and_says_when_it_cannot(sock_path):
    with hintens.Server(sock_path, lambda payload: bytes(payload[:4])).start():
        async def main():
            async with hintens.aio.Client(sock_path) as client:
                for n in range(5):
                    buffer = client.allocate(1 << 20)
                    buffer[:4] = b"%04d" % n
                    assert await client.request(buffer) == b"%04d" % n
                with pytest.raises(ValueError):
                    client.allocate(0)
            async with hintens.aio.Client(sock_path, shm=False) as client:
                with pytest.raises(hintens.ShmError):
                    client.allocate(1 << 20)

        run(main())


def test_a_codec_encodes_requests_and_events_and_decodes_replies(sock_path):
    events = []
    got_event = threading.Event()

    def on_event(value, connection):
        events.append(value)
        got_event.set()

    with hintens.Server(sock_path, lambda value: {"echo": value}, codec="json",
                        on_event=on_event).start() as server:
        async def main():
            pushed = asyncio.Event()
            received = []

            def on_push(value):
                received.append(value)
                pushed.set()

            async with hintens.aio.Client(sock_path, codec="json", on_event=on_push) as client:
                assert await client.request({"n": [1, 2]}) == {"echo": {"n": [1, 2]}}
                await client.send_event(["hello"])
                await client.flush()
                assert server.broadcast({"to": "all"}) == 1
                await asyncio.wait_for(pushed.wait(), 10)
            assert received == [{"to": "all"}]

        run(main())
        assert got_event.wait(10)
    assert events == [["hello"]]


def test_compression_is_negotiated_and_inline_payloads_travel_compressed(sock_path):
    with hintens.Server(sock_path, compress=True).start():
        async def main():
            async with hintens.aio.Client(sock_path, compress=True, shm=False) as client:
                payload = b"compressible text " * 2000   # 36 KB, inline
                assert await client.request(payload) == payload
                assert client._endpoint.compressing
            async with hintens.aio.Client(sock_path, shm=False) as client:
                assert await client.request(b"plain") == b"plain"
                assert not client._endpoint.compressing

        run(main())


def test_events_as_an_async_iterator_in_order_until_the_connection_closes(sock_path):
    with hintens.Server(sock_path).start() as server:
        async def main():
            client = await hintens.aio.Client.connect(sock_path)
            received = []

            async def consume():
                async for payload in client.events():
                    received.append(bytes(payload))

            consumer = asyncio.ensure_future(consume())
            await asyncio.sleep(0)          # it is iterating: Events are kept from now on
            await _registered(server)
            for i in range(100):
                assert server.broadcast(b"%d" % i) == 1
            while len(received) < 100:
                await asyncio.sleep(0.01)
            await client.close()
            await asyncio.wait_for(consumer, 5)   # ends with the connection
            assert received == [b"%d" % i for i in range(100)]
            assert client.events_dropped == 0

        run(main())


def test_events_nobody_takes_are_bounded(sock_path):
    with hintens.Server(sock_path).start() as server:
        async def main():
            async with hintens.aio.Client(sock_path, max_queued_events=10) as client:
                iterator = client.events().__aiter__()
                first = asyncio.ensure_future(iterator.__anext__())
                await asyncio.sleep(0)          # iterating: Events are kept from now on
                await _registered(server)
                for i in range(50):
                    server.broadcast(b"%d" % i)
                taken = [bytes(await asyncio.wait_for(first, 5))]
                while len(taken) + len(client._event_queue) + client.events_dropped < 50:
                    await asyncio.sleep(0.01)   # every Event taken, kept or dropped
                kept = len(client._event_queue)
                assert kept <= 10 and client.events_dropped >= 50 - 1 - 10
                taken += [bytes(await iterator.__anext__()) for _ in range(kept)]
                numbers = [int(payload) for payload in taken]
                assert numbers == sorted(numbers) and numbers[0] == 0   # in order
            with pytest.raises(RuntimeError, match="on_event"):
                async with hintens.aio.Client(sock_path, on_event=print) as other:
                    await other.events().__anext__()

        run(main())


def test_a_shorter_deadline_after_a_longer_one_still_fires_on_time(server_process, sock_path):
    async def main():
        async with hintens.aio.Client(sock_path) as client:
            loop = asyncio.get_running_loop()
            slow = asyncio.ensure_future(client.request(b"sleep:0.3:slow", timeout=20))
            await asyncio.sleep(0)
            started = loop.time()
            with pytest.raises(hintens.Timeout):
                await client.request(b"sleep:0.5:late", timeout=0.05)
            assert loop.time() - started < 5    # its own deadline, not the 20 s one
            assert await slow == b"slow"
            assert await client.request(b"echo:after") == b"after"
            assert client._waiters == {}

    run(main())


def test_a_server_that_reads_nothing_cannot_make_the_client_queue_without_end(sock_path):
    # The listener accepts (the kernel does) but nobody reads: once the socket's buffer and
    # the client's queue are full, send_event waits for room, then raises Timeout; and a
    # connection whose bytes wait `timeout` with none taken is cut.
    listener = raw_listener(sock_path)
    try:
        async def main():
            client = await hintens.aio.Client.connect(sock_path, shm=False, timeout=0.5)
            accepted, _ = listener.accept()
            try:
                payload = bytes(60_000)
                with pytest.raises((hintens.Timeout, hintens.ConnectionClosed)):
                    for _ in range(10_000):   # far more than the kernel buffers hold
                        await client.send_event(payload)
                queued = client._conn.channel.queued
                assert queued < 4 << 20, queued   # bounded by max_queue, not by the loop
                for _ in range(300):
                    if client.closed:
                        break
                    await asyncio.sleep(0.01)
                assert client.closed
                with pytest.raises(hintens.ConnectionClosed, match="read nothing"):
                    await client.request(b"x")
            finally:
                accepted.close()
                await client.close()

        run(main())
    finally:
        listener.close()
