"""A Client with a codec: its requests and Events are values, encoded and decoded by it.

``Client(path, codec=...)`` makes one (see ``Client.__new__``); ``CodedClient`` is also
usable by name. The raw methods of ``Client`` stay as they are and typed as bytes; these
stand in front of them.
"""

from __future__ import annotations

from typing import Any, Iterable

from .client import Client
from .._codecs import join, ready

__all__ = ["CodedClient"]


# __module__ is the public name (hintens.X): help(), tracebacks and pickles show it.
class CodedClient(Client[Any]):
    """A ``Client`` whose ``request``, ``request_many`` and ``send_event`` take values and
    return decoded responses, through ``self.codec`` (``on_event`` gets decoded Events too).
    Arguments, errors and everything else: as ``Client``. With the ``"raw"`` codec the values
    are the payloads themselves."""

    __module__ = "hintens"

    def request(self, value: Any, timeout: float | None = None, *,
                writable: bool = False, request_id: int | None = None) -> Any:
        """As ``Client.request``, with ``value`` encoded and the response decoded. It raises
        what ``Client.request`` raises, and whatever the codec raises for a value it cannot
        encode or a response it cannot decode."""
        codec = self.codec
        if codec is None:
            return Client.request(self, value, timeout, writable=writable,
                                  request_id=request_id)
        payload = self._outgoing(codec.encode(value, "request"))
        reply = Client.request(self, payload, timeout, writable=writable,
                               request_id=request_id)
        return codec.decode(reply, "response")

    def request_many(self, values: Iterable[Any],
                     timeout: float | None = None, *,
                     return_exceptions: bool = False) -> list[Any]:
        """As ``Client.request_many``, with each value encoded and each response decoded."""
        codec = self.codec
        if codec is None:
            return Client.request_many(self, values, timeout,
                                       return_exceptions=return_exceptions)
        # Parts are joined here, not allocated in shared memory one payload at a time: an
        # allocation failing halfway would leave the earlier ones lent and never sent.
        payloads = [join(codec.encode(v, "request")) for v in values]
        replies = Client.request_many(self, payloads, timeout,
                                      return_exceptions=return_exceptions)
        decode = codec.decode
        return [r if isinstance(r, BaseException) else decode(r, "response") for r in replies]

    def send_event(self, value: Any) -> None:
        """As ``Client.send_event``, with ``value`` encoded."""
        codec = self.codec
        Client.send_event(self, value if codec is None
                          else self._outgoing(codec.encode(value, "event")))

    def _outgoing(self, payload: Any) -> Any:
        """A codec's payload, ready to send (see ``_codecs.ready``): parts of a large one are
        copied into one shared-memory buffer when the server negotiated it."""
        endpoint = self._endpoint
        return ready(payload, endpoint.shm_threshold,
                     self.allocate if endpoint.pool is not None else None)
