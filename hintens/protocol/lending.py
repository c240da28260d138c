"""Receiving through shared memory: the peer's segments mapped within our bounds, their
payloads lent to the application, and each one handed back (a release, or a rejection for a
segment never mapped) as a control Event that the endpoint queues as its own write. Part of
the sans-IO ``Endpoint``; no I/O.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable

from .. import _impl
from . import shm as _shm
from .._constants import Flags, MessageType
from .._errors import ShmError

log = logging.getLogger("hintens")

Write = tuple[list[Any], list[int]]   # buffers, and the descriptors that go with them


def take_writes(outgoing: collections.deque[bytes]) -> list[Write]:
    """What ``Endpoint.take_writes`` does, for a driver that holds the endpoint's
    ``outgoing`` queue and not the endpoint: the frames waiting in it, as one write, and
    no longer waiting. Safe from any thread."""
    frames = []
    while outgoing:
        try:
            frames.append(outgoing.popleft())
        except IndexError:   # another thread took the last one
            break
    return [(frames, [])] if frames else []


class Lending:
    """The receiving side of shared memory, for ``Endpoint`` (which sets this state up)."""

    pool: _shm.SegmentPool | None
    segments: dict[int, _shm.ReceivedSegment]
    shm_bytes_received: int
    outgoing: collections.deque[bytes]
    on_writes: Callable[[], None] | None
    writable_ids: set[int]
    writable_all: bool
    _copy_shared: bool
    _encode_frame: Any
    _frame_type: Any
    _lent: dict[int, tuple[int, int, int, int]]
    _receive_budgets: list[tuple[Any, str]]
    _writable_lending: bool

    def _lend(self, frame: Any, fds: list[int]) -> Any:
        """An SHM frame's payload, mapped and lent; or the ShmError that answers it.

        Every descriptor field is checked with Python's unbounded ints, and every failure is a
        ShmError. A NEW_SEGMENT frame claims the oldest received descriptor whatever happens
        (a refused one is closed). A refused frame that names a segment of the sender's hands
        it back: HREL if we map that segment, HREJ if we do not.
        """
        data = bytes(frame.payload)
        if len(data) != _shm.DESCRIPTOR.size:
            return self._refused(frame, ShmError(
                f"an SHM descriptor has {_shm.DESCRIPTOR.size} bytes, not {len(data)}"))
        segment_id, flags, size, offset, length = _shm.DESCRIPTOR.unpack(data)
        fd = fds.pop(0) if flags & _shm.NEW_SEGMENT and fds else -1
        try:
            if flags & ~(_shm.NEW_SEGMENT | _shm.PEER_SEGMENT) or segment_id == 0 \
                    or flags == _shm.NEW_SEGMENT | _shm.PEER_SEGMENT:
                raise ShmError(f"bad SHM descriptor (segment {segment_id}, flags 0x{flags:x})")
            if flags & _shm.PEER_SEGMENT:
                return self._lend_ours(frame, segment_id, size, offset, length)
            if flags & _shm.NEW_SEGMENT:
                if segment_id in self.segments:
                    raise ShmError(f"segment {segment_id} is already mapped")
                if fd < 0:
                    raise ShmError("a new segment was announced without its descriptor")
                _shm._check_region(offset, length, size)   # nothing mapped for a bad one
                owned, fd = fd, -1   # adopt() closes it, whatever happens
                charges = [(budget, amount, what) for (budget, what), amount
                           in zip(self._receive_budgets, (size, 1, size, 1))]
                self.segments[segment_id] = _shm.ReceivedSegment.adopt(
                    owned, size, charges, copy_on_write=self._writable_lending
                    and not self._copy_shared)
            segment = self.segments.get(segment_id)
            if segment is None:
                raise ShmError(f"segment {segment_id} is not mapped here")
            if size != segment.size:
                raise ShmError(f"segment {segment_id} is {segment.size} bytes, not {size}")
            _shm._check_region(offset, length, size)
            writable = self.writable_all or frame.request_id in self.writable_ids
            payload = self._region(segment, segment_id, offset, length, writable)
        except ShmError as error:
            if fd >= 0:
                os.close(fd)
            if not flags & _shm.PEER_SEGMENT and segment_id:
                (self._release if segment_id in self.segments else self._reject)(segment_id)
            return self._refused(frame, error)
        self.shm_bytes_received += length
        return self._frame_type(frame.type, frame.flags & ~Flags.SHM, frame.version,
                                frame.request_id, payload)

    @staticmethod
    def _refused(frame: Any, error: ShmError) -> ShmError:
        error.request_id, error.msg_type = frame.request_id, frame.type
        # Kept in the items: a traceback (its own, or its cause's) would hold the frames that
        # hold the items, a cycle only the cyclic collector frees, with the segment and every
        # payload they lend.
        link: BaseException | None = error
        while link is not None:
            link.__traceback__ = None
            link = link.__cause__ or link.__context__
        return error

    def _hand_back_named(self, frame: Any, fds: list[int]) -> None:
        """For an SHM frame refused before it was looked at: close the descriptor a
        NEW_SEGMENT claims, and hand back the sender's segment it names (HREL if we map it,
        HREJ if not)."""
        data = bytes(frame.payload)
        if len(data) != _shm.DESCRIPTOR.size:
            return
        segment_id, flags = _shm.DESCRIPTOR.unpack(data)[:2]
        if flags & _shm.NEW_SEGMENT and fds:
            os.close(fds.pop(0))
        if segment_id and not flags & _shm.PEER_SEGMENT:
            (self._release if segment_id in self.segments else self._reject)(segment_id)

    def _lend_ours(self, frame: Any, segment_id: int, size: int, offset: int,
                   length: int) -> Any:
        """A payload that came back in one of our own segments (an echo): lent read-only (or
        copy-on-write when asked), with a hold that keeps the pool from reusing the segment
        until it is released. Nothing is handed back on refusal: the segment is ours, and the
        echo's sender releases it with an HREL of its own."""
        if self.pool is None:
            raise ShmError("a PEER_SEGMENT descriptor, but this side lends no segments")
        pool = self.pool
        segment = pool.hold(segment_id)
        writable = self.writable_all or frame.request_id in self.writable_ids
        try:
            if size != segment.size:
                raise ShmError(f"our segment {segment_id} is {segment.size} bytes, not {size}")
            _shm._check_region(offset, length, size)
            if self._copy_shared:
                with memoryview(segment.map) as whole:
                    part = whole[offset:offset + length]
                    payload: Any = bytearray(part) if writable else bytes(part)
                    part.release()
                pool.unhold(segment_id)
            elif writable:
                private, delta = segment.private_map(offset, length)
                payload = memoryview(_impl.core.SharedRegion(  # type: ignore[arg-type]
                    private, delta, length, False, lambda _: pool.unhold(segment_id), True))
            else:
                payload = memoryview(_impl.core.SharedRegion(  # type: ignore[arg-type]
                    segment.map, offset, length, True, lambda _: pool.unhold(segment_id), True))
        except BaseException:
            pool.unhold(segment_id)
            raise
        self.shm_bytes_received += length
        return self._frame_type(frame.type, frame.flags & ~Flags.SHM, frame.version,
                                frame.request_id, payload)

    def _region(self, segment: _shm.ReceivedSegment, segment_id: int, offset: int,
                length: int, writable: bool = False) -> Any:
        if self._copy_shared:
            # Pure Python cannot see a view's release: copy out and give the segment back.
            with segment.view(offset, length) as view:
                payload = bytearray(view) if writable else bytes(view)
            self._release(segment_id)
            return payload
        if writable:
            # Copy-on-write: nothing is copied until written, and writes never reach the
            # sender. Unwritten pages still read the segment, so it is lent until the view
            # goes. Its private mapping serves one view at a time; another one is a copy.
            lent = segment.lend_writable(offset, length, lambda: self._release(segment_id))
            if lent is not None:
                return lent
            with segment.view(offset, length) as view:
                copy = bytearray(view)
            self._release(segment_id)
            return memoryview(copy)
        lent_views = self._lent

        def released(region: Any) -> None:
            lent_views.pop(id(region), None)
            self._release(segment_id)

        region = _impl.core.SharedRegion(segment.map, offset, length, True, released, True)
        lent_views[id(region)] = (segment_id, segment.size, offset, length)
        # The compiled region exports its buffer; released or collected, it gives back.
        return memoryview(region)  # type: ignore[arg-type]

    def _release(self, segment_id: int) -> None:
        self._hand_back(_shm.RELEASE_MAGIC, segment_id)

    def _reject(self, segment_id: int) -> None:
        self._hand_back(_shm.REJECT_MAGIC, segment_id)

    def _hand_back(self, magic: bytes, segment_id: int) -> None:
        self.outgoing.append(self._encode_frame(
            MessageType.EVENT, _shm.encode_control(magic, [segment_id]), 0))
        wake = self.on_writes
        if wake is not None:
            try:
                wake()
            except Exception as error:   # the connection is gone: nothing to give back to
                log.debug("could not hand segment %d back: %s", segment_id, error)

    def take_writes(self) -> list[Write]:
        """The control Events waiting to be sent (``outgoing``), as one write, and no longer
        waiting; [] if there are none. Safe from any thread."""
        return take_writes(self.outgoing)

    def lends(self, view: memoryview) -> bool:
        """Whether ``view`` is a region of shared memory the peer lent us (still held): a
        reply of it points back at the peer's segment instead of copying it."""
        return id(view.obj) in self._lent
