"""SharedRegion (both cores): views over shared memory, counted, never recycled while alive."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from hintens import ShmError
from hintens.protocol.shm import Segment


@pytest.fixture
def segment():
    with Segment(1 << 16) as seg:
        memoryview(seg.map)[:] = bytes(range(256)) * 256
        yield seg


def test_window_is_checked(core, segment):
    for offset, length in [(-1, 1), (0, -1), (1, 1 << 16), (1 << 16, 1), (2**40, 1)]:
        with pytest.raises(ShmError, match="outside"):
            core.SharedRegion(segment.map, offset, length)
    region = core.SharedRegion(segment.map, 100, 50)
    assert len(region) == 50
    region.release()


def test_views_share_the_memory_and_are_read_only(core, segment):
    region = core.SharedRegion(segment.map, 256, 16)
    with region.view() as view:
        assert bytes(view) == bytes(range(16)) and view.readonly
        memoryview(segment.map)[256] = 200                   # shared, not copied
        assert view[0] == 200
        with pytest.raises(TypeError):
            view[0] = 1
    region.release()


def test_release_waits_for_every_view(core, segment):
    released = []
    region = core.SharedRegion(segment.map, 0, 1024, on_release=released.append)
    view = region.view()
    assert region.exports == 1
    with pytest.raises(BufferError):
        region.release()                         # a view is alive: not recycled
    view.release()
    region.release()
    region.release()                             # idempotent
    assert released == [region] and region.released and region.exports == 0
    with pytest.raises(BufferError):
        region.view()


def test_context_manager_releases(core, segment):
    released = []
    with core.SharedRegion(segment.map, 0, 8, on_release=released.append) as region:
        with region.view() as view:
            assert len(view) == 8
    assert released == [region]


def test_copy_in(core, segment):
    region = core.SharedRegion(segment.map, 1000, 64, readonly=False)
    region.copy_in(b"hello", 10)
    assert memoryview(segment.map)[1010:1015] == b"hello"
    region.copy_in(np.arange(8, dtype=np.uint64), 0)          # any buffer, one copy
    assert np.frombuffer(memoryview(segment.map)[1000:1064], dtype=np.uint64)[7] == 7
    with pytest.raises(ShmError, match="do not fit"):
        region.copy_in(bytes(60), 10)
    with pytest.raises(ShmError):
        region.copy_in(b"x", -1)
    with region.view() as view:
        assert not view.readonly
        view[0] = 42
    assert memoryview(segment.map)[1000] == 42
    region.release()
    with pytest.raises(BufferError):
        region.copy_in(b"x")
    read_only = core.SharedRegion(segment.map, 0, 8)
    with pytest.raises(BufferError):
        read_only.copy_in(b"x")
    read_only.release()


def test_the_mapping_cannot_close_under_a_region(core):
    mapping = mmap.mmap(-1, 4096)
    region = core.SharedRegion(mapping, 0, 4096)
    with pytest.raises(BufferError):
        mapping.close()                          # the region holds the mapping's buffer
    region.release()
    mapping.close()


def test_compiled_region_exports_its_buffer_directly(cython_core, segment):
    region = cython_core.SharedRegion(segment.map, 0, 4096)
    array = np.frombuffer(region, dtype=np.uint8)   # no memoryview in between
    assert array[1] == 1 and region.exports == 1
    with pytest.raises(BufferError):
        region.release()
    with pytest.raises(ValueError):
        array[0] = 9                             # read-only all the way down
    del array
    assert region.exports == 0
    region.release()
    with pytest.raises(BufferError):
        memoryview(region)


def test_compiled_region_counts_slices_that_outlive_their_view(cython_core, segment):
    region = cython_core.SharedRegion(segment.map, 0, 4096)
    view = region.view()
    inner = view[10:20]          # shares the view's buffer, which holds the region's export
    view.release()
    with pytest.raises(BufferError):
        region.release()
    assert bytes(inner) == bytes(range(10, 20))
    inner.release()
    region.release()
