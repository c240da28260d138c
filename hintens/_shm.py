"""Shared-memory segments: sealed memfds, created by a sender and validated by a receiver.

This is the groundwork for sending large payloads through shared memory (issue #4). Sending
segments over a connection, the SHM descriptor frame and the pool do not exist yet.

Why it is safe to map what a peer sends:

* The sender creates a segment with ``memfd_create``, sizes it and seals it against
  shrinking, growing and further sealing. A memfd lives in the kernel's internal shm mount,
  not in /dev/shm, so nothing is ever left on a file system and Docker's 64 MB /dev/shm limit
  does not apply.
* Before mapping a descriptor, the receiver checks that it is a regular file (a memfd is one),
  that it carries F_SEAL_SHRINK, and that it is at least as large as claimed. Once sealed
  against shrinking, the file can never become smaller than our mapping, so a peer cannot
  make us take SIGBUS by truncating it. An unsealed descriptor is refused.
* Every view is bounds-checked against the size that was validated. Views come from ``mmap``
  objects, whose buffer exports are counted: a mapping with live views refuses to close
  (BufferError) instead of pulling the memory from under them.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat

from ._errors import ShmError

#: Seals the sender applies: the size is fixed for good and nobody can change the seals.
SENDER_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: Seals a receiver requires before it maps a segment.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK
#: Largest segment a receiver accepts (a sanity bound, far above any pool size).
MAX_SEGMENT_BYTES = 1 << 40
#: madvise(MADV_POPULATE_WRITE), Linux 5.14: fault a whole mapping in with one call. Python
#: 3.11's mmap module does not name it.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_PAGE = mmap.PAGESIZE


def prefault(mapping: mmap.mmap) -> None:
    """Fault every page of a writable mapping in now, rather than one fault per first touch.

    Raises:
        ShmError: the memory could not be provided (MADV_POPULATE_WRITE reports it as an
            error where a plain first touch would have killed us with SIGBUS).
    """
    try:
        mapping.madvise(MADV_POPULATE_WRITE)
        return
    except OSError as error:
        if error.errno != errno.EINVAL:   # EINVAL: a kernel before 5.14; touch instead
            raise ShmError(f"cannot populate a {len(mapping)}-byte segment: {error.strerror}") \
                from error
    view = memoryview(mapping)
    try:
        for offset in range(0, len(mapping), _PAGE):
            view[offset] = view[offset]
    finally:
        view.release()


class Segment:
    """A segment this process created: a sealed memfd mapped read-write.

    Args:
        size: bytes, at least 1.
        populate: fault the pages in now (one call) instead of on first touch.

    Raises:
        ShmError: the segment could not be created (no memory, too many open files).
        ValueError: ``size`` is not positive.
    """

    def __init__(self, size: int, *, populate: bool = True) -> None:
        if size <= 0:
            raise ValueError("a segment needs at least one byte")
        try:
            fd = os.memfd_create("hintens", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as error:
            raise ShmError(f"memfd_create failed: {error.strerror}") from error
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SENDER_SEALS)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            if populate:
                prefault(self.map)
        except OSError as error:
            os.close(fd)
            raise ShmError(f"cannot create a {size}-byte segment: {error.strerror}") from error
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size

    def close(self) -> None:
        """Unmap and close. Raises BufferError while views of it are alive."""
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ReceivedSegment:
    """A segment a peer sent, validated and mapped read-only.

    Use ``adopt``; the descriptor is kept for copy-on-write views and closed by ``close``.
    """

    def __init__(self, fd: int, size: int, mapping: mmap.mmap) -> None:
        self.fd = fd
        self.size = size
        self.map = mapping

    @classmethod
    def adopt(cls, fd: int, size: int) -> ReceivedSegment:
        """Validate a received descriptor and map ``size`` bytes of it read-only.

        Takes ownership of ``fd``: it is closed if validation fails.

        Raises:
            ShmError: not a regular file, not sealed against shrinking, smaller than ``size``,
                or ``size`` out of range. The message says which.
        """
        try:
            if not 0 < size <= MAX_SEGMENT_BYTES:
                raise ShmError(f"segment size {size} is out of range")
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ShmError(f"descriptor is not a memfd or regular file "
                               f"(mode 0o{stat.S_IFMT(info.st_mode):o})")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:   # EINVAL: a file system without seals
                seals = 0
            if not seals & REQUIRED_SEALS:
                raise ShmError("segment is not sealed against shrinking (F_SEAL_SHRINK): "
                               "its owner could truncate it under our mapping")
            if info.st_size < size:
                raise ShmError(f"segment is {info.st_size} bytes, smaller than the "
                               f"{size} bytes claimed")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, access=mmap.ACCESS_READ)
        except ShmError:
            os.close(fd)
            raise
        except OSError as error:
            os.close(fd)
            raise ShmError(f"cannot map the segment: {error.strerror}") from error
        return cls(fd, size, mapping)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset > self.size or length > self.size - offset:
            raise ShmError(f"region [{offset}, {offset}+{length}) is outside the "
                           f"{self.size}-byte segment")

    def view(self, offset: int, length: int) -> memoryview:
        """A read-only, zero-copy view of ``length`` bytes at ``offset``.

        Raises:
            ShmError: the region is outside the segment.
        """
        self._check(offset, length)
        return memoryview(self.map)[offset:offset + length]

    def private_view(self, offset: int, length: int) -> memoryview:
        """A writable copy-on-write view (MAP_PRIVATE): nothing is copied until written, and
        writes never reach the sender.

        Raises:
            ShmError: the region is outside the segment, or the mapping failed.
        """
        self._check(offset, length)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            private = mmap.mmap(self.fd, offset + length - start, mmap.MAP_PRIVATE,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except OSError as error:
            raise ShmError(f"cannot map a private copy: {error.strerror}") from error
        return memoryview(private)[offset - start:offset - start + length]

    def close(self) -> None:
        """Unmap and close. Raises BufferError while views of it are alive."""
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1
