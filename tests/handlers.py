"""Request handlers for server processes started by the tests (``--handler tests.handlers:...``)."""

from __future__ import annotations

import time

import hintens


def command(payload):
    """``echo:...`` echoes, ``sleep:S:tag`` sleeps then returns tag, ``raise:msg`` raises,
    ``app:code:msg`` answers an application error, ``size:N`` returns N bytes."""
    data = bytes(payload)
    verb, _, rest = data.partition(b":")
    if verb == b"echo":
        return rest
    if verb == b"sleep":
        seconds, _, tag = rest.partition(b":")
        time.sleep(float(seconds))
        return tag
    if verb == b"raise":
        raise ValueError(rest.decode())
    if verb == b"app":
        code, _, message = rest.partition(b":")
        raise hintens.RemoteError(int(code), message.decode())
    if verb == b"size":
        return bytes(int(rest))
    if verb == b"none":
        return None
    if verb == b"bad-return":
        return 12345
    return data
