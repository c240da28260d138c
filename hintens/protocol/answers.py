"""What a server answers, whichever front end runs its handlers (the sync server's threads or
the asyncio server's tasks): a handler's result as a reply payload, a handler's failure as
the Error frame the client gets, a pushed Event's writes, and the copy of an answer an
exactly-once session keeps. Sans-IO: frames and writes out, nothing sent.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import _impl
from .._constants import ErrorCode, MessageType
from .._errors import RemoteError
from .endpoint import Endpoint
from .lending import Write
from .replay import TOO_LARGE

log = logging.getLogger("hintens")


def is_bytes_like(value: Any) -> bool:
    """Whether ``value`` exposes a buffer (bytes, bytearray, memoryview, numpy arrays...)."""
    if type(value) is bytes:
        return True
    try:
        memoryview(value).release()
        return True
    except TypeError:
        return False


def checked_result(result: Any) -> Any:
    """A handler's result as a reply payload: None is an empty one.

    Raises:
        RemoteError: HANDLER_ERROR, saying the result is not bytes-like.
    """
    if result is None:
        return b""
    if type(result) is not bytes and not is_bytes_like(result):
        raise RemoteError(ErrorCode.HANDLER_ERROR, f"handler must return a bytes-like object, "
                                                   f"got {type(result).__name__}")
    return result


def failure_frame(endpoint: Endpoint, request_id: int, error: BaseException) -> bytes:
    """The Error frame that answers a Request whose handler raised ``error``: a
    ``RemoteError`` keeps its code and message, anything else is HANDLER_ERROR (and logged
    with its traceback)."""
    if isinstance(error, RemoteError):
        return endpoint.error_frame(error.code, error.message, request_id)
    log.warning("handler failed on request %d", request_id, exc_info=error)
    return endpoint.error_frame(ErrorCode.HANDLER_ERROR, f"{type(error).__name__}: {error}",
                                request_id)


def no_segment_reply(endpoint: Endpoint, request_id: int) -> list[Write]:
    """The answer when a reply waited its full time for a shared-memory segment and every
    one stayed lent out: UNAVAILABLE, saying so."""
    pool = endpoint.pool
    total = pool.total_bytes if pool is not None else 0
    return [([endpoint.error_frame(
        ErrorCode.UNAVAILABLE, f"no shared memory for the reply: all {total} bytes of this "
        f"connection's segments stayed lent out", request_id)], [])]


def is_echo(endpoint: Endpoint, result: Any) -> bool:
    """The handler returned the payload it was lent: the reply points back at the client's
    own segment, so the request's release must follow the reply, never precede it."""
    return type(result) is memoryview and endpoint.lends(result)


def kept_answer(result: Any, max_bytes: int) -> tuple[bool, bytes]:
    """What a session's replay window keeps of a successful answer: a copy of its bytes, or
    ``TOO_LARGE`` when it is over ``max_bytes`` (so an echo of a large lent payload costs
    nothing here)."""
    with memoryview(result) as view:
        return (True, view.tobytes()) if view.nbytes <= max_bytes else TOO_LARGE


def event_writes(endpoint: Endpoint, payload: Any, event_id: int,
                 small: list[Write] | None = None) -> list[Write] | None:
    """The writes that push an Event: ``small`` (a broadcast's frame, built once) or one
    frame for a small bytes payload; otherwise by the limits rule, and inline when every
    shared-memory segment is lent out but the payload fits the client's limit (a pushed
    Event never waits for the client to give segments back).

    Returns:
        The writes, or None when the Event can go neither way right now.

    Raises:
        FrameTooLargeError, ShmError: it can never reach this client.
    """
    if type(payload) is bytes and len(payload) < endpoint.small_max:
        return small or [([_impl.core.encode_frame(MessageType.EVENT, payload, event_id)], [])]
    writes = endpoint.writes(MessageType.EVENT, payload, event_id)
    if writes is None and memoryview(payload).nbytes <= endpoint.peer.max_payload:
        writes = [(endpoint.inline(MessageType.EVENT, payload, event_id), [])]
    return writes
