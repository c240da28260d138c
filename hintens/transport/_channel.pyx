# cython: language_level=3, embedsignature=True, embedsignature.format=clinic, binding=False, boundscheck=False, wraparound=False, cdivision=True
"""Compiled socket transport of hintens: the Channel (a socket's receive buffer, decoder, send
lock and outbox), shared-memory Mapping and SharedRegion, and the sendmsg/recvmsg plumbing.
One module in several files: the Channel's sending end is ``Writer`` (_writer.pxi) and its
queue ``Outbox`` (_outbox.pxi), and the shared-memory views are in _memory.pxi.

hintens/transport/_channel_py.py is its pure-Python twin and documents the semantics both
share; the two export the same names and raise the same exceptions. Frames are decoded and
packed by the wire kernels (hintens/wire/_wire.pyx), whose types and inline helpers are
cimported from _wire.pxd. Every syscall runs without the GIL.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.errno cimport EAGAIN, EBADF, EINTR, EINVAL, EPIPE, errno
from libc.stdlib cimport free, malloc, realloc
from libc.math cimport INFINITY
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close as close_fd
from libc.string cimport memcpy, memmove, strerror
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_get_stacksize,
    PyThread_release_lock,
    PyThread_set_stacksize,
)

from ..wire._wire cimport (
    _HEADER_STATE,
    HEADER_SIZE,
    NOGIL_THRESHOLD_BYTES,
    Frame,
    FrameDecoder,
    MemoryBudget,
    _Input,
    _acquire,
    _check_frame_args,
    _copy,
    _fill_header,
    _index,
    _release,
    crc16_kernel,
    hx_header,
    hx_pack_header,
)

from .. import _errors
from .._constants import (
    BATCH_WRITE_BYTES,
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_MAX_QUEUE_BYTES,
    HANDLER_BUCKETS_S,
)
from ..wire._wire import encode_frame, encode_header

__all__ = [
    "Channel",
    "DRIVES_TLS",
    "Mapping",
    "Ring",
    "SharedRegion",
    "SEES_VIEW_RELEASE",
    "call_with_stack_size",
]


def call_with_stack_size(Py_ssize_t stack_bytes, function, *args):
    """``function(*args)`` with the interpreter's stack size for new threads set to
    ``stack_bytes`` for that call alone (``_thread.start_new_thread``, say).

    ``threading.stack_size`` is process-wide. Here the size is set, the call made and the
    size put back in C, with the GIL held and no bytecode run in between: no other Python
    thread can start a thread meanwhile and get our size by accident. (The pure-Python core
    cannot promise that, so its twin leaves the size alone.)

    Returns:
        What ``function`` returns.

    Raises:
        ValueError: the platform refuses ``stack_bytes``.
        Whatever ``function`` raises.
    """
    cdef size_t previous = PyThread_get_stacksize()
    if PyThread_set_stacksize(<size_t>stack_bytes) != 0:
        raise ValueError(f"the platform refuses a thread stack of {stack_bytes} bytes")
    try:
        return function(*args)
    finally:
        PyThread_set_stacksize(previous)



cdef enum:
    _MAX_IOV = 1024          # IOV_MAX on Linux
    # Descriptors one read accepts, and how many may wait unclaimed: a peer cannot make us
    # hold more than this (fd exhaustion); extras are closed at once and counted.
    _FDS_PER_READ = 16
    _MAX_PENDING_FDS = 64
    # Records (PROTOCOL.md 9b) taken off the socket by one read, at most.
    _RECORDS_PER_READ = 8


cdef extern from *:
    """
    /* Room for 16 descriptors, aligned for struct cmsghdr as CMSG_* require. */
    typedef union {
        struct cmsghdr align;
        unsigned char bytes[CMSG_SPACE(16 * sizeof(int))];
    } hx_fd_control;
    """
    ctypedef struct hx_fd_control:
        unsigned char bytes[1]


cdef extern from *:
    """
    static inline void errno_set(int value) { errno = value; }
    """
    void errno_set(int value) nogil


cdef int _raise_errno() except -1:
    PyErr_SetFromErrno(OSError)   # EAGAIN (a kernel timeout) becomes BlockingIOError
    return -1


cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    const int MSG_DONTWAIT
    const int MSG_PEEK


cdef extern from "poll.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long count, int timeout)
    const short POLLIN
    const short POLLOUT


cdef extern from "fcntl.h" nogil:
    int fcntl(int fd, int command, int argument)
    const int F_DUPFD_CLOEXEC


cdef ssize_t _send_with_fd(int sock, const unsigned char *data, size_t n, int fd,
                           int flags) noexcept nogil:
    # send(), or a sendmsg carrying one descriptor (SCM_RIGHTS) with the first byte.
    cdef msghdr message
    cdef iovec vector
    cdef hx_fd_control control
    cdef cmsghdr *header
    if fd < 0:
        return send(sock, data, n, flags)
    memset_msghdr(&message)
    vector.iov_base = <void *>data
    vector.iov_len = n
    message.msg_iov = &vector
    message.msg_iovlen = 1
    message.msg_control = &control
    message.msg_controllen = CMSG_SPACE(sizeof(int))
    header = CMSG_FIRSTHDR(&message)
    header.cmsg_level = SOL_SOCKET
    header.cmsg_type = SCM_RIGHTS
    header.cmsg_len = CMSG_LEN(sizeof(int))
    (<int *>CMSG_DATA(header))[0] = fd
    return sendmsg(sock, &message, flags)


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef Py_ssize_t _BATCH_BYTES = BATCH_WRITE_BYTES
cdef double _HANDLER_BOUNDS[7]
for _i, _bound in enumerate(HANDLER_BUCKETS_S):
    _HANDLER_BOUNDS[_i] = _bound
# A drained queue buffer up to this size is kept for the next batch; a larger one (a burst)
# is freed, so that a connection does not hold its largest burst's memory for good.
cdef Py_ssize_t _KEEP_SPARE_BYTES = 1024 * 1024
# How much of a large payload one read takes at most, straight into the payload's buffer. Reads
# of a buffer's worth (256 KiB) kept each CRC pass in cache, but over loopback TCP a 64 MiB
# echo took 115-131 ms one core, 99-123 ms unpinned; with 8 MiB reads 80-86 and 85-101 ms
# (the raw socket: 61-70). Below 4 MiB (the default tcp_wmem maximum) it stays slow.
cdef Py_ssize_t _DIRECT_READ_BYTES = 8 * 1024 * 1024

# TLS. A channel over a TlsStream reads and writes through the stream's OpenSSL object (ssl's
# _SSLSocket: its read and write are C calls that let the GIL go), never through the descriptor,
# which is non-blocking: a call that would wait polls the descriptor here, without the GIL,
# within the kernel timeout the caller keeps on the socket (SO_RCVTIMEO / SO_SNDTIMEO, read back
# when a wait begins). hintens/transport/tls.py is the pure-Python twin (TlsStream's own calls).
DRIVES_TLS = True   # the twin (_channel_py) says False
# What one TLS write hands OpenSSL at most (it cuts 16 KiB records); small buffers after a
# small first one are joined into one record's worth, so a small frame is one record.
cdef Py_ssize_t _TLS_WRITE_BYTES = 256 * 1024
cdef Py_ssize_t _TLS_RECORD_BYTES = 16384
_SSL_WANT_READ = _SSL_WANT_WRITE = _SSL_ENDED = None


cdef int _load_ssl() except -1:
    global _SSL_WANT_READ, _SSL_WANT_WRITE, _SSL_ENDED
    if _SSL_ENDED is None:
        import ssl
        _SSL_WANT_READ = ssl.SSLWantReadError
        _SSL_WANT_WRITE = ssl.SSLWantWriteError
        _SSL_ENDED = (ssl.SSLZeroReturnError, ssl.SSLEOFError)
    return 0


include "_writer.pxi"
include "_outbox.pxi"


@cython.final
cdef class Channel(Outbox):
    """A connected stream socket: its receive side (buffer and decoder) over the sending
    half, the ``Outbox`` (send lock and outgoing queue).

    The socket stays owned by the caller, who also sets its kernel timeouts. Every syscall runs
    without the GIL. See hintens/transport/_channel_py.py for the semantics both cores share.
    """

    def __cinit__(self):
        self._buffer = NULL
        hx_spin_init(&self._spin)

    def __init__(self, sock, FrameDecoder decoder, Py_ssize_t buffer_size=256 * 1024):
        if buffer_size < HEADER_SIZE:
            raise ValueError("buffer_size must hold at least a header")
        self._fd = sock.fileno()
        self._sock = sock
        self.decoder = decoder
        self._buffer = <unsigned char *>malloc(buffer_size)
        if self._buffer == NULL:
            raise MemoryError()
        self._size = buffer_size
        self.pending = []
        self.fds = []
        self.fds_dropped = 0
        self.max_fds = 0
        tls_parts = getattr(sock, "tls_parts", None)
        if tls_parts is not None:   # a TlsStream: OpenSSL's object, driven from here
            _load_ssl()
            self._tls_lock = PyThread_allocate_lock()
            if self._tls_lock == NULL:
                raise MemoryError()
            self._tls, self._tls_early = tls_parts()

    cpdef note_handler(self, double seconds):
        """Count one handler run of ``seconds`` in the stats (``handler_times``)."""
        cdef int i = 0
        while i < 7 and seconds > _HANDLER_BOUNDS[i]:
            i += 1
        self._handler_buckets[i] += 1
        self.handler_calls += 1
        self.handler_seconds += seconds

    def handler_times(self):
        """The handler runs noted so far: ``(count, seconds, buckets)``, where ``buckets``
        holds how many took at most each bound of ``HANDLER_BUCKETS_S``, then the rest (not
        cumulative)."""
        return (self.handler_calls, self.handler_seconds,
                tuple([self._handler_buckets[i] for i in range(8)]))

    def __dealloc__(self):
        if self.fds:
            for fd in self.fds:
                close_fd(fd)
        free(self._buffer)

    def close(self):
        """Close the socket (and unclaimed descriptors). Waits for a send in progress to end,
        so no write can reach a descriptor number the kernel has handed out again. Idempotent.
        """
        Writer.close(self)
        self.close_fds()

    cdef list _receive(self, int flags):
        # One recvmsg, decoded. None at end of stream. Descriptors that came with the bytes
        # are kept in self.fds, close-on-exec.
        cdef ssize_t count
        cdef msghdr message
        cdef iovec vectors[2]
        cdef hx_fd_control control
        cdef list frames
        cdef bint eager = self._eager
        cdef Py_ssize_t room = 0
        cdef unsigned char *direct
        # Spin only for the start of a reply: a frame that has begun arriving is read as it
        # comes (a reply dribbled in pieces costs no spin per piece).
        cdef bint spin = self._spin_next and self.decoder._header_len == 0 \
            and self.decoder._state == _HEADER_STATE
        cdef long long spun_at = 0
        self._spin_next = False
        if self._fd < 0:
            raise OSError(EBADF, "the channel is closed")
        if self._tls is not None:
            return self._tls_receive(flags, spin)
        # Inside a large payload, the kernel copies straight into its buffer (at most
        # _DIRECT_READ_BYTES per read; the CRC runs after each); what follows it lands in our
        # buffer as usual.
        direct = self.decoder._direct(_DIRECT_READ_BYTES, &room)
        while True:
            memset_msghdr(&message)
            if direct != NULL:
                vectors[0].iov_base = direct
                vectors[0].iov_len = <size_t>room
                vectors[1].iov_base = self._buffer
                vectors[1].iov_len = <size_t>self._size
                # Our buffer only once the payload ends in this read: before that, what the
                # kernel put there would be payload bytes, to be copied over again.
                message.msg_iovlen = 2 if room >= self.decoder._remaining else 1
            else:
                vectors[0].iov_base = self._buffer
                vectors[0].iov_len = <size_t>self._size
                message.msg_iovlen = 1
            message.msg_iov = vectors
            message.msg_control = &control
            message.msg_controllen = sizeof(hx_fd_control)
            if self._ring_rx:
                count = self._ring_read(vectors, <int>message.msg_iovlen, flags)
                message.msg_controllen = 0
            elif eager:
                # Under load bytes are usually waiting: take them without letting the GIL go
                # (which would invite another thread in and make us wait for it back).
                eager = False
                count = recvmsg(self._fd, &message, flags | MSG_CMSG_CLOEXEC | MSG_DONTWAIT)
                if count < 0 and errno == EAGAIN and not flags & MSG_DONTWAIT:
                    self._eager = False   # nothing yet: block, and stop trying this first
                    continue
            elif spin:
                # A reply is on its way: try for it a moment before sleeping (_ring.h).
                spin = False
                with nogil:
                    count = hx_spin_recvmsg(&self._spin, self._fd, &message,
                                            flags | MSG_CMSG_CLOEXEC, &spun_at)
                if count == HX_SPIN_NOTHING:
                    # A signal that came while we spun is handled now, not after the sleep.
                    PyErr_CheckSignals()
                    with nogil:
                        count = recvmsg(self._fd, &message, flags | MSG_CMSG_CLOEXEC)
                        if count >= 0 or errno == EAGAIN:
                            hx_spin_after(&self._spin, spun_at)
            else:
                with nogil:
                    count = recvmsg(self._fd, &message, flags | MSG_CMSG_CLOEXEC)
            if count >= 0:
                break
            if errno == EINTR:
                PyErr_CheckSignals()
                continue
            _raise_errno()
        if message.msg_controllen:
            self._keep_fds(&message)
        if count == 0:
            return None
        if direct != NULL:
            frames = self.decoder._direct_done(min(<Py_ssize_t>count, room), self._buffer,
                                               max(<Py_ssize_t>count - room, 0))
        else:
            frames = self.decoder._feed(self._buffer, count, None, False)
        if len(frames) > 1:
            self._eager = True   # several frames per read: the peer is ahead of us
        return frames

    cdef list _tls_receive(self, int flags, bint spin):
        # _receive over TLS: inside a large payload OpenSSL decrypts straight into its buffer.
        cdef Py_ssize_t room = 0, count
        cdef unsigned char *direct = self.decoder._direct(_DIRECT_READ_BYTES, &room)
        if direct != NULL:
            count = self._tls_read(direct, room, flags, False)
            return self.decoder._direct_done(count, NULL, 0) if count else None
        count = self._tls_read(self._buffer, self._size, flags, spin)
        return self.decoder._feed(self._buffer, count, None, False) if count else None

    cdef Py_ssize_t _tls_read(self, unsigned char *buf, Py_ssize_t size, int flags,
                              bint spin) except -1:
        # As recv over TLS: what has arrived, as many records as fit (at least one byte,
        # waiting for it within the receive timeout unless MSG_DONTWAIT, else
        # BlockingIOError); 0 at the end of the stream. With ``spin``, a wait for bytes
        # spins a moment first (receive_reply; _ring.h).
        cdef Py_ssize_t count = 0, got = 0
        cdef long long deadline = -2, spun_at = 0
        cdef bint spun = False
        cdef int ready
        cdef short events
        cdef bytes early = self._tls_early
        if self.broken:
            # Shut for good (_break): its end, as a plain socket's reader sees, even though
            # OpenSSL may hold decrypted bytes (after a lost read they would not follow on).
            return 0
        if early:
            got = min(size, len(early))
            memcpy(buf, PyBytes_AS_STRING(early), got)
            self._tls_early = early[got:] if got < len(early) else None
            return got
        while count < size:
            events = 0
            self._tls_call_begin()
            try:
                got = self._tls.read(size - count, PyMemoryView_FromMemory(
                    <char *>buf + count, size - count, PyBUF_WRITE))
                # A record only partly taken, or a full one (more usually follows at once):
                # read on; the rest, if any, is news the descriptor will tell.
                if got and got < _TLS_RECORD_BYTES and self._tls.pending() == 0:
                    if spin:   # there at once: as a spin that won, the budget is full again
                        hx_spin_after(&self._spin, hx_ring_now_ns())
                    return count + got
            except _SSL_WANT_READ:
                events = POLLIN
            except _SSL_WANT_WRITE:
                events = POLLOUT
            except _SSL_ENDED:
                return count   # the end (the next read says 0)
            except BaseException:
                self._tls_failed()   # (bytes it took may be lost: see _tls_call_begin)
                raise
            finally:
                PyThread_release_lock(self._tls_lock)
            if events == 0:
                if not got:
                    return count
                if spin:
                    spin = False
                    hx_spin_after(&self._spin, hx_ring_now_ns())
                count += got
                continue
            if count:
                return count
            if flags & MSG_DONTWAIT:
                raise BlockingIOError(EAGAIN, "nothing to read now")
            if spin and events == POLLIN:
                spin = False
                with nogil:
                    ready = hx_spin_poll(&self._spin, self._fd, &spun_at)
                if ready:
                    continue   # bytes came while we spun: OpenSSL reads them
                spun = True
                # A signal that came while we spun is handled now, not after the sleep.
                PyErr_CheckSignals()
            if not self._tls_wait(events, SO_RCVTIMEO, &deadline):
                if spun:
                    hx_spin_after(&self._spin, spun_at)
                raise BlockingIOError(EAGAIN, "the receive timeout expired")
            if spun:
                spun = False
                hx_spin_after(&self._spin, spun_at)
        return count

    def tls_pending(self):
        """Over TLS: decrypted bytes wait (inside OpenSSL, or read ahead) that the
        descriptor will not announce. False over a plain socket."""
        if self._tls is None or self._fd < 0:
            return False
        if self._tls_early:
            return True
        # Not while another thread is in an OpenSSL call: that one reads (or will) anyway.
        if not PyThread_acquire_lock(self._tls_lock, NOWAIT_LOCK):
            return True
        try:
            return self._fd >= 0 and self._tls.pending() > 0
        finally:
            PyThread_release_lock(self._tls_lock)

    def switch_rx(self, Ring ring):
        """Read from ``ring`` from now on (PROTOCOL.md section 9b): the peer's switch frame was
        the last of its frames on the socket, which from now on brings only descriptor
        carriers and, by its end, the peer's.

        Raises:
            ProtocolError: bytes of the socket's stream were read past the switch frame.
            ValueError: the channel already reads from a ring, or ``ring`` is not the one
                it writes to.
        """
        if self._fd < 0:
            raise OSError(EBADF, "the channel is closed")
        if self._ring_rx:
            raise ValueError("this channel already reads from a ring")
        if self.ring is not None and ring is not self.ring:
            raise ValueError("a channel's two directions share one ring")
        if self.decoder.in_frame:
            raise _errors.ProtocolError(
                "the peer sent bytes on the socket after its ring switch frame (HRNG)")
        self.ring = ring
        self._ring_rx = True

    def stop_reading(self):
        """Read what has arrived, then see the end of the stream (``shutdown(SHUT_RD)``, and
        over a ring its equivalent): a server that closes still answers what was sent."""
        cdef Ring ring = self.ring
        if self._fd >= 0:
            shutdown(self._fd, SHUT_RD)
        if ring is not None:
            hx_ring_stop_reading(&ring.r)

    @property
    def ring_rx(self):
        """Frames come from the shared-memory ring (``switch_rx`` ran)."""
        return self._ring_rx

    @property
    def ring_tx(self):
        """Frames go into the shared-memory ring (``switch_tx`` ran)."""
        return self._ring_tx

    def ring_pending(self):
        """For an event loop that reads a ring (``ring_socket_wakes``), after a read: True if
        a read would not wait now (bytes in the ring, or its end), so read again without
        waiting for the socket; else False, and the peer's next bytes send a wake record to
        the socket, which the loop watches. False too when the channel does not read a
        ring."""
        cdef Ring ring = self.ring
        if not self._ring_rx or ring is None:
            return False
        if hx_ring_readable(&ring.r) != 0 or hx_ring_rx_ended(&ring.r):
            return True
        if self.ring_socket_wakes:
            try:
                if self._ring_records(False):
                    return True   # the socket ended: the next read sees it
            except (_errors.ProtocolError, OSError) as error:
                self._ring_error = error   # the next read raises it, as if it had met it
                return True
        return hx_ring_arm_rx_socket(&ring.r) != 0 or hx_ring_rx_ended(&ring.r)

    def take_ring_records(self):
        """Take the records that wait on the socket of a channel that reads a ring (wake
        records, and descriptor carriers, kept for their frames), without reading the ring:
        for an event loop that is not reading frames right now but watches the socket.

        Returns:
            True if the socket's stream ended (the peer is gone, or we stopped reading).

        Raises:
            ProtocolError: the peer sent something else on the socket.
            OSError: the connection is lost.
        """
        if not self._ring_rx or self.ring is None or self._fd < 0:
            return False
        return self._ring_records(False) == 1

    def wait_readable(self, double timeout):
        """Wait up to ``timeout`` seconds, without reading, until a read would not wait:
        bytes have arrived, or the stream ended or broke. Over a ring it watches the ring
        (without spinning: the reader spins); otherwise it polls the socket.

        Returns:
            True when a read would not wait; False at the timeout.
        """
        cdef int state
        cdef long long deadline
        cdef pollfd watched
        cdef int found
        cdef Ring ring = self.ring   # held while we wait: close() may drop the channel's
        if self._fd < 0 or (self._ring_rx and ring is None):
            return True
        if self._tls is not None and self.tls_pending():
            return True
        if self._ring_rx:
            if hx_ring_readable(&ring.r) != 0 or hx_ring_rx_ended(&ring.r):
                return True
            deadline = hx_ring_now_ns() + <long long>(timeout * 1e9)
            with nogil:
                state = hx_ring_wait_readable(&ring.r, deadline, 0, 0)
            return state != HX_WAIT_TIMEOUT
        watched.fd = self._fd
        watched.events = POLLIN
        watched.revents = 0
        with nogil:
            found = poll(&watched, 1, <int>(timeout * 1000))
        return found != 0

    cdef Py_ssize_t _ring_read(self, iovec *vectors, int count, int flags) except -2:
        # As recvmsg: bytes copied out of the ring into vectors (0: the end of the stream), or
        # -1 with errno (EAGAIN: nothing with MSG_DONTWAIT, or the socket's receive timeout;
        # EINTR; EBADF: closed here). A peer that breaks the ring raises ProtocolError.
        cdef Ring ring = self.ring
        cdef int64_t ready
        cdef int state
        cdef size_t want = 0, took
        cdef int i, fd
        if ring is None:   # closed meanwhile
            errno_set(EBADF)
            return -1
        if self._ring_error is not None:
            error, self._ring_error = self._ring_error, None
            raise error
        for i in range(count):
            want += vectors[i].iov_len
        while True:
            ready = hx_ring_readable(&ring.r)
            if ready > 0:
                break
            if ready < 0:
                self._ring_corrupt()
            if ring.r.shut:
                errno_set(EBADF)
                return -1
            if hx_ring_rx_ended(&ring.r):
                ready = hx_ring_readable(&ring.r)   # what it published before it closed
                if ready > 0:
                    break
                if ready < 0:
                    self._ring_corrupt()
                return 0
            if flags & MSG_DONTWAIT:
                if self.ring_socket_wakes:
                    # An event loop reads us, and goes back to watching the socket: take the
                    # records waiting there (or it stays readable), then ask for a wake record
                    # and look once more.
                    if self._ring_records(False) and hx_ring_readable(&ring.r) == 0:
                        return 0   # the peer's socket ended, and the ring is empty
                    if hx_ring_arm_rx_socket(&ring.r) != 0:
                        continue
                errno_set(EAGAIN)
                return -1
            with nogil:   # the socket's receive timeout, looked up if it comes to a sleep
                state = hx_ring_wait_readable(&ring.r, -1, SO_RCVTIMEO, 1)
            if state == HX_WAIT_TIMEOUT:
                errno_set(EAGAIN)
                return -1
            if state < 0:
                errno_set(EINTR)
                return -1
            if state == HX_WAIT_CORRUPT:
                self._ring_corrupt()
            if state == HX_WAIT_SOCKET:
                self._ring_records(False)
            if state == HX_WAIT_ENDED and hx_ring_readable(&ring.r) == 0:
                return 0
        if hx_ring_carriers(&ring.r) > ring.carriers_received:
            self._ring_records(True)
        if <size_t>ready < want:
            want = <size_t>ready
        if want >= NOGIL_THRESHOLD_BYTES:
            with nogil:
                took = hx_ring_take(&ring.r, vectors, count, want)
        else:
            took = hx_ring_take(&ring.r, vectors, count, want)
        # Carriers whose frame has begun in what was just read join the received descriptors,
        # as if they had come with its first byte.
        while ring._ahead and (<tuple>ring._ahead[0])[0] < ring.r.rx_head:
            fd = (<tuple>ring._ahead.pop(0))[1]
            if len(self.fds) < min(self.max_fds, <Py_ssize_t>_MAX_PENDING_FDS):
                self.fds.append(fd)
            else:
                close_fd(fd)
                self.fds_dropped += 1
        return <Py_ssize_t>took

    cdef int _ring_corrupt(self) except -1:
        raise _errors.ProtocolError("the peer broke the shared-memory ring: an index it wrote "
                                    "is out of range")

    cdef int _ring_records(self, bint counted) except -1:
        # Take the peer's records off the socket (PROTOCOL.md 9b): after its HRNG the socket
        # brings only 8-byte records, each a descriptor carrier (the ring offset of the frame
        # that claims it, with exactly one descriptor) or a wake record (all ones, no
        # descriptor; dropped). counted: until every carrier the peer has counted is taken
        # (they are there: it counts each once its sendmsg returned); else whatever waits.
        # Up to 8 records a read: the kernel ends a read after the data that brought
        # descriptors, so only a read's last record can be a carrier (and a read shorter than
        # the buffer took all that waited: no second read to find the socket empty).
        # Returns 1 if the socket's stream ended, else 0. Anything else is fatal.
        cdef Ring ring = self.ring
        cdef uint64_t announced = hx_ring_carriers(&ring.r), offset
        cdef unsigned char data[_RECORDS_PER_READ * 8]
        cdef ssize_t got
        cdef int fd, k, nfds, at
        if announced > ring.carriers_received and announced - ring.carriers_received \
                + <uint64_t>len(ring._ahead) > <uint64_t>_MAX_PENDING_FDS:
            raise _errors.ProtocolError(
                f"the peer has more than {_MAX_PENDING_FDS} descriptor carriers ahead of its "
                f"frames, the most a connection holds")
        while not counted or announced > ring.carriers_received:
            got = _receive_carrier(self._fd, data, sizeof(data), True, &fd, &nfds)
            if got < 0 and errno == EINTR:
                continue
            if got < 0 and errno == EAGAIN and not counted:
                return 0
            if got < 0 and not counted:
                _raise_errno()
            if got == 0 and not counted:
                return 1
            if got <= 0 or got % 8 or nfds > 1:
                if fd >= 0:
                    close_fd(fd)
                raise _errors.ProtocolError(
                    _NOT_A_RECORD if got > 0 else
                    "the peer counts a descriptor carrier that its socket never brought")
            for at in range(0, <int>got, 8):
                offset = 0
                for k in range(8):
                    offset |= (<uint64_t>data[at + k]) << (8 * k)
                if offset == <uint64_t>0xFFFFFFFFFFFFFFFF and (nfds == 0 or at + 8 < got):
                    # A wake record: it did its work by arriving. (It may have been meant for
                    # a writer waiting for room: an event loop's looks again when this moves.)
                    self.ring_wakes_taken += 1
                    continue
                # A carrier (the read's last record, with its descriptor) names where its frame
                # will be: at or past the frame of the one before and our head, and within a
                # ring of our head (its producer is never further ahead of us than that).
                if at + 8 != got or nfds != 1 or offset < ring._last_carrier \
                        or offset < ring.r.rx_head or offset - ring.r.rx_head > ring.r.capacity:
                    if fd >= 0:
                        close_fd(fd)
                    raise _errors.ProtocolError(_NOT_A_RECORD)
                ring.carriers_received += 1
                ring._last_carrier = offset
                ring._ahead.append((offset, fd))
                if len(ring._ahead) > _MAX_PENDING_FDS:
                    raise _errors.ProtocolError(
                        f"the peer has more than {_MAX_PENDING_FDS} descriptor carriers ahead "
                        f"of its frames, the most a connection holds")
            if not counted and got < <ssize_t>sizeof(data):
                return 0   # it took all that waited
        return 0

    cdef int _keep_fds(self, msghdr *message) except -1:
        cdef cmsghdr *header = CMSG_FIRSTHDR(message)
        cdef int *slots
        cdef Py_ssize_t k, n
        if message.msg_flags & MSG_CTRUNC:
            self.fds_dropped += 1     # the kernel closed what did not fit
        while header != NULL:
            if header.cmsg_level == SOL_SOCKET and header.cmsg_type == SCM_RIGHTS:
                n = <Py_ssize_t>((header.cmsg_len - CMSG_LEN(0)) // sizeof(int))
                slots = <int *>CMSG_DATA(header)
                for k in range(n):
                    if len(self.fds) < min(self.max_fds, <Py_ssize_t>_MAX_PENDING_FDS):
                        self.fds.append(slots[k])
                    else:
                        close_fd(slots[k])
                        self.fds_dropped += 1
            header = CMSG_NXTHDR(message, header)
        return 0

    def close_fds(self):
        """Close every received descriptor nobody claimed."""
        while self.fds:
            close_fd(self.fds.pop())

    def receive(self, int flags=0):
        """One recv, decoded: the frames it completed (maybe none), or None at end of stream.

        Raises:
            BlockingIOError: the receive timeout expired, or nothing to read with MSG_DONTWAIT.
            OSError: the connection broke.
            ProtocolError: from the decoder, as FrameDecoder.feed raises it.
        """
        return self._receive(flags)

    def spin_stats(self):
        """Counters of the spins before blocking reads (``reply_spin``): ``spins`` (waits
        that spun), ``spins_won`` (those that bytes ended; over TLS, the socket becoming
        readable, its end included), and ``spin_budget_ns`` (how long the next one may spin;
        0: it sleeps at once, but for a probe now and then)."""
        return {"spins": self._spin.spins, "spins_won": self._spin.spins_won,
                "spin_budget_ns": self._spin.spin_ns}

    def receive_reply(self, request_id):
        """One read, for a reply to a request the caller sent.

        Returns:
            The payload when the read completed exactly one frame, a Response to
            ``request_id`` without flags; otherwise None, with the frames it completed (maybe
            none) in ``pending``, or ``pending`` None at end of stream.

        Raises:
            As ``receive``.
        """
        cdef list frames
        cdef Frame only
        cdef uint64_t wanted = _index(request_id)
        self._spin_next = self.reply_spin
        frames = self._receive(0)
        if frames is not None and len(frames) == 1:
            only = frames[0]
            if only.type == 2 and only.flags == 0 and only.request_id == wanted:
                return only.payload
        self.pending = frames
        return None

    def serve(self, handler, on_error, reply_writes, Py_ssize_t small_max,
              Py_ssize_t inline_max, bint repeat=False, events=None):
        """Read once; answer the leading run of plain Requests (and deliver the plain Events
        among them, given ``events``); return the frames after it.

        ``handler(payload)`` returns the Response's payload (None for an empty one). A bytes
        result shorter than ``small_max`` is answered here, packed with the other small
        replies; one shorter than ``inline_max`` (``Endpoint.inline_max``) is answered here
        too, as a plain frame of its own that leaves at once; any other result goes to
        ``reply_writes(request_id, result)``, which returns the writes ``[(buffers, fds), ...]``
        that answer it (inline, through shared memory, or an Error frame), following the
        protocol's one rule for replies. If ``handler`` or ``reply_writes`` raises an
        Exception, ``on_error(request_id, exception)`` returns the Error frame to send instead.
        Replies leave in request order, small ones together in one write. A read that holds
        a control Event (request id 0) or a frame with flags is answered by none of this: all
        of it goes back.

        With ``repeat``, it reads again, for as long as each read was wholly answered here by
        ``handler`` alone (no ``reply_writes``, no ``on_error``), ended on a frame boundary and
        brought no descriptor: the caller's loop runs only when there is something for it to
        see (descriptors no frame claimed are the caller's to close).

        With ``events``, a ``(callback, context, failed)`` triple, the plain Events (no
        flags, a request id other than 0) of the run are delivered here too, in stream order
        with the Requests around them, as ``callback(payload, context)``: an Exception it
        raises goes to ``failed(exception)``, and the run goes on. Without it, an Event ends
        the run.

        Returns:
            The frames that follow the run, for the caller (often empty), or None at end of
            stream.

        Raises:
            As ``send`` and ``receive``, and what ``failed`` raises.
        """
        cdef list frames
        cdef object on_event = None, context = None, failed = None
        if events is not None:
            on_event, context, failed = events
        while True:
            frames = self._serve_once(handler, on_error, reply_writes, small_max, inline_max,
                                      on_event, context, failed)
            if not repeat or frames is None or frames or self._slow \
                    or self.decoder.in_frame or self.fds:
                return frames

    cdef list _serve_once(self, handler, on_error, reply_writes, Py_ssize_t small_max,
                          Py_ssize_t inline_max, on_event, context, failed):
        # One read of serve(); self._slow says whether anything beyond the handler ran.
        cdef list frames = self._receive(0)
        cdef list out = []
        cdef Py_ssize_t i = 0, count
        cdef Frame frame
        cdef bint flush = False, slow = False
        cdef double started
        self._slow = True
        if not frames:
            return frames
        count = len(frames)
        for i in range(count):
            frame = frames[i]
            if frame.flags or (frame.type == 3 and frame.request_id == 0):
                # A control Event (a release, say) or a frame with flags (shared memory)
                # anywhere in this read: the caller admits the whole read, in stream order,
                # before answering any of it. A reply that must wait for a segment reads on;
                # a later release must take effect, and descriptors must be claimed by their
                # frames in order.
                return frames
        i = 0
        while i < count:
            frame = frames[i]
            if frame.type == 3 and on_event is not None:   # plain: controls returned above
                # Replies to the Requests before it leave first: on_event may take its time.
                if out:
                    self._send(out, None)
                    out = []
                try:
                    on_event(frame.payload, context)
                except Exception as error:
                    slow = True
                    failed(error)
                i += 1
                continue
            if frame.type != 1 or frame.flags != 0:
                break
            writes = None
            try:
                started = _now()
                try:
                    result = handler(frame.payload)
                finally:
                    self.note_handler(_now() - started)
                if result is None:
                    result = b""
                if type(result) is bytes and len(<bytes>result) < small_max:
                    out.append(encode_frame(2, result, frame.request_id))
                    self.responses_sent += 1
                elif type(result) is bytes and len(<bytes>result) < inline_max:
                    out.append(encode_header(2, result, frame.request_id))
                    out.append(result)   # not copied into a frame; nor held past this write
                    self.responses_sent += 1
                    flush = True
                else:
                    writes = reply_writes(frame.request_id, result)
                    slow = True
            except Exception as error:   # the handler's or the reply rule's, not a send's
                out.append(on_error(frame.request_id, error))
                slow = True
            result = None   # a lent payload goes back once nothing holds it
            if flush:   # a send's error is not the handler's: it leaves this loop
                self._send(out, None)
                out = []
                flush = False
            elif writes is not None:
                if out:
                    self._send(out, None)
                    out = []
                for buffers, fds in writes:
                    self._send(buffers, fds)
                writes = None
            i += 1
        if out:
            self._send(out, None)
        self._slow = slow
        return frames[i:] if i else frames


_NOT_A_RECORD = ("the peer sent bytes on the socket after its HRNG that are neither a "
                 "descriptor carrier (one 8-byte ring offset, in order and within a ring of "
                 "our head, with exactly one descriptor) nor a wake record")


cdef inline ssize_t _receive_carrier(int sock, unsigned char *data, size_t size, bint keep,
                                     int *first, int *count) noexcept nogil:
    # One non-blocking recvmsg of records into data (size bytes, a multiple of 8), with room
    # for descriptors. *count: the descriptors that came (a truncated control
    # message counts one more, so it never passes as exactly one); with keep the first is
    # left open in *first, and every other one is closed (with MSG_PEEK they are copies).
    cdef msghdr message
    cdef iovec vector
    cdef hx_fd_control control
    cdef cmsghdr *header
    cdef ssize_t got
    cdef int k
    first[0] = -1
    count[0] = 0
    memset_msghdr(&message)
    vector.iov_base = data
    vector.iov_len = size
    message.msg_iov = &vector
    message.msg_iovlen = 1
    message.msg_control = &control
    message.msg_controllen = sizeof(hx_fd_control)
    got = recvmsg(sock, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
    if got <= 0 or not message.msg_controllen:
        return got
    if message.msg_flags & MSG_CTRUNC:
        count[0] += 1
    header = CMSG_FIRSTHDR(&message)
    while header != NULL:
        if header.cmsg_level == SOL_SOCKET and header.cmsg_type == SCM_RIGHTS:
            for k in range(<int>((header.cmsg_len - CMSG_LEN(0)) // sizeof(int))):
                if keep and first[0] < 0:
                    first[0] = (<int *>CMSG_DATA(header))[k]
                else:
                    close_fd((<int *>CMSG_DATA(header))[k])
                count[0] += 1
        header = CMSG_NXTHDR(&message, header)
    return got


cdef inline void memset_msghdr(msghdr *message) noexcept nogil:
    message.msg_name = NULL
    message.msg_namelen = 0
    message.msg_iov = NULL
    message.msg_iovlen = 0
    message.msg_control = NULL
    message.msg_controllen = 0
    message.msg_flags = 0


include "_memory.pxi"
include "_ring.pxi"
