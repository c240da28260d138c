"""Every client (Python, Go, Rust) against every server, and each language's raw floor.

Usage: ``python bench/ports.py [--rounds N] [--count N] [--big-count N] [--pin none|same|split]``
(or ``make bench-ports``).

All in one run, each peer a process of its own (the peer programs of tests/ports/README.md):

1. 64 B round trips: every client against every server, and the Go, Rust and Python clients
   against their own language's raw floor (a plain Unix stream socket echoing a length-prefixed
   payload, no hintens); the Go and Rust clients also against the other one's floor server, to
   show what a raw server in that language costs them (a cross pairing, Rust client to Go
   server say, is also given against that pairing's own floor: the same client against the
   raw server of the same language). Medians and p99 over ``--rounds``
   rounds, the pairings interleaved round by round.
2. 64 MiB echo through shared memory: every client against every server, against the floors'
   ``sendall``/``recv_into`` into a reused buffer, and one 64 MiB ``memcpy`` in each language.

Targets (issue 15): the Go and Rust clients against a Go or Rust server <= 1.2x their raw
floor; any client against the Python server within 1.3x the Python client's own round trip;
a 64 MiB echo through shared memory <= 2x one memcpy of the client's language.

Placement on a 2-core VM moves a round trip between a few microseconds (client and server on
one core) and tens (on two): ``--pin same`` runs everything on CPU 0, ``--pin split`` clients
on CPU 0 and servers on CPU 1. Ratios are only meaningful within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ("python", "go", "rust")
COMPILED = ("go", "rust")


def build() -> dict[str, list[str]]:
    """language -> its peer program's argv prefix (Go and Rust built here, when installed)."""
    programs = {"python": [sys.executable, str(ROOT / "tests" / "ports" / "py_peer.py")]}
    if shutil.which("go"):
        binary = ROOT / "build" / "ports" / "hintens-peer-go"
        subprocess.run(["go", "build", "-o", str(binary), "./cmd/hintens-peer"],
                       cwd=ROOT / "go", check=True)
        programs["go"] = [str(binary)]
    else:
        print("go is not installed: no Go rows")
    if shutil.which("cargo"):
        subprocess.run(["cargo", "build", "--quiet", "--release", "--bin", "hintens-peer"],
                       cwd=ROOT / "rust", check=True)
        programs["rust"] = [str(ROOT / "rust" / "target" / "release" / "hintens-peer")]
    else:
        print("cargo is not installed: no Rust rows")
    return programs


class Placement:
    def __init__(self, pin: str) -> None:
        self.pin = pin

    def wrap(self, argv: list[str], server: bool) -> list[str]:
        if self.pin == "none":
            return argv
        cpu = "1" if server and self.pin == "split" else "0"
        return ["taskset", "-c", cpu, *argv]


class Server:
    def __init__(self, argv: list[str], command: str, path: str, placement: Placement) -> None:
        self.process = subprocess.Popen(placement.wrap([*argv, command, path], True),
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()   # type: ignore[union-attr]
        if not line.startswith("READY"):
            self.process.kill()
            raise RuntimeError(f"{argv[-1]} {command} did not start: {line!r}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_json(argv: list[str]) -> dict:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, pairings interleaved")
    parser.add_argument("--count", type=int, default=5000, help="64 B round trips a round")
    parser.add_argument("--big-count", type=int, default=5, help="64 MiB echoes a round")
    parser.add_argument("--pin", choices=("none", "same", "split"), default="none")
    args = parser.parse_args()
    placement = Placement(args.pin)
    programs = build()
    languages = [lang for lang in LANGUAGES if lang in programs]
    print(f"placement: --pin {args.pin}; {args.rounds} rounds; peers: {', '.join(languages)}")
    rt: dict[tuple[str, str], list[dict]] = {}
    big: dict[tuple[str, str], list[dict]] = {}
    memcpy: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="hintens-ports-") as scratch:
        for round_number in range(args.rounds):
            for server in languages:
                for command, target in (("serve", server), ("floor-serve", f"{server}-floor")):
                    path = os.path.join(scratch, f"{target}-{round_number}.sock")
                    process = Server(programs[server], command, path, placement)
                    bench = "bench" if command == "serve" else "floor-bench"
                    clients = languages if command == "serve" else [server]
                    if command == "floor-serve" and server in COMPILED:
                        # The other compiled client against this floor too (64 B only): what
                        # a raw server in this language costs that client, with no hintens.
                        clients = [server, *(c for c in COMPILED if c != server and c in languages)]
                    try:
                        for client in clients:
                            wrap = placement.wrap
                            rt.setdefault((client, target), []).append(run_json(wrap(
                                [*programs[client], bench, path, "rt64", "--count",
                                 str(args.count)], False)))
                            if command == "floor-serve" and client != server:
                                continue
                            big.setdefault((client, target), []).append(run_json(wrap(
                                [*programs[client], bench, path, "echo64m", "--count",
                                 str(args.big_count)], False)))
                    finally:
                        process.stop()
            for lang in languages:
                memcpy.setdefault(lang, []).append(
                    run_json(placement.wrap([*programs[lang], "memcpy"], False))["memcpy64m_ms"])

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print("\n1. 64 B round trips (us): median of the rounds' medians, p99 the rounds' median")
    for (client, target), rows in rt.items():
        print(f"  {client:>6} client -> {target:<12} median {median(rows, 'median_us'):8.1f}"
              f"   p99 {median(rows, 'p99_us'):8.1f}")
    print("\n  ratios:")
    for lang in ("go", "rust"):
        if lang not in languages:
            continue
        floor = median(rt[(lang, f"{lang}-floor")], "median_us")
        for server in ("go", "rust"):
            if (lang, server) in rt:
                value = median(rt[(lang, server)], "median_us")
                print(f"  {lang} client -> {server} server / {lang} floor:"
                      f" {value / floor:5.2f}x   (target <= 1.2x)")
        for server in COMPILED:
            if server != lang and (lang, f"{server}-floor") in rt:
                pairing = median(rt[(lang, f"{server}-floor")], "median_us")
                print(f"  ({lang} client -> {server} raw floor server / {lang} floor:"
                      f" {pairing / floor:5.2f}x: the {server} server's language alone, no hintens)")
                if (lang, server) in rt:
                    value = median(rt[(lang, server)], "median_us")
                    print(f"  {lang} client -> {server} server / {lang} client -> {server} raw"
                          f" floor server: {value / pairing:5.2f}x   (the pairing's own floor)")
    own = median(rt[("python", "python")], "median_us")
    for client in languages:
        value = median(rt[(client, "python")], "median_us")
        print(f"  {client} client -> python server / python client -> python server:"
              f" {value / own:5.2f}x   (target <= 1.3x)")

    print("\n2. 64 MiB echo (ms): median of the rounds' medians")
    for (client, target), rows in big.items():
        print(f"  {client:>6} client -> {target:<12} median {median(rows, 'median_ms'):8.1f}")
    for lang in languages:
        print(f"  {lang:>6} memcpy of 64 MiB      median {statistics.median(memcpy[lang]):8.2f}")
    print("\n  ratios: an echo through shared memory / one memcpy in the client's language"
          " (target <= 2x)")
    for (client, target), rows in big.items():
        if target.endswith("-floor"):
            continue
        value = median(rows, "median_ms") / statistics.median(memcpy[client])
        print(f"  {client} client -> {target} server: {value:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
