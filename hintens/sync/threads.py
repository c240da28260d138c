"""Threads for served connections, with small stacks where that can be done safely."""

from __future__ import annotations

import threading
from typing import Any, Callable

from .. import _impl

#: A handler thread's stack: Python code needs little of one, and each connection has a
#: thread, so the platform's default (often 8 MiB of address space) adds up.
DEFAULT_THREAD_STACK_BYTES = 1 << 20
MIN_THREAD_STACK_BYTES = 64 * 1024
MAX_THREAD_STACK_BYTES = 1 << 30
# Connection threads get small stacks only where that can be done without touching the
# stack size of threads the application starts: threading.stack_size() is process-wide, so
# it is changed by the compiled core for the one C call that creates our thread (no bytecode
# runs meanwhile, so no other thread can start one with it). That call is threading's own
# start_new_thread, and the steps around it are Thread.start's (CPython 3.9 to 3.12). Where
# these are missing, or with the pure-Python core, threads get the platform's default stack.
_SMALL_STACKS = (_impl.implementation == "cython"
                 and all(hasattr(threading, name) for name in
                         ("_start_new_thread", "_limbo", "_active_limbo_lock"))
                 and hasattr(threading.Thread, "_bootstrap"))


def start_thread(target: Callable[..., Any], argument: Any, name: str,
                 stack_bytes: int | None) -> threading.Thread:
    """Start a daemon thread with a stack of ``stack_bytes`` (None: the platform default).

    Raises:
        RuntimeError: the thread could not be started (RLIMIT_NPROC, a pids cgroup, memory).
    """
    thread = threading.Thread(target=target, args=(argument,), name=name, daemon=True)
    if stack_bytes is None or not _SMALL_STACKS:
        thread.start()
        return thread
    registry: Any = threading
    with registry._active_limbo_lock:
        registry._limbo[thread] = thread
    try:
        _impl.core.call_with_stack_size(stack_bytes, registry._start_new_thread,
                                        thread._bootstrap, ())  # type: ignore[attr-defined]
    except BaseException:
        with registry._active_limbo_lock:
            del registry._limbo[thread]
        raise
    thread._started.wait()  # type: ignore[attr-defined]
    return thread
