"""Addresses: where a client connects and a server listens, whatever the transport.

* a plain path, or ``unix:/path``: a Unix socket (``transport/unix.py``), with shared memory
  and SO_PEERCRED;
* ``tcp://host:port`` (``tcp://[::1]:7400`` for IPv6): TCP (``transport/tcp.py``), without
  either.

Front ends resolve an address once (``resolve``), then connect or listen through here, and ask
``is_tcp`` where the two differ.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any, NamedTuple

from . import tcp, tls, unix
from .tcp import is_tcp
from .unix import PeerCredentials

UNIX_PREFIX = "unix:"
#: The credentials a TCP peer has: none (no SO_PEERCRED across hosts).
NO_CREDENTIALS = PeerCredentials(-1, -1, -1)

__all__ = ["Listener", "NO_CREDENTIALS", "accepted", "connect", "is_tcp", "listen",
           "resolve", "server_check"]


def resolve(address: str | os.PathLike[str] | None, *, server: bool = False) -> str:
    """An address in the form the rest of the library uses: a Unix socket path (the default
    rules of ``unix.socket_path`` when None; ``unix:`` stripped) or ``tcp://host:port``.

    Raises:
        SocketPathError: a malformed TCP address, or an unusable socket path.
    """
    if isinstance(address, str):
        if is_tcp(address):
            return str(tcp.parse(address, server=server))
        if address.startswith(UNIX_PREFIX):
            address = address[len(UNIX_PREFIX):]
    return unix.socket_path(address, create_dir=server)


def connect(address: str, timeout_s: float | None,
            ssl_context: ssl.SSLContext | None = None) -> Any:
    """A blocking stream socket connected to ``address`` (resolved); with ``ssl_context``
    (TCP only), a ``TlsStream`` whose handshake is done.

    Raises:
        ConnectError, Timeout: as ``unix.connect`` and ``tcp.connect``; ConnectError for a
            TLS handshake that failed, naming the reason.
        ValueError: ``ssl_context`` with a Unix socket address.
    """
    if is_tcp(address):
        sock = tcp.connect(address, timeout_s)
        if ssl_context is None:
            return sock
        return tls.client_stream(sock, ssl_context, tcp.parse(address).host, address,
                                 timeout_s)
    if ssl_context is not None:
        raise ValueError(f"ssl_context is for tcp:// addresses, not the Unix socket {address}")
    return unix.connect(address, timeout_s)


def check_ssl_context(address: str, ssl_context: Any) -> None:
    """Refuse an ``ssl_context`` that is not one, or that comes with a Unix socket address.

    Raises:
        TypeError, ValueError: as said.
    """
    if ssl_context is None:
        return
    if not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext, not "
                        f"{type(ssl_context).__name__}")
    if not is_tcp(address):
        raise ValueError(f"ssl_context is for tcp:// addresses, not the Unix socket {address}")


def server_check(sock: socket.socket, address: str,
                 trusted_uids: set[int]) -> PeerCredentials | None:
    """The server's credentials, checked (``unix.check_server``); None over TCP, where there
    are none to check.

    Raises:
        UntrustedServerError: as ``unix.check_server``.
    """
    if is_tcp(address):
        return None
    return unix.check_server(sock, address, trusted_uids)


class Listener(NamedTuple):
    """A listening socket (non-blocking) and what it listens on.

    Attributes:
        sock: the socket.
        address: a Unix path, or ``tcp://host:port`` with the port actually bound.
        identity: a Unix socket file's (st_dev, st_ino), to remove only our own; None for TCP.
    """

    sock: socket.socket
    address: str
    identity: tuple[int, int] | None

    @property
    def tcp(self) -> bool:
        return self.identity is None

    def close(self) -> None:
        """Stop listening; a Unix socket's file goes too (if it is still ours)."""
        self.sock.close()
        if self.identity is not None:
            unix.remove_socket_file(self.address, self.identity)


def listen(address: str, *, mode: int, backlog: int, secure: bool = False) -> Listener:
    # (secure: TLS will wrap what this TCP listener accepts; no warning for a public host)
    """Listen on ``address`` (resolved).

    Raises:
        As ``unix.listen`` and ``tcp.listen``.
    """
    if is_tcp(address):
        sock, bound = tcp.listen(address, backlog=backlog, secure=secure)
        listener = Listener(sock, bound, None)
    else:
        sock, identity = unix.listen(address, mode=mode, backlog=backlog)
        listener = Listener(sock, address, identity)
    listener.sock.setblocking(False)
    return listener


def accepted(listener: Listener, sock: socket.socket) -> tuple[PeerCredentials, str]:
    """An accepted socket's peer: its credentials (``NO_CREDENTIALS`` over TCP) and address
    (``tcp://host:port``, or ``unix:`` and the listener's path). A TCP socket is configured
    (``tcp.configure``).

    Raises:
        OSError: the peer is gone already.
    """
    if listener.tcp:
        tcp.configure(sock)
        return NO_CREDENTIALS, tcp.peer_address(sock)
    return unix.peer_credentials(sock), UNIX_PREFIX + listener.address
