#!/usr/bin/env python3
"""Hostile-peer fuzzer for the hintens server (see README.md in this directory).

It starts its own server process, records a baseline of its resources, lets K worker threads
throw random "episodes" of bad input at it over raw AF_UNIX sockets for N seconds, checks
liveness with a real hintens.Client every few seconds, and at the end checks that the server
is alive, still serving, and back near its baseline (fds, threads, memfd mappings, RSS).
With --tcp the server listens on loopback TCP and the workers attack over TCP (no shared
memory, no descriptors: those episodes become shm_tcp); with --tls, inside mutual TLS, with
episodes around the handshake as well.

Frames are built here from docs/PROTOCOL.md alone (CRC from binascii.crc_hqx, not from
hintens), so this file is also an independent model of the protocol: where a reply can be
predicted, it is checked, and a mismatch is reported as a deviation (or a failure when it
breaks an in-sync connection).
"""

from __future__ import annotations

import argparse
import array
import binascii
import collections
import errno
import fcntl
import json
import mmap
import os
import random
import select
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKDIR = "/tmp/hx-fuzz"

# Protocol constants (docs/PROTOCOL.md) ----------------------------------------------------

HDR = struct.Struct(">HHIHIHQ")   # magic, version, type, flags, length, crc, request id
MAGIC = 0x4850
REQUEST, RESPONSE, EVENT, ERROR = 1, 2, 3, 4
F_SHM, F_COMPRESSED = 0x1, 0x2
DESC = struct.Struct("<IIQQQ")     # segment id, flags, size, offset, length
NEW_SEGMENT, PEER_SEGMENT = 0x1, 0x2
LIMIT = 64 * 1024 * 1024
CONTROL_LIMIT = 4108
CHECKSUM, BAD_HEADER, TOO_LARGE, UNSUPPORTED_FLAGS = 1, 2, 3, 4
HANDLER_ERROR, TIMEOUT_CODE, SHM_ERROR, UNAVAILABLE = 5, 6, 7, 8
MAX_SEGMENT = 1 << 40
SHM_RECEIVE_BYTES = 1 << 30        # the server's per-connection bounds (defaults)
SHM_RECEIVE_SEGMENTS = 64
CODE_NAMES = {1: "CHECKSUM", 2: "BAD_HEADER", 3: "TOO_LARGE", 4: "UNSUPPORTED_FLAGS",
              5: "HANDLER_ERROR", 6: "TIMEOUT", 7: "SHM_ERROR", 8: "UNAVAILABLE"}

SEAL_SEAL, SEAL_SHRINK, SEAL_GROW, SEAL_WRITE = (fcntl.F_SEAL_SEAL, fcntl.F_SEAL_SHRINK,
                                                 fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE)


def crc16(data) -> int:
    return binascii.crc_hqx(data, 0xFFFF)   # CRC-16/CCITT-FALSE


def frame(typ, payload=b"", rid=0, flags=0, version=0x0100, magic=MAGIC, crc=None,
          length=None) -> bytes:
    payload = bytes(payload)
    return HDR.pack(magic, version, typ & 0xFFFFFFFF, flags & 0xFFFF,
                    (len(payload) if length is None else length) & 0xFFFFFFFF,
                    crc16(payload) if crc is None else crc & 0xFFFF,
                    rid & 0xFFFFFFFFFFFFFFFF) + payload


def hello_payload(entries, count=None, magic=b"HELO", trailing=b"") -> bytes:
    parts = [magic, struct.pack("<Q", len(entries) if count is None else count)]
    for key, value in entries:
        parts += [struct.pack("<HQ", key & 0xFFFF, len(value)), value]
    return b"".join(parts) + trailing


def control_payload(magic: bytes, ids, count=None) -> bytes:
    return magic + struct.pack("<I", (len(ids) if count is None else count) & 0xFFFFFFFF) + \
        b"".join(struct.pack("<I", i & 0xFFFFFFFF) for i in ids)


def descriptor(sid, flags, size, offset, length) -> bytes:
    return DESC.pack(sid & 0xFFFFFFFF, flags & 0xFFFFFFFF, size & (2**64 - 1),
                     offset & (2**64 - 1), length & (2**64 - 1))


def decode_hello(payload: bytes):
    """The spec's hello rules (section 8): a dict of what the receiver understands, or None."""
    if len(payload) > 4096 or len(payload) < 12 or payload[:4] != b"HELO":
        return None
    (count,) = struct.unpack_from("<Q", payload, 4)
    if count > 64:
        return None
    pos, entries = 12, {}
    for _ in range(count):
        if len(payload) - pos < 10:
            return None
        key, length = struct.unpack_from("<HQ", payload, pos)
        pos += 10
        if length > len(payload) - pos or key in entries:
            return None
        entries[key] = payload[pos:pos + length]
        pos += length
    if pos != len(payload):
        return None
    sizes = {1: 1, 2: 4, 3: 4, 4: 16, 5: 16, 6: 8, 7: 4}
    known = {k: v for k, v in entries.items() if sizes.get(k) == len(v)}
    return {
        "features": struct.unpack("<I", known[2])[0] if 2 in known else 0,
        "max_payload": struct.unpack("<I", known[3])[0] if 3 in known else LIMIT,
        "shm_bytes": struct.unpack("<Q", known[6])[0] if 6 in known else 1 << 30,
        "shm_segments": struct.unpack("<I", known[7])[0] if 7 in known else 64,
        "session": known.get(4),
        "entries": entries,
    }


def receiver_limit(typ, rid):
    """Section 6 check 4: the server's limit, raised to at least 4,108 bytes for Error frames
    and control Events (never lowered to it)."""
    return max(LIMIT, CONTROL_LIMIT) if typ == ERROR or (typ == EVENT and rid == 0) else LIMIT


def expected_header_verdict(magic, version, typ, flags, length, rid):
    """Section 6 checks 1-5: (code, fatal) of the first failed check, or None."""
    if magic != MAGIC:
        return BAD_HEADER, True
    if version >> 8 != 1:
        return BAD_HEADER, True
    if typ not in (1, 2, 3, 4):
        return BAD_HEADER, True
    if length > receiver_limit(typ, rid):
        return TOO_LARGE, True
    if flags & ~0x3:
        return UNSUPPORTED_FLAGS, False
    return None


def expected_reply(payload: bytes):
    """What the fuzz server's handler answers (see SERVER_SCRIPT): ("ok", bytes) or
    ("err", code)."""
    head = bytes(payload[:24])
    if head.startswith(b"size:"):
        return "ok", b"%d" % len(payload)
    if head.startswith(b"big:"):
        try:
            n = int(head[4:].split(b";")[0])
        except ValueError:
            n = 0
        return "ok", bytes([0x5A]) * max(0, min(n, 8 << 20))
    if head.startswith(b"raise:"):
        return "err", 1001
    if head.startswith(b"none:"):
        return "ok", b""
    if head.startswith(b"notbytes:"):
        return "err", HANDLER_ERROR
    return "ok", bytes(payload)


class Unreadable(bytes):
    """A reply in a segment of ours too large to map here: its content is not checked."""


UNREADABLE = Unreadable(b"<unreadable>")


# Process inspection ------------------------------------------------------------------------

def proc_stats(pid: int) -> dict:
    out = {"fds": -1, "rss_kb": -1, "vm_kb": -1, "threads": -1, "memfd_maps": -1,
           "memfd_kb": 0}
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
                elif line.startswith("VmSize:"):
                    out["vm_kb"] = int(line.split()[1])
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        n = kb = 0
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "memfd:" in line:
                    n += 1
                    lo, hi = line.split()[0].split("-")
                    kb += (int(hi, 16) - int(lo, 16)) // 1024
        out["memfd_maps"], out["memfd_kb"] = n, kb
    except (OSError, ValueError):
        pass
    return out


def top_mappings(pid: int, n: int = 8) -> list:
    """The mappings of a process holding the most RSS (from /proc/PID/smaps)."""
    out, current = [], None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                parts = line.split()
                if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    current = {"range": parts[0], "perms": parts[1],
                               "name": parts[5] if len(parts) > 5 else "[anon]",
                               "size_kb": (hi - lo) // 1024, "rss_kb": 0}
                    out.append(current)
                elif parts[0] == "Rss:" and current is not None:
                    current["rss_kb"] = int(parts[1])
    except OSError:
        return []
    return sorted(out, key=lambda m: -m["rss_kb"])[:n]


def fmt_stats(s: dict) -> str:
    return (f"fds={s['fds']} threads={s['threads']} rss={s['rss_kb'] / 1024:.1f}MiB "
            f"vm={s['vm_kb'] / 1024:.0f}MiB memfd_maps={s['memfd_maps']}"
            f"({s['memfd_kb'] // 1024}MiB)")


SERVER_SCRIPT = r"""
import faulthandler, logging, signal, sys
faulthandler.enable()
faulthandler.register(signal.SIGUSR1, all_threads=True)
import hintens
logging.basicConfig(level=getattr(logging, sys.argv[2]),
                    format="%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s")

import ctypes, gc, os, threading
_libc = ctypes.CDLL("libc.so.6")

def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1

def _memstat(*_):
    before = _rss_kb()
    blocks, objects = sys.getallocatedblocks(), len(gc.get_objects())
    _libc.malloc_trim(0)
    import tracemalloc
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        for stat in snapshot.statistics("traceback")[:12]:
            print(f"TRACEMALLOC {stat.size / 1024:.0f} KiB in {stat.count} blocks:",
                  file=sys.stderr)
            for line in stat.traceback.format()[-8:]:
                print(f"TRACEMALLOC   {line}", file=sys.stderr)
    print(f"MEMSTAT blocks={blocks} gc_objects={objects} rss_kb={before} "
          f"rss_kb_after_trim={_rss_kb()} threads={threading.active_count()}",
          file=sys.stderr, flush=True)

signal.signal(signal.SIGUSR2, _memstat)

def handler(payload):
    view = memoryview(payload)
    head = bytes(view[:24])
    if head.startswith(b"size:"):
        return b"%d" % view.nbytes
    if head.startswith(b"big:"):
        try:
            n = int(head[4:].split(b";")[0])
        except ValueError:
            n = 0
        return bytes([0x5A]) * max(0, min(n, 8 << 20))
    if head.startswith(b"raise:"):
        raise hintens.RemoteError(1001, "asked to raise")
    if head.startswith(b"none:"):
        return None
    if head.startswith(b"notbytes:"):
        return 12345
    return payload          # echo (a shared payload goes back as an echo of its segment)

options = {}
if "events" in sys.argv[3:]:
    # Events count per tag, for the checker's chaos mix: an Event "ev:TAG:..." adds one to
    # TAG, and a Request "evcount:TAG" answers the count (the last 64 tags are kept).
    import collections
    _counts = collections.OrderedDict()
    _counts_lock = threading.Lock()

    def on_event(payload, connection):
        head = bytes(memoryview(payload)[:40])
        if head.startswith(b"ev:"):
            tag = head[3:].split(b":")[0]
            with _counts_lock:
                _counts[tag] = _counts.get(tag, 0) + 1
                _counts.move_to_end(tag)
                while len(_counts) > 64:
                    _counts.popitem(last=False)

    _echo_handler = handler

    def handler(payload):
        head = bytes(memoryview(payload)[:40])
        if head.startswith(b"evcount:"):
            with _counts_lock:
                return b"%d" % _counts.get(head[8:], 0)
        return _echo_handler(payload)

    options["on_event"] = on_event
for arg in sys.argv[3:]:
    if arg.startswith("tls="):   # mutual TLS: our CA's client certificates only
        import os, ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(os.path.join(arg[4:], "server.pem"))
        context.load_verify_locations(os.path.join(arg[4:], "ca.pem"))
        context.verify_mode = ssl.CERT_REQUIRED
        options["ssl_context"] = context

if "aio" in sys.argv[3:]:   # the asyncio server, the same handler run on the loop
    import asyncio
    import hintens.aio

    async def serve():
        server = hintens.aio.Server(sys.argv[1], handler, **options)
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: asyncio.ensure_future(server.close()))
        print("core:", hintens.implementation, "version:", hintens.__version__, "aio",
              file=sys.stderr, flush=True)
        await server.serve_forever()

    asyncio.run(serve())
else:
    server = hintens.Server(sys.argv[1], handler, **options)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    print("core:", hintens.implementation, "version:", hintens.__version__, file=sys.stderr,
          flush=True)
    server.serve_forever()
print("server exited cleanly", file=sys.stderr, flush=True)
"""


class ServerProc:
    def __init__(self, path: str, log_path: str, level: str, trace: bool = False,
                 extra_env=(), aio: bool = False, sockaddr=None, options=()) -> None:
        """``path``: the address the server listens on (a socket path or tcp://...);
        ``sockaddr``: what a raw socket connects to (the path, or (host, port));
        ``options``: more SERVER_SCRIPT arguments ("events", "tls=DIR")."""
        self.path, self.log_path = path, log_path
        sockaddr = path if sockaddr is None else sockaddr
        self.log = open(log_path, "wb")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if trace:
            env["PYTHONTRACEMALLOC"] = "12"
        env.update(kv.split("=", 1) for kv in extra_env)
        self.env = {k: v for k, v in env.items() if k.startswith(("MALLOC_", "PYTHONTRACE"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, path, level, *(["aio"] if aio else []),
             *options],
            stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=self.log, env=env, cwd=REPO)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see "
                                   f"{log_path}")
            probe = socket.socket(socket.AF_UNIX if isinstance(sockaddr, str)
                                  else socket.AF_INET)
            try:
                probe.connect(sockaddr)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError("server did not start listening")
                time.sleep(0.05)
            finally:
                probe.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self) -> dict:
        return proc_stats(self.pid)

    def memstat(self) -> dict:
        """SIGUSR2: the server logs Python's allocated blocks and gc objects, then runs
        malloc_trim(0) and logs its RSS before and after."""
        with open(self.log_path, "rb") as f:
            seen = f.read().count(b"MEMSTAT ")
        try:
            os.kill(self.pid, signal.SIGUSR2)
        except OSError:
            return {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            with open(self.log_path, "rb") as f:
                lines = [l for l in f.read().decode(errors="replace").splitlines()
                         if l.startswith("MEMSTAT ")]
            if len(lines) > seen:
                return {k: int(v) for k, v in (kv.split("=") for kv in lines[-1].split()[1:])}
        return {}

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGUSR1)   # stacks into the log, then kill
                time.sleep(0.5)
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


# A raw, hostile connection ---------------------------------------------------------------

class EpisodeFailure(Exception):
    """The server broke a promise: an in-sync connection got a wrong or no answer."""


class ConnectFailed(Exception):
    """Could not connect to the server (the checker's liveness test judges it)."""


class ServerSegment:
    __slots__ = ("size", "map")

    def __init__(self, size, mapping):
        self.size, self.map = size, mapping


class Conn:
    """A raw socket to the server with a small, independent frame reader: it checks every
    frame the server sends (magic, version, CRC, descriptor), maps the server's segments,
    answers them with HREL/HREJ (or not, as the episode asks), and files the answers."""

    registry: set = set()
    registry_lock = threading.Lock()

    def __init__(self, fz: "Fuzzer", ep: "Episode", tls=True) -> None:
        """Connect to the fuzz server. Over ``--tls``, ``tls`` is True (the handshake with
        our client certificate, done before this returns), an ``ssl.SSLContext`` (that
        handshake with another context; it may fail) or False (a plain TCP connection to
        the TLS port: what the server sends is kept, unparsed, in ``raw_in``)."""
        self.fz, self.ep = fz, ep
        self.tcp = fz.tcp
        self.sock = socket.socket(socket.AF_INET if fz.tcp else socket.AF_UNIX,
                                  socket.SOCK_STREAM)
        self.tls = None                    # ssl.SSLObject over memory BIOs (--tls)
        self.tls_done = False              # its handshake completed on our side
        self.tls_error = None              # what OpenSSL said when the stream failed
        self.opaque = fz.tls and tls is False    # the server's bytes are not hintens frames
        self.raw_in = bytearray()
        with Conn.registry_lock:
            Conn.registry.add(self)
        self.buf = bytearray()
        self.fds: collections.deque = collections.deque()
        self.outbox: collections.deque = collections.deque()
        self.eof = self.reset = self.wbroken = self.closed = self.garbled = False
        self.server_hello = None
        self.replies: dict = {}
        self.errors0: list = []
        self.handbacks: list = []          # (magic, id) received, in order
        self.server_segments: dict = {}    # server's segments we map
        self.release_mode = "normal"       # normal | never | twice | reject
        self.peer = None                   # our hello, as the server understood it
        self.session_counter = None
        self.frames_in = 0
        self.server_segments_held = False   # we kept some of its segments unreleased
        self.my_segments: dict = {}        # our segments, by id (ShmModel)
        self.sock.settimeout(5.0)
        try:
            self.sock.connect(fz.sockaddr)
        except OSError as error:
            self.close()
            raise ConnectFailed(f"{error.__class__.__name__}: {error}") from error
        self.sock.setblocking(False)
        if self.tcp:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if fz.tls and tls is not False:
            context = fz.tls_client if tls is True else tls
            self.tls_in, self.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self.tls_in, self.tls_out,
                                        server_hostname="127.0.0.1")
            self.tls_step()
            self.pump(lambda: self.tls_done or self.eof, 5.0)
            if not self.tls_done and tls is True:   # our own certificate: we must get in
                why = self.tls_error or ("server closed" if self.eof else "timed out")
                self.close()
                raise ConnectFailed(f"TLS handshake: {why}")

    # TLS, over memory BIOs: the socket stays a plain non-blocking one, the bytes on the
    # wire are ours to cut, delay or drop (records, handshake flights).

    def tls_step(self) -> None:
        """Feed the handshake (or read application data once it is done); what OpenSSL
        wants to send goes to the outbox."""
        if not self.tls_done:
            try:
                self.tls.do_handshake()
                self.tls_done = True
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLError, ValueError) as error:
                self.tls_error = f"{error.__class__.__name__}: {error}"
                self.eof = True
        if self.tls_done:
            while True:
                try:
                    data = self.tls.read(1 << 18)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.eof = True
                    break
                except (ssl.SSLError, ValueError) as error:
                    self.tls_error = f"{error.__class__.__name__}: {error}"
                    self.eof = True
                    break
                if not data:
                    self.eof = True
                    break
                self.buf += data
                self._parse()
        pending = self.tls_out.read()
        if pending:
            self.outbox.append((memoryview(pending), []))

    def encrypt(self, data) -> bytes:
        """The TLS records that carry ``data`` (after the handshake), or ``data``
        itself without TLS."""
        if self.tls is None or not self.tls_done:
            return bytes(data)
        if data:
            try:
                self.tls.write(bytes(data))
            except (ssl.SSLError, ValueError) as error:
                self.tls_error = f"{error.__class__.__name__}: {error}"
        return self.tls_out.read()

    def shutdown_write(self) -> None:
        """Half-close: TLS's close_notify first (TLS 1.3 allows reading after it), then
        shutdown(SHUT_WR)."""
        if self.tls is not None and self.tls_done:
            try:
                self.tls.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            pending = self.tls_out.read()
            if pending:
                self.send(pending, raw=True, timeout=2.0)
        self.sock.shutdown(socket.SHUT_WR)

    # I/O ----------------------------------------------------------------------------------

    def _read(self) -> None:
        if self.tcp:
            self._read_stream()
            return
        for _ in range(64):
            got = self._recv(lambda: self.sock.recvmsg(
                1 << 18, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC))
            if got is None:
                return
            data, anc, flags, _ = got
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                    self.fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                self.ep.deviation("MSG_CTRUNC on a read from the server (over 16 fds)")
            if not data:
                self.eof = True
                return
            self.buf += data
            self._parse()

    def _recv(self, read):
        """One read by ``read()``: what it returned, or None when nothing more comes now (it
        would block) or ever (a reset or another error, with eof marked)."""
        try:
            return read()
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError:
            self.eof = self.reset = True
        except OSError:
            self.eof = True
        return None

    def _read_stream(self) -> None:
        """TCP (and TLS under it): no descriptors can come."""
        for _ in range(64):
            data = self._recv(lambda: self.sock.recv(1 << 18))
            if data is None:
                return
            if self.opaque:
                self.raw_in += data
                if not data:
                    self.eof = True
                    return
                continue
            if self.tls is not None:
                if data:
                    self.tls_in.write(data)
                else:
                    self.tls_in.write_eof()
                self.tls_step()
                if not data:
                    self.eof = True
                    return
                continue
            if not data:
                self.eof = True
                return
            self.buf += data
            self._parse()

    def _write(self) -> None:
        while self.outbox and not self.wbroken:
            data, fds = self.outbox[0]
            if self.tcp:
                fds = []    # nothing can carry them: an SHM frame goes without its fd
            try:
                if fds:
                    n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", fds))],
                                          socket.MSG_NOSIGNAL)
                else:
                    n = self.sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.wbroken = True
                self.outbox.clear()
                return
            if n < len(data):
                self.outbox[0] = (data[n:], [])
            else:
                self.outbox.popleft()

    def pump(self, until=None, timeout: float = 0.0) -> bool:
        """Exchange bytes until ``until()`` holds, the stream ends, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        while True:
            if until is not None and until():
                return True
            if self.closed:
                return False
            events = 0 if self.eof else select.POLLIN
            if self.outbox and not self.wbroken:
                events |= select.POLLOUT
            if not events:
                return bool(until and until())
            remaining = deadline - time.monotonic()
            poller.register(self.sock.fileno(), events)
            ready = poller.poll(max(0.0, min(remaining, 0.05)) * 1000)
            if ready:
                revents = ready[0][1]
                if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read()
                if revents & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                    self._write()
                if revents & select.POLLNVAL:
                    return False
            elif remaining <= 0:
                return bool(until and until())
            if self.fz.stop.is_set() and time.monotonic() > self.fz.hard_stop:
                return False

    def send(self, data, fds=(), timeout: float = 4.0, raw: bool = False) -> bool:
        """Queue bytes (descriptors ride on the first one; over TLS, encrypted unless
        ``raw``) and push them out, reading meanwhile. False when they could not all go in
        time (or the socket broke)."""
        if self.wbroken or self.closed:
            return False
        self.outbox.append((memoryview(bytes(data) if raw else self.encrypt(data)),
                            list(fds)))
        self.pump(lambda: not self.outbox or self.wbroken, timeout)
        return not self.outbox and not self.wbroken

    def send_now(self, data, fds=(), raw: bool = False) -> None:
        """One raw attempt, without waiting (for drips and abrupt ends)."""
        self.outbox.append((memoryview(bytes(data) if raw else self.encrypt(data)),
                            list(fds)))
        self._write()

    def wait_reply(self, rid: int, timeout: float = 5.0):
        self.pump(lambda: rid in self.replies, timeout)
        items = self.replies.get(rid)
        if not items:
            return None
        item = items.pop(0)
        if not items:
            del self.replies[rid]
        return item

    def wait_eof(self, timeout: float) -> bool:
        self.pump(lambda: self.eof, timeout)
        return self.eof

    def close(self, how: str = "close") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if how == "rst":
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            elif how == "shut_rdwr":
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        while self.fds:
            try:
                os.close(self.fds.popleft())
            except OSError:
                pass
        for segment in self.server_segments.values():
            segment.map.close()
        self.server_segments.clear()
        for seg in self.my_segments.values():
            seg.close()
        with Conn.registry_lock:
            Conn.registry.discard(self)

    # Frames from the server ----------------------------------------------------------------

    def _parse(self) -> None:
        while len(self.buf) >= 24 and not self.garbled:
            magic, version, typ, flags, length, crc, rid = HDR.unpack_from(self.buf)
            if magic != MAGIC or version >> 8 != 1 or typ not in (1, 2, 3, 4):
                self.ep.deviation(f"server sent a bad header: {bytes(self.buf[:24]).hex()}")
                self.garbled = True
                return
            if len(self.buf) < 24 + length:
                return
            payload = bytes(self.buf[24:24 + length])
            del self.buf[:24 + length]
            self.frames_in += 1
            if crc16(payload) != crc:
                self.ep.deviation(f"server frame with a bad CRC (type {typ}, rid {rid})")
            try:
                self._on_frame(typ, flags, rid, payload)
            except OSError as error:   # mapping one of its segments failed
                self.ep.deviation(f"could not map a server segment: {error}")

    def _on_frame(self, typ, flags, rid, payload) -> None:
        if flags & ~F_SHM or (flags & F_SHM and typ not in (RESPONSE, EVENT, REQUEST)):
            self.ep.deviation(f"server frame with flags 0x{flags:x} (type {typ})")
        if flags & F_SHM and self.tcp:
            self.ep.deviation(f"server SHM frame over TCP (type {typ}, rid {rid})")
            return
        if typ == EVENT and rid == 0:
            magic = payload[:4]
            if magic == b"HELO":
                if self.server_hello is None:
                    self.server_hello = decode_hello(payload)
                    if self.server_hello is None:
                        self.ep.deviation("server hello not decodable by the spec's rules")
                    elif self.tcp and (self.server_hello["features"] & 1 or {6, 7}
                                       & set(self.server_hello["entries"])):
                        self.ep.deviation("server hello announces SHM (or keys 6/7) over "
                                          "TCP (section 1a)")
                else:
                    self.ep.deviation("server sent a second hello")
            elif magic in (b"HREL", b"HREJ", b"HRET"):
                if len(payload) < 8:
                    self.ep.deviation(f"short {magic!r} from server")
                    return
                (count,) = struct.unpack_from("<I", payload, 4)
                if len(payload) != 8 + 4 * count or count > 1024:
                    self.ep.deviation(f"malformed {magic!r} from server")
                    return
                ids = struct.unpack_from(f"<{count}I", payload, 8)
                if magic == b"HRET":
                    for sid in ids:
                        seg = self.server_segments.pop(sid, None)
                        if seg is not None:
                            seg.map.close()
                else:
                    for sid in ids:
                        self.handbacks.append((magic.decode(), sid))
                        mine = self.my_segments.get(sid)
                        if mine is not None:
                            mine.lent = max(0, mine.lent - 1)
            else:
                self.ep.deviation(f"server sent an unknown control Event {payload[:8]!r}")
            return
        if typ == ERROR:
            if len(payload) < 12:
                self.ep.deviation(f"short Error payload from server ({len(payload)} bytes)")
                code, message = 0, ""
            else:
                code, n = struct.unpack_from("<IQ", payload)
                message = payload[12:].decode("utf-8", "replace")
                if n != len(payload) - 12:
                    self.ep.deviation("Error payload length disagrees with its size")
            if rid == 0:
                self.errors0.append((code, message))
            self.replies.setdefault(rid, []).append(("err", code, message))
            return
        if typ in (REQUEST, EVENT):
            self.ep.deviation(f"unsolicited type-{typ} frame from server (rid {rid})")
            return
        data = payload
        if flags & F_SHM:
            data = self._shared(payload)
            if data is None:
                return
        self.replies.setdefault(rid, []).append(("ok", data, bool(flags & F_SHM)))

    def _shared(self, payload: bytes):
        if len(payload) != 32:
            self.ep.deviation(f"server SHM descriptor of {len(payload)} bytes")
            return None
        sid, dflags, size, offset, length = DESC.unpack(payload)
        if dflags & ~3 or dflags == 3 or sid == 0:
            self.ep.deviation(f"server SHM descriptor with flags {dflags:#x} id {sid}")
            return None
        if dflags & PEER_SEGMENT:
            mine = self.my_segments.get(sid)
            if mine is None or mine.size != size or offset + length > size:
                self.ep.deviation(f"server echo names segment {sid} badly "
                                  f"(size {size}, {offset}+{length})")
                return None
            if mine.map is None or offset + length > len(mine.map):
                return UNREADABLE
            return bytes(mine.map[offset:offset + length])
        if dflags & NEW_SEGMENT:
            if not self.fds:
                self.ep.deviation("server NEW_SEGMENT without a descriptor")
                return None
            fd = self.fds.popleft()
            try:
                info = os.fstat(fd)
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                if not stat.S_ISREG(info.st_mode) or not seals & SEAL_SHRINK \
                        or info.st_size < size:
                    self.ep.deviation(f"server segment {sid} fails the receiver checks "
                                      f"(mode {info.st_mode:o}, seals {seals:#x}, "
                                      f"{info.st_size} < {size}?)")
                    return None
                old = self.server_segments.pop(sid, None)
                if old is not None:
                    old.map.close()
                self.server_segments[sid] = ServerSegment(
                    size, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
            finally:
                os.close(fd)
        seg = self.server_segments.get(sid)
        if seg is None or seg.size != size or offset + length > size:
            self.ep.deviation(f"server SHM frame names segment {sid} badly")
            return None
        data = bytes(seg.map[offset:offset + length])
        mode = self.release_mode
        if mode in ("normal", "twice"):
            for _ in range(2 if mode == "twice" else 1):
                self.outbox.append((memoryview(self.encrypt(frame(EVENT, control_payload(
                    b"HREL", [sid]), 0))), []))
        elif mode == "reject":
            self.outbox.append((memoryview(self.encrypt(frame(EVENT, control_payload(
                b"HREJ", [sid]), 0))), []))
            seg = self.server_segments.pop(sid)
            seg.map.close()
        return data

    # Helpers --------------------------------------------------------------------------------

    def hello_sent(self, payload: bytes, rid: int = 0, flags: int = 0, typ: int = EVENT,
                   crc_ok: bool = True) -> None:
        """Model: the server takes the first hello it understands."""
        if self.peer is None and typ == EVENT and rid == 0 and flags == 0 and crc_ok \
                and len(payload) <= CONTROL_LIMIT:
            decoded = decode_hello(payload)
            if decoded is not None:
                self.peer = decoded
                session = decoded["session"]
                if session is not None:
                    self.session_counter = self.fz.session_counter(session)

    @property
    def peer_max(self) -> int:
        return self.peer["max_payload"] if self.peer else LIMIT

    @property
    def shm(self) -> bool:
        """SHM negotiated: never over TCP, whatever our hello says (section 1a)."""
        return bool(self.peer and self.peer["features"] & 1) and not self.tcp

    def next_rid(self, rng) -> int:
        if self.session_counter is not None:
            return next(self.session_counter)
        return rng.getrandbits(63) | 1


class MySegment:
    """A segment this peer made: a memfd, mapped read-write here."""

    def __init__(self, size, fd, mapping):
        self.size, self.fd, self.map = size, fd, mapping
        self.lent = 0
        self.server_maps = False

    def close(self):
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Descriptors to pass --------------------------------------------------------------------

FD_KINDS = ["memfd_sealed", "memfd_shrink_only", "memfd_write_sealed", "memfd_unsealed",
            "memfd_no_sealing", "memfd_grow_only", "memfd_small", "memfd_sparse_huge",
            "pipe_r", "pipe_w", "socketpair", "self_socket", "dev_zero", "dev_null",
            "directory", "regular_file", "o_path", "eventfd", "epoll", "dev_shm_file",
            "memfd_hugetlb"]


def make_fd(kind: str, size: int, data: bytes, ep: "Episode", conn: Conn | None = None,
            at: int = 0):
    """A descriptor of ``kind`` (owned by the episode), ``data`` written at ``at`` before
    sealing. Returns (fd, valid, file_size): valid when a receiver's checks would accept it
    for a segment of ``size`` bytes (None: they would, but mapping may fail)."""
    def memfd(flags=os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING, length=size):
        fd = os.memfd_create("hxfuzz", flags)
        ep.own(fd)
        os.ftruncate(fd, length)
        if data and at < length:
            os.pwrite(fd, data[:length - at], at)
        return fd
    if kind == "memfd_sealed":
        fd = memfd()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEAL_SHRINK | SEAL_GROW | SEAL_SEAL)
        return fd, True, size
    if kind == "memfd_shrink_only":
        fd = memfd()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEAL_SHRINK)
        return fd, True, size
    if kind == "memfd_write_sealed":
        fd = memfd()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEAL_SHRINK | SEAL_WRITE)
        return fd, True, size
    if kind == "memfd_unsealed":
        return memfd(), False, size
    if kind == "memfd_no_sealing":
        return memfd(os.MFD_CLOEXEC), False, size
    if kind == "memfd_grow_only":
        fd = memfd()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEAL_GROW | SEAL_SEAL)
        return fd, False, size
    if kind == "memfd_small":
        real = max(0, size - ep.rng.choice([1, 4096, size // 2 or 1]))
        fd = memfd(length=real)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEAL_SHRINK)
        return fd, False, real
    if kind == "memfd_sparse_huge":
        real = max(size, ep.rng.choice([1 << 30, 1 << 36, 1 << 40, (1 << 40) + 4096]))
        fd = memfd(length=real)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEAL_SHRINK | SEAL_GROW | SEAL_SEAL)
        return fd, True, real
    if kind in ("pipe_r", "pipe_w"):
        r, w = os.pipe2(os.O_CLOEXEC)
        ep.own(r)
        ep.own(w)
        return (r if kind == "pipe_r" else w), False, 0
    if kind == "socketpair":
        a, b = socket.socketpair()
        ep.own(a.detach())
        fd = b.detach()
        ep.own(fd)
        return fd, False, 0
    if kind == "self_socket" and conn is not None:
        return conn.sock.fileno(), False, 0
    if kind == "dev_zero":
        fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    elif kind == "dev_null":
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    elif kind == "directory":
        fd = os.open(WORKDIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    elif kind == "regular_file":
        fd = os.open(os.path.join(WORKDIR, "regular.bin"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        if os.fstat(fd).st_size < (1 << 20):
            os.ftruncate(fd, 1 << 20)
        ep.own(fd)
        return fd, False, 1 << 20
    elif kind == "o_path":
        fd = os.open(os.path.join(WORKDIR, "regular.bin") if os.path.exists(
            os.path.join(WORKDIR, "regular.bin")) else WORKDIR, os.O_PATH | os.O_CLOEXEC)
    elif kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
    elif kind == "epoll":
        e = select.epoll()
        fd = os.dup(e.fileno())
        e.close()
    elif kind == "dev_shm_file" and os.path.isdir("/dev/shm"):
        name = f"/dev/shm/hxfuzz-{os.getpid()}-{threading.get_ident()}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.unlink(name)
        os.ftruncate(fd, size)
        ep.own(fd)
        return fd, False, size
    elif kind == "memfd_hugetlb":
        try:
            fd = os.memfd_create("hxfuzz-huge", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
                                 | os.MFD_HUGETLB)
        except OSError:
            return make_fd("memfd_unsealed", size, data, ep, conn, at)
        ep.own(fd)
        try:
            os.ftruncate(fd, max(size, 2 << 20))
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEAL_SHRINK)
        except OSError:
            pass
        return fd, None, size        # None: valid by the checks, but mmap may fail
    else:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    ep.own(fd)
    return fd, False, 0


# Episodes ---------------------------------------------------------------------------------

class Episode:
    def __init__(self, fz: "Fuzzer", worker: "Worker", kind: str, seed: int) -> None:
        self.fz, self.worker, self.kind, self.seed = fz, worker, kind, seed
        self.rng = random.Random(seed)
        self.steps: list[str] = []
        self.conns: list[Conn] = []
        self.owned: list[int] = []
        self.started = time.monotonic()
        self.outcome = "ok"

    def log(self, text: str) -> None:
        if len(self.steps) < 400:
            self.steps.append(text)

    def own(self, fd: int) -> None:
        self.owned.append(fd)

    def connect(self, tls=True) -> Conn:
        conn = Conn(self.fz, self, tls)
        self.conns.append(conn)
        return conn

    def deviation(self, text: str) -> None:
        self.fz.record_deviation(self, text)

    def fail(self, text: str) -> None:
        raise EpisodeFailure(text)

    def park(self, conn: Conn, seconds: float) -> None:
        """Hand a connection to the worker, which closes it ``seconds`` from now."""
        self.conns.remove(conn)
        conn.ep = self.worker.parking_episode
        self.worker.park(conn, seconds)

    def finish(self) -> None:
        for conn in self.conns:
            conn.close(self.rng.choice(["close", "close", "rst", "shut_rdwr"]))
        for fd in self.owned:
            try:
                os.close(fd)
            except OSError:
                pass
        self.owned.clear()

    def describe(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "worker": self.worker.index,
                "t": round(self.started - self.fz.t0, 3), "steps": self.steps,
                "outcome": self.outcome}

    # Building blocks ----------------------------------------------------------------------

    def hello(self, conn: Conn, shm: bool | None = None, max_payload=None, session=None,
              k6=None, k7=None, extra=()) -> None:
        """A well-formed hello (keys in order)."""
        shm = self.rng.random() < 0.5 if shm is None else shm
        entries = [(1, bytes([self.rng.choice([0, 0, 0, 1, 255])])),
                   (2, struct.pack("<I", 1 if shm else 0))]
        if max_payload is not None:
            entries.append((3, struct.pack("<I", max_payload)))
        if session is not None:
            entries.append((4, session))
        if k6 is not None:
            entries.append((6, struct.pack("<Q", k6)))
        if k7 is not None:
            entries.append((7, struct.pack("<I", k7)))
        entries += list(extra)
        payload = hello_payload(sorted(entries, key=lambda e: e[0]))
        self.log(f"hello shm={shm} max_payload={max_payload} session={session is not None} "
                 f"k6={k6} k7={k7} extra={[k for k, _ in extra]}")
        conn.send(frame(EVENT, payload, 0))
        conn.hello_sent(payload)

    def probe(self, conn: Conn, strict: bool = True, size: int | None = None,
              what: str = "probe") -> bool:
        """An echo Request; on an in-sync connection (strict) it must come back right."""
        limit = min(900, conn.peer_max)
        n = self.rng.randint(0, limit) if size is None else size
        payload = (b"echo:" + self.rng.randbytes(max(0, n - 5)))[:n] if n >= 5 else b""
        rid = conn.next_rid(self.rng)
        self.log(f"{what}: echo request rid={rid} len={len(payload)} strict={strict}")
        sent = conn.send(frame(REQUEST, payload, rid))
        answer = conn.wait_reply(rid, 8.0 if strict else 3.0) if sent else None
        if answer is None:
            if strict:
                self.fail(f"{what}: no answer to an echo request within 8 s on an in-sync "
                          f"connection (sent={sent} eof={conn.eof} reset={conn.reset} "
                          f"errors0={conn.errors0[:3]})")
            return False
        if self.judge(conn, payload, answer):
            return True
        if strict:
            self.fail(f"{what}: wrong answer to an echo request of {len(payload)} bytes: "
                      f"{self.show(answer)}")
        return False

    def judge(self, conn: Conn, payload: bytes, answer) -> bool:
        """Is ``answer`` a right one for a Request with ``payload`` to the fuzz server?"""
        if answer is None:
            return False
        want = expected_reply(payload)
        if answer[0] == "ok":
            if want[0] != "ok" or not (answer[1] == want[1] or answer[1] is UNREADABLE):
                return False
            if not answer[2] and len(want[1]) > conn.peer_max:
                self.deviation("a reply over our announced max_payload came inline")
            return True
        code = answer[1]
        if conn.session_counter is not None and code == UNAVAILABLE:
            return True            # a session's window may refuse an id (section 10)
        if want[0] == "err":
            return code == want[1]
        if len(want[1]) > conn.peer_max and code in (TOO_LARGE, SHM_ERROR, UNAVAILABLE):
            return True
        if len(payload) > 64 * 1024 and code == UNAVAILABLE:
            return True            # max_pending_bytes, shared by all connections
        if conn.shm and len(want[1]) >= 64 * 1024 and code in (SHM_ERROR, UNAVAILABLE) \
                and (conn.release_mode != "normal" or conn.peer["shm_bytes"] < (1 << 30)
                     or conn.peer["shm_segments"] < 64 or conn.server_segments_held):
            return True            # our hello or our hoarding starves its pool
        return False

    @staticmethod
    def show(answer) -> str:
        if answer is None:
            return "None"
        if answer[0] == "ok":
            return f"Response({len(answer[1])} bytes {answer[1][:32]!r})"
        return f"Error({CODE_NAMES.get(answer[1], answer[1])}, {answer[2][:160]!r})"

    def expect_error(self, conn: Conn, rid: int, code, what: str,
                     timeout: float = 5.0) -> None:
        codes = code if isinstance(code, tuple) else (code,)
        names = "/".join(CODE_NAMES[c] for c in codes)
        answer = conn.wait_reply(rid, timeout)
        if answer is None:
            self.deviation(f"{what}: expected Error {names}, got nothing (eof={conn.eof})")
        elif answer[0] != "err" or answer[1] not in codes:
            if answer[0] == "err" and answer[1] == UNAVAILABLE and conn.session_counter:
                return
            self.deviation(f"{what}: expected Error {names}, got {self.show(answer)}")

    def expect_fatal(self, conn: Conn, code: int, what: str) -> None:
        """A fatal violation: one Error with ``code``, then the server closes."""
        closed = conn.wait_eof(2.0)
        codes = [r[1] for items in conn.replies.values() for r in items if r[0] == "err"]
        if not closed:
            self.deviation(f"{what}: server did not close within 2 s after a fatal "
                           f"{CODE_NAMES[code]}")
        elif code not in codes and not conn.reset:
            self.deviation(f"{what}: fatal {CODE_NAMES[code]} expected before close, got "
                           f"{[CODE_NAMES.get(c, c) for c in codes]}")

    def random_session(self) -> bytes:
        return self.rng.choice(self.fz.sessions)


# The episode kinds ------------------------------------------------------------------------

def ep_random_bytes(ep: Episode) -> None:
    conn = ep.connect()
    rng = ep.rng
    n = rng.choice([1, 2, 3, 23, 24, 25, 100, 4096, rng.randint(1, 200000)])
    data = rng.randbytes(n)
    style = rng.choice(["raw", "HP", "header+junk", "frames+junk", "hello+junk"])
    if style == "HP":
        data = b"HP" + data
    elif style == "header+junk":
        data = HDR.pack(MAGIC, 0x0100, rng.randint(1, 4), 0, rng.randint(0, 64), 0, 1) + data
    elif style == "frames+junk":
        data = frame(REQUEST, b"echo:x", 7) * rng.randint(1, 5) + data
    elif style == "hello+junk":
        data = frame(EVENT, hello_payload([(2, struct.pack("<I", 1))]), 0) + data
    ep.log(f"random bytes style={style} len={len(data)} head={data[:32].hex()}")
    chunks = rng.choice([1, 1, 2, 7])
    step = max(1, len(data) // chunks)
    for i in range(0, len(data), step):
        if not conn.send(data[i:i + step], timeout=2.0):
            break
    if data[:2] != b"HP" and len(data) >= 2:
        ep.expect_fatal(conn, BAD_HEADER, "random bytes without the magic")
    else:
        conn.pump(timeout=rng.choice([0, 0.05, 0.3]))


def ep_bad_header(ep: Episode) -> None:
    rng = ep.rng
    conn = ep.connect()
    if rng.random() < 0.5:
        ep.hello(conn)
    for _ in range(rng.randint(1, 6)):
        magic = MAGIC if rng.random() < 0.9 else rng.choice([0, 0x5048, 0x4851, 0xFFFF,
                                                              rng.getrandbits(16)])
        major = 1 if rng.random() < 0.85 else rng.choice([0, 2, 2, 255])
        version = (major << 8) | rng.getrandbits(8)
        typ = rng.randint(1, 4) if rng.random() < 0.85 else rng.choice(
            [0, 5, 255, 2**32 - 1, rng.getrandbits(32)])
        flags = rng.choice([0, 0, 0, F_SHM, F_COMPRESSED, 3, 0x4, 0x8000, 0xFFFF,
                            rng.getrandbits(16)])
        rid = rng.choice([0, 1, rng.getrandbits(64), 2**64 - 1])
        huge = rng.random() < 0.2
        if huge:
            length = rng.choice([LIMIT, LIMIT + 1, 2**32 - 1, CONTROL_LIMIT, CONTROL_LIMIT + 1,
                                 rng.randint(70000, LIMIT)])
            payload = rng.randbytes(rng.randint(0, 4096))
        else:
            length = None
            payload = rng.randbytes(rng.randint(0, 300))
            if typ == REQUEST and rng.random() < 0.5:
                payload = b"echo:" + payload
        real_len = len(payload) if length is None else length
        crc_ok = rng.random() < 0.7
        crc = crc16(payload) if crc_ok else (crc16(payload) ^ rng.randint(1, 0xFFFF))
        data = frame(typ, payload, rid, flags, version, magic, crc, length)
        verdict = expected_header_verdict(magic, version, typ, flags, real_len, rid)
        ep.log(f"header magic={magic:#x} version={version:#x} type={typ} flags={flags:#x} "
               f"length={real_len} sent={len(payload)} crc_ok={crc_ok} rid={rid} "
               f"-> {verdict}")
        if typ == EVENT and rid == 0 and flags == 0 and crc_ok and length is None:
            conn.hello_sent(payload)
        conn.send(data, timeout=2.0)
        if verdict is not None and verdict[1]:
            ep.expect_fatal(conn, verdict[0], "bad header")
            return
        if length is not None and length != len(payload):
            return          # truncated: the stream is out of step; just leave
        if verdict is not None:   # reserved flags, recoverable; payload skipped
            if typ == REQUEST:
                ep.expect_error(conn, rid, UNSUPPORTED_FLAGS, "reserved flags")
        elif not crc_ok:
            if typ == REQUEST:
                ep.expect_error(conn, rid, CHECKSUM, "bad CRC")
        elif flags and typ != ERROR:
            if typ == REQUEST:
                if flags == F_SHM | F_COMPRESSED:
                    ep.expect_error(conn, rid, (UNSUPPORTED_FLAGS, SHM_ERROR),
                                    "SHM|COMPRESSED, neither negotiated")
                elif flags & F_COMPRESSED:
                    ep.expect_error(conn, rid, UNSUPPORTED_FLAGS, "COMPRESSED not negotiated")
                elif flags & F_SHM:
                    ep.expect_error(conn, rid, SHM_ERROR, "SHM with a random descriptor")
        elif typ == REQUEST and not flags:
            answer = conn.wait_reply(rid, 8.0)
            if not ep.judge(conn, payload, answer):
                ep.fail(f"valid Request (random payload {len(payload)} bytes) answered "
                        f"wrongly: {ep.show(answer)}")
    ep.probe(conn)


def ep_truncated(ep: Episode) -> None:
    rng = ep.rng
    conn = ep.connect()
    if rng.random() < 0.5:
        ep.hello(conn)
    size = rng.choice([0, 10, 1000, 70000, 1 << 20, rng.randint(0, 4 << 20)])
    payload = b"echo:" + rng.randbytes(size)
    data = frame(REQUEST, payload, rng.getrandbits(63))
    cut = rng.choice([1, 2, 3, 12, 23, 24, 25, len(data) // 2, len(data) - 1,
                      rng.randint(1, len(data) - 1)])
    ep.log(f"truncated request: {cut} of {len(data)} bytes")
    conn.send(data[:cut], timeout=2.0)
    fate = rng.choice(["close", "pump", "park", "rst"])
    ep.log(f"then {fate}")
    if fate == "pump":
        conn.pump(timeout=rng.uniform(0, 1.5))
    elif fate == "park":
        ep.park(conn, rng.uniform(0.5, 14.0))
    elif fate == "rst":
        conn.close("rst")


def ep_drip(ep: Episode) -> None:
    rng = ep.rng
    conn = ep.connect()
    if rng.random() < 0.3:
        ep.hello(conn, shm=False)
    payload = b"echo:" + rng.randbytes(rng.randint(0, 200))
    rid = conn.next_rid(rng)
    data = frame(REQUEST, payload, rid)
    stop_at = len(data) if rng.random() < 0.5 else rng.randint(1, len(data) - 1)
    delay = rng.choice([0.005, 0.02, 0.1])
    budget = rng.uniform(0.5, 3.0)
    ep.log(f"drip {stop_at} of {len(data)} bytes, {delay}s apart, for at most {budget:.1f}s")
    t0, at = time.monotonic(), 0
    while at < stop_at and time.monotonic() - t0 < budget:
        n = rng.randint(1, 3)
        conn.send_now(data[at:min(at + n, stop_at)])
        at = min(at + n, stop_at)
        conn.pump(timeout=delay)
    if at == len(data):
        answer = conn.wait_reply(rid, 8.0)
        if not ep.judge(conn, payload, answer):
            ep.fail(f"dripped Request answered wrongly: {ep.show(answer)}")
        ep.probe(conn)
    elif rng.random() < 0.4:
        ep.park(conn, rng.uniform(0.5, 14.0))


def random_hello_payload(ep: Episode):
    rng = ep.rng
    style = rng.choice(["valid", "valid", "random_entries", "repeated", "wrong_sizes",
                        "too_many", "overrun", "trailing", "oversized", "huge", "bad_magic",
                        "short", "empty"])
    shm = rng.random() < 0.6
    k3 = rng.choice([None, 0, 1, 4, 100, 1024, 65536, LIMIT, 2**32 - 1])
    k6 = rng.choice([None, 0, 1, 4096, 1 << 20, 1 << 30, 2**64 - 1]) if shm else None
    k7 = rng.choice([None, 0, 1, 2, 64, 2**32 - 1]) if shm else None
    entries = [(1, bytes([rng.getrandbits(8)])), (2, struct.pack("<I", 1 if shm else 0))]
    if k3 is not None:
        entries.append((3, struct.pack("<I", k3)))
    if rng.random() < 0.15:
        entries.append((4, ep.random_session() if rng.random() < 0.7 else rng.randbytes(
            rng.choice([15, 16, 17]))))
    if k6 is not None:
        entries.append((6, struct.pack("<Q", k6)))
    if k7 is not None:
        entries.append((7, struct.pack("<I", k7)))
    count = None
    trailing = b""
    magic = b"HELO"
    if style == "random_entries":
        for _ in range(rng.randint(0, 20)):
            entries.append((rng.choice([0, 8, 9, 100, 65535, rng.getrandbits(16)]),
                            rng.randbytes(rng.randint(0, 40))))
        rng.shuffle(entries)
        seen = set()
        entries = [e for e in entries if not (e[0] in seen or seen.add(e[0]))]
    elif style == "repeated":
        entries.append(rng.choice(entries))
    elif style == "wrong_sizes":
        entries = [(k, v + b"\0" if rng.random() < 0.5 else v[:-1]) for k, v in entries]
    elif style == "too_many":
        entries = [(1000 + i, b"") for i in range(65)]
    elif style == "overrun":
        count = len(entries) + rng.randint(1, 3)
    elif style == "trailing":
        trailing = rng.randbytes(rng.randint(1, 9))
    elif style == "oversized":
        entries.append((900, rng.randbytes(rng.randint(4097 - 40, 4107 - 40))))
    elif style == "huge":
        entries.append((900, rng.randbytes(rng.randint(4200, 9000))))
    elif style == "bad_magic":
        magic = rng.choice([b"HELX", b"helo", b"\0\0\0\0"])
    elif style == "short":
        return style, rng.randbytes(rng.randint(0, 11))
    elif style == "empty":
        entries = []
    return style, hello_payload(entries, count, magic, trailing)


def ep_hello(ep: Episode) -> None:
    rng = ep.rng
    conn = ep.connect()
    if rng.random() < 0.3:
        conn.release_mode = rng.choice(["never", "twice", "reject"])
    for i in range(rng.randint(1, 3)):
        style, payload = random_hello_payload(ep)
        rid = 0 if rng.random() < 0.85 else rng.getrandbits(64)
        typ = EVENT if rng.random() < 0.9 else rng.choice([REQUEST, RESPONSE, ERROR])
        flags = 0 if rng.random() < 0.9 else rng.choice([F_SHM, F_COMPRESSED, 4])
        ep.log(f"hello #{i} style={style} len={len(payload)} type={typ} rid={rid} "
               f"flags={flags:#x} decodes={decode_hello(payload) is not None} "
               f"release_mode={conn.release_mode}")
        fatal = len(payload) > receiver_limit(typ, rid)
        conn.send(frame(typ, payload, rid, flags), timeout=2.0)
        if fatal:
            ep.expect_fatal(conn, TOO_LARGE, "hello over the server's limit")
            return
        if flags & 4 and typ == REQUEST:
            ep.expect_error(conn, rid, UNSUPPORTED_FLAGS, "hello as a Request, reserved flag")
        conn.hello_sent(payload, rid, flags, typ)
        if typ == REQUEST and not flags:
            conn.wait_reply(rid, 3.0)
    ep.log(f"model: peer={None if conn.peer is None else {k: v for k, v in conn.peer.items() if k != 'entries'}}")
    ep.probe(conn)
    # Something large: inline or through shared memory, by what was negotiated. Not on a
    # session: its replay window would keep the answer after we go (by design, section 10;
    # see README), which the final RSS comparison would count.
    if rng.random() < 0.5 and conn.session_counter is None:
        n = rng.choice([20000, 70000, 300000, 2 << 20])
        payload = b"echo:" + rng.randbytes(n)
        rid = conn.next_rid(rng)
        ep.log(f"large echo {len(payload)} bytes rid={rid}")
        if conn.send(frame(REQUEST, payload, rid), timeout=5.0):
            answer = conn.wait_reply(rid, 4.0)
            ep.log(f"large echo -> {ep.show(answer)}")
            if answer is not None and not ep.judge(conn, payload, answer):
                ep.fail(f"large echo ({len(payload)} bytes) answered wrongly: "
                        f"{ep.show(answer)}")
            if answer is not None:
                ep.probe(conn, what="probe after large echo")
    if rng.random() < 0.3:
        ep.park(conn, rng.uniform(0.5, 6.0))


def ep_control(ep: Episode) -> None:
    rng = ep.rng
    conn = ep.connect()
    ep.hello(conn, shm=rng.random() < 0.7)
    held = []
    if conn.shm and rng.random() < 0.6:
        # Get a few of the server's segments lent to us, and keep them.
        conn.release_mode = "never"
        for _ in range(rng.randint(1, 3)):
            rid = conn.next_rid(rng)
            n = rng.choice([70000, 1 << 20, 3 << 20])
            conn.send(frame(REQUEST, b"big:%d" % n, rid))
            answer = conn.wait_reply(rid, 5.0)
            ep.log(f"big:{n} -> {ep.show(answer)}")
        held = list(conn.server_segments)
        conn.server_segments_held = bool(held)
        conn.release_mode = "normal"
    for _ in range(rng.randint(1, 8)):
        magic = rng.choice([b"HREL", b"HREJ", b"HRET", b"HREL", b"HREJ", b"HXXX", b"HELO"])
        ids_pool = held + [0, 1, 2, 3, 2**32 - 1, rng.getrandbits(32)]
        count = rng.choice([0, 1, 2, 5, 1024, 1025, rng.randint(0, 3000)])
        ids = [rng.choice(ids_pool) for _ in range(min(count, 1100))]
        declared = count if rng.random() < 0.8 else rng.choice([count + 1, max(0, count - 1),
                                                                 2**32 - 1])
        payload = control_payload(magic, ids, declared)
        if rng.random() < 0.1:
            payload += rng.randbytes(rng.randint(1, 3))
        rid = 0 if rng.random() < 0.9 else rng.getrandbits(64)
        fatal = len(payload) > receiver_limit(EVENT, rid)
        ep.log(f"control {magic!r} count={count} declared={declared} len={len(payload)} "
               f"rid={rid} held={held}")
        conn.send(frame(EVENT, payload, rid), timeout=2.0)
        if fatal:
            ep.expect_fatal(conn, TOO_LARGE, "control Event over the server's limit")
            return
    ep.probe(conn)
    if conn.shm:
        # The pool must still serve: a large reply through shared memory.
        rid = conn.next_rid(rng)
        payload = b"echo:" + rng.randbytes(rng.choice([70000, 1 << 20]))
        conn.send(frame(REQUEST, payload, rid), timeout=4.0)
        answer = conn.wait_reply(rid, 6.0)
        ep.log(f"large echo after control -> {ep.show(answer)}")
        if answer is None:
            ep.deviation("large echo after control Events: no answer within 6 s")
        elif not ep.judge(conn, payload, answer):
            ep.fail(f"large echo after stray releases answered wrongly: {ep.show(answer)}")
    if rng.random() < 0.4:
        conn.release_mode = rng.choice(["twice", "reject"])
        for _ in range(rng.randint(1, 3)):
            rid = conn.next_rid(rng)
            payload = b"echo:" + rng.randbytes(rng.choice([70000, 200000]))
            conn.send(frame(REQUEST, payload, rid), timeout=4.0)
            answer = conn.wait_reply(rid, 6.0)
            ep.log(f"echo with release_mode={conn.release_mode} -> {ep.show(answer)}")
            if answer is not None and not ep.judge(conn, payload, answer):
                ep.fail(f"echo through a segment released twice/rejected answered wrongly: "
                        f"{ep.show(answer)}")


class ShmModel:
    """What the server should do with our segments (section 9): which it maps, and the
    hand-backs each refused or accepted frame earns."""

    def __init__(self, ep: Episode, conn: Conn) -> None:
        self.ep, self.conn = ep, conn
        self.expect = collections.Counter()     # ("HREL"|"HREJ", id) -> count
        self.certain = True
        self.next_id = ep.rng.randint(1, 1000)
        self.mapped_bytes = 0

    def fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def mapped_count(self) -> int:
        return sum(1 for seg in self.conn.my_segments.values() if seg.server_maps)

    def mapped(self, sid) -> bool:
        seg = self.conn.my_segments.get(sid)
        return seg is not None and seg.server_maps

    def hand_back(self, sid, dflags, desc_ok=True) -> None:
        if not desc_ok or sid == 0 or dflags & PEER_SEGMENT:
            return
        self.expect[("HREL" if self.mapped(sid) else "HREJ", sid)] += 1

    def check(self) -> None:
        if not self.certain:
            return
        self.conn.pump(timeout=0.3)
        got = collections.Counter(self.conn.handbacks)
        if got != self.expect:
            missing = self.expect - got
            extra = got - self.expect
            self.ep.deviation(f"hand-backs differ from section 9: missing {dict(missing)}, "
                              f"extra {dict(extra)}")


def ep_shm(ep: Episode) -> None:
    """Shared-memory frames with a precise model of the answers and hand-backs."""
    rng = ep.rng
    conn = ep.connect()
    ep.hello(conn, shm=True, max_payload=rng.choice([None, None, 1 << 20]))
    model = ShmModel(ep, conn)
    for step in range(rng.randint(1, 8)):
        action = rng.choice(["new_valid", "new_valid", "reuse", "new_bad_fd", "new_no_fd",
                             "new_mapped_id", "ref_unknown", "ref_wrong_size", "bad_region",
                             "bad_flags", "short_desc", "peer_bad", "peer_valid", "retire",
                             "compressed", "other_types", "huge_sparse"])
        typ = REQUEST
        if action == "other_types":
            typ = rng.choice([EVENT, RESPONSE, ERROR])
            action = rng.choice(["new_valid", "new_bad_fd", "ref_unknown"])
        rid = conn.next_rid(rng)
        fds: list[int] = []
        accepted = False
        expect_code = SHM_ERROR
        body = rng.choice([b"echo:", b"echo:", b"size:"]) + rng.randbytes(
            rng.choice([0, 10, 4000, 70000, 1 << 20]))
        sid = model.fresh_id()
        size = len(body) + rng.choice([0, 0, 1, 4096, 1 << 20])
        offset = rng.choice([0, 0, size - len(body)])
        length = len(body)
        dflags = NEW_SEGMENT
        desc_ok = True
        mine = None
        if action in ("new_valid", "huge_sparse", "new_bad_fd"):
            if action == "new_valid":
                fd_kind = rng.choice(["memfd_sealed", "memfd_sealed", "memfd_shrink_only",
                                      "memfd_write_sealed"])
            elif action == "huge_sparse":
                fd_kind = "memfd_sparse_huge"
                size = rng.choice([64 << 20, 512 << 20, 1 << 30, (1 << 30) + 1, 1 << 36,
                                   1 << 40, (1 << 40) + 1])
                offset = rng.choice([0, size - length, size // 2])
            else:
                fd_kind = rng.choice([k for k in FD_KINDS if k not in (
                    "memfd_sealed", "memfd_shrink_only", "memfd_sparse_huge")])
            fd, valid, real = make_fd(fd_kind, size, body, ep, conn, at=offset)
            fds = [fd]
            over = model.mapped_bytes + size > SHM_RECEIVE_BYTES or size > MAX_SEGMENT \
                or model.mapped_count() >= SHM_RECEIVE_SEGMENTS
            ep.log(f"{action}: fd {fd_kind} valid={valid} file={real} size={size} over={over}")
            if valid is None:
                model.certain = False
                valid = False
            accepted = bool(valid) and not over and offset + length <= size
            if valid and not over:
                try:
                    mapping = mmap.mmap(fd, min(size, real), mmap.MAP_SHARED, mmap.PROT_READ)
                except (OSError, ValueError, OverflowError):
                    mapping = None
                mine = MySegment(size, -1, mapping)
        elif action == "reuse":
            candidates = [s for s, seg in conn.my_segments.items()
                          if seg.server_maps and seg.lent == 0 and seg.map is not None
                          and len(seg.map) == seg.size]
            if not candidates:
                ep.log("reuse: no segment to reuse")
                continue
            sid = rng.choice(candidates)
            seg = conn.my_segments[sid]
            size = seg.size
            length = rng.randint(0, min(size, 1 << 20))
            offset = rng.randint(0, size - length)
            dflags = 0
            # The segment holds what we wrote when we made it: name another region of it.
            body = bytes(seg.map[offset:offset + length])
            accepted = True
            ep.log(f"reuse segment {sid} at {offset}+{length}")
        elif action == "new_no_fd":
            ep.log("NEW_SEGMENT without a descriptor")
        elif action == "new_mapped_id":
            mapped = [s for s, seg in conn.my_segments.items() if seg.server_maps]
            if not mapped:
                continue
            sid = rng.choice(mapped)
            fd, valid, real = make_fd("memfd_sealed", size, body, ep, conn, at=offset)
            fds = [fd]
            ep.log(f"NEW_SEGMENT for segment {sid}, already mapped")
        elif action == "ref_unknown":
            dflags = 0
            sid = rng.choice([sid, 0, 2**32 - 1])
            ep.log(f"names unknown segment {sid}")
        elif action == "ref_wrong_size":
            mapped = [s for s, seg in conn.my_segments.items() if seg.server_maps]
            if not mapped:
                continue
            sid = rng.choice(mapped)
            dflags = 0
            size = conn.my_segments[sid].size + rng.choice([1, -1, 4096, 2**63])
            offset, length = 0, min(length, max(0, size))
            ep.log(f"names segment {sid} with a wrong size {size}")
        elif action == "bad_region":
            mapped = [s for s, seg in conn.my_segments.items() if seg.server_maps]
            if not mapped:
                continue
            sid = rng.choice(mapped)
            dflags = 0
            size = conn.my_segments[sid].size
            offset, length = rng.choice([(size, 1), (size - 1, 2), (2**64 - 1, 1),
                                         (1, 2**64 - 1), (2**63, 2**63), (0, size + 1)])
            ep.log(f"segment {sid}: region {offset}+{length} of {size}")
        elif action == "bad_flags":
            dflags = rng.choice([4, 3, 0x80000000, 0xFFFFFFFF, 5])
            sid = rng.choice([sid, 0])
            if dflags & NEW_SEGMENT and rng.random() < 0.5:
                fd, _, _ = make_fd("memfd_sealed", size, body, ep, conn, at=offset)
                fds = [fd]
            ep.log(f"descriptor flags {dflags:#x} id {sid} fds={len(fds)}")
        elif action == "short_desc":
            desc_ok = False
            ep.log("SHM descriptor of the wrong size")
        elif action == "peer_bad":
            dflags = PEER_SEGMENT
            sid = rng.choice([sid, 0, 1, 2**32 - 1] + list(conn.server_segments))
            offset, length = rng.choice([(0, 10), (2**64 - 1, 1), (0, 2**40)])
            size = rng.choice([size, 1 << 20, 2**64 - 1])
            if sid in conn.server_segments and conn.server_segments[sid].size == size \
                    and offset + length <= size:
                offset = size   # keep it out of bounds
            ep.log(f"PEER_SEGMENT {sid} region {offset}+{length} size {size}")
        elif action == "peer_valid":
            # Ask for a large reply, keep its segment, and send a region of it back.
            conn.release_mode = "never"
            conn.server_segments_held = True
            big_rid = conn.next_rid(rng)
            conn.send(frame(REQUEST, b"big:%d" % rng.choice([70000, 1 << 20]), big_rid))
            answer = conn.wait_reply(big_rid, 5.0)
            conn.release_mode = "normal"
            ep.log(f"peer_valid: big reply -> {ep.show(answer)}")
            if answer is None or answer[0] != "ok" or not answer[2] \
                    or not conn.server_segments:
                continue
            sid = rng.choice(list(conn.server_segments))
            seg = conn.server_segments[sid]
            dflags, size = PEER_SEGMENT, seg.size
            offset = rng.randint(0, 1000)
            length = rng.randint(0, size - offset)
            body = bytes(seg.map[offset:offset + length])
            accepted = True
            ep.log(f"PEER_SEGMENT echo of server segment {sid} {offset}+{length}")
        elif action == "retire":
            mapped = [s for s, seg in conn.my_segments.items() if seg.server_maps]
            ids = rng.sample(mapped, min(len(mapped), rng.randint(0, 3))) + \
                [rng.getrandbits(32) for _ in range(rng.randint(0, 2))]
            ep.log(f"HRET {ids}")
            conn.send(frame(EVENT, control_payload(b"HRET", ids), 0))
            for s in ids:
                seg = conn.my_segments.get(s)
                if seg is not None and seg.server_maps:
                    seg.server_maps = False
                    model.mapped_bytes -= seg.size
            continue
        elif action == "compressed":
            fd, valid, real = make_fd("memfd_sealed", size, body, ep, conn, at=offset)
            fds = [fd]
            expect_code = UNSUPPORTED_FLAGS
            ep.log("SHM|COMPRESSED (compression not negotiated)")
        desc = descriptor(sid, dflags, size, offset, length) if desc_ok else \
            rng.randbytes(rng.choice([0, 8, 31, 33, 64]))
        flags = F_SHM | (F_COMPRESSED if action == "compressed" else 0)
        if typ == ERROR:
            expect_code = UNSUPPORTED_FLAGS
            accepted = False
        # Bookkeeping before sending: what the server will map and hand back.
        if mine is not None and typ != ERROR:
            conn.my_segments[sid] = mine
            mine.server_maps = True
            model.mapped_bytes += size
        elif mine is not None:
            mine.close()
        if accepted and dflags != PEER_SEGMENT:
            model.expect[("HREL", sid)] += 1
            conn.my_segments[sid].lent += 1
        elif not accepted:
            model.hand_back(sid, dflags, desc_ok)
        ep.log(f"send {['', 'Request', 'Response', 'Event', 'Error'][typ]} SHM "
               f"desc(id={sid}, flags={dflags:#x}, size={size}, {offset}+{length}) "
               f"fds={len(fds)} accepted={accepted}")
        conn.send(frame(typ, desc, rid, flags), fds)
        if typ != REQUEST:
            ep.probe(conn, what=f"probe after an SHM {['', '', 'Response', 'Event', 'Error'][typ]}")
            continue
        answer = conn.wait_reply(rid, 8.0)
        if answer is None:
            ep.fail(f"no answer to an SHM Request ({action}) within 8 s")
        if answer[0] == "err" and answer[1] == SHM_ERROR and "across connections" in answer[2]:
            model.certain = False    # another connection holds the server-wide budget
            continue
        if accepted:
            if not ep.judge(conn, body, answer):
                if answer[0] == "err" and answer[1] == SHM_ERROR and action == "huge_sparse":
                    ep.deviation(f"sparse segment of {size} bytes refused: {answer[2][:200]}")
                    model.certain = False
                    continue
                ep.fail(f"valid SHM Request ({action}, {length} bytes) answered wrongly: "
                        f"{ep.show(answer)}")
        elif answer[0] != "err" or answer[1] != expect_code:
            ep.deviation(f"SHM {action}: expected {CODE_NAMES[expect_code]}, got "
                         f"{ep.show(answer)}")
            model.certain = False
    ep.probe(conn)
    model.check()
    if rng.random() < 0.2:
        ep.park(conn, rng.uniform(0.5, 5.0))


def ep_shm_flood(ep: Episode) -> None:
    """Many segments on one connection: past the 64-segment bound the server must refuse
    (HREJ); segments retired with HRET must give their budget back."""
    rng = ep.rng
    conn = ep.connect()
    ep.hello(conn, shm=True)
    model = ShmModel(ep, conn)

    def introduce(count: int) -> None:
        for _ in range(count):
            sid = model.fresh_id()
            size = rng.choice([4096, 65536, 1 << 20, 8 << 20])
            body = b"echo:" + rng.randbytes(rng.randint(0, 100))
            fd, valid, real = make_fd(rng.choice(["memfd_sealed", "memfd_sparse_huge"]), size,
                                      body, ep, conn)
            ok = model.mapped_count() < SHM_RECEIVE_SEGMENTS and \
                model.mapped_bytes + size <= SHM_RECEIVE_BYTES
            if ok:
                conn.my_segments[sid] = MySegment(size, -1, None)
                conn.my_segments[sid].server_maps = True
                model.mapped_bytes += size
                model.expect[("HREL", sid)] += 1      # lent to nobody: released at once
            else:
                model.expect[("HREJ", sid)] += 1
            conn.send(frame(EVENT, descriptor(sid, NEW_SEGMENT, size, 0, len(body)),
                            rng.getrandbits(63) | 1, F_SHM), [fd])
            ep.owned.remove(fd)
            os.close(fd)

    def settle() -> bool:
        want = sum(model.expect.values())
        return conn.pump(lambda: len(conn.handbacks) >= want, 8.0)

    n = rng.randint(10, 90)
    ep.log(f"flood: {n} NEW_SEGMENT Events")
    introduce(n)
    if not settle():
        ep.deviation(f"flood: {len(conn.handbacks)} hand-backs of "
                     f"{sum(model.expect.values())} within 8 s")
    mapped = [s for s, seg in conn.my_segments.items() if seg.server_maps]
    retire = rng.sample(mapped, rng.randint(0, len(mapped)))
    ep.log(f"HRET {len(retire)} of {len(mapped)} mapped segments, then "
           f"introduce more")
    if retire:
        conn.send(frame(EVENT, control_payload(b"HRET", retire[:1024]), 0))
        for sid in retire[:1024]:
            conn.my_segments[sid].server_maps = False
            model.mapped_bytes -= conn.my_segments[sid].size
    ep.probe(conn)
    introduce(rng.randint(1, 70))
    if not settle():
        ep.deviation(f"flood: {len(conn.handbacks)} hand-backs of "
                     f"{sum(model.expect.values())} within 8 s (after HRET)")
    ep.probe(conn)
    model.check()


def ep_fd_junk(ep: Episode) -> None:
    """Descriptors where they do not belong; the stream itself stays in sync."""
    rng = ep.rng
    conn = ep.connect()
    if rng.random() < 0.6:
        ep.hello(conn, shm=rng.random() < 0.7)
    for _ in range(rng.randint(1, 5)):
        style = rng.choice(["on_request", "on_hello", "many", "over_64", "mid_frame",
                            "shm_several", "lone_byte", "on_event", "zero_bytes",
                            "then_silence"])
        kinds = [rng.choice(FD_KINDS) for _ in range(rng.choice(
            [1, 2, 3, 16, 17, 40] if style in ("many", "shm_several") else [1, 2]))]
        fds = [make_fd(k, 1 << 16, b"x", ep, conn)[0] for k in kinds]
        ep.log(f"fds {style}: {kinds}")
        if style in ("on_request", "on_event", "on_hello", "many"):
            if style == "on_hello":
                payload = hello_payload([(2, struct.pack("<I", 1))])
                conn.send(frame(EVENT, payload, 0), fds)
                conn.hello_sent(payload)
            else:
                typ = EVENT if style == "on_event" else REQUEST
                rid = conn.next_rid(rng)
                payload = b"echo:" + rng.randbytes(rng.randint(0, 2000))
                conn.send(frame(typ, payload, rid), fds)
                if typ == REQUEST:
                    answer = conn.wait_reply(rid, 8.0)
                    if not ep.judge(conn, payload, answer):
                        ep.fail(f"Request carrying {len(fds)} fds answered wrongly: "
                                f"{ep.show(answer)}")
        elif style == "over_64":
            for _ in range(6):
                conn.send(frame(EVENT, b"", rng.getrandbits(32) | 1), fds * 1)
                fds = [make_fd("pipe_r", 0, b"", ep)[0] for _ in range(16)]
        elif style == "mid_frame":
            rid = conn.next_rid(rng)
            payload = b"echo:" + rng.randbytes(rng.randint(30, 3000))
            data = frame(REQUEST, payload, rid)
            cut = rng.randint(1, len(data) - 1)
            conn.send(data[:cut])
            conn.pump(timeout=0.02)
            conn.send(data[cut:], fds)
            answer = conn.wait_reply(rid, 8.0)
            if not ep.judge(conn, payload, answer):
                ep.fail(f"Request with fds mid-frame answered wrongly: {ep.show(answer)}")
        elif style == "shm_several":
            rid = conn.next_rid(rng)
            sid = rng.randint(1, 2**32 - 1)
            desc = descriptor(sid, NEW_SEGMENT, 1 << 16, 0, 10)
            try:   # if the first fd is a memfd, the server may take it, and echo from it
                conn.my_segments[sid] = MySegment(1 << 16, -1, mmap.mmap(
                    fds[0], 1 << 16, mmap.MAP_SHARED, mmap.PROT_READ))
            except (OSError, ValueError):
                pass
            conn.send(frame(REQUEST, desc, rid, F_SHM), fds)
            answer = conn.wait_reply(rid, 8.0)
            if answer is None:
                ep.fail("no answer to an SHM Request carrying several fds")
            ep.log(f"-> {ep.show(answer)}")
        elif style == "then_silence":
            # A sealed memfd with the first bytes of its NEW_SEGMENT frame, then nothing.
            fd, _, _ = make_fd("memfd_sealed", 1 << 20, b"echo:", ep, conn)
            data = frame(REQUEST, descriptor(rng.randint(1, 99), NEW_SEGMENT, 1 << 20, 0, 5),
                         conn.next_rid(rng), F_SHM)
            conn.send(data[:rng.randint(1, len(data) - 1)], [fd])
            ep.log("sealed memfd with a partial NEW_SEGMENT frame, then silence (parked)")
            ep.park(conn, rng.uniform(0.5, 13.0))
            return
        elif style == "lone_byte":
            conn.send(b"H", fds)
            ep.log("lone byte 'H' with fds, then close")
            return
        elif style == "zero_bytes":
            try:
                conn.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", fds))])
            except OSError as error:
                ep.log(f"zero-byte sendmsg: {error}")
    ep.probe(conn)


def ep_valid(ep: Episode) -> None:
    rng = ep.rng
    conn = ep.connect()
    if rng.random() < 0.8:
        ep.hello(conn, shm=rng.random() < 0.6)
    pending = {}
    for _ in range(rng.randint(1, 12)):
        what = rng.choice(["echo", "echo", "size", "raise", "none", "notbytes", "event",
                           "big"])
        rid = conn.next_rid(rng)
        n = rng.choice([0, 5, 100, 1000, 20000, 70000, 500000, 2 << 20])
        if what == "event":
            conn.send(frame(EVENT, rng.randbytes(min(n, 100000)), rid))
            continue
        payload = {"big": b"big:%d" % n, "size": b"size:" + rng.randbytes(n),
                   "raise": b"raise:", "none": b"none:", "notbytes": b"notbytes:"}.get(
            what, b"echo:" + rng.randbytes(n))
        pending[rid] = (what, payload)
        conn.send(frame(REQUEST, payload, rid), timeout=5.0)
    ep.log(f"pipelined {len(pending)} requests: {[v[0] for v in pending.values()]}")
    end = rng.choice(["read", "read", "shut_wr"])
    if end == "shut_wr":
        conn.shutdown_write()
        ep.log("shutdown(SHUT_WR): every reply must still come, then EOF")
    for rid, (what, payload) in pending.items():
        answer = conn.wait_reply(rid, 10.0)
        if not ep.judge(conn, payload, answer):
            want = expected_reply(payload)
            ep.fail(f"valid {what} request ({len(payload)} bytes) answered wrongly: "
                    f"{ep.show(answer)} (wanted {want[0]} "
                    f"{want[1] if want[0] == 'err' else len(want[1])})")
    if end == "shut_wr":
        if not conn.wait_eof(5.0):
            ep.deviation("server did not close within 5 s after our SHUT_WR")
    else:
        ep.probe(conn)


def ep_session(ep: Episode) -> None:
    """Exactly-once windows: a retried id is answered from memory, byte for byte."""
    rng = ep.rng
    session = ep.random_session()
    conn = ep.connect()
    ep.hello(conn, shm=rng.random() < 0.5, session=session)
    answers = {}
    for _ in range(rng.randint(1, 6)):
        if answers and rng.random() < 0.4:
            rid = rng.choice(list(answers))
            payload = b"echo:" + rng.randbytes(rng.randint(0, 1000))   # a different one
            ep.log(f"retry rid {rid} with another payload: the first answer must come")
            conn.send(frame(REQUEST, payload, rid))
            answer = conn.wait_reply(rid, 8.0)
            if answer is None:
                ep.fail(f"no answer to a retried request of a session (rid {rid})")
            if answer[:2] != answers[rid][:2] and not (answer[0] == "err"
                                                        and answer[1] == UNAVAILABLE):
                ep.fail(f"replay of rid {rid} differs: {ep.show(answer)} vs "
                        f"{ep.show(answers[rid])}")
            continue
        rid = conn.next_rid(rng)
        payload = b"echo:" + rng.randbytes(rng.randint(0, 1000))
        conn.send(frame(REQUEST, payload, rid))
        answer = conn.wait_reply(rid, 8.0)
        if answer is None:
            ep.fail(f"no answer to a session request (rid {rid})")
        if answer[0] == "ok" and answer[1] != payload:
            ep.fail(f"session request answered wrongly: {ep.show(answer)}")
        if answer[0] == "ok":
            answers[rid] = answer
    if rng.random() < 0.3:
        conn.close("rst")


def ep_abrupt(ep: Episode) -> None:
    rng = ep.rng
    conn = ep.connect()
    if rng.random() < 0.7:
        ep.hello(conn, shm=rng.random() < 0.6)
    style = rng.choice(["mid_frame", "after_fd", "unread_replies", "unread_big", "mid_hello",
                        "after_connect", "during_shm"])
    how = rng.choice(["close", "rst", "shut_rdwr"])
    ep.log(f"abrupt {style}, {how}")
    if style == "mid_frame":
        data = frame(REQUEST, b"echo:" + rng.randbytes(rng.randint(0, 100000)), 5)
        conn.send_now(data[:rng.randint(1, len(data) - 1)])
    elif style == "after_fd":
        fd, _, _ = make_fd(rng.choice(["memfd_sealed", "pipe_r", "socketpair"]), 1 << 20,
                           b"echo:x", ep, conn)
        conn.send_now(frame(REQUEST, descriptor(7, NEW_SEGMENT, 1 << 20, 0, 6), 9, F_SHM),
                      [fd])
    elif style == "unread_replies":
        for i in range(rng.randint(1, 50)):
            conn.send_now(frame(REQUEST, b"echo:" + rng.randbytes(rng.randint(0, 5000)),
                                i + 1))
        time.sleep(rng.choice([0, 0.01, 0.1]))
    elif style == "unread_big":
        for i in range(rng.randint(1, 4)):
            conn.send_now(frame(REQUEST, b"big:%d" % rng.choice([100000, 4 << 20]), i + 1))
        time.sleep(rng.choice([0, 0.05, 0.3]))
    elif style == "mid_hello":
        data = frame(EVENT, hello_payload([(2, struct.pack("<I", 1))]), 0)
        conn.send_now(data[:rng.randint(1, len(data) - 1)])
    elif style == "during_shm":
        size = 1 << 20
        fd, _, _ = make_fd("memfd_sealed", size, b"echo:" + bytes(100), ep, conn)
        conn.send_now(frame(REQUEST, descriptor(3, NEW_SEGMENT, size, 0, 105), 4, F_SHM), [fd])
        conn.send_now(frame(REQUEST, descriptor(3, 0, size, 0, 105), 5, F_SHM))
    conn.close(how)


def ep_no_read(ep: Episode) -> None:
    """Ask for much and read nothing: the server must cut us after send_timeout, not hang."""
    rng = ep.rng
    conn = ep.connect()
    shm = rng.random() < 0.4
    ep.hello(conn, shm=shm, k7=rng.choice([None, 1, 2]) if shm else None)
    n = rng.randint(2, 12)
    for i in range(n):
        conn.send_now(frame(REQUEST, b"big:%d" % rng.choice([1 << 20, 4 << 20, 8 << 20]),
                            i + 1))
    ep.log(f"{n} big requests, never read; parked")
    ep.park(conn, rng.uniform(1.0, 14.0))


def ep_park(ep: Episode) -> None:
    """Several connections that do little, left open for a while (frame_timeout, idle)."""
    rng = ep.rng
    for i in range(rng.randint(1, 6)):
        conn = ep.connect()
        style = rng.choice(["nothing", "hello", "partial_header", "partial_payload", "valid"])
        if style == "hello":
            ep.hello(conn)
        elif style == "partial_header":
            conn.send_now(frame(REQUEST, b"echo:x", 3)[:rng.randint(1, 23)])
        elif style == "partial_payload":
            conn.send_now(frame(REQUEST, b"echo:" + bytes(rng.choice([100, 100000])), 3)[:40])
        elif style == "valid":
            ep.hello(conn)
            ep.probe(conn)
        ep.log(f"park #{i} {style}")
        ep.park(conn, rng.uniform(0.5, 13.0))


# Over TCP and TLS (--tcp, --tls) ------------------------------------------------------------

def ep_shm_tcp(ep: Episode) -> None:
    """What the shm, shm_flood and fd_junk episodes mean where no descriptor can cross:
    shared memory is never negotiated over TCP (section 1a), so every SHM frame, a
    NEW_SEGMENT without its descriptor included, is refused as on any connection without
    it (section 9): SHM_ERROR for a Request (SHM|COMPRESSED: UNSUPPORTED_FLAGS, section 9a),
    nothing for other types, and HREJ for a 32-byte descriptor whose id is not 0 and whose
    PEER_SEGMENT bit is clear. Inline Requests between them must be served."""
    rng = ep.rng
    conn = ep.connect()
    shm = rng.random() < 0.7           # announcing SHM over TCP: the server must not take it
    ep.hello(conn, shm=shm, k6=rng.choice([None, 1 << 30]) if shm else None,
             k7=rng.choice([None, 64]) if shm else None)
    model = ShmModel(ep, conn)
    for _ in range(rng.randint(1, 12)):
        action = rng.choice(["new", "new", "new", "ref", "peer", "short", "id0", "bad_flags",
                             "compressed", "inline", "flood"])
        if action == "inline":
            ep.probe(conn, what="inline request between SHM frames")
            continue
        if action == "flood":           # past the 64-segment bound of a Unix connection
            n = rng.randint(10, 90)
            ep.log(f"flood: {n} NEW_SEGMENT Events without descriptors")
            data = b""
            for _ in range(n):
                sid = model.fresh_id()
                model.hand_back(sid, NEW_SEGMENT)
                data += frame(EVENT, descriptor(sid, NEW_SEGMENT, 1 << 20, 0, 10),
                              rng.getrandbits(63) | 1, F_SHM)
            conn.send(data, timeout=4.0)
            continue
        typ = REQUEST if rng.random() < 0.7 else rng.choice([EVENT, RESPONSE, ERROR])
        rid = conn.next_rid(rng)
        sid = rng.choice([model.fresh_id(), model.fresh_id(), 2**32 - 1])
        size = rng.choice([1, 4096, 1 << 20, 1 << 40, 2**64 - 1])
        offset = rng.choice([0, 0, size // 2, size])
        length = rng.choice([0, 10, size - offset, 2**64 - 1])
        dflags = {"new": NEW_SEGMENT, "compressed": NEW_SEGMENT, "peer": PEER_SEGMENT}.get(
            action, 0)
        desc_ok = action != "short"
        if action == "id0":
            sid = 0
        elif action == "bad_flags":
            dflags = rng.choice([3, 4, 0x80000000, 0xFFFFFFFF, 5])
        desc = descriptor(sid, dflags, size, offset, length) if desc_ok else \
            rng.randbytes(rng.choice([0, 8, 31, 33, 64]))
        flags = F_SHM | (F_COMPRESSED if action == "compressed" else 0)
        model.hand_back(sid, dflags, desc_ok)
        ep.log(f"{action}: SHM {['', 'Request', 'Response', 'Event', 'Error'][typ]} "
               f"desc(id={sid}, flags={dflags:#x}, size={size}, {offset}+{length}, "
               f"{len(desc)} bytes) rid={rid}")
        conn.send(frame(typ, desc, rid, flags), timeout=2.0)
        if typ != REQUEST:
            continue
        answer = conn.wait_reply(rid, 8.0)
        if answer is None:
            ep.fail(f"no answer within 8 s to an SHM Request ({action}) over TCP "
                    f"(eof={conn.eof} tls_error={conn.tls_error})")
        codes = (UNSUPPORTED_FLAGS, SHM_ERROR) if action == "compressed" else (SHM_ERROR,)
        if answer[0] != "err" or answer[1] not in codes:
            ep.deviation(f"SHM over TCP ({action}): expected "
                         f"{'/'.join(CODE_NAMES[c] for c in codes)}, got {ep.show(answer)}")
    ep.probe(conn)
    model.check()


def client_hello(context) -> tuple:
    """A ClientHello from ``context`` (its bytes) and the SSLObject that wrote it, for a
    handshake driven by hand."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read(), tls, incoming, outgoing


RECLAIM_S = 10.0 + 6.0     # the server's frame_timeout (its handshake timeout) and a margin


def expect_closed(ep: Episode, conn: Conn, what: str, seconds: float = RECLAIM_S) -> None:
    """The server must end a connection that never completes a handshake (at once when
    it is refused, at the latest after frame_timeout), and say nothing in the clear."""
    closed = conn.wait_eof(seconds)
    if conn.raw_in[:2] == b"HP":
        ep.fail(f"{what}: the server answered in the clear: {bytes(conn.raw_in[:24]).hex()}")
    if conn.frames_in or conn.replies:
        ep.fail(f"{what}: the server sent hintens frames ({conn.frames_in}) to a peer it "
                f"must not let in")
    if not closed:
        ep.fail(f"{what}: still open {seconds:.0f} s later (the handshake timeout should "
                f"have reclaimed it)")
    ep.log(f"{what}: closed by the server (tls_error={conn.tls_error}, "
           f"{len(conn.raw_in)} bytes in the clear)")


def ep_tls_plaintext(ep: Episode) -> None:
    """Plain hintens frames at the TLS port: a hello, Requests, an SHM frame."""
    rng = ep.rng
    conn = ep.connect(tls=False)
    data = frame(EVENT, hello_payload([(1, b"\0"), (2, struct.pack("<I", 0))]), 0)
    for i in range(rng.randint(0, 5)):
        data += frame(REQUEST, b"echo:" + rng.randbytes(rng.randint(0, 3000)), i + 1)
    if rng.random() < 0.3:
        data += frame(REQUEST, descriptor(5, NEW_SEGMENT, 4096, 0, 10), 99, F_SHM)
    ep.log(f"plaintext hintens frames at the TLS port: {len(data)} bytes")
    conn.send(data, timeout=2.0)
    expect_closed(ep, conn, "plaintext at the TLS port", 5.0)


def ep_tls_stall(ep: Episode) -> None:
    """A ClientHello (all of it or a part), then silence: the server must not wait for
    ever. Checked here or parked (then the end checks see it)."""
    rng = ep.rng
    hello, _, _, _ = client_hello(ep.fz.tls_client)
    conn = ep.connect(tls=False)
    cut = rng.choice([len(hello), len(hello), 1, 5, len(hello) // 2, 0])
    ep.log(f"ClientHello: {cut} of {len(hello)} bytes, then silence")
    if cut:
        conn.send(hello[:cut], raw=True, timeout=2.0)
    if rng.random() < 0.4:
        ep.park(conn, rng.uniform(0.5, 14.0))
        return
    expect_closed(ep, conn, f"stalled handshake ({cut} bytes of the ClientHello)")


def ep_tls_garbage(ep: Episode) -> None:
    """Bytes that are not a TLS handshake where one must come."""
    rng = ep.rng
    style = rng.choice(["random", "record_header", "huge_record", "app_data", "alert",
                        "http", "sslv2", "hello_then_junk", "hello_twice", "zeros"])
    hello, _, _, _ = client_hello(ep.fz.tls_client)
    data = {
        "random": lambda: rng.randbytes(rng.choice([1, 5, 100, 5000, 70000])),
        "record_header": lambda: b"\x16\x03\x01" + rng.randbytes(2),
        "huge_record": lambda: b"\x16\x03\x03\xff\xff" + rng.randbytes(rng.randint(0, 3000)),
        "app_data": lambda: b"\x17\x03\x03\x00\x20" + rng.randbytes(32),
        "alert": lambda: b"\x15\x03\x03\x00\x02\x02\x28",
        "http": lambda: b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "sslv2": lambda: b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + rng.randbytes(37),
        "hello_then_junk": lambda: hello + rng.randbytes(rng.randint(1, 2000)),
        "hello_twice": lambda: hello + hello,
        "zeros": lambda: bytes(rng.choice([5, 1000])),
    }[style]()
    if style == "random" and data[:1] == b"\x16":
        data = b"\x00" + data      # keep the "not a handshake" model simple
    conn = ep.connect(tls=False)
    ep.log(f"garbage instead of a handshake: {style}, {len(data)} bytes, "
           f"head {data[:16].hex()}")
    conn.send(data, raw=True, timeout=2.0)
    # OpenSSL refuses at once what it can tell is no handshake: a whole record header of a
    # wrong type or version. Anything it may still take for the start of a record (random
    # bytes, fewer than 5, an SSLv2 length, junk after a ClientHello) waits for more, until
    # the handshake timeout.
    quick = style in ("app_data", "alert", "http", "zeros")
    expect_closed(ep, conn, f"garbage handshake ({style})", 5.0 if quick else RECLAIM_S)


def ep_tls_stranger(ep: Episode) -> None:
    """A client certificate from another CA, or none: refused, never served."""
    rng = ep.rng
    which = rng.choice(["stranger", "anonymous"])
    conn = ep.connect(tls=ep.fz.tls_stranger if which == "stranger" else ep.fz.tls_anonymous)
    ep.log(f"{which} client: handshake done on our side={conn.tls_done} "
           f"error={conn.tls_error}")
    if conn.tls_done:     # TLS 1.3: the server's verdict comes after our side is done
        conn.send(frame(EVENT, hello_payload([(2, struct.pack("<I", 0))]), 0), timeout=2.0)
        conn.send(frame(REQUEST, b"echo:stranger", 7), timeout=2.0)
    conn.wait_eof(5.0)
    if conn.frames_in or conn.replies:
        ep.fail(f"a {which} client was served ({conn.frames_in} frames)")
    if not conn.eof:
        ep.fail(f"a {which} client was not closed within 5 s")
    ep.log(f"refused: {conn.tls_error}")


def ep_tls_abrupt(ep: Episode) -> None:
    """Ends in the middle of the handshake or of a record, by close or RST."""
    rng = ep.rng
    style = rng.choice(["mid_client_hello", "after_client_hello", "mid_final_flight",
                        "after_handshake", "mid_record", "unread_replies", "after_hello"])
    how = rng.choice(["close", "rst", "rst", "shut_rdwr"])
    ep.log(f"tls abrupt: {style}, {how}")
    if style in ("mid_client_hello", "after_client_hello", "mid_final_flight"):
        hello, tls, incoming, outgoing = client_hello(ep.fz.tls_client)
        conn = ep.connect(tls=False)
        if style == "mid_client_hello":
            conn.send_now(hello[:rng.randint(1, len(hello) - 1)], raw=True)
        else:
            conn.send(hello, raw=True, timeout=2.0)
            conn.pump(timeout=rng.choice([0, 0.02, 0.3]))
            if style == "mid_final_flight":
                conn.pump(lambda: len(conn.raw_in) > 0, 3.0)
                conn.pump(timeout=0.05)
                incoming.write(bytes(conn.raw_in))
                try:
                    tls.do_handshake()
                except ssl.SSLError:
                    pass
                flight = outgoing.read()
                ep.log(f"server flight {len(conn.raw_in)} bytes; ours {len(flight)}")
                if flight:
                    conn.send_now(flight[:rng.randint(0, len(flight) - 1)], raw=True)
        conn.close(how)
        return
    conn = ep.connect()
    if style == "after_handshake":
        conn.close(how)
        return
    ep.hello(conn, shm=False)
    if style == "mid_record":
        payload = b"echo:" + rng.randbytes(rng.choice([10, 3000, 20000, 200000]))
        records = conn.encrypt(frame(REQUEST, payload, conn.next_rid(rng)))
        cut = rng.randint(1, len(records) - 1)
        ep.log(f"request of {len(payload)} bytes: {cut} of {len(records)} bytes of TLS "
               f"records")
        conn.send_now(records[:cut], raw=True)
        conn.pump(timeout=rng.choice([0, 0.05, 0.5]))
    elif style == "unread_replies":
        for i in range(rng.randint(1, 8)):
            conn.send_now(frame(REQUEST, b"big:%d" % rng.choice([1000, 100000, 2 << 20]),
                                i + 1))
        time.sleep(rng.choice([0, 0.05, 0.3]))
    else:
        ep.probe(conn, strict=False)
    conn.close(how)


def ep_tls_halfopen(ep: Episode) -> None:
    """Many handshakes left half-open at once (nothing, part of a ClientHello, all of
    it): the server keeps serving a well-behaved client meanwhile, and ends each of them
    once frame_timeout has passed."""
    rng = ep.rng
    n = rng.randint(20, 150)
    hello, _, _, _ = client_hello(ep.fz.tls_client)
    conns = []
    for _ in range(n):
        conn = ep.connect(tls=False)
        cut = rng.choice([0, 1, len(hello) // 2, len(hello)])
        if cut:
            conn.send_now(hello[:cut], raw=True)
        conns.append(conn)
    ep.log(f"{n} half-open handshakes")
    t0 = time.monotonic()
    other = ep.connect()
    ep.hello(other, shm=False)
    ep.probe(other, what="probe while handshakes hang")
    other.close()
    ep.log(f"served another client {time.monotonic() - t0:.2f} s after them")
    if rng.random() < 0.5:
        for conn in conns:
            conn.close(rng.choice(["close", "rst"]))
        return
    deadline = t0 + RECLAIM_S + 4.0
    while time.monotonic() < deadline and not all(c.eof for c in conns):
        for conn in conns:
            conn.pump(timeout=0)
        time.sleep(0.1)
        if ep.fz.stop.is_set() and time.monotonic() > ep.fz.hard_stop:
            return
    open_ = [c for c in conns if not c.eof]
    if open_:
        ep.fail(f"{len(open_)} of {n} half-open handshakes still open "
                f"{time.monotonic() - t0:.1f} s later")
    if any(c.raw_in[:2] == b"HP" for c in conns):
        ep.fail("a half-open handshake got hintens bytes in the clear")


EPISODES = {
    "random_bytes": (ep_random_bytes, 6),
    "bad_header": (ep_bad_header, 12),
    "truncated": (ep_truncated, 6),
    "drip": (ep_drip, 3),
    "hello": (ep_hello, 10),
    "control": (ep_control, 8),
    "shm": (ep_shm, 16),
    "shm_flood": (ep_shm_flood, 3),
    "fd_junk": (ep_fd_junk, 8),
    "valid": (ep_valid, 10),
    "session": (ep_session, 4),
    "abrupt": (ep_abrupt, 8),
    "no_read": (ep_no_read, 2),
    "park": (ep_park, 3),
}
#: --tcp: no descriptors cross, so the fd-passing kinds give way to shm_tcp.
TCP_EPISODES = {**{k: v for k, v in EPISODES.items()
                   if k not in ("shm", "shm_flood", "fd_junk")},
                "shm_tcp": (ep_shm_tcp, 16)}
#: --tls: the TCP kinds inside TLS, and these around the handshake.
TLS_EPISODES = {
    "tls_plaintext": (ep_tls_plaintext, 2),
    "tls_stall": (ep_tls_stall, 2),
    "tls_garbage": (ep_tls_garbage, 3),
    "tls_stranger": (ep_tls_stranger, 3),
    "tls_abrupt": (ep_tls_abrupt, 6),
    "tls_halfopen": (ep_tls_halfopen, 1),
}


def episode_table(tcp: bool, tls: bool) -> dict:
    """The episode kinds (function, weight) of a mode."""
    if tls:
        return {**TCP_EPISODES, **TLS_EPISODES}
    return TCP_EPISODES if tcp else EPISODES


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Workers, checker, main ---------------------------------------------------------------------

class Worker(threading.Thread):
    MAX_PARKED = 24

    def __init__(self, fz: "Fuzzer", index: int) -> None:
        super().__init__(name=f"worker-{index}", daemon=True)
        self.fz, self.index = fz, index
        self.rng = random.Random(f"{fz.seed}/{index}")
        self.parked: list = []
        self.recent: collections.deque = collections.deque(maxlen=50)
        self.parking_episode = Episode(fz, self, "parked", 0)

    def park(self, conn: Conn, seconds: float) -> None:
        self.parked.append((time.monotonic() + seconds, conn))
        if len(self.parked) > self.MAX_PARKED:
            self.parked.sort(key=lambda p: p[0])
            self.parked.pop(0)[1].close()

    def expire(self, everything: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for due, conn in self.parked:
            if everything or due <= now:
                conn.close(self.rng.choice(["close", "rst"]))
            else:
                keep.append((due, conn))   # never read: what the server sent waits unread
        self.parked = keep

    def run(self) -> None:
        kinds = [k for k in self.fz.episodes if not self.fz.kinds or k in self.fz.kinds]
        weights = [self.fz.episodes[k][1] for k in kinds]
        while not self.fz.stop.is_set() and time.monotonic() < self.fz.t_end:
            self.expire()
            kind = self.rng.choices(kinds, weights)[0]
            seed = self.rng.getrandbits(48)
            self.fz.run_episode(self, kind, seed)
        self.expire(everything=True)


class Fuzzer:
    def __init__(self, args) -> None:
        self.args = args
        self.seed = args.seed
        self.kinds = set(args.kinds.split(",")) if args.kinds else set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.kind_seconds = collections.Counter()
        self.outcomes = collections.Counter()
        self.deviations = collections.Counter()
        self.deviation_examples: dict = {}
        self.failures: list = []
        self.liveness: list = []
        self.timeline: list = []
        self.fuzzer_errors = collections.Counter()
        sr = random.Random(f"{self.seed}/sessions")
        self.sessions = [sr.randbytes(16) for _ in range(3)]
        self._session_counters = {s: __import__("itertools").count(1) for s in self.sessions}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.tag = f"seed{self.seed}-{stamp}"
        self.tls = bool(args.tls)
        self.tcp = bool(args.tcp or args.tls)
        if self.tcp:
            self.port = args.port or free_port()
            self.sockaddr = ("127.0.0.1", self.port)
            self.path = f"tcp://127.0.0.1:{self.port}"
        else:
            self.path = args.socket or os.path.join(WORKDIR,
                                                    f"srv-{self.seed}-{os.getpid()}.sock")
            self.sockaddr = self.path
        self.episodes = episode_table(self.tcp, self.tls)
        self.pki_dir = os.path.join(WORKDIR, f"pki-{self.seed}-{os.getpid()}")
        self.tls_client = self.tls_stranger = self.tls_anonymous = None
        self.log_path = os.path.join(WORKDIR, f"server-{self.tag}.log")
        self.out_prefix = os.path.join(WORKDIR, self.tag)
        self.hard_stop = float("inf")
        self.chaos_tags = __import__("itertools").count(1)

    def session_counter(self, session: bytes):
        counter = self._session_counters.get(session)
        if counter is None:
            counter = self._session_counters.setdefault(session,
                                                        __import__("itertools").count(1))
        lock = self.lock

        class Locked:
            def __next__(self_inner):
                with lock:
                    return next(counter)
        return Locked()

    # Recording -----------------------------------------------------------------------------

    def record_deviation(self, ep: Episode, text: str) -> None:
        key = text.split(":")[0][:80] if ":" in text else text[:80]
        with self.lock:
            self.deviations[key] += 1
            if key not in self.deviation_examples:
                self.deviation_examples[key] = {"text": text, **ep.describe()}

    def record_failure(self, what: str, detail: dict) -> None:
        detail = {"what": what, "t": round(time.monotonic() - self.t0, 2), **detail}
        with self.lock:
            self.failures.append(detail)
            n = len(self.failures)
        path = f"{self.out_prefix}-failure-{n}.json"
        with open(path, "w") as f:
            json.dump(detail, f, indent=1, default=str)
        print(f"[{detail['t']:8.1f}s] FAILURE {what}: {detail.get('text', '')[:300]} "
              f"-> {path}", flush=True)

    def recent_episodes(self) -> list:
        out = []
        for w in self.workers:
            out += list(w.recent)
        return sorted(out, key=lambda e: e["t"])[-120:]

    def run_episode(self, worker: Worker, kind: str, seed: int) -> None:
        ep = Episode(self, worker, kind, seed)
        with self.lock:
            self.counts[kind] += 1
        try:
            self.episodes[kind][0](ep)
        except EpisodeFailure as failure:
            ep.outcome = "FAILED"
            stats = self.server.stats()
            self.record_failure("episode", {"text": str(failure), "episode": ep.describe(),
                                            "server": stats, "alive": self.server.alive(),
                                            "repro": self.repro_command(kind, seed)})
        except ConnectFailed as error:
            ep.outcome = f"connect_failed: {error}"
            if not self.server.alive():
                self.stop.set()
        except OSError as error:
            ep.outcome = f"os: {error.__class__.__name__}"
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                self.fuzzer_errors[f"{kind}: {error}"] += 1
        except Exception as error:   # a bug in this fuzzer
            ep.outcome = f"fuzzer error: {error!r}"
            with self.lock:
                key = f"{kind}: {error!r}"[:160]
                if key not in self.fuzzer_errors:
                    print(f"fuzzer error in {kind} seed {seed}:\n{traceback.format_exc()}",
                          file=sys.stderr, flush=True)
                self.fuzzer_errors[key] += 1
        finally:
            ep.finish()
            with self.lock:
                self.outcomes[ep.outcome.split(":")[0]] += 1
                self.kind_seconds[kind] += time.monotonic() - ep.started
            worker.recent.append(ep.describe())

    def repro_command(self, kind: str, seed: int) -> str:
        mode = " ".join(flag for flag, on in (("--tls", self.tls),
                                               ("--tcp", self.tcp and not self.tls),
                                               ("--aio", self.args.aio)) if on)
        return (f"{sys.executable} {os.path.abspath(__file__)} --episode {kind}:{seed} "
                f"--seed {self.seed}{' ' + mode if mode else ''}")

    def make_pki(self) -> None:
        """--tls: a CA, the server's certificate for 127.0.0.1 and a client certificate
        from it, and a stranger's client certificate from another CA (trustme), as PEM
        files in the work directory; the client contexts the workers and the checker use."""
        import trustme
        ca, other_ca = trustme.CA(), trustme.CA()
        os.makedirs(self.pki_dir, exist_ok=True)
        ca.cert_pem.write_to_path(os.path.join(self.pki_dir, "ca.pem"))
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            os.path.join(self.pki_dir, "server.pem"))
        certs = {"client": ca.issue_cert("client.hxfuzz", common_name="client.hxfuzz"),
                 "stranger": other_ca.issue_cert("client.hxfuzz",
                                                 common_name="client.hxfuzz")}
        for name, cert in certs.items():
            cert.private_key_and_cert_chain_pem.write_to_path(
                os.path.join(self.pki_dir, f"{name}.pem"))

        def context(cert):
            ctx = ssl.create_default_context(cafile=os.path.join(self.pki_dir, "ca.pem"))
            if cert:
                ctx.load_cert_chain(os.path.join(self.pki_dir, f"{cert}.pem"))
            return ctx
        self.tls_client = context("client")
        self.tls_stranger = context("stranger")
        self.tls_anonymous = context(None)

    # Liveness --------------------------------------------------------------------------------

    def check_liveness(self, label: str) -> bool:
        import hintens
        t0 = time.monotonic()
        problems = []
        for shm in ((False,) if self.tcp else (True, False)):
            try:
                with hintens.Client(self.path, timeout=10.0, connect_timeout=10.0,
                                    shm=shm, ssl_context=self.tls_client) as client:
                    small = b"echo:" + os.urandom(32)
                    if bytes(client.request(small)) != small:
                        problems.append(f"small echo (shm={shm}) came back wrong")
                    big = b"echo:" + os.urandom(1 << 20)
                    reply = client.request(big)
                    if bytes(reply) != big:
                        problems.append(f"1 MiB echo (shm={shm}) came back wrong")
                    if isinstance(reply, memoryview):
                        reply.release()
                    if self.tcp:
                        problems += self.chaos(client)
            except Exception as error:
                problems.append(f"shm={shm}: {error.__class__.__name__}: {error}")
        elapsed = time.monotonic() - t0
        if elapsed > 20.0:
            problems.append(f"liveness check took {elapsed:.1f}s")
        entry = {"t": round(t0 - self.t0, 2), "label": label, "ok": not problems,
                 "seconds": round(elapsed, 3), "problems": problems}
        with self.lock:
            self.liveness.append(entry)
        if problems:
            try:
                os.kill(self.server.pid, signal.SIGUSR1)   # thread stacks into the log
            except OSError:
                pass
            self.record_failure("liveness", {"text": "; ".join(problems), **entry,
                                             "server": self.server.stats(),
                                             "alive": self.server.alive(),
                                             "recent_episodes": self.recent_episodes()})
        return not problems

    CHAOS_THREADS = 3
    CHAOS_ROUNDS = 12

    def chaos(self, client) -> list:
        """Requests and Events interleaved on one client from several threads: every
        Request gets its own answer, and the server counts every Event (``ev:TAG:``; a
        Request ``evcount:TAG`` reads the count back)."""
        tag = b"%d-%d" % (os.getpid(), next(self.chaos_tags))
        problems: list = []
        rng = random.Random()

        def run(index: int) -> None:
            try:
                for i in range(self.CHAOS_ROUNDS):
                    if i % 2:
                        client.send_event(b"ev:%s:%d:%d:" % (tag, index, i)
                                          + os.urandom(rng.choice([0, 100, 3000, 70000])))
                    else:
                        payload = b"echo:" + os.urandom(rng.choice([0, 10, 5000, 200000]))
                        if bytes(client.request(payload)) != payload:
                            problems.append(f"chaos thread {index}: wrong echo")
            except Exception as error:
                problems.append(f"chaos thread {index}: {error.__class__.__name__}: {error}")

        threads = [threading.Thread(target=run, args=(i,), name=f"chaos-{i}")
                   for i in range(self.CHAOS_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if any(t.is_alive() for t in threads):
            return problems + ["chaos threads stuck for 30 s"]
        want = self.CHAOS_THREADS * (self.CHAOS_ROUNDS // 2)
        deadline = time.monotonic() + 5.0
        while True:
            got = int(bytes(client.request(b"evcount:" + tag)))
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if got != want:
            problems.append(f"chaos: the server counted {got} of {want} Events in 5 s")
        return problems

    def checker(self) -> None:
        last_print = 0.0
        while not self.stop.wait(self.args.check_every):
            if time.monotonic() >= self.t_end:
                break
            if not self.server.alive():
                self.record_failure("server died", {
                    "text": f"exit code {self.server.proc.returncode}",
                    "recent_episodes": self.recent_episodes()})
                self.stop.set()
                break
            stats = self.server.stats()
            now = time.monotonic() - self.t0
            with self.lock:
                self.timeline.append({"t": round(now, 1), **stats,
                                      "parked": sum(len(w.parked) for w in self.workers),
                                      "episodes": sum(self.counts.values())})
            self.check_liveness("periodic")
            if now - last_print >= self.args.print_every:
                last_print = now
                with self.lock:
                    eps = sum(self.counts.values())
                    lf = sum(1 for e in self.liveness if not e["ok"])
                print(f"[{now:8.1f}s] episodes={eps} failures={len(self.failures)} "
                      f"liveness_fail={lf} deviations={sum(self.deviations.values())} "
                      f"server: {fmt_stats(stats)}", flush=True)

    # Main --------------------------------------------------------------------------------------

    def wait_settled(self, baseline: dict, seconds: float) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            stats = self.server.stats()
            if self.settled(baseline, stats) or time.monotonic() >= deadline:
                return stats
            time.sleep(0.25)

    def settled(self, baseline: dict, stats: dict) -> bool:
        return (stats["fds"] <= baseline["fds"] + self.args.fd_slack
                and stats["threads"] <= baseline["threads"] + self.args.thread_slack
                and stats["memfd_maps"] == 0
                and stats["rss_kb"] <= baseline["rss_kb"] + self.args.rss_slack_mib * 1024)

    def run(self) -> int:
        os.makedirs(WORKDIR, exist_ok=True)
        if not self.tcp and os.path.exists(self.path):
            os.unlink(self.path)
        options = []
        if self.tcp:
            options.append("events")
        if self.tls:
            self.make_pki()
            options.append(f"tls={self.pki_dir}")
        my_fds0 = len(os.listdir("/proc/self/fd"))
        mode = ("tls" if self.tls else "tcp" if self.tcp else "unix") + \
            ("+aio" if self.args.aio else "")
        print(f"hostile_peer: seed={self.seed} workers={self.args.workers} "
              f"seconds={self.args.seconds} mode={mode} address={self.path}\n"
              f"  server log: {self.log_path}", flush=True)
        self.code = code_state()
        print(f"  code under test: {self.code}", flush=True)
        server_env = list(self.args.server_env)
        if not self.args.glibc_defaults:
            # Fixed thresholds: freed large buffers go back to the kernel at once, so that the
            # final RSS comparison sees leaks, not glibc's retention (README: "RSS").
            server_env = ["MALLOC_MMAP_THRESHOLD_=131072",
                          "MALLOC_TRIM_THRESHOLD_=131072"] + server_env
        self.server = ServerProc(self.path, self.log_path, self.args.log_level,
                                 self.args.tracemalloc, server_env, aio=self.args.aio,
                                 sockaddr=self.sockaddr, options=options)
        print(f"  server environment: {self.server.env or 'glibc defaults'}", flush=True)
        self.t0 = time.monotonic()
        self.workers: list[Worker] = []
        # Warm up (first client, first shared-memory transfer), then let idle threads end.
        for _ in range(2):
            self.check_liveness("warm-up")
        time.sleep(2.5)
        self.mem_baseline = self.server.memstat()
        baseline = self.wait_settled(self.server.stats(), 0)
        print(f"baseline: {fmt_stats(baseline)} (server pid {self.server.pid}); "
              f"memstat {self.mem_baseline}", flush=True)
        if self.args.episode:
            return self.run_one(baseline)
        self.t_end = time.monotonic() + self.args.seconds
        self.workers = [Worker(self, i) for i in range(self.args.workers)]
        checker = threading.Thread(target=self.checker, name="checker", daemon=True)
        for w in self.workers:
            w.start()
        checker.start()
        while any(w.is_alive() for w in self.workers) and not self.stop.is_set():
            time.sleep(0.2)
        self.stop.set()
        self.hard_stop = time.monotonic() + 20
        for w in self.workers:
            w.join(30)
        stuck = [w.name for w in self.workers if w.is_alive()]
        checker.join(30)
        # Close every hostile socket still open (parked ones of stuck workers included).
        with Conn.registry_lock:
            leftovers = list(Conn.registry)
        for conn in leftovers:
            conn.closed = False
            conn.close()
        return self.finish(baseline, stuck, my_fds0)

    def run_one(self, baseline: dict) -> int:
        kind, _, seed = self.args.episode.partition(":")
        self.t_end = time.monotonic() + 60
        worker = Worker(self, 0)
        self.workers = [worker]
        print(f"running one episode: {kind} seed {seed}", flush=True)
        self.run_episode(worker, kind, int(seed))
        for e in worker.recent:
            print(json.dumps(e, indent=1))
        worker.expire(everything=True)
        return self.finish(baseline, [], None)

    def finish(self, baseline: dict, stuck: list, my_fds0) -> int:
        alive = self.server.alive()
        if alive:
            self.check_liveness("final")
        settled = self.wait_settled(baseline, 10.0) if alive else self.server.stats()
        self.final_mappings = top_mappings(self.server.pid) if alive else []
        self.mem_final = self.server.memstat() if alive else {}
        ok_resources = alive and self.settled(baseline, settled)
        rss_retained = False
        if alive and not ok_resources:
            # RSS alone over the slack, and back within it once malloc_trim(0) ran: memory
            # the C allocator keeps for reuse (freed, not leaked). Reported, not failed.
            trimmed = dict(settled, rss_kb=self.mem_final.get("rss_kb_after_trim", 1 << 40))
            base_trim = self.mem_baseline.get("rss_kb_after_trim", baseline["rss_kb"])
            if self.settled(dict(baseline, rss_kb=base_trim), trimmed):
                ok_resources = rss_retained = True
        if alive and not ok_resources:
            self.record_failure("resources", {
                "text": f"not back near baseline 10 s after the hostile connections closed: "
                        f"baseline {fmt_stats(baseline)}, now {fmt_stats(settled)}; "
                        f"memstat {self.mem_baseline} -> {self.mem_final}",
                "baseline": baseline, "final": settled})
        if alive:
            self.check_liveness("after settle")
        if self.args.keep_server:
            print(f"server left running: pid {self.server.pid}", flush=True)
            code = None
        else:
            code = self.server.stop()
        with open(self.log_path, errors="replace") as f:
            log = f.read().splitlines()
        tracebacks = sum(1 for line in log if "Traceback" in line)
        failed_lines = [line for line in log if "failed" in line]
        errors = [line for line in log if " ERROR " in line or " CRITICAL " in line
                  or "Fatal Python" in line]
        if tracebacks or errors:
            self.record_failure("server log", {
                "text": f"{tracebacks} tracebacks, {len(errors)} ERROR lines in {self.log_path}",
                "examples": errors[:20]})
        my_fds = len(os.listdir("/proc/self/fd"))
        summary = {
            "seed": self.seed, "workers": self.args.workers, "seconds": self.args.seconds,
            "mode": ("tls" if self.tls else "tcp" if self.tcp else "unix")
            + ("+aio" if self.args.aio else ""),
            "episodes": sum(self.counts.values()), "by_kind": dict(self.counts.most_common()),
            "seconds_by_kind": {k: round(v, 1) for k, v in self.kind_seconds.most_common()},
            "code": self.code, "server_env": self.server.env,
            "outcomes": dict(self.outcomes), "deviations": dict(self.deviations),
            "deviation_examples": self.deviation_examples,
            "liveness_checks": len(self.liveness),
            "liveness_failures": [e for e in self.liveness if not e["ok"]],
            "liveness_max_seconds": max((e["seconds"] for e in self.liveness), default=0),
            "baseline": baseline, "final": settled,
            "memstat_baseline": self.mem_baseline, "memstat_final": self.mem_final,
            "rss_retained_by_allocator": rss_retained,
            "top_rss_mappings_at_end": self.final_mappings,
            "traceback_groups": traceback_groups(log),
            "peak": {k: max((e[k] for e in self.timeline), default=None)
                     for k in ("fds", "threads", "rss_kb", "vm_kb", "memfd_maps")},
            "server_alive_at_end": alive, "server_exit_code": code, "stuck_workers": stuck,
            "log_tracebacks": tracebacks, "log_failed_lines": len(failed_lines),
            "log_failed_examples": failed_lines[:10], "log_error_lines": errors[:20],
            "fuzzer_errors": dict(self.fuzzer_errors),
            "fuzzer_fds": [my_fds0, my_fds],
            "failures": [{k: v for k, v in f.items() if k != "recent_episodes"}
                         for f in self.failures],
            "server_log": self.log_path,
        }
        with open(f"{self.out_prefix}-summary.json", "w") as f:
            json.dump(summary, f, indent=1, default=str)
        with open(f"{self.out_prefix}-timeline.json", "w") as f:
            json.dump(self.timeline, f)
        self.print_summary(summary)
        bad = bool(self.failures or stuck or not alive
                   or (self.args.strict and self.deviations))
        print(f"RESULT: {'FAIL' if bad else 'PASS'}  (details {self.out_prefix}-summary.json)",
              flush=True)
        return 1 if bad else 0

    @staticmethod
    def print_summary(s: dict) -> None:
        print("=" * 78)
        print(f"seed {s['seed']}, {s['mode']}, {s['workers']} workers, {s['seconds']} s: "
              f"{s['episodes']} episodes")
        print("  by kind: " + ", ".join(f"{k}={v}" for k, v in s["by_kind"].items()))
        print("  outcomes: " + ", ".join(f"{k}={v}" for k, v in s["outcomes"].items()))
        print(f"  code under test: {s['code']}")
        print(f"  liveness: {s['liveness_checks']} checks, "
              f"{len(s['liveness_failures'])} failed, slowest {s['liveness_max_seconds']} s")
        for e in s["liveness_failures"]:
            print(f"    at {e['t']} s ({e['label']}): {e['problems']}")
        b, f, p = s["baseline"], s["final"], s["peak"]
        print(f"  baseline: {fmt_stats(b)}")
        print(f"  final:    {fmt_stats(f)}")
        print(f"  peak:     fds={p['fds']} threads={p['threads']} "
              f"rss={(p['rss_kb'] or 0) / 1024:.1f}MiB vm={(p['vm_kb'] or 0) / 1024:.0f}MiB "
              f"memfd_maps={p['memfd_maps']}")
        mb, mf = s["memstat_baseline"], s["memstat_final"]
        if mb and mf:
            print(f"  memstat:  python blocks {mb['blocks']} -> {mf['blocks']}, gc objects "
                  f"{mb['gc_objects']} -> {mf['gc_objects']}, rss after malloc_trim "
                  f"{mb['rss_kb_after_trim'] / 1024:.1f} -> {mf['rss_kb_after_trim'] / 1024:.1f}"
                  f" MiB{' (RSS over the slack only until malloc_trim: allocator-retained)' if s['rss_retained_by_allocator'] else ''}")
        print(f"  server alive at end: {s['server_alive_at_end']}, exit code after SIGTERM: "
              f"{s['server_exit_code']}")
        print(f"  server log: {s['log_tracebacks']} 'Traceback', {s['log_failed_lines']} "
              f"'failed' lines, {len(s['log_error_lines'])} ERROR lines ({s['server_log']})")
        for group, n in s["traceback_groups"]:
            print(f"    {n:5d} x {group}")
        if s["deviations"]:
            print("  protocol deviations (the server's answer differs from the spec model):")
            for k, v in sorted(s["deviations"].items(), key=lambda kv: -kv[1]):
                ex = s["deviation_examples"][k]
                print(f"    {v:6d} x {ex['text'][:200]}  [e.g. {ex['kind']}:{ex['seed']}]")
        if s["fuzzer_errors"]:
            print(f"  fuzzer errors: {s['fuzzer_errors']}")
        print(f"  fuzzer's own fds: {s['fuzzer_fds']}")
        for f in s["failures"]:
            print(f"  FAILURE {f['what']} at {f['t']} s: {str(f.get('text'))[:300]}")
            if "repro" in f:
                print(f"    repro: {f['repro']}")
        print("=" * 78)


def traceback_groups(lines: list) -> list:
    """Tracebacks in a server log, grouped by the line logged before them, their innermost
    frames and their exception type."""
    import re
    groups: collections.Counter = collections.Counter()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("Traceback"):
            i += 1
            continue
        start, j, frames = i, i + 1, []
        while j < len(lines) and (lines[j].startswith("  ") or not lines[j]
                                  or lines[j].startswith("Traceback")
                                  or lines[j].startswith("The above") or lines[j].startswith(
                                      "During handling") or re.match(r"^\w[\w.]*(Error|Exception|Closed|Exit)\b", lines[j])):
            if lines[j].startswith("  File"):
                frames.append(re.sub(r'.*/([\w.]+)", line (\d+), in (\S+)', r"\1:\2 \3",
                                     lines[j]))
            j += 1
        exc = lines[j - 1].split(":")[0] if j > start else "?"
        before = lines[start - 1] if start else ""
        message = re.sub(r"\d+", "N", before.split(": ", 1)[-1])[:60]
        groups[f"{message} | {' > '.join(frames[-2:])} | {exc}"] += 1
        i = j
    return groups.most_common()


def code_state() -> str:
    """The commit under test, and whether hintens/ has local changes (read-only git)."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--short", "--", "hintens"],
                               capture_output=True, text=True, timeout=10).stdout.split()
        return f"{head}{' + local changes to ' + ' '.join(dirty[1::2]) if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--aio", action="store_true",
                        help="attack hintens.aio.Server (the asyncio server) instead of the "
                             "sync one")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--socket", help="socket path (default: under /tmp/hx-fuzz)")
    parser.add_argument("--tcp", action="store_true",
                        help="the server listens on tcp://127.0.0.1:PORT and every worker "
                             "attacks over TCP (no shared memory, no fd passing)")
    parser.add_argument("--tls", action="store_true",
                        help="as --tcp, inside mutual TLS (certificates from trustme), plus "
                             "the TLS episodes")
    parser.add_argument("--port", type=int, default=0,
                        help="--tcp/--tls port (default: a free one)")
    parser.add_argument("--kinds", help="comma-separated episode kinds (default: all of the "
                                        "mode's): " + ",".join(
                                            {**EPISODES, **TCP_EPISODES, **TLS_EPISODES}))
    parser.add_argument("--episode", metavar="KIND:SEED",
                        help="run one episode against a fresh server, then the final checks")
    parser.add_argument("--check-every", type=float, default=3.0)
    parser.add_argument("--print-every", type=float, default=30.0)
    parser.add_argument("--fd-slack", type=int, default=3)
    parser.add_argument("--thread-slack", type=int, default=1)
    parser.add_argument("--rss-slack-mib", type=int, default=64)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace the server's allocations; the top sites go to its log "
                             "at the baseline and at the end (slow)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server (e.g. MALLOC_ARENA_MAX=1)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="run the server with glibc's dynamic malloc thresholds (RSS then "
                             "stays high after large transfers: allocator retention)")
    parser.add_argument("--keep-server", action="store_true",
                        help="leave the server running at the end (for inspection)")
    parser.add_argument("--strict", action="store_true",
                        help="also fail on protocol deviations")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    os.makedirs(WORKDIR, exist_ok=True)
    fz = Fuzzer(args)
    try:
        return fz.run()
    finally:
        server = getattr(fz, "server", None)
        if server is not None and server.proc.poll() is None and not args.keep_server:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
