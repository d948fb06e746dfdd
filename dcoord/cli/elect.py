"""``dcoord elect``: run a command only while this process leads an election.

The leadership is renewed while the command runs and resigned when it exits, or when
dcoord gets SIGINT/SIGTERM (forwarded to the command first). If leadership is lost while
the command runs, the command gets SIGTERM and, if it is still running after ``--grace``
seconds, SIGKILL: it must not act as leader any more. Exit codes are those of
``dcoord lock`` (timeout(1)'s convention), see :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import logging

from ..config import ENV_URL
from ..election import Leadership
from ..errors import ConfigError, DcoordError, LockLost, LockTimeout
from ..lock import DEFAULT_TTL
from .child import (
    LOCK_TIMEOUT,
    Child,
    child_url,
    codes_help,
    exit_code,
    exit_codes,
    split_command,
)
from .common import USAGE, connect_to, global_options, report_error

log = logging.getLogger("dcoord.cli")

DEFAULT_GRACE = 10.0

#: Exit code -> meaning, for the help text and the docs.
EXIT_CODES = exit_codes(
    lost="leadership was lost while COMMAND ran (COMMAND was sent SIGTERM, then "
    "SIGKILL after --grace)",
    timeout="not elected within --timeout",
)

DESCRIPTION = """\
Campaign in election NAME, and once elected run COMMAND; keep the leadership renewed while
it runs and resign when COMMAND exits. SIGINT and SIGTERM are forwarded to COMMAND. If
leadership is lost (this process was paused or cut off past --ttl), COMMAND gets SIGTERM,
then SIGKILL after --grace seconds.

COMMAND's environment gets DCOORD_ELECTION (the name), DCOORD_TERM (the leader's term, a
fencing token to pass to fenced resources) and DCOORD_URL (the backend's URL without its
password, the namespace and other options as query parameters).

exit status: COMMAND's own, 128+N if it died of signal N, or, as timeout(1) does:
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``elect`` command."""
    p = subparsers.add_parser(
        "elect",
        help="run a command only while this process leads an election",
        description=DESCRIPTION + codes_help(EXIT_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="election name")
    _options(p)
    # Options may follow NAME too: split_command.
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="[OPTIONS] -- COMMAND [ARGS...]")
    p.set_defaults(
        func=run, value="", ttl=DEFAULT_TTL, timeout=None, grace=DEFAULT_GRACE, exit_code=exit_code
    )


def _options(parser: argparse.ArgumentParser) -> None:
    global_options(parser, backend=True)
    parser.add_argument(
        "--value",
        default=argparse.SUPPRESS,
        help="the value followers see while this process leads (default: empty)",
    )
    parser.add_argument(
        "--ttl",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds the leadership outlives a crashed dcoord (default {DEFAULT_TTL:g})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds to wait to be elected (default: for ever; exit {LOCK_TIMEOUT} after)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds between SIGTERM and SIGKILL on loss (default {DEFAULT_GRACE:g})",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``dcoord elect``; raises LockTimeout / LockLost / ConfigError (see exit_code)."""
    command = split_command("elect", _options, args)
    if command is None:
        return USAGE
    if args.grace < 0 or args.grace != args.grace:
        raise ConfigError(f"--grace must be a number of seconds >= 0, got {args.grace!r}")
    child = Child(command, grace=args.grace)

    def on_lost(leadership: Leadership) -> None:
        child.stop()

    with connect_to(args, "elect") as client:
        election = client.election(args.name)
        log.info("campaigning in election %r on %s", args.name, client.url)
        leadership = election.campaign(
            args.value, ttl=args.ttl, timeout=args.timeout, on_lost=on_lost
        )
        if leadership is None:
            raise LockTimeout(f"not elected in {args.name!r} within {args.timeout:g} s")
        log.info("leading election %r with term %d", args.name, leadership.term)
        try:
            code = child.run(
                {
                    ENV_URL: child_url(client.settings),
                    "DCOORD_TERM": str(leadership.term),
                    "DCOORD_ELECTION": args.name,
                }
            )
        finally:
            if not leadership.held:
                child.lost.set()
            try:
                leadership.resign()
            except DcoordError as exc:
                report_error(exc)  # the command's outcome still counts; the TTL frees it
        if child.lost_while_running:
            raise LockLost(
                f"leadership of {args.name!r} (term {leadership.term}) was lost while the "
                "command ran; the command was stopped"
            )
        return code
