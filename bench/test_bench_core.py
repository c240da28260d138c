"""Core benchmarks: CRC16, header pack/unpack, frame decoding; against the stdlib and peers.

Run with `make bench` (or `pytest bench -k core`). Targets and the numbers measured on the
development machine are in the issue notes; nothing here asserts a time.
"""

from __future__ import annotations

import binascii
import os
import struct

import pytest

from hintens import _python_core as _core_py

import harness

try:
    from hintens import _cython_core
except ImportError:  # pragma: no cover - a build without the extension
    _cython_core = None

CRC_SIZES = {"16B": 16, "4KiB": 4096, "1MiB": 1 << 20, "64MiB": 64 << 20}


def _crc_implementations():
    impls = {"binascii.crc_hqx": lambda data: binascii.crc_hqx(data, 0xFFFF)}
    if _cython_core is not None:
        impls["hintens"] = _cython_core.crc16
    try:
        import fastcrc
        impls["fastcrc.crc16.ibm_3740"] = fastcrc.crc16.ibm_3740
    except ImportError:
        pass
    try:
        import anycrc
        impls["anycrc"] = anycrc.Model("CRC16-IBM-3740").calc
    except ImportError:
        pass
    return impls


CRC_IMPLS = _crc_implementations()


@pytest.mark.parametrize("size_name", list(CRC_SIZES))
@pytest.mark.parametrize("impl_name", list(CRC_IMPLS))
def test_crc16(benchmark, impl_name, size_name):
    size = CRC_SIZES[size_name]
    data = os.urandom(size)
    func = CRC_IMPLS[impl_name]
    assert func(data) == binascii.crc_hqx(data, 0xFFFF)
    benchmark.group = f"crc16 {size_name}"
    benchmark.extra_info.update(bytes=size, baseline=impl_name == "fastcrc.crc16.ibm_3740")
    benchmark(func, data)


STRUCT = struct.Struct(">HHIHIHQ")
HEADER_FIELDS = (2, 100, 0x1234, 42)   # type, length, checksum, request id


def _cores():
    cores = {"hintens-python": _core_py}
    if _cython_core is not None:
        cores["hintens"] = _cython_core
    return cores


@pytest.mark.parametrize("impl_name", ["struct.Struct", *_cores()])
def test_header_pack(benchmark, impl_name):
    buffer = bytearray(64)
    benchmark.group = "header pack_into"
    benchmark.extra_info["baseline"] = impl_name == "struct.Struct"
    if impl_name == "struct.Struct":
        benchmark(STRUCT.pack_into, buffer, 0, 0x4850, 0x0100, 2, 0, 100, 0x1234, 42)
    else:
        benchmark(_cores()[impl_name].pack_header_into, buffer, 0, *HEADER_FIELDS)
    assert STRUCT.unpack_from(buffer) == (0x4850, 0x0100, 2, 0, 100, 0x1234, 42)


@pytest.mark.parametrize("impl_name", ["struct.Struct", *_cores()])
def test_header_unpack(benchmark, impl_name):
    buffer = bytearray(64)
    STRUCT.pack_into(buffer, 0, 0x4850, 0x0100, 2, 0, 100, 0x1234, 42)
    benchmark.group = "header unpack"
    benchmark.extra_info["baseline"] = impl_name == "struct.Struct"
    if impl_name == "struct.Struct":
        benchmark(STRUCT.unpack_from, buffer, 0)
    else:
        header = benchmark(_cores()[impl_name].unpack_header, buffer, 0)
        assert header.request_id == 42


@pytest.mark.parametrize("impl_name", ["struct+crc_hqx", *_cores()])
def test_decode_small_frames(benchmark, impl_name):
    stream, count = harness.small_frames_stream(_core_py)
    benchmark.group = "decode 1 MiB of 100-byte frames"
    benchmark.extra_info.update(items=count, baseline=impl_name == "struct+crc_hqx")
    if impl_name == "struct+crc_hqx":
        frames = benchmark(harness.struct_crc_decode, stream)
    else:
        core = _cores()[impl_name]
        frames = benchmark(lambda: core.FrameDecoder().feed(stream))
    assert len(frames) == count
