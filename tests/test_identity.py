"""Who is on the other end: the client checks the server's uid (SO_PEERCRED) before it sends a
byte, and the default socket lives in a directory only this user controls."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import tempfile

import pytest

import hintens
from hintens.transport import unix as _unix

from .peers import fork_server_as, wait_for_lone_thread
from .test_cli import hintens_cli

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another uid")


@pytest.fixture
def nobody_dir():
    """A directory the uid NOBODY owns (mode 0755): a server running as NOBODY binds here."""
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        os.chown(directory, NOBODY, NOBODY)
        os.chmod(directory, 0o755)
        yield directory


@pytest.fixture
def nobody_server(nobody_dir):
    path = os.path.join(nobody_dir, "theirs.sock")
    pid = fork_server_as(NOBODY, path)
    yield path
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# The client checks the server ---------------------------------------------------------------

@needs_root
def test_a_server_of_another_uid_is_refused_before_anything_is_sent(nobody_server):
    with pytest.raises(hintens.UntrustedServerError, match=f"uid {NOBODY}.*server_uids"):
        hintens.Client(nobody_server)
    # An UntrustedServerError is a ConnectError: code that handles "no server" handles it.
    assert issubclass(hintens.UntrustedServerError, hintens.ConnectError)


@needs_root
def test_nothing_reaches_an_untrusted_server(nobody_dir):
    # A listener of NOBODY's that records what it receives: the refused client sends nothing,
    # not even its hello.
    path = os.path.join(nobody_dir, "spy.sock")
    wait_for_lone_thread()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the impostor
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            os.write(write_end, b"ready\n")
            conn, _ = listener.accept()
            conn.settimeout(2)
            received = b""
            try:
                while chunk := conn.recv(4096):
                    received += chunk
            except OSError:
                pass
            os.write(write_end, b"%d\n" % len(received))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.readline() == b"ready\n"
        with pytest.raises(hintens.UntrustedServerError):
            hintens.Client(path)
        assert pipe.readline() == b"0\n"   # not one byte
    os.waitpid(pid, 0)


@needs_root
def test_server_uids_trusts_a_named_uid(nobody_server):
    with hintens.Client(nobody_server, server_uids=[NOBODY]) as client:
        assert client.server_credentials.uid == NOBODY
        assert client.request(b"echo:trusted") == b"trusted"


@needs_root
def test_a_pool_passes_server_uids_on(nobody_server):
    with hintens.ClientPool(nobody_server, retry=hintens.NO_RETRY) as pool:
        with pytest.raises(hintens.UntrustedServerError):
            pool.request(b"echo:x")
    with hintens.ClientPool(nobody_server, server_uids=[NOBODY]) as pool:
        assert pool.request(b"echo:x") == b"x"


@needs_root
def test_the_cli_refuses_an_untrusted_server_unless_told(nobody_server):
    done = hintens_cli("send", "--socket", nobody_server, "echo:x")
    assert done.returncode == 3 and b"server_uids" in done.stderr
    assert b"Traceback" not in done.stderr
    done = hintens_cli("send", "--socket", nobody_server, "--server-uid", str(NOBODY), "echo:x")
    assert (done.returncode, done.stdout) == (0, b"x")


def test_our_own_server_and_root_are_trusted(sock_path):
    with hintens.Server(sock_path).start():
        with hintens.Client(sock_path) as client:
            assert client.server_credentials.uid == os.geteuid()
            assert client.server_credentials.pid == os.getpid()


@pytest.mark.parametrize("bad", ["65534", [-1], [1.5], 7])
def test_server_uids_must_be_ints(sock_path, bad):
    with pytest.raises((TypeError, ValueError), match="server_uids"):
        hintens.Client(sock_path, server_uids=bad)


# The default socket path --------------------------------------------------------------------

@pytest.fixture
def fallback(monkeypatch, tmp_path):
    """The per-user fallback directory under a private parent instead of /tmp."""
    monkeypatch.delenv("HINTENS_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(_unix, "FALLBACK_PARENT", str(tmp_path))
    return tmp_path / f"hintens-{os.geteuid()}"


def test_the_default_is_the_runtime_dir_when_it_is_private(monkeypatch, tmp_path, fallback):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert _unix.socket_path(None) == str(runtime / "hintens.sock")


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
def test_a_runtime_dir_others_may_use_is_ignored(monkeypatch, tmp_path, fallback, caplog, mode):
    runtime = tmp_path / "shared"
    runtime.mkdir()
    os.chmod(runtime, mode)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with caplog.at_level(logging.WARNING, logger="hintens"):
        assert _unix.socket_path(None) == str(fallback / "hintens.sock")
    assert "ignoring XDG_RUNTIME_DIR" in caplog.text


def test_the_server_creates_the_fallback_directory_private(fallback):
    assert not fallback.exists()
    with hintens.Server().start() as server:
        assert server.path == str(fallback / "hintens.sock")
        info = os.lstat(fallback)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()
        with hintens.Client() as client:     # the client finds it by the same rule
            assert client.request(b"default") == b"default"


def test_a_client_without_the_directory_finds_no_server(fallback):
    with pytest.raises(hintens.ConnectError, match="does not exist"):
        hintens.Client()
    assert not fallback.exists()           # a client creates nothing


@pytest.mark.parametrize("spoil, reason", [
    ("mode", "other users can use it"),
    ("symlink", "symbolic link"),
    ("file", "not a directory"),
    pytest.param("owner", f"belongs to uid {NOBODY}", marks=needs_root),
])
def test_an_unsafe_fallback_directory_is_refused(fallback, tmp_path, spoil, reason):
    if spoil == "mode":
        fallback.mkdir(mode=0o700)
        os.chmod(fallback, 0o755)
    elif spoil == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        fallback.symlink_to(target)
    elif spoil == "file":
        fallback.write_bytes(b"")
    else:
        fallback.mkdir(mode=0o700)
        os.chown(fallback, NOBODY, NOBODY)
    for make in (hintens.Server, hintens.Client):
        with pytest.raises(hintens.SocketPathError, match=reason):
            make()
    assert not (fallback / "hintens.sock").exists()


# The server's socket directory ------------------------------------------------------------

def test_a_replaceable_socket_directory_is_a_warning(tmp_path, caplog):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with caplog.at_level(logging.WARNING, logger="hintens"):
        hintens.Server(str(open_dir / "s.sock")).close()
    assert "no sticky bit" in caplog.text


@pytest.mark.parametrize("mode", [0o700, 0o1777])
def test_private_or_sticky_directories_are_quiet(tmp_path, caplog, mode):
    directory = tmp_path / "d"
    directory.mkdir()
    os.chmod(directory, mode)
    with caplog.at_level(logging.WARNING, logger="hintens"):
        hintens.Server(str(directory / "s.sock")).close()
    assert "sticky" not in caplog.text
