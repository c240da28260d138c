"""Shared-memory segments: creation, and what a receiver does with a hostile descriptor.

The hostile peers are built here by hand with os.memfd_create, pipes, sockets and files.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import socket

import pytest

from hintens import ShmError
from hintens.protocol.shm import ReceivedSegment, Segment

MIB = 1 << 20


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def mapping_rss_kib(address_hint):
    """Rss of the mapping that contains ``address_hint`` (from /proc/self/smaps)."""
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                current = start <= address_hint < end
            elif current and line.startswith("Rss:"):
                return int(line.split()[1])
    raise LookupError("mapping not found")


def test_segment_is_sealed_prefaulted_and_not_on_a_file_system():
    before = set(os.listdir("/dev/shm"))
    with Segment(8 * MIB) as segment:
        seals = fcntl.fcntl(segment.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        assert seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(segment.fd, MIB)          # nobody can shrink it, not even us
        anchor = ctypes.c_char.from_buffer(segment.map)
        address = ctypes.addressof(anchor)
        del anchor                                    # the export must not outlive the check
        assert mapping_rss_kib(address) >= 8 * 1024   # populated up front, in one call
        assert set(os.listdir("/dev/shm")) == before
    assert segment.fd == -1


def test_round_trip_through_a_received_segment():
    with Segment(MIB) as segment:
        memoryview(segment.map)[100:105] = b"hello"
        received = ReceivedSegment.adopt(os.dup(segment.fd), MIB)
        view = received.view(100, 5)
        assert bytes(view) == b"hello" and view.readonly
        memoryview(segment.map)[100:101] = b"J"                 # shared, not copied
        assert bytes(view) == b"Jello"
        with pytest.raises(TypeError):
            view[0] = 0
        with pytest.raises(BufferError):
            received.close()                        # a view is alive: refuse to unmap
        view.release()
        received.close()


def test_private_view_is_writable_copy_on_write():
    with Segment(3 * mmap.ALLOCATIONGRANULARITY) as segment:
        memoryview(segment.map)[:] = b"s" * len(segment.map)
        received = ReceivedSegment.adopt(os.dup(segment.fd), segment.size, copy_on_write=True)
        offset = mmap.ALLOCATIONGRANULARITY + 10      # not aligned: the view must still fit
        private = received.private_view(offset, 100)
        private[:5] = b"WRITE"
        assert bytes(private[:6]) == b"WRITEs"
        assert bytes(received.view(offset, 6)) == b"ssssss"
        assert memoryview(segment.map)[offset:offset + 5] == b"sssss"
        private.release()
        received.close()


def _memfd(size, seals=0):
    fd = os.memfd_create("hostile", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _pipe_end():
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def _socket_fd():
    left, right = socket.socketpair()
    right.close()
    return left.detach()


def _directory():
    return os.open("/", os.O_RDONLY | os.O_DIRECTORY)


def _disk_file(tmp_path):
    path = tmp_path / "plain-file"
    path.write_bytes(bytes(MIB))
    return os.open(path, os.O_RDWR)


@pytest.mark.parametrize("make, size, match", [
    (lambda tmp: _memfd(MIB), MIB, "not sealed against shrinking"),
    (lambda tmp: _memfd(MIB, fcntl.F_SEAL_GROW), MIB, "not sealed against shrinking"),
    (lambda tmp: _memfd(MIB, fcntl.F_SEAL_SHRINK), 2 * MIB, "smaller than"),
    (lambda tmp: _memfd(MIB, fcntl.F_SEAL_SHRINK), 0, "out of range"),
    (lambda tmp: _memfd(MIB, fcntl.F_SEAL_SHRINK), -5, "out of range"),
    (lambda tmp: _pipe_end(), MIB, "not a memfd or regular file"),
    (lambda tmp: _socket_fd(), MIB, "not a memfd or regular file"),
    (lambda tmp: _directory(), MIB, "not a memfd or regular file"),
    (lambda tmp: os.open("/dev/zero", os.O_RDONLY), MIB, "not a memfd or regular file"),
    (_disk_file, MIB, "not sealed against shrinking"),
])
def test_hostile_descriptors_are_refused_and_closed(tmp_path, make, size, match):
    fd = make(tmp_path)
    baseline = open_fds()
    with pytest.raises(ShmError, match=match) as caught:
        ReceivedSegment.adopt(fd, size)
    assert caught.value.code == 7 and not caught.value.fatal
    assert open_fds() == baseline - 1        # adopt took the descriptor and closed it
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_sealed_segment_cannot_be_shrunk_by_its_sender():
    fd = _memfd(MIB, fcntl.F_SEAL_SHRINK)
    received = ReceivedSegment.adopt(os.dup(fd), MIB)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)                      # the attack a seal exists to stop
    assert bytes(received.view(MIB - 4, 4)) == bytes(4)   # no SIGBUS at the end
    received.close()
    os.close(fd)


@pytest.mark.parametrize("offset, length", [
    (0, MIB + 1), (MIB, 1), (MIB + 1, 0), (-1, 10), (10, -1), (2**63, 2**63), (1, MIB),
])
def test_out_of_range_regions(offset, length):
    received = ReceivedSegment.adopt(_memfd(MIB, fcntl.F_SEAL_SHRINK), MIB, copy_on_write=True)
    with pytest.raises(ShmError, match="outside"):
        received.view(offset, length)
    with pytest.raises(ShmError, match="outside"):
        received.private_view(offset, length)
    assert len(received.view(MIB, 0)) == 0 and len(received.view(0, MIB)) == MIB
    received.close()


def test_segment_size_must_be_positive():
    with pytest.raises(ValueError):
        Segment(0)
