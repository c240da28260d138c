"""The `hintens` command line, run as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from .peers import REPO, start_server, stop_server


def hintens_cli(*args, stdin=b"", timeout=30):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "hintens", *args], input=stdin,
                          capture_output=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture
def served(tmp_path):
    path = str(tmp_path / "cli.sock")
    process = start_server(path)
    yield path
    stop_server(process, signal.SIGKILL)


def test_send_prints_the_reply_bytes(served):
    done = hintens_cli("send", "--socket", served, "echo:hello")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"hello", b"")


def test_send_reads_stdin(served):
    payload = b"echo:" + bytes(range(256)) * 300
    done = hintens_cli("send", "--socket", served, "-", stdin=payload)
    assert done.returncode == 0 and done.stdout == payload[5:]


def test_send_uses_the_env_socket(served):
    env = dict(os.environ, PYTHONPATH=REPO, HINTENS_SOCKET=served)
    done = subprocess.run([sys.executable, "-m", "hintens", "send", "echo:env"],
                          capture_output=True, env=env, timeout=30)
    assert done.returncode == 0 and done.stdout == b"env"


def test_send_event(served):
    assert hintens_cli("send", "--socket", served, "--event", "x").returncode == 0


@pytest.mark.parametrize("args, code, text", [
    (("echo:unused",), 3, b"does not exist"),
    (("raise:boom",), 1, b"HANDLER_ERROR] ValueError: boom"),
    (("--timeout", "0.3", "sleep:3:x"), 4, b"in time"),
])
def test_failures_are_one_line_without_traceback(served, tmp_path, args, code, text):
    socket_path = str(tmp_path / "missing.sock") if code == 3 else served
    done = hintens_cli("send", "--socket", socket_path, *args)
    assert done.returncode == code
    assert done.stdout == b""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(b"hintens: error: ") and text in lines[0]


def test_bad_handler_spec(tmp_path):
    done = hintens_cli("serve", "--socket", str(tmp_path / "s.sock"), "--handler", "no_such:thing")
    assert done.returncode == 2 and b"cannot load handler" in done.stderr
    assert b"Traceback" not in done.stderr


def test_info():
    done = hintens_cli("info")
    assert done.returncode == 0 and b"core:" in done.stdout
