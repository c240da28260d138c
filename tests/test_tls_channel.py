"""The Channel over TLS, against real server processes. The compiled core drives OpenSSL's
object itself (``TlsStream.tls_parts``), the twin goes through TlsStream's socket interface;
both must give the same results:

- many threads on one connection (reads and writes of several threads through one OpenSSL
  object), with sizes around the TLS record (16 KiB), the channel's buffer (256 KiB) and
  more, and Events beside them;
- a reply that does not come in time (the receive wait, a poll of its own) and a peer that
  reads nothing (the send wait): a clear ``Timeout`` within bounds, and nothing kept after.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import sys
import threading
import time

import pytest

import hintens
from hintens import _impl

from .peers import _spawn, free_port, open_fds, wait_until

trustme = pytest.importorskip("trustme", reason="trustme is in the test extra")

#: Sizes around the record, the receive buffer and the joining of small writes.
SIZES = [0, 1, 100, 16_383, 16_384, 16_385, 65_537, 262_143, 262_145, (1 << 20) + 3]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("pki")
    ca_pem, server_pem = folder / "ca.pem", folder / "server.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    return {"ca": ca, "client": ca.issue_cert("client.example"), "ca_pem": str(ca_pem),
            "server_pem": str(server_pem)}


def client_context(pki):
    context = ssl.create_default_context()
    pki["ca"].configure_trust(context)
    pki["client"].configure_cert(context)
    return context


def server_context(pki):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server_pem"])
    context.load_verify_locations(pki["ca_pem"])
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def spawn(kind, pki):
    """A sync or asyncio TLS server process (tests.handlers' command, Events kept by
    record_event); its address once it listens."""
    address = f"tcp://127.0.0.1:{free_port()}"
    lines = ["import asyncio, ssl, hintens, hintens.aio",
             "from tests.handlers import command, async_command, record_event",
             "context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)",
             f"context.load_cert_chain({pki['server_pem']!r})",
             f"context.load_verify_locations({pki['ca_pem']!r})",
             "context.verify_mode = ssl.CERT_REQUIRED",
             "options = dict(ssl_context=context, on_event=record_event,"
             " max_payload=8 << 20)"]
    if kind == "sync":
        lines += [f"hintens.Server({address!r}, command, **options).serve_forever()"]
    else:
        lines += ["async def main():",
                  f"    await hintens.aio.Server({address!r}, async_command,"
                  " **options).serve_forever()",
                  "asyncio.run(main())"]
    process = _spawn([sys.executable, "-c", "\n".join(lines) + "\n"], address)
    return process, address


@pytest.fixture(params=["sync", "aio"])
def served(request, pki):
    process, address = spawn(request.param, pki)
    yield address
    process.kill()
    process.wait()


@pytest.mark.skipif(not _impl.core.DRIVES_TLS,
                    reason="the pure-Python core goes through TlsStream's socket interface")
def test_the_compiled_core_drives_openssl_itself(served, pki):
    with hintens.Client(served, ssl_context=client_context(pki)) as client:
        assert client.request(b"echo:x") == b"x"
        channel = client._conn.channel
        assert type(channel) is _impl.core.Channel
        assert channel.tls_pending() is False   # everything read: nothing waits decrypted


def test_threads_share_one_tls_connection(served, pki):
    threads, rounds = 6, 3
    failures: list[BaseException] = []
    with hintens.Client(served, ssl_context=client_context(pki), timeout=60,
                        max_payload=8 << 20) as client:

        def requester(seed: int) -> None:
            try:
                for round_ in range(rounds):
                    for size in SIZES:
                        payload = os.urandom(size)
                        assert bytes(client.request(b"echo:" + payload)) == payload, \
                            (seed, round_, size)
            except BaseException as error:   # reported by the main thread
                failures.append(error)

        def eventer() -> None:
            try:
                for number in range(3000):
                    client.send_event(b"%d" % number)
            except BaseException as error:
                failures.append(error)

        workers = [threading.Thread(target=requester, args=(k,)) for k in range(threads)]
        workers.append(threading.Thread(target=eventer))
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert not failures, failures
        assert not any(worker.is_alive() for worker in workers)
        client.flush()

        def summary():
            return json.loads(bytes(client.request(b"events:")))

        assert wait_until(lambda: summary()["count"] == 3000)
        assert summary()["in_order"]


def test_a_reply_that_does_not_come_in_time_is_a_timeout(served, pki):
    with hintens.Client(served, ssl_context=client_context(pki), timeout=0.5) as client:
        assert client.request(b"echo:warm") == b"warm"
        started = time.monotonic()
        with pytest.raises(hintens.Timeout):
            client.request(b"sleep:2:late")
        assert 0.4 < time.monotonic() - started < 1.9
        # The late reply, when it comes, is dropped; the connection serves on.
        assert client.request(b"echo:after", timeout=10) == b"after"


def test_a_peer_that_reads_nothing_times_the_send_out(pki):
    """A TLS peer that completes the handshake, then neither reads nor writes: a request
    larger than the socket buffers fails with Timeout after the timeout, and the client
    keeps no descriptor."""
    listener = socket.create_server(("127.0.0.1", 0))
    context = server_context(pki)
    held: list[ssl.SSLSocket] = []

    def accept() -> None:
        sock, _ = listener.accept()
        held.append(context.wrap_socket(sock, server_side=True))   # the handshake

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    baseline = open_fds()
    try:
        address = "tcp://127.0.0.1:%d" % listener.getsockname()[1]
        with hintens.Client(address, ssl_context=client_context(pki), timeout=0.5,
                            max_payload=64 << 20) as client:
            acceptor.join(10)
            payload = bytes(32 << 20)   # far more than the socket buffers take
            started = time.monotonic()
            with pytest.raises(hintens.Timeout):
                client.request(payload)
            assert 0.4 < time.monotonic() - started < 5
        # (the peer's end, in this process too, is open until the end)
        assert wait_until(lambda: open_fds() <= baseline + len(held))
    finally:
        acceptor.join(10)
        for sock in held:
            sock.close()
        listener.close()


def test_a_signal_while_a_request_waits_over_tls_acts_at_once(served, pki):
    """A signal whose handler raises (Ctrl-C, say), while a request waits for its reply over
    TLS: the exception comes out of request() at once, not when the reply or the timeout
    comes."""

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with hintens.Client(served, ssl_context=client_context(pki), timeout=30) as client:
            assert client.request(b"echo:warm") == b"warm"
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            started = time.monotonic()
            with pytest.raises(Interrupted):
                client.request(b"sleep:5:late")
            assert time.monotonic() - started < 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Tick(Exception):
    pass


@pytest.fixture
def tls_pair():
    """Both ends of a TLS stream over a socketpair, handshake done: (our TlsStream, the
    peer's SSLSocket)."""
    from hintens.transport.tls import TlsStream

    ca = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_side)
    client_side = ssl.create_default_context()
    ca.configure_trust(client_side)
    a, b = socket.socketpair()
    peer = server_side.wrap_socket(b, server_side=True, do_handshake_on_connect=False)
    ours = client_side.wrap_socket(a, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    shake = threading.Thread(target=peer.do_handshake)
    shake.start()
    ours.do_handshake()
    shake.join(10)
    stream = TlsStream(ours)
    yield stream, peer
    stream.close()
    peer.close()


@pytest.fixture
def ticking():
    """A SIGALRM every 0.5 ms whose handler raises _Tick while ``armed[0]`` is True."""
    armed = [False]

    def tick(signum, frame):
        if armed[0]:
            raise _Tick()

    previous = signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    yield armed
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


compiled_only = pytest.mark.skipif(
    not _impl.core.DRIVES_TLS,
    reason="pure-Python I/O cannot be made safe against a handler's exception between two "
           "bytecodes (between a read and the decoding of what it read)")


@compiled_only
def test_a_signal_during_tls_writes_never_sends_bytes_twice(tls_pair, ticking):
    """ssl looks at signals after its OpenSSL call: a handler's exception raised there came
    after the bytes left. The channel must not send them again (it did: the outbox put them
    back in its queue); the stream breaks instead."""
    stream, peer = tls_pair
    channel = stream.channel_class(stream, _impl.core.FrameDecoder(), 65536)
    seen: list[int] = []

    def read_peer() -> None:
        decoder = _impl.core.FrameDecoder()
        while True:
            data = peer.recv(1 << 16)
            if not data:
                return
            seen.extend(frame.request_id for frame in decoder.feed(data))

    reader = threading.Thread(target=read_peer, daemon=True)
    reader.start()
    ticks = 0
    deadline = time.monotonic() + 3
    payload = b"y" * 2000
    try:
        while time.monotonic() < deadline:
            try:
                ticking[0] = True
                channel.event(payload)
                channel.flush()
            except _Tick:
                ticks += 1
            except OSError:
                break   # broken by a signal that came after the bytes left: allowed
            finally:
                ticking[0] = False
    finally:
        ticking[0] = False
    assert ticks, "no signal arrived during the writes: nothing was tested"
    try:
        channel.flush()
    except OSError:
        pass
    channel.stop_reading()
    stream.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} frames came twice"
    assert seen == sorted(seen)


@compiled_only
def test_a_signal_during_tls_reads_never_loses_bytes_unnoticed(tls_pair, ticking):
    """A handler's exception raised after OpenSSL took a record loses that record: the stream
    must then end (the decoder reports it), never go on with a hole in it."""
    stream, peer = tls_pair
    channel = stream.channel_class(stream, _impl.core.FrameDecoder(), 65536)
    count = 5000
    frame = _impl.core.encode_frame(3, b"x" * 3000, 7)

    def send_peer() -> None:
        data = frame * count
        try:
            for start in range(0, len(data), 5001):   # records that do not align with frames
                peer.sendall(data[start:start + 5001])
        except OSError:
            pass   # our end broke and went away

    sender = threading.Thread(target=send_peer, daemon=True)
    sender.start()
    frames = ticks = 0
    ended = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and frames < count:
        try:
            ticking[0] = True
            got = channel.receive()
        except _Tick:
            ticks += 1
            continue
        finally:
            ticking[0] = False
        if got is None:
            ended = True
            break
        assert all(bytes(f.payload) == b"x" * 3000 for f in got)
        frames += len(got)
    assert ticks, "no signal arrived during the reads: nothing was tested"
    assert frames == count or ended, (frames, ticks)


@compiled_only
def test_a_tls_send_that_times_out_breaks_the_stream(tls_pair):
    """A send the peer does not take within the send timeout: OpenSSL may hold part of a
    record of it, and a later send with other bytes would follow that part on the wire. The
    stream is broken instead, and a later send fails."""
    from hintens.transport.unix import set_kernel_timeouts

    stream, peer = tls_pair
    channel = stream.channel_class(stream, _impl.core.FrameDecoder(), 65536)
    set_kernel_timeouts(stream, None, 0.2)
    with pytest.raises(BlockingIOError):
        channel.send([b"A" * (16 << 20)])   # the peer reads nothing
    assert channel.broken
    with pytest.raises(OSError):
        channel.send([b"B" * 200_000])
