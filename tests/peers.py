"""Test peers: a server process, and a raw-socket peer that speaks frames byte by byte."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from hintens import _python_core as _core_py
from hintens.wire import decode_error_payload

from .handlers import command

HEADER = struct.Struct(">HHIHIHQ")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


RING_PASS = os.environ.get("HINTENS_TEST_RING", "") not in ("", "0")


def ring_by_default() -> None:
    """Make ``ring=True`` the default of the Clients and Servers (sync and asyncio) in this
    process (the ring pass of the suite, tests/conftest.py)."""
    import hintens
    import hintens.aio

    for cls in (hintens.Client, hintens.Server, hintens.aio.Client, hintens.aio.Server):
        cls.__init__.__kwdefaults__["ring"] = True


def start_server(path: str, *extra: str, handler: str = "tests.handlers:command"):
    """`hintens serve` in its own process, listening when this returns."""
    argv = [sys.executable, "-m", "hintens", "serve", "--socket", path, "--handler", handler,
            *extra, *(["--ring"] if RING_PASS else [])]
    return _spawn(argv, path)


def start_server_with(path: str, handler: str = "tests.handlers:command", **options):
    """A hintens Server with ``options`` (keyword arguments, as Python literals) in its own
    process, listening when this returns; stop it with ``stop_server``."""
    module, _, function = handler.partition(":")
    if RING_PASS:
        options.setdefault("ring", True)
    script = (
        "import importlib, logging, signal, sys, hintens\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"handler = getattr(importlib.import_module({module!r}), {function!r})\n"
        f"server = hintens.Server({path!r}, handler, **{options!r})\n"
        "signal.signal(signal.SIGTERM, lambda *_: server.shutdown())\n"
        "server.serve_forever()\n")
    return _spawn([sys.executable, "-c", script], path)


def start_aio_server_with(path: str, handler: str = "tests.handlers:async_command",
                          **options):
    """A ``hintens.aio.Server`` with ``options`` in its own process, on asyncio's default
    loop (``loop="uvloop"`` in options: on uvloop), listening when this returns; stop it
    with ``stop_server`` (SIGTERM closes it gracefully)."""
    module, _, function = handler.partition(":")
    loop = options.pop("loop", "asyncio")
    if RING_PASS:
        options.setdefault("ring", True)
    script = (
        "import asyncio, importlib, logging, signal, sys, hintens.aio\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"handler = getattr(importlib.import_module({module!r}), {function!r})\n"
        "async def main():\n"
        f"    server = hintens.aio.Server({path!r}, handler, **{options!r})\n"
        "    asyncio.get_running_loop().add_signal_handler(\n"
        "        signal.SIGTERM, lambda: asyncio.ensure_future(server.close()))\n"
        "    await server.serve_forever()\n"
        + ("import uvloop\nuvloop.install()\n" if loop == "uvloop" else "")
        + "asyncio.run(main())\n")
    return _spawn([sys.executable, "-c", script], path)


def _spawn(argv, path):
    # Its log goes to a file, not a pipe: a server that logs much would block on a full pipe.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=REPO)
    process.log = log
    if _accepting(path, lambda: process.poll() is None):
        return process
    if process.poll() is not None:
        raise RuntimeError(server_log(process))
    process.kill()
    process.wait()
    raise RuntimeError("server process did not start: " + server_log(process))


def _accepting(path, alive, timeout_s=20.0) -> bool:
    """Wait until ``path`` accepts a connection (True), or the server is not ``alive()`` any
    more or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        if path.startswith("tcp://"):
            host, _, port = path[len("tcp://"):].rpartition(":")
            probe = socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET)
            target = (host.strip("[]"), int(port))
        else:
            probe = socket.socket(socket.AF_UNIX)
            target = path
        try:
            probe.connect(target)
            return True
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    return False


def server_log(process) -> str:
    """What a server process started here has logged so far."""
    process.log.seek(0)
    return process.log.read().decode(errors="replace")


def free_port() -> int:
    """A TCP port nobody listens on right now (for a server a test starts, and restarts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_lone_thread(timeout_s: float = 5.0) -> None:
    """Before a fork: wait until this process runs one thread (the flusher thread of earlier
    tests' Events ends a second after its last work), so no lock is held across the fork."""
    deadline = time.monotonic() + timeout_s
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    from hintens.transport.flusher import FLUSHER
    assert threading.active_count() == 1, (threading.enumerate(), FLUSHER._due,
                                           [(w.channel, w.channel.queued, w.channel.closed)
                                            for w in FLUSHER._watched.values()])


def fork_server_as(uid: int, path: str, prepare=None, **options) -> int:
    """A hintens server (handler ``command``) in a forked child running as ``uid`` (the
    interpreter's own files may not be readable by that uid, so it cannot exec one), letting
    our own uid in; ``prepare()`` runs in the child once it is ``uid`` (to set a limit, say).
    Returns the child's pid once the socket accepts connections; end it with
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
            if prepare is not None:
                prepare()
            options.setdefault("allow_uids", [me])
            hintens.Server(path, command, **options).serve_forever()
        finally:
            os._exit(0)
    if _accepting(path, lambda: os.waitpid(pid, os.WNOHANG) == (0, 0)):
        return pid
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
    process.log.close()


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

    def controls(self, frames):
        """(magic, ids) of the control Events among ``frames``."""
        from hintens.protocol import shm as _shm

        found = []
        for frame in frames:
            if frame.type == 3 and frame.request_id == 0:
                control = _shm.decode_control(frame.payload)
                if control is not None:
                    found.append(control)
        return found

    def until(self, predicate, limit=10_000):
        """Frames up to and including the first that satisfies ``predicate`` (hellos too)."""
        seen = []
        while len(seen) < limit:
            frame = self.next_frame(skip_hello=False)
            assert frame is not None, f"the stream ended after {seen}"
            seen.append(frame)
            if predicate(frame):
                return seen
        raise AssertionError("no such frame")

    def close(self) -> None:
        self.sock.close()


class ShmPeer(RawPeer):
    """A raw peer that announces shared memory and sends hand-made SHM frames."""

    def __init__(self, path: str, timeout: float = 5.0, **hello) -> None:
        from hintens.protocol.endpoint import FEATURE_SHM, Hello

        super().__init__(path, timeout)
        hello.setdefault("features", FEATURE_SHM)
        self.send(raw_frame(Hello(**hello).encode(), msg_type=3, request_id=0))

    def send_shm(self, request_id, segment_id, size, offset, length, new, fd=None, *,
                 msg_type=1, flags=0, descriptor_flags=None):
        from hintens.protocol import shm as _shm

        descriptor = _shm.encode_descriptor(segment_id, size, offset, length, new)
        if descriptor_flags is not None:
            descriptor = descriptor[:4] + struct.pack("<I", descriptor_flags) + descriptor[8:]
        frame = raw_frame(descriptor, flags=1 | flags, request_id=request_id, msg_type=msg_type)
        ancillary = [] if fd is None else [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        self.sock.sendmsg([frame], ancillary)

def memfd(size, seals=0, fill=b""):
    """A memfd of ``size`` bytes (sparse: nothing is allocated), with ``fill`` at offset 0."""
    import fcntl

    fd = os.memfd_create("hostile", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def open_fds(pid="self"):
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(path: str, pid: int, timeout_s: float = 10.0, *, connect=None) -> int:
    """The descriptors of the server process ``pid`` (listening on ``path``: a Unix socket,
    or ``tcp://host:port``) at rest. A server's socket accepts (``_accepting``) as soon as it
    listens, before the server has opened the rest of what it keeps open (its wake pipe,
    say): a count read then is too low. And a connection the test closed a moment ago may
    not be closed on the server's side yet: a count read then is too high. Here a connection
    waits for the server's hello (it is serving, with all it keeps open opened) and hangs up;
    then the server must hold no connection's socket (``connection_fds``), and the count
    must hold still. ``connect()``: opens a connection and returns it (with a ``close()``)
    once the server's hello came on it, for a TLS server say; by default a plain socket."""
    connection = connect() if connect is not None else _hello_socket(path, timeout_s)
    connection.close()
    if not wait_until(lambda: not connection_fds(pid), timeout_s):
        raise RuntimeError(f"the server kept closed connections {connection_fds(pid)}: "
                           f"{fd_table(pid)}")
    previous = open_fds(pid)
    for _ in range(100):
        time.sleep(0.05)
        now = open_fds(pid)
        if now == previous and not connection_fds(pid):
            return now
        previous = now
    return previous


def _hello_socket(path: str, timeout_s: float) -> socket.socket:
    """A plain socket connected to ``path`` (Unix or ``tcp://``), once the server's hello
    (its first byte) came on it."""
    if path.startswith("tcp://"):
        host, _, port = path[len("tcp://"):].rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout_s)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(path)
    try:
        if not sock.recv(1):
            raise RuntimeError("the server hung up before its hello")
    except BaseException:
        sock.close()
        raise
    return sock


def connection_fds(pid: int) -> dict[int, str]:
    """The descriptors of process ``pid`` that are connections (Unix or TCP) it has not
    closed, and what each names. A connection holds its descriptor until the server closes
    it, whatever the peer did. The kernel's socket tables (of the process's network
    namespace) tell them from the rest: a listener (a Unix one carries __SO_ACCEPTCON, a TCP
    one is in state LISTEN) and a Unix socket with no path (a socketpair: a wake pipe) are
    not connections; a Unix socket with a path is an accepted one; a TCP socket in any other
    state is one, and so is a socket in none of the tables (a TCP connection that the kernel
    has closed already: it leaves the table, while the process still holds it)."""
    inodes = {}
    for fd, target in fd_table(pid).items():
        if target.startswith("socket:["):
            inodes[int(target[len("socket:["):-1])] = fd
    resting, connected = set(), set()
    with open(f"/proc/{pid}/net/unix") as rows:
        for line in rows.readlines()[1:]:
            # Num RefCount Protocol Flags Type St Inode [Path]
            fields = line.split(maxsplit=7)
            listener = int(fields[3], 16) & 0x10000
            (connected if len(fields) == 8 and not listener else resting).add(int(fields[6]))
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as rows:
                lines = rows.readlines()[1:]
        except FileNotFoundError:   # no IPv6
            continue
        for line in lines:
            # sl local_address rem_address st ... inode: LISTEN is 0A
            fields = line.split()
            (resting if fields[3] == "0A" else connected).add(int(fields[9]))
    return {fd: f"socket:[{inode}]" for inode, fd in inodes.items()
            if inode in connected or inode not in resting}


def fd_table(pid="self"):
    """A process's descriptors and what each names (for failure messages)."""
    table = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            table[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return table


def memfd_fds(pid="self"):
    """How many of a process's descriptors are memfds."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:")
        except OSError:
            pass
    return count


def memfd_mappings(pid="self"):
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if "memfd:" in line]


def status_kib(field, pid="self"):
    """A /proc/PID/status field in KiB (VmRSS, VmSize, RssAnon, Threads as a count)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def wait_until(predicate, timeout_s=10.0, interval_s=0.02):
    """Poll ``predicate`` until it is true (returns True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


__all__ = ["RawPeer", "ShmPeer", "connection_fds", "fd_table", "fork_server_as", "memfd",
           "memfd_fds", "memfd_mappings", "open_fds", "raw_frame", "raw_listener",
           "read_requests", "server_log", "settled_fds", "start_server", "start_server_with",
           "status_kib", "stop_server", "wait_for_lone_thread", "wait_until"]
