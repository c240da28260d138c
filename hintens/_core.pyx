# cython: language_level=3, embedsignature=True, embedsignature.format=clinic, binding=False, boundscheck=False, wraparound=False, cdivision=True
"""Compiled core of hintens: CRC16, the frame header and the sans-IO frame decoder.

hintens/_core_py.py is its pure-Python twin and documents the shared decoder rules; the two
export the same names and raise the same exceptions. Here every per-frame step (header parse,
validation, CRC, payload slicing) runs in C; Python objects are made only for the results.
Long C loops (CRC and copies of 64 KiB or more) run without the GIL.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_Append
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.number cimport PyNumber_Index
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
    PyThread_release_lock,
)

from . import _errors
from ._constants import (
    BATCH_WRITE_BYTES,
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_QUEUE_BYTES,
    PAYLOAD_COPY_THRESHOLD_BYTES,
)
from ._errors import IncompleteFrameError, ProtocolError

__all__ = [
    "Channel",
    "SharedRegion",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "crc16",
    "crc16_backend",
    "encode_frame",
    "encode_header",
    "pack_header_into",
    "unpack_header",
]

# Mirrors of hintens._constants as C constants (asserted equal in the tests).
cdef enum:
    HEADER_SIZE = 24
    MAGIC = 0x4850
    VERSION = 0x0100
    VERSION_MAJOR = 1
    KNOWN_FLAGS_MASK = 0x0003
    # Below this many bytes, releasing and re-taking the GIL costs more than the work.
    NOGIL_THRESHOLD_BYTES = 64 * 1024

cdef enum:
    _HEADER_STATE = 0
    _PAYLOAD_STATE = 1
    _DISCARD_STATE = 2

cdef Py_ssize_t COPY_THRESHOLD = PAYLOAD_COPY_THRESHOLD_BYTES
cdef uint64_t MAX_FRAME_PAYLOAD = 0xFFFFFFFF


cdef inline object _index(object value):
    # Cython's own int conversion would truncate a float; the twin's operator.index refuses it.
    # The range check (OverflowError) then comes from the assignment to the C field.
    return value if type(value) is int else PyNumber_Index(value)


cdef struct _Input:
    # A borrowed view of a caller's buffer. bytes are read in place (immutable). A short
    # bytearray is read in place only by callers that allocate nothing and keep the GIL until
    # they are done (no GC callback, no other thread can run and resize it); anything else goes
    # through the buffer protocol, whose export forbids resizing.
    const unsigned char *buf
    Py_ssize_t len
    bint exported
    Py_buffer view


cdef inline int _acquire(object obj, _Input *ref, bint writable,
                         bint no_allocation=False) except -1:
    if type(obj) is bytes and not writable:
        ref.buf = <const unsigned char *>PyBytes_AS_STRING(obj)
        ref.len = PyBytes_GET_SIZE(obj)
        ref.exported = False
    elif no_allocation and type(obj) is bytearray \
            and PyByteArray_GET_SIZE(obj) < NOGIL_THRESHOLD_BYTES:
        ref.buf = <const unsigned char *>PyByteArray_AS_STRING(obj)
        ref.len = PyByteArray_GET_SIZE(obj)
        ref.exported = False
    else:
        if writable:
            try:
                PyObject_GetBuffer(obj, &ref.view, PyBUF_SIMPLE | PyBUF_WRITABLE)
            except BufferError as error:
                raise TypeError("a writable buffer is needed") from error
        else:
            PyObject_GetBuffer(obj, &ref.view, PyBUF_SIMPLE)
        ref.buf = <const unsigned char *>ref.view.buf
        ref.len = ref.view.len
        ref.exported = True
    return 0


cdef inline void _release(_Input *ref) noexcept:
    if ref.exported:
        PyBuffer_Release(&ref.view)
        ref.exported = False


cdef inline uint16_t _crc(uint16_t crc, const unsigned char *p, size_t n) noexcept:
    if n >= NOGIL_THRESHOLD_BYTES:
        with nogil:
            crc = hx_crc16(crc, p, n)
        return crc
    return hx_crc16(crc, p, n)


cdef inline void _copy(unsigned char *dst, const unsigned char *src, size_t n) noexcept:
    if n >= NOGIL_THRESHOLD_BYTES:
        with nogil:
            memcpy(dst, src, n)
    else:
        memcpy(dst, src, n)


def crc16(data, value=0xFFFF):
    """CRC-16/IBM-3740 (poly 0x1021, init 0xFFFF, not reflected, xorout 0) of a buffer.

    Args:
        data: any C-contiguous buffer; it is not copied.
        value: the CRC of the data that precedes ``data``, to compute incrementally; 0xFFFF
            (the initial value) to start.

    Returns:
        The CRC as an int in [0, 0xFFFF].

    Raises:
        TypeError: ``data`` does not support the buffer protocol.
        BufferError: ``data`` is not C-contiguous.
        OverflowError: ``value`` is outside [0, 0xFFFF].
    """
    cdef _Input ref
    cdef uint16_t crc = _index(value)
    _acquire(data, &ref, False, True)
    crc = _crc(crc, ref.buf, <size_t>ref.len)
    _release(&ref)
    return crc


def crc16_backend():
    """Name of the CRC16 kernel chosen for this CPU: "vpclmulqdq-avx2", "pclmulqdq" or "table"."""
    return hx_crc16_impl().decode("ascii")


@cython.final
@cython.freelist(64)
cdef class FrameHeader:
    """The 24 header bytes, unpacked and unvalidated."""

    def __init__(self, uint16_t magic, uint16_t version, uint32_t type, uint16_t flags,
                 uint32_t length, uint16_t checksum, uint64_t request_id):
        self.magic = magic
        self.version = version
        self.type = type
        self.flags = flags
        self.length = length
        self.checksum = checksum
        self.request_id = request_id

    def __repr__(self):
        return (f"FrameHeader(magic=0x{self.magic:04x}, version=0x{self.version:04x}, "
                f"type={self.type}, flags=0x{self.flags:04x}, length={self.length}, "
                f"checksum=0x{self.checksum:04x}, request_id={self.request_id})")


@cython.final
@cython.freelist(256)
cdef class Frame:
    """One decoded frame."""

    def __init__(self, uint32_t type, uint16_t flags, uint16_t version, uint64_t request_id,
                 payload):
        self.type = type
        self.flags = flags
        self.version = version
        self.request_id = request_id
        self.payload = payload

    def __repr__(self):
        return (f"Frame(type={self.type}, flags=0x{self.flags:04x}, "
                f"version=0x{self.version:04x}, request_id={self.request_id}, "
                f"payload=<{len(self.payload)} bytes>)")


cdef inline Frame _new_frame(const hx_header *h, object payload):
    cdef Frame frame = Frame.__new__(Frame)
    frame.type = h.type
    frame.flags = h.flags
    frame.version = h.version
    frame.request_id = h.request_id
    frame.payload = payload
    return frame


cdef inline bint _plain_event(const hx_header *h) noexcept:
    # An application Event: no flags (no shared memory to release) and not a control message.
    return h.type == 3 and h.flags == 0 and h.request_id != 0


cdef int _check_frame_args(uint32_t msg_type, uint16_t flags, Py_ssize_t n) except -1:
    if not 1 <= msg_type <= 4:
        raise ValueError(f"msg_type must be 1-4 (a MessageType), not {msg_type}")
    if flags & ~KNOWN_FLAGS_MASK:
        raise ValueError(f"flags 0x{flags:04x} set reserved bits")
    if <uint64_t>n > MAX_FRAME_PAYLOAD:
        raise ValueError(f"payload of {n} bytes does not fit the u32 length field")
    return 0


cdef inline void _fill_header(hx_header *h, uint32_t msg_type, uint16_t flags, size_t n,
                              uint16_t crc, uint64_t request_id) noexcept:
    h.magic = MAGIC
    h.version = VERSION
    h.type = msg_type
    h.flags = flags
    h.length = <uint32_t>n
    h.checksum = crc
    h.request_id = request_id


def encode_header(msg_type, payload, request_id, flags=0):
    """The 24-byte header for ``payload``, for a scatter/gather write of header then payload.

    Args:
        msg_type: a ``MessageType`` (1-4).
        payload: any C-contiguous buffer; only its length and CRC are read.
        request_id: u64 chosen by the requester.
        flags: ``Flags`` bits; reserved bits are refused.

    Returns:
        24 bytes.

    Raises:
        ValueError: unknown type, reserved flags, or a payload over 4 GiB - 1.
        OverflowError: a field does not fit its width.
    """
    cdef _Input ref
    cdef hx_header h
    cdef bytes out
    cdef uint32_t type_ = _index(msg_type)
    cdef uint64_t rid = _index(request_id)
    cdef uint16_t flags_ = _index(flags)
    _acquire(payload, &ref, False)
    try:
        _check_frame_args(type_, flags_, ref.len)
        _fill_header(&h, type_, flags_, <size_t>ref.len, _crc(0xFFFF, ref.buf, <size_t>ref.len),
                     rid)
    finally:
        _release(&ref)
    out = PyBytes_FromStringAndSize(NULL, HEADER_SIZE)
    hx_pack_header(<unsigned char *>PyBytes_AS_STRING(out), &h)
    return out


def encode_frame(msg_type, payload, request_id, flags=0):
    """A complete frame: header followed by a copy of the payload.

    Args and Raises: as ``encode_header``.

    Returns:
        ``24 + len(payload)`` bytes.
    """
    cdef _Input ref
    cdef hx_header h
    cdef bytes out = None
    cdef unsigned char *dst
    cdef uint32_t type_ = _index(msg_type)
    cdef uint64_t rid = _index(request_id)
    cdef uint16_t flags_ = _index(flags)
    _acquire(payload, &ref, False)
    try:
        _check_frame_args(type_, flags_, ref.len)
        out = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + ref.len)
        dst = <unsigned char *>PyBytes_AS_STRING(out)
        _fill_header(&h, type_, flags_, <size_t>ref.len, _crc(0xFFFF, ref.buf, <size_t>ref.len),
                     rid)
        hx_pack_header(dst, &h)
        _copy(dst + HEADER_SIZE, ref.buf, <size_t>ref.len)
    finally:
        _release(&ref)
    return out


def pack_header_into(buffer, offset, msg_type, length, checksum, request_id, flags=0,
                     version=0x0100):  # the literal keeps the signature introspectable
    """Write a header with the given raw field values into ``buffer`` at ``offset``.

    Nothing is validated beyond field widths: this is the low-level twin of
    ``struct.pack_into``. Use ``encode_header`` to have length and CRC computed.

    Raises:
        OverflowError: a field does not fit its width.
        ValueError: ``offset`` is negative or fewer than 24 bytes follow it.
        TypeError: ``buffer`` is not a writable buffer.
    """
    cdef _Input ref
    cdef hx_header h
    cdef Py_ssize_t at = _index(offset)
    h.magic = MAGIC
    h.version = _index(version)
    h.type = _index(msg_type)
    h.flags = _index(flags)
    h.length = _index(length)
    h.checksum = _index(checksum)
    h.request_id = _index(request_id)
    _acquire(buffer, &ref, True, True)
    try:
        if at < 0 or ref.len - at < HEADER_SIZE:
            raise ValueError(
                f"need {HEADER_SIZE} bytes at offset {at} of a {ref.len}-byte buffer")
        hx_pack_header(<unsigned char *>ref.buf + at, &h)
    finally:
        _release(&ref)


def unpack_header(buffer, offset=0):
    """Read the 24 header bytes at ``offset`` without validating them.

    Raises:
        ValueError: ``offset`` is negative or fewer than 24 bytes follow it.
        TypeError: ``buffer`` does not support the buffer protocol.
    """
    cdef _Input ref
    cdef hx_header h
    cdef Py_ssize_t at = _index(offset)
    _acquire(buffer, &ref, False, True)
    try:
        if at < 0 or ref.len - at < HEADER_SIZE:
            raise ValueError(
                f"need {HEADER_SIZE} bytes at offset {at} of a {ref.len}-byte buffer")
        hx_unpack_header(ref.buf + at, &h)
    finally:
        _release(&ref)
    cdef FrameHeader out = FrameHeader.__new__(FrameHeader)
    out.magic = h.magic
    out.version = h.version
    out.type = h.type
    out.flags = h.flags
    out.length = h.length
    out.checksum = h.checksum
    out.request_id = h.request_id
    return out


@cython.final
cdef class FrameDecoder:
    """Sans-IO frame decoder: bytes in, frames out. See hintens/_core_py.py for its rules."""

    def __cinit__(self):
        self._state = _HEADER_STATE
        self._header_len = 0
        self._payload = None
        self._assembled = 0
        self._remaining = 0
        self._backlog = b""
        self._failed = None
        self.frames_decoded = 0
        self.skip_events = False
        self.events_skipped = 0

    def __init__(self, max_payload=DEFAULT_MAX_PAYLOAD_BYTES):
        """Args:
            max_payload: the largest payload accepted, in bytes (at most 2**32 - 1).

        Raises:
            ValueError: ``max_payload`` is negative or over 2**32 - 1.
        """
        if not 0 <= max_payload <= MAX_FRAME_PAYLOAD:
            raise ValueError(f"max_payload must be in [0, {MAX_FRAME_PAYLOAD}]")
        self._max_payload = max_payload

    @property
    def max_payload(self):
        """The payload limit in bytes."""
        return self._max_payload

    @property
    def in_frame(self):
        """True between the first byte of a frame and its last (skipped payloads included)."""
        return self._header_len > 0 or self._state != _HEADER_STATE

    @property
    def pending(self):
        """Bytes received but not yet returned as frames (an unfinished frame and backlog)."""
        cdef Py_ssize_t assembling = 0
        if self._state == _PAYLOAD_STATE:
            assembling = HEADER_SIZE + self._assembled
        return self._header_len + assembling + len(self._backlog)

    def feed(self, data):
        """Decode the frames that ``data`` completes.

        Args:
            data: the next bytes of the stream, any C-contiguous buffer, any chunking.

        Returns:
            The frames completed by this call, in stream order, each exactly once.

        Raises:
            ProtocolError: a subclass per violation; see hintens/_core_py.py.
            BufferError: ``data`` is not C-contiguous.
        """
        cdef _Input ref
        _acquire(data, &ref, False)
        try:
            return self._feed(ref.buf, ref.len, data, type(data) is bytes)
        finally:
            _release(&ref)

    cdef list _feed(self, const unsigned char *data, Py_ssize_t n, object base, bint share):
        # feed() on raw memory; base is the object that owns it (shared only when share).
        cdef list frames = []
        cdef Py_ssize_t pos = 0
        cdef bytes joined
        if self._failed is not None:
            raise _errors.renew(self._failed)
        if self._backlog:
            joined = self._backlog + PyBytes_FromStringAndSize(<const char *>data, n)
            self._backlog = b""
            return self._feed(<const unsigned char *>PyBytes_AS_STRING(joined),
                              PyBytes_GET_SIZE(joined), joined, False)
        try:
            self._decode(data, n, base, share, frames, &pos)
        except ProtocolError as error:
            self.frames_decoded += len(frames)
            error.frames = frames
            if error.fatal:
                self._failed = error
            else:
                self._backlog = PyBytes_FromStringAndSize(<const char *>data + pos, n - pos)
            raise
        self.frames_decoded += len(frames)
        return frames

    def feed_eof(self):
        """Signal the end of the stream.

        Returns:
            Frames still waiting in the backlog after a recoverable error.

        Raises:
            IncompleteFrameError: the stream ended inside a frame.
            ProtocolError: the backlog holds a bad frame.
        """
        frames = self.feed(b"")
        if self.pending or self._state != _HEADER_STATE:
            raise IncompleteFrameError(
                f"stream ended inside a frame ({self.pending} bytes of it received)",
                self.pending)
        return frames

    cdef int _decode(self, const unsigned char *data, Py_ssize_t n, object base, bint share,
                     list frames, Py_ssize_t *pos_out) except -1:
        # pos_out always holds the first byte not yet consumed, so that a recoverable error
        # can keep the rest of the input as backlog.
        cdef Py_ssize_t pos = 0, take
        cdef hx_header h
        cdef uint16_t crc
        cdef object payload
        cdef object base_view = None
        while pos < n:
            if self._state == _DISCARD_STATE:
                take = min(self._remaining, n - pos)
                pos += take
                pos_out[0] = pos
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HEADER_STATE
            elif self._state == _PAYLOAD_STATE:
                take = min(self._remaining, n - pos)
                _copy(<unsigned char *>PyBytes_AS_STRING(self._payload) + self._assembled,
                      data + pos, <size_t>take)
                self._running_crc = _crc(self._running_crc, data + pos, <size_t>take)
                pos += take
                pos_out[0] = pos
                self._remaining -= take
                self._assembled += take
                if self._remaining == 0:
                    payload = self._payload
                    self._payload = None
                    self._assembled = 0
                    self._state = _HEADER_STATE
                    if self._running_crc != self._fields.checksum:
                        raise _errors.checksum_error(
                            self._fields.checksum, self._running_crc, self._fields.request_id,
                            self._fields.type)
                    if self.skip_events and _plain_event(&self._fields):
                        self.events_skipped += 1
                        self.frames_decoded += 1
                    else:
                        PyList_Append(frames, _new_frame(&self._fields, payload))
            elif self._header_len == 0 and n - pos >= HEADER_SIZE:
                # Fast path: a whole header in the input.
                hx_unpack_header(data + pos, &h)
                pos += HEADER_SIZE
                pos_out[0] = pos
                self._validate(&h)
                if n - pos >= <Py_ssize_t>h.length:
                    crc = _crc(0xFFFF, data + pos, h.length)
                    if crc != h.checksum:
                        pos += h.length
                        pos_out[0] = pos
                        raise _errors.checksum_error(h.checksum, crc, h.request_id, h.type)
                    if self.skip_events and _plain_event(&h):
                        pos += h.length
                        pos_out[0] = pos
                        self.events_skipped += 1
                        self.frames_decoded += 1
                        continue
                    if share and <Py_ssize_t>h.length >= COPY_THRESHOLD:
                        if base_view is None:
                            base_view = PyMemoryView_FromObject(base)
                        payload = base_view[pos:pos + h.length]
                    else:
                        payload = PyBytes_FromStringAndSize(<const char *>data + pos, h.length)
                    pos += h.length
                    pos_out[0] = pos
                    PyList_Append(frames, _new_frame(&h, payload))
                else:
                    self._start_payload(&h)
            else:
                take = min(HEADER_SIZE - self._header_len, n - pos)
                memcpy(self._header + self._header_len, data + pos, <size_t>take)
                self._header_len += take
                pos += take
                pos_out[0] = pos
                self._check_prefix()
                if self._header_len == HEADER_SIZE:
                    self._header_len = 0
                    hx_unpack_header(self._header, &h)
                    self._validate(&h)
                    if h.length:
                        self._start_payload(&h)
                    else:
                        if h.checksum != 0xFFFF:
                            raise _errors.checksum_error(h.checksum, 0xFFFF, h.request_id, h.type)
                        if self.skip_events and _plain_event(&h):
                            self.events_skipped += 1
                            self.frames_decoded += 1
                        else:
                            PyList_Append(frames, _new_frame(&h, b""))
        return 0

    cdef int _start_payload(self, const hx_header *h) except -1:
        # Only after _validate: the length is within the limit. The bytes object is written in
        # place while this decoder holds its only reference, and becomes the payload as is.
        self._fields = h[0]
        self._payload = PyBytes_FromStringAndSize(NULL, h.length)
        self._assembled = 0
        self._remaining = h.length
        self._running_crc = 0xFFFF
        self._state = _PAYLOAD_STATE
        return 0

    cdef int _check_prefix(self) except -1:
        cdef uint16_t magic
        if self._header_len >= 2:
            magic = (self._header[0] << 8) | self._header[1]
            if magic != MAGIC:
                raise _errors.bad_magic_error(magic)
        if self._header_len >= 3 and self._header[2] != VERSION_MAJOR:
            raise _errors.bad_version_error(self._header[2])
        return 0

    cdef int _validate(self, const hx_header *h) except -1:
        if h.magic != MAGIC:
            raise _errors.bad_magic_error(h.magic)
        if h.version >> 8 != VERSION_MAJOR:
            raise _errors.bad_version_error(h.version >> 8)
        if not 1 <= h.type <= 4:
            raise _errors.bad_type_error(h.type, h.request_id)
        if h.length > self._max_payload:
            raise _errors.too_large_error(h.length, self._max_payload, h.request_id, h.type)
        if h.flags & ~KNOWN_FLAGS_MASK:
            if h.length:
                self._state = _DISCARD_STATE
                self._remaining = h.length
            raise _errors.reserved_flags_error(h.flags, h.request_id, h.type)
        return 0


# Channel: a socket's receive buffer, decoder and send lock -----------------------------------

cdef enum:
    _MAX_IOV = 1024          # IOV_MAX on Linux
    _SCATTER_BYTES = 16 * 1024
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


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef Py_ssize_t _BATCH_BYTES = BATCH_WRITE_BYTES


@cython.final
cdef class Channel:
    """A connected stream socket's receive side (buffer and decoder) and a send lock.

    The socket stays owned by the caller, who also sets its kernel timeouts. Every syscall runs
    without the GIL. See hintens/_core_py.py for the semantics both cores share.
    """

    def __cinit__(self):
        self._buffer = NULL
        self._queue = NULL
        self._spare = NULL
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
                self._send_iov(iov, count, fds, total <= NOGIL_THRESHOLD_BYTES)
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
                         hx_crc16(0xFFFF, ref.buf, <size_t>ref.len), request_id)
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
        cdef unsigned char *buf
        cdef Py_ssize_t n, done, cap
        cdef ssize_t sent = 0
        cdef int error = 0
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
                if quick:
                    quick = False
                    sent = send(self._fd, buf, <size_t>n, flags | MSG_NOSIGNAL | MSG_DONTWAIT)
                    if sent < 0:
                        error = errno
                        if error == EAGAIN and not flags & MSG_DONTWAIT:
                            continue   # full: wait for room without the GIL
                else:
                    with nogil:
                        sent = send(self._fd, buf + done, <size_t>(n - done),
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
                done += sent
                self.written += <uint64_t>sent
            if done < n:
                self._requeue(buf, cap, done, n)   # in front of what came meanwhile
                if error == EAGAIN and flags & MSG_DONTWAIT:
                    return 1
                # OSError picks the subclass: EAGAIN (a kernel timeout) is BlockingIOError.
                raise OSError(error, strerror(error).decode())
            if self._spare == NULL:
                self._spare, self._spare_cap = buf, cap
            else:
                free(buf)
        return 0

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

    def flush_due(self):
        """For the deadline flusher: write the queue without blocking, unless another thread
        is writing (it will) or the channel is corked.

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
        if left:
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
                self._sock.close()
        finally:
            PyThread_release_lock(self._send_lock)
        self.close_fds()

    @property
    def closed(self):
        """True once close() ran."""
        return self._fd < 0

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

    def serve(self, handler, on_error, shm_reply=None):
        """Read once; answer the leading run of plain Requests; return the frames after it.

        ``handler(payload)`` returns the Response payload (bytes-like or None). If it raises an
        Exception, ``on_error(request_id, exception)`` returns the Error frame to send instead.
        Replies leave in one write, in request order. ``shm_reply(request_id, result)``, when
        given, may return the writes ``[(buffers, fds), ...]`` that carry a large result through
        shared memory; they go out on their own, in order, or it returns None for inline.

        Returns:
            The frames that follow the run, for the caller (often empty), or None at end of
            stream.

        Raises:
            As ``send`` and ``receive``.
        """
        cdef list frames = self._receive(0)
        cdef list out = []
        cdef Py_ssize_t i = 0, count
        cdef Frame frame
        if not frames:
            return frames
        count = len(frames)
        while i < count:
            frame = frames[i]
            if frame.type != 1 or frame.flags != 0:
                break
            try:
                result = handler(frame.payload)
                if result is None:
                    result = b""
                if type(result) is bytes and len(<bytes>result) < _SCATTER_BYTES:
                    out.append(encode_frame(2, result, frame.request_id))
                else:
                    writes = None if shm_reply is None else shm_reply(frame.request_id, result)
                    if writes is None:
                        out.append(encode_header(2, result, frame.request_id))
                        out.append(result)
                    else:
                        if out:
                            self._send(out, None)
                            out = []
                        for buffers, fds in writes:
                            self._send(buffers, fds)
                    result = None   # a lent payload goes back once nothing holds it
            except Exception as error:
                out.append(on_error(frame.request_id, error))
            i += 1
        if out:
            self._send(out, None)
        return frames[i:] if i else frames


cdef inline void memset_msghdr(msghdr *message) noexcept nogil:
    message.msg_name = NULL
    message.msg_namelen = 0
    message.msg_iov = NULL
    message.msg_iovlen = 0
    message.msg_control = NULL
    message.msg_controllen = 0
    message.msg_flags = 0


# SharedRegion: a window of a shared mapping lent to the application --------------------------

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
