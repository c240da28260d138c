"""Sans-IO connection layer: the rules a connection applies to decoded frames. No sockets, no
threads, no blocking.

Data in: ``receive_data(bytes, fds)`` decodes (with ``Endpoint.decoder``) and returns items:
frames for the application and protocol errors, in stream order. A transport that decodes in
place (the core Channel) hands its frames to ``admit`` and its decoder errors to
``after_error`` instead. Data out: ``writes``/``reply_writes``/``allocate`` decide how
payloads travel and return writes (buffers and descriptors); the control Events the endpoint
owes the peer (releases, rejections) wait in ``outgoing`` until the driver takes them
(``take_writes``). When shared memory is exhausted, ``writes`` returns None and the driver
decides how to wait. The receiving side of shared memory is ``lending.Lending``, the sending
side ``sending.Sending``, the hello ``hello.Hello``.

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
import threading
from typing import Any, Callable, Sequence, Union

from .. import _impl
from . import ring as _ring
from . import shm as _shm
from .._checks import count
from .._constants import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_FRAME_PAYLOAD_BYTES,
    SCATTER_THRESHOLD_BYTES,
    Flags,
    MessageType,
)
from .._errors import (
    DecompressedTooLargeError,
    ProtocolError,
    ShmError,
    UnsupportedFlagsError,
    encode_error_payload,
)

from .hello import (  # noqa: F401  (the protocol's names, importable from here too)
    DEFAULT_SHM_RECEIVE_BYTES,
    DEFAULT_SHM_RECEIVE_SEGMENTS,
    FEATURE_COMPRESSION,
    FEATURE_RING,
    FEATURE_SHM,
    HELLO_MAGIC,
    MAX_HELLO_BYTES,
    MAX_HELLO_ENTRIES,
    SILENT_PEER,
    Hello,
    HelloKey,
)
from .lending import Lending, Write, take_writes  # noqa: F401
from .sending import Sending, plain_frame  # noqa: F401

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


Item = Union[Any, ProtocolError]   # a core Frame, or a violation

_NO_FDS: list[int] = []   # admit() without descriptors: nothing is ever added to it


class Endpoint(Lending, Sending):
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
        ring_capacity: with FEATURE_RING, as the side that creates the ring (the server): its
            bytes per direction. 0: the side that maps the peer's (the client).

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
                 writable_lending: bool = True, ring_capacity: int = 0) -> None:
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
        #: go through shared memory, or be over the peer's limit (the client waits for the
        #: hello to know).
        self.inline_max = min(DEFAULT_MAX_PAYLOAD_BYTES + 1, shm_threshold)
        if features & FEATURE_COMPRESSION:
            self._zstd_compress = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
            self._zstd_decompress = zstandard.ZstdDecompressor()
            self._zstd_lock = threading.Lock()   # a compressor is not for two threads at once
        self._frame_type = core.Frame
        self._encode_frame = core.encode_frame
        self._encode_header = core.encode_header
        self._copy_shared = not core.SEES_VIEW_RELEASE   # copy out what we cannot track
        self.decoder = core.FrameDecoder(max_payload)
        # The shared-memory ring (protocol/ring.py): what the driver must do next for it.
        self.ring_capacity = _ring.check_capacity(ring_capacity) if ring_capacity else 0
        #: ("offer", capacity): create a ring and send HRNG with its memfd, then write to it;
        #: ("accept", fd, capacity): map the peer's, read from it, send HRNG (with the fd
        #: back), write to it; ("read", fd): check that the client sent our ring's fd back,
        #: and read from the ring. The driver takes it (sets None) and does it before
        #: it reads again.
        self.ring_step: tuple[Any, ...] | None = None
        self._ring_state = 0   # 0: none yet; 1: offered (server); 2: switched (HRNG received)
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
        # For stats (``hintens._stats``): payload bytes through shared memory each way,
        # Responses made by ``reply_writes``, and Error frames made, by code.
        self.shm_bytes_sent = 0
        self.shm_bytes_received = 0
        self.responses_sent = 0
        self.errors_sent: collections.Counter[int] = collections.Counter()

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
            # Kept in items: its traceback would hold the frame that holds items (a cycle
            # only the cyclic collector frees, with every segment the items lend).
            error.__traceback__ = None
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
                    if _ring.is_switch(frame.payload):
                        violation = self._ring_switch(frame.payload, fds, frame is frames[-1])
                        if violation is not None:
                            items.append(violation)
                    else:
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
            if self.ring_capacity and self.negotiated(FEATURE_RING):
                self.ring_step = ("offer", self.ring_capacity)
                self._ring_state = 1
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

    def _ring_switch(self, payload: Any, fds: list[int], last: bool) -> ProtocolError | None:
        """The peer's HRNG: its last frame on the socket (protocol/ring.py). Sets
        ``ring_step``, or returns the (fatal) violation."""
        if not self.negotiated(FEATURE_RING):
            return ProtocolError("an HRNG on a connection that did not negotiate the ring")
        if not last:
            return ProtocolError("the peer sent frames on the socket after its HRNG")
        try:
            capacity = _ring.decode_switch(payload)
        except ValueError as error:
            return ProtocolError(f"the peer's HRNG is not one: {error}")
        if self._ring_state == 2:
            return ProtocolError("a second HRNG from the peer")
        if self.ring_capacity:   # the server: the client answers our offer
            if self._ring_state != 1 or capacity != self.ring_capacity:
                return ProtocolError("the client's HRNG answers no ring offer of ours")
            if not fds:
                return ProtocolError("the client's HRNG came without the ring's descriptor")
            self._ring_state = 2
            self.ring_step = ("read", fds.pop(0))
            return None
        if not fds:
            return ProtocolError("the server's HRNG came without the ring's descriptor")
        self._ring_state = 2
        self.ring_step = ("accept", fds.pop(0), capacity)
        return None

    def ring_frame(self, capacity: int) -> bytes:
        """Our HRNG, naming a ring of ``capacity`` bytes per direction."""
        return self._encode_frame(MessageType.EVENT, _ring.encode_switch(capacity), 0)

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

    def error_frame(self, code: int, message: str, request_id: int, *,
                    counted: bool = True) -> bytes:
        """An Error frame (counted in ``errors_sent``, unless not ``counted``)."""
        if counted:
            self.errors_sent[code] += 1
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
