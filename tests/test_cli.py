"""The `hintens` command line, run as real processes."""

from __future__ import annotations

import argparse
import importlib.util
import os
import pty
import re
import signal
import subprocess
import sys
import tty

import pytest

from . import peers
from .peers import REPO, server_log, start_server, stop_server


def hintens_cli(*args, stdin=b"", timeout=30):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "hintens", *args], input=stdin,
                          capture_output=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture
def served(tmp_path):
    path = str(tmp_path / "cli.sock")
    process = start_server(path)
    yield path
    stop_server(process, signal.SIGKILL)


def test_send_prints_the_reply_bytes(served):
    done = hintens_cli("send", "--socket", served, "echo:hello")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"hello", b"")


def test_send_reads_stdin(served):
    payload = b"echo:" + bytes(range(256)) * 300
    done = hintens_cli("send", "--socket", served, "-", stdin=payload)
    assert done.returncode == 0 and done.stdout == payload[5:]


def test_send_uses_the_env_socket(served):
    env = dict(os.environ, PYTHONPATH=REPO, HINTENS_SOCKET=served)
    done = subprocess.run([sys.executable, "-m", "hintens", "send", "echo:env"],
                          capture_output=True, env=env, timeout=30)
    assert done.returncode == 0 and done.stdout == b"env"


def test_send_event(served):
    assert hintens_cli("send", "--socket", served, "--event", "x").returncode == 0


@pytest.mark.parametrize("args, code, text", [
    (("echo:unused",), 3, b"does not exist"),
    (("raise:boom",), 1, b"HANDLER_ERROR] ValueError: boom"),
    (("--timeout", "0.3", "sleep:3:x"), 4, b"in time"),
])
def test_failures_are_one_line_without_traceback(served, tmp_path, args, code, text):
    socket_path = str(tmp_path / "missing.sock") if code == 3 else served
    done = hintens_cli("send", "--socket", socket_path, *args)
    assert done.returncode == code
    assert done.stdout == b""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(b"hintens: error: ") and text in lines[0]


def test_bad_handler_spec(tmp_path):
    done = hintens_cli("serve", "--socket", str(tmp_path / "s.sock"), "--handler", "no_such:thing")
    assert done.returncode == 2 and b"cannot load handler" in done.stderr
    assert b"Traceback" not in done.stderr


def test_info():
    done = hintens_cli("info")
    assert done.returncode == 0 and b"core:" in done.stdout


# --version, help and the README ------------------------------------------------------------

def test_version_prints_the_package_version():
    import hintens

    done = hintens_cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"hintens {hintens.__version__}\n".encode(), b"")
    assert hintens.__version__ != "0+unknown"


def test_every_command_is_in_the_help_and_the_readme():
    from hintens._cli import build_parser

    commands = next(action.choices for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    assert set(commands) == {"serve", "send", "info", "demo", "bench"}
    usage = hintens_cli("--help").stdout.decode()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    section = text[text.index("### The command line"):]
    section = section[:section.index("\n### ", 1)]
    for name in commands:
        assert name in usage
        assert f"hintens {name}" in section, name
    for option in ("--log-level", "-q", "-v", "@FILE", "--version", "--plot", "--count",
                   "--seconds"):
        assert option in section, option


def test_demo_prints_its_table(tmp_path):
    done = hintens_cli("demo", "--dir", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith("hintens core: ")
    for size in ("64 B", "4 KiB", "60 KiB"):
        row = next(line for line in lines if line.startswith(size + " "))
        assert re.search(r" us .* \d+\.\d\dx$", row), row
    assert list(tmp_path.iterdir()) == []   # its socket directory is gone


# hintens bench ------------------------------------------------------------------------------

BENCH_ROW = re.compile(rb"^(?P<name>.+?)\s+(?P<us>\d+\.\d) us\s+(?P<ratio>\d+\.\d\d)x\s+"
                       rb"(?P<mbs>\d+) MB/s\s+(?P<mb_ratio>\d+\.\d\d)x$")


def bench_rows(stdout: bytes) -> dict:
    return {match["name"].decode(): match for match in map(BENCH_ROW.match, stdout.splitlines())
            if match}


def test_bench_prints_a_row_per_peer(tmp_path):
    done = hintens_cli("bench", "--count", "100", timeout=120)
    assert done.returncode == 0, done.stderr
    rows = bench_rows(done.stdout)
    expected = {"hintens", "raw socket (stdlib)", "multiprocessing.connection"}
    if importlib.util.find_spec("zmq") is not None:
        expected.add("pyzmq REQ/REP")
    assert set(rows) == expected
    assert (rows["raw socket (stdlib)"]["ratio"], rows["raw socket (stdlib)"]["mb_ratio"]) == (
        b"1.00", b"1.00")
    for row in rows.values():
        assert float(row["us"]) > 0 and int(row["mbs"]) > 0
    assert b"64 B round trip" in done.stdout and b"1 MiB echo" in done.stdout


def hintens_cli_without(module, *args, timeout=120):
    """`python -m hintens ARGS` as if ``module`` were not installed (its import fails)."""
    script = ("import runpy, sys\n"
              f"sys.modules[{module!r}] = None\n"
              f"sys.argv = ['hintens', *{args!r}]\n"
              "runpy.run_module('hintens', run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)


def test_bench_without_pyzmq_says_so():
    done = hintens_cli_without("zmq", "bench", "--count", "50")
    assert done.returncode == 0, done.stderr
    assert b"(pyzmq is not installed: no pyzmq row)" in done.stdout
    assert set(bench_rows(done.stdout)) == {"hintens", "raw socket (stdlib)",
                                           "multiprocessing.connection"}


def test_bench_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    image = tmp_path / "bench.png"
    done = hintens_cli("bench", "--count", "50", "--plot", str(image), timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"plot written to {image}".encode() in done.stdout
    with open(image, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert image.stat().st_size > 10_000


def test_bench_plot_without_matplotlib_is_one_line(tmp_path):
    image = tmp_path / "bench.png"
    done = hintens_cli_without("matplotlib", "bench", "--plot", str(image))
    assert (done.returncode, done.stdout, done.stderr) == (
        2, b"", b"hintens: error: --plot needs matplotlib (pip install hintens[plot])\n")
    assert not image.exists()


@pytest.mark.parametrize("args, text", [
    (("--count", "0"), b"--count wants a positive number"),
    (("--seconds", "-1"), b"--seconds wants a positive number"),
    (("--count", "5", "--seconds", "1"), b"not allowed with argument"),
    (("--plot", "/no/such/dir/b.png"), b"the directory /no/such/dir does not exist"),
])
def test_bench_usage_errors(args, text):
    if "--plot" in args:
        pytest.importorskip("matplotlib")
    done = hintens_cli("bench", *args)
    assert done.returncode == 2 and done.stdout == b""
    assert text in done.stderr.splitlines()[-1] and b"Traceback" not in done.stderr


# serve: logging, handlers from the current directory, usage errors ---------------------------

def log_of_one_request(path, process, data=b"echo:x", reply=b"x"):
    """Send one request to the server ``process`` at ``path``, stop it (SIGTERM, so that it
    closes in order), and return what it logged."""
    try:
        assert hintens_cli("send", "--socket", path, data).stdout == reply
        process.terminate()
        process.wait(10)
        return server_log(process)
    finally:
        stop_server(process)


def serve_log(tmp_path, *extra):
    """`hintens serve` with ``extra`` options: its log over one request."""
    path = str(tmp_path / "log.sock")
    return log_of_one_request(path, start_server(path, *extra))


def assert_connect_and_disconnect_logged(log):
    """The request's connection is logged at DEBUG as it starts and as it ends. (The
    readiness probe's connection came first, and may have gone before its hello did.)"""
    connections = re.findall(r"DEBUG (<[^>]*ServerConnection [^>]*>) connected$", log, re.MULTILINE)
    assert connections, log
    assert f"DEBUG {connections[-1]} ended: closed by the client" in log, log


def test_serve_logs_connects_and_disconnects_with_v(tmp_path):
    log = serve_log(tmp_path, "-v")
    assert_connect_and_disconnect_logged(log)
    assert "INFO listening on" in log


def test_serve_logs_info_by_default(tmp_path):
    log = serve_log(tmp_path)
    assert "INFO listening on" in log and "INFO server on" in log
    assert "DEBUG" not in log


@pytest.mark.parametrize("option", [("-q",), ("--log-level", "warning")])
def test_serve_quiet_logs_warnings_only(tmp_path, option):
    path = str(tmp_path / "q.sock")
    log = log_of_one_request(path, start_server(path, *option), b"raise:boom", b"")
    assert "WARNING handler failed on request" in log
    assert "INFO" not in log and "DEBUG" not in log


def test_aio_server_logs_connects_and_disconnects_at_debug(tmp_path):
    path = str(tmp_path / "aio.sock")
    script = (
        "import asyncio, logging, signal, hintens.aio\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(levelname)s %(message)s')\n"
        "async def main():\n"
        f"    server = hintens.aio.Server({path!r}, lambda payload: bytes(payload))\n"
        "    asyncio.get_running_loop().add_signal_handler(\n"
        "        signal.SIGTERM, lambda: asyncio.ensure_future(server.close()))\n"
        "    await server.serve_forever()\n"
        "asyncio.run(main())\n")
    log = log_of_one_request(path, peers._spawn([sys.executable, "-c", script], path),
                             b"x", b"x")
    assert_connect_and_disconnect_logged(log)


HANDLER_MODULE = '''
def handle(payload):
    data = bytes(payload)
    if data.startswith(b"text:"):
        return data[5:].decode()   # a str, not bytes: the server answers an Error
    return b"from the current directory: " + data
'''


@pytest.fixture
def handler_dir(tmp_path):
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "cli_cwd_handler.py").write_text(HANDLER_MODULE)
    return directory


@pytest.fixture
def cwd_served(handler_dir):
    """`hintens serve --handler cli_cwd_handler:handle` run in the handler's directory, with
    -P: Python itself puts nothing of the current directory on sys.path, as with the
    `hintens` console script; finding the module is up to the CLI."""
    path = str(handler_dir / "cwd.sock")
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "hintens", "serve", "--socket", path,
         "--handler", "cli_cwd_handler:handle"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=handler_dir,
        env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert peers._accepting(path, lambda: process.poll() is None), process.stderr.read()
        yield path
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


def test_handler_module_from_the_current_directory(cwd_served):
    done = hintens_cli("send", "--socket", cwd_served, "hi")
    assert (done.returncode, done.stdout) == (0, b"from the current directory: hi")


def test_handler_returning_str_is_one_line(cwd_served):
    done = hintens_cli("send", "--socket", cwd_served, "text:hi")
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr == (b"hintens: error: [HANDLER_ERROR] handler must return a "
                           b"bytes-like object, got str\n")


@pytest.mark.parametrize("args, text", [
    (("--mode", "999"), "--mode wants an octal file mode from 0 to 777 such as 600, not '999'"),
    (("--mode", "abc"), "--mode wants an octal file mode from 0 to 777 such as 600, not 'abc'"),
    (("--mode", "1777"), ("--mode wants an octal file mode from 0 to 777 such as 600, "
                          "not '1777'")),
    (("--socket", "/no/such/dir/s.sock"),
     "the directory /no/such/dir does not exist (for --socket /no/such/dir/s.sock)"),
    (("--listen", "unix:/no/such/dir/s.sock"),
     "the directory /no/such/dir does not exist (for --listen unix:/no/such/dir/s.sock)"),
    (("--log-level", "LOUD"), "argument --log-level: invalid choice: 'LOUD'"),
    (("-q", "-v"), "argument -v/--verbose: not allowed with argument -q/--quiet"),
])
def test_serve_usage_errors_are_one_line(tmp_path, args, text):
    if "--socket" not in args:
        args = ("--socket", str(tmp_path / "s.sock"), *args)
    done = hintens_cli("serve", *args)
    assert (done.returncode, done.stdout) == (2, b"")
    assert text in done.stderr.decode().splitlines()[-1]
    assert b"Traceback" not in done.stderr
    assert not (tmp_path / "s.sock").exists()


# send: @file, a newline on a terminal, an unreachable server ----------------------------------

def test_send_reads_a_file(served, tmp_path):
    payload = b"echo:" + bytes(range(256)) * 100
    (tmp_path / "payload.bin").write_bytes(payload)
    done = hintens_cli("send", "--socket", served, f"@{tmp_path / 'payload.bin'}")
    assert (done.returncode, done.stdout) == (0, payload[5:])


def test_send_missing_file_is_one_line(served, tmp_path):
    missing = tmp_path / "missing.bin"
    done = hintens_cli("send", "--socket", served, f"@{missing}")
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == f"hintens: error: cannot read '{missing}': No such file or " \
                          f"directory\n".encode()


def send_on_a_terminal(path, data):
    """`hintens send` with its stdout on a pseudo-terminal (raw, so no \\r is added)."""
    controller, terminal = pty.openpty()
    tty.setraw(terminal)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "hintens", "send", "--socket", path, data],
            stdout=terminal, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO),
            cwd=REPO)
        os.close(terminal)
        terminal = -1
        out = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:   # EIO: the child closed the terminal's last descriptor
                break
            if not chunk:
                break
            out += chunk
        assert process.wait(30) == 0, process.stderr.read()
        process.stderr.close()
        return out
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)


def test_send_ends_the_line_on_a_terminal(served):
    assert send_on_a_terminal(served, "echo:hello") == b"hello\n"
    assert send_on_a_terminal(served, "echo:two\n") == b"two\n"   # no second newline


def test_send_adds_no_newline_into_a_pipe(served):
    done = hintens_cli("send", "--socket", served, "echo:hello")
    assert done.stdout == b"hello"


def test_send_to_a_closed_tcp_port_is_one_line():
    port = peers.free_port()
    done = hintens_cli("send", "--connect", f"tcp://127.0.0.1:{port}", "x")
    assert (done.returncode, done.stdout) == (3, b"")
    assert done.stderr == (f"hintens: error: no hintens server at tcp://127.0.0.1:{port}: the "
                           f"connection was refused (nothing listens on that port)\n").encode()
