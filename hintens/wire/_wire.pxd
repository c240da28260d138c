# The contract of the compiled wire kernels (hintens/wire/_wire.pyx): the C helpers they link,
# the layout of their classes, and the small inline helpers the compiled transport shares
# (hintens/transport/_channel.pyx cimports this file). Field comments say what each slot
# holds; hintens/wire/_wire_py.py is the pure-Python twin.

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef extern from "_wire.h" nogil:
    ctypedef struct hx_header:
        uint16_t magic
        uint16_t version
        uint32_t type
        uint16_t flags
        uint32_t length
        uint16_t checksum
        uint64_t request_id

    const int HX_HEADER_SIZE
    void hx_pack_header(unsigned char *p, const hx_header *h)
    void hx_unpack_header(const unsigned char *p, hx_header *h)


# Mirrors of hintens._constants as C constants (asserted equal in the tests).
cdef enum:
    HEADER_SIZE = 24
    MAGIC = 0x4850
    VERSION = 0x0100
    VERSION_MAJOR = 1
    KNOWN_FLAGS_MASK = 0x0003
    # Below this many bytes, releasing and re-taking the GIL costs more than the work.
    NOGIL_THRESHOLD_BYTES = 64 * 1024


# The CRC16 kernel on raw memory (the GIL is left as it is): the transport packs frames with
# it, and _crc16.h is compiled into this extension alone.
cdef uint16_t crc16_kernel(uint16_t crc, const unsigned char *p, size_t n) noexcept nogil


cdef class FrameHeader:
    cdef readonly uint16_t magic         # 0x4850 in a valid frame
    cdef readonly uint16_t version       # high byte major, low byte minor
    cdef readonly uint32_t type          # MessageType value
    cdef readonly uint16_t flags         # Flags bits
    cdef readonly uint32_t length        # payload bytes after the header
    cdef readonly uint16_t checksum      # CRC16 of the payload
    cdef readonly uint64_t request_id    # chosen by the requester


cdef class Frame:
    cdef readonly uint32_t type          # MessageType value
    cdef readonly uint16_t flags         # Flags bits
    cdef readonly uint16_t version       # the sender's protocol version
    cdef readonly uint64_t request_id    # echoed by Response and Error frames
    cdef readonly object payload         # bytes, or a read-only memoryview sharing the input


cdef class MemoryBudget:
    cdef readonly Py_ssize_t limit       # the most that may be taken at once
    cdef readonly Py_ssize_t used        # taken and not given back yet
    cpdef bint take(self, Py_ssize_t amount)
    cpdef give(self, Py_ssize_t amount)


cdef enum:
    # FrameDecoder._state
    _HEADER_STATE = 0
    _PAYLOAD_STATE = 1
    _DISCARD_STATE = 2


cdef class FrameDecoder:
    cdef uint32_t _max_payload           # payload limit, checked before anything is buffered
    cdef int _state                      # _HEADER_STATE, _PAYLOAD_STATE or _DISCARD_STATE
    cdef unsigned char _header[24]       # header bytes of an unfinished frame
    cdef Py_ssize_t _header_len          # how many of them have arrived
    cdef hx_header _fields               # unpacked header of the frame being assembled
    cdef PyObject *_payload              # its payload (a bytes we own alone), grown as bytes come
    cdef Py_ssize_t _capacity            # the size _payload has now (at most the payload length)
    cdef Py_ssize_t _room                # the bytes _payload's allocation holds (a spare's: more)
    cdef Py_ssize_t _reserved            # bytes taken from budget for the frame being assembled
    cdef public MemoryBudget budget      # bounds bytes held for unfinished frames, or None
    cdef Py_ssize_t _assembled           # payload bytes assembled so far
    cdef Py_ssize_t _remaining           # payload bytes still to assemble or discard
    cdef uint16_t _running_crc           # CRC of the assembled bytes, computed while they are hot
    cdef bytes _backlog                  # input left unread when a recoverable error was raised
    cdef object _failed                  # the fatal ProtocolError, or None
    cdef readonly uint64_t frames_decoded  # frames completed so far (skipped Events too), errors excluded
    cdef public bint skip_events         # drop plain Events (request id != 0, no flags) unreturned
    cdef readonly uint64_t events_skipped  # how many were dropped so
    cdef readonly uint64_t bytes_fed     # stream bytes fed in, each counted once
    cdef uint64_t _by_type[5]            # frames returned, by type; [0]: control Events (id 0)

    cdef list _feed(self, const unsigned char *data, Py_ssize_t n, object base, bint share)
    cdef int _count(self, list frames) except -1
    cdef unsigned char *_direct(self, Py_ssize_t limit, Py_ssize_t *room) except? NULL
    cdef list _direct_done(self, Py_ssize_t n, const unsigned char *rest, Py_ssize_t more)
    cdef int _finish_payload(self, list frames) except -1
    cdef int _decode(self, const unsigned char *data, Py_ssize_t n, object base, bint share,
                     list frames, Py_ssize_t *pos_out) except -1
    cdef int _start_payload(self, const hx_header *h, Py_ssize_t available) except -1
    cdef int _grow(self, Py_ssize_t needed) except -1
    cdef bint _reuse_spare(self, Py_ssize_t length)
    cdef object _take_payload(self)
    cdef void _drop_payload(self) noexcept
    cdef int _check_prefix(self) except -1
    cdef int _validate(self, const hx_header *h) except -1


# Inline helpers, compiled into every extension that cimports them -------------------------------

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


cdef inline void _copy(unsigned char *dst, const unsigned char *src, size_t n) noexcept:
    if n >= NOGIL_THRESHOLD_BYTES:
        with nogil:
            memcpy(dst, src, n)
    else:
        memcpy(dst, src, n)


cdef inline int _check_frame_args(uint32_t msg_type, uint16_t flags, Py_ssize_t n) except -1:
    if not 1 <= msg_type <= 4:
        raise ValueError(f"msg_type must be 1-4 (a MessageType), not {msg_type}")
    if flags & ~KNOWN_FLAGS_MASK:
        raise ValueError(f"flags 0x{flags:04x} set reserved bits")
    if <uint64_t>n > <uint64_t>0xFFFFFFFF:
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
