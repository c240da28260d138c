"""Shared fixtures: every core test runs against both implementations."""

from __future__ import annotations

import gc
import os
import signal
import socket

import pytest
from hypothesis import HealthCheck, settings

from hintens import _python_core as _core_py

# Deterministic property tests: the same examples on every run and every machine.
settings.register_profile(
    "hintens", derandomize=True, deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hintens")

NO_EXTENSIONS = os.environ.get("HINTENS_NO_EXTENSIONS", "") not in ("", "0")
#: The ring pass (make test runs it on a set of modules): every Client and Server, in
#: this process and in the server processes the tests start, asks for a shared-memory ring by
#: default, so that the same tests run with their frames in the ring instead of the socket.
RING_PASS = os.environ.get("HINTENS_TEST_RING", "") not in ("", "0")
if RING_PASS:
    from .peers import ring_by_default

    ring_by_default()


def _cython_core():
    if NO_EXTENSIONS:
        pytest.skip("HINTENS_NO_EXTENSIONS is set")
    # No skip on ImportError: a normal build must have the extension.
    from hintens import _cython_core as _core
    return _core


@pytest.fixture(scope="session", params=["cython", "python"])
def core(request):
    """The compiled core, then its pure-Python twin."""
    return _cython_core() if request.param == "cython" else _core_py


@pytest.fixture(scope="session")
def cython_core():
    return _cython_core()


@pytest.fixture(scope="module")
def young_heap():
    """For a module's tests that call gc.collect() to free what they made (descriptors,
    mappings) before counting: what each collection walks is only what was made since this
    fixture began. Everything alive before, once fully collected, is frozen (gc.freeze) until
    the module ends: a full collection of the suite's heap takes ~0.15 s."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def no_hangup_check(monkeypatch):
    """For a test whose request must go out on a connection the server dropped while the
    pool held it idle: the pools' look for a hang-up before lending a connection idle over
    _HANGUP_CHECK_S (1 s) is kept out of the way. Killing and restarting a server process can
    take longer than that on a loaded machine, and then the pool opens a new connection
    instead, without a retry: not the case such a test is about."""
    import hintens.aio.pool
    import hintens.sync.pool

    monkeypatch.setattr(hintens.sync.pool, "_HANGUP_CHECK_S", 60.0)
    monkeypatch.setattr(hintens.aio.pool, "_HANGUP_CHECK_S", 60.0)


# Real servers for the socket tests: each test gets its own socket path and, where it asks for
# one, its own `hintens serve` process (handler: tests.handlers.command) and a client of it.

@pytest.fixture
def pair():
    """A connected pair of Unix stream sockets."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield left, right
    left.close()
    right.close()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "hx.sock")


@pytest.fixture
def server_process(sock_path):
    from .peers import start_server, stop_server

    process = start_server(sock_path)
    yield process
    stop_server(process, signal.SIGKILL)


@pytest.fixture
def client(server_process, sock_path):
    import hintens

    with hintens.Client(sock_path, timeout=60) as client:
        yield client
