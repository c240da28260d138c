"""Sans-IO connection layer: the rules a connection applies to decoded frames. No sockets.

The core's Channel reads and decodes (with ``Endpoint.decoder``); ``admit`` and
``after_error`` turn what it produced into frames for the application and protocol errors, in
stream order, and ``writes``/``reply_writes``/``allocate`` decide how payloads travel.

Rules (docs/PROTOCOL.md sections 4 to 9):

* An Event with request id 0 is a control Event: a hello (only the first one counts), a
  release (HREL), a reject (HREJ) or a retire (HRET). One we do not understand is ignored.
  None reaches the application.
* A flag the connection did not negotiate (SHM, COMPRESSED) is a violation, exactly like a
  reserved bit.
* Every violation comes out of ``admit``/``after_error`` as a ``ProtocolError`` item.
  ``error_reply`` says what, if anything, goes back to the peer, and ``error.fatal`` says
  whether the connection must close afterwards.
* The peer's limits bind what we send (``writes``): a payload over the peer's announced
  ``max_payload`` goes through shared memory when that was negotiated, or fails here with
  ``FrameTooLargeError`` before a byte is sent. A reply that cannot reach the peer becomes an
  Error reply (TOO_LARGE).
* Our limits bind what the peer makes us map: a NEW_SEGMENT counts against this connection's
  ``shm_receive_bytes`` and ``shm_receive_segments`` (and a server's budgets across its
  connections) before anything is mapped. A refused SHM frame is answered SHM_ERROR (for a
  Request), and the segment it names is handed back: HREL when we map it, HREJ when we do not.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import struct
import threading
import weakref
from typing import Any, Callable, Sequence, Union

from .. import _impl
from . import shm as _shm
from .._checks import count
from .._constants import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_FRAME_PAYLOAD_BYTES,
    SCATTER_THRESHOLD_BYTES,
    VERSION,
    Flags,
    MessageType,
)
from .._errors import (
    DecompressedTooLargeError,
    FrameTooLargeError,
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
#: The most of a peer's shared memory one connection maps at once (hello key 6).
DEFAULT_SHM_RECEIVE_BYTES = 1 << 30
#: The most of a peer's segments one connection maps at once (hello key 7).
DEFAULT_SHM_RECEIVE_SEGMENTS = 64
#: Inline payloads at least this large are compressed toward a peer that negotiated it.
DEFAULT_COMPRESS_THRESHOLD_BYTES = 4096
#: zstd level: fast, and still a good ratio on text-like payloads.
COMPRESSION_LEVEL = 3
_NEVER = 1 << 62


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
    SHM_RECEIVE_BYTES = 6      # u64 LE: most bytes of the peer's segments the sender maps
    SHM_RECEIVE_SEGMENTS = 7   # u32 LE: most segments of the peer's the sender maps


#: Known keys and the size their value must have; a value of another size is read as absent.
_HELLO_VALUE_SIZES = {HelloKey.MINOR: 1, HelloKey.FEATURES: 4, HelloKey.MAX_PAYLOAD: 4,
                      HelloKey.SESSION_ID: 16, HelloKey.INSTANCE_ID: 16,
                      HelloKey.SHM_RECEIVE_BYTES: 8, HelloKey.SHM_RECEIVE_SEGMENTS: 4}


FEATURE_SHM = 0x1
FEATURE_COMPRESSION = 0x2


class Hello:
    """What one side announces right after connecting.

    Attributes:
        minor: the highest minor version of protocol major 1 that the sender speaks.
        features: ``FEATURE_*`` bits the sender can receive.
        max_payload: the largest inline payload the sender accepts, in bytes.
        shm_receive_bytes: the most bytes of our segments the sender maps at once.
        shm_receive_segments: the most of our segments the sender maps at once.
        entries: every entry as received, including keys this version does not know.
    """

    __slots__ = ("minor", "features", "max_payload", "shm_receive_bytes",
                 "shm_receive_segments", "entries")

    def __init__(self, minor: int = VERSION & 0xFF, features: int = 0,
                 max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 entries: dict[int, bytes] | None = None, *,
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS) -> None:
        self.minor = minor
        self.features = features
        self.max_payload = max_payload
        self.shm_receive_bytes = shm_receive_bytes
        self.shm_receive_segments = shm_receive_segments
        self.entries = dict(entries or {})

    def encode(self) -> bytes:
        """The hello payload: bincode ``([u8; 4], Vec<(u16, Vec<u8>)>)``, keys in order."""
        entries = dict(self.entries)
        entries[HelloKey.MINOR] = bytes([self.minor])
        entries[HelloKey.FEATURES] = _U32.pack(self.features)
        entries[HelloKey.MAX_PAYLOAD] = _U32.pack(self.max_payload)
        if self.features & FEATURE_SHM:
            entries[HelloKey.SHM_RECEIVE_BYTES] = _U64.pack(self.shm_receive_bytes)
            entries[HelloKey.SHM_RECEIVE_SEGMENTS] = _U32.pack(self.shm_receive_segments)
        parts = [HELLO_MAGIC, _U64.pack(len(entries))]
        for key in sorted(entries):
            value = entries[key]
            parts += [_U16.pack(key), _U64.pack(len(value)), value]
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: Any) -> Hello | None:
        """Parse a hello payload; None when it is not one this version understands.

        Keys may come in any order (senders send them in increasing order); a repeated key
        makes the hello not understood. A known key whose value has the wrong size counts as
        absent.
        """
        data = bytes(payload)
        if len(data) > MAX_HELLO_BYTES or not data.startswith(HELLO_MAGIC) or len(data) < 12:
            return None
        (count_,) = _U64.unpack_from(data, 4)
        if count_ > MAX_HELLO_ENTRIES:
            return None
        pos, entries = 12, {}
        for _ in range(count_):
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
        known = {key: value for key, value in entries.items()
                 if _HELLO_VALUE_SIZES.get(key) == len(value)}
        hello = cls(known[HelloKey.MINOR][0] if HelloKey.MINOR in known else 0,
                    _U32.unpack(known.get(HelloKey.FEATURES, bytes(4)))[0],
                    _U32.unpack(known[HelloKey.MAX_PAYLOAD])[0]
                    if HelloKey.MAX_PAYLOAD in known else DEFAULT_MAX_PAYLOAD_BYTES,
                    entries)
        if HelloKey.SHM_RECEIVE_BYTES in known:
            hello.shm_receive_bytes = _U64.unpack(known[HelloKey.SHM_RECEIVE_BYTES])[0]
        if HelloKey.SHM_RECEIVE_SEGMENTS in known:
            hello.shm_receive_segments = _U32.unpack(known[HelloKey.SHM_RECEIVE_SEGMENTS])[0]
        return hello

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


Write = tuple[list[Any], list[int]]   # buffers, and the descriptors that go with them


_NO_FDS: list[int] = []   # admit() without descriptors: nothing is ever added to it


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


class Endpoint:
    """One side of a connection, without I/O.

    Args:
        max_payload: the largest inline payload accepted from the peer.
        features: ``FEATURE_*`` bits this side announces and can receive.
        shm_threshold: payloads at least this large go through shared memory (when
            negotiated).
        shm_pool_bytes: the most memory our sending segments may hold.
        compress_threshold: inline payloads at least this large are compressed (when
            negotiated).
        shm_receive_bytes, shm_receive_segments: the most of the peer's shared memory this
            connection maps at once (announced in our hello, so that the peer stays under it).
        shared_budgets: budgets several connections draw from (a server's bounds across its
            connections): ``[(MemoryBudget of bytes, what), (MemoryBudget of segments, what)]``.
        writable_lending: lend shared payloads writable (copy-on-write) when asked, which maps
            each received segment a second time, privately.

    Raises:
        ValueError, TypeError: a setting out of range.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, features: int = 0,
                 shm_threshold: int = DEFAULT_SHM_THRESHOLD_BYTES,
                 shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD_BYTES,
                 shm_receive_bytes: int = DEFAULT_SHM_RECEIVE_BYTES,
                 shm_receive_segments: int = DEFAULT_SHM_RECEIVE_SEGMENTS,
                 shared_budgets: Sequence[tuple[Any, str]] = (),
                 writable_lending: bool = True) -> None:
        core = _impl.core
        max_payload = count(max_payload, "max_payload", minimum=MIN_MAX_PAYLOAD_BYTES,
                            maximum=MAX_FRAME_PAYLOAD_BYTES)
        shm_threshold = count(shm_threshold, "shm_threshold", minimum=0)
        shm_pool_bytes = count(shm_pool_bytes, "shm_pool_bytes", minimum=mmap.PAGESIZE)
        compress_threshold = count(compress_threshold, "compress_threshold", minimum=0)
        shm_receive_bytes = count(shm_receive_bytes, "shm_receive_bytes", minimum=mmap.PAGESIZE,
                                  maximum=_shm.MAX_SEGMENT_BYTES)
        shm_receive_segments = count(shm_receive_segments, "shm_receive_segments",
                                     maximum=0xFFFFFFFF)
        if features & FEATURE_COMPRESSION and zstandard is None:
            raise ValueError("compression needs the zstandard package: "
                             "pip install 'hintens[compression]'")
        # Compression (zstd), once both hellos announce it: inline payloads of at least
        # compress_min bytes are compressed when that makes them smaller.
        self.compress_threshold = compress_threshold
        self.compress_min = _NEVER
        #: Payloads below this go the small way (packed inline, never compressed, within the
        #: peer's limit).
        self.small_max = SCATTER_THRESHOLD_BYTES
        #: A bytes payload shorter than this goes inline, as a plain frame (uncompressed,
        #: within the peer's limit, under the shared-memory threshold once that is
        #: negotiated): what ``writes`` would do with it, for callers that skip the call.
        #: Until the peer's hello, it stays under our threshold: a larger payload may yet
        #: go through shared memory (the client waits for the hello to know).
        self.inline_max = min(DEFAULT_MAX_PAYLOAD_BYTES + 1,
                              shm_threshold if features & FEATURE_SHM else _NEVER)
        if features & FEATURE_COMPRESSION:
            self._zstd_compress = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
            self._zstd_decompress = zstandard.ZstdDecompressor()
            self._zstd_lock = threading.Lock()   # a compressor is not for two threads at once
        self._frame_type = core.Frame
        self._encode_frame = core.encode_frame
        self._encode_header = core.encode_header
        self._copy_shared = not core.SEES_VIEW_RELEASE   # copy out what we cannot track
        self.decoder = core.FrameDecoder(max_payload)
        self.hello = Hello(features=features, max_payload=max_payload,
                           shm_receive_bytes=shm_receive_bytes,
                           shm_receive_segments=shm_receive_segments)
        self.peer_hello: Hello | None = None
        self._allowed_flags = 0   # flags the peer may set: grows as features are negotiated
        self._peer_limit = DEFAULT_MAX_PAYLOAD_BYTES   # the peer's max_payload (its hello)
        # Shared memory. Sending: a pool of our segments. Receiving: the peer's segments by id,
        # the descriptors that came with them (the Channel's list), budgets that bound what
        # the peer makes us map, and a way to send releases.
        self.shm_threshold = shm_threshold
        self.pool = _shm.SegmentPool(shm_pool_bytes) if features & FEATURE_SHM else None
        self.segments: dict[int, _shm.ReceivedSegment] = {}
        #: Descriptors ``receive_data`` was given and no frame has claimed yet.
        self.unclaimed_fds: list[int] = []
        #: Control Events to send (releases, rejections), as writes, oldest first: they may
        #: be made on any thread that drops the last view of a lent payload (the garbage
        #: collector's included). ``take_writes`` hands them over; ``on_writes`` (no
        #: arguments, set by the driver) is told each time one is added. It must do no
        #: I/O and take no lock a sender may hold: the driver queues them on its transport
        #: and has them written later, by its own thread.
        self.outgoing: collections.deque[bytes] = collections.deque()
        self.on_writes: Callable[[], None] | None = None
        self._receive_budgets = [
            (core.MemoryBudget(shm_receive_bytes),
             "shared memory this connection maps (shm_receive_bytes)"),
            (core.MemoryBudget(shm_receive_segments),
             "segments this connection maps (shm_receive_segments)"),
            *shared_budgets]
        self._writable_lending = writable_lending
        # Whose shared payloads are lent writable (copy-on-write): request ids, or everything.
        self.writable_ids: set[int] = set()
        self.writable_all = False
        # Read-only payloads lent from the peer's segments, by id of their region: an echo of
        # one goes back as a PEER_SEGMENT descriptor, without a copy.
        self._lent: dict[int, tuple[int, int, int, int]] = {}
        # Buffers handed out by allocate() and not sent yet, by id of the object their views
        # share (``view.obj``): segment id, segment, whether new, ids retired, length.
        self._allocations: dict[int, tuple[int, _shm.Segment, bool, list[int], int]] = {}

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

    def admit(self, frames: list[Any], fds: list[int] | None = None) -> list[Item]:
        """Apply the connection's rules (hello, negotiated flags) to frames already decoded.

        Args:
            frames: decoded frames, in stream order.
            fds: descriptors received with them and not yet claimed, oldest first (the
                transport's list): each NEW_SEGMENT frame takes the oldest one off it, and
                owns it from then on (mapped, or closed if the frame is refused).
        """
        for frame in frames:   # frames without flags or a hello pass through as they are
            if frame.flags or not frame.request_id:
                items: list[Item] = []
                self._admit(frames, items, _NO_FDS if fds is None else fds)
                return items
        return frames
    def receive_data(self, data: Any, fds: Sequence[int] = ()) -> list[Item]:
        """Bytes (and descriptors) read from the transport, in: the items they complete out,
        in stream order (frames for the application, and violations). A transport that
        decodes in place (the core Channel) calls ``admit`` with its frames instead.

        Args:
            data: the next bytes of the stream (b"": none; what the decoder holds is
                decoded again).
            fds: descriptors received with them, in order. They join those still unclaimed
                (``unclaimed_fds``); each NEW_SEGMENT frame takes the oldest one. Those no
                frame claims by the end of a frame are closed.
        """
        unclaimed = self.unclaimed_fds
        unclaimed += fds
        try:
            items = self.admit(self.decoder.feed(data), unclaimed)
        except ProtocolError as error:
            items = self.after_error(error, unclaimed)
        if unclaimed and not self.decoder.in_frame:
            for fd in unclaimed:
                os.close(fd)
            unclaimed.clear()
        return items

    def after_error(self, error: ProtocolError, fds: list[int] | None = None) -> list[Item]:
        """The items around a violation the decoder raised: the frames before it, the error,
        and, when the stream is still in sync, whatever was already buffered after it.
        ``fds`` as for ``admit``."""
        items: list[Item] = []
        fds = _NO_FDS if fds is None else fds
        while True:
            self._admit(error.frames, items, fds)
            items.append(error)
            if error.fatal:
                return items
            try:
                items += self.admit(self.decoder.feed(b""), fds)
                return items
            except ProtocolError as next_error:
                error = next_error
    def _admit(self, frames: list[Any], items: list[Item], fds: list[int]) -> None:
        for frame in frames:
            flags = frame.flags
            if not flags:
                if frame.type == MessageType.EVENT and frame.request_id == 0:
                    self._control(frame.payload)
                else:
                    items.append(frame)
                continue
            allowed = self._allowed_flags   # a hello earlier in this batch may have widened it
            error: ProtocolError
            if frame.type == MessageType.ERROR or (frame.type == MessageType.EVENT
                                                   and frame.request_id == 0):
                # Errors and control Events carry their payload inline and uncompressed. The
                # request an Error names fails here; a control Event with flags is not one
                # anybody understands. A segment either names is handed back all the same.
                error = UnsupportedFlagsError(
                    f"flags 0x{flags:04x} on an Error or control Event, which travel inline "
                    f"and uncompressed", frame.request_id, msg_type=frame.type)
            elif flags & Flags.SHM and not allowed & Flags.SHM:
                error = ShmError("an SHM frame on a connection that did not negotiate shared "
                                 "memory")
            elif flags & ~allowed:
                error = UnsupportedFlagsError(
                    f"flags 0x{flags:04x} were not negotiated on this connection",
                    frame.request_id, msg_type=frame.type)
            elif flags & Flags.COMPRESSED:
                if flags & Flags.SHM:
                    error = UnsupportedFlagsError(
                        "COMPRESSED applies to inline frames only, not to SHM",
                        frame.request_id, msg_type=frame.type)
                else:
                    items.append(self._inflate(frame))
                    continue
            else:
                items.append(self._lend(frame, fds))
                continue
            if flags & Flags.SHM:
                self._hand_back_named(frame, fds)
            items.append(self._refused(frame, error) if isinstance(error, ShmError) else error)
    def _inflate(self, frame: Any) -> Any:
        """A COMPRESSED frame with its payload decompressed (and the flag cleared), or the
        error that answers it. The declared size is checked before anything is inflated."""
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
        """An Event with request id 0: a hello, a release, a reject, a retire, or something
        to ignore."""
        control = _shm.decode_control(payload)
        if control is None:
            hello = Hello.decode(payload)
            if hello is None:
                return
            if self.peer_hello is not None:
                log.debug("ignoring a second hello from the peer: the first one stands")
                return
            self.peer_hello = hello
            self._peer_limit = hello.max_payload
            self._allowed_flags = self._negotiated_flags()
            if self.negotiated(FEATURE_COMPRESSION):
                self.compress_min = self.compress_threshold
            self.small_max = min(SCATTER_THRESHOLD_BYTES, self.compress_min,
                                 hello.max_payload + 1)
            self.inline_max = min(self.compress_min, hello.max_payload + 1,
                                  self.shm_threshold if self._allowed_flags & Flags.SHM
                                  else _NEVER)
            if self.pool is not None:
                self.pool.limit_to(hello.shm_receive_bytes, hello.shm_receive_segments)
            return
        magic, ids = control
        if magic == _shm.RETIRE_MAGIC:
            for segment_id in ids:
                segment = self.segments.pop(segment_id, None)
                if segment is not None:
                    segment.discard()
        elif self.pool is not None:
            for segment_id in ids:
                if magic == _shm.RELEASE_MAGIC:
                    self.pool.release(segment_id)
                else:
                    self.pool.reject(segment_id)

    # Receiving through shared memory ------------------------------------------------------

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
        return self._frame_type(frame.type, frame.flags & ~Flags.SHM, frame.version,
                                frame.request_id, payload)

    @staticmethod
    def _refused(frame: Any, error: ShmError) -> ShmError:
        error.request_id, error.msg_type = frame.request_id, frame.type
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

    # Sending -----------------------------------------------------------------------------

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
        if self._allowed_flags & Flags.SHM:   # negotiated (so this side has a pool)
            if self._allocations and type(payload) is memoryview:
                allocated = self._allocated_writes(msg_type, payload, request_id)
                if allocated is not None:
                    return allocated       # filled in place by the application: no copy
            if self._lent and type(payload) is memoryview:
                entry = self._lent.get(id(payload.obj))
                if entry is not None and payload.nbytes == entry[3] and payload.c_contiguous:
                    segment_id, segment_size, offset, length = entry   # an echo: point back
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
            raise error
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
            return self.writes(MessageType.RESPONSE, b"" if result is None else result,
                               request_id)
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

    def lends(self, view: memoryview) -> bool:
        """Whether ``view`` is a region of shared memory the peer lent us (still held): a
        reply of it points back at the peer's segment instead of copying it."""
        return id(view.obj) in self._lent

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

    def close_shm(self) -> None:
        """The connection is over: free our segments and unmap the peer's."""
        self._allocations.clear()
        if self.pool is not None:
            self.pool.close()
        for segment in self.segments.values():
            segment.discard()
        self.segments.clear()
        while self.unclaimed_fds:
            os.close(self.unclaimed_fds.pop())
        self.outgoing.clear()   # nobody left to hand anything back to

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
