"""Shared-memory segments: sealed memfds, created by a sender and validated by a receiver.

Large payloads travel through these segments (docs/PROTOCOL.md, "Shared memory"): the
sender's SegmentPool lends a segment per message, the receiver maps it once and lends the
payload to the application, and a release message gives the segment back.

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
import struct
import threading
import time
from typing import Any, Sequence

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


class _MappedFile:
    """A memfd (or file) descriptor and its mapping; the closing rules both sides share."""

    fd: int
    map: mmap.mmap

    def close(self) -> None:
        """Unmap and close. Raises BufferError while views of it are alive."""
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close the descriptor now; unmap now, or as soon as the last view of it goes
        (payloads still lent keep it mapped)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.map.close()
        except BufferError:
            pass


class Segment(_MappedFile):
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

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ReceivedSegment(_MappedFile):
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

    def private_map(self, offset: int, length: int) -> tuple[mmap.mmap, int]:
        """A copy-on-write (MAP_PRIVATE) mapping covering the region, and the region's offset
        in it. Pages not yet written still read through to the segment.

        Raises:
            ShmError: the region is outside the segment, or the mapping failed.
        """
        self._check(offset, length)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            private = mmap.mmap(self.fd, max(1, offset + length - start), mmap.MAP_PRIVATE,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except OSError as error:
            raise ShmError(f"cannot map a private copy: {error.strerror}") from error
        return private, offset - start

    def private_view(self, offset: int, length: int) -> memoryview:
        """A writable copy-on-write view (MAP_PRIVATE): nothing is copied until written, and
        writes never reach the sender.

        Raises:
            ShmError: the region is outside the segment, or the mapping failed.
        """
        private, delta = self.private_map(offset, length)
        return memoryview(private)[delta:delta + length]



# The wire side (docs/PROTOCOL.md, "Shared memory") -------------------------------------------

#: An SHM frame's payload: segment id u32, flags u32, segment size u64, offset u64, length u64.
DESCRIPTOR = struct.Struct("<IIQQQ")
#: Descriptor flag: this frame carries the segment's descriptor (SCM_RIGHTS, with its first byte).
NEW_SEGMENT = 0x1
#: Descriptor flag: the id names a segment of the *receiver's* pool, one it lent to this sender
#: (an echo of a lent payload goes back without a copy).
PEER_SEGMENT = 0x2
#: Control Events (request id 0): the receiver gives segments back; the sender retires them.
RELEASE_MAGIC = b"HREL"
RETIRE_MAGIC = b"HRET"
_IDS = struct.Struct("<I")
#: Largest number of segment ids in one control message.
MAX_CONTROL_IDS = 1024


def encode_descriptor(segment_id: int, size: int, offset: int, length: int, new: bool,
                      peer: bool = False) -> bytes:
    flags = (NEW_SEGMENT if new else 0) | (PEER_SEGMENT if peer else 0)
    return DESCRIPTOR.pack(segment_id, flags, size, offset, length)


def decode_descriptor(payload: Any) -> tuple[int, int, int, int, int]:
    """(segment id, flags, segment size, offset, length).

    Raises:
        ShmError: wrong size, unknown or contradictory flag bits, or segment id 0.
    """
    data = bytes(payload)
    if len(data) != DESCRIPTOR.size:
        raise ShmError(f"an SHM descriptor has {DESCRIPTOR.size} bytes, not {len(data)}")
    segment_id, flags, size, offset, length = DESCRIPTOR.unpack(data)
    if flags & ~(NEW_SEGMENT | PEER_SEGMENT) or flags == NEW_SEGMENT | PEER_SEGMENT \
            or segment_id == 0:
        raise ShmError(f"bad SHM descriptor (segment {segment_id}, flags 0x{flags:x})")
    return segment_id, flags, size, offset, length


def encode_control(magic: bytes, segment_ids: Sequence[int]) -> bytes:
    return magic + _IDS.pack(len(segment_ids)) + b"".join(_IDS.pack(i) for i in segment_ids)


def decode_control(payload: Any) -> tuple[bytes, list[int]] | None:
    """(magic, ids) for a release or retire message; None for anything else."""
    data = bytes(payload)
    if len(data) < 8 or data[:4] not in (RELEASE_MAGIC, RETIRE_MAGIC):
        return None
    (count,) = _IDS.unpack_from(data, 4)
    if count > MAX_CONTROL_IDS or len(data) != 8 + 4 * count:
        return None
    return data[:4], [i for (i,) in _IDS.iter_unpack(data[8:])]


class SegmentPool:
    """A sender's segments on one connection: each carries one message at a time.

    Segments are sized to the next power of two of at least ``min_segment_bytes`` and reused
    once the receiver releases them, so a steady stream of large messages maps and faults no
    new memory after warm-up. The pool holds at most ``max_bytes``; beyond that ``acquire``
    retires free segments that are too small, and otherwise waits for a release until the
    caller's deadline (backpressure).

    Args:
        max_bytes: the most memory this connection's segments may hold.
        min_segment_bytes: the smallest segment created.
    """

    def __init__(self, max_bytes: int = 1 << 30, min_segment_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.min_segment_bytes = min_segment_bytes
        self._segments: dict[int, Segment] = {}
        self._free: set[int] = set()
        # Holds on each lent segment: the peer's (until its release) plus local views of an
        # echo that came back in it (PEER_SEGMENT). Free again at zero.
        self._holds: dict[int, int] = {}
        self._next_id = 1
        self._cond = threading.Condition()
        self._closed = False

    @property
    def total_bytes(self) -> int:
        return sum(segment.size for segment in self._segments.values())

    def acquire(self, size: int, deadline: float) -> tuple[int, Segment, bool, list[int]]:
        """A free segment of at least ``size`` bytes.

        Returns:
            (segment id, segment, whether it is new, ids retired to make room).

        Raises:
            Timeout: no segment could be had before ``deadline`` (monotonic seconds).
            ShmError: ``size`` exceeds the pool, or a segment could not be created.
        """
        from ._errors import Timeout

        if size > self.max_bytes:
            raise ShmError(f"a {size}-byte message exceeds the {self.max_bytes}-byte pool")
        wanted = max(self.min_segment_bytes, 1 << max(0, (size - 1).bit_length()))
        wanted = min(wanted, self.max_bytes)
        with self._cond:
            while True:
                if self._closed:
                    raise ShmError("the segment pool is closed")
                fitting = [i for i in self._free if self._segments[i].size >= size]
                if fitting:
                    segment_id = min(fitting, key=lambda i: self._segments[i].size)
                    self._free.discard(segment_id)
                    self._holds[segment_id] = 1
                    return segment_id, self._segments[segment_id], False, []
                retired: list[int] = []
                for segment_id in sorted(self._free, key=lambda i: self._segments[i].size):
                    if self.total_bytes + wanted <= self.max_bytes:
                        break
                    self._free.discard(segment_id)
                    self._segments.pop(segment_id).discard()
                    retired.append(segment_id)
                if self.total_bytes + wanted <= self.max_bytes:
                    segment = Segment(wanted)
                    segment_id, self._next_id = self._next_id, self._next_id + 1
                    self._segments[segment_id] = segment
                    self._holds[segment_id] = 1
                    return segment_id, segment, True, retired
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"no shared-memory segment came free in time "
                                  f"({self.total_bytes} of {self.max_bytes} bytes lent out)")
                self._cond.wait(remaining)

    def give_back(self, segment_id: int) -> None:
        """One hold on a lent segment ends (the receiver's release, a local view of an echo,
        or a send that failed before it left); at none left it is free for reuse."""
        with self._cond:
            holds = self._holds.get(segment_id, 0) - 1
            if holds > 0:
                self._holds[segment_id] = holds
                return
            self._holds.pop(segment_id, None)
            if segment_id in self._segments:
                self._free.add(segment_id)
                self._cond.notify_all()

    def hold(self, segment_id: int) -> Segment:
        """Add a hold on a segment that is lent out (an echo of it came back to us).

        Raises:
            ShmError: the id names no segment of ours that is lent out.
        """
        with self._cond:
            if self._holds.get(segment_id, 0) <= 0 or segment_id not in self._segments:
                raise ShmError(f"segment {segment_id} is not one of ours lent out")
            self._holds[segment_id] += 1
            return self._segments[segment_id]

    def close(self) -> None:
        """Unmap and close every segment (the peer's mappings stay valid until it unmaps)."""
        with self._cond:
            self._closed = True
            for segment in self._segments.values():
                segment.discard()
            self._segments.clear()
            self._free.clear()
            self._holds.clear()
            self._cond.notify_all()
