"""Test peers: a server process, and a raw-socket peer that speaks frames byte by byte."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from hintens import _core_py, _demo, decode_error_payload

from .handlers import command

HEADER = struct.Struct(">HHIHIHQ")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(path: str, *extra: str, handler: str = "tests.handlers:command"):
    """`hintens serve` in its own process, listening when this returns."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "hintens", "serve", "--socket", path, "--handler", handler,
            *extra]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               cwd=REPO)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode())
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
                return process
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.02)
    process.kill()
    raise RuntimeError("server process did not start")


def wait_for_lone_thread(timeout_s: float = 5.0) -> None:
    """Before a fork: wait until this process runs one thread (the flusher thread of earlier
    tests' Events ends a second after its last work), so no lock is held across the fork."""
    deadline = time.monotonic() + timeout_s
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == 1, threading.enumerate()


def fork_server_as(uid: int, path: str, **options) -> int:
    """A hintens server (handler ``command``) in a forked child running as ``uid`` (the
    interpreter's own files may not be readable by that uid, so it cannot exec one), letting
    our own uid in. Returns the child's pid once the socket accepts connections; end it with
    os.kill(pid, SIGKILL) and os.waitpid."""
    import hintens

    wait_for_lone_thread()
    me = os.geteuid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            options.setdefault("allow_uids", [me])
            hintens.Server(path, command, **options).serve_forever()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            return pid
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise RuntimeError("forked server did not start")


def stop_server(process, sig=signal.SIGTERM, timeout=10):
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr:
        process.stderr.close()


def raw_frame(payload=b"", *, magic=0x4850, version=0x0100, msg_type=1, flags=0, length=None,
              checksum=None, request_id=1) -> bytes:
    length = len(payload) if length is None else length
    checksum = _core_py.crc16(payload) if checksum is None else checksum
    return HEADER.pack(magic, version, msg_type, flags, length, checksum, request_id) + payload


def raw_listener(path: str) -> socket.socket:
    """A bare listening Unix socket, for servers written by hand in a test."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    return listener


def read_requests(conn: socket.socket, count: int) -> list:
    """Read from ``conn`` until ``count`` Request frames have arrived; return them."""
    decoder, requests = _core_py.FrameDecoder(), []
    while len(requests) < count:
        requests += [f for f in decoder.feed(conn.recv(65536)) if f.type == 1]
    return requests


class RawPeer:
    """A minimal peer written from PROTOCOL.md: no hello, plain frames, a decoder."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.decoder = _core_py.FrameDecoder()
        self.frames: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_frame(self, skip_hello: bool = True):
        """The next frame from the server, or None at EOF."""
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                if skip_hello and frame.type == 3 and frame.request_id == 0:
                    continue
                return frame
            data = self.sock.recv(65536)
            if not data:
                return None
            self.frames += self.decoder.feed(data)

    def next_error(self):
        frame = self.next_frame()
        assert frame is not None and frame.type == 4, frame
        return (frame.request_id, *decode_error_payload(frame.payload))

    def at_eof(self) -> bool:
        return self.next_frame() is None

    def close(self) -> None:
        self.sock.close()


__all__ = ["RawPeer", "fork_server_as", "raw_frame", "raw_listener", "read_requests",
           "start_server", "stop_server", "wait_for_lone_thread", "_demo"]
