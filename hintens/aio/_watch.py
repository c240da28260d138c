"""What an asyncio connection asks of the loop for its socket: "tell me when a read would not
wait" and "tell me when a write would not wait".

Over the socket that is ``add_reader`` and ``add_writer``. Over a shared-memory ring
(docs/PROTOCOL.md section 9b) the bytes travel in shared memory, which the loop cannot watch;
the connection's channel is a *socket waiter* there instead (``ring_socket_wakes``): a read
that finds the ring empty, or a write that finds it full, asks the peer for a wake record on
the socket, so the socket becomes readable when the ring has bytes, or room. The socket is then
watched for reading whenever either is wanted, and each wake calls whichever callbacks want
it. Its end (the peer gone) makes it readable too.

A wake record says only "look again", to whichever side waits: the reader takes every record
off the socket (or it would stay readable), including one that was meant for a waiting write.
So whenever a callback took one (``ring_wakes_taken`` moved), a waiting write is tried again
before the loop sleeps: its own announcement and re-check then cannot lose the wake-up. For
that, every read goes through here, also the ones a connection asks for again at once
(``read_soon``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

log = logging.getLogger("hintens")

#: Between a server's switch and its client's, the ring takes our writes while the socket
#: still brings the client's frames: a write that waits for room looks again this often when
#: the connection is not reading (reading would be the wake-up).
_SWITCH_POLL_S = 0.001


def _nothing(*_: Any) -> None:
    pass


class SocketWatch:
    """The loop's watch over one connection's socket.

    Args:
        loop: the connection's event loop (every method runs on its thread).
        fd: the socket's descriptor.
        channel: the core Channel over it (its ``ring_rx``/``ring_tx`` say where bytes go).
        on_read: called when a read would not wait, while reading is wanted.
        on_write: called when a write would not wait, while writing is wanted.
        on_error: called with the exception when taking the socket's records (a ring's, while
            not reading) fails: the connection is over.
        buffered: says whether bytes wait that the socket will not announce (decrypted TLS
            records: ``Connection.more_buffered``), looked at when reading resumes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, channel: Any,
                 on_read: Callable[[], None], on_write: Callable[[], None],
                 on_error: Callable[[BaseException], None],
                 buffered: Callable[[], bool] | None = None) -> None:
        self._loop, self._fd, self._channel = loop, fd, channel
        self._buffered = buffered
        self._on_read, self._on_write, self._on_error = on_read, on_write, on_error
        self.reading = False       # on_read is wanted
        self.writing = False       # on_write is wanted
        self._reader = False       # add_reader is in place
        self._writer = False       # add_writer is in place
        self._poll: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None
        self._closed = False

    def want_read(self, wanted: bool) -> None:
        """Call ``on_read`` when a read would not wait (or stop)."""
        if wanted and not self.reading and (
                self._channel.ring_rx or (self._buffered is not None and self._buffered())):
            self.read_soon()   # bytes may wait already, unannounced (in the ring, or TLS's)
        self.reading = wanted
        self.update()

    def read_soon(self) -> None:
        """Call ``on_read`` on the loop's next turn, without waiting for the socket: bytes
        wait that it will not announce (decrypted TLS records, a ring's)."""
        if self._soon is None and not self._closed:
            self._soon = self._loop.call_soon(self._read_now)

    def want_write(self, wanted: bool) -> None:
        """Call ``on_write`` when a write would not wait (or stop)."""
        self.writing = wanted
        self.update()

    def update(self) -> None:
        """Put the loop's watches in line with what is wanted and where the bytes go now (a
        read may have switched the connection to a ring)."""
        if self._closed:
            return
        channel = self._channel
        reader, writer, poll = self.reading, self.writing, False
        if channel.ring_tx:
            writer = False
            if channel.ring_rx:
                reader = self.reading or self.writing   # wake records, for either
            elif self.writing and not self.reading:
                poll = True   # the socket brings frames we may not read now: look again
        self._set(reader, writer)
        if poll and self._poll is None:
            self._poll = self._loop.call_later(_SWITCH_POLL_S, self._polled)
        elif not poll and self._poll is not None:
            self._poll.cancel()
            self._poll = None

    def close(self) -> None:
        """Stop watching, for good, and let go of the callbacks (bound methods of the
        connection: without that cycle, it goes as soon as nobody holds it)."""
        self._set(False, False)
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        self.reading = self.writing = False
        self._closed = True
        self._on_read = self._on_write = _nothing
        self._on_error = _nothing

    def _set(self, reader: bool, writer: bool) -> None:
        if reader != self._reader:
            self._reader = reader
            if reader:
                self._loop.add_reader(self._fd, self._readable)
            else:
                self._loop.remove_reader(self._fd)
        if writer != self._writer:
            self._writer = writer
            if writer:
                self._loop.add_writer(self._fd, self._writable)
            else:
                self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        channel = self._channel
        taken = channel.ring_wakes_taken
        if channel.ring_tx and channel.ring_rx:
            if self.writing:
                self._on_write()
            if self._closed:
                return
            if self.reading:
                self._on_read()
            else:
                # Not reading frames now: take the wake records (else the socket stays
                # readable); its end, or a bad record, goes to the reader.
                try:
                    ended = channel.take_ring_records()
                except Exception as error:  # noqa: BLE001 (a violation or a lost socket)
                    self._on_error(error)
                    return
                if ended:
                    self._on_read()
        elif self.reading:
            self._on_read()
        self._settle(taken)

    def _writable(self) -> None:
        self._call(self.writing, self._on_write)

    def _polled(self) -> None:
        self._poll = None
        self._call(self.writing, self._on_write)

    def _read_now(self) -> None:
        self._soon = None
        self._call(self.reading, self._on_read)

    def _call(self, wanted: bool, callback: Callable[[], None]) -> None:
        """``callback()`` if it is still wanted, then settle."""
        taken = self._channel.ring_wakes_taken
        if wanted and not self._closed:
            callback()
        self._settle(taken)

    def _settle(self, taken: int) -> None:
        """After a callback, before the loop sleeps: a write that waits for room looks again
        if wake records were taken meanwhile (one may have been its own); then the watches."""
        channel = self._channel
        while self.writing and not self._closed and channel.ring_tx \
                and channel.ring_wakes_taken != taken:
            taken = channel.ring_wakes_taken
            self._on_write()
        self.update()
