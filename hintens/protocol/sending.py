"""Sending: how a payload travels (the limits rule of docs/PROTOCOL.md section 8): small and
inline, compressed, through one of our shared-memory segments, or back through the peer's
own segment (an echo); and buffers allocated in a segment. Part of the sans-IO ``Endpoint``;
it returns writes (buffers and descriptors) and never sends them.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from .. import _impl
from . import shm as _shm
from .._checks import count
from .._constants import SCATTER_THRESHOLD_BYTES, Flags, MessageType
from .._errors import FrameTooLargeError, ShmError
from .hello import FEATURE_SHM
from .lending import Write

log = logging.getLogger("hintens")
_NEVER = 1 << 62
_SHM = int(Flags.SHM)   # a plain int: & on the IntFlag builds an enum member each time


def plain_frame(msg_type: int, payload: Any, request_id: int) -> list[Any]:
    """The buffers that carry one uncompressed frame: one copy for small payloads (header and
    payload together), none for large ones (the header, then the payload itself)."""
    size = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
    if size < SCATTER_THRESHOLD_BYTES:
        return [_impl.core.encode_frame(msg_type, payload, request_id)]
    return [_impl.core.encode_header(msg_type, payload, request_id), payload]


class Sending:
    """The sending side, for ``Endpoint`` (which sets this state up)."""

    pool: _shm.SegmentPool | None
    shm_threshold: int
    compress_min: int
    shm_bytes_sent: int
    responses_sent: int
    _allocations: dict[int, tuple[int, _shm.Segment, bool, list[int], int]]
    _allowed_flags: int
    _copy_shared: bool
    _encode_frame: Any
    _encode_header: Any
    _lent: dict[int, tuple[int, int, int, int]]
    _peer_limit: int
    _zstd_compress: Any
    _zstd_lock: Any

    if TYPE_CHECKING:   # the Endpoint's own
        def negotiated(self, feature: int) -> bool: ...

        def error_frame(self, code: int, message: str, request_id: int, *,
                        counted: bool = True) -> bytes: ...

    def inline(self, msg_type: int, payload: Any, request_id: int) -> list[Any]:
        """The buffers of an inline frame: compressed when negotiated, at least
        ``compress_min`` bytes and smaller that way; else as ``plain_frame`` sends it."""
        if self.compress_min < _NEVER:
            size = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
            if size >= self.compress_min:
                with self._zstd_lock:
                    packed = self._zstd_compress.compress(payload)
                if len(packed) < size:
                    return [self._encode_frame(msg_type, packed, request_id, Flags.COMPRESSED)]
        return plain_frame(msg_type, payload, request_id)

    def allocate(self, size: int) -> memoryview | None:
        """A writable buffer inside a segment; sending it copies nothing. Dropped (released
        or collected) without being sent, it gives its segment back.

        Returns:
            The buffer, or None when every segment is lent out: wait for a release (keeping
            the connection's reads going), then ask again.

        Raises:
            ShmError: shared memory was not negotiated on this connection, or ``size`` does
                not fit the pool.
            TypeError, ValueError: ``size`` is not a positive int.
        """
        size = count(size, "size")
        if self.pool is None or not self.negotiated(FEATURE_SHM):
            raise ShmError("allocate() needs shared memory, and this connection did not "
                           "negotiate it")
        pool = self.pool
        acquired = pool.try_acquire(size)
        if acquired is None:
            return None
        segment_id, segment, new, retired = acquired
        allocations = self._allocations

        def dropped(key: int) -> None:   # never sent: the peer never got this use
            if allocations.pop(key, None) is not None:
                pool.unlend(segment_id, new)
                pool.unannounced(retired)

        try:
            if self._copy_shared:   # a mapping of its own, whose collection we can see
                owner: Any = _impl.core.Mapping(segment.fd, size, True)
                weakref.finalize(owner, dropped, id(owner))
            else:
                owner = _impl.core.SharedRegion(segment.map, 0, size, False,
                                                lambda region: dropped(id(region)), True)
            view = memoryview(owner)
        except BaseException:
            pool.unlend(segment_id, new)
            pool.unannounced(retired)
            raise
        allocations[id(owner)] = (segment_id, segment, new, retired, size)
        return view

    def writes(self, msg_type: int, payload: Any, request_id: int) -> list[Write] | None:
        """The writes that carry ``payload`` to the peer, by the limits rule: through shared
        memory when that was negotiated and the payload is ``shm_threshold`` bytes or more,
        over the peer's ``max_payload``, or an ``allocate()`` buffer or echo; else inline.

        Each write is (buffers, descriptors). Retirements go first, in a write of their own,
        so that a new segment's descriptor rides with the first byte of its own frame.

        Returns:
            The writes; None when shared memory is exhausted right now: wait for a release
            (keeping the connection's reads going), then ask again.

        Raises:
            TypeError: ``payload`` is not a bytes-like object.
            FrameTooLargeError: over the peer's limit, and shared memory was not negotiated.
                Nothing was sent; the connection stays usable.
            ShmError: over what the pool (or the peer) takes through shared memory.
        """
        try:
            size = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
        except TypeError:
            raise TypeError(f"a payload must be a bytes-like object, not "
                            f"{type(payload).__name__}") from None
        limit = self._peer_limit
        if self._allowed_flags & _SHM:   # negotiated (so this side has a pool)
            if self._allocations and type(payload) is memoryview:
                allocated = self._allocated_writes(msg_type, payload, request_id)
                if allocated is not None:
                    return allocated       # filled in place by the application: no copy
            if self._lent and type(payload) is memoryview:
                entry = self._lent.get(id(payload.obj))
                if entry is not None and payload.nbytes == entry[3] and payload.c_contiguous:
                    segment_id, segment_size, offset, length = entry   # an echo: point back
                    self.shm_bytes_sent += length
                    return [([self._encode_frame(msg_type, _shm.encode_descriptor(
                        segment_id, segment_size, offset, length, False, peer=True),
                        request_id, Flags.SHM)], [])]
            if size >= self.shm_threshold or size > limit:
                return self._shared_writes(msg_type, payload, size, request_id)
        if size > limit:
            error = FrameTooLargeError(
                f"a payload of {size} bytes is over the {limit}-byte limit the peer "
                f"announced, and shared memory was not negotiated: nothing was sent",
                request_id, msg_type=msg_type)
            error.fatal = False   # refused here: the connection is untouched
            try:
                raise error
            finally:
                del error   # else error -> traceback -> this frame -> error: a cycle
        if self.compress_min < _NEVER:
            return [(self.inline(msg_type, payload, request_id), [])]
        if size < SCATTER_THRESHOLD_BYTES:   # plain_frame, inlined: the hot inline path
            return [([self._encode_frame(msg_type, payload, request_id)], [])]
        return [([self._encode_header(msg_type, payload, request_id), payload], [])]

    def reply_writes(self, request_id: int, result: Any) -> list[Write] | None:
        """The writes that answer a Request with ``result`` (None: an empty payload), by the
        same rule as ``writes``; a result that cannot reach the peer becomes an Error reply
        (TOO_LARGE, or SHM_ERROR), so the requester learns why.

        Returns:
            The writes; None when shared memory is exhausted right now (as ``writes``).

        Raises:
            TypeError: ``result`` is not a bytes-like object.
        """
        try:
            writes = self.writes(MessageType.RESPONSE, b"" if result is None else result,
                                 request_id)
            if writes is not None:
                self.responses_sent += 1
            return writes
        except (FrameTooLargeError, ShmError) as error:
            log.info("request %d: the reply cannot be sent: %s", request_id, error)
            return [([self.error_frame(error.code, f"the reply cannot be sent: {error}",
                                       request_id)], [])]

    def _allocated_writes(self, msg_type: int, payload: memoryview,
                          request_id: int) -> list[Write] | None:
        entry = self._allocations.get(id(payload.obj))
        if entry is None or payload.nbytes != entry[4] or not payload.c_contiguous:
            return None   # not one of ours, or a part of one: copied like any buffer
        del self._allocations[id(payload.obj)]
        segment_id, segment, new, retired, length = entry
        self.shm_bytes_sent += length
        frame = self._encode_frame(msg_type, _shm.encode_descriptor(
            segment_id, segment.size, 0, length, new), request_id, Flags.SHM)
        return self._with_retirements(frame, segment_id, new, retired)

    def _shared_writes(self, msg_type: int, payload: Any, size: int,
                       request_id: int) -> list[Write] | None:
        assert self.pool is not None
        acquired = self.pool.try_acquire(size)
        if acquired is None:
            return None
        segment_id, segment, new, retired = acquired
        try:
            region = _impl.core.SharedRegion(segment.map, 0, size, False)
            region.copy_in(payload)        # the one copy a send makes
            region.release()
            frame = self._encode_frame(msg_type, _shm.encode_descriptor(
                segment_id, segment.size, 0, size, new), request_id, Flags.SHM)
            self.shm_bytes_sent += size
            return self._with_retirements(frame, segment_id, new, retired)
        except BaseException:
            self.pool.unlend(segment_id, new)
            self.pool.unannounced(retired)
            raise

    def _with_retirements(self, frame: bytes, segment_id: int, new: bool,
                          retired: list[int]) -> list[Write]:
        assert self.pool is not None
        writes: list[Write] = []
        if retired:
            writes.append(([self._encode_frame(MessageType.EVENT, _shm.encode_control(
                _shm.RETIRE_MAGIC, retired), 0)], []))
        # A duplicate of the descriptor, taken while the segment is surely ours and lent.
        writes.append(([frame], [self.pool.descriptor_for(segment_id)] if new else []))
        return writes

    def unsent(self, writes: list[Write]) -> None:
        """Writes that ``writes`` returned will not be sent (an offer was refused): the
        segments they use are not lent to the peer after all, and the retirements they
        announce go with the next frame instead."""
        if self.pool is None:
            return
        for buffers, fds in writes:
            header = _impl.core.unpack_header(buffers[0])
            body = bytes(memoryview(buffers[0])[24:24 + header.length])
            if header.flags & Flags.SHM:
                segment_id, flags = _shm.DESCRIPTOR.unpack(body)[:2]
                if not flags & _shm.PEER_SEGMENT:
                    self.pool.unlend(segment_id, bool(flags & _shm.NEW_SEGMENT))
            elif header.type == MessageType.EVENT and header.request_id == 0:
                control = _shm.decode_control(body)
                if control is not None and control[0] == _shm.RETIRE_MAGIC:
                    self.pool.unannounced(control[1])
