"""TCP plumbing: ``tcp://host:port`` addresses, connect, listen, and the socket options every
hintens TCP connection gets (TCP_NODELAY: the outbox does the batching; keepalive, so that a
peer that vanished is noticed on an idle connection).

Blocking sockets with kernel timeouts, as for Unix sockets (``transport/unix.py``). Over TCP
there is no shared memory and no SO_PEERCRED: any host that can reach a server's port can
call it, unless TLS with client certificates is configured.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import NamedTuple

from .._errors import ConnectError, SocketPathError, Timeout

log = logging.getLogger("hintens")

PREFIX = "tcp://"
#: A server address without a host binds this one: only this machine may connect.
DEFAULT_HOST = "127.0.0.1"
#: Keepalive: the first probe after this many idle seconds, then one every
#: KEEPALIVE_INTERVAL_S, and the connection is dropped after KEEPALIVE_PROBES unanswered
#: ones: a peer that vanished from an idle connection is noticed within about a minute.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3


class TcpAddress(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{PREFIX}{host}:{self.port}"


def is_tcp(address: str) -> bool:
    return address.startswith(PREFIX)


def parse(address: str, *, server: bool = False) -> TcpAddress:
    """``tcp://host:port`` (an IPv6 host in brackets: ``tcp://[::1]:7400``) as host and port.
    A server's address may leave the host out (``tcp://:7400``): it binds ``DEFAULT_HOST``.

    Raises:
        SocketPathError: not of that form, or a port outside 0..65535 (0, for a server only:
            any free port).
    """
    rest = address[len(PREFIX):]
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise SocketPathError(f"{address!r}: an IPv6 host goes in brackets, then :port, "
                                  f"as in tcp://[::1]:7400")
        port_text = tail[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise SocketPathError(f"{address!r} has no port: tcp://host:port")
        if ":" in host:
            raise SocketPathError(f"{address!r}: an IPv6 host goes in brackets, as in "
                                  f"tcp://[::1]:7400")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise SocketPathError(f"{address!r}: the port must be a number from 0 to 65535")
    port = int(port_text)
    if not host:
        if not server:
            raise SocketPathError(f"{address!r} has no host: tcp://host:port")
        host = DEFAULT_HOST
    if port == 0 and not server:
        raise SocketPathError(f"{address!r}: a client needs the server's port, not 0")
    return TcpAddress(host, port)


def configure(sock: socket.socket) -> None:
    """TCP_NODELAY and keepalive on a connected TCP socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def connect(address: str, timeout_s: float | None) -> socket.socket:
    """A blocking TCP socket connected to ``address`` (``tcp://host:port``), configured.

    Raises:
        ConnectError: the host name does not resolve (naming it), the connection was refused
            or the host is unreachable.
        Timeout: no connection within ``timeout_s``.
        SocketPathError: ``address`` is malformed.
    """
    host, port = parse(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConnectError(f"cannot connect to {address}: the host name {host!r} does not "
                           f"resolve ({error.strerror})") from error
    last: OSError | None = None
    for family, kind, proto, _, target in infos:
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        try:
            sock.settimeout(timeout_s)
            sock.connect(target)
            sock.settimeout(None)   # blocking again: kernel timeouts from here on
            configure(sock)
            return sock
        except OSError as error:
            sock.close()
            last = error
    if isinstance(last, (socket.timeout, TimeoutError)):
        raise Timeout(f"connecting to {address} took longer than {timeout_s} s") from last
    if isinstance(last, ConnectionRefusedError):
        raise ConnectError(f"no hintens server at {address}: the connection was refused "
                           f"(nothing listens on that port)") from last
    reason = getattr(last, "strerror", None) or last
    raise ConnectError(f"cannot connect to {address}: {reason}") from last


def listen(address: str, *, backlog: int, secure: bool) -> tuple[socket.socket, str]:
    """Bind and listen on ``address``. A non-loopback host without TLS (``secure`` False)
    logs a warning: any host that can reach the port may call the server.

    Returns:
        The listening socket, and its address as ``tcp://host:port`` (the port the kernel
        chose, for port 0).

    Raises:
        SocketPathError: ``address`` is malformed.
        OSError: the address is in use, or cannot be bound.
    """
    host, port = parse(address, server=True)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, target = infos[0]
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    bound = TcpAddress(host, sock.getsockname()[1])
    if not secure and not _loopback(host):
        log.warning("listening on %s without TLS: any host that can reach this port can "
                    "call the server", bound)
    return sock, str(bound)


def peer_address(sock: socket.socket) -> str:
    """The connected peer as ``tcp://host:port``."""
    peer = sock.getpeername()
    return str(TcpAddress(peer[0], peer[1]))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
