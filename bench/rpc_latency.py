"""Round-trip latency across two processes: hintens against the raw floor, multiprocessing and
pyzmq, measured in one run with the peers interleaved so drift hits all of them alike.

    python bench/rpc_latency.py [--rounds 10] [--batch 500]

Prints, per payload size, the median and p99 of each peer and hintens's ratios of medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rpc_peers  # noqa: E402

import harness  # noqa: E402

SIZES = {"64 B": 64, "4 KiB": 4096, "60 KiB": 60 * 1024}


def measure(rounds: int, batch: int) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {size: {k: [] for k in rpc_peers.KINDS}
                                                   for size in SIZES}
    with tempfile.TemporaryDirectory(prefix="hintens-bench-") as directory:
        servers, clients = [], {}
        try:
            for kind in rpc_peers.KINDS:
                path = os.path.join(directory, f"{kind}.sock")
                servers.append(rpc_peers.start(kind, path))
                clients[kind] = rpc_peers.client(kind, path)
            for size_name, size in SIZES.items():
                payload = os.urandom(size)
                for kind, peer in clients.items():
                    assert bytes(peer.request(payload)) == payload, kind
                for _ in range(rounds):
                    for kind, peer in clients.items():
                        samples[size_name][kind] += harness.sample(
                            lambda: peer.request(payload), batch, warmup=50)
        finally:
            for peer in clients.values():
                peer.close()
            for server in servers:
                harness.stop(server)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    results = measure(args.rounds, args.batch)
    print(f"round trips, {args.rounds} x {args.batch} per peer and size (medians and p99 in us)")
    for size_name, by_kind in results.items():
        medians = {kind: statistics.median(s) for kind, s in by_kind.items()}
        print(f"\n{size_name}")
        for kind, s in by_kind.items():
            print(f"  {kind:<16} median {medians[kind] * 1e6:8.1f}  "
                  f"p99 {harness.percentile(s, 0.99) * 1e6:8.1f}")
        ours = medians["hintens"]
        print("  hintens / raw floor       {:.2f}x   (target <= 1.3 at 64 B)".format(
            ours / medians["raw"]))
        print("  hintens / multiprocessing {:.2f}x   (target <= 0.8 at 64 B)".format(
            ours / medians["multiprocessing"]))
        print("  hintens / pyzmq           {:.2f}x   (target <= 0.5 at 64 B)".format(
            ours / medians["pyzmq"]))


if __name__ == "__main__":
    main()
