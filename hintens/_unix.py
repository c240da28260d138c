"""Unix domain socket plumbing shared by Client and Server: paths, connect, bind, credentials.

Blocking sockets with kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO) are used instead of Python's
socket timeouts, because a Python timeout costs a poll() before every recv and send.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from typing import NamedTuple

from ._errors import ConnectError, ServerRunningError, SocketPathError, Timeout

log = logging.getLogger("hintens")

DEFAULT_SOCKET_PATH = "/tmp/hintens.sock"
#: sun_path holds 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
_TIMEVAL = struct.Struct("@ll")
_UCRED = struct.Struct("@iII")


class PeerCredentials(NamedTuple):
    """Who is at the other end of a Unix socket, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int


def socket_path(path: str | os.PathLike[str] | None) -> str:
    """Resolve and check a socket path: ``path``, else ``$HINTENS_SOCKET``, else the default.

    Raises:
        SocketPathError: the path is empty or longer than the OS allows.
    """
    resolved = os.fspath(path) if path is not None else (
        os.environ.get("HINTENS_SOCKET") or DEFAULT_SOCKET_PATH)
    size = len(os.fsencode(resolved))
    if size == 0:
        raise SocketPathError("the socket path is empty")
    if size > MAX_SOCKET_PATH_BYTES:
        raise SocketPathError(
            f"socket path is {size} bytes long; Linux allows at most {MAX_SOCKET_PATH_BYTES} "
            f"bytes (sun_path): {resolved!r}")
    return resolved


def set_kernel_timeouts(sock: socket.socket, receive_s: float | None,
                        send_s: float | None = None) -> None:
    """Set SO_RCVTIMEO (and SO_SNDTIMEO); None or 0 means wait forever."""
    for option, seconds in ((socket.SO_RCVTIMEO, receive_s), (socket.SO_SNDTIMEO, send_s)):
        if seconds is None and option == socket.SO_SNDTIMEO:
            continue
        micros = 0 if not seconds else max(1000, int(seconds * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(micros // 1_000_000,
                                                                 micros % 1_000_000))


def connect(path: str, timeout_s: float | None) -> socket.socket:
    """Connect a blocking stream socket to ``path``.

    Raises:
        ConnectError: no socket file, nobody listening, or permission denied.
        Timeout: the server's accept queue stayed full for ``timeout_s``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.settimeout(None)
    except FileNotFoundError as error:
        sock.close()
        raise ConnectError(f"no hintens server at {path}: the socket file does not exist") from error
    except ConnectionRefusedError as error:
        sock.close()
        raise ConnectError(f"no hintens server at {path}: nothing is listening there") from error
    except PermissionError as error:
        sock.close()
        raise ConnectError(f"permission denied connecting to {path}") from error
    except socket.timeout as error:
        sock.close()
        raise Timeout(f"connecting to {path} took longer than {timeout_s} s") from error
    except OSError as error:
        sock.close()
        raise ConnectError(f"cannot connect to {path}: {error.strerror or error}") from error
    return sock


def _clear_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket file %s", path)
        os.unlink(path)
        return
    except socket.timeout:
        pass  # alive, with a full accept queue
    finally:
        probe.close()
    raise ServerRunningError(errno.EADDRINUSE, f"another server is listening on {path}", path)


def listen(path: str, *, mode: int, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen on ``path`` with file mode ``mode``.

    A stale socket file (nobody listening) is replaced; a live one is refused. The mode is set
    before listen(), so no connect can succeed while the file still has the umask's mode.

    Returns:
        The listening socket, and the (st_dev, st_ino) of its file, to remove only our own.

    Raises:
        ServerRunningError: another server is listening on ``path``.
        SocketPathError: ``path`` exists and is not a socket.
        OSError: bind failed (for example, no such directory).
    """
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        info = os.stat(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, (info.st_dev, info.st_ino)


def remove_socket_file(path: str, identity: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the file we bound (not a successor's)."""
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connecting process's pid, uid and gid (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))
