"""The asyncio front end (issue 12, in progress): ``hintens.aio.Client``, driven by the event
loop on the same protocol core as the sync API, with the same errors, wire and defaults."""

from .client import Client

__all__ = ["Client"]
