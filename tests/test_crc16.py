"""CRC-16/IBM-3740 against known answers, a bitwise reference, and every kernel path."""

from __future__ import annotations

import array
import binascii
import mmap
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st


def reference_crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """Bit-at-a-time CRC-16/IBM-3740, written from the catalogue's parameters."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


@pytest.mark.parametrize("data, expected", [
    (b"123456789", 0x29B1),        # the catalogue's check value
    (b"", 0xFFFF),                 # init, untouched
    (b"\x00", 0xE1F0),
    (b"A", 0xB915),
])
def test_known_answers(core, data, expected):
    assert reference_crc16(data) == expected  # the vectors themselves are right
    assert core.crc16(data) == expected


def test_incremental(core):
    data = bytes(range(256)) * 40
    for cut in (0, 1, 15, 16, 17, 255, 4096, len(data)):
        assert core.crc16(data[cut:], core.crc16(data[:cut])) == core.crc16(data)


@pytest.mark.parametrize("length", [*range(0, 300), 511, 512, 513, 1023, 4095, 4096, 4097,
                                    65535, 65536, 65537, 1 << 20, (1 << 20) + 7])
def test_lengths_match_binascii(core, length):
    data = random.Random(length).randbytes(length)
    assert core.crc16(data) == binascii.crc_hqx(data, 0xFFFF)


def test_every_alignment_and_start_value(core):
    rng = random.Random(7)
    block = rng.randbytes(5000)
    view = memoryview(block)
    for offset in range(64):
        for length in (0, 1, 31, 64, 257, 1500, 4000):
            start = rng.randrange(0x10000)
            piece = view[offset:offset + length]
            assert core.crc16(piece, start) == binascii.crc_hqx(piece, start)


@given(st.binary(max_size=5000), st.integers(0, 0xFFFF))
def test_property_matches_reference(core, data, start):
    assert core.crc16(data, start) == reference_crc16(data, start)


def test_64_mib(core):
    data = np.random.default_rng(1).integers(0, 256, 64 << 20, dtype=np.uint8)
    assert core.crc16(data) == binascii.crc_hqx(data, 0xFFFF)


# From 16 MiB the compiled CRC splits the buffer into blocks that several threads take in turn,
# and folds their CRCs together (_crc16_threads.h). Each case runs in its own interpreter, with
# its CPUs and HINTENS_CRC_THREADS set before the first call.
_THREADED_CHECK = """
import binascii, os, random, sys
from hintens.wire import _wire
cpus, cap = int(sys.argv[1]), sys.argv[2]
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
if cap != "-":
    os.environ["HINTENS_CRC_THREADS"] = cap
rng = random.Random(cpus)
data = rng.randbytes((40 << 20) + 4099)
view = memoryview(data)
for n in ((16 << 20) - 1, 16 << 20, (16 << 20) + 1, (33 << 20) + 4095, len(data) - 3):
    for off in (0, 3):
        piece = view[off:off + n]
        start = rng.randrange(0x10000)
        assert _wire.crc16(piece, start) == binascii.crc_hqx(piece, start), (n, off, start)
print(_wire.crc16_threads((16 << 20) - 1), _wire.crc16_threads(len(data)))
"""


@pytest.mark.parametrize("cpus, cap, expected", [
    (1, "-", 1), (2, "-", 2), (2, "1", 1), (2, "0", 1), (2, " 1 ", 1), (2, "3", 2),
    (2, "many", 2), (2, " ", 2)])
def test_a_large_buffer_on_several_threads_has_the_crc_of_one(cython_core, cpus, cap, expected):
    if len(os.sched_getaffinity(0)) < cpus:
        pytest.skip(f"this test process may run on fewer than {cpus} CPUs")
    done = subprocess.run([sys.executable, "-c", _THREADED_CHECK, str(cpus), cap],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", str(expected)]   # one below 16 MiB; then the CPUs or cap


def _cpu_cgroup_root() -> tuple[str, bool] | None:
    """Where a test may make a cgroup with a CPU quota, and whether it is cgroup v2."""
    if os.geteuid() != 0:
        return None
    for root, v2 in (("/sys/fs/cgroup", True), ("/sys/fs/cgroup/unified", True),
                     ("/sys/fs/cgroup/cpu", False), ("/sys/fs/cgroup/cpu,cpuacct", False)):
        if v2:
            try:
                with open(os.path.join(root, "cgroup.subtree_control")) as control:
                    if "cpu" not in control.read().split():
                        continue
            except OSError:
                continue
        elif not os.path.exists(os.path.join(root, "cpu.cfs_quota_us")):
            continue
        return root, v2
    return None


# The child joins the cgroup before hintens reads its quota (once per process), then reports.
_QUOTA_CHECK = """
import os, sys
with open(sys.argv[1], "w") as procs:
    procs.write(str(os.getpid()))
from hintens.wire import _wire
print(_wire.crc16_threads(64 << 20))
"""


@pytest.mark.parametrize("quota, period, expected", [
    (100_000, 100_000, 1), (150_000, 100_000, 1), (200_000, 100_000, 2), (None, 100_000, 2)])
def test_a_cgroup_cpu_quota_caps_the_crc_threads(cython_core, quota, period, expected):
    # In a container allowed fewer CPUs than it sees, helpers would only queue for the quota
    # (and, bursting, get the whole process throttled): the threads follow the quota.
    found = _cpu_cgroup_root()
    if found is None:
        pytest.skip("needs root and a cgroup CPU controller this test can write "
                    "(cgroup v2 with cpu in subtree_control, or v1's cpu hierarchy)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this test process may run on one CPU only")
    root, v2 = found
    group = os.path.join(root, f"hintens-test-{os.getpid()}")
    os.mkdir(group)
    try:
        if v2:
            with open(os.path.join(group, "cpu.max"), "w") as limit:
                limit.write(f"{'max' if quota is None else quota} {period}")
        else:
            with open(os.path.join(group, "cpu.cfs_period_us"), "w") as limit:
                limit.write(str(period))
            with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as limit:
                limit.write(str(-1 if quota is None else quota))
        done = subprocess.run(
            [sys.executable, "-c", _QUOTA_CHECK, os.path.join(group, "cgroup.procs")],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(expected)]
    finally:
        os.rmdir(group)   # empty again: the child has exited


def test_accepts_any_contiguous_buffer_without_copying(core):
    payload = bytes(range(256)) * 4
    expected = binascii.crc_hqx(payload, 0xFFFF)
    with mmap.mmap(-1, len(payload)) as mapped:
        mapped[:] = payload
        buffers = [payload, bytearray(payload), memoryview(payload), mapped,
                   np.frombuffer(payload, dtype=np.uint8),
                   np.frombuffer(payload, dtype=np.float64),
                   array.array("I", payload)]
        for buffer in buffers:
            assert core.crc16(buffer) == expected, type(buffer)
        del buffers, buffer


def test_rejects_bad_arguments(core):
    with pytest.raises(TypeError):
        core.crc16("text")
    with pytest.raises(TypeError):
        core.crc16(12)
    with pytest.raises(BufferError):
        core.crc16(memoryview(b"abcdef")[::2])
    with pytest.raises(OverflowError):
        core.crc16(b"x", 0x10000)
    with pytest.raises(OverflowError):
        core.crc16(b"x", -1)
    with pytest.raises(TypeError):
        core.crc16(b"x", 1.5)


# The kernel is chosen once per process, so each forced path runs in its own interpreter.
_PATH_CHECK = """
import binascii, random, hintens
from hintens import _cython_core as _core
rng = random.Random(3)
for n in [*range(0, 1100), 4096, 65536, 1 << 20, 3 * 1024 * 1024 + 13]:
    data = rng.randbytes(n)
    start = rng.randrange(0x10000)
    for off in (0, 1, 7):
        piece = memoryview(data)[off:]
        assert _core.crc16(piece, start) == binascii.crc_hqx(piece, start), (n, off)
print(_core.crc16_backend())
"""


# The CPU flags each path needs, as /proc/cpuinfo spells them. The kernel lists a flag only if the
# OS also saves the registers it needs, so AVX-512 here means the zmm state is enabled too.
_PATH_NEEDS = {
    "table": (),
    "pclmul": ("pclmulqdq", "sse4_1"),
    "vpclmul": ("pclmulqdq", "sse4_1", "vpclmulqdq", "avx2"),
    "vpclmul512": ("pclmulqdq", "sse4_1", "vpclmulqdq", "avx2", "avx512f", "avx512bw", "avx512vl"),
}


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("forced, expected", [
    ("table", "table"), ("pclmul", "pclmulqdq"), ("vpclmul", "vpclmulqdq-avx2"),
    ("vpclmul512", "vpclmulqdq-avx512")])
def test_every_kernel_path(cython_core, forced, expected):
    missing = [flag for flag in _PATH_NEEDS[forced] if flag not in _cpu_flags()]
    if missing:
        pytest.skip(f"the {forced} path needs {', '.join(missing)}, which this CPU lacks")
    env = dict(os.environ, HINTENS_CRC_IMPL=forced)
    out = subprocess.run([sys.executable, "-c", _PATH_CHECK], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_default_path_is_the_widest_the_cpu_runs(cython_core):
    flags = _cpu_flags()
    widest = "table"
    for forced in ("pclmul", "vpclmul", "vpclmul512"):
        if all(flag in flags for flag in _PATH_NEEDS[forced]):
            widest = forced
    expected = {"table": "table", "pclmul": "pclmulqdq", "vpclmul": "vpclmulqdq-avx2",
                "vpclmul512": "vpclmulqdq-avx512"}[widest]
    env = {key: value for key, value in os.environ.items() if key != "HINTENS_CRC_IMPL"}
    out = subprocess.run([sys.executable, "-c", _PATH_CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
