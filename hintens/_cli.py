"""The `hintens` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _info(args: argparse.Namespace) -> int:
    import hintens

    print(f"hintens {hintens.__version__}")
    print(f"core: {hintens.implementation}")
    print(f"crc16 kernel: {hintens.crc16_backend()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import _demo

    _demo.run(lambda line: print(line, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hintens", description="Fast message passing between processes on one machine.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="show the version and which core is in use").set_defaults(
        run=_info)
    commands.add_parser("demo", help="measure the core and print a table").set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hintens` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
