"""Calling into an event loop from any thread: the asyncio client and server connections
get calls from other threads (a lent view released by whichever thread drops it, a handler
in an executor closing its connection)."""

from __future__ import annotations

import asyncio
from threading import get_ident
from typing import Any, Callable


def on_loop(loop: asyncio.AbstractEventLoop | None, loop_thread: int,
            callback: Callable[..., Any], *args: Any) -> None:
    """``callback(*args)`` on ``loop``: now, when this is the loop's thread (no wake-up
    through its self-pipe); else soon, from the loop. Nothing when the loop is gone."""
    if loop is None or loop.is_closed():
        return
    if get_ident() == loop_thread:
        callback(*args)
        return
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:   # the loop closed meanwhile
        pass
