"""The ``dcoord`` command: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from ..errors import DcoordError
from . import acl, common, demo, doctor, elect, leader, lock, locks, members, ring, status, tx

COMMANDS = (demo, doctor, elect, leader, lock, locks, members, ring, status, tx, acl)

EPILOG = """\
The backend is the one --url names, else $DCOORD_URL. lock, locks, elect, leader,
members, status and tx refuse to run without one (their meaning depends on a server
other processes share); demo falls back to the embedded memory:// backend; ring and acl
need none. doctor takes the URL to check as its argument.

Errors are printed on stderr as "dcoord: <ErrorType>: <message>".
Exit status: 0 success; 1 failure (e.g. the backend is unreachable, recovery left work
unfinished); 2 bad usage, input or configuration (nothing was done). dcoord lock and
dcoord elect exit with their command's status and have codes of their own (see their
--help); dcoord leader exits 3 when nobody leads.
"""


def build_parser() -> common.Parser:
    """The ``dcoord`` argument parser with every subcommand registered."""
    parser = common.Parser(
        prog="dcoord",
        description="Distributed coordination: fenced locks, membership, two-phase commit.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dcoord {__version__}")
    common.global_options(parser, backend=True, top=True)
    parser.set_defaults(exit_code=common.exit_code)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dcoord`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else common.USAGE
    common.setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except DcoordError as exc:
        common.report_error(exc)
        return int(args.exit_code(exc))
    except KeyboardInterrupt:
        return 130
