"""Cross-language tests: every client (Python, Go, Rust) against every server, real processes.

Each language's peer program follows tests/ports/README.md. The Go and Rust peers are built
once per session; without ``go`` or ``cargo`` their pairings skip with the reason, except under
``CI=true``, where a missing toolchain fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ("python", "go", "rust")
SCENARIOS = ("sizes", "pipeline", "errors", "badcrc", "events", "quote")
READY_TIMEOUT_S = 30.0
SCENARIO_TIMEOUT_S = 120.0
TOOLS = {"go": "go", "rust": "cargo"}


def _build(language: str) -> list[str]:
    tool = TOOLS[language]
    if shutil.which(tool) is None:
        reason = f"`{tool}` is not installed: the {language} port is not tested"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true requires it")
        pytest.skip(reason)
    if language == "go":
        binary = ROOT / "build" / "ports" / "hintens-peer-go"
        command = ["go", "build", "-o", str(binary), "./cmd/hintens-peer"]
        cwd = ROOT / "go"
    else:
        # The profile make ports-check tests with, so that its build is reused.
        binary = ROOT / "rust" / "target" / "ci" / "hintens-peer"
        command = ["cargo", "build", "--quiet", "--profile", "ci", "--bin", "hintens-peer"]
        cwd = ROOT / "rust"
    built = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, f"{' '.join(command)} failed:\n{built.stderr[-4000:]}"
    return [str(binary)]


@pytest.fixture(scope="session")
def peer_programs():
    """language -> the argv prefix of its peer program, built on first use."""
    built: dict[str, list[str]] = {"python": [sys.executable,
                                              str(ROOT / "tests" / "ports" / "py_peer.py")]}

    def program(language: str) -> list[str]:
        if language not in built:
            built[language] = _build(language)
        return built[language]
    return program


class PeerServer:
    """A peer's ``serve`` in a process of its own, ready once it printed READY."""

    def __init__(self, argv: list[str], path: Path) -> None:
        self.path = path
        self.process = subprocess.Popen([*argv, "serve", str(path)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = self.process.stdout.readline()   # type: ignore[union-attr]
        if not line.startswith("READY") or time.monotonic() > deadline:
            self.process.kill()
            _, err = self.process.communicate()
            raise AssertionError(f"server did not start: {line!r}\n{err[-4000:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then its exit status and stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            return -1, err
        return self.process.returncode, err


def _run_client(argv: list[str], path: Path, scenario: str) -> dict:
    done = subprocess.run([*argv, "client", str(path), scenario], capture_output=True,
                          text=True, timeout=SCENARIO_TIMEOUT_S)
    assert done.returncode == 0, \
        f"client {scenario} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


PAIRS = [(client, server) for client in LANGUAGES for server in LANGUAGES]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(("client", "server"), PAIRS, ids=[f"{c}-to-{s}" for c, s in PAIRS])
def test_scenario(peer_programs, tmp_path, client, server, scenario):
    client_argv, server_argv = peer_programs(client), peer_programs(server)
    peer = PeerServer(server_argv, tmp_path / "peer.sock")
    try:
        result = _run_client(client_argv, peer.path, scenario)
        assert result["ok"] is True
        if scenario == "sizes":   # 64 KiB, 1 MiB and 64 MiB went through shared memory both ways
            assert (result["shm_sent"], result["shm_received"]) == (3, 3), result
        if scenario == "pipeline":
            assert result["count"] == 1000
        assert peer.alive(), "the server died during the scenario"
    finally:
        status, err = peer.stop()
    assert status == 0, f"the server exited with {status} on SIGTERM:\n{err[-4000:]}"


@pytest.mark.parametrize(("client", "server"), PAIRS, ids=[f"{c}-to-{s}" for c, s in PAIRS])
def test_server_killed_mid_stream(peer_programs, tmp_path, client, server):
    """SIGKILL of the server while the client sends: the client fails promptly with a
    connection error and keeps no memfd mapping."""
    client_argv, server_argv = peer_programs(client), peer_programs(server)
    peer = PeerServer(server_argv, tmp_path / "peer.sock")
    runner = subprocess.Popen([*client_argv, "client", str(peer.path), "kill"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = runner.stdout.readline()   # type: ignore[union-attr]
        assert line.strip() == "RUNNING", f"client said {line!r}"
        time.sleep(0.2)   # mid-stream: requests of both sizes keep flowing
        peer.process.kill()
        peer.process.wait(timeout=10)
        out, err = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
        if peer.process.poll() is None:
            peer.process.kill()
            peer.process.communicate()
    assert runner.returncode == 0, f"client kill scenario failed:\n{err[-4000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is True and result["maps_left"] == 0, result
    assert result["after_ms"] < 2000, result
