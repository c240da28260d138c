"""Unix domain socket plumbing shared by Client and Server: paths, connect, bind, credentials.

Blocking sockets with kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO) are used instead of Python's
socket timeouts, because a Python timeout costs a poll() before every recv and send.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import stat
import struct
from typing import NamedTuple

from .._errors import (
    ConnectError,
    ServerRunningError,
    SocketPathError,
    Timeout,
    UntrustedServerError,
)

log = logging.getLogger("hintens")

#: The socket's name in the per-user directory chosen by ``default_socket_path``.
SOCKET_NAME = "hintens.sock"
#: Where the per-user fallback directory ``hintens-$UID`` lives when $XDG_RUNTIME_DIR does not
#: serve. Fixed (not $TMPDIR), so that clients and servers started from different
#: environments agree on it.
FALLBACK_PARENT = "/tmp"
#: sun_path holds 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
_TIMEVAL = struct.Struct("@ll")
_UCRED = struct.Struct("@iII")


class PeerCredentials(NamedTuple):
    """Who is at the other end of a Unix socket, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int


# The public name, hintens.PeerCredentials, for help() and pickles. Set after the class: a
# NamedTuple's body may hold only its fields (for mypy).
PeerCredentials.__module__ = "hintens"


def _private_dir_problem(path: str, uid: int) -> str | None:
    """Why ``path`` is not a directory that only ``uid`` controls (None when it is)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "it does not exist"
    except OSError as error:
        return f"it cannot be examined ({error.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != uid:
        return f"it belongs to uid {info.st_uid}, not {uid}"
    if info.st_mode & 0o077:
        return f"its mode is 0o{stat.S_IMODE(info.st_mode):o}: other users can use it"
    return None


def default_socket_path(*, create: bool = False) -> str:
    """The per-user default: ``$XDG_RUNTIME_DIR/hintens.sock``, else
    ``/tmp/hintens-$UID/hintens.sock``.

    ``$XDG_RUNTIME_DIR`` is used only if it is a directory of this user's that nobody else may
    use. The fallback directory is created (mode 0700) when ``create`` is set, and it is
    checked every time: a directory owned by another user, open to others, or a symbolic
    link is refused, because whoever controls it could put a socket of their own there.

    Raises:
        SocketPathError: the fallback directory exists but is not safe, or cannot be made.
    """
    uid = os.geteuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        problem = _private_dir_problem(runtime, uid)
        if problem is None:
            return os.path.join(runtime, SOCKET_NAME)
        log.warning("ignoring XDG_RUNTIME_DIR=%s: %s", runtime, problem)
    directory = os.path.join(FALLBACK_PARENT, f"hintens-{uid}")
    if create:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as error:
            raise SocketPathError(f"cannot create the socket directory {directory}: "
                                  f"{error.strerror}") from error
    problem = _private_dir_problem(directory, uid)
    if problem is not None and problem != "it does not exist":
        raise SocketPathError(f"refusing the default socket directory {directory}: {problem}. "
                              f"Remove it, or pass a socket path")
    return os.path.join(directory, SOCKET_NAME)


def socket_path(path: str | os.PathLike[str] | None, *, create_dir: bool = False) -> str:
    """Resolve and check a socket path: ``path``, else ``$HINTENS_SOCKET``, else the per-user
    default (``default_socket_path``, whose directory a server creates).

    Raises:
        SocketPathError: the path is empty or longer than the OS allows, or the default
            directory is not safe.
    """
    if path is not None:
        resolved = os.fspath(path)
    else:
        resolved = os.environ.get("HINTENS_SOCKET") or default_socket_path(create=create_dir)
    size = len(os.fsencode(resolved))
    if size == 0:
        raise SocketPathError("the socket path is empty")
    if size > MAX_SOCKET_PATH_BYTES:
        raise SocketPathError(
            f"socket path is {size} bytes long; Linux allows at most {MAX_SOCKET_PATH_BYTES} "
            f"bytes (sun_path): {resolved!r}")
    return resolved


def _timeval(seconds: float | None) -> bytes:
    # 0 means "no timeout" to the kernel; so does None or inf here.
    micros = 0 if not seconds or math.isinf(seconds) else max(1000, int(seconds * 1e6))
    return _TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000)


def set_kernel_timeouts(sock: socket.socket, receive_s: float | None,
                        send_s: float | None = None, *, set_send: bool | None = None) -> None:
    """Set SO_RCVTIMEO (and SO_SNDTIMEO when ``send_s`` is given or ``set_send``); None, 0 or
    inf means wait for ever."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(receive_s))
    if send_s is not None or set_send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_s))


def connect(path: str, timeout_s: float | None) -> socket.socket:
    """Connect a blocking stream socket to ``path``.

    A full accept queue is waited out in the kernel (SO_SNDTIMEO bounds connect on a Unix
    socket, and the kernel wakes us when the queue has room), for at most ``timeout_s``.

    Raises:
        ConnectError: no socket file, nobody listening, or permission denied.
        Timeout: the server's accept queue stayed full for ``timeout_s``.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        set_kernel_timeouts(sock, None, timeout_s, set_send=True)
        sock.connect(path)
    except FileNotFoundError as error:
        sock.close()
        raise ConnectError(f"no hintens server at {path}: the socket file does not exist") from error
    except ConnectionRefusedError as error:
        sock.close()
        raise ConnectError(f"no hintens server at {path}: nothing is listening there") from error
    except PermissionError as error:
        sock.close()
        raise ConnectError(f"permission denied connecting to {path}") from error
    except BlockingIOError as error:   # EAGAIN: the accept queue stayed full
        sock.close()
        raise Timeout(f"connecting to {path} took longer than {timeout_s} s: the server's "
                      f"accept queue stayed full") from error
    except OSError as error:
        sock.close()
        raise ConnectError(f"cannot connect to {path}: {error.strerror or error}") from error
    return sock


def check_server(sock: socket.socket, path: str, trusted_uids: set[int]) -> PeerCredentials:
    """Refuse a server whose uid is not trusted (SO_PEERCRED, read right after connect, before
    a byte is sent): the same uid as ours, root, or one of ``trusted_uids``.

    Raises:
        UntrustedServerError: the server runs as another uid.
    """
    peer = peer_credentials(sock)
    if peer.uid in trusted_uids or peer.uid in (0, os.geteuid()):
        return peer
    raise UntrustedServerError(
        f"the server at {path} runs as uid {peer.uid} (pid {peer.pid}), which this client "
        f"does not trust: only uid {os.geteuid()}, root and server_uids="
        f"{sorted(trusted_uids)} are. Pass server_uids=[{peer.uid}] if it is the server you "
        f"meant")


def warn_if_replaceable(path: str) -> None:
    """Log a warning when others may replace the socket file: its directory is writable by
    other users and has no sticky bit, so they can unlink it and bind their own."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except OSError:
        return
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        log.warning("the socket directory %s is writable by other users and has no sticky "
                    "bit: they can remove %s and bind their own in its place. Use a private "
                    "directory", directory, os.path.basename(path))


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
    except (socket.timeout, BlockingIOError):
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
    identity: tuple[int, int] | None = None
    try:
        sock.bind(path)
        info = os.lstat(path)
        identity = (info.st_dev, info.st_ino)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        if identity is not None:   # ours: leave no socket file behind
            remove_socket_file(path, identity)
        raise
    warn_if_replaceable(path)
    return sock, identity


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


def socket_alive(sock: socket.socket) -> bool:
    """Whether the peer of a connected socket has not hung up: one poll for POLLRDHUP, at
    once, reading nothing. False for a closed socket."""
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLRDHUP)
    except ValueError:   # closed meanwhile: fileno() is -1
        return False
    return not poller.poll(0)
