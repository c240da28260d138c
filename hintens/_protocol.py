"""Sans-IO connection layer: the rules a connection applies to decoded frames. No sockets.

The core's Channel reads and decodes (with ``Endpoint.decoder``); ``admit`` and
``after_error`` turn what it produced into frames for the application and protocol errors, in
stream order, and the ``shm_*``/``allocate`` methods decide how payloads travel.

Rules (docs/PROTOCOL.md sections 5, 6 and 8):

* An Event with request id 0 is a capability hello. A hello we understand updates
  ``peer_hello``; one we do not understand is ignored. Neither reaches the application.
* A flag the connection did not negotiate (SHM, COMPRESSED) is an UNSUPPORTED_FLAGS violation,
  exactly like a reserved bit.
* Every violation comes out of ``admit``/``after_error`` as a ``ProtocolError`` item.
  ``error_reply`` says what, if anything, goes back to the peer, and ``error.fatal`` says
  whether the connection must close afterwards.
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
from typing import Any, Callable, Union

from . import _impl, _shm
from ._checks import count
from ._constants import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_FRAME_PAYLOAD_BYTES,
    VERSION,
    Flags,
    MessageType,
)
from ._errors import (
    DecompressedTooLargeError,
    ProtocolError,
    ShmError,
    UnsupportedFlagsError,
    encode_error_payload,
)

try:
    import zstandard
except ImportError:   # the `compression` extra is not installed
    zstandard = None  # type: ignore[assignment]

log = logging.getLogger("hintens")
#: The smallest payload limit a Client or Server may be given (Error frames and control Events
#: are accepted up to CONTROL_MAX_PAYLOAD_BYTES whatever the limit).
MIN_MAX_PAYLOAD_BYTES = 1024
#: Payloads at least this large go through shared memory toward a peer that negotiated it.
DEFAULT_SHM_THRESHOLD_BYTES = 64 * 1024
#: The most memory one connection's sending segments may hold.
DEFAULT_SHM_POOL_BYTES = 1 << 30
#: Inline payloads at least this large are compressed toward a peer that negotiated it.
DEFAULT_COMPRESS_THRESHOLD_BYTES = 4096
#: zstd level: fast, and still a good ratio on text-like payloads.
COMPRESSION_LEVEL = 3
_NEVER = 1 << 62

#: Payloads at least this large leave as header + payload in one sendmsg, without a copy.
SCATTER_THRESHOLD_BYTES = 16 * 1024

HELLO_MAGIC = b"HELO"
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
#: A hello larger than this, or with more entries, is not understood (and so ignored).
MAX_HELLO_BYTES = 4096
MAX_HELLO_ENTRIES = 64


class HelloKey:
    """Keys of the hello's entries. Unknown keys are skipped by receivers."""

    MINOR = 1          # u8: highest minor version of major 1 the sender speaks
    FEATURES = 2       # u32 LE bit set, see FEATURE_*
    MAX_PAYLOAD = 3    # u32 LE: largest inline payload the sender accepts
    SESSION_ID = 4     # 16 bytes, client to server: a session that survives reconnects
    INSTANCE_ID = 5    # 16 bytes, server to client: this run of the server (its replay memory)


FEATURE_SHM = 0x1
FEATURE_COMPRESSION = 0x2


class Hello:
    """What one side announces right after connecting.

    Attributes:
        minor: the highest minor version of protocol major 1 that the sender speaks.
        features: ``FEATURE_*`` bits the sender can receive.
        max_payload: the largest inline payload the sender accepts, in bytes.
        entries: every entry as received, including keys this version does not know.
    """

    __slots__ = ("minor", "features", "max_payload", "entries")

    def __init__(self, minor: int = VERSION & 0xFF, features: int = 0,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 entries: dict[int, bytes] | None = None) -> None:
        self.minor = minor
        self.features = features
        self.max_payload = max_payload
        self.entries = dict(entries or {})

    def encode(self) -> bytes:
        """The hello payload: bincode ``([u8; 4], Vec<(u16, Vec<u8>)>)``."""
        entries = dict(self.entries)
        entries[HelloKey.MINOR] = bytes([self.minor])
        entries[HelloKey.FEATURES] = _U32.pack(self.features)
        entries[HelloKey.MAX_PAYLOAD] = _U32.pack(self.max_payload)
        parts = [HELLO_MAGIC, _U64.pack(len(entries))]
        for key in sorted(entries):
            value = entries[key]
            parts += [_U16.pack(key), _U64.pack(len(value)), value]
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: Any) -> Hello | None:
        """Parse a hello payload; None when it is not one this version understands."""
        data = bytes(payload)
        if len(data) > MAX_HELLO_BYTES or not data.startswith(HELLO_MAGIC) or len(data) < 12:
            return None
        (count,) = _U64.unpack_from(data, 4)
        if count > MAX_HELLO_ENTRIES:
            return None
        pos, entries = 12, {}
        for _ in range(count):
            if len(data) - pos < 10:
                return None
            (key,) = _U16.unpack_from(data, pos)
            (length,) = _U64.unpack_from(data, pos + 2)
            pos += 10
            if length > len(data) - pos or key in entries:
                return None
            entries[key] = data[pos:pos + length]
            pos += length
        if pos != len(data):
            return None
        try:
            minor = entries[HelloKey.MINOR][0] if HelloKey.MINOR in entries else 0
            features = _U32.unpack(entries.get(HelloKey.FEATURES, bytes(4)))[0]
            max_payload = (_U32.unpack(entries[HelloKey.MAX_PAYLOAD])[0]
                           if HelloKey.MAX_PAYLOAD in entries else DEFAULT_MAX_PAYLOAD_BYTES)
        except (struct.error, IndexError):
            return None
        return cls(minor, features, max_payload, entries)

    def __repr__(self) -> str:
        return (f"Hello(minor={self.minor}, features=0x{self.features:x}, "
                f"max_payload={self.max_payload})")


#: A peer that never sends a hello gets inline frames only, within the default limit.
SILENT_PEER = Hello(minor=0, features=0, max_payload=DEFAULT_MAX_PAYLOAD_BYTES)

Item = Union[Any, ProtocolError]   # a core Frame, or a violation


def plain_frame(msg_type: int, payload: Any, request_id: int) -> list[Any]:
    """The buffers that carry one uncompressed frame: one copy for small payloads (header and
    payload together), none for large ones (the header, then the payload itself)."""
    size = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
    if size < SCATTER_THRESHOLD_BYTES:
        return [_impl.core.encode_frame(msg_type, payload, request_id)]
    return [_impl.core.encode_header(msg_type, payload, request_id), payload]


class Endpoint:
    """One side of a connection, without I/O.

    Args:
        max_payload: the largest inline payload accepted from the peer.
        features: ``FEATURE_*`` bits this side announces and can receive.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, features: int = 0,
                 shm_threshold: int = DEFAULT_SHM_THRESHOLD_BYTES,
                 shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES) -> None:
        core = _impl.core
        max_payload = count(max_payload, "max_payload", minimum=MIN_MAX_PAYLOAD_BYTES,
                            maximum=MAX_FRAME_PAYLOAD_BYTES)
        shm_threshold = count(shm_threshold, "shm_threshold", minimum=0)
        shm_pool_bytes = count(shm_pool_bytes, "shm_pool_bytes", minimum=mmap.PAGESIZE)
        compress_threshold = count(compress_threshold, "compress_threshold", minimum=0)
        if features & FEATURE_COMPRESSION and zstandard is None:
            raise ValueError("compression needs the zstandard package: "
                             "pip install 'hintens[compression]'")
        # Compression (zstd), once both hellos announce it: inline payloads of at least
        # compress_min bytes are compressed when that makes them smaller.
        self.compress_threshold = compress_threshold
        self.compress_min = _NEVER
        #: Payloads below this go the small way (packed, never compressed).
        self.small_max = SCATTER_THRESHOLD_BYTES
        if features & FEATURE_COMPRESSION:
            self._zstd_compress = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
            self._zstd_decompress = zstandard.ZstdDecompressor()
            self._zstd_lock = threading.Lock()   # a compressor is not for two threads at once
        self._frame_type = core.Frame
        self._encode_frame = core.encode_frame
        self.decoder = core.FrameDecoder(max_payload)
        self.hello = Hello(features=features, max_payload=max_payload)
        self.peer_hello: Hello | None = None
        self._allowed_flags = 0   # flags the peer may set: grows as features are negotiated
        # Shared memory. Sending: a pool of our segments. Receiving: the peer's segments by id,
        # the descriptors that came with them (the Channel's list) and a way to send releases.
        self.shm_threshold = shm_threshold
        self.pool = _shm.SegmentPool(shm_pool_bytes) if features & FEATURE_SHM else None
        self.segments: dict[int, _shm.ReceivedSegment] = {}
        self.fd_source: list[int] = []
        self.send_control: Callable[[bytes], None] | None = None
        # Whose shared payloads are lent writable (copy-on-write): request ids, or everything.
        self.writable_ids: set[int] = set()
        self.writable_all = False
        # Read-only payloads lent from the peer's segments, by id of their region: an echo of
        # one goes back as a PEER_SEGMENT descriptor, without a copy.
        self._lent: dict[int, tuple[int, int, int, int]] = {}
        # Buffers handed out by allocate(), by id, with what sending them needs.
        self._allocations: dict[int, tuple[Any, int, _shm.Segment, bool, list[int]]] = {}

    @property
    def peer(self) -> Hello:
        """The peer's hello, or what is assumed of a peer that sent none."""
        return self.peer_hello or SILENT_PEER

    def negotiated(self, feature: int) -> bool:
        """Both sides announced ``feature``."""
        return bool(self.hello.features & self.peer.features & feature)

    def hello_frame(self) -> bytes:
        """The frame announcing this side's capabilities (Event, request id 0)."""
        return self._encode_frame(MessageType.EVENT, self.hello.encode(), 0)

    def admit(self, frames: list[Any]) -> list[Item]:
        """Apply the connection's rules (hello, negotiated flags) to frames already decoded."""
        for frame in frames:   # frames without flags or a hello pass through as they are
            if frame.flags or not frame.request_id:
                items: list[Item] = []
                self._admit(frames, items)
                return items
        return frames

    def after_error(self, error: ProtocolError) -> list[Item]:
        """The items around a violation the decoder raised: the frames before it, the error,
        and, when the stream is still in sync, whatever was already buffered after it."""
        items: list[Item] = []
        while True:
            self._admit(error.frames, items)
            items.append(error)
            if error.fatal:
                return items
            try:
                items += self.admit(self.decoder.feed(b""))
                return items
            except ProtocolError as next_error:
                error = next_error

    def _admit(self, frames: list[Any], items: list[Item]) -> None:
        for frame in frames:
            allowed = self._allowed_flags   # a hello earlier in this batch may have widened it
            if frame.flags & Flags.COMPRESSED and allowed & Flags.COMPRESSED:
                frame = self._inflate(frame)
                if isinstance(frame, ProtocolError):
                    items.append(frame)
                    continue
            if frame.flags & Flags.SHM and not allowed & Flags.SHM:
                error = ShmError("an SHM frame on a connection that did not negotiate shared "
                                 "memory", frame.request_id, msg_type=frame.type)
                items.append(error)
            elif frame.flags & ~allowed:
                items.append(UnsupportedFlagsError(
                    f"flags 0x{frame.flags:04x} were not negotiated on this connection",
                    frame.request_id, msg_type=frame.type))
            elif frame.type == MessageType.EVENT and frame.request_id == 0:
                self._control(frame.payload)
            elif frame.flags & Flags.SHM:
                items.append(self._lend(frame))
            else:
                items.append(frame)

    def _inflate(self, frame: Any) -> Any:
        """A COMPRESSED frame with its payload decompressed (and the flag cleared), or the
        error that answers it. The declared size is checked before anything is inflated."""
        if frame.flags & Flags.SHM:
            refused = UnsupportedFlagsError("COMPRESSED applies to inline frames only, not to "
                                            "SHM", frame.request_id, msg_type=frame.type)
            if self._allowed_flags & Flags.SHM:
                # Take the segment in as any SHM frame would, then let its payload go at
                # once: the sender gets its HREL and does not wait for it.
                self._lend(frame)
            return refused
        try:
            size = zstandard.frame_content_size(frame.payload)
            if size < 0:
                raise zstandard.ZstdError("the zstd frame does not declare its content size")
            if size > self.decoder.max_payload:
                return DecompressedTooLargeError(
                    f"a compressed payload of {size} bytes is over the limit of "
                    f"{self.decoder.max_payload}", frame.request_id, msg_type=frame.type)
            if size:
                data = self._zstd_decompress.decompress(frame.payload, max_output_size=size,
                                                        allow_extra_data=False)
            else:   # decompress() returns early for an empty frame: check "exactly one" here
                reader = self._zstd_decompress.decompressobj()
                data = reader.decompress(frame.payload)
                if data or not reader.eof or reader.unused_data:
                    raise zstandard.ZstdError("not exactly one empty zstd frame")
        except zstandard.ZstdError as error:
            return UnsupportedFlagsError(f"a COMPRESSED payload is not one zstd frame: {error}",
                                         frame.request_id, msg_type=frame.type)
        return self._frame_type(frame.type, frame.flags & ~Flags.COMPRESSED, frame.version,
                                frame.request_id, data)

    @property
    def compressing(self) -> bool:
        """Compression was negotiated: payloads may be compressed and must be inflated."""
        return self.compress_min < _NEVER

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

    def _control(self, payload: Any) -> None:
        """An Event with request id 0: a hello, a release, a retire, or something to ignore."""
        control = _shm.decode_control(payload)
        if control is None:
            hello = Hello.decode(payload)
            if hello is not None:
                self.peer_hello = hello
                self._allowed_flags = self._negotiated_flags()
                if self.negotiated(FEATURE_COMPRESSION):
                    self.compress_min = self.compress_threshold
                    self.small_max = min(SCATTER_THRESHOLD_BYTES, self.compress_threshold)
            return
        magic, ids = control
        if magic == _shm.RELEASE_MAGIC and self.pool is not None:
            for segment_id in ids:
                self.pool.give_back(segment_id)
        elif magic == _shm.RETIRE_MAGIC:
            for segment_id in ids:
                segment = self.segments.pop(segment_id, None)
                if segment is not None:
                    segment.discard()

    def _lend(self, frame: Any) -> Any:
        """An SHM frame's payload, mapped and lent; or the ShmError that answers it."""
        segment_id = 0
        try:
            segment_id, flags, size, offset, length = _shm.decode_descriptor(frame.payload)
            if flags & _shm.PEER_SEGMENT:
                return self._lend_ours(frame, segment_id, offset, length)
            new = bool(flags & _shm.NEW_SEGMENT)
            if new:
                if segment_id in self.segments:
                    raise ShmError(f"segment {segment_id} is already mapped")
                if not self.fd_source:
                    raise ShmError("a new segment was announced without its descriptor")
                self.segments[segment_id] = _shm.ReceivedSegment.adopt(
                    self.fd_source.pop(0), size)
            segment = self.segments.get(segment_id)
            if segment is None:
                raise ShmError(f"segment {segment_id} is not mapped here")
            writable = self.writable_all or frame.request_id in self.writable_ids
            payload = self._region(segment, segment_id, offset, length, writable)
        except ShmError as error:
            error.request_id, error.msg_type = frame.request_id, frame.type
            if segment_id:
                self._release(segment_id)   # the sender may reuse it: we will not read it
            return error
        return self._frame_type(frame.type, frame.flags & ~Flags.SHM, frame.version,
                                frame.request_id, payload)

    def _lend_ours(self, frame: Any, segment_id: int, offset: int, length: int) -> Any:
        """A payload that came back in one of our own segments (an echo): lent read-only,
        with a hold that keeps the pool from reusing the segment until it is released."""
        if self.pool is None:
            raise ShmError("a PEER_SEGMENT descriptor, but this side lends no segments")
        segment = self.pool.hold(segment_id)
        try:
            if offset < 0 or length < 0 or offset > segment.size or length > segment.size - offset:
                raise ShmError(f"region [{offset}, {offset}+{length}) is outside our "
                               f"{segment.size}-byte segment {segment_id}")
            if _impl.implementation == "python":
                payload: Any = bytes(memoryview(segment.map)[offset:offset + length])
                self.pool.give_back(segment_id)
            else:
                pool = self.pool
                region = _impl.core.SharedRegion(segment.map, offset, length, True,
                                                 lambda _: pool.give_back(segment_id), True)
                payload = memoryview(region)  # type: ignore[arg-type]
        except BaseException:
            self.pool.give_back(segment_id)
            raise
        return self._frame_type(frame.type, frame.flags & ~Flags.SHM, frame.version,
                                frame.request_id, payload)

    def _region(self, segment: _shm.ReceivedSegment, segment_id: int, offset: int,
                length: int, writable: bool = False) -> Any:
        if _impl.implementation == "python":
            # Pure Python cannot see a view's release: copy out and give the segment back.
            with segment.view(offset, length) as view:
                payload = bytearray(view) if writable else bytes(view)
            self._release(segment_id)
            return payload
        if writable:
            # Copy-on-write: nothing is copied until written, and writes never reach the
            # sender. Unwritten pages still read the segment, so it is lent until the view goes.
            private, delta = segment.private_map(offset, length)
            region = _impl.core.SharedRegion(private, delta, length, False,
                                             lambda _: self._release(segment_id), True)
        else:
            lent = self._lent

            def released(region: Any) -> None:
                lent.pop(id(region), None)
                self._release(segment_id)

            region = _impl.core.SharedRegion(segment.map, offset, length, True, released, True)
            lent[id(region)] = (segment_id, segment.size, offset, length)
        # The compiled region exports its buffer; released or collected, it gives back.
        return memoryview(region)  # type: ignore[arg-type]

    def _release(self, segment_id: int) -> None:
        send = self.send_control
        if send is not None:
            try:
                send(_shm.encode_control(_shm.RELEASE_MAGIC, [segment_id]))
            except Exception as error:   # the connection is gone: nothing to give back to
                log.debug("could not release segment %d: %s", segment_id, error)

    def allocate(self, size: int, deadline: float) -> memoryview:
        """A writable buffer inside a segment; sending it copies nothing.

        Raises:
            ShmError: shared memory was not negotiated on this connection.
            Timeout: no segment came free before ``deadline``.
        """
        if self.pool is None or not self.negotiated(FEATURE_SHM):
            raise ShmError("allocate() needs shared memory, and this connection did not "
                           "negotiate it")
        segment_id, segment, new, retired = self.pool.acquire(size, deadline)
        if _impl.implementation == "python":
            view = memoryview(segment.map)[:size]
        else:
            region = _impl.core.SharedRegion(segment.map, 0, size, False)
            view = memoryview(region)  # type: ignore[arg-type]
        self._allocations[id(view)] = (view, segment_id, segment, new, retired)
        return view

    def _allocated_sends(self, msg_type: int, payload: Any,
                         request_id: int) -> list[tuple[list[Any], list[int]]] | None:
        entry = self._allocations.get(id(payload))
        if entry is None or entry[0] is not payload:
            return None
        del self._allocations[id(payload)]
        view, segment_id, segment, new, retired = entry
        frame = self._encode_frame(msg_type, _shm.encode_descriptor(
            segment_id, segment.size, 0, len(view), new), request_id, Flags.SHM)
        return self._writes(frame, segment, new, retired)

    def _writes(self, frame: bytes, segment: _shm.Segment, new: bool,
                retired: list[int]) -> list[tuple[list[Any], list[int]]]:
        writes: list[tuple[list[Any], list[int]]] = []
        if retired:
            writes.append(([self._encode_frame(MessageType.EVENT, _shm.encode_control(
                _shm.RETIRE_MAGIC, retired), 0)], []))
        writes.append(([frame], [segment.fd] if new else []))
        return writes

    def shm_sends(self, msg_type: int, payload: Any, request_id: int,
                  deadline: float) -> list[tuple[list[Any], list[int]]] | None:
        """The writes that carry a payload through shared memory, or None to send it inline.

        Each write is (buffers, descriptors). Retirements go first, in a write of their own,
        so that a new segment's descriptor rides with the first byte of its own frame.
        """
        if self.pool is None or not self.negotiated(FEATURE_SHM):
            return None
        if self._allocations:
            allocated = self._allocated_sends(msg_type, payload, request_id)
            if allocated is not None:
                return allocated       # filled in place by the application: no copy
        if self._lent and type(payload) is memoryview:
            entry = self._lent.get(id(payload.obj))
            if entry is not None and payload.nbytes == entry[3] and payload.c_contiguous:
                segment_id, size, offset, length = entry     # an echo: point back at it
                return [([self._encode_frame(msg_type, _shm.encode_descriptor(
                    segment_id, size, offset, length, False, peer=True), request_id,
                    Flags.SHM)], [])]
        size = memoryview(payload).nbytes
        if size < self.shm_threshold:
            return None
        segment_id, segment, new, retired = self.pool.acquire(size, deadline)
        try:
            region = _impl.core.SharedRegion(segment.map, 0, size, False)
            region.copy_in(payload)        # the one copy a send makes
            region.release()
            frame = self._encode_frame(msg_type, _shm.encode_descriptor(
                segment_id, segment.size, 0, size, new), request_id, Flags.SHM)
        except BaseException:
            self.pool.give_back(segment_id)
            raise
        return self._writes(frame, segment, new, retired)

    def close_shm(self) -> None:
        """The connection is over: free our segments and unmap the peer's."""
        self._allocations.clear()
        if self.pool is not None:
            self.pool.close()
        for segment in self.segments.values():
            segment.discard()
        self.segments.clear()

    def _negotiated_flags(self) -> int:
        flags = 0
        if self.negotiated(FEATURE_SHM):
            flags |= Flags.SHM
        if self.negotiated(FEATURE_COMPRESSION):
            flags |= Flags.COMPRESSED
        return int(flags)

    def error_frame(self, code: int, message: str, request_id: int) -> bytes:
        """An Error frame."""
        return self._encode_frame(MessageType.ERROR, encode_error_payload(code, message),
                                  request_id)

    def error_reply(self, error: ProtocolError) -> bytes | None:
        """The Error frame that answers a violation, or None where none is due.

        Fatal violations are always answered (request id 0 when it was unreadable) just before
        the connection closes. Recoverable ones are answered only for Requests.
        """
        if error.fatal or error.msg_type == MessageType.REQUEST:
            return self.error_frame(error.code, error.message, error.request_id or 0)
        return None
