"""The same frames over TCP (issue 13): every sync and asyncio combination over loopback,
limits without shared memory, codecs and compression, the exactly-once pool across a server
restart, peers that stop mid-frame, connect errors, and a server in another network
namespace whose cable is pulled."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

import hintens
import hintens.aio
from hintens.protocol.hello import FEATURE_SHM

from .peers import (
    REPO,
    HEADER,
    free_port,
    raw_frame,
    start_aio_server_with,
    start_server_with,
    stop_server,
)


def run(coroutine, timeout=60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.fixture
def tcp_address():
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(params=["sync", "aio"])
def tcp_server(request, tcp_address):
    """A server process of each kind on a loopback TCP port (tests.handlers' command)."""
    if request.param == "sync":
        process = start_server_with(tcp_address, max_payload=8 << 20)
    else:
        process = start_aio_server_with(tcp_address, max_payload=8 << 20)
    yield tcp_address
    stop_server(process)


@pytest.mark.parametrize("client_kind", ["sync", "aio"])
def test_every_client_with_every_server_over_tcp(tcp_server, client_kind):
    big = bytes(range(256)) * (16 << 10)   # 4 MiB: inline, there is no shared memory
    if client_kind == "sync":
        with hintens.Client(tcp_server, timeout=20) as client:
            assert client.server_credentials is None
            assert not client.wait_for_hello(5).features & FEATURE_SHM
            assert client.request(b"echo:hello") == b"hello"
            assert client.request(b"echo:" + big) == big
            assert len(client.request(b"size:5000000")) == 5_000_000
            with pytest.raises(hintens.RemoteError, match="boom"):
                client.request(b"raise:boom")
            assert client.request_many([b"echo:%d" % i for i in range(100)]) == \
                [b"%d" % i for i in range(100)]
            for i in range(100):
                client.send_event(b"%d" % i)
            client.flush()
            assert client.request(b"echo:after events") == b"after events"
    else:
        async def main():
            async with hintens.aio.Client(tcp_server, timeout=20) as client:
                assert client.server_credentials is None
                assert await client.request(b"echo:hello") == b"hello"
                assert await client.request(b"echo:" + big) == big
                replies = await asyncio.gather(*(client.request(b"echo:%d" % i)
                                                 for i in range(500)))
                assert replies == [b"%d" % i for i in range(500)]
                with pytest.raises(hintens.RemoteError, match="boom"):
                    await client.request(b"raise:boom")

        run(main())


def test_over_the_servers_limit_fails_locally_and_the_connection_stays(tcp_server):
    # No shared memory to fall back on: over the server's max_payload (8 MiB here) the
    # client refuses before sending a byte; a reply over the client's limit is an Error.
    with hintens.Client(tcp_server, timeout=20, max_payload=1 << 20) as client:
        with pytest.raises(hintens.FrameTooLargeError):
            client.request(bytes(9 << 20))
        assert client.request(b"echo:still") == b"still"
        with pytest.raises(hintens.RemoteError) as raised:
            client.request(b"size:2000000")
        assert raised.value.code == hintens.ErrorCode.TOO_LARGE
        assert client.request(b"echo:still") == b"still"


def test_codecs_and_compression_over_tcp(tcp_address):
    pytest.importorskip("zstandard")
    server = hintens.Server(tcp_address, lambda value: {"got": value}, codec="json",
                            compress=True, compress_threshold=256).start()
    try:
        with hintens.Client(tcp_address, codec="json", compress=True,
                            compress_threshold=256, timeout=10) as client:
            value = {"text": "x" * 100_000}
            assert client.request(value) == {"got": value}

        async def main():
            async with hintens.aio.Client(tcp_address, codec="json", compress=True,
                                          timeout=10) as client:
                assert await client.request([1, 2]) == {"got": [1, 2]}

        run(main())
    finally:
        server.close()


def test_one_server_on_a_unix_socket_and_a_tcp_port(sock_path, tcp_address):
    server = hintens.Server([sock_path, tcp_address]).start()
    try:
        assert server.addresses == [sock_path, tcp_address]
        assert server.path == sock_path
        with hintens.Client(sock_path, timeout=10) as local, \
                hintens.Client(f"unix:{sock_path}", timeout=10) as prefixed, \
                hintens.Client(tcp_address, timeout=10) as remote:
            assert local.request(b"a") == b"a" and remote.request(b"b") == b"b"
            assert prefixed.request(b"c") == b"c"
            assert local.wait_for_hello(5).features & FEATURE_SHM          # shared memory here
            assert not remote.wait_for_hello(5).features & FEATURE_SHM     # never over TCP
            addresses = sorted(c.address for c in server.connections)
            assert addresses[0].startswith("tcp://127.0.0.1:")
            assert addresses[1:] == [f"unix:{sock_path}"] * 2
            tcp_peer = [c for c in server.connections if c.address.startswith("tcp")][0]
            assert tcp_peer.peer.pid == -1 and not tcp_peer.shm
    finally:
        server.close()
    assert not os.path.exists(sock_path)


def test_port_zero_and_the_default_host():
    server = hintens.Server("tcp://:0").start()
    try:
        (address,) = server.addresses
        assert address.startswith("tcp://127.0.0.1:") and not address.endswith(":0")
        with hintens.Client(address, timeout=10) as client:
            assert client.request(b"x") == b"x"
    finally:
        server.close()


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        server = hintens.Server("tcp://[::1]:0").start()
    except OSError as error:
        pytest.skip(f"cannot bind ::1 here: {error}")
    try:
        address = server.addresses[0]
        assert address.startswith("tcp://[::1]:")
        with hintens.Client(address, timeout=10) as client:
            assert client.request(b"v6") == b"v6"
    finally:
        server.close()


def test_a_non_loopback_bind_without_tls_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="hintens"):
        server = hintens.Server("tcp://0.0.0.0:0")
    server.close()
    assert any("without TLS" in record.getMessage() for record in caplog.records)


def test_connect_errors_name_what_went_wrong():
    with pytest.raises(hintens.ConnectError, match="refused"):
        hintens.Client(f"tcp://127.0.0.1:{free_port()}", connect_timeout=2)
    with pytest.raises(hintens.ConnectError, match="no-such-host.invalid"):
        hintens.Client("tcp://no-such-host.invalid:7400", connect_timeout=2)

    async def main():
        with pytest.raises(hintens.ConnectError, match="refused"):
            await hintens.aio.Client.connect(f"tcp://127.0.0.1:{free_port()}",
                                             connect_timeout=2)

    run(main())


@pytest.mark.parametrize("address", ["tcp://host", "tcp://host:port", "tcp://::1:70",
                                     "tcp://[::1]70", "tcp://h:70000", "tcp://:7400"])
def test_malformed_addresses_are_refused_before_anything_is_sent(address):
    with pytest.raises(hintens.SocketPathError):
        hintens.Client(address)


def test_a_server_that_stops_mid_frame_ends_in_timeout(tcp_address):
    # A "server" that accepts, sends half of a frame, and never says another word.
    host, port = "127.0.0.1", int(tcp_address.rsplit(":", 1)[1])
    listener = socket.create_server((host, port))
    try:
        def sync_client():
            with hintens.Client(tcp_address, timeout=0.5, connect_timeout=2) as client:
                peer, _ = listener.accept()
                try:
                    peer.sendall(raw_frame(b"x" * 100, msg_type=2)[:30])
                    started = time.monotonic()
                    with pytest.raises((hintens.Timeout, hintens.ConnectionClosed)):
                        client.request(b"anything")
                    assert time.monotonic() - started < 5
                finally:
                    peer.close()

        sync_client()

        async def main():
            client = await hintens.aio.Client.connect(tcp_address, timeout=0.5)
            peer, _ = listener.accept()
            try:
                peer.sendall(raw_frame(b"x" * 100, msg_type=2)[:30])
                with pytest.raises((hintens.Timeout, hintens.ConnectionClosed)):
                    await client.request(b"anything")
            finally:
                peer.close()
                await client.close()

        run(main())
    finally:
        listener.close()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_client_that_stops_mid_frame_is_cut_at_frame_timeout(tcp_address, kind):
    starter = start_server_with if kind == "sync" else start_aio_server_with
    process = starter(tcp_address, frame_timeout=0.5)
    try:
        port = int(tcp_address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
            peer.sendall(raw_frame(b"y" * 1000)[:HEADER.size + 10])
            started = time.monotonic()
            data = b""
            while True:
                chunk = peer.recv(65536)
                if not chunk:
                    break
                data += chunk
            assert time.monotonic() - started < 5
        with hintens.Client(tcp_address, timeout=10) as client:   # it still serves
            assert client.request(b"echo:ok") == b"ok"
    finally:
        stop_server(process)


def test_the_exactly_once_pool_across_a_server_restart(tcp_address):
    process = start_server_with(tcp_address)
    try:
        with hintens.ClientPool(tcp_address, 2, exactly_once=True, timeout=10,
                                retry=hintens.RetryPolicy(max_attempts=4, backoff=0.2)) as pool:
            assert pool.request(b"count:warm") == b"1"
            import threading

            box = {}

            def call():
                try:
                    box["reply"] = pool.request(b"sleep:2:slow")
                except Exception as error:   # what the test looks at
                    box["error"] = error

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.5)   # the request is running on the server
            process.send_signal(signal.SIGKILL)
            process.wait()
            process = start_server_with(tcp_address)
            caller.join(30)
            error = box.get("error")
            assert isinstance(error, hintens.ConnectionClosed), box
            assert error.request_sent and "restarted" in str(error)
            assert pool.request(b"count:after") == b"1"   # the pool carries on
    finally:
        stop_server(process)


# A server in another network namespace, reached over a veth pair -------------------------

def _sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture(params=["plain", "tls"])
def netns_server(request, tmp_path):
    """A server process in a fresh network namespace at 10.203.x.2, reached from here over a
    veth pair (10.203.x.1); removed afterwards. Yields (address, pull_cable). Skipped, with the
    reason, where namespaces cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"hx{tag}", f"hxa{tag}", f"hxb{tag}"
    net = 10 + int(tag[:2], 16) % 200
    try:
        _sh("ip", "netns", "add", ns)
    except (subprocess.CalledProcessError, OSError) as error:
        pytest.skip(f"cannot create a network namespace here: {error}")
    process = None
    try:
        _sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _sh("ip", "link", "set", there, "netns", ns)
        _sh("ip", "addr", "add", f"10.203.{net}.1/24", "dev", here)
        _sh("ip", "link", "set", here, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.203.{net}.2/24", "dev", there)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        address = f"tcp://10.203.{net}.2:7400"
        tls_setup, tls_option, client_context = "", "", None
        if request.param == "tls":
            trustme = pytest.importorskip("trustme", reason="trustme is in the test extra")
            ca = trustme.CA()
            ca.issue_cert(f"10.203.{net}.2").private_key_and_cert_chain_pem.write_to_path(
                str(tmp_path / "server.pem"))
            import ssl

            client_context = ssl.create_default_context()
            ca.configure_trust(client_context)
            tls_setup = (f"import ssl\ncontext = ssl.create_default_context("
                         f"ssl.Purpose.CLIENT_AUTH)\n"
                         f"context.load_cert_chain({str(tmp_path / 'server.pem')!r})\n")
            tls_option = ", ssl_context=context"
        script = ("import hintens, signal\n"
                  "from tests.handlers import command\n"
                  + tls_setup +
                  f"server = hintens.Server({address!r}, command{tls_option})\n"
                  f"signal.signal(signal.SIGTERM, lambda *_: server.shutdown())\n"
                  f"server.serve_forever()\n")
        env = dict(os.environ, PYTHONPATH=REPO)
        process = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script],
                                   cwd=REPO, env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((f"10.203.{net}.2", 7400), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the namespaced server did not start")
                time.sleep(0.1)

        def pull_cable():
            # The far end's link goes down: this end loses its carrier, and whatever is
            # sent is dropped without a word, as with a pulled cable.
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", there, "down")

        yield address, pull_cable, client_context
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_across_network_namespaces_and_a_pulled_cable(netns_server):
    address, pull_cable, context = netns_server
    with hintens.Client(address, timeout=1.0, connect_timeout=5, ssl_context=context) as client:
        assert client.request(b"echo:across") == b"across"
        assert len(client.request(b"size:3000000")) == 3_000_000

        async def main():
            async with hintens.aio.Client(address, timeout=1.0,
                                          ssl_context=context) as aio_client:
                assert await aio_client.request(b"echo:aio across") == b"aio across"
                return aio_client

        run(main())
        pull_cable()
        started = time.monotonic()
        with pytest.raises((hintens.Timeout, hintens.ConnectionClosed)):
            client.request(b"echo:into the void")
        assert time.monotonic() - started < 5   # the configured timeout, never a hang

    async def after():
        with pytest.raises((hintens.Timeout, hintens.ConnectError)):
            await hintens.aio.Client.connect(address, connect_timeout=1.0, ssl_context=context)

    run(after())


def test_the_command_line_listens_and_connects_over_tcp(sock_path, tcp_address):
    from .peers import start_server

    process = start_server(sock_path, "--listen", tcp_address)
    try:
        env = dict(os.environ, PYTHONPATH=REPO)
        sent = subprocess.run([sys.executable, "-m", "hintens", "send", "--connect",
                               tcp_address, "echo:over tcp"], capture_output=True, env=env,
                              cwd=REPO, timeout=30)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout == b"over tcp"
        refused = subprocess.run([sys.executable, "-m", "hintens", "send", "--connect",
                                  f"tcp://127.0.0.1:{free_port()}", "x"], capture_output=True,
                                 env=env, cwd=REPO, timeout=30)
        assert refused.returncode == 3 and b"refused" in refused.stderr
    finally:
        stop_server(process)


def test_the_asyncio_exactly_once_pool_across_a_server_restart(tcp_address):
    process = start_aio_server_with(tcp_address)
    try:
        async def main():
            nonlocal process
            async with hintens.aio.ClientPool(tcp_address, 2, exactly_once=True, timeout=10,
                                              retry=hintens.RetryPolicy(max_attempts=4,
                                                                        backoff=0.2)) as pool:
                assert await pool.request(b"count:warm") == b"1"
                slow = asyncio.ensure_future(pool.request(b"sleep:2:slow"))
                await asyncio.sleep(0.5)   # the request is running on the server
                process.send_signal(signal.SIGKILL)
                await asyncio.get_running_loop().run_in_executor(None, process.wait)
                process = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: start_aio_server_with(tcp_address))
                with pytest.raises(hintens.ConnectionClosed) as raised:
                    await slow
                assert raised.value.request_sent and "restarted" in str(raised.value)
                assert await pool.request(b"count:after") == b"1"   # the pool carries on

        run(main())
    finally:
        stop_server(process)
