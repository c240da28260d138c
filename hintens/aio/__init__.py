"""The asyncio front end: ``hintens.aio.Client``, ``Server`` and ``ClientPool``, driven by the
event loop on the same protocol core as the sync API, with the same errors, wire and
defaults."""

from .client import Client
from .._retry import NO_RETRY, RetryPolicy
from .pool import ClientPool
from .server import Server, ServerConnection

__all__ = ["Client", "ClientPool", "NO_RETRY", "RetryPolicy", "Server", "ServerConnection"]
