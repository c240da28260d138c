"""Request handlers for server processes started by the tests (``--handler tests.handlers:...``)."""

from __future__ import annotations

import json
import time

import hintens

#: Events received by ``record_event`` in this server process, in arrival order.
EVENTS: list = []
#: How many times ``command`` ran each ``count:`` payload.
RUNS: dict = {}


def command(payload):
    """``echo:...`` echoes, ``sleep:S:tag`` sleeps then returns tag, ``raise:msg`` raises,
    ``app:code:msg`` answers an application error, ``size:N`` returns N bytes, ``events:``
    summarises the Events ``record_event`` kept, ``count:key`` counts its own runs."""
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
    if verb == b"events":
        return json.dumps(event_summary()).encode()
    if verb == b"count":
        RUNS[rest] = RUNS.get(rest, 0) + 1
        return b"%d" % RUNS[rest]
    return data


async def async_command(payload):
    """``command`` as a coroutine: ``sleep:S:tag`` awaits instead of blocking (so requests on
    one connection overlap); the rest as ``command``."""
    data = bytes(payload)
    verb, _, rest = data.partition(b":")
    if verb == b"sleep":
        import asyncio

        seconds, _, tag = rest.partition(b":")
        await asyncio.sleep(float(seconds))
        return tag
    return command(payload)


def record_event(payload, connection):
    """``--on-event`` for tests: keep every Event's payload."""
    EVENTS.append(bytes(payload))


def event_summary():
    """How many Events arrived, and whether they were the decimal numbers 0, 1, 2... in order."""
    numbers = [int(e) if e.isdigit() else None for e in EVENTS]
    return {"count": len(EVENTS), "in_order": numbers == list(range(len(numbers))),
            "sizes": sorted({len(e) for e in EVENTS})}


def refuse_event(payload, connection):
    """``--on-event`` for hostile tests: every Event raises, as a broken callback would."""
    raise ValueError(f"refused an Event of {len(payload)} bytes")
