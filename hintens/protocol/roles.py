"""What a client does with the items its connection admitted (docs/PROTOCOL.md sections 6
and 7): which frame answers which request, what is about the whole connection, what is an
Event, and what must be answered or dropped. Sans-IO: items in, a sorted ``ClientItems`` out,
for every front end (the sync one, and the asyncio one next) to act on. The server's rules
are ``Endpoint.reply_writes`` (how an answer travels), ``Endpoint.error_reply`` (what a
violation gets back) and ``ReplayMemory.claim`` (exactly-once).
"""

from __future__ import annotations

from typing import Any

from .. import _impl
from .._constants import ERROR, EVENT, RESPONSE, ErrorCode, MessageType
from .._errors import ProtocolError, RemoteError, decode_error_payload, remote_error
from .endpoint import Endpoint, Item

#: Codes of the Errors a server sends just before it hangs up (PROTOCOL.md 6): read back
#: after a failed send, they are about the connection, whatever request id they carry.
FATAL_CODES = (ErrorCode.BAD_HEADER, ErrorCode.TOO_LARGE)
#: What a client answers a frame that only a server takes (a Request, say).
NOT_A_SERVER = "this peer is a client and serves no requests"


class ClientItems:
    """One read's items, sorted by what a client does with them.

    Attributes:
        replies: ``(request_id, payload)`` of each Response, in order.
        failures: ``(request_id, error)`` for each request that failed here: an Error frame
            (a ``RemoteError``), or a corrupt reply (a ``ProtocolError``).
        events: the payloads of the server's Events.
        answers: Error frames to send back (to frames a client does not take).
        server_error: the server's word about the whole connection (an Error frame with
            request id 0): it closes next.
        fatal: a violation after which the connection must close (no Error frame back).
        dropped: violations that name no waiting request: to be logged.
    """

    __slots__ = ("replies", "failures", "events", "answers", "server_error", "fatal",
                 "dropped")

    def __init__(self) -> None:
        self.replies: list[tuple[int, Any]] = []
        self.failures: list[tuple[int, BaseException]] = []
        self.events: list[Any] = []
        self.answers: list[bytes] = []
        self.server_error: RemoteError | None = None
        self.fatal: ProtocolError | None = None
        self.dropped: list[ProtocolError] = []


def error_of(frame: Any) -> RemoteError:
    """The ``RemoteError`` an Error frame carries; a malformed payload is still an answer, a
    generic one (PROTOCOL.md 7)."""
    try:
        code, message = decode_error_payload(frame.payload)
    except ValueError as malformed:
        code, message = 0, f"the server sent a malformed Error payload: {malformed}"
    return remote_error(code, message, frame.request_id)


def sort_for_client(endpoint: Endpoint, items: list[Item], salvaged: bool = False) -> ClientItems:
    """Sort a read's items the client's way.

    Args:
        endpoint: the connection's protocol state (for the Error frames it answers with).
        items: what ``Endpoint.admit`` (or ``receive_data``) returned, in stream order.
        salvaged: the items were read after a send failed: an Error with a fatal code is
            then about the connection, whatever its request id.
    """
    out = ClientItems()
    replies = out.replies
    frame_type = _impl.core.Frame
    for item in items:
        if type(item) is not frame_type and isinstance(item, ProtocolError):
            if item.fatal:
                out.fatal = item
                break   # nothing after a fatal violation is read
            if item.request_id and item.msg_type in (MessageType.RESPONSE, MessageType.ERROR):
                out.failures.append((item.request_id, item))
            else:
                out.dropped.append(item)
            continue
        kind = item.type
        if kind == RESPONSE:   # the common case first, against a plain int
            replies.append((item.request_id, item.payload))
        elif kind == ERROR:
            error = error_of(item)
            if item.request_id == 0 or (salvaged and error.code in FATAL_CODES):
                out.server_error = error
            else:
                out.failures.append((item.request_id, error))
        elif kind == EVENT:
            out.events.append(item.payload)
        else:
            out.answers.append(endpoint.error_frame(ErrorCode.UNAVAILABLE, NOT_A_SERVER,
                                                    item.request_id))
    return out
