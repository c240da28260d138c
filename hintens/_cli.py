"""The `hintens` command line: serve, send, info, demo, bench.

Failures print one line, ``hintens: error: ...``, to stderr and exit non-zero without a
traceback. Exit codes: 1 for an Error reply from the server, 2 for bad usage, 3 when the
server is not there or the connection broke, 4 for a timeout.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import signal
import sys
from typing import Any, Callable, Sequence

EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_TIMEOUT = 4


class _UsageError(Exception):
    pass


def load_handler(spec: str, option: str = "--handler") -> Callable[..., Any]:
    """Import ``module:function``, looking in the current directory first, as ``python -m``
    does (the console script's sys.path starts with its own directory instead).

    Raises:
        _UsageError: the spec is malformed, or the module or function cannot be found.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise _UsageError(f"{option} wants module:function, not {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise _UsageError(f"cannot load handler {spec!r}: {error}") from error
    if not callable(target):
        raise _UsageError(f"handler {spec!r} is not callable")
    return target


#: mallopt() parameters (glibc), and the value `hintens serve` gives both: glibc's initial one.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_THRESHOLD_BYTES = 128 * 1024


def _fix_malloc_thresholds() -> None:
    """glibc only: keep this server process's malloc thresholds at 128 KiB.

    By default glibc raises its mmap threshold to the size of each large block freed (up to
    32 MiB) and its trim threshold to twice that. Buffers under the raised threshold then come
    from the arena of the thread that asks (one per connection here, 8 arenas per core), and
    the free top of a thread's arena goes back to the kernel only when it exceeds the trim
    threshold: never through malloc_trim(). After connections that moved megabyte payloads
    the server keeps 100-200 MiB that is free. Fixed thresholds (setting either one stops
    the raising) send buffers of 128 KiB or more to mmap and give arena tops back when freed.
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment still win.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version   # glibc, not musl or another libc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, _MALLOC_THRESHOLD_BYTES)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_TRIM_THRESHOLD, _MALLOC_THRESHOLD_BYTES)


def _server_tls(args: argparse.Namespace) -> Any:
    """The server's TLS context from --tls-cert/--tls-key/--tls-ca/--tls-require-client-cert,
    or None without --tls-cert."""
    if not args.tls_cert:
        if args.tls_key or args.tls_ca or args.tls_require_client_cert:
            raise _UsageError("--tls-key, --tls-ca and --tls-require-client-cert need "
                              "--tls-cert")
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            context.load_verify_locations(args.tls_ca)
    except (OSError, ssl.SSLError) as error:
        raise _UsageError(f"cannot load the TLS certificate or key: {error}") from None
    if args.tls_require_client_cert:
        if not args.tls_ca:
            raise _UsageError("--tls-require-client-cert needs --tls-ca (the CA that signs "
                              "the clients' certificates)")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client_tls(args: argparse.Namespace) -> Any:
    """The client's TLS context from --tls-ca (the server's CA), --tls-cert and --tls-key
    (a client certificate), or None without any of them."""
    if not (args.tls_ca or args.tls_cert):
        return None
    import ssl

    try:
        context = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise _UsageError(f"cannot load the TLS certificate, key or CA: {error}") from None
    return context


def _tls_arguments(parser: argparse.ArgumentParser, server: bool) -> None:
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="TLS over the tcp:// addresses: this side's certificate (chain)")
    parser.add_argument("--tls-key", metavar="PEM",
                        help="its private key (if not in --tls-cert's file)")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="the CA that signs the clients' certificates" if server else
                             "the CA that signs the server's certificate (default: the "
                             "system's)")
    if server:
        parser.add_argument("--tls-require-client-cert", action="store_true",
                            help="let in only clients whose certificate chains to --tls-ca")


def _file_mode(text: str) -> int:
    """--mode's octal permission bits.

    Raises:
        _UsageError: not octal digits, or more than permission bits (0-777).
    """
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise _UsageError(f"--mode wants an octal file mode from 0 to 777 such as 600, "
                          f"not {text!r}")
    return mode


def _check_socket_dirs(args: argparse.Namespace) -> None:
    """Name the missing directory of a --socket or unix: --listen path, before the server
    tries to bind there.

    Raises:
        _UsageError: a socket path's directory does not exist.
    """
    from .transport.address import UNIX_PREFIX, is_tcp

    given = [("--socket", args.socket)] if args.socket else []
    for option, address in given + [("--listen", address) for address in args.listen]:
        if is_tcp(address):
            continue
        path = address.removeprefix(UNIX_PREFIX)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise _UsageError(f"the directory {directory} does not exist "
                              f"(for {option} {address})")


def _log_level(args: argparse.Namespace) -> int:
    if args.quiet:
        return logging.WARNING
    if args.verbose:
        return logging.DEBUG
    return int(getattr(logging, args.log_level))


def _serve(args: argparse.Namespace) -> int:
    from .sync.server import Server, echo

    _fix_malloc_thresholds()   # before any connection thread exists

    mode = _file_mode(args.mode)
    _check_socket_dirs(args)
    if args.metrics_port is not None:
        if not 0 <= args.metrics_port <= 65535:
            raise _UsageError(f"--metrics-port wants a port from 0 to 65535, not "
                              f"{args.metrics_port}")
        try:
            import prometheus_client
        except ImportError:
            raise _UsageError("--metrics-port needs prometheus_client (pip install "
                              "'hintens[prometheus]')") from None
    logging.basicConfig(level=_log_level(args),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    handler = load_handler(args.handler) if args.handler else echo
    on_event = load_handler(args.on_event, "--on-event") if args.on_event else None
    # SIGTERM/SIGINT wait until the handlers are in place: a signal that came the moment the
    # socket began to accept connections would otherwise leave the socket file behind.
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        addresses = ([args.socket] if args.socket else []) + args.listen
        server = Server(addresses or None, handler, on_event=on_event, mode=mode,
                        allow_uids=args.allow_uid, allow_gids=args.allow_gid,
                        ssl_context=_server_tls(args), ring=args.ring)

        def stop(signum: int, frame: Any) -> None:
            server.shutdown()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    if args.metrics_port is not None:
        from .metrics import PrometheusCollector

        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector(server))
        try:
            prometheus_client.start_http_server(args.metrics_port, args.metrics_host,
                                                registry=registry)
        except OSError as error:
            server.close()
            raise _UsageError(f"cannot serve metrics on {args.metrics_host}:"
                              f"{args.metrics_port}: {error.strerror or error}") from None
        logging.getLogger("hintens").info("metrics at http://%s:%d/metrics",
                                          args.metrics_host, args.metrics_port)
    server.serve_forever()
    return 0


def _payload(data: str) -> bytes:
    """send's DATA: the bytes of stdin for ``-``, of FILE for ``@FILE``, else the text itself.

    Raises:
        _UsageError: FILE cannot be read.
    """
    if data == "-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as file:
                return file.read()
        except OSError as error:
            raise _UsageError(f"cannot read {data[1:]!r}: {error.strerror or error}") \
                from None
    return data.encode()


def _send(args: argparse.Namespace) -> int:
    from .sync.client import Client

    if args.socket and args.connect:
        raise _UsageError("give --socket or --connect, not both")
    data = _payload(args.data)
    with Client(args.connect or args.socket, timeout=args.timeout, connect_timeout=args.timeout,
                ssl_context=_client_tls(args),
                server_uids=args.server_uid, ring=args.ring) as client:
        if args.event:
            client.send_event(data)
            return 0
        reply = client.request(data)
    sys.stdout.buffer.write(reply)
    if sys.stdout.isatty() and len(reply) and bytes(reply[-1:]) != b"\n":
        sys.stdout.buffer.write(b"\n")   # the shell's prompt on a line of its own
    sys.stdout.buffer.flush()
    return 0


def _info(args: argparse.Namespace) -> int:
    import hintens

    print(f"hintens {hintens.__version__}")
    print(f"core: {hintens.implementation}")
    print(f"crc16 kernel: {hintens.wire.crc16_backend()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import _demo

    _demo.run(lambda line: print(line, flush=True), socket_dir=args.dir)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import _quickbench

    if args.count is not None and args.count < 1:
        raise _UsageError(f"--count wants a positive number, not {args.count}")
    if args.seconds is not None and not args.seconds > 0:
        raise _UsageError(f"--seconds wants a positive number, not {args.seconds}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _UsageError("--plot needs matplotlib (pip install hintens[plot])") from None
        directory = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(directory):
            raise _UsageError(f"the directory {directory} does not exist (for --plot "
                              f"{args.plot})")
    _quickbench.run(lambda line: print(line, flush=True), count=args.count,
                    seconds=args.seconds or _quickbench.DEFAULT_SECONDS, plot_path=args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hintens", description="Fast message passing between processes on one machine.",
        epilog="Exit codes: 0 done, 1 an Error reply from the server, 2 bad usage, 3 no server "
               "or the connection broke, 4 a timeout.")
    parser.add_argument("--version", action="version", version=f"hintens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    socket_help = ("socket path (default: $HINTENS_SOCKET, else $XDG_RUNTIME_DIR/hintens.sock, "
                   "else /tmp/hintens-$UID/hintens.sock)")

    serve = commands.add_parser("serve", help="run a server until SIGTERM or SIGINT")
    serve.add_argument("--socket", help=socket_help)
    serve.add_argument("--listen", action="append", default=[], metavar="ADDRESS",
                       help="also (or instead) listen here: tcp://host:port (tcp://:7400 "
                            "binds 127.0.0.1) or unix:/path; may be given several times. "
                            "Over TCP any host that can reach the port can call the server")
    _tls_arguments(serve, server=True)
    serve.add_argument("--handler", metavar="MODULE:FUNCTION",
                       help="request handler: payload in, response bytes out (default: echo)")
    serve.add_argument("--on-event", metavar="MODULE:FUNCTION",
                       help="called as function(payload, connection) for each Event "
                            "(default: Events are dropped unread)")
    serve.add_argument("--mode", default="600", help="socket file mode, octal (default 600)")
    serve.add_argument("--ring", action="store_true",
                       help="offer a shared-memory ring to clients that ask for one (Unix "
                            "sockets): frames then travel through shared memory")
    serve.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                       help="also accept clients with this uid (repeatable)")
    serve.add_argument("--allow-gid", type=int, action="append", default=[], metavar="GID",
                       help="also accept clients with this gid (repeatable)")
    serve.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve the server's stats for Prometheus at "
                            "http://127.0.0.1:PORT/metrics (needs prometheus_client: pip "
                            "install 'hintens[prometheus]')")
    serve.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                       help="the address --metrics-port binds (default 127.0.0.1)")
    verbosity = serve.add_mutually_exclusive_group()
    verbosity.add_argument("--log-level", default="INFO",
                           choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                           help="what the server logs to stderr (default INFO: listening, "
                                "closing, refused connections; DEBUG adds each connect and "
                                "disconnect)")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="warnings and errors only (--log-level WARNING)")
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="debug detail (--log-level DEBUG)")
    serve.set_defaults(run=_serve)

    send = commands.add_parser("send", help="send DATA and print the reply's bytes")
    send.add_argument("--socket", help=socket_help)
    send.add_argument("--connect", metavar="ADDRESS",
                      help="the server's address instead of --socket: tcp://host:port or "
                           "unix:/path")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    _tls_arguments(send, server=False)
    send.add_argument("--event", action="store_true", help="send an Event; expect no reply")
    send.add_argument("--ring", action="store_true",
                      help="ask for a shared-memory ring (a server started with --ring)")
    send.add_argument("--server-uid", type=int, action="append", default=[], metavar="UID",
                      help="also trust a server running as this uid (repeatable; by default "
                           "only our own uid and root are trusted)")
    send.add_argument("data", metavar="DATA",
                      help="the payload: the text itself, - to read it from stdin, or @FILE "
                           "to read it from FILE. On a terminal a newline follows the reply "
                           "unless it ends with one")
    send.set_defaults(run=_send)

    info_help = "show the version, which core is in use and which CRC16 kernel"
    commands.add_parser("info", help=info_help, description=info_help + ": the compiled "
                        "(cython) or the pure-Python core (python, forced by "
                        "HINTENS_NO_EXTENSIONS=1), and the kernel CPU dispatch chose").set_defaults(
        run=_info)
    demo_help = "run a server process, measure, print a table"
    demo = commands.add_parser(
        "demo", help=demo_help,
        description="Start `hintens serve` and a raw-socket echo server (the floor for Python) "
                    "in their own processes, time request round trips of 64 B, 4 KiB and "
                    "60 KiB against both, and print median, p99, requests/s and MB/s. It takes "
                    "a few seconds at most.")
    demo.add_argument("--dir", help="directory for the demo's sockets (default: a temp dir)")
    demo.set_defaults(run=_demo)
    bench = commands.add_parser(
        "bench", help="compare with a raw socket, multiprocessing and pyzmq; print a table",
        description="A quick side-by-side: echo servers of hintens, a raw Unix socket "
                    "speaking length-prefixed frames (the floor), multiprocessing.connection "
                    "and pyzmq REQ/REP (if installed), each in its own process; 64 B round "
                    "trips and 1 MiB echoes, interleaved. Prints medians and ratios to the "
                    "raw floor. The benchmarks in the source tree's bench/ measure more.")
    budget = bench.add_mutually_exclusive_group()
    budget.add_argument("--count", type=int, metavar="N",
                        help="64 B round trips per peer (and N/50 1 MiB echoes, at least 4)")
    budget.add_argument("--seconds", type=float, metavar="S",
                        help="measure for about S seconds instead (default 2; starting the "
                             "servers comes on top)")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="also draw the table into FILE.png (needs matplotlib: pip install "
                            "hintens[plot])")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hintens` console script."""
    from ._errors import ConnectError, ConnectionClosed, HintensError, RemoteError, Timeout

    args = build_parser().parse_args(argv)
    outcomes: list[tuple[type[BaseException], int]] = [
        (_UsageError, EXIT_USAGE), (RemoteError, EXIT_REMOTE_ERROR), (Timeout, EXIT_TIMEOUT),
        (ConnectError, EXIT_CONNECTION), (ConnectionClosed, EXIT_CONNECTION),
        (HintensError, EXIT_CONNECTION), (OSError, EXIT_CONNECTION),
        (ValueError, EXIT_USAGE), (TypeError, EXIT_USAGE)]
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # stdout closed early, e.g. piped into head
        return 0
    except Exception as error:
        for kind, code in outcomes:
            if isinstance(error, kind):
                print(f"hintens: error: {error}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    sys.exit(main())
