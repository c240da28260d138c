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
* Every view is bounds-checked against the size that was validated. Views come from the
  core's ``Mapping`` objects, whose buffer exports are counted: a mapping with live views
  refuses to close (BufferError) instead of pulling the memory from under them.
* What a peer may make us map is bounded before anything is mapped: bytes and segments per
  connection, and (for a server) across connections. Each bound is a ``MemoryBudget`` that
  the mapping gives back when it is really unmapped, after the last view lent from it goes.
* A received segment keeps no file descriptor once mapped (the compiled core's Mapping holds
  none), so a peer cannot exhaust our descriptors through segments either. Copy-on-write
  views come from a second, private mapping made at the same time, reset after each use.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from typing import Any, Callable, Sequence

from .. import _impl
from .._errors import ShmError

#: Seals the sender applies: the size is fixed for good and nobody can change the seals.
SENDER_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: Seals a receiver requires before it maps a segment.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK
#: Largest segment a receiver ever accepts, whatever its budgets (a sanity bound).
MAX_SEGMENT_BYTES = 1 << 40
#: madvise(MADV_POPULATE_WRITE), Linux 5.14: fault a whole mapping in with one call. Python
#: 3.11's mmap module does not name it.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_PAGE = mmap.PAGESIZE

#: A charge on a budget: (budget, amount, what it bounds, for the message when it is spent).
Charge = tuple[Any, int, str]


def prefault(mapping: Any) -> None:
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


def _unmap(mapping: Any) -> None:
    """Unmap now, or as soon as the last view of it goes (payloads still lent keep it)."""
    if mapping is not None:
        try:
            mapping.close()
        except BufferError:
            pass


def take(charges: Sequence[Charge]) -> None:
    """Take every charge from its budget, or none.

    Raises:
        ShmError: a budget has no room; the message names it.
    """
    taken: list[Charge] = []
    for charge in charges:
        budget, amount, what = charge
        if not budget.take(amount):
            for done, done_amount, _ in taken:
                done.give(done_amount)
            raise ShmError(f"{what}: {budget.used} of {budget.limit} in use, "
                           f"{amount} more refused")
        taken.append(charge)


class SentFd(int):
    """A duplicate of a segment's descriptor for one write that passes it to the peer,
    taken under the pool's lock while the segment is lent: were the segment retired before the
    write leaves, the number in the write still names it, not whatever file reused the
    original number. Closed when the write is dropped."""

    def __del__(self) -> None:
        try:
            os.close(self)
        except OSError:
            pass


class Segment:
    """A segment this process created: a sealed memfd mapped read-write.

    It keeps its descriptor: the first frame that uses it passes that to the peer, and
    copy-on-write views of echoes map it privately.

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
            self.map = _impl.core.Mapping(fd, size, True)
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

    def private_map(self, offset: int, length: int) -> tuple[Any, int]:
        """A copy-on-write (MAP_PRIVATE) mapping covering ``[offset, offset + length)``, and
        that region's offset in it.

        Raises:
            ShmError: the region is outside the segment, or the mapping failed.
        """
        _check_region(offset, length, self.size)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            private = _impl.core.Mapping(self.fd, max(1, offset + length - start), True, True,
                                         start)
        except OSError as error:
            raise ShmError(f"cannot map a private copy: {error.strerror}") from error
        return private, offset - start

    def close(self) -> None:
        """Unmap and close. Raises BufferError while views of it are alive."""
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close the descriptor now; unmap now, or once the last view of it goes."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _unmap(self.map)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_region(offset: int, length: int, size: int) -> None:
    # Python ints: no overflow, whatever a peer puts in a descriptor.
    if offset < 0 or length < 0 or offset > size or length > size - offset:
        raise ShmError(f"region [{offset}, {offset}+{length}) is outside the {size}-byte "
                       f"segment")


class ReceivedSegment:
    """A segment a peer sent, validated and mapped read-only; it keeps no descriptor.

    Use ``adopt``. With ``copy_on_write``, a second, private mapping serves writable views,
    one at a time: after each, its written pages are dropped (MADV_DONTNEED), so that it reads
    the segment again.
    """

    def __init__(self, size: int, mapping: Any, private: Any = None) -> None:
        self.size = size
        self.map = mapping
        self.private = private
        self._private_lent = False

    @classmethod
    def adopt(cls, fd: int, size: int, charges: Sequence[Charge] = (), *,
              copy_on_write: bool = False) -> ReceivedSegment:
        """Validate a received descriptor, take ``charges`` from their budgets and map
        ``size`` bytes of it read-only; the charges are given back when it is unmapped.

        Takes ownership of ``fd``: it is closed whatever happens.

        Raises:
            ShmError: not a regular file, not sealed against shrinking, smaller than ``size``,
                ``size`` out of range, a budget without room, or mmap failed. The message
                says which.
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
            take(charges)   # before anything is mapped
            try:
                mapping = _impl.core.Mapping(fd, size)
                for budget, amount, _ in charges:
                    mapping.charge(budget, amount)
                private = _impl.core.Mapping(fd, size, True, True) if copy_on_write else None
            except BaseException:
                if "mapping" not in locals():
                    for budget, amount, _ in charges:
                        budget.give(amount)
                raise
        except OSError as error:
            raise ShmError(f"cannot map the segment: {error.strerror}") from error
        finally:
            os.close(fd)
        return cls(size, mapping, private)

    def view(self, offset: int, length: int) -> memoryview:
        """A read-only, zero-copy view of ``length`` bytes at ``offset``.

        Raises:
            ShmError: the region is outside the segment.
        """
        _check_region(offset, length, self.size)
        return memoryview(self.map)[offset:offset + length]

    def lend_writable(self, offset: int, length: int,
                      on_release: Callable[[], None]) -> memoryview | None:
        """A writable copy-on-write view of the region, through the private mapping: nothing
        is copied until written, and writes never reach the sender. ``on_release()`` runs
        once the view is released (or collected), after the private pages are reset.

        Returns:
            The view; None when there is no private mapping or it is lent already (the
            caller then copies).

        Raises:
            ShmError: the region is outside the segment.
        """
        _check_region(offset, length, self.size)
        if self.private is None or self._private_lent:
            return None
        self._private_lent = True
        private = self.private

        def released(_: Any) -> None:
            start = offset - offset % _PAGE
            try:
                private.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
            except (OSError, ValueError):
                pass   # unmapped meanwhile: nothing to reset
            self._private_lent = False
            on_release()

        region = _impl.core.SharedRegion(private, offset, length, False, released, True)
        return memoryview(region)  # type: ignore[arg-type]

    def private_view(self, offset: int, length: int) -> memoryview:
        """A writable view of the private mapping (``adopt(..., copy_on_write=True)``): what
        is written there stays here. For tests and tools; the connection lends through
        ``lend_writable``, which resets the pages afterwards.

        Raises:
            ShmError: the region is outside the segment, or there is no private mapping.
        """
        _check_region(offset, length, self.size)
        if self.private is None:
            raise ShmError("this segment was mapped without a private copy")
        return memoryview(self.private)[offset:offset + length]

    def close(self) -> None:
        """Unmap. Raises BufferError while views of it are alive."""
        self.map.close()
        if self.private is not None:
            self.private.close()

    def discard(self) -> None:
        """Unmap now, or as soon as the last view of it goes."""
        _unmap(self.map)
        _unmap(self.private)


# The wire side (docs/PROTOCOL.md, "Shared memory") -------------------------------------------

#: An SHM frame's payload: segment id u32, flags u32, segment size u64, offset u64, length u64.
DESCRIPTOR = struct.Struct("<IIQQQ")
#: Descriptor flag: this frame carries the segment's descriptor (SCM_RIGHTS, with its first byte).
NEW_SEGMENT = 0x1
#: Descriptor flag: the id names a segment of the *receiver's* pool, one it lent to this sender
#: (an echo of a lent payload goes back without a copy).
PEER_SEGMENT = 0x2
#: Control Events (request id 0). The receiver gives segments back (HREL), or refuses ones it
#: does not map, which the sender must introduce again (HREJ); the sender retires them (HRET).
RELEASE_MAGIC = b"HREL"
REJECT_MAGIC = b"HREJ"
RETIRE_MAGIC = b"HRET"
CONTROL_MAGICS = (RELEASE_MAGIC, REJECT_MAGIC, RETIRE_MAGIC)
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
    """(magic, ids) for a release, reject or retire message; None for anything else."""
    data = bytes(payload)
    if len(data) < 8 or data[:4] not in CONTROL_MAGICS:
        return None
    (count,) = _IDS.unpack_from(data, 4)
    if count > MAX_CONTROL_IDS or len(data) != 8 + 4 * count:
        return None
    return data[:4], [i for (i,) in _IDS.iter_unpack(data[8:])]


class SegmentPool:
    """A sender's segments on one connection: each carries one message at a time.

    Segments are sized to the next power of two of at least ``min_segment_bytes`` and reused
    once the receiver releases them, so a steady stream of large messages maps and faults no
    new memory after warm-up. The pool holds at most ``max_bytes`` in at most
    ``max_segments`` segments, lowered to what the receiver announced it maps
    (``limit_to``). Beyond that ``try_acquire`` retires free segments that are too small
    (when that makes room), and otherwise answers None: the caller waits for a release,
    keeping its connection's reads going so that the release can arrive.

    A segment is lent while the peer holds it (from the send until its HREL or HREJ) or while
    local views of an echo of it (PEER_SEGMENT) are alive; it is free when neither. A peer
    releases only what it holds: a repeated or stray release changes nothing.

    Args:
        max_bytes: the most memory this connection's segments may hold.
        max_segments: the most segments at once.
        min_segment_bytes: the smallest segment created.
    """

    def __init__(self, max_bytes: int = 1 << 30, max_segments: int = 64,
                 min_segment_bytes: int = 1 << 20) -> None:
        self.max_bytes = self._own_bytes = max_bytes
        self.max_segments = self._own_segments = max_segments
        self.min_segment_bytes = min_segment_bytes
        self._segments: dict[int, Segment] = {}
        self._free: set[int] = set()
        self._peer: set[int] = set()           # held by the peer (sent, not yet released)
        self._local: dict[int, int] = {}       # local views of echoes, per segment
        self._introduced: set[int] = set()     # the peer maps these (NEW_SEGMENT went out)
        self._unannounced: list[int] = []      # retired, and the peer not told yet (HRET)
        self._total = 0
        self._next_id = 1
        self._cond = threading.Condition()
        #: Bumped whenever a segment comes free: ``wait`` returns once it moved.
        self.generation = 0
        self._closed = False

    @property
    def total_bytes(self) -> int:
        return self._total

    def usage(self) -> tuple[int, int, int]:
        """For stats: ``(segments, their bytes, segments in use)``; in use means lent to the
        peer, held by a local view, or handed out by ``allocate``."""
        with self._cond:
            return len(self._segments), self._total, len(self._segments) - len(self._free)

    def limit_to(self, max_bytes: int, max_segments: int) -> None:
        """Lower the bounds to what the receiver announced it maps from us."""
        with self._cond:
            self.max_bytes = min(self._own_bytes, max_bytes)
            self.max_segments = min(self._own_segments, max_segments)

    def try_acquire(self, size: int) -> tuple[int, Segment, bool, list[int]] | None:
        """A free segment of at least ``size`` bytes, now lent to the peer.

        Returns:
            (segment id, segment, whether the peer must be given it (NEW_SEGMENT), ids retired
            and not announced yet, for an HRET before the frame: give them back with
            ``unannounced`` if that frame is not sent); or None when every segment that could
            serve is lent out: wait for a release, then ask again.

        Raises:
            ShmError: ``size`` is not positive or exceeds the pool (or what the receiver
                maps), the pool is closed, or a segment could not be created.
        """
        if size <= 0:
            raise ShmError(f"a shared-memory payload needs at least one byte, not {size}")
        with self._cond:
            if self._closed:
                raise ShmError("the segment pool is closed")
            if size > self.max_bytes:
                raise ShmError(f"a {size}-byte message exceeds the {self.max_bytes}-byte "
                               f"shared-memory pool (the smaller of ours and what the "
                               f"receiver maps)")
            fitting = [i for i in self._free if self._segments[i].size >= size]
            if fitting:
                segment_id = min(fitting, key=lambda i: self._segments[i].size)
                return self._lend(segment_id)
            wanted = max(self.min_segment_bytes, 1 << max(0, (size - 1).bit_length()))
            wanted = max(size, min(wanted, self.max_bytes))
            # Retire free segments (smallest first) only if that makes room: one retired for
            # nothing would be one the peer never hears about.
            retiring: list[int] = []
            total, count = self._total, len(self._segments)
            for segment_id in sorted(self._free, key=lambda i: self._segments[i].size):
                if total + wanted <= self.max_bytes and count < self.max_segments:
                    break
                retiring.append(segment_id)
                total -= self._segments[segment_id].size
                count -= 1
            if total + wanted > self.max_bytes or count >= self.max_segments:
                return None
            for segment_id in retiring:
                self._retire(segment_id)
            segment = Segment(wanted)
            segment_id, self._next_id = self._next_id, self._next_id + 1
            self._segments[segment_id] = segment
            self._total += wanted
            return self._lend(segment_id)

    def _lend(self, segment_id: int) -> tuple[int, Segment, bool, list[int]]:
        self._free.discard(segment_id)
        self._peer.add(segment_id)
        new = segment_id not in self._introduced
        self._introduced.add(segment_id)
        retired, self._unannounced = self._unannounced, []
        return segment_id, self._segments[segment_id], new, retired

    def unannounced(self, segment_ids: Sequence[int]) -> None:
        """Retired ids whose HRET was not sent after all: they go with the next one."""
        with self._cond:
            self._unannounced += segment_ids

    def descriptor_for(self, segment_id: int) -> SentFd:
        """A duplicate of a lent segment's descriptor, for the write that introduces it.

        Raises:
            ShmError: the segment is no longer lent (a release came before the frame left).
        """
        with self._cond:
            segment = self._segments.get(segment_id)
            if segment is None or segment_id not in self._peer or segment.fd < 0:
                raise ShmError(f"segment {segment_id} was released before it was sent")
            return SentFd(os.dup(segment.fd))

    def _retire(self, segment_id: int) -> None:
        self._free.discard(segment_id)
        if segment_id in self._introduced:   # the peer maps it: it must hear of this
            self._introduced.discard(segment_id)
            self._unannounced.append(segment_id)
        segment = self._segments.pop(segment_id)
        self._total -= segment.size
        segment.discard()

    def wait(self, generation: int, timeout: float | None) -> None:
        """Wait until a segment comes free after ``generation`` (read it before the
        ``try_acquire`` that answered None), the pool closes, or ``timeout`` passes."""
        with self._cond:
            if self.generation == generation and not self._closed:
                self._cond.wait(timeout)

    def release(self, segment_id: int) -> None:
        """The peer's release (HREL), or a send that failed before its frame left."""
        with self._cond:
            if segment_id in self._peer:
                self._peer.discard(segment_id)
                self._maybe_free(segment_id)

    def reject(self, segment_id: int) -> None:
        """The peer refused the segment (HREJ): it does not map it, so the next frame that
        uses it must introduce it again (NEW_SEGMENT). Counts as its release."""
        with self._cond:
            if segment_id in self._peer:
                self._introduced.discard(segment_id)
                self._peer.discard(segment_id)
                self._maybe_free(segment_id)

    def unlend(self, segment_id: int, new: bool) -> None:
        """A send failed before its frame left: the peer never got this use (nor, if
        ``new``, the segment itself)."""
        with self._cond:
            if new:
                self._introduced.discard(segment_id)
            if segment_id in self._peer:
                self._peer.discard(segment_id)
                self._maybe_free(segment_id)

    def hold(self, segment_id: int) -> Segment:
        """A local hold on a segment the peer holds (an echo of it came back to us).

        Raises:
            ShmError: the id names no segment of ours that the peer holds.
        """
        with self._cond:
            if segment_id not in self._peer or segment_id not in self._segments:
                raise ShmError(f"segment {segment_id} is not one of ours lent out")
            self._local[segment_id] = self._local.get(segment_id, 0) + 1
            return self._segments[segment_id]

    def unhold(self, segment_id: int) -> None:
        """A local view of an echo is gone."""
        with self._cond:
            holds = self._local.get(segment_id, 0) - 1
            if holds > 0:
                self._local[segment_id] = holds
                return
            self._local.pop(segment_id, None)
            self._maybe_free(segment_id)

    def _maybe_free(self, segment_id: int) -> None:
        if segment_id in self._segments and segment_id not in self._peer \
                and not self._local.get(segment_id):
            self._free.add(segment_id)
            self.generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Unmap and close every segment (the peer's mappings stay valid until it unmaps)."""
        with self._cond:
            self._closed = True
            for segment in self._segments.values():
                segment.discard()
            self._segments.clear()
            self._free.clear()
            self._peer.clear()
            self._local.clear()
            self._total = 0
            self.generation += 1
            self._cond.notify_all()
