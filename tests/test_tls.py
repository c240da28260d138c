"""TLS over TCP (issue 13): every sync and asyncio combination with client certificates, the
refusals (no certificate, a wrong CA, an expired certificate, a subject not allowed), and a
plaintext peer at a TLS port and the reverse, each with a clear error on both sides.
Certificates come from trustme, made fresh for each run."""

from __future__ import annotations

import asyncio
import datetime
import gc
import logging
import socket
import ssl
import threading
import time

import pytest

import hintens
import hintens.aio

trustme = pytest.importorskip("trustme", reason="trustme is in the test extra")


def run(coroutine, timeout=60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.fixture(scope="module")
def pki():
    ca = trustme.CA()
    other_ca = trustme.CA()
    past = datetime.datetime(2020, 1, 1)
    return {
        "ca": ca,
        "other_ca": other_ca,
        "server": ca.issue_cert("localhost", "127.0.0.1"),
        "client": ca.issue_cert("client.example", common_name="client.example"),
        "intruder": ca.issue_cert("intruder.example", common_name="intruder.example"),
        "stranger": other_ca.issue_cert("client.example", common_name="client.example"),
        "expired_server": ca.issue_cert("127.0.0.1", not_before=past,
                                        not_after=past + datetime.timedelta(days=1)),
        "expired_client": ca.issue_cert("client.example", common_name="client.example",
                                        not_before=past,
                                        not_after=past + datetime.timedelta(days=1)),
    }


def server_context(pki, *, require_client=True, cert="server"):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki[cert].configure_cert(context)
    if require_client:
        pki["ca"].configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(pki, cert="client", trust="ca"):
    context = ssl.create_default_context()
    pki[trust].configure_trust(context)
    if cert is not None:
        pki[cert].configure_cert(context)
    return context


class Served:
    """A sync or asyncio server on a loopback TLS port, the asyncio one on a loop of its
    own thread."""

    def __init__(self, kind, handler=None, **options):
        self.kind = kind
        handler = handler or (lambda payload: payload)
        if kind == "sync":
            self.server = hintens.Server("tcp://127.0.0.1:0", handler, **options).start()
            self.address = self.server.addresses[0]
            return
        ready = threading.Event()

        def loop_thread():
            async def main():
                self.loop = asyncio.get_running_loop()
                self.server = await hintens.aio.Server("tcp://127.0.0.1:0", handler,
                                                       **options).start()
                ready.set()
                await self.server.serve_forever()

            asyncio.run(main())

        self.thread = threading.Thread(target=loop_thread, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.address = self.server.addresses[0]

    def connections(self):
        if self.kind == "sync":
            return self.server.connections
        return asyncio.run_coroutine_threadsafe(self._connections(), self.loop).result(5)

    async def _connections(self):
        return self.server.connections

    def close(self):
        if self.kind == "sync":
            self.server.close()
        else:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
            self.thread.join(10)


@pytest.fixture(params=["sync", "aio"])
def server_kind(request):
    return request.param


@pytest.mark.parametrize("client_kind", ["sync", "aio"])
def test_every_combination_with_client_certificates(pki, server_kind, client_kind):
    served = Served(server_kind, ssl_context=server_context(pki))
    big = bytes(range(256)) * (12 << 10)   # 3 MiB, encrypted inline
    try:
        if client_kind == "sync":
            with hintens.Client(served.address, ssl_context=client_context(pki),
                                timeout=20) as client:
                assert client.request(b"hello") == b"hello"
                assert client.request(big) == big
                assert client.request_many([b"%d" % i for i in range(200)]) == \
                    [b"%d" % i for i in range(200)]
                for i in range(100):
                    client.send_event(b"%d" % i)
                client.flush()
                (connection,) = served.connections()
                assert connection.subject.endswith("CN=client.example")
                assert connection.address.startswith("tcp://127.0.0.1:")
                assert not connection.shm
        else:
            async def main():
                async with hintens.aio.Client(served.address, ssl_context=client_context(pki),
                                              timeout=20) as client:
                    assert await client.request(b"hello") == b"hello"
                    assert await client.request(big) == big
                    replies = await asyncio.gather(*(client.request(b"%d" % i)
                                                     for i in range(500)))
                    assert replies == [b"%d" % i for i in range(500)]

            run(main())
    finally:
        served.close()


def test_a_pool_over_tls(pki, server_kind):
    served = Served(server_kind, ssl_context=server_context(pki))
    try:
        with hintens.ClientPool(served.address, 2, ssl_context=client_context(pki),
                                exactly_once=True, timeout=10) as pool:
            assert pool.request(b"pooled") == b"pooled"

        async def main():
            async with hintens.aio.ClientPool(served.address, 2, timeout=10,
                                              ssl_context=client_context(pki)) as pool:
                assert await asyncio.gather(*(pool.request(b"%d" % i) for i in range(50))) \
                    == [b"%d" % i for i in range(50)]

        run(main())
    finally:
        served.close()


def test_without_client_certificates(pki, server_kind):
    served = Served(server_kind, ssl_context=server_context(pki, require_client=False))
    try:
        with hintens.Client(served.address, ssl_context=client_context(pki, cert=None),
                            timeout=10) as client:
            assert client.request(b"anonymous") == b"anonymous"
            assert served.connections()[0].subject is None
    finally:
        served.close()


@pytest.mark.parametrize("case", ["no certificate", "wrong CA", "expired client"])
def test_a_client_the_server_does_not_trust_is_refused(pki, server_kind, case, caplog):
    served = Served(server_kind, ssl_context=server_context(pki))
    context = {"no certificate": lambda: client_context(pki, cert=None),
               "wrong CA": lambda: client_context(pki, cert="stranger"),
               "expired client": lambda: client_context(pki, cert="expired_client")}[case]()
    try:
        with caplog.at_level(logging.INFO, logger="hintens"):
            with pytest.raises(hintens.ConnectError, match="TLS"):
                hintens.Client(served.address, ssl_context=context, connect_timeout=5)
            with hintens.Client(served.address, ssl_context=client_context(pki),
                                timeout=10) as client:   # it still serves the others
                assert client.request(b"ok") == b"ok"
        assert any("TLS handshake" in record.getMessage() for record in caplog.records)
    finally:
        served.close()


@pytest.mark.parametrize("case", ["wrong CA", "expired server"])
def test_a_server_the_client_does_not_trust_is_refused(pki, server_kind, case):
    cert = "expired_server" if case == "expired server" else "server"
    served = Served(server_kind, ssl_context=server_context(pki, cert=cert,
                                                            require_client=False))
    trust = "other_ca" if case == "wrong CA" else "ca"
    try:
        with pytest.raises(hintens.ConnectError, match="CERTIFICATE_VERIFY_FAILED|verify"):
            hintens.Client(served.address, ssl_context=client_context(pki, cert=None,
                                                                     trust=trust),
                           connect_timeout=5)

        async def main():
            with pytest.raises(hintens.ConnectError):
                await hintens.aio.Client.connect(
                    served.address, ssl_context=client_context(pki, cert=None, trust=trust),
                    connect_timeout=5)

        run(main())
    finally:
        served.close()


def test_allow_subjects(pki, server_kind):
    served = Served(server_kind, ssl_context=server_context(pki),
                    allow_subjects=[pki_subject(pki, "client")])
    try:
        with hintens.Client(served.address, ssl_context=client_context(pki),
                            timeout=10) as client:
            assert client.request(b"allowed") == b"allowed"
        with pytest.raises((hintens.ConnectError, hintens.ConnectionClosed)):
            with hintens.Client(served.address, ssl_context=client_context(pki, "intruder"),
                                timeout=5, connect_timeout=5) as client:
                client.request(b"let me in")
    finally:
        served.close()


def pki_subject(pki, name):
    """The subject a server shows for the certificate ``name``, as allow_subjects takes it."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pki[name].cert_chain_pems[0].bytes())
    parts = {attribute.oid._name: attribute.value for attribute in cert.subject}
    short = {"organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN"}
    return ",".join(f"{short[key]}={parts[key]}" for key in
                    ("organizationName", "organizationalUnitName", "commonName") if key in parts)


def test_a_plaintext_client_at_a_tls_port(pki, server_kind, caplog):
    served = Served(server_kind, ssl_context=server_context(pki))
    try:
        with caplog.at_level(logging.INFO, logger="hintens"):
            with pytest.raises(hintens.ConnectionClosed, match="TLS port"):
                with hintens.Client(served.address, timeout=5) as client:
                    client.request(b"in the clear")
            for _ in range(100):
                if any("without TLS" in r.getMessage() for r in caplog.records):
                    break
                threading.Event().wait(0.02)
        assert any("a client without TLS" in r.getMessage() for r in caplog.records)
    finally:
        served.close()


def test_a_tls_client_at_a_plaintext_port(pki, server_kind, caplog):
    served = Served(server_kind)
    try:
        with caplog.at_level(logging.INFO, logger="hintens"):
            with pytest.raises(hintens.ConnectError, match="does the server speak TLS"):
                hintens.Client(served.address, ssl_context=client_context(pki),
                               connect_timeout=5)
            for _ in range(100):
                if any("ClientHello" in r.getMessage() for r in caplog.records):
                    break
                threading.Event().wait(0.02)
        assert any("TLS ClientHello" in r.getMessage() for r in caplog.records)
    finally:
        served.close()


def _tls_streams():
    from hintens.transport.tls import TlsStream
    return sum(1 for thing in gc.get_objects() if type(thing) is TlsStream)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02"], ids=["silent", "half_hello"])
def test_a_handshake_that_times_out_is_freed_without_the_garbage_collector(pki, server_kind,
                                                                            sent):
    """The TimeoutError of a stalled handshake must not hold its connection (and, on the
    sync server, the 128 KiB receive buffer) in a reference cycle: hostile peers that stall
    handshakes would make the server's memory grow until a full collection."""
    served = Served(server_kind, ssl_context=server_context(pki), frame_timeout=0.3)
    gc.collect()
    gc.disable()
    try:
        before = _tls_streams()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", int(served.address.rsplit(":", 1)[1])),
                                          timeout=5) as sock:
                sock.sendall(sent)
                assert sock.recv(100) == b""   # the server ends it at frame_timeout
        deadline = time.monotonic() + 5
        while _tls_streams() > before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _tls_streams() <= before   # (a stream of an earlier test may end meanwhile)
    finally:
        gc.enable()
        served.close()


def test_ssl_context_is_refused_where_it_cannot_apply(pki, sock_path):
    with pytest.raises(ValueError, match="tcp://"):
        hintens.Client(sock_path, ssl_context=client_context(pki))
    with pytest.raises(ValueError, match="tcp://"):
        hintens.Server(sock_path, ssl_context=server_context(pki))
    with pytest.raises(ValueError, match="allow_subjects"):
        hintens.Server("tcp://127.0.0.1:0", allow_subjects=["CN=x"])
    with pytest.raises(TypeError):
        hintens.Client("tcp://127.0.0.1:1", ssl_context=object())


def test_a_public_bind_with_tls_does_not_warn(pki, caplog):
    with caplog.at_level(logging.WARNING, logger="hintens"):
        server = hintens.Server("tcp://0.0.0.0:0", ssl_context=server_context(pki))
    server.close()
    assert not any("without TLS" in record.getMessage() for record in caplog.records)


def test_the_command_line_with_mutual_tls(pki, tmp_path):
    import os
    import subprocess
    import sys

    from .peers import REPO, free_port, start_server, stop_server

    ca, server_pem, client_pem = (tmp_path / name for name in ("ca.pem", "server.pem",
                                                                "client.pem"))
    pki["ca"].cert_pem.write_to_path(str(ca))
    pki["server"].private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    pki["client"].private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    address = f"tcp://127.0.0.1:{free_port()}"
    process = start_server(str(tmp_path / "cli.sock"), "--listen", address,
                           "--tls-cert", str(server_pem), "--tls-ca", str(ca),
                           "--tls-require-client-cert")
    env = dict(os.environ, PYTHONPATH=REPO)

    def send(*extra):
        return subprocess.run([sys.executable, "-m", "hintens", "send", "--connect", address,
                               *extra, "echo:secret"], capture_output=True, env=env, cwd=REPO,
                              timeout=30)

    try:
        ok = send("--tls-ca", str(ca), "--tls-cert", str(client_pem))
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == b"secret"
        refused = send("--tls-ca", str(ca))   # no client certificate
        assert refused.returncode == 3 and b"TLS" in refused.stderr, refused.stderr
        plain = send()
        assert plain.returncode == 3 and b"TLS port" in plain.stderr, plain.stderr
    finally:
        stop_server(process)
