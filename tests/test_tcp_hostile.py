"""Hostile raw-socket peers over TCP and TLS cannot crash, hang, or make a server leak.

Each test starts a server (the sync ``hintens.Server`` or ``hintens.aio.Server``) in its own
process on a loopback port, plain or with TLS (mutual: the server requires a client
certificate from the test CA), takes its descriptor count and resident memory once it is
warm, attacks it with hand-made bytes, then checks that it still answers a normal client and
that its descriptors come back to that baseline and its memory stays within 64 MiB of it. At
the end of each test the server is closed with SIGTERM, and its log must hold no traceback.

Over plain TCP: header violations, a 4 GiB announcement, a dripped frame, a client that
never reads, a connect storm past max_connections. Over TLS: peers that never start the
handshake (one, and many past max_connections), garbage and half ClientHellos, a plaintext
client, a certificate from another CA, garbage and a dripped frame inside TLS. Over both:
peers that vanish with an RST mid-frame and mid-request.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time

import pytest

import hintens
from hintens import ErrorCode
from hintens import _python_core as _core_py
from hintens.wire import decode_error_payload

from .peers import (
    HEADER,
    RawPeer,
    _spawn,
    fd_table,
    free_port,
    open_fds,
    raw_frame,
    server_log,
    settled_fds,
    status_kib,
    wait_until,
)

trustme = pytest.importorskip("trustme", reason="trustme is in the test extra")

KIB = 1 << 10
RSS_SLACK_KIB = 64 * 1024
#: What the server's log must never hold.
BAD_LOG = ("Traceback", "never retrieved", "was destroyed but it is pending",
           "could not admit")


# Certificates --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the server's and a client's certificates from it, a stranger's from another CA,
    and the PEM files a server process loads."""
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("pki")
    ca_pem, server_pem = folder / "ca.pem", folder / "server.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server.private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    return {
        "ca": ca,
        "other_ca": other_ca,
        "client": ca.issue_cert("client.example", common_name="client.example"),
        "stranger": other_ca.issue_cert("client.example", common_name="client.example"),
        "ca_pem": str(ca_pem),
        "server_pem": str(server_pem),
    }


def client_context(pki, cert="client"):
    context = ssl.create_default_context()
    pki["ca"].configure_trust(context)
    pki[cert].configure_cert(context)
    return context


# The server process, its baseline and its log --------------------------------------------

def spawn(kind, address, pki=None, **options):
    """A sync or asyncio server process on ``address`` (handler tests.handlers' command, or
    its async twin), with TLS from ``pki``'s PEM files when given; listening on return."""
    lines = ["import asyncio, logging, signal, ssl, hintens, hintens.aio",
             "from tests.handlers import command, async_command",
             "logging.basicConfig(level=logging.INFO)",
             f"options = {options!r}"]
    if pki is not None:
        lines += ["context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)",
                  f"context.load_cert_chain({pki['server_pem']!r})",
                  f"context.load_verify_locations({pki['ca_pem']!r})",
                  "context.verify_mode = ssl.CERT_REQUIRED",
                  "options['ssl_context'] = context"]
    if kind == "sync":
        lines += [f"server = hintens.Server({address!r}, command, **options)",
                  "signal.signal(signal.SIGTERM, lambda *_: server.shutdown())",
                  "server.serve_forever()"]
    else:
        lines += ["async def main():",
                  f"    server = hintens.aio.Server({address!r}, async_command, **options)",
                  "    asyncio.get_running_loop().add_signal_handler(",
                  "        signal.SIGTERM, lambda: asyncio.ensure_future(server.close()))",
                  "    await server.serve_forever()",
                  "asyncio.run(main())"]
    return _spawn([sys.executable, "-c", "\n".join(lines) + "\n"], address)


class Target:
    """A server process under attack, and what it looked like before."""

    def __init__(self, kind, tls, pki, **options):
        self.kind, self.tls, self.pki = kind, tls, pki
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.process = spawn(kind, self.address, pki if tls else None, **options)
        self.pid = self.process.pid
        self.stopped = False
        assert self.serves()   # warm: imports done, a first connection served
        self.fds, self.rss = self.baseline()

    # Clients and peers

    def context(self, cert="client"):
        return client_context(self.pki, cert) if self.tls else None

    def client(self, **options):
        if self.tls:
            options["ssl_context"] = self.context()
        return hintens.Client(self.address, **options)

    def serves(self, payload=b"echo:ok", expected=b"ok"):
        with self.client(timeout=10, connect_timeout=10) as client:
            return client.request(payload) == expected

    def serves_soon(self, timeout_s=10.0):
        """``serves``, retried while the server refuses (its closed connections not yet
        counted out)."""
        def attempt():
            try:
                return self.serves()
            except (hintens.ConnectionClosed, hintens.ConnectError):
                return False

        return wait_until(attempt, timeout_s=timeout_s, interval_s=0.05)

    def served_client(self, timeout_s=10.0):
        """A client whose first request was answered, retried while the server refuses it
        (at max_connections, as long as a connection closed just before is not counted out;
        on a loaded machine that outlasted ``serves_soon``'s own connection)."""
        served = []

        def attempt():
            client = self.client(timeout=10, connect_timeout=10)
            try:
                if client.request(b"echo:first") == b"first":
                    served.append(client)
                    return True
            except (hintens.ConnectionClosed, hintens.ConnectError):
                pass
            client.close()
            return False

        assert wait_until(attempt, timeout_s=timeout_s, interval_s=0.05)
        return served[0]

    def raw(self, timeout=10.0, rcvbuf=None):
        """A connected TCP socket, nothing said (``rcvbuf``: set before connecting)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def peer(self, timeout=10.0, rcvbuf=None, cert="client", hello=False):
        """A raw frame peer: over TLS, once its handshake (with ``cert``) is done; with
        ``hello``, once the server's hello has come (it is serving the connection)."""
        sock = self.raw(timeout, rcvbuf)
        if self.tls:
            sock = self.context(cert).wrap_socket(sock, server_hostname="127.0.0.1")
        peer = Peer(sock)
        if hello:
            frame = peer.next_frame(skip_hello=False)
            assert frame is not None and (frame.type, frame.request_id) == (3, 0), frame
        return peer

    # Measurements

    def baseline(self):
        """Descriptors and resident memory (KiB) at rest: once the warm-up connection is
        closed on the server's side too (a count that held still for a moment could still
        include it, on a loaded machine), and a served connection (over TLS, for a TLS
        server) came and went."""
        fds = settled_fds(self.address, self.pid, connect=lambda: self.peer(hello=True))
        self.fd_names = fd_table(self.pid)   # for a failure's message
        return fds, status_kib("VmRSS", self.pid)

    def alive(self):
        return self.process.poll() is None

    def rss_grew_kib(self):
        return status_kib("VmRSS", self.pid) - self.rss

    def assert_back_to_baseline(self, timeout_s=5.0):
        assert self.alive(), server_log(self.process)
        assert wait_until(lambda: open_fds(self.pid) == self.fds, timeout_s=timeout_s), \
            f"{open_fds(self.pid)} descriptors: {fd_table(self.pid)}; {self.fds} before: " \
            f"{self.fd_names}\n{server_log(self.process)[-3000:]}"
        assert self.rss_grew_kib() < RSS_SLACK_KIB, (self.rss_grew_kib(), self.rss)

    def assert_recovered(self):
        """It answers a normal client, and its descriptors and memory are back."""
        assert self.serves_soon(), server_log(self.process)[-3000:]
        self.assert_back_to_baseline()

    def log(self):
        return server_log(self.process)

    def stop(self):
        if self.stopped:
            return self.log()
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("the server did not close on SIGTERM:\n" + self.log())
        return self.log()


class Peer(RawPeer):
    """RawPeer's frame reading, over a connected TCP or TLS socket."""

    def __init__(self, sock):
        self.sock = sock
        self.decoder = _core_py.FrameDecoder()
        self.frames = []

    def next_frame(self, skip_hello=True):
        try:
            return super().next_frame(skip_hello)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return None

    def rst(self):
        """Vanish: SO_LINGER 0, then close, so the kernel sends an RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@pytest.fixture
def target(pki):
    """``target(kind, tls, **options)``: a server process; closed at the end of the test
    with SIGTERM, which it must survive to exit 0 with no traceback in its log."""
    started = []

    def start(kind, tls=False, **options):
        server = Target(kind, tls, pki, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        crashed = None if server.stopped else server.process.poll()
        text = server.stop()
        server.process.log.close()
        assert crashed is None, f"the server died (exit {crashed}):\n{text}"
        assert server.process.returncode == 0, text
        for bad in BAD_LOG:
            assert bad not in text, text


@pytest.fixture(params=["sync", "aio"])
def kind(request):
    return request.param


def ends_within(sock, seconds):
    """Read (and drop) what comes until the server ends the stream; True if it does within
    ``seconds`` (an RST, or a TLS alert that ends it, counts)."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(1 << 16):
                return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return True
    except ssl.SSLError:
        return True   # an alert: the server refused and closed
    except socket.timeout:
        return False
    return False


def drip(sock, data, interval_s, limit_s):
    """Send ``data`` one byte every ``interval_s`` until the server ends the connection;
    the seconds that took, or None if it was still open after ``limit_s``."""
    started = time.monotonic()
    sock.settimeout(interval_s)
    for byte in data:
        if time.monotonic() - started > limit_s:
            return None
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return time.monotonic() - started
        try:
            while True:
                if not sock.recv(1 << 16):
                    return time.monotonic() - started
        except socket.timeout:
            pass
        except (ConnectionResetError, ssl.SSLError, OSError):
            return time.monotonic() - started
    return None


def client_hello(pki):
    """The first flight of a real TLS client: its ClientHello record(s)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(pki).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# 1. Plain TCP ----------------------------------------------------------------------------------

@pytest.mark.parametrize("frame, request_id, code", [
    (raw_frame(b"x", magic=0x1234, request_id=3), 0, ErrorCode.BAD_HEADER),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", 0, ErrorCode.BAD_HEADER),
    (raw_frame(length=0xFFFFFFFF, request_id=21)[:24], 21, ErrorCode.TOO_LARGE),
], ids=["magic", "http", "4GiB"])
def test_a_fatal_header_over_tcp_is_answered_then_closed(target, kind, frame, request_id,
                                                         code):
    server = target(kind)
    peer = server.peer()
    peer.send(frame + raw_frame(b"echo:never", request_id=50))
    got_id, got_code, message = peer.next_error()
    assert (got_id, got_code) == (request_id, code) and message
    assert peer.at_eof()
    peer.close()
    server.assert_recovered()


def test_four_gib_announced_by_many_peers_allocates_nothing(target, kind):
    server = target(kind)
    peers = []
    for n in range(1, 21):
        peer = server.peer()
        peer.send(raw_frame(length=0xFFFFFFFF, request_id=n)[:24] + b"x" * 1000)
        peers.append(peer)
    for n, peer in enumerate(peers, 1):
        assert peer.next_error()[:2] == (n, ErrorCode.TOO_LARGE)
        assert peer.at_eof()
        peer.close()
    server.assert_recovered()


@pytest.mark.parametrize("size", [1, 3 << 20, 20 << 20], ids=["small", "3MiB", "20MiB"])
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_bad_crc_is_answered_and_the_connection_stays(target, kind, tls, size):
    # 3 MiB: the payload is read straight into its buffer (by the kernel, or by OpenSSL),
    # and the frames after the bad one, sent in the same write, still arrive whole. 20 MiB:
    # the echo's CRC is taken on several threads where the server may use two CPUs.
    server = target(kind, tls=tls)
    peer = server.peer()
    body = bytes(range(256)) * (size // 256) or b"x"
    peer.send(raw_frame(b"echo:" + body, request_id=11, checksum=0x1234)
              + raw_frame(b"echo:" + body[::-1], request_id=12)
              + raw_frame(b"echo:y", request_id=13))
    assert peer.next_error()[:2] == (11, ErrorCode.CHECKSUM)
    for request_id, expected in ((12, body[::-1]), (13, b"y")):
        frame = peer.next_frame()
        assert (frame.type, frame.request_id, bytes(frame.payload)) == (2, request_id, expected)
    peer.close()
    server.assert_recovered()


def test_a_frame_dripped_over_tcp_is_cut_at_frame_timeout(target, kind):
    server = target(kind, frame_timeout=0.5)
    sock = server.raw()
    took = drip(sock, raw_frame(b"echo:" + b"d" * 1000, request_id=1), 0.1, 15)
    assert took is not None, "a frame dripped for 15 s was never cut"
    sock.close()
    server.assert_recovered()


def _flood_unread(sock, payload, count, seconds=3.0):
    """Send ``count`` Requests on ``sock`` without reading, for at most ``seconds``; the
    number of whole requests that went."""
    data = b"".join(raw_frame(payload, request_id=n) for n in range(1, count + 1))
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent:sent + 65536])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            break
    sock.setblocking(True)
    return sent // len(raw_frame(payload, request_id=1))


def test_a_tcp_client_that_never_reads_is_cut_with_memory_bounded(target, kind):
    server = target(kind, send_timeout=1, send_queue_bytes=256 * KIB)
    sock = server.raw(rcvbuf=4096)
    # 7 MB of requests (more than the kernel buffers on both sides), 13 GB of replies.
    sent = _flood_unread(sock, b"size:65536", 200_000)
    assert sent < 200_000                               # it stopped reading us
    assert server.rss_grew_kib() < RSS_SLACK_KIB
    assert server.serves()                              # others are served meanwhile
    assert wait_until(lambda: open_fds(server.pid) == server.fds, timeout_s=10)
    assert ends_within(sock, 10)
    sock.close()
    server.assert_recovered()


def test_a_tcp_connect_storm_past_max_connections_is_refused_and_survived(target, kind):
    server = target(kind, max_connections=4, backlog=512)
    socks = [server.raw() for _ in range(100)]
    kinds, errors = [], []
    for sock in socks:
        data = b""
        while len(data) < 24:
            chunk = sock.recv(24 - len(data))
            if not chunk:
                break
            data += chunk
        header = HEADER.unpack(data) if len(data) == 24 else None
        kinds.append(None if header is None else header[2])
        if header is not None and header[2] == 4:
            payload = b""
            while len(payload) < header[4]:
                payload += sock.recv(header[4] - len(payload))
            errors.append(decode_error_payload(payload))
            assert ends_within(sock, 10)   # refused, then closed
    assert kinds.count(3) == 4, kinds      # four admitted (their hello)
    assert kinds.count(4) == 96, kinds     # every other one refused
    assert {code for code, _ in errors} == {ErrorCode.UNAVAILABLE}
    assert all("max_connections" in message for _, message in errors)
    for sock in socks:
        sock.close()
    assert server.serves_soon()
    again = [server.served_client() for _ in range(4)]   # at the limit, all four open at once
    for client in again:
        assert client.request(b"echo:again") == b"again"
        client.close()
    server.assert_back_to_baseline()


# 2. TLS ----------------------------------------------------------------------------------------

def test_a_peer_that_never_starts_the_handshake_is_closed(target, kind):
    server = target(kind, tls=True, frame_timeout=0.5)
    sock = server.raw()
    assert ends_within(sock, 10)   # frame_timeout (0.5 s), generously
    sock.close()
    server.assert_recovered()


def test_many_silent_tls_peers_past_max_connections_are_each_bounded(target, kind):
    server = target(kind, tls=True, frame_timeout=0.5, max_connections=4, backlog=512)
    socks = [server.raw() for _ in range(40)]
    for sock in socks:
        assert ends_within(sock, 10)   # each refused or timed out, none held for ever
    for sock in socks:
        sock.close()
    assert server.serves_soon()        # a real TLS client gets in
    server.assert_back_to_baseline()


def test_silent_tls_peers_do_not_hold_slots_past_frame_timeout(target, kind):
    # Four silent peers fill max_connections; once frame_timeout has closed them (and
    # while they still hold their sockets open on this side), a real client gets in.
    server = target(kind, tls=True, frame_timeout=0.5, max_connections=4)
    socks = [server.raw() for _ in range(4)]
    for sock in socks:
        assert ends_within(sock, 10)
    assert server.serves_soon()
    for sock in socks:
        sock.close()
    server.assert_back_to_baseline()


@pytest.mark.parametrize("case", ["garbage-record", "corrupted-hello", "not-tls-at-all"])
def test_a_garbage_client_hello_is_refused(target, kind, pki, case):
    server = target(kind, tls=True, frame_timeout=0.5)
    if case == "garbage-record":
        data = b"\x16\x03\x01\x00\x40" + b"\x01\x00\x00\x3c" + bytes(range(60))
    elif case == "corrupted-hello":
        hello = bytearray(client_hello(pki))
        for i in range(9, len(hello), 7):
            hello[i] ^= 0xA5
        data = bytes(hello)
    else:
        data = b"\xff" * 300
    sock = server.raw()
    sock.sendall(data)
    assert ends_within(sock, 10)
    sock.close()
    server.assert_recovered()


def test_half_a_client_hello_then_silence_is_closed(target, kind, pki):
    server = target(kind, tls=True, frame_timeout=0.5)
    hello = client_hello(pki)
    sock = server.raw()
    sock.sendall(hello[:len(hello) // 2])
    assert ends_within(sock, 10)
    sock.close()
    server.assert_recovered()


def test_a_plaintext_hintens_client_at_the_tls_port(target, kind):
    server = target(kind, tls=True)
    with pytest.raises(hintens.ConnectionClosed, match="TLS"):
        with hintens.Client(server.address, timeout=5, connect_timeout=5) as client:
            client.request(b"echo:in the clear")
    assert wait_until(lambda: "without TLS" in server.log(), timeout_s=5), server.log()
    server.assert_recovered()


def test_a_certificate_from_another_ca_is_refused(target, kind, pki):
    server = target(kind, tls=True)
    with pytest.raises(hintens.ConnectError, match="TLS"):
        hintens.Client(server.address, ssl_context=client_context(pki, "stranger"),
                       connect_timeout=5)
    server.assert_recovered()


def test_garbage_frames_inside_tls_are_bad_header_then_closed(target, kind):
    server = target(kind, tls=True)
    peer = server.peer()
    peer.send(raw_frame(b"x", magic=0x1234, request_id=3)
              + raw_frame(b"echo:never", request_id=50))
    assert peer.next_error()[:2] == (0, ErrorCode.BAD_HEADER)
    assert peer.at_eof()
    peer.close()
    server.assert_recovered()


@pytest.mark.parametrize("record", [
    b"\x17\x03\x03\x00\x40" + bytes(range(64)),          # application data whose MAC fails
    b"\x17\x03\x03\xff\xff" + bytes(3000),                 # longer than a record may be
    b"\x16\x03\x03\x00\x04\x01\x00\x00\x00",          # a plaintext handshake message
    b"\x15\x03\x03\x00\x02\x02\x28",                    # a plaintext fatal alert
], ids=["bad-mac", "oversized", "plaintext-handshake", "plaintext-alert"])
def test_a_broken_record_after_the_handshake_closes_that_connection(target, kind, record):
    """After the handshake and the hello, bytes written under TLS, straight to the socket:
    OpenSSL refuses them in the server's read. That connection ends, logged at INFO with no
    traceback; another peer's Requests on the same server are answered meanwhile."""
    server = target(kind, tls=True)
    other = server.peer(hello=True)
    peer = server.peer(hello=True)
    peer.send(raw_frame(b"echo:before", request_id=1))
    assert peer.next_frame().payload == b"before"
    os.write(peer.sock.fileno(), record)
    assert ends_within(peer.sock, 10), "the server kept a connection whose TLS broke"
    assert wait_until(lambda: "its TLS stream broke" in server.log()), server.log()
    other.send(raw_frame(b"echo:still", request_id=2))
    assert other.next_frame().payload == b"still"
    peer.close()
    other.close()
    server.assert_recovered()


def test_a_frame_dripped_inside_tls_is_cut_at_frame_timeout(target, kind):
    server = target(kind, tls=True, frame_timeout=0.5)
    peer = server.peer()
    took = drip(peer.sock, raw_frame(b"echo:" + b"d" * 1000, request_id=1), 0.1, 15)
    assert took is not None, "a frame dripped for 15 s inside TLS was never cut"
    peer.close()
    server.assert_recovered()


def test_a_tls_client_that_never_reads_is_cut_with_memory_bounded(target, kind):
    server = target(kind, tls=True, send_timeout=1, send_queue_bytes=256 * KIB)
    peer = server.peer(rcvbuf=4096)
    sent = _flood_unread(peer.sock, b"size:65536", 200_000)
    assert sent < 200_000
    assert server.rss_grew_kib() < RSS_SLACK_KIB
    assert server.serves()
    assert wait_until(lambda: open_fds(server.pid) == server.fds, timeout_s=10)
    peer.close()
    server.assert_recovered()


# 3. Over both: peers that vanish with an RST -----------------------------------------------

@pytest.fixture(params=["tcp", "tls"])
def transport(request):
    return request.param


def test_a_peer_that_vanishes_mid_frame(target, kind, transport):
    server = target(kind, tls=transport == "tls")
    for cut in (5, 30, 24 + 100_000):   # mid-header, mid-payload, far into a large one
        peer = server.peer(hello=True)
        peer.send(raw_frame(b"echo:" + b"m" * 200_000, request_id=1)[:cut])
        time.sleep(0.05)
        peer.rst()
    server.assert_recovered()


def test_a_peer_that_vanishes_mid_request(target, kind, transport):
    server = target(kind, tls=transport == "tls", send_timeout=5)
    # A request running in the handler.
    peer = server.peer(hello=True)
    peer.send(raw_frame(b"sleep:0.5:x", request_id=1))
    time.sleep(0.1)
    peer.rst()
    # Replies on their way to a peer that asked for many.
    peer = server.peer(rcvbuf=4096, hello=True)
    peer.send(b"".join(raw_frame(b"size:65536", request_id=n) for n in range(1, 20)))
    time.sleep(0.1)
    peer.rst()
    # Its requests in the same write as the RST.
    peer = server.peer(hello=True)
    peer.send(b"".join(raw_frame(b"size:65536", request_id=n) for n in range(1, 20)))
    peer.rst()
    time.sleep(0.6)   # the sleeping handler finishes and finds its client gone
    server.assert_recovered()


def test_a_peer_that_resets_before_it_is_accepted_is_dropped_quietly(target, kind, transport):
    # The server is stopped (SIGSTOP) while peers connect and reset at once: the kernel
    # completes their handshakes and queues them, the RST arrives in the queue, and the
    # server accepts sockets whose peer is gone already. They are dropped, without an error
    # and a traceback in the log for each (a peer can produce them at will).
    server = target(kind, tls=transport == "tls")
    server.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(5):
            Peer(server.raw()).rst()
        time.sleep(0.1)
    finally:
        server.process.send_signal(signal.SIGCONT)
    server.assert_recovered()
    assert "could not admit" not in server.log(), server.log()


def test_queued_frames_for_a_peer_that_reset_are_dropped_quietly():
    # The pure-Python channel (every connection's without the compiled core, TLS ones
    # included) shuts the stream when the flusher's write fails. Once the peer has reset, that
    # shutdown fails too (ENOTCONN): the flusher must drop the frames and mark the channel
    # broken, not raise (the server logged an ERROR with a traceback for each such peer).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    channel = _core_py.Channel(ours, _core_py.FrameDecoder())
    channel.flush_interval = 60.0     # the second Event waits in the queue for the flusher
    channel.event(b"an Event")
    channel.event(b"another, for a peer that is going")
    assert channel.queued
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    assert wait_until(lambda: ours.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
                      or not ours.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    try:
        assert channel.flush_due() is False
        assert channel.broken
    finally:
        channel.close()
