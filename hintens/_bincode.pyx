# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled kernels of hintens.bincode: structs of numbers, bools, strings, bytes, Vecs of
numbers and nested such structs, decoded and encoded in C with no Python work per field
beyond making each value.

hintens/bincode/_struct.py compiles a dataclass into a program for these kernels when every
field is of those kinds; hintens.bincode uses its own Python plans (the reference, and this
module's twin) for everything else, or when the extension is not built. A program is a tuple
``(cls, names, ops, build)``: ``ops`` holds one ``(kind, size, sub)`` per field, ``build`` is
0 to fill the instance's ``__dict__`` directly, 1 to call ``cls(*values)``.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t, uint8_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from libc.math cimport isinf

from .bincode._types import DecodeError, EncodeError

cdef extern from "Python.h":
    int PyDict_SetItem(object mapping, object key, object value) except -1
    ctypedef struct PyTypeObject:
        object (*tp_alloc)(PyTypeObject *cls, Py_ssize_t items)
    const char *PyUnicode_AsUTF8AndSize(object text, Py_ssize_t *size) except NULL
    object PyObject_GenericGetDict(object obj, void *context)
    double PyFloat_AsDouble(object value) except? -1.0
    object PyFloat_FromDouble(double value)
    bint PyBool_Check(object value)
    bint PyLong_CheckExact(object value)
    uint64_t PyLong_AsUnsignedLongLong(object value) except? <uint64_t>-1
    long long PyLong_AsLongLongAndOverflow(object value, int *overflow) except? -1

cdef enum:
    K_UINT = 1
    K_SINT = 2
    K_FLOAT = 3
    K_BOOL = 4
    K_STR = 5
    K_BYTES = 6
    K_VEC_UINT = 7
    K_VEC_SINT = 8
    K_VEC_FLOAT = 9
    K_STRUCT = 10

cdef enum:
    SINGLE_BYTE_MAX = 250
    U16_BYTE = 251
    U32_BYTE = 252
    U64_BYTE = 253


cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc


@cython.final
cdef class Program:
    """A struct's plan, parsed once into C arrays: what the kernels run.

    Args:
        cls: the dataclass.
        names: its field names, in order.
        ops: one ``(kind, size, sub)`` per field; ``sub`` is the program tuple of a nested
            struct.
        build: 0 to fill the new instance's ``__dict__``, 1 to call ``cls(*values)``.
    """

    cdef object cls
    cdef tuple names
    cdef Py_ssize_t count
    cdef int *kinds
    cdef int *sizes
    cdef list subs
    cdef int build

    def __cinit__(self, cls, tuple names, tuple ops, int build):
        cdef Py_ssize_t i
        self.cls = cls
        self.names = names
        self.count = len(ops)
        self.build = build
        self.kinds = <int *>PyMem_Malloc(max(1, self.count) * sizeof(int))
        self.sizes = <int *>PyMem_Malloc(max(1, self.count) * sizeof(int))
        if self.kinds == NULL or self.sizes == NULL:
            raise MemoryError()
        self.subs = []
        for i in range(self.count):
            kind, size, sub = ops[i]
            self.kinds[i] = kind
            self.sizes[i] = size
            self.subs.append(Program(*sub) if sub is not None else None)

    def __dealloc__(self):
        PyMem_Free(self.kinds)
        PyMem_Free(self.sizes)

    def decode(self, data, bint varint):
        """The struct ``data`` encodes, exactly (trailing bytes are an error)."""
        value, end, size = _decode(self, data, 0, varint)
        if end != size:
            raise DecodeError(f"{size - end} trailing bytes after the {self.cls.__name__}")
        return value

    def decode_at(self, data, Py_ssize_t pos, bint varint):
        """Decode one struct at ``pos``; returns ``(value, end)``."""
        value, end, _ = _decode(self, data, pos, varint)
        return value, end

    def encode(self, value, bint varint):
        """The encoding of one struct, as bytes."""
        cdef _Out out
        out.p = NULL
        out.len = out.cap = 0
        try:
            _put_struct(&out, self, value, varint)
            return PyBytes_FromStringAndSize(<const char *>out.p, out.len)
        finally:
            free(out.p)


# Decoding ------------------------------------------------------------------------------------

cdef inline object _new_instance(object cls):
    # object.__new__(cls) without the Python call: a plain class's instance, empty __dict__.
    return (<PyTypeObject *>cls).tp_alloc(<PyTypeObject *>cls, 0)


cdef struct _In:
    const unsigned char *p
    Py_ssize_t n
    Py_ssize_t pos


cdef inline int _need(_In *src, Py_ssize_t count) except -1:
    if count > src.n - src.pos:
        raise DecodeError(f"truncated input: {count} bytes wanted, {src.n - src.pos} remain")
    return 0


cdef inline uint64_t _le(const unsigned char *p, int size) noexcept:
    cdef uint64_t value = 0
    cdef int i
    for i in range(size - 1, -1, -1):
        value = (value << 8) | p[i]
    return value


cdef uint64_t _varint(_In *src) except? 0xFFFFFFFFFFFFFFFF:
    cdef unsigned char tag
    cdef int width
    _need(src, 1)
    tag = src.p[src.pos]
    src.pos += 1
    if tag <= SINGLE_BYTE_MAX:
        return tag
    if tag == U16_BYTE:
        width = 2
    elif tag == U32_BYTE:
        width = 4
    elif tag == U64_BYTE:
        width = 8
    else:
        raise DecodeError(f"varint tag {tag} is not one bincode writes (u128 is not supported)")
    _need(src, width)
    src.pos += width
    return _le(src.p + src.pos - width, width)


cdef uint64_t _length(_In *src, bint varint) except? 0xFFFFFFFFFFFFFFFF:
    if varint:
        return _varint(src)
    _need(src, 8)
    src.pos += 8
    return _le(src.p + src.pos - 8, 8)


cdef object _read_uint(_In *src, int size, bint varint):
    cdef uint64_t value
    if varint and size > 1:
        value = _varint(src)
        if size < 8 and value >> (8 * size):
            raise DecodeError(f"{value} is out of range for u{8 * size}")
        return PyLong_FromUnsignedLongLong(value)
    _need(src, size)
    src.pos += size
    return PyLong_FromUnsignedLongLong(_le(src.p + src.pos - size, size))


cdef object _read_sint(_In *src, int size, bint varint):
    cdef uint64_t raw
    cdef int64_t value
    cdef int64_t low, high
    if varint and size > 1:
        raw = _varint(src)
        value = <int64_t>(raw >> 1) ^ -<int64_t>(raw & 1)
        if size < 8:
            high = (<int64_t>1 << (8 * size - 1)) - 1
            low = -high - 1
            if value < low or value > high:
                raise DecodeError(f"{value} is out of range for i{8 * size}")
        return PyLong_FromLongLong(value)
    _need(src, size)
    src.pos += size
    raw = _le(src.p + src.pos - size, size)
    if size < 8 and raw >> (8 * size - 1):
        raw |= ~((<uint64_t>1 << (8 * size)) - 1)   # sign-extend
    return PyLong_FromLongLong(<int64_t>raw)


cdef object _read_float(_In *src, int size):
    cdef float single
    cdef double double_
    _need(src, size)
    if size == 4:
        memcpy(&single, src.p + src.pos, 4)
        src.pos += 4
        return PyFloat_FromDouble(single)
    memcpy(&double_, src.p + src.pos, 8)
    src.pos += 8
    return PyFloat_FromDouble(double_)


cdef object _read_vec(_In *src, int kind, int size, bint varint):
    cdef uint64_t count = _length(src, varint)
    cdef Py_ssize_t i, least = size if not varint or kind == K_VEC_FLOAT or size == 1 else 1
    cdef list result
    cdef object item
    if count > <uint64_t>((src.n - src.pos) // least):
        raise DecodeError(f"a Vec of {count} elements, but {src.n - src.pos} bytes remain")
    result = PyList_New(<Py_ssize_t>count)
    for i in range(<Py_ssize_t>count):
        if kind == K_VEC_UINT:
            item = _read_uint(src, size, varint)
        elif kind == K_VEC_SINT:
            item = _read_sint(src, size, varint)
        else:
            item = _read_float(src, size)
        Py_INCREF(item)
        PyList_SET_ITEM(result, i, item)
    return result


cdef object _read_struct(_In *src, Program program, bint varint):
    cdef Py_ssize_t count = program.count, i
    cdef int kind, size
    cdef uint64_t length
    cdef list values = None
    cdef object value, obj = None, state = None
    cdef unsigned char byte
    if program.build == 0:   # fill the new instance's __dict__ as the fields come
        obj = _new_instance(program.cls)
        state = PyObject_GenericGetDict(obj, NULL)
    else:
        values = PyList_New(count)
    for i in range(count):
        kind = program.kinds[i]
        size = program.sizes[i]
        if kind == K_UINT:
            value = _read_uint(src, size, varint)
        elif kind == K_SINT:
            value = _read_sint(src, size, varint)
        elif kind == K_FLOAT:
            value = _read_float(src, size)
        elif kind == K_BOOL:
            _need(src, 1)
            byte = src.p[src.pos]
            src.pos += 1
            if byte > 1:
                raise DecodeError(f"a bool is 0 or 1, not {byte}")
            value = byte == 1
        elif kind == K_STR or kind == K_BYTES:
            length = _length(src, varint)
            if length > <uint64_t>(src.n - src.pos):
                raise DecodeError(f"a {'String' if kind == K_STR else 'Vec<u8>'} of {length} "
                                  f"bytes, but {src.n - src.pos} remain")
            if kind == K_STR:
                try:
                    value = PyUnicode_DecodeUTF8(<const char *>src.p + src.pos,
                                                 <Py_ssize_t>length, NULL)
                except UnicodeDecodeError as error:
                    raise DecodeError(f"a String that is not UTF-8: {error}") from None
            else:
                value = PyBytes_FromStringAndSize(<const char *>src.p + src.pos,
                                                  <Py_ssize_t>length)
            src.pos += <Py_ssize_t>length
        elif kind == K_STRUCT:
            value = _read_struct(src, <Program>program.subs[i], varint)
        else:
            value = _read_vec(src, kind, size, varint)
        if state is not None:
            PyDict_SetItem(state, program.names[i], value)
        else:
            Py_INCREF(value)
            PyList_SET_ITEM(values, i, value)
    if obj is not None:
        return obj
    return program.cls(*values)


cdef object _decode(Program program, data, Py_ssize_t pos, bint varint):
    # (value, end, size of the input)
    cdef _In src
    cdef Py_buffer view
    cdef bint exported = False
    if type(data) is bytes:
        src.p = <const unsigned char *>PyBytes_AS_STRING(data)
        src.n = PyBytes_GET_SIZE(data)
    else:
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except (TypeError, BufferError):
            raise DecodeError(f"decode wants a bytes-like object, not "
                              f"{type(data).__name__}") from None
        exported = True
        src.p = <const unsigned char *>view.buf
        src.n = view.len
    try:
        if pos < 0 or pos > src.n:
            raise DecodeError("position outside the input")
        src.pos = pos
        value = _read_struct(&src, program, varint)
        return value, src.pos, src.n
    finally:
        if exported:
            PyBuffer_Release(&view)


# Encoding ------------------------------------------------------------------------------------

cdef struct _Out:
    unsigned char *p
    Py_ssize_t len
    Py_ssize_t cap


cdef int _room(_Out *out, Py_ssize_t extra) except -1:
    cdef Py_ssize_t want = out.len + extra, cap
    cdef unsigned char *grown
    if want <= out.cap:
        return 0
    cap = max(want, 2 * out.cap, 256)
    grown = <unsigned char *>realloc(out.p, <size_t>cap)
    if grown == NULL:
        raise MemoryError()
    out.p, out.cap = grown, cap
    return 0


cdef inline void _put_le(unsigned char *p, uint64_t value, int size) noexcept:
    cdef int i
    for i in range(size):
        p[i] = <unsigned char>(value >> (8 * i))


cdef int _put_varint(_Out *out, uint64_t value) except -1:
    _room(out, 9)
    if value <= SINGLE_BYTE_MAX:
        out.p[out.len] = <unsigned char>value
        out.len += 1
    elif value <= 0xFFFF:
        out.p[out.len] = U16_BYTE
        _put_le(out.p + out.len + 1, value, 2)
        out.len += 3
    elif value <= 0xFFFFFFFF:
        out.p[out.len] = U32_BYTE
        _put_le(out.p + out.len + 1, value, 4)
        out.len += 5
    else:
        out.p[out.len] = U64_BYTE
        _put_le(out.p + out.len + 1, value, 8)
        out.len += 9
    return 0


cdef int _put_fixed(_Out *out, uint64_t value, int size) except -1:
    _room(out, size)
    _put_le(out.p + out.len, value, size)
    out.len += size
    return 0


cdef int _put_length(_Out *out, uint64_t value, bint varint) except -1:
    if varint:
        return _put_varint(out, value)
    return _put_fixed(out, value, 8)


cdef object _as_int(object value, bint signed, int size):
    # The type's name is only formatted when there is an error to report.
    if PyLong_CheckExact(value):
        return value
    if PyBool_Check(value):
        raise EncodeError(f"{'i' if signed else 'u'}{8 * size} wants an int, not a bool")
    try:
        return value.__index__()
    except AttributeError:
        raise EncodeError(f"{'i' if signed else 'u'}{8 * size} wants an int, not "
                          f"{type(value).__name__}") from None


cdef int _put_uint(_Out *out, object value, int size, bint varint) except -1:
    cdef uint64_t n
    value = _as_int(value, False, size)
    if value < 0:
        raise EncodeError(f"{value} is out of range for u{8 * size}")
    try:
        n = PyLong_AsUnsignedLongLong(value)
    except OverflowError:
        raise EncodeError(f"{value} is out of range for u{8 * size}") from None
    if size < 8 and n >> (8 * size):
        raise EncodeError(f"{value} is out of range for u{8 * size}")
    if varint and size > 1:
        return _put_varint(out, n)
    return _put_fixed(out, n, size)


cdef int _put_sint(_Out *out, object value, int size, bint varint) except -1:
    cdef int overflow = 0
    cdef long long n
    cdef int64_t high = (<int64_t>1 << (8 * size - 1)) - 1 if size < 8 else 0
    value = _as_int(value, True, size)
    n = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or (size < 8 and (n > high or n < -high - 1)):
        raise EncodeError(f"{value} is out of range for i{8 * size}")
    if varint and size > 1:
        return _put_varint(out, (<uint64_t>n << 1) ^ <uint64_t>(n >> 63))
    return _put_fixed(out, <uint64_t>n, size)


cdef int _put_float(_Out *out, object value, int size) except -1:
    # As struct packs 'f' and 'd': anything with __float__ or __index__; a double that only
    # overflows to infinity as a float is out of range (rounding to FLT_MAX is fine).
    cdef double d
    cdef float f
    try:
        d = PyFloat_AsDouble(value)
    except TypeError:
        raise EncodeError(f"f{8 * size} wants a float, not {type(value).__name__}") from None
    except OverflowError:
        raise EncodeError(f"{value} is out of range for f{8 * size}") from None
    _room(out, size)
    if size == 4:
        f = <float>d
        if isinf(f) and not isinf(d):
            raise EncodeError(f"{value} is out of range for f32")
        memcpy(out.p + out.len, &f, 4)
    else:
        memcpy(out.p + out.len, &d, 8)
    out.len += size
    return 0


cdef int _put_vec(_Out *out, object value, int kind, int size, bint varint) except -1:
    cdef Py_ssize_t count, i
    cdef tuple items
    if not isinstance(value, (list, tuple)):
        try:
            with memoryview(value) as view:
                value = view.tolist()
        except TypeError:
            raise EncodeError(f"a Vec wants a list, not {type(value).__name__}") from None
    # A snapshot: an element's __index__ or another thread cannot change what we walk.
    items = value if type(value) is tuple else tuple(value)
    count = len(items)
    _put_length(out, <uint64_t>count, varint)
    for i in range(count):
        item = items[i]
        if kind == K_VEC_UINT:
            _put_uint(out, item, size, varint)
        elif kind == K_VEC_SINT:
            _put_sint(out, item, size, varint)
        else:
            _put_float(out, item, size)
    return 0


cdef int _put_struct(_Out *out, Program program, object value, bint varint) except -1:
    cdef object cls = program.cls
    cdef tuple names = program.names
    cdef Py_ssize_t count = program.count, i
    cdef int kind, size
    cdef const char *text
    cdef Py_ssize_t length
    cdef Py_buffer view
    if not isinstance(value, cls):
        raise EncodeError(f"{cls.__name__} wants a {cls.__name__}, not {type(value).__name__}")
    for i in range(count):
        kind = program.kinds[i]
        size = program.sizes[i]
        field = getattr(value, names[i])
        if kind == K_UINT:
            _put_uint(out, field, size, varint)
        elif kind == K_SINT:
            _put_sint(out, field, size, varint)
        elif kind == K_FLOAT:
            _put_float(out, field, size)
        elif kind == K_BOOL:
            if not PyBool_Check(field):
                raise EncodeError(f"bool wants True or False, not {type(field).__name__}")
            _room(out, 1)
            out.p[out.len] = 1 if field is True else 0
            out.len += 1
        elif kind == K_STR:
            if type(field) is not str:
                raise EncodeError(f"String wants a str, not {type(field).__name__}")
            try:
                text = PyUnicode_AsUTF8AndSize(field, &length)
            except UnicodeEncodeError as error:
                raise EncodeError(f"a str that is not valid Unicode: {error}") from None
            _put_length(out, <uint64_t>length, varint)
            _room(out, length)
            memcpy(out.p + out.len, text, <size_t>length)
            out.len += length
        elif kind == K_BYTES:
            try:
                PyObject_GetBuffer(field, &view, PyBUF_SIMPLE)
            except (TypeError, BufferError):
                raise EncodeError(f"Vec<u8> wants a bytes-like object, not "
                                  f"{type(field).__name__}") from None
            try:
                _put_length(out, <uint64_t>view.len, varint)
                _room(out, view.len)
                memcpy(out.p + out.len, view.buf, <size_t>view.len)
                out.len += view.len
            finally:
                PyBuffer_Release(&view)
        elif kind == K_STRUCT:
            _put_struct(out, <Program>program.subs[i], field, varint)
        else:
            _put_vec(out, field, kind, size, varint)
    return 0

