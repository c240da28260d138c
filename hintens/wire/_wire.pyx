# cython: language_level=3, embedsignature=True, embedsignature.format=clinic, binding=False, boundscheck=False, wraparound=False, cdivision=True
"""Compiled wire kernels of hintens: CRC16, the frame header and the sans-IO frame decoder.

hintens/wire/_wire_py.py is its pure-Python twin (FrameDecoder's docstring states the decoder
rules both follow); the two export the same names and raise the same exceptions. Here every
per-frame step (header parse, validation, CRC, payload slicing) runs in C; Python objects are
made only for the results. Long C loops (CRC and copies of 64 KiB or more) run without the
GIL. No I/O: the socket transport (hintens/transport/_channel.pyx) cimports the decoder and the
inline helpers declared in _wire.pxd.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, _PyBytes_Resize
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.list cimport PyList_Append
from cpython.buffer cimport PyBUF_WRITE
from cpython.memoryview cimport PyMemoryView_FromMemory, PyMemoryView_FromObject
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)

# MADV_POPULATE_WRITE (Linux 5.14): fault a range in with one call. Older kernels refuse it
# (EINVAL), and the pages fault in one by one as before.
cdef int _MADV_POPULATE_WRITE = 23
cdef Py_ssize_t _PAGE = 4096
# A payload buffer grown past this has its new pages faulted in with one call rather than one
# fault each as bytes arrive (a fresh 64 MiB buffer: 16,384 faults).
cdef Py_ssize_t POPULATE_FROM = 4 * 1024 * 1024

from .. import _errors
from .._constants import (
    BUDGETED_FRAME_BYTES,
    CONTROL_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    PAYLOAD_COPY_THRESHOLD_BYTES,
)
from .._errors import IncompleteFrameError, ProtocolError

__all__ = [
    "MemoryBudget",
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

cdef Py_ssize_t COPY_THRESHOLD = PAYLOAD_COPY_THRESHOLD_BYTES
cdef uint64_t MAX_FRAME_PAYLOAD = 0xFFFFFFFF
cdef uint32_t CONTROL_MAX = CONTROL_MAX_PAYLOAD_BYTES
cdef Py_ssize_t BUDGETED_BYTES = BUDGETED_FRAME_BYTES
# An unfinished payload's buffer starts at this size (or its length, if smaller) and doubles as
# bytes arrive: a peer that declares a large frame and stalls holds only what it sent.
cdef Py_ssize_t FIRST_CAPACITY = 64 * 1024
# A payload with at least this much still to come is read straight into its buffer
# (FrameDecoder._direct), by a transport that can.
cdef Py_ssize_t DIRECT_MIN = 64 * 1024


# The spare: the last large payload this process decoded, kept so that the next one, on any
# connection, can be assembled in it once the application has let go of it (nothing but the
# spare refers to it). A fresh buffer is expensive past glibc's mmap threshold (32 MiB at most):
# its pages are faulted and zeroed one by one, about 25 ms for 64 MiB here, which costs a 64 MiB
# echo over TCP more than its copies do. One spare per process, from SPARE_MIN to SPARE_MAX
# bytes, so a peer cannot make us keep more than SPARE_MAX beyond what it is sending now.
cdef Py_ssize_t SPARE_MIN = 4 * 1024 * 1024
cdef Py_ssize_t SPARE_MAX = DEFAULT_MAX_PAYLOAD_BYTES
cdef object _spare = None
cdef Py_ssize_t _spare_room = 0      # the bytes _spare's allocation can hold (its size or more)

cdef extern from *:
    """
    /* A bytes object nothing else refers to, given a new length within its allocation: its
       size, the NUL after its bytes and its cached hash (which no longer describes it). */
    static inline void hx_bytes_relength(PyObject *o, Py_ssize_t length) {
        Py_SET_SIZE(o, length);
        PyBytes_AS_STRING(o)[length] = 0;
    #if defined(__GNUC__)
    #pragma GCC diagnostic push
    #pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    #endif
        ((PyBytesObject *)o)->ob_shash = -1;
    #if defined(__GNUC__)
    #pragma GCC diagnostic pop
    #endif
    }
    """
    void hx_bytes_relength(object o, Py_ssize_t length)
    Py_ssize_t Py_REFCNT(object o)


def spare_bytes():
    """The size of the buffer kept for the next large payload (0 when none is kept).

    The compiled decoder keeps the last payload of 4 MiB to 64 MiB it delivered, one per
    process, and assembles the next large payload in it if nothing else refers to it by then:
    a fresh buffer of that size costs a page fault per 4 KiB.
    """
    return _spare_room if _spare is not None else 0


def drop_spare():
    """Let go of the buffer kept for the next large payload (``spare_bytes``), if any."""
    global _spare, _spare_room
    _spare = None
    _spare_room = 0


cdef inline void _populate(char *start, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    # The whole pages of start[begin:end]; a refusal (an old kernel) changes nothing.
    cdef size_t first = (<size_t>(start + begin) + _PAGE - 1) & ~(<size_t>_PAGE - 1)
    cdef size_t last = (<size_t>(start + end)) & ~(<size_t>_PAGE - 1)
    if last > first:
        madvise(<void *>first, last - first, _MADV_POPULATE_WRITE)


cdef extern from "_crc16.h" nogil:
    uint16_t hx_crc16(uint16_t crc, const unsigned char *buf, size_t length)
    const char *hx_crc16_impl()

cdef extern from "_crc16_threads.h" nogil:
    uint16_t hx_crc16_threaded_on(uint16_t crc, const unsigned char *buf, size_t length,
                                  int threads)
    int hx_crc16_threads(size_t length)


cdef uint16_t crc16_kernel(uint16_t crc, const unsigned char *p, size_t n) noexcept nogil:
    return hx_crc16(crc, p, n)


cdef inline uint16_t _crc(uint16_t crc, const unsigned char *p, size_t n) noexcept:
    # A large buffer's CRC runs without the GIL, and from HX_CRC16_THREADED_MIN on several
    # CPUs when this thread may use them (_crc16_threads.h): a sender computes it before its
    # frame's first byte can leave, so the whole pass is latency.
    cdef int threads
    if n >= NOGIL_THRESHOLD_BYTES:
        # The count reads HINTENS_CRC_THREADS: here, where the GIL keeps os.environ still.
        threads = hx_crc16_threads(n)
        with nogil:
            if threads > 1:
                crc = hx_crc16_threaded_on(crc, p, n, threads)
            else:
                crc = hx_crc16(crc, p, n)
        return crc
    return hx_crc16(crc, p, n)


def crc16(data, value=0xFFFF):
    """CRC-16/IBM-3740 (poly 0x1021, init 0xFFFF, not reflected, xorout 0) of a buffer.

    From 16 MiB the compiled core shares the work among up to 4 threads: as many as the CPUs
    the calling thread may run on (fewer under a cgroup CPU quota of fewer), or
    ``HINTENS_CRC_THREADS`` if lower (1: one thread).

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


def crc16_threads(Py_ssize_t length):
    """How many threads ``crc16`` (and a frame's encoder or decoder) takes for ``length`` bytes.

    One below 16 MiB. From there, the CPUs this thread may run on (``os.sched_getaffinity``),
    fewer if the process's cgroup has a CPU quota of fewer (read once per process), at most 4,
    or ``HINTENS_CRC_THREADS`` if that is lower (1 keeps every CRC on the calling thread).
    """
    if length < 0:
        raise ValueError("a length cannot be negative")
    return hx_crc16_threads(<size_t>length)


def crc16_backend():
    """Name of the CRC16 kernel chosen for this CPU.

    "vpclmulqdq-avx512", "vpclmulqdq-avx2", "pclmulqdq" or "table"; ``HINTENS_CRC_IMPL``
    forces one.
    """
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
# A read of 256 KiB (RECEIVE_BUFFER_BYTES) holds up to about 2,100 frames of 100 B Events, all
# alive until the read is served: with 256 kept, most came from the allocator and went back.
@cython.freelist(2048)
cdef class Frame:
    """One decoded frame."""

    def __init__(self, uint32_t type, uint16_t flags, uint16_t version, uint64_t request_id,
                 payload):
        self.type = type
        self.flags = flags
        self.version = version
        self.request_id = request_id
        self.payload = payload
        if not PyObject_GC_IsTracked(self):   # a decoded frame (_new_frame) given any payload
            PyObject_GC_Track(<void *>self)

    def __repr__(self):
        return (f"Frame(type={self.type}, flags=0x{self.flags:04x}, "
                f"version=0x{self.version:04x}, request_id={self.request_id}, "
                f"payload=<{len(self.payload)} bytes>)")


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)
    void PyObject_GC_Track(void *op)
    int PyObject_GC_IsTracked(object op)


cdef inline Frame _new_frame(const hx_header *h, object payload):
    cdef Frame frame = Frame.__new__(Frame)
    frame.type = h.type
    frame.flags = h.flags
    frame.version = h.version
    frame.request_id = h.request_id
    frame.payload = payload
    if type(payload) is bytes:
        # A frame that holds only a bytes (its other fields are C integers, all read-only)
        # cannot be part of a reference cycle: left to the garbage collector, a read of a
        # few hundred small frames made each young-generation collection walk them all,
        # 15% of a server's time with a stream of Events. CPython's tuples do the same.
        PyObject_GC_UnTrack(<void *>frame)
    return frame


cdef inline bint _plain_event(const hx_header *h) noexcept:
    # An application Event: no flags (no shared memory to release) and not a control message.
    return h.type == 3 and h.flags == 0 and h.request_id != 0


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
cdef class MemoryBudget:
    """A count of bytes (or of anything else) that several owners draw from, bounded by
    ``limit``: the bytes all connections hold for unfinished frames, say, or the shared memory
    they map. Every call runs with the GIL held, so it needs no lock of its own.

    Args:
        limit: the most that may be taken at once (at least 0).

    Raises:
        ValueError: ``limit`` is negative.
    """

    def __init__(self, Py_ssize_t limit):
        if limit < 0:
            raise ValueError("a budget's limit must not be negative")
        self.limit = limit
        self.used = 0

    cpdef bint take(self, Py_ssize_t amount):
        """Take ``amount`` if it fits under the limit. Returns:
            True when taken (give it back later), False when it would not fit (nothing taken).
        """
        if amount < 0 or amount > self.limit - self.used:
            return False
        self.used += amount
        return True

    cpdef give(self, Py_ssize_t amount):
        """Give back ``amount`` taken earlier."""
        self.used = max(0, self.used - amount)

    def __repr__(self):
        return f"MemoryBudget(used={self.used}, limit={self.limit})"


@cython.final
cdef class FrameDecoder:
    """Sans-IO frame decoder: bytes in, frames out, from a byte stream fed in any pieces
    (``FrameDecoder(max_payload).feed(data)``).

    Rules (the compiled core and its pure-Python twin follow the same ones):

    * A frame's header is validated, in this order, before any of its payload is buffered:
      magic, major version, message type, length limit, reserved flags. The first two are
      checked as soon as their bytes arrive, so garbage is rejected without waiting for 24
      bytes.
    * Fatal errors (bad header, too large) poison the decoder: every later call raises again.
    * Recoverable errors (CRC, reserved flags) consume exactly the bad frame. Bytes after it
      that were already passed in are kept; ``feed(b"")`` decodes them.
    * Frames decoded before an error in the same call travel in the exception's ``frames``.
    * A payload is a read-only memoryview sharing the input when the input is ``bytes``, the
      frame lies wholly inside it and the payload has at least 1 KiB; otherwise it is a new
      ``bytes``.
    """

    def __cinit__(self):
        self._state = _HEADER_STATE
        self._header_len = 0
        self._payload = NULL
        self._capacity = 0
        self._room = 0
        self._reserved = 0
        self.budget = None
        self._assembled = 0
        self._remaining = 0
        self._backlog = b""
        self._failed = None
        self.frames_decoded = 0
        self.skip_events = False
        self.events_skipped = 0
        self.bytes_fed = 0
        memset(self._by_type, 0, sizeof(self._by_type))

    def __init__(self, max_payload=DEFAULT_MAX_PAYLOAD_BYTES):
        """Args:
            max_payload: the largest payload accepted, in bytes (at most 2**32 - 1).

        Raises:
            ValueError: ``max_payload`` is negative or over 2**32 - 1.
        """
        if not 0 <= max_payload <= MAX_FRAME_PAYLOAD:
            raise ValueError(f"max_payload must be in [0, {MAX_FRAME_PAYLOAD}]")
        self._max_payload = max_payload

    def __dealloc__(self):
        self._drop_payload()

    def close(self):
        """Drop the unfinished frame, if any, and give its bytes back to ``budget`` now (a
        connection that ends inside a frame). The decoder may not be fed afterwards."""
        self._drop_payload()
        self._state = _HEADER_STATE
        self._header_len = 0
        self._remaining = 0
        self._backlog = b""
        self._failed = _errors.ProtocolError("the decoder was closed")

    cdef void _drop_payload(self) noexcept:
        # Frees the unfinished payload and gives its reservation back.
        Py_XDECREF(self._payload)
        self._payload = NULL
        self._capacity = 0
        self._assembled = 0
        if self._reserved:
            if self.budget is not None:
                try:
                    self.budget.give(self._reserved)
                except BaseException:   # cannot happen (give only subtracts); never propagate
                    pass
            self._reserved = 0

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
            ProtocolError: a subclass per violation (the class's rules).
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
            self.bytes_fed -= PyBytes_GET_SIZE(joined) - n   # the backlog was counted
            return self._feed(<const unsigned char *>PyBytes_AS_STRING(joined),
                              PyBytes_GET_SIZE(joined), joined, False)
        self.bytes_fed += n
        try:
            self._decode(data, n, base, share, frames, &pos)
        except ProtocolError as error:
            self._count(frames)
            self.frames_decoded += len(frames)
            error.frames = frames
            if error.fatal:
                self._failed = error
            else:
                self._backlog = PyBytes_FromStringAndSize(<const char *>data + pos, n - pos)
            raise
        self._count(frames)
        self.frames_decoded += len(frames)
        return frames

    cdef int _count(self, list frames) except -1:
        # Frames returned, by type (a few instructions each, for the stats).
        cdef Frame frame
        for item in frames:
            frame = <Frame>item
            if frame.type == 3 and frame.request_id == 0:
                self._by_type[0] += 1
            elif frame.type <= 4:
                self._by_type[frame.type] += 1
        return 0

    def frame_counts(self):
        """Frames returned so far, by type: ``(control Events, Requests, Responses, Events,
        Errors)``. Control Events are those with request id 0; skipped Events are in
        ``events_skipped`` instead."""
        return (self._by_type[0], self._by_type[1], self._by_type[2], self._by_type[3],
                self._by_type[4])

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
                if self._assembled + take > self._capacity:
                    self._grow(self._assembled + take)
                _copy(<unsigned char *>PyBytes_AS_STRING(<object>self._payload) + self._assembled,
                      data + pos, <size_t>take)
                self._running_crc = _crc(self._running_crc, data + pos, <size_t>take)
                pos += take
                pos_out[0] = pos
                self._remaining -= take
                self._assembled += take
                if self._remaining == 0:
                    self._finish_payload(frames)
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
                    self._start_payload(&h, n - pos)
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
                        self._start_payload(&h, n - pos)
                    else:
                        if h.checksum != 0xFFFF:
                            raise _errors.checksum_error(h.checksum, 0xFFFF, h.request_id, h.type)
                        if self.skip_events and _plain_event(&h):
                            self.events_skipped += 1
                            self.frames_decoded += 1
                        else:
                            PyList_Append(frames, _new_frame(&h, b""))
        return 0

    cdef int _finish_payload(self, list frames) except -1:
        # The payload being assembled is whole: check its CRC, and return its frame (or skip
        # it, a plain Event nobody reads).
        global _spare, _spare_room
        cdef Py_ssize_t room = self._room
        cdef object payload = self._take_payload()
        self._state = _HEADER_STATE
        if self._running_crc != self._fields.checksum:
            raise _errors.checksum_error(self._fields.checksum, self._running_crc,
                                         self._fields.request_id, self._fields.type)
        if SPARE_MIN <= room <= SPARE_MAX:
            _spare = payload       # the next large payload's, once the application drops it
            _spare_room = room
        if self.skip_events and _plain_event(&self._fields):
            self.events_skipped += 1
            self.frames_decoded += 1
        else:
            PyList_Append(frames, _new_frame(&self._fields, payload))
        return 0

    cdef unsigned char *_direct(self, Py_ssize_t limit, Py_ssize_t *room) except? NULL:
        # For a transport that reads straight into the payload being assembled, saving a copy:
        # while at least DIRECT_MIN bytes of it are still to come, where the next ones go and
        # how many (at most ``limit``, room made for them); else NULL. The transport hands the
        # bytes it read there to _direct_done.
        cdef Py_ssize_t take
        if self._state != _PAYLOAD_STATE or self._remaining < DIRECT_MIN or self._backlog \
                or self._failed is not None:
            return NULL
        take = min(self._remaining, limit)
        if self._assembled + take > self._capacity:
            self._grow(self._assembled + take)
        room[0] = take
        return <unsigned char *>PyBytes_AS_STRING(<object>self._payload) + self._assembled

    def _direct_view(self, Py_ssize_t limit):
        """For a transport in Python that reads into a buffer (the TLS channel): a writable
        memoryview of where the next bytes of a large payload go (at most ``limit``), or None
        when no payload is being read that way. Internal: fill it, release it, and report the
        count to ``_direct_fed`` before this decoder is used in any other way."""
        cdef Py_ssize_t room = 0
        cdef unsigned char *start = self._direct(limit, &room)
        if start == NULL:
            return None
        return PyMemoryView_FromMemory(<char *>start, room, PyBUF_WRITE)

    def _direct_fed(self, Py_ssize_t count):
        """``count`` bytes were read into the last ``_direct_view``: the frames they complete.

        Raises:
            ValueError: ``count`` is more than that view held.
            ProtocolError: as ``feed``.
        """
        if self._state != _PAYLOAD_STATE or not 0 <= count <= self._remaining \
                or self._assembled + count > self._capacity:
            raise ValueError(f"{count} bytes do not fit the payload being read")
        return self._direct_done(count, NULL, 0)

    cdef list _direct_done(self, Py_ssize_t n, const unsigned char *rest, Py_ssize_t more):
        # ``n`` bytes arrived where _direct said, and ``more`` after them at ``rest`` (the
        # transport's buffer): the CRC of the first is taken while they are in cache, the
        # frame returned once whole, and the rest decoded as feed() would. A bad CRC raises
        # as feed() would, the rest kept as backlog.
        cdef list frames = []
        cdef unsigned char *start = <unsigned char *>PyBytes_AS_STRING(
            <object>self._payload) + self._assembled
        self.bytes_fed += n
        self._running_crc = _crc(self._running_crc, start, <size_t>n)
        self._remaining -= n
        self._assembled += n
        if self._remaining == 0:
            try:
                self._finish_payload(frames)
            except ProtocolError as error:
                error.frames = frames
                if error.fatal:
                    self._failed = error
                elif more:
                    self._backlog = PyBytes_FromStringAndSize(<const char *>rest, more)
                    self.bytes_fed += more
                raise
            self._count(frames)
            self.frames_decoded += len(frames)
        if more:
            frames += self._feed(rest, more, None, False)
        return frames

    cdef int _start_payload(self, const hx_header *h, Py_ssize_t available) except -1:
        # Only after _validate: the length is within the limit. A large payload first takes its
        # whole length from the budget (so that a frame once admitted can always complete),
        # or is skipped and refused. Its buffer, a bytes written in place while this decoder
        # holds its only reference, starts small and grows as bytes arrive.
        cdef Py_ssize_t length = h.length
        if self.budget is not None and length > BUDGETED_BYTES:
            if not self.budget.take(length):
                self._state = _DISCARD_STATE
                self._remaining = length
                raise _errors.overloaded_error(length, self.budget.used, self.budget.limit,
                                               h.request_id, h.type)
            self._reserved = length
        self._fields = h[0]
        self._assembled = 0
        self._remaining = length
        self._running_crc = 0xFFFF
        self._state = _PAYLOAD_STATE
        if length >= SPARE_MIN and _spare is not None and self._reuse_spare(length):
            return 0
        self._grow(min(length, max(available, FIRST_CAPACITY)))
        return 0

    cdef bint _reuse_spare(self, Py_ssize_t length):
        # Take the spare for a payload of ``length`` bytes if nothing else refers to it and it
        # is large enough. One that is still in use is the application's: let it go.
        global _spare, _spare_room
        cdef object spare = _spare
        _spare = None
        if Py_REFCNT(spare) != 1 or _spare_room < length:   # 1: only ``spare`` here
            return False
        hx_bytes_relength(spare, length)
        Py_INCREF(spare)
        self._payload = <PyObject *>spare
        self._capacity = length
        self._room = _spare_room
        return True

    cdef int _grow(self, Py_ssize_t needed) except -1:
        # At least `needed` bytes of room, doubling (never past the payload's length), so that
        # assembling a payload copies each byte at most twice however it arrives.
        cdef Py_ssize_t length = self._assembled + self._remaining
        cdef Py_ssize_t capacity = min(length, max(needed, 2 * self._capacity))
        cdef Py_ssize_t before = self._capacity
        cdef object fresh
        try:
            if self._payload == NULL:
                fresh = PyBytes_FromStringAndSize(NULL, capacity)
                Py_INCREF(fresh)
                self._payload = <PyObject *>fresh
            else:
                _PyBytes_Resize(&self._payload, capacity)   # failing, it frees and NULLs it
        except MemoryError:
            # No memory for this frame: skip the rest of it and refuse it, as when the budget
            # is spent. The stream stays in sync and nothing else is lost.
            self._drop_payload()
            self._state = _DISCARD_STATE
            raise _errors.no_memory_error(length, self._fields.request_id, self._fields.type)
        self._capacity = capacity
        self._room = capacity
        if capacity >= POPULATE_FROM:
            _populate(PyBytes_AS_STRING(<object>self._payload), before, capacity)
        return 0

    cdef object _take_payload(self):
        # The finished payload (exactly its length by now), handed over with its reservation
        # given back: from here on it is the application's memory.
        cdef object payload = <object>self._payload
        Py_XDECREF(self._payload)
        self._payload = NULL
        self._capacity = 0
        self._assembled = 0
        if self._reserved:
            self.budget.give(self._reserved)
            self._reserved = 0
        return payload

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
        if h.length > self._max_payload and not (
                h.length <= CONTROL_MAX and (h.type == 4 or (h.type == 3 and h.request_id == 0))):
            raise _errors.too_large_error(h.length, self._max_payload, h.request_id, h.type)
        if h.flags & ~KNOWN_FLAGS_MASK:
            if h.length:
                self._state = _DISCARD_STATE
                self._remaining = h.length
            raise _errors.reserved_flags_error(h.flags, h.request_id, h.type)
        return 0
