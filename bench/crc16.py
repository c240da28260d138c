"""CRC16 throughput: every hintens kernel path against fastcrc, interleaved in one run.

    python bench/crc16.py [--rounds 15] [--sample-ms 3]

The kernel is chosen once per process, so each path runs in its own worker process
(HINTENS_CRC_IMPL=table|pclmul|vpclmul|vpclmul512, and one with the default choice), and
fastcrc (`crc16.ibm_3740`) in another. Each hintens path runs on one thread
(HINTENS_CRC_THREADS=1); a "threads" worker adds the default choice with its default threads
(from 16 MiB, the CPUs this process may run on). Round by round, the parent asks every worker
in turn for one sample of every size: drift on this kind of machine then hits every
implementation alike. A sample is the mean time per call of as many calls as fill about
--sample-ms, each call on the same buffer (hot in cache up to 1 MiB; 64 MiB streams from
memory), Python call overhead included as a user sees it. Prints medians with their spread
(min-max over the rounds) and fastcrc's median over each path's median (above 1: hintens is
faster). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import binascii
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Callable

SIZES = {"16 B": 16, "64 B": 64, "256 B": 256, "4 KiB": 4096, "64 KiB": 64 << 10,
         "1 MiB": 1 << 20, "64 MiB": 64 << 20}
# Worker name -> (HINTENS_CRC_IMPL, the crc16_backend() that proves the path really ran).
# Every path runs on one thread (HINTENS_CRC_THREADS=1), kernel against kernel, except
# "threads": the default choice with its default threads, which from 16 MiB shares a CRC
# among the CPUs this process may run on (fastcrc uses one).
THREADED = "threads"
HINTENS_PATHS = {
    "auto": (None, None),
    THREADED: (None, None),
    "table": ("table", "table"),
    "pclmul": ("pclmul", "pclmulqdq"),
    "vpclmul": ("vpclmul", "vpclmulqdq-avx2"),
    "vpclmul512": ("vpclmul512", "vpclmulqdq-avx512"),
}
BASELINE = "fastcrc"


def worker(name: str, sample_ns: int) -> None:
    """Serve samples on stdin/stdout: a size in, ns per call out."""
    crc: Callable[[bytes], int]
    if name == BASELINE:
        import fastcrc
        crc = fastcrc.crc16.ibm_3740
        print(f"fastcrc {getattr(fastcrc, '__version__', '')}".strip(), flush=True)
    else:
        from hintens import _cython_core
        crc = _cython_core.crc16
        print(_cython_core.crc16_backend(), flush=True)
    rng = random.Random(16)
    buffers = {size: rng.randbytes(size) for size in SIZES.values()}
    calls = {}
    for size, data in buffers.items():
        if crc(data) != binascii.crc_hqx(data, 0xFFFF):
            raise SystemExit(f"{name}: wrong crc for {size} bytes")
        start = time.perf_counter_ns()
        crc(data)
        crc(data)
        calls[size] = max(1, sample_ns // max(1, (time.perf_counter_ns() - start) // 2))
    print("ready", flush=True)
    for line in sys.stdin:
        size = int(line)
        data, number = buffers[size], calls[size]
        start = time.perf_counter_ns()
        for _ in range(number):
            crc(data)
        print((time.perf_counter_ns() - start) / number, flush=True)


def start_workers(sample_ms: float) -> dict[str, subprocess.Popen[str]]:
    workers: dict[str, subprocess.Popen[str]] = {}
    for name, (forced, expected) in {BASELINE: (None, None), **HINTENS_PATHS}.items():
        env = {key: value for key, value in os.environ.items()
               if key not in ("HINTENS_CRC_IMPL", "HINTENS_CRC_THREADS")}
        if name != THREADED:
            env["HINTENS_CRC_THREADS"] = "1"
        if forced:
            env["HINTENS_CRC_IMPL"] = forced
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", name,
                                 "--sample-ms", str(sample_ms)],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        backend = proc.stdout.readline().strip()
        if expected and backend != expected:
            print(f"# {name}: skipped, this CPU runs {backend!r} when it is forced", file=sys.stderr)
            proc.stdin.close()
            proc.wait()
            continue
        workers[name] = proc
        if name == "auto":
            print(f"# default choice on this CPU: {backend}")
        elif name == BASELINE:
            print(f"# baseline: {backend}")
    for name, proc in workers.items():
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"worker {name} failed to start")
    return workers


def measure(workers: dict[str, subprocess.Popen[str]], rounds: int) -> dict[str, dict[int, list[float]]]:
    samples: dict[str, dict[int, list[float]]] = {name: {size: [] for size in SIZES.values()}
                                                  for name in workers}
    order = list(workers)
    for round_index in range(rounds):
        rotated = order[round_index % len(order):] + order[:round_index % len(order)]
        for size in SIZES.values():
            for name in rotated:
                proc = workers[name]
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"{size}\n")
                proc.stdin.flush()
                samples[name][size].append(float(proc.stdout.readline()))
    return samples


def _fmt_ns(ns: float) -> str:
    return f"{ns / 1000:.1f} us" if ns >= 10_000 else f"{ns:.0f} ns"


def report(samples: dict[str, dict[int, list[float]]], rounds: int) -> None:
    names = [name for name in samples if name != BASELINE]
    print(f"\nmedian time per call over {rounds} interleaved rounds [min-max]; "
          f"x = {BASELINE} median / path median (above 1: hintens faster)")
    header = f"{'size':>7} | {BASELINE:>26} | " + " | ".join(f"{name:>33}" for name in names)
    print(header)
    print("-" * len(header))
    for size_name, size in SIZES.items():
        base = statistics.median(samples[BASELINE][size])
        cells = [f"{_fmt_ns(base):>9} [{_fmt_ns(min(samples[BASELINE][size]))}-"
                 f"{_fmt_ns(max(samples[BASELINE][size]))}]"]
        for name in names:
            got = samples[name][size]
            med = statistics.median(got)
            cells.append(f"{_fmt_ns(med):>9} [{_fmt_ns(min(got))}-{_fmt_ns(max(got))}] "
                         f"x{base / med:4.2f}")
        print(f"{size_name:>7} | {cells[0]:>26} | " + " | ".join(f"{c:>33}" for c in cells[1:]))
    print("\nthroughput of the medians, GB/s (1e9 bytes/s):")
    print(f"{'size':>7} " + " ".join(f"{name:>11}" for name in [BASELINE, *names]))
    for size_name, size in SIZES.items():
        row = [size / statistics.median(samples[name][size]) for name in [BASELINE, *names]]
        print(f"{size_name:>7} " + " ".join(f"{gbps:11.2f}" for gbps in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sample-ms", type=float, default=3.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, int(args.sample_ms * 1e6))
        return
    workers = start_workers(args.sample_ms)
    try:
        samples = measure(workers, args.rounds)
    finally:
        for proc in workers.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
    report(samples, args.rounds)


if __name__ == "__main__":
    main()
