# Shared memory, included by _channel.pyx (one compiled module): Mapping, a memfd mapped
# without keeping its descriptor, and SharedRegion, a window of one lent to the application.
# hintens/transport/_memory_py.py is the pure-Python twin.

# Mapping: a memory mapping of a descriptor that keeps no descriptor -------------------------

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *address, size_t length, int protection, int flags, int fd, long offset)
    int munmap(void *address, size_t length)
    int madvise(void *address, size_t length, int advice)
    const int PROT_READ
    const int PROT_WRITE
    const int MAP_SHARED
    const int MAP_PRIVATE
    const int MAP_POPULATE
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
