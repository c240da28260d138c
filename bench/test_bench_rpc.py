"""Request round trips across two processes, pytest-benchmark style.

The servers run in their own processes (see rpc_peers.py); the raw-socket ping-pong is each
group's baseline. bench/rpc_latency.py reports medians with p99 for the same peers.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rpc_peers  # noqa: E402

import harness  # noqa: E402

SIZES = {"64B": 64, "4KiB": 4096, "60KiB": 60 * 1024}


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rpc")
    servers, connected = [], {}
    try:
        for kind in rpc_peers.KINDS:
            path = str(directory / f"{kind}.sock")
            servers.append(rpc_peers.start(kind, path))
            connected[kind] = rpc_peers.client(kind, path)
        yield connected
    finally:
        for client in connected.values():
            client.close()
        for server in servers:
            harness.stop(server)


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("kind", rpc_peers.KINDS)
def test_round_trip(benchmark, clients, kind, size_name):
    payload = os.urandom(SIZES[size_name])
    client = clients[kind]
    assert bytes(client.request(payload)) == payload
    benchmark.group = f"round trip {size_name}"
    benchmark.extra_info.update(baseline=kind == "raw", bytes=2 * len(payload))
    benchmark(client.request, payload)
