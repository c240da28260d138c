"""The examples and the README's code, run as a user would run them.

* Every ``examples/*.py`` runs as its own process, from a directory outside the repository,
  exits 0 without a traceback, and prints its key output. One that names a package it
  ``# needs:`` which is not installed is skipped.
* Every ```python block of README.md is marked by the HTML comment on the line before it:
  ``<!-- example: examples/NAME.py -->`` (the block is an excerpt of that file: its lines, in
  order, leading indentation and blank lines aside; a ``...`` line skips lines of the file),
  or ``<!-- runnable: NAME -->`` (the block is a whole program: it runs, with its
  ``/tmp/*.sock`` paths moved into a temporary directory). An unmarked block fails.
* A ```sh block marked ``<!-- shell: NAME -->`` runs: its ``hintens serve`` line in the
  background, then each ``hintens send`` line through ``bash -c``, against the echo server;
  each prints its payload.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hintens import _impl

from .peers import REPO, _spawn, stop_server

EXAMPLES = sorted((Path(REPO) / "examples").glob("*.py"))
README = Path(REPO) / "README.md"

# What each example must print: a broken example cannot pass by exiting 0 early.
KEY_OUTPUT = {
    "aiohttp_service.py": ["200 value of user-42"],
    "allocate.py": ["matches: True"],
    "asyncio_client_server.py": ["b'HELLO'", "100 concurrent requests, last: b'99'", "b'ONCE'",
                                 "event: b'to every client'"],
    "batching.py": ["request_many: [b'x', b'y', b'z']", "server received 100,002 events"],
    "bincode_struct.py": ["37 bytes: 0100000000000000",
                          "Quote(id=1, price=9.5, venue='X', sizes=[100])",
                          "Quote(id=2, price=2.5, venue='Y', sizes=[1, 2, 3])"],
    "compression.py": ["compress=False: 988,651 bytes each way, 1,977,526 bytes on the wire",
                       "compress=True: 988,651 bytes each way"],
    "events_broadcast.py": ["server got event: b'alice logged in'",
                            "broadcast queued for 2 clients",
                            ("alice received [b'price update 0', b'price update 1', "
                             "b'just for connection"),
                            ("bob received [b'price update 0', b'price update 1', "
                             "b'just for connection")],
    # True with the compiled core; the pure-Python one does not speak the ring.
    "ring.py": ["ring negotiated: True" if _impl.core.Ring is not None else
                "ring negotiated: False", "64 B round trip: "],
    "msgpack_codec.py": ["{'order': 7, 'total': 3.75, 'status': 'accepted'}"],
    "pool_retries.py": ["retrying a request", "b'charged'", "b'balance: 58'",
                        "the card was charged 1 time(s)"],
    "stats_metrics.py": ["client sent 101 requests; errors by code: {1001: 1}",
                         "server ran the handler 101 times",
                         'kind="server"} 101.0'],
    "request_response.py": ["reply: b'HELLO'",
                            "handler error: ZeroDivisionError: integer division or modulo",
                            "remote error: 1001 insufficient funds", "still works: b'AGAIN'"],
    "separate_processes.py": ["b'hello from pid", "the subprocess: True",
                              "server exit code: 0"],
    "shm_numpy.py": ["sum 31999996000000"],
    "tcp_tls.py": ["b'charge'", "'O=Example,OU=Payments,CN=billing')]",
                   "refused: ConnectError", "TLSV1_ALERT_UNKNOWN_CA"],
}

# What each runnable README block must print.
RUNNABLE_OUTPUT = {
    "tour": ["b'HELLO'", "event: b'to every client'"],
    "tcp": ["b'over tcp'", "tcp://127.0.0.1:"],
    "core": ["0x29b1", "ping"],
}

_NEEDS = re.compile(r"^# needs: (.+)$", re.MULTILINE)


def needs(text: str) -> list[str]:
    """The packages a ``# needs: a b`` line names."""
    found = _NEEDS.search(text)
    return found.group(1).split() if found else []


def run_python(script: Path, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``script`` as a user would, from ``cwd``, with this checkout's hintens."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def assert_ran(done: subprocess.CompletedProcess, expected: list[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for text in expected:
        assert text in done.stdout, f"{text!r} not in:\n{done.stdout}"


# The examples --------------------------------------------------------------------------------

def test_every_example_has_its_key_output_listed():
    assert sorted(KEY_OUTPUT) == [path.name for path in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs(path, tmp_path):
    missing = [name for name in needs(path.read_text())
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    assert_ran(run_python(path, tmp_path), KEY_OUTPUT[path.name])


def test_examples_without_needs_import_only_the_stdlib_and_hintens():
    """They run in a bare venv with only hintens installed (the wheel test)."""
    if sys.version_info < (3, 10):
        pytest.skip("sys.stdlib_module_names is new in Python 3.10")
    allowed = set(sys.stdlib_module_names) | {"hintens"}
    for path in EXAMPLES:
        text = path.read_text()
        imported = {name.split(".")[0] for name in re.findall(
            r"^\s*(?:import|from) ([\w.]+)", text, re.MULTILINE)}
        assert imported - allowed <= set(needs(text)), path.name


def test_needs_names_the_packages():
    assert needs("'''doc'''\n# needs: numpy zstandard\nimport numpy\n") == ["numpy", "zstandard"]
    assert needs("import os\n") == []


# README.md -----------------------------------------------------------------------------------

_BLOCK = re.compile(r"(?:^(?P<marker><!--.*?-->)\n)?^```(?P<lang>\w+)\n(?P<code>.*?)^```$",
                    re.MULTILINE | re.DOTALL)


def readme_blocks(text: str, lang: str) -> list[tuple[str, str]]:
    """(marker, code) of each ```lang block; the marker is the HTML comment on the line just
    before the block, or ''."""
    return [(found.group("marker") or "", found.group("code"))
            for found in _BLOCK.finditer(text) if found.group("lang") == lang]


def code_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def is_excerpt(block: str, source: str) -> bool:
    """Whether ``block``'s lines appear in ``source`` in order, each run of them between
    ``...`` lines contiguous there (leading indentation and blank lines aside)."""
    lines = code_lines(source)
    start = 0
    chunk: list[str] = []
    for line in code_lines(block) + ["..."]:
        if line != "...":
            chunk.append(line)
            continue
        if chunk:
            for at in range(start, len(lines) - len(chunk) + 1):
                if lines[at:at + len(chunk)] == chunk:
                    start = at + len(chunk)
                    break
            else:
                return False
        chunk = []
    return True


def test_is_excerpt():
    source = "a = 1\n\nif a:\n    b = 2\n    c = 3\nd = 4\n"
    assert is_excerpt("if a:\n  b = 2\n\n", source)
    assert is_excerpt("a = 1\n...\nd = 4\n", source)
    assert not is_excerpt("a = 1\nb = 2\n", source)          # not contiguous
    assert not is_excerpt("d = 4\n...\na = 1\n", source)     # out of order
    assert not is_excerpt("b = 3\n", source)


def block_id(marker: str) -> str:
    return marker[len("<!--"):-len("-->")].strip() or "unmarked"


def marked(blocks: list[tuple[str, str]], kind: str) -> list:
    """The blocks whose marker is ``<!-- kind: ... -->``, as test parameters named by it."""
    return [pytest.param(marker, code, id=block_id(marker).split()[-1])
            for marker, code in blocks if marker.startswith(f"<!-- {kind}:")]


PYTHON_BLOCKS = readme_blocks(README.read_text(), "python")
SHELL_BLOCKS = marked(readme_blocks(README.read_text(), "sh"), "shell")


def test_every_readme_python_block_is_checked():
    unmarked = [code.splitlines()[0] for marker, code in PYTHON_BLOCKS
                if not re.fullmatch(r"<!-- (example: examples/[\w.]+\.py|runnable: \w+) -->",
                                    marker)]
    assert not unmarked, f"README python blocks with no example/runnable marker: {unmarked}"
    runnable = {block_id(marker).split()[-1] for marker, _ in PYTHON_BLOCKS
                if marker.startswith("<!-- runnable:")}
    assert runnable == set(RUNNABLE_OUTPUT)


@pytest.mark.parametrize("marker, code", marked(PYTHON_BLOCKS, "example"))
def test_readme_block_is_an_excerpt_of_its_example(marker, code):
    path = Path(REPO) / block_id(marker).split()[-1]
    assert path.is_file(), f"{path} does not exist"
    assert is_excerpt(code, path.read_text()), f"this README block is not in {path}:\n{code}"


def in_tmp(code: str, tmp_path: Path) -> str:
    """``code`` with each /tmp/NAME.sock moved into ``tmp_path``, so runs never collide."""
    return re.sub(r"/tmp/([\w.-]+\.sock)", lambda m: str(tmp_path / m.group(1)), code)


@pytest.mark.parametrize("marker, code", marked(PYTHON_BLOCKS, "runnable"))
def test_readme_runnable_block_runs(marker, code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(in_tmp(code, tmp_path))
    assert_ran(run_python(script, tmp_path), RUNNABLE_OUTPUT[block_id(marker).split()[-1]])


def test_readme_has_a_shell_tour():
    assert SHELL_BLOCKS


@pytest.mark.parametrize("marker, code", SHELL_BLOCKS)
def test_readme_shell_block_runs(marker, code, tmp_path):
    lines = [line for line in code.splitlines() if line.strip()]
    serve = [line for line in lines if line.startswith("hintens serve")]
    assert len(serve) == 1, "the block starts one server, first"
    assert lines[0] == serve[0]
    argv = shlex.split(in_tmp(serve[0], tmp_path), comments=True)
    socket_path = argv[argv.index("--socket") + 1]
    server = _spawn([sys.executable, "-m", *argv], socket_path)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HX_PYTHON=sys.executable)
    try:
        for line in lines[1:]:
            words = shlex.split(line, comments=True)
            # The echo server answers each payload with itself.
            payload = words[words.index("echo") + 2] if words[-1] == "-" else words[-1]
            done = subprocess.run(
                ["bash", "-c", 'hintens() { "$HX_PYTHON" -m hintens "$@"; }\n'
                 + in_tmp(line, tmp_path)],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False)
            assert (done.returncode, done.stderr) == (0, ""), line
            assert done.stdout.rstrip("\n") == payload, line
    finally:
        stop_server(server, signal.SIGTERM)
