"""Pure-Python twin of the compiled shared-memory views (hintens/transport/_memory.pxi):
``Mapping``, a memfd mapped (on ``mmap.mmap``), and ``SharedRegion``, a window of one lent to
the application. Pure Python cannot see a view's release (``SEES_VIEW_RELEASE``).
"""

from __future__ import annotations

import mmap
import weakref
from typing import Any

from .. import _errors
from ..wire._wire_py import MemoryBudget, _contiguous_bytes

__all__ = ["Mapping", "SharedRegion", "SEES_VIEW_RELEASE"]


class Mapping(mmap.mmap):
    """``length`` bytes of a file descriptor mapped into memory, exposing the buffer protocol.

    The compiled core's Mapping keeps no duplicate of the descriptor; this twin is an
    ``mmap.mmap``, which keeps one until it is closed. mmap counts its buffer exports itself
    (``close()`` raises BufferError while one is alive) but does not tell how many, so this
    twin has no ``exports``. Budgets charged for it with ``charge`` are given back when it is
    unmapped.

    Args:
        fd: the descriptor (the caller may close it).
        length: bytes to map, at least 1.
        writable: map with PROT_WRITE.
        private: MAP_PRIVATE (copy-on-write) instead of MAP_SHARED.
        offset: where the mapping starts in the file; a multiple of the page size.

    Raises:
        OSError: mmap failed.
        ValueError: ``length`` is not positive or ``offset`` is negative.
    """

    _charges: list[tuple[MemoryBudget, int]]
    _finalizer: weakref.finalize

    def __new__(cls, fd: int, length: int, writable: bool = False, private: bool = False,
                offset: int = 0) -> Mapping:
        if length <= 0 or offset < 0:
            raise ValueError("a mapping needs a positive length and an offset of 0 or more")
        protection = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        self = super().__new__(cls, fd, length, flags, protection, offset=offset)
        self._charges = []
        # Unmapped when closed, or when the object goes: give the charges back either way.
        self._finalizer = weakref.finalize(self, _give_back, self._charges)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass   # mmap.mmap takes its arguments in __new__

    def charge(self, budget: MemoryBudget, amount: int) -> None:
        """Note that ``amount`` was taken from ``budget`` for this mapping: it is given back
        when the mapping is unmapped (by ``close`` or when the object goes)."""
        if self.closed:
            budget.give(amount)
        else:
            self._charges.append((budget, amount))

    def close(self) -> None:
        """Unmap now. Idempotent.

        Raises:
            BufferError: a view of it is still alive.
        """
        super().close()
        self._finalizer()


def _give_back(charges: list[tuple[MemoryBudget, int]]) -> None:
    while charges:
        budget, amount = charges.pop()
        budget.give(amount)


#: Only the views ``SharedRegion.view()`` handed out are counted (slices made from them are
#: not), so the protocol copies shared payloads out rather than lend views it cannot track.
SEES_VIEW_RELEASE = False


class SharedRegion:
    """A window of a shared mapping lent to the application, with its views counted.

    The compiled core's SharedRegion exports its buffer itself (``memoryview(region)``,
    ``numpy.frombuffer(region)``) and counts every export, slices of its views included. Pure
    Python cannot export a buffer before 3.12, so here the portable ``view()`` is the way in,
    and only the views it handed out are counted, not slices made from them.

    Args:
        mapping: the object whose memory is shared (an mmap); its buffer is held until release.
        offset, length: the window, checked against the mapping.
        readonly: refuse writable views.
        on_release: called once with the region when it is released with no view alive.

    Raises:
        ShmError: the window is outside the mapping.

    numpy: ``numpy.frombuffer(memoryview)`` keeps the memoryview but no buffer export of it,
    so releasing that memoryview while the array lives leaves the array dangling. Release views
    only after the arrays made from them are gone; with the compiled core, hand the region
    itself to numpy, which then holds an export the region counts.
    """

    def __init__(self, mapping: Any, offset: int, length: int, readonly: bool = True,
                 on_release: Any = None, auto_release: bool = False) -> None:
        # auto_release cannot work here (a view's release is invisible to pure Python on
        # 3.11); connections using this core copy shared payloads out instead of lending them.
        source = memoryview(mapping).cast("B")
        if readonly:
            source = source.toreadonly()
        if offset < 0 or length < 0 or offset > len(source) or length > len(source) - offset:
            size = len(source)
            source.release()
            raise _errors.ShmError(f"region [{offset}, {offset}+{length}) is outside the "
                                   f"{size}-byte mapping")
        self._source: memoryview | None = source
        self._offset = offset
        self._length = length
        self._readonly = readonly
        self._on_release = on_release
        self._views: list[memoryview] = []
        self._copying = 0
        self.released = False

    @property
    def exports(self) -> int:
        """Views handed out and not yet released (or copies in progress)."""
        return sum(1 for view in self._views if _alive(view)) + self._copying

    def __len__(self) -> int:
        return self._length

    def view(self) -> memoryview:
        """A memoryview of the region (release it, or use ``with``, when done)."""
        if self.released or self._source is None:
            raise BufferError("this region was released")
        view = self._source[self._offset:self._offset + self._length]
        self._views = [v for v in self._views if _alive(v)] + [view]
        return view

    def copy_in(self, data: Any, offset: int = 0) -> None:
        """Copy ``data`` into the region at ``offset``: the one copy a send makes.

        Raises:
            BufferError: the region is read-only or released.
            ShmError: ``data`` does not fit.
        """
        if self.released or self._readonly or self._source is None:
            raise BufferError("cannot copy into a released or read-only region")
        source = _contiguous_bytes(data)
        if offset < 0 or len(source) > self._length - offset:
            raise _errors.ShmError(f"{len(source)} bytes at offset {offset} do not fit a "
                                   f"{self._length}-byte region")
        start = self._offset + offset
        self._copying += 1
        try:
            self._source[start:start + len(source)] = source
        finally:
            self._copying -= 1

    def release(self) -> None:
        """Give the region back. Idempotent.

        Raises:
            BufferError: a view of it is still alive (its memory may not be recycled yet).
        """
        if self.released:
            return
        alive = self.exports
        if alive:
            raise BufferError(f"{alive} view(s) of this region are still alive")
        self.released = True
        if self._source is not None:
            self._source.release()
            self._source = None
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback(self)

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _alive(view: memoryview) -> bool:
    """False for a released memoryview, which refuses every operation."""
    try:
        len(view)
        return True
    except ValueError:
        return False
