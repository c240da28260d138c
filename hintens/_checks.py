"""Argument checks shared by the public API: each bad value fails at once, before anything is
sent, bound or allocated, with a ValueError or TypeError that names the parameter.

Timeouts follow one rule everywhere (README, "Timeouts"):

* a timeout is a positive number of seconds;
* ``None`` in a constructor, or ``math.inf`` anywhere, means "no timeout": wait for ever. A
  per-call ``timeout=None`` means "the object's default" (which may itself be no timeout);
* zero, negative numbers, NaN, booleans and non-numbers are refused;
* values too large for the OS to wait on (over ``threading.TIMEOUT_MAX``, about 292 years) are
  read as no timeout.

Inside the package a timeout is a float or None, and a deadline is a float that may be
``math.inf``; ``wait_s`` and ``lock_wait_s`` turn what is left of one into what
``Condition.wait`` and ``Lock.acquire`` accept (neither takes ``inf``).
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from time import monotonic
from typing import Any, Callable

#: A wait longer than this cannot be passed to Lock.acquire; it is as good as for ever.
_FOREVER_S = threading.TIMEOUT_MAX


def timeout_s(value: Any, name: str, *, none_is_forever: bool = True) -> float | None:
    """A checked timeout: positive seconds, or None for "no timeout".

    Args:
        value: what the caller passed.
        name: the parameter's name, for the message.
        none_is_forever: accept None (a constructor's "no timeout"); else None is refused.

    Raises:
        TypeError: not a number (booleans included).
        ValueError: zero, negative or NaN.
    """
    if value is None:
        if none_is_forever:
            return None
        raise TypeError(f"{name} must be a number of seconds, not None")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds (or None for no timeout), "
                        f"not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be positive (or None for no timeout), not {value!r}")
    return None if seconds >= _FOREVER_S else seconds


def call_timeout_s(value: Any, default: float | None, name: str = "timeout") -> float | None:
    """A per-call timeout: None takes ``default``; ``math.inf`` is no timeout.

    Raises:
        TypeError, ValueError: as ``timeout_s``.
    """
    if value is None:
        return default
    return timeout_s(value, name)


def deadline_after(seconds: float | None) -> float:
    """The monotonic time ``seconds`` from now; ``math.inf`` for no timeout."""
    return math.inf if seconds is None else monotonic() + seconds


def wait_s(remaining: float) -> float | None:
    """``remaining`` seconds as ``Condition.wait``, ``Event.wait`` and ``Thread.join`` take
    them: None for ever (they refuse ``inf``), never negative."""
    return None if remaining >= _FOREVER_S else max(0.0, remaining)


def lock_wait_s(remaining: float) -> float:
    """``remaining`` seconds as ``Lock.acquire(True, ...)`` takes them: -1 for ever."""
    return -1 if remaining >= _FOREVER_S else max(0.0, remaining)


def non_negative_s(value: Any, name: str) -> float:
    """A finite interval of zero or more seconds (``flush_interval``).

    Raises:
        TypeError: not a number.
        ValueError: negative, NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name} must be zero or more seconds, not {value!r}")
    return seconds


def count(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """A checked integer within ``[minimum, maximum]``.

    Raises:
        TypeError: not an int (booleans included).
        ValueError: out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, not {number}")
    return number


def optional_callable(value: Any, name: str) -> Callable[..., Any] | None:
    """None, or a callable.

    Raises:
        TypeError: neither.
    """
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable (or None), not {type(value).__name__}")
    return value


def uids(values: Any, name: str) -> set[int]:
    """A set of uids or gids.

    Raises:
        TypeError: not an iterable of ints.
        ValueError: a negative id.
    """
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be an iterable of ints, not {type(values).__name__}")
    return {count(value, name, minimum=0, maximum=0xFFFFFFFF) for value in values}


def path_like(value: Any, name: str = "path") -> str | None:
    """None, or a str/PathLike path as str.

    Raises:
        TypeError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, str):
            return path
    raise TypeError(f"{name} must be a str or os.PathLike, not {type(value).__name__}")
