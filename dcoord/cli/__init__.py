"""The ``dcoord`` command: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import DcoordError
from . import demo, lock, members, ring, tx

COMMANDS = (demo, lock, members, ring, tx)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcoord",
        description="Distributed coordination: fenced locks, membership, two-phase commit.",
    )
    parser.add_argument("--version", action="version", version=f"dcoord {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what dcoord does")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dcoord`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args))
    except DcoordError as exc:
        print(f"dcoord: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
