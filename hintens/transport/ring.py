"""The shared-memory ring's memfd (docs/PROTOCOL.md section 9b): created and sealed by the side
that offers the ring, checked by the side that maps it, before anything is mapped. The ring
itself (its mapping, its waits, the carriers) is the compiled core's ``Ring`` and ``Channel``;
the pure-Python core has none, and then hintens does not offer a ring.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct
from typing import Any

from .. import _impl
from .._errors import ShmError
from ..protocol.ring import RING_LAYOUT_VERSION, RING_MAGIC, check_capacity, ring_bytes

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_HEADER = struct.Struct("<4sIQ")


def available() -> bool:
    """This process can use a ring: the compiled core is in use."""
    return getattr(_impl.core, "Ring", None) is not None


def _ring_class() -> Any:
    ring_class = getattr(_impl.core, "Ring", None)
    if ring_class is None:
        raise ShmError("the pure-Python core has no shared-memory ring")
    return ring_class


def create(capacity: int, sock: socket.socket) -> tuple[Any, int]:
    """A new ring of ``capacity`` bytes per direction, for the connection on ``sock``.

    Returns:
        ``(ring, fd)``: the mapped ``Ring``, and its memfd, sealed, for the caller to pass to
        the peer and then close.

    Raises:
        ShmError: the memfd could not be created, sized, sealed or mapped.
    """
    check_capacity(capacity)
    try:
        fd = os.memfd_create("hintens-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as error:
        raise ShmError(f"memfd_create failed for a ring: {error.strerror}") from error
    try:
        os.ftruncate(fd, ring_bytes(capacity))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        ring = _ring_class()(fd, capacity, sock, True)
    except BaseException as error:
        os.close(fd)
        if isinstance(error, OSError):
            raise ShmError(f"a ring of {capacity} bytes could not be set up: {error}") \
                from error
        raise
    return ring, fd


def identity(fd: int) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of the file ``fd`` names: the same for every descriptor of it."""
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def attach(fd: int, capacity: int, sock: socket.socket) -> Any:
    """Map the peer's ring from ``fd`` (which stays the caller's to close).

    Raises:
        ShmError: ``fd`` is not a memfd sealed against shrinking and large enough, or its
            header does not name this layout and capacity.
    """
    check_capacity(capacity)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ShmError("the ring's descriptor is not a regular file (a memfd)")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as error:
            raise ShmError(f"the ring's descriptor carries no seals: {error.strerror}") \
                from error
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ShmError("the ring is not sealed against shrinking (F_SEAL_SHRINK)")
        if info.st_size < ring_bytes(capacity):
            raise ShmError(f"the ring's memfd holds {info.st_size} bytes, less than the "
                           f"{ring_bytes(capacity)} a ring of {capacity} needs")
        ring = _ring_class()(fd, capacity, sock, False)
    except OSError as error:
        raise ShmError(f"the ring could not be mapped: {error}") from error
    magic, version, declared = _HEADER.unpack(ring.header())
    if magic != RING_MAGIC or version != RING_LAYOUT_VERSION or declared != capacity:
        raise ShmError(f"the ring's header names {magic!r}, layout {version} and capacity "
                       f"{declared}, not HRNG, {RING_LAYOUT_VERSION} and {capacity}")
    return ring
