"""TLS over TCP: ``TlsStream`` wraps an ``ssl.SSLSocket`` for the Channel, so that the same
frames, batching and drivers run encrypted.

- The compiled Channel drives OpenSSL's object itself (``tls_parts``): its reads and writes
  are C calls, with no Python in between (hintens/transport/_channel.pyx).
- The pure-Python Channel (the twin core, or a Python without ``SSLSocket._sslobj``) uses
  the socket interface this class gives (``recvmsg_into``, ``send``, ``sendmsg``...).

The socket underneath is non-blocking; blocking calls wait in ``poll()`` for as long as the
receive or send timeout the driver set (SO_RCVTIMEO / SO_SNDTIMEO, kept here instead of in the
kernel), and raise ``BlockingIOError`` when it passes, as a plain socket does. One lock keeps
OpenSSL's object to one thread at a time; nobody holds it while waiting.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct
import threading
from time import monotonic
from typing import Any, Callable

from .._constants import MSG_DONTWAIT
from .._errors import ConnectError


log = logging.getLogger("hintens")

#: What one write hands OpenSSL at most: 16 TLS records (OpenSSL cuts them), so that a large
#: frame costs a Python call per 256 KiB rather than per 16 KiB record. A write that must be
#: retried is retried with the same bytes, as OpenSSL requires; small buffers are joined into
#: one record's worth at most, never more (a 64 MiB frame's payload is never copied).
_WRITE_BYTES = 256 * 1024
_RECORD_BYTES = 16384
_TIMEVAL = struct.Struct("@ll")
_EVENTS_READ = select.POLLIN | select.POLLPRI
_EVENTS_WRITE = select.POLLOUT
#: How long a server's TLS handshake may take when it has no frame_timeout.
HANDSHAKE_TIMEOUT_S = 10.0
#: How long a client waits, after its side of the handshake, for the server's first bytes
#: (a hintens server's hello): a refusal of its certificate comes instead of them.
PREFETCH_S = 1.0


def _seconds(timeval: bytes) -> float | None:
    seconds, micros = _TIMEVAL.unpack(timeval)
    total = seconds + micros / 1e6
    return total or None


class TlsStream:
    """An ``ssl.SSLSocket`` (non-blocking underneath) with the interface of a blocking socket
    with kernel timeouts.

    Args:
        ssl_sock: a connected, wrapped socket; its handshake may still be to do
            (``handshake``), or is done.
        verify: called with ``ssl_sock`` once the handshake is done; raises to refuse the
            peer (a certificate subject not allowed, say).
    """

    def __init__(self, ssl_sock: ssl.SSLSocket,
                 verify: Callable[[ssl.SSLSocket], None] | None = None) -> None:
        ssl_sock.setblocking(False)
        self._ssl = ssl_sock
        self._verify = verify
        self._lock = threading.Lock()
        self._receive_s: float | None = None
        self._send_s: float | None = None
        self._closed = False
        self._broke = False   # a call failed in a way that leaves the stream unusable
        self._early = b""   # bytes read ahead (``prefetch``), served first

    @property
    def channel_class(self) -> Any:
        """The Channel that can drive this stream: the compiled core's, which drives OpenSSL
        itself (``tls_parts``); else the pure-Python one, with the core's frame encoders.
        (``SSLSocket._sslobj``, ssl's object underneath, is private to the ssl module; it is
        there on every Python hintens supports, and were it not, the pure-Python Channel
        would serve.)"""
        from .. import _impl

        if getattr(self._ssl, "_sslobj", None) is not None \
                and _impl.core.DRIVES_TLS:
            return _impl.core.Channel
        return _tls_channel_class()

    def tls_parts(self) -> tuple[Any, bytes]:
        """For a Channel that drives OpenSSL itself: ssl's object under the ``SSLSocket``
        (its ``read``, ``write`` and ``pending``), and the bytes read ahead, which it serves
        first. From then on only that Channel reads and writes; the timeouts it waits within
        are the kernel's (``setsockopt`` sets them there too), and ``pending`` is its.

        Returns:
            ``(ssl object, bytes read ahead)``.
        """
        early, self._early = self._early, b""
        return getattr(self._ssl, "_sslobj"), early   # (private to ssl: see channel_class)

    # Handshake --------------------------------------------------------------------------

    def handshake(self, timeout_s: float | None) -> None:
        """Do the TLS handshake, waiting at most ``timeout_s`` for the peer, then ``verify``.

        Raises:
            ssl.SSLError: the handshake failed (the reason says why).
            TimeoutError: the peer took longer.
            OSError: the connection broke.
        """
        self._until(lambda: (None, self.handshake_step()), timeout_s, False,
                    TimeoutError(errno.ETIMEDOUT, "the TLS handshake took too long"))

    def handshake_step(self) -> int | None:
        """One step of a non-blocking handshake: None when it is done (and the peer
        verified), else the poll events to wait for before the next step.

        Raises:
            As ``handshake``.
        """
        try:
            with self._lock:
                self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return _EVENTS_READ
        except ssl.SSLWantWriteError:
            return _EVENTS_WRITE
        if self._verify is not None:
            verify, self._verify = self._verify, None
            verify(self._ssl)
        return None

    def subject(self) -> str | None:
        """The peer certificate's subject, as ``CN=...,O=...`` (None without one)."""
        cert = self._ssl.getpeercert()
        return subject_of(cert) if cert else None

    # The socket interface the Channel uses ------------------------------------------------

    def fileno(self) -> int:
        return -1 if self._closed else self._ssl.fileno()

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        # The timeouts are kept here for this class's waits, and set on the socket too for a
        # Channel that waits itself (tls_parts); the descriptor is non-blocking, so the kernel
        # does not apply them.
        if level == socket.SOL_SOCKET and option == socket.SO_RCVTIMEO:
            self._receive_s = _seconds(value)
        elif level == socket.SOL_SOCKET and option == socket.SO_SNDTIMEO:
            self._send_s = _seconds(value)
        self._ssl.setsockopt(level, option, value)

    def getsockopt(self, *args: Any) -> Any:
        return self._ssl.getsockopt(*args)

    def getpeername(self) -> Any:
        return self._ssl.getpeername()

    def setblocking(self, flag: bool) -> None:
        """Blocking or not, the calls behave the same: they wait within the timeouts."""

    def pending(self) -> bool:
        """Decrypted bytes wait inside OpenSSL (or here): the descriptor will not say so."""
        return not self._closed and (bool(self._early) or self._ssl.pending() > 0)

    def prefetch(self, timeout_s: float) -> None:
        """Read what the peer sends first (a hintens server's hello), for ``timeout_s`` at
        most, keeping it for the first reads. Under TLS 1.3 a server refuses a client's
        certificate only after the client's side of the handshake is done: the alert comes
        instead of those bytes, and is raised here rather than on a later request.

        Raises:
            ssl.SSLError: the server refused the handshake after all.
            OSError: the connection broke.
        """
        buffer = bytearray(65536)
        count = self._until(lambda: self._read_some(memoryview(buffer)), timeout_s, False, None)
        if count is not None:
            self._early += bytes(buffer[:count])

    def recvmsg_into(self, buffers: list[Any], ancbufsize: int = 0,
                     flags: int = 0) -> tuple[int, list[Any], int, Any]:
        """Read what is there into ``buffers[0]`` (at least one byte, waiting for it unless
        MSG_DONTWAIT), as many records as it holds; 0 at the end of the stream.

        Raises:
            BlockingIOError: nothing came within the receive timeout (or now, MSG_DONTWAIT).
            OSError: the connection broke; ssl.SSLError: the peer broke TLS.
        """
        view = memoryview(buffers[0]).cast("B")
        if self._early:
            count = min(len(view), len(self._early))
            view[:count] = self._early[:count]
            self._early = self._early[count:]
            return count, [], 0, None
        count = self._until(lambda: self._read_some(view), self._receive_s,
                            bool(flags & MSG_DONTWAIT),
                            BlockingIOError(errno.EAGAIN, "the receive timeout expired"))
        return count, [], 0, None

    def _read_some(self, view: memoryview) -> tuple[int, int | None]:
        # (bytes read, None) when done, or (0, events to wait for) when nothing was there.
        count = 0
        if self._broke:
            return 0, None   # its end (decrypted bytes OpenSSL may hold would not follow on)
        with self._lock:
            while count < len(view):
                try:
                    got = self._ssl.recv_into(view[count:])
                except ssl.SSLWantReadError:
                    return (count, None) if count else (0, _EVENTS_READ)
                except ssl.SSLWantWriteError:
                    return (count, None) if count else (0, _EVENTS_WRITE)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return count, None   # the end (the next read says 0)
                except BaseException:
                    self._break_stream()
                    raise
                if not got:
                    return count, None
                count += got
                if not self._ssl.pending() and got < _RECORD_BYTES:
                    # The rest, if any, is news the descriptor will tell. (OpenSSL reads a
                    # record at a time: after a full one, more usually waits in the socket,
                    # and taking it now saves a pass through the channel per 16 KiB.)
                    return count, None
        return count, None

    def send(self, data: Any, flags: int = 0) -> int:
        """Write some of ``data`` (256 KiB at most), waiting within the send timeout.

        Raises:
            BlockingIOError: the peer took nothing within the send timeout (or now,
                MSG_DONTWAIT); the same bytes must be written again.
            OSError: the connection broke.
        """
        chunk = memoryview(data).cast("B")[:_WRITE_BYTES]
        sent: int = self._until(lambda: self._write_some(chunk), self._send_s,
                                bool(flags & MSG_DONTWAIT),
                                BlockingIOError(errno.EAGAIN, "the send timeout expired"))
        return sent

    def _write_some(self, chunk: memoryview) -> tuple[int, int | None]:
        # (bytes written, None), or (0, events to wait for) when OpenSSL could not go on.
        if self._broke:
            raise BrokenPipeError(errno.EPIPE, "the TLS stream broke")
        try:
            with self._lock:
                return self._ssl.send(chunk), None
        except ssl.SSLWantWriteError:
            return 0, _EVENTS_WRITE
        except ssl.SSLWantReadError:
            return 0, _EVENTS_READ
        except ssl.SSLEOFError as error:
            raise BrokenPipeError(errno.EPIPE, f"the peer closed the TLS stream: {error}") \
                from error
        except BaseException:
            self._break_stream()
            raise

    def _break_stream(self) -> None:
        # An OpenSSL call raised something other than "wait" or "ended": TLS broke, or a
        # signal handler's exception came after the call had sent or taken bytes (ssl looks
        # at signals after the call). Which bytes is unknown: the stream ends here.
        self._broke = True
        try:
            socket.socket.shutdown(self._ssl, socket.SHUT_RDWR)
        except OSError:
            pass

    def _until(self, step: Callable[[], tuple[Any, int | None]], seconds: float | None,
               now_only: bool, expired: BaseException | None) -> Any:
        """``step()`` until it has a result (its wait is None), polling for the events it
        asks for between tries, for ``seconds`` at most (None: for ever). Then ``expired``
        is raised (None: None is returned). ``now_only`` (MSG_DONTWAIT): no wait at all.

        Raises:
            BlockingIOError: ``now_only``, and ``step`` had to wait.
        """
        deadline = None if seconds is None else monotonic() + seconds
        while True:
            result, wait = step()
            if wait is None:
                return result
            if now_only:
                raise BlockingIOError(errno.EAGAIN, "nothing can be done now")
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                if expired is None:
                    return None
                # Raised from a local, the error's traceback would hold this frame and so
                # the error itself: a cycle keeping the caller's connection (and its
                # buffers) alive until a full garbage collection.
                error, expired = expired, None
                try:
                    raise error
                finally:
                    del error
            self._wait(wait, remaining)

    def sendmsg(self, buffers: list[Any], ancillary: Any = (), flags: int = 0,
                address: Any = None) -> int:
        """As ``send``, for buffers one after the other; no descriptors cross TLS."""
        if ancillary:
            raise OSError(errno.EINVAL, "descriptors cannot travel over TLS")
        data: Any = memoryview(buffers[0]).cast("B")
        if len(buffers) > 1 and len(data) < _RECORD_BYTES:
            # One record's worth at most (send writes no more): never copy the rest.
            record = bytearray(data)
            for buffer in buffers[1:]:
                if len(record) >= _RECORD_BYTES:
                    break
                record += memoryview(buffer).cast("B")[:_RECORD_BYTES - len(record)]
            data = record
        return self.send(data, flags)

    def shutdown(self, how: int) -> None:
        """Shut the connection itself (not the TLS layer): a reader waiting wakes up."""
        socket.socket.shutdown(self._ssl, how)

    def close(self) -> None:
        self._closed = True
        self._ssl.close()

    def _wait(self, events: int, timeout_s: float | None) -> None:
        poller = select.poll()
        try:
            poller.register(self._ssl.fileno(), events)
        except ValueError:   # closed meanwhile
            raise OSError(errno.EBADF, "the connection is closed") from None
        poller.poll(None if timeout_s is None else max(0, int(timeout_s * 1000) + 1))


def subject_of(cert: dict[str, Any]) -> str:
    """A certificate's subject as ``CN=client,O=Example`` (``getpeercert()`` form in)."""
    parts = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O",
                     "organizationalUnitName": "OU", "countryName": "C",
                     "localityName": "L", "stateOrProvinceName": "ST"}.get(key, key)
            parts.append(f"{short}={value}")
    return ",".join(parts)


def client_stream(sock: socket.socket, context: ssl.SSLContext, host: str, address: str,
                  timeout_s: float | None) -> TlsStream:
    """Wrap a connected TCP socket as the client's end of TLS and do the handshake.

    Raises:
        ConnectError: the handshake failed (the reason says why: a certificate that does
            not verify, a server that does not speak TLS...) or took longer than
            ``timeout_s``.
    """
    try:
        wrapped = context.wrap_socket(sock, server_hostname=host,
                                      do_handshake_on_connect=False)
    except (ssl.SSLError, ValueError) as error:
        sock.close()
        raise ConnectError(f"cannot start TLS with {address}: {error}") from error
    stream = TlsStream(wrapped)
    try:
        stream.handshake(timeout_s)
    except ssl.SSLError as error:
        stream.close()
        hint = ""
        if "WRONG_VERSION_NUMBER" in str(error) or "wrong version number" in str(error):
            hint = " (does the server speak TLS? a hintens server without ssl_context does not)"
        raise ConnectError(f"the TLS handshake with {address} failed: "
                           f"{error.reason or error}{hint}") from error
    except (OSError, TimeoutError) as error:
        stream.close()
        raise ConnectError(f"the TLS handshake with {address} failed: {error}") from error
    try:
        stream.prefetch(min(timeout_s or PREFETCH_S, PREFETCH_S))
    except ssl.SSLError as error:
        stream.close()
        raise ConnectError(f"the server at {address} refused the TLS handshake: "
                           f"{error.reason or error}") from error
    except OSError as error:
        stream.close()
        raise ConnectError(f"the server at {address} closed the connection after the TLS "
                           f"handshake: {error}") from error
    return stream


def server_stream(sock: socket.socket, context: ssl.SSLContext,
                  allow_subjects: frozenset[str] | None) -> TlsStream:
    """Wrap an accepted TCP socket as the server's end of TLS; the handshake is the
    caller's to do (``handshake`` or ``handshake_step``). With ``allow_subjects``, a client
    whose certificate subject is not listed is refused once the handshake is done.
    """
    verify = None
    if allow_subjects is not None:
        def verify(wrapped: ssl.SSLSocket) -> None:
            cert = wrapped.getpeercert()
            subject = subject_of(cert) if cert else None
            if subject not in allow_subjects:
                raise ssl.SSLError(f"the client's certificate subject {subject!r} is not "
                                   f"in allow_subjects")

    wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    return TlsStream(wrapped, verify)


def plaintext_hint(error: BaseException) -> str:
    """For a server's log: a handshake that failed because the client spoke no TLS."""
    text = str(error)
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text \
            or "HTTP_REQUEST" in text:
        return " (a client without TLS? it needs ssl_context=)"
    return ""


def note_broken_stream(connection: Any, error: BaseException) -> None:
    """For a server whose read failed: an ``ssl.SSLError`` there means a record OpenSSL
    refused after the handshake (a peer that broke TLS, or bytes changed on the way),
    which is logged at INFO, as a client that broke the protocol is. Anything else (a reset,
    a closed connection) is not."""
    if isinstance(error, ssl.SSLError):
        log.info("closing %r: its TLS stream broke: %s", connection, error.reason or error)


def client_hello_hint(error: BaseException) -> str:
    """For a plain server's log: a frame whose "magic" is a TLS handshake record."""
    return " (a TLS ClientHello: the client uses TLS, this server has no ssl_context)" \
        if "0x1603" in str(error) else ""


_TLS_CHANNEL: Any = None


def _tls_channel_class() -> Any:
    global _TLS_CHANNEL
    if _TLS_CHANNEL is None:
        from .. import _impl
        from . import _channel_py

        class TlsChannel(_channel_py.Channel):
            """The pure-Python Channel over a TlsStream, encoding with the core's kernels."""

            _encode_frame = staticmethod(_impl.core.encode_frame)
            _encode_header = staticmethod(_impl.core.encode_header)

            def receive(self, flags: int = 0) -> Any:
                # Inside a large payload, OpenSSL decrypts straight into the payload's buffer
                # (the compiled decoder's; the twin's has no such view), saving a copy.
                decoder: Any = self.decoder
                direct = getattr(decoder, "_direct_view", None)
                view = None if direct is None or self._closed else direct(len(self._buffer))
                if view is None:
                    return super().receive(flags)
                try:
                    count = self._sock.recvmsg_into([view], 0, flags)[0]
                finally:
                    view.release()
                return decoder._direct_fed(count) if count else None

        _TLS_CHANNEL = TlsChannel
    return _TLS_CHANNEL
