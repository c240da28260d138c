"""A failure leaves nothing for the garbage collector to find.

An exception raised from a frame that also holds it in a local (or holds an earlier error whose
traceback has that frame) makes a reference cycle: exception -> traceback -> frame -> exception.
The cycle keeps every frame of the traceback alive, and with them what they hold (a payload,
a lent shared-memory view, a reply's descriptors), until a full collection runs, which in a
busy service may be seconds away. Each test here runs with the collector off and checks that
the payload of a failed (or retried) call is freed as soon as the caller lets go of it.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import weakref

import pytest

import hintens
import hintens.aio

from .peers import raw_listener
from .test_pool import CuttingServer   # cuts its connection after a first run of cut:...


class Payload(bytearray):
    """A payload that can be watched: bytearray itself takes no weak references."""


@pytest.fixture
def collector_off():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_a_sync_pool_request_retried_after_a_lost_answer_keeps_nothing(sock_path,
                                                                         collector_off):
    served = CuttingServer(sock_path)
    try:
        with hintens.ClientPool(sock_path, exactly_once=True) as pool:
            payload = Payload(b"cut:sync")
            watch = weakref.ref(payload)
            assert pool.request(payload) == b"ran 1"
            del payload
            assert watch() is None, gc.get_referrers(watch())
        assert served.runs == {b"cut:sync": 1}
    finally:
        served.close()


def test_an_asyncio_pool_request_retried_after_a_lost_answer_keeps_nothing(sock_path,
                                                                           collector_off):
    served = CuttingServer(sock_path)

    async def main():
        async with hintens.aio.ClientPool(sock_path, exactly_once=True) as pool:
            payload = Payload(b"cut:aio")
            watch = weakref.ref(payload)
            assert await pool.request(payload) == b"ran 1"
            del payload
            # The loop's own bookkeeping may still hold the finished task for a turn.
            await asyncio.sleep(0)
            assert watch() is None, gc.get_referrers(watch())

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
        assert served.runs == {b"cut:aio": 1}
    finally:
        served.close()


def test_a_payload_over_the_peers_limit_is_refused_and_freed(sock_path, collector_off):
    server = hintens.Server(sock_path, max_payload=4096, shm=False).start()
    try:
        with hintens.Client(sock_path, shm=False) as client:
            client.wait_for_hello(5)
            payload = Payload(8192)
            watch = weakref.ref(payload)
            with pytest.raises(hintens.FrameTooLargeError):
                client.request(payload)
            del payload
            assert watch() is None, gc.get_referrers(watch())
            assert client.request(b"still here") == b"still here"
    finally:
        server.close()


def test_a_send_that_times_out_frees_its_payload(sock_path, collector_off):
    listener = raw_listener(sock_path)
    accepted: list[socket.socket] = []
    acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    acceptor.start()
    try:
        with hintens.Client(sock_path, shm=False, timeout=0.3) as client:
            payload = Payload(8 << 20)   # far more than the socket buffers take
            watch = weakref.ref(payload)
            with pytest.raises(hintens.Timeout):
                client.request(payload)
            del payload
            assert watch() is None, gc.get_referrers(watch())
    finally:
        acceptor.join()
        for sock in accepted:
            sock.close()
        listener.close()


def test_an_asyncio_payload_over_the_peers_limit_is_refused_and_freed(sock_path,
                                                                      collector_off):
    server = hintens.Server(sock_path, max_payload=4096, shm=False).start()

    async def main():
        async with hintens.aio.Client(sock_path, shm=False) as client:
            await client.wait_for_hello(5)
            payload = Payload(8192)
            watch = weakref.ref(payload)
            with pytest.raises(hintens.FrameTooLargeError):
                await client.request(payload)
            del payload
            assert watch() is None, gc.get_referrers(watch())
            assert await client.request(b"still here") == b"still here"

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.close()


def test_an_asyncio_request_that_times_out_unsent_frees_its_payload(sock_path, collector_off):
    listener = raw_listener(sock_path)
    accepted: list[socket.socket] = []
    acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    acceptor.start()

    async def main():
        async with hintens.aio.Client(sock_path, shm=False, timeout=0.3) as client:
            payload = Payload(8 << 20)   # far more than the socket buffers take
            watch = weakref.ref(payload)
            with pytest.raises(hintens.Timeout):
                await client.request(payload)
            del payload
            await asyncio.sleep(0)
            assert watch() is None, gc.get_referrers(watch())

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        acceptor.join()
        for sock in accepted:
            sock.close()
        listener.close()
