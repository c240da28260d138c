# The contract of the compiled core: C helpers it links and the layout of its classes.
# Field comments say what each slot holds; hintens/_core_py.py is the pure-Python twin.

from libc.stdint cimport uint16_t, uint32_t, uint64_t


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
    uint16_t hx_crc16(uint16_t crc, const unsigned char *buf, size_t length)
    const char *hx_crc16_impl()


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


cdef class FrameDecoder:
    cdef uint32_t _max_payload           # payload limit, checked before anything is buffered
    cdef int _state                      # _HEADER_STATE, _PAYLOAD_STATE or _DISCARD_STATE
    cdef unsigned char _header[24]       # header bytes of an unfinished frame
    cdef Py_ssize_t _header_len          # how many of them have arrived
    cdef hx_header _fields               # unpacked header of the frame being assembled
    cdef bytes _payload                  # its payload, written in place while we own the only ref
    cdef Py_ssize_t _assembled           # payload bytes assembled so far
    cdef Py_ssize_t _remaining           # payload bytes still to assemble or discard
    cdef uint16_t _running_crc           # CRC of the assembled bytes, computed while they are hot
    cdef bytes _backlog                  # input left unread when a recoverable error was raised
    cdef object _failed                  # the fatal ProtocolError, or None

    cdef int _decode(self, const unsigned char *data, Py_ssize_t n, object base, bint share,
                     list frames, Py_ssize_t *pos_out) except -1
    cdef int _start_payload(self, const hx_header *h) except -1
    cdef int _check_prefix(self) except -1
    cdef int _validate(self, const hx_header *h) except -1
