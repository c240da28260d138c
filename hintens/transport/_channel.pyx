# cython: language_level=3, embedsignature=True, embedsignature.format=clinic, binding=False, boundscheck=False, wraparound=False, cdivision=True
"""Compiled socket transport of hintens: the Channel (a socket's receive buffer, decoder, send
lock and outbox), shared-memory Mapping and SharedRegion, and the sendmsg/recvmsg plumbing.

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
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.errno cimport EAGAIN, EBADF, EINTR, EPIPE, errno
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
)
from ..wire._wire import encode_frame, encode_header

__all__ = [
    "Channel",
    "Mapping",
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


cdef int _raise_errno() except -1:
    PyErr_SetFromErrno(OSError)   # EAGAIN (a kernel timeout) becomes BlockingIOError
    return -1


cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    const int MSG_DONTWAIT


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
# A drained queue buffer up to this size is kept for the next batch; a larger one (a burst)
# is freed, so that a connection does not hold its largest burst's memory for good.
cdef Py_ssize_t _KEEP_SPARE_BYTES = 1024 * 1024


@cython.final
cdef class Channel:
    """A connected stream socket's receive side (buffer and decoder) and a send lock.

    The socket stays owned by the caller, who also sets its kernel timeouts. Every syscall runs
    without the GIL. See hintens/transport/_channel_py.py for the semantics both cores share.
    """

    def __cinit__(self):
        self._buffer = NULL
        self._queue = NULL
        self._spare = NULL
        self._fd_at = NULL
        self._fd_end = NULL
        self._fd_fds = NULL
        self._fd_count = 0
        self._fd_cap = 0
        self.aborted = None
        self.stall_timeout = 0.0
        self._send_lock = PyThread_allocate_lock()
        if self._send_lock == NULL:
            raise MemoryError()

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
        self.flush_interval = DEFAULT_FLUSH_INTERVAL_S
        self.max_queue = DEFAULT_MAX_QUEUE_BYTES
        self.on_queued = None
        # No Event yet: the first one leaves at once, whatever the machine's uptime (the
        # monotonic clock counts from boot, so 0.0 would hold it on a machine just booted).
        self._last_lazy = -INFINITY

    def __dealloc__(self):
        if self.fds:
            for fd in self.fds:
                close_fd(fd)
        self._drop_fds()
        free(self._fd_at)
        free(self._fd_end)
        free(self._fd_fds)
        free(self._buffer)
        free(self._queue)
        free(self._spare)
        if self._send_lock != NULL:
            PyThread_free_lock(self._send_lock)

    cdef int _lock_send(self) except -1:
        if not PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._send_lock, WAIT_LOCK)
        return 0

    cdef int _send_iov(self, iovec *iov, Py_ssize_t count, object fds,
                       bint quick=False) except -1:
        # Everything, in order; the caller holds the send lock and keeps the memory alive.
        # Descriptors ride with the first sendmsg, so they arrive with the first byte.
        cdef Py_ssize_t nfds = len(fds) if fds else 0
        cdef size_t written = 0
        if nfds > _FDS_PER_READ:
            raise ValueError(f"at most {_FDS_PER_READ} descriptors per send")
        if self.broken:
            raise OSError(EPIPE, "the channel broke in the middle of a frame")
        try:
            self._write_all(iov, 0, count, fds, nfds, &written, quick)
            self.written += written
        except BaseException:
            self.written += written
            if written:
                # Part of a frame is on the wire and the rest never will be: nothing sent on
                # this stream from now on could be framed right. Shut it (readers see EOF);
                # the descriptor itself stays until close(), so no number is reused under them.
                self.broken = True
                shutdown(self._fd, SHUT_RDWR)
            raise
        return 0

    cdef int _write_all(self, iovec *iov, Py_ssize_t first, Py_ssize_t count, object fds,
                        Py_ssize_t nfds, size_t *written, bint quick) except -1:
        # quick: a small write, tried first without letting the GIL go (see _drain).
        cdef msghdr message
        cdef ssize_t sent
        cdef Py_ssize_t batch, k
        cdef hx_fd_control control
        cdef cmsghdr *header
        cdef int *slots
        while first < count:
            batch = min(count - first, <Py_ssize_t>_MAX_IOV)
            memset_msghdr(&message)
            message.msg_iov = iov + first
            message.msg_iovlen = <size_t>batch
            if nfds:
                message.msg_control = &control
                message.msg_controllen = CMSG_SPACE(nfds * sizeof(int))
                header = CMSG_FIRSTHDR(&message)
                header.cmsg_level = SOL_SOCKET
                header.cmsg_type = SCM_RIGHTS
                header.cmsg_len = CMSG_LEN(nfds * sizeof(int))
                slots = <int *>CMSG_DATA(header)
                for k in range(nfds):
                    slots[k] = fds[k]
            if quick:
                quick = False
                sent = sendmsg(self._fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT)
                if sent < 0 and errno == EAGAIN:
                    continue   # the socket is full: wait for room without the GIL
            else:
                with nogil:
                    sent = sendmsg(self._fd, &message, MSG_NOSIGNAL)
            if sent < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    continue
                _raise_errno()
            nfds = 0
            written[0] += <size_t>sent
            while sent > 0 and first < count:
                if <size_t>sent >= iov[first].iov_len:
                    sent -= iov[first].iov_len
                    first += 1
                else:
                    iov[first].iov_base = <char *>iov[first].iov_base + sent
                    iov[first].iov_len -= sent
                    sent = 0
            while first < count and iov[first].iov_len == 0:
                first += 1
        return 0

    def send(self, buffers, fds=()):
        """Write a list of buffers, in order, as one stream of bytes, after everything queued.

        Args:
            buffers: bytes-like objects.
            fds: up to 16 descriptors to pass (SCM_RIGHTS) with the first byte. They stay
                open here; the receiver gets its own copies.

        Returns:
            The stream offset just past these bytes (compare with ``written``).

        Raises:
            BlockingIOError: the send timeout expired (part may have been written).
            OSError: the connection broke.
            ValueError: more than 16 descriptors.
        """
        return self._send(buffers, fds)

    cdef uint64_t _send(self, object buffers, object fds=None) except? 0:
        # A few buffers (the usual case) describe themselves on the stack; more need the heap.
        cdef Py_buffer stack_views[8]
        cdef iovec stack_iov[8]
        cdef Py_ssize_t count = len(buffers), i, acquired = 0
        cdef Py_buffer *views = stack_views
        cdef iovec *iov = stack_iov
        cdef uint64_t total = 0, end = 0
        if count > 8:
            views = <Py_buffer *>malloc(count * sizeof(Py_buffer))
            iov = <iovec *>malloc(count * sizeof(iovec))
            if views == NULL or iov == NULL:
                free(views)
                free(iov)
                raise MemoryError()
        try:
            for i in range(count):
                PyObject_GetBuffer(buffers[i], &views[i], PyBUF_SIMPLE)
                acquired += 1
                iov[i].iov_base = views[i].buf
                iov[i].iov_len = <size_t>views[i].len
                total += <uint64_t>views[i].len
            self._lock_send()
            try:
                if self._fd < 0:
                    raise OSError(EBADF, "the channel is closed")
                if self._queued:
                    self._drain(0)   # what was queued before us leaves first
                self.submitted += total
                end = self.submitted
                try:
                    self._send_iov(iov, count, fds, total <= NOGIL_THRESHOLD_BYTES)
                except BaseException:
                    if not self.broken:   # none of it left (a part would have broken it)
                        if self.submitted == end:
                            self.submitted -= total   # nothing came after: never submitted
                        else:
                            # Frames queued meanwhile were placed after ours: their stream
                            # offsets (their descriptors' places) would be wrong.
                            self._break()
                    raise
                if self._queued:
                    self._drain_quietly()   # queued while we wrote
            finally:
                PyThread_release_lock(self._send_lock)
        finally:
            for i in range(acquired):
                PyBuffer_Release(&views[i])
            if views != stack_views:
                free(views)
                free(iov)
        return end

    # The outbox ------------------------------------------------------------------------------
    # Small frames are packed into _queue with the GIL held, so appending needs no lock of its
    # own. Whoever holds the send lock writes: it detaches the queue, sends it without the GIL
    # (other threads keep appending to the spare buffer meanwhile) and loops until the queue is
    # empty. It checks that and releases the lock without letting the GIL go in between, so a
    # thread that queued a frame and found the lock taken can leave: the holder will write it.

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t want = self._queued + extra, cap
        cdef unsigned char *grown
        if want <= self._queue_cap:
            return 0
        cap = max(want, max(2 * self._queue_cap, _BATCH_BYTES + 4096))
        grown = <unsigned char *>realloc(self._queue, <size_t>cap)
        if grown == NULL:
            raise MemoryError()
        self._queue = grown
        self._queue_cap = cap
        return 0

    cdef uint64_t _post(self, uint32_t msg_type, object payload, uint64_t request_id) except? 0:
        cdef _Input ref
        cdef hx_header h
        cdef unsigned char *dst
        cdef Py_ssize_t size
        if self._fd < 0:
            raise OSError(EBADF, "the channel is closed")
        if self.broken:
            raise OSError(EPIPE, "the channel broke in the middle of a frame")
        # A buffer export (not the bytearray shortcut): the backpressure write below lets the
        # GIL go, and the export keeps the payload from being resized meanwhile.
        _acquire(payload, &ref, False)
        try:
            _check_frame_args(msg_type, 0, ref.len)
            size = HEADER_SIZE + ref.len
            if self._queued and self._queued + size > self.max_queue:
                # Full: this thread writes it out itself, waiting its turn (backpressure).
                self._lock_send()
                try:
                    self._drain(0)
                finally:
                    PyThread_release_lock(self._send_lock)
            self._reserve(size)
            # From here to the end, the GIL is held throughout (no _crc/_copy, which let it go
            # for large payloads): dst points into a queue another thread may realloc or detach.
            dst = self._queue + self._queued
            _fill_header(&h, msg_type, 0, <size_t>ref.len,
                         crc16_kernel(0xFFFF, ref.buf, <size_t>ref.len), request_id)
            hx_pack_header(dst, &h)
            memcpy(dst + HEADER_SIZE, ref.buf, <size_t>ref.len)
        finally:
            _release(&ref)
        self._queued += size
        self.submitted += <uint64_t>size
        return self.submitted

    cdef int _after_post(self, bint urgent) except -1:
        # Write now: a request (never kept waiting), a full batch, or an Event that follows
        # the one before by flush_interval or more (nothing to batch it with). Otherwise leave
        # it for the flush deadline.
        cdef double now
        cdef bint quiet = False
        if not urgent:
            now = _now()
            quiet = now - self._last_lazy >= self.flush_interval
            self._last_lazy = now
        if urgent or (not self._corked and (quiet or self._queued >= _BATCH_BYTES)):
            if PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
                try:
                    self._drain(0)
                finally:
                    PyThread_release_lock(self._send_lock)
            # else the thread holding the lock writes our frame before it lets go
        elif not self._scheduled and self.on_queued is not None:
            self._schedule()
        return 0

    cdef int _after_offer(self) except -1:
        # As _after_post for an Event, but never waiting for the socket: what it will not take
        # now is left to the flusher (or to the thread that holds the send lock).
        cdef double now = _now()
        cdef bint quiet = now - self._last_lazy >= self.flush_interval
        cdef int left = 0
        self._last_lazy = now
        if not self._corked and (quiet or self._queued >= _BATCH_BYTES):
            if not PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
                return 0   # the holder writes our frames before it lets go
            try:
                left = self._drain(MSG_DONTWAIT)
            finally:
                PyThread_release_lock(self._send_lock)
            if not left:
                return 0
        if not self._scheduled and self.on_queued is not None:
            self._schedule()
        return 0

    cdef int _schedule(self) except -1:
        self._scheduled = True
        try:
            self.on_queued(self)
        except BaseException:
            self._scheduled = False   # or no later Event would ever ask again
            raise
        return 0

    cdef int _drain(self, int flags) except -1:
        # The caller holds the send lock. Returns 1 if MSG_DONTWAIT stopped it with bytes left.
        # Invariant: self.written is the stream offset of buf[done] (the queue always follows
        # the bytes already written), which places the queued descriptors within buf.
        cdef unsigned char *buf
        cdef Py_ssize_t n, done, cap, chunk, ahead
        cdef ssize_t sent = 0
        cdef int error = 0, fd
        cdef bint quick
        while self._queued:
            if self._fd < 0:
                raise OSError(EBADF, "the channel is closed")
            buf, n, cap = self._queue, self._queued, self._queue_cap
            self._queue, self._queue_cap, self._queued = self._spare, self._spare_cap, 0
            self._spare, self._spare_cap = NULL, 0   # detached: ours until the loop ends
            done = 0
            # A small write is tried first with the GIL held and MSG_DONTWAIT: copying a few
            # KiB into the socket buffer takes microseconds, while letting the GIL go invites
            # another thread in and makes this one wait for it back (a context switch or two).
            quick = n <= NOGIL_THRESHOLD_BYTES
            while done < n:
                fd = -1
                chunk = n - done
                if self._fd_count:
                    ahead = <Py_ssize_t>(<long long>self._fd_at[0] - <long long>self.written)
                    if ahead < 0 or (ahead == 0 and self._fd_end[0] <= self.written):
                        # Offsets out of step (cannot happen while they are kept right): stop
                        # rather than write from outside the buffer or without the descriptor.
                        self._requeue(buf, cap, done, n)
                        self._break()
                        raise OSError(EPIPE, "the outbox lost track of a descriptor's frame")
                    if ahead == 0:   # a descriptor's frame starts here: it goes alone with it
                        fd = self._fd_fds[0]
                        chunk = min(chunk, <Py_ssize_t>(self._fd_end[0] - self.written))
                    elif ahead < chunk:
                        chunk = ahead   # up to that frame, without the descriptor
                if quick:
                    quick = False
                    sent = _send_with_fd(self._fd, buf + done, <size_t>chunk, fd,
                                         flags | MSG_NOSIGNAL | MSG_DONTWAIT)
                    if sent < 0:
                        error = errno
                        if error == EAGAIN and not flags & MSG_DONTWAIT:
                            continue   # full: wait for room without the GIL
                else:
                    with nogil:
                        sent = _send_with_fd(self._fd, buf + done, <size_t>chunk, fd,
                                             flags | MSG_NOSIGNAL)
                        if sent < 0:
                            error = errno
                if sent < 0:
                    if error == EINTR:
                        try:
                            PyErr_CheckSignals()
                        except BaseException:
                            self._requeue(buf, cap, done, n)
                            raise
                        continue
                    break
                if fd >= 0 and sent > 0:   # it left with the frame's first byte
                    close_fd(fd)
                    self._fd_count -= 1
                    memmove(self._fd_at, self._fd_at + 1, self._fd_count * sizeof(uint64_t))
                    memmove(self._fd_end, self._fd_end + 1, self._fd_count * sizeof(uint64_t))
                    memmove(self._fd_fds, self._fd_fds + 1, self._fd_count * sizeof(int))
                done += sent
                self.written += <uint64_t>sent
            if done < n:
                self._requeue(buf, cap, done, n)   # in front of what came meanwhile
                if error == EAGAIN and flags & MSG_DONTWAIT:
                    return 1
                # OSError picks the subclass: EAGAIN (a kernel timeout) is BlockingIOError.
                raise OSError(error, strerror(error).decode())
            if self._spare == NULL and cap <= _KEEP_SPARE_BYTES:
                self._spare, self._spare_cap = buf, cap
            else:
                free(buf)   # a burst's big buffer is not kept for good
        return 0

    cdef int _break(self) except -1:
        # The stream can no longer be framed right: shut it for good (readers see its end);
        # the descriptor itself stays until close(), so no number is reused under anyone.
        self.broken = True
        if self._fd >= 0:
            shutdown(self._fd, SHUT_RDWR)
        return 0

    cdef int _queue_fd(self, int fd, uint64_t at, uint64_t end) except -1:
        # A duplicate of fd, to ride on the first byte of the frame at [at, end).
        cdef Py_ssize_t cap
        cdef void *grown
        cdef int copy
        if self._fd_count == self._fd_cap:
            cap = max(4, 2 * self._fd_cap)
            grown = realloc(self._fd_at, cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._fd_at = <uint64_t *>grown
            grown = realloc(self._fd_end, cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._fd_end = <uint64_t *>grown
            grown = realloc(self._fd_fds, cap * sizeof(int))
            if grown == NULL:
                raise MemoryError()
            self._fd_fds = <int *>grown
            self._fd_cap = cap
        copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        if copy < 0:
            _raise_errno()
        self._fd_at[self._fd_count] = at
        self._fd_end[self._fd_count] = end
        self._fd_fds[self._fd_count] = copy
        self._fd_count += 1
        return 0

    cdef void _drop_fds(self) noexcept:
        cdef Py_ssize_t k
        for k in range(self._fd_count):
            close_fd(self._fd_fds[k])
        self._fd_count = 0

    cdef int _drain_quietly(self) except -1:
        # After the holder's own bytes left: frames others queued meanwhile. A failure here is
        # theirs to see (the next write raises it again); the bytes stay queued, in order.
        try:
            self._drain(0)
        except OSError:
            if self._queued and not self._scheduled and self.on_queued is not None:
                self._schedule()
        return 0

    cdef int _requeue(self, unsigned char *buf, Py_ssize_t cap, Py_ssize_t start,
                      Py_ssize_t end) except -1:
        # buf[start:end] did not leave: it goes back in front of what was queued meanwhile.
        cdef Py_ssize_t tail = end - start, total = end - start + self._queued
        cdef unsigned char *grown
        if total > cap:
            grown = <unsigned char *>realloc(buf, <size_t>total)
            if grown == NULL:
                free(buf)
                self.broken = True
                shutdown(self._fd, SHUT_RDWR)
                raise MemoryError()
            buf, cap = grown, total
        memmove(buf, buf + start, <size_t>tail)
        if self._queued:
            memcpy(buf + tail, self._queue, <size_t>self._queued)
        free(self._spare)
        self._spare, self._spare_cap = self._queue, self._queue_cap
        self._queue, self._queue_cap, self._queued = buf, cap, total
        return 0

    def post(self, msg_type, payload, request_id, urgent=True):
        """Queue one frame, packed straight into the outbox, behind everything submitted.

        Args:
            msg_type: a ``MessageType``.
            payload: a C-contiguous buffer (meant for small ones: it is copied once).
            request_id: u64.
            urgent: write now if no other thread is writing (else that thread writes it
                before it stops). Not urgent, it may wait up to ``flush_interval`` for company.

        Returns:
            The stream offset just past this frame (compare with ``written``).

        Raises:
            As ``send``, and ValueError or OverflowError as ``encode_frame``. An OSError raised
            once the frame was queued carries its offset as ``stream_end``.
        """
        cdef uint64_t end = self._post(_index(msg_type), payload, _index(request_id))
        try:
            self._after_post(urgent)
        except OSError as error:
            error.stream_end = end   # queued, but the write failed: was it ours that failed?
            raise
        return end

    def post_many(self, msg_type, payloads, request_ids):
        """Queue one frame per payload, with the matching request id, and write them all now
        (urgent), in as few writes as the queue bound allows.

        Returns:
            The stream offset just past the last frame.

        Raises:
            As ``post``. ValueError: the two sequences differ in length.
        """
        cdef uint32_t type_ = _index(msg_type)
        cdef uint64_t end = self.submitted
        if len(payloads) != len(request_ids):
            raise ValueError("one request id per payload")
        for payload, request_id in zip(payloads, request_ids):
            end = self._post(type_, payload, _index(request_id))
        try:
            self._after_post(True)
        except OSError as error:
            error.stream_end = end
            raise
        return end

    def event(self, payload):
        """Queue an Event (request id from the channel's own count) without urgency."""
        self._event_id += 1
        self._post(3, payload, self._event_id)
        self._after_post(False)

    def flush(self):
        """Write everything queued, waiting for another writer to finish first.

        Raises:
            As ``send``; what could not be written stays queued.
        """
        self._lock_send()
        try:
            self._drain(0)
        finally:
            PyThread_release_lock(self._send_lock)

    def flush_due(self, bint mark=True):
        """For the deadline flusher: write the queue without blocking, unless another thread
        is writing (it will) or the channel is corked.

        Args:
            mark: with bytes left, note that the flusher has them (no new ``on_queued`` call
                until it flushes again). False when nobody will: the next Event asks anew.

        Returns:
            True when bytes are left that the socket would not take yet: call again later.
            A connection error shuts the stream (its readers see the end), as nobody is
            there to raise it to.
        """
        cdef int left = 0
        self._scheduled = False
        if not self._queued or self._corked or self._fd < 0:
            return False
        if not PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
            return False
        try:
            left = self._drain(MSG_DONTWAIT)
        except OSError:
            self.broken = True
            shutdown(self._fd, SHUT_RDWR)
        finally:
            PyThread_release_lock(self._send_lock)
        if left and mark:
            self._scheduled = True
        return bool(left)

    def cork(self):
        """Hold Events in the queue (until ``uncork``, a request, or a full queue)."""
        self._corked += 1

    def uncork(self):
        """Undo one ``cork``. The caller flushes when it wants the batch out."""
        if self._corked:
            self._corked -= 1

    @property
    def queued(self):
        """Bytes waiting in the outbox."""
        return self._queued

    def settled_written(self):
        """``written`` once no write is in progress (waits for one to end): whether a frame
        left can then be told exactly, for example after the connection failed."""
        self._lock_send()
        try:
            return self.written
        finally:
            PyThread_release_lock(self._send_lock)

    cdef list _receive(self, int flags):
        # One recvmsg, decoded. None at end of stream. Descriptors that came with the bytes
        # are kept in self.fds, close-on-exec.
        cdef ssize_t count
        cdef msghdr message
        cdef iovec vector
        cdef hx_fd_control control
        cdef list frames
        cdef bint eager = self._eager
        if self._fd < 0:
            raise OSError(EBADF, "the channel is closed")
        while True:
            memset_msghdr(&message)
            vector.iov_base = self._buffer
            vector.iov_len = <size_t>self._size
            message.msg_iov = &vector
            message.msg_iovlen = 1
            message.msg_control = &control
            message.msg_controllen = sizeof(hx_fd_control)
            if eager:
                # Under load bytes are usually waiting: take them without letting the GIL go
                # (which would invite another thread in and make us wait for it back).
                eager = False
                count = recvmsg(self._fd, &message, flags | MSG_CMSG_CLOEXEC | MSG_DONTWAIT)
                if count < 0 and errno == EAGAIN and not flags & MSG_DONTWAIT:
                    self._eager = False   # nothing yet: block, and stop trying this first
                    continue
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
        frames = self.decoder._feed(self._buffer, count, None, False)
        if len(frames) > 1:
            self._eager = True   # several frames per read: the peer is ahead of us
        return frames

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

    def close(self):
        """Close the socket (and unclaimed descriptors). Waits for a send in progress to end,
        so no write can reach a descriptor number the kernel has handed out again. Idempotent.
        """
        self._lock_send()
        try:
            if self._fd >= 0:
                self._fd = -1
                self.dropped += <uint64_t>self._queued
                self._queued = 0
                self._drop_fds()
                self._sock.close()
        finally:
            PyThread_release_lock(self._send_lock)
        self.close_fds()

    def abort(self, reason):
        """Cut the stream in both directions now, from any thread, without waiting for a
        writer: readers see its end, writers an error. ``aborted`` keeps the first reason.
        The descriptor itself stays open until ``close``."""
        if self.aborted is None:
            self.aborted = reason
        self.broken = True
        if self._fd >= 0:   # close() clears _fd before closing it, both with the GIL held
            shutdown(self._fd, SHUT_RDWR)

    def offer(self, writes, Py_ssize_t limit, bint write=True):
        """Queue frames without waiting for the socket, all of them or none: a server pushes
        Events this way, so that one slow reader never holds up the writer.

        Args:
            writes: ``[(buffers, fds), ...]``, each write one frame (or several), with at most
                one descriptor, which rides on the write's first byte in a sendmsg of its own.
            limit: queue no more than this many bytes in all; an empty queue takes any.
            write: False: only queue them, and ask for them to be written soon
                (``on_queued(channel, True)``): this thread never touches the socket. For
                control Events, which any thread may give up (the last view of a payload
                dropped, the garbage collector).

        Returns:
            True when queued (written now if the socket takes them, else by the flusher, or by
            the thread writing now); False when they would take the queue over ``limit``:
            nothing was queued.

        Raises:
            OSError: the channel is closed or broken, or the socket failed.
        """
        cdef Py_ssize_t total = 0, count = 0, acquired = 0, k
        cdef uint64_t at
        cdef _Input *refs
        if self._fd < 0:
            raise OSError(EBADF, "the channel is closed")
        if self.broken:
            raise OSError(EPIPE, "the channel broke in the middle of a frame")
        for buffers, fds in writes:
            if len(fds) > 1:
                raise ValueError("at most one descriptor per write")
            if len(fds) and not any(len(memoryview(buffer)) for buffer in buffers):
                raise ValueError("a descriptor needs at least one byte to ride on")
            count += len(buffers)
        refs = <_Input *>malloc(max(1, count) * sizeof(_Input))
        if refs == NULL:
            raise MemoryError()
        try:
            for buffers, fds in writes:
                for buffer in buffers:
                    _acquire(buffer, &refs[acquired], False)
                    acquired += 1
                    total += refs[acquired - 1].len
            if self._queued and self._queued + total > limit:
                return False
            # The GIL is held from here to the end: the queue may be realloc'ed or detached by
            # another thread as soon as we let go.
            self._reserve(total)
            k = 0
            for buffers, fds in writes:
                at = self.submitted
                for buffer in buffers:
                    memcpy(self._queue + self._queued, refs[k].buf, <size_t>refs[k].len)
                    self._queued += refs[k].len
                    self.submitted += <uint64_t>refs[k].len
                    k += 1
                if len(fds):
                    self._queue_fd(fds[0], at, self.submitted)
        finally:
            for k in range(acquired):
                _release(&refs[k])
            free(refs)
        if write:
            self._after_offer()
        elif self.on_queued is not None:
            self._scheduled = True
            self.on_queued(self, True)
        return True


    @property
    def closed(self):
        """True once close() ran."""
        return self._fd < 0

    def fileno(self):
        """The socket's descriptor, or -1 once closed."""
        return self._fd

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
        frames = self._receive(0)
        if frames is not None and len(frames) == 1:
            only = frames[0]
            if only.type == 2 and only.flags == 0 and only.request_id == wanted:
                return only.payload
        self.pending = frames
        return None

    def serve(self, handler, on_error, reply_writes, Py_ssize_t small_max,
              Py_ssize_t inline_max, bint repeat=False):
        """Read once; answer the leading run of plain Requests; return the frames after it.

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

        Returns:
            The frames that follow the run, for the caller (often empty), or None at end of
            stream.

        Raises:
            As ``send`` and ``receive``.
        """
        cdef list frames
        while True:
            frames = self._serve_once(handler, on_error, reply_writes, small_max, inline_max)
            if not repeat or frames is None or frames or self._slow \
                    or self.decoder.in_frame or self.fds:
                return frames

    cdef list _serve_once(self, handler, on_error, reply_writes, Py_ssize_t small_max,
                          Py_ssize_t inline_max):
        # One read of serve(); self._slow says whether anything beyond the handler ran.
        cdef list frames = self._receive(0)
        cdef list out = []
        cdef Py_ssize_t i = 0, count
        cdef Frame frame
        cdef bint flush = False, slow = False
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
            if frame.type != 1 or frame.flags != 0:
                break
            writes = None
            try:
                result = handler(frame.payload)
                if result is None:
                    result = b""
                if type(result) is bytes and len(<bytes>result) < small_max:
                    out.append(encode_frame(2, result, frame.request_id))
                elif type(result) is bytes and len(<bytes>result) < inline_max:
                    out.append(encode_header(2, result, frame.request_id))
                    out.append(result)   # not copied into a frame; nor held past this write
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


cdef inline void memset_msghdr(msghdr *message) noexcept nogil:
    message.msg_name = NULL
    message.msg_namelen = 0
    message.msg_iov = NULL
    message.msg_iovlen = 0
    message.msg_control = NULL
    message.msg_controllen = 0
    message.msg_flags = 0


# Mapping: a memory mapping of a descriptor that keeps no descriptor -------------------------

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *address, size_t length, int protection, int flags, int fd, long offset)
    int munmap(void *address, size_t length)
    int madvise(void *address, size_t length, int advice)
    const int PROT_READ
    const int PROT_WRITE
    const int MAP_SHARED
    const int MAP_PRIVATE
    void *MAP_FAILED


@cython.final
@cython.no_gc_clear   # __dealloc__ gives the charges back; they hold no reference to us
cdef class Mapping:
    """``length`` bytes of a file descriptor mapped into memory, exposing the buffer protocol.

    Unlike ``mmap.mmap``, it keeps no duplicate of the descriptor: once mapped, the caller may
    close it. Its buffer exports are counted; ``close()`` refuses while one is alive, and the
    memory is unmapped when the object goes. Budgets charged for it with ``charge`` are given
    back when it is unmapped, so they count memory that is really mapped.

    Args:
        fd: the descriptor (not kept).
        length: bytes to map, at least 1.
        writable: map with PROT_WRITE; otherwise writable exports are refused.
        private: MAP_PRIVATE (copy-on-write) instead of MAP_SHARED.
        offset: where the mapping starts in the file; a multiple of the page size.

    Raises:
        OSError: mmap failed (ENOMEM, EACCES, ...).
        ValueError: ``length`` is not positive or ``offset`` is negative.
    """

    def __cinit__(self, int fd, Py_ssize_t length, bint writable=False, bint private=False,
                  Py_ssize_t offset=0):
        cdef void *address
        cdef int protection = PROT_READ | (PROT_WRITE if writable else 0)
        cdef int flags = MAP_PRIVATE if private else MAP_SHARED
        self._address = NULL
        self._charges = []
        if length <= 0 or offset < 0:
            raise ValueError("a mapping needs a positive length and an offset of 0 or more")
        with nogil:
            address = mmap(NULL, <size_t>length, protection, flags, fd, offset)
        if address == MAP_FAILED:
            _raise_errno()
        self._address = <unsigned char *>address
        self._size = length
        self._writable = writable
        self.exports = 0

    def __dealloc__(self):
        self._unmap()

    cdef int _unmap(self) except -1:
        cdef MemoryBudget budget
        if self._address != NULL:
            munmap(self._address, <size_t>self._size)
            self._address = NULL
            for budget, amount in self._charges:
                budget.give(amount)
            self._charges = []
        return 0

    def charge(self, MemoryBudget budget, Py_ssize_t amount):
        """Note that ``amount`` was taken from ``budget`` for this mapping: it is given back
        when the mapping is unmapped (by ``close`` or when the object goes)."""
        if self._address == NULL:
            budget.give(amount)
        else:
            self._charges.append((budget, amount))

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self._address == NULL:
            raise ValueError("the mapping is closed")
        if flags & PyBUF_WRITABLE and not self._writable:
            raise BufferError("the mapping is read-only")
        PyBuffer_FillInfo(view, self, self._address, self._size, not self._writable, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    def __len__(self):
        return self._size

    @property
    def closed(self):
        """True once unmapped."""
        return self._address == NULL

    def close(self):
        """Unmap now. Idempotent.

        Raises:
            BufferError: a view of it is still alive.
        """
        if self.exports:
            raise BufferError(f"cannot close a mapping: {self.exports} export(s) are alive")
        self._unmap()

    def madvise(self, int advice, Py_ssize_t start=0, length=None):
        """madvise(2) on ``[start, start + length)`` (default: to the end); ``start`` a multiple
        of the page size.

        Raises:
            OSError: the kernel refused (EINVAL for an advice it does not know, say).
            ValueError: the range is outside the mapping, or it is closed.
        """
        cdef Py_ssize_t span = self._size - start if length is None else length
        cdef int result
        if self._address == NULL:
            raise ValueError("the mapping is closed")
        if start < 0 or span < 0 or start > self._size or span > self._size - start:
            raise ValueError(f"[{start}, {start}+{span}) is outside the {self._size}-byte "
                             f"mapping")
        with nogil:
            result = madvise(self._address + start, <size_t>span, advice)
        if result != 0:
            _raise_errno()


# SharedRegion: a window of a shared mapping lent to the application --------------------------

#: A SharedRegion counts every export of its buffer, slices included, so the protocol may lend
#: views of shared memory to the application and learn when the last one goes.
SEES_VIEW_RELEASE = True

@cython.final
cdef class SharedRegion:
    """A window of a shared mapping lent to the application, with its views counted.

    Args:
        mapping: the object whose memory is shared (an mmap); its buffer is held until release.
        offset, length: the window, checked against the mapping.
        readonly: refuse writable views.
        on_release: called once with the region when it is released with no view alive.
        auto_release: release as soon as the last view is gone (for regions lent out as a
            single memoryview, whose release or collection then gives the memory back).

    Raises:
        ShmError: the window is outside the mapping.

    numpy: ``numpy.frombuffer(memoryview)`` keeps the memoryview but no buffer export of it,
    so releasing that memoryview while the array lives leaves the array dangling. Release views
    only after the arrays made from them are gone; with the compiled core, hand the region
    itself to numpy, which then holds an export the region counts.
    """

    def __cinit__(self, mapping, Py_ssize_t offset, Py_ssize_t length, bint readonly=True,
                  on_release=None, bint auto_release=False):
        PyObject_GetBuffer(mapping, &self._source, PyBUF_SIMPLE if readonly
                           else PyBUF_SIMPLE | PyBUF_WRITABLE)
        self._has_source = True
        if offset < 0 or length < 0 or offset > self._source.len \
                or length > self._source.len - offset:
            PyBuffer_Release(&self._source)
            self._has_source = False
            raise _errors.ShmError(f"region [{offset}, {offset}+{length}) is outside the "
                                   f"{self._source.len}-byte mapping")
        self._offset = offset
        self._length = length
        self._readonly = readonly
        self._on_release = on_release
        self._auto_release = auto_release
        self.exports = 0
        self.released = False

    def __dealloc__(self):
        if self._has_source:
            PyBuffer_Release(&self._source)

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self.released:
            raise BufferError("this region was released")
        if flags & PyBUF_WRITABLE and self._readonly:
            raise BufferError("this region is read-only")
        PyBuffer_FillInfo(view, self, <char *>self._source.buf + self._offset, self._length,
                          self._readonly, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1
        if self._auto_release and self.exports == 0 and not self.released:
            try:
                self.release()
            except Exception:   # a callback must not break a buffer release
                pass

    def __len__(self):
        return self._length

    def view(self):
        """A memoryview of the region (release it, or use ``with``, when done)."""
        return PyMemoryView_FromObject(self)

    def copy_in(self, data, Py_ssize_t offset=0):
        """Copy ``data`` into the region at ``offset``: the one copy a send makes.

        Raises:
            BufferError: the region is read-only or released.
            ShmError: ``data`` does not fit.
        """
        cdef _Input ref
        if self.released or self._readonly:
            raise BufferError("cannot copy into a released or read-only region")
        _acquire(data, &ref, False)
        self.exports += 1   # the copy may run without the GIL: release() must wait for it
        try:
            if offset < 0 or ref.len > self._length - offset:
                raise _errors.ShmError(f"{ref.len} bytes at offset {offset} do not fit a "
                                       f"{self._length}-byte region")
            _copy(<unsigned char *>self._source.buf + self._offset + offset, ref.buf,
                  <size_t>ref.len)
        finally:
            self.exports -= 1
            _release(&ref)

    def release(self):
        """Give the region back. Idempotent.

        Raises:
            BufferError: a view of it is still alive (its memory may not be recycled yet).
        """
        if self.released:
            return
        if self.exports:
            raise BufferError(f"{self.exports} view(s) of this region are still alive")
        self.released = True
        PyBuffer_Release(&self._source)
        self._has_source = False
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
