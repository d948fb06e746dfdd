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
import os
import signal
import subprocess
import threading
from types import FrameType

from ..config import ENV_URL
from ..election import Leadership
from ..errors import ConfigError, DcoordError, LockLost, LockTimeout
from ..lock import DEFAULT_TTL
from .common import USAGE, Parser, connect_to, global_options, report, report_error, setup_logging
from .lock import (
    FAILED,
    FORWARDED,
    LOCK_LOST,
    LOCK_TIMEOUT,
    NOT_EXECUTABLE,
    NOT_FOUND,
    child_url,
)

log = logging.getLogger("dcoord.cli")

DEFAULT_GRACE = 10.0

#: Exit code -> meaning, for the help text and the docs.
EXIT_CODES = {
    USAGE: "bad usage or configuration, nothing run (e.g. no --url and no $DCOORD_URL)",
    LOCK_LOST: "leadership was lost while COMMAND ran (COMMAND was sent SIGTERM, then "
    "SIGKILL after --grace)",
    LOCK_TIMEOUT: "not elected within --timeout",
    FAILED: "dcoord itself failed (e.g. the backend is unreachable)",
    NOT_EXECUTABLE: "COMMAND was found but could not be run",
    NOT_FOUND: "COMMAND was not found",
}

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
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))
    p = subparsers.add_parser(
        "elect",
        help="run a command only while this process leads an election",
        description=DESCRIPTION + codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="election name")
    _options(p)
    # Options may follow NAME too: the rest is taken whole and split at "--" in run().
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


def exit_code(exc: DcoordError) -> int:
    """The exit code of a failure of ``dcoord elect`` itself (see EXIT_CODES)."""
    if isinstance(exc, LockTimeout):
        return LOCK_TIMEOUT
    if isinstance(exc, LockLost):
        return LOCK_LOST
    return USAGE if isinstance(exc, ConfigError) else FAILED


def _split(args: argparse.Namespace) -> list[str] | None:
    """The command after ``--``, with the options before it parsed into ``args``; None if
    those options were refused (the parser has reported why)."""
    rest = list(args.command)
    if "--" not in rest:
        command = rest
    else:
        cut = rest.index("--")
        trailing = Parser(prog="dcoord elect NAME", add_help=False)
        _options(trailing)
        try:
            trailing.parse_args(rest[:cut], namespace=args)
        except SystemExit:  # Parser.error reported it
            return None
        setup_logging(args.verbose)  # main() set it up before a -v among these was seen
        command = rest[cut + 1 :]
    if not command:
        raise ConfigError("no command given: dcoord elect NAME [OPTIONS] -- COMMAND [ARGS...]")
    if command[0].startswith("-"):
        raise ConfigError(
            "options after NAME must end with '--' before the command "
            f"(dcoord elect NAME [OPTIONS] -- COMMAND), got {command[0]!r} as the command"
        )
    return command


def run(args: argparse.Namespace) -> int:
    """Run ``dcoord elect``; raises LockTimeout / LockLost / ConfigError (see exit_code)."""
    command = _split(args)
    if command is None:
        return USAGE
    if args.grace < 0 or args.grace != args.grace:
        raise ConfigError(f"--grace must be a number of seconds >= 0, got {args.grace!r}")
    lost = threading.Event()
    child: list[subprocess.Popen[bytes]] = []
    mutex = threading.Lock()

    def stop_child() -> None:
        # SIGTERM now, SIGKILL after the grace period if the command ignores it.
        process = child[0]
        process.terminate()

        def kill_late() -> None:
            if process.poll() is None:
                process.kill()

        killer = threading.Timer(args.grace, kill_late)
        killer.daemon = True
        killer.start()

    def on_lost(leadership: Leadership) -> None:
        with mutex:
            lost.set()
            if child:
                stop_child()

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
            env = {
                **os.environ,
                ENV_URL: child_url(client.settings),
                "DCOORD_TERM": str(leadership.term),
                "DCOORD_ELECTION": args.name,
            }
            previous = {sig: signal.getsignal(sig) for sig in FORWARDED}

            def forward(signum: int, frame: FrameType | None) -> None:
                if child:
                    child[0].send_signal(signum)

            for sig in FORWARDED:
                signal.signal(sig, forward)
            try:
                with mutex:
                    try:
                        child.append(subprocess.Popen(command, env=env))
                    except OSError as exc:
                        report(type(exc).__name__, f"cannot run {command[0]!r}: {exc.strerror}")
                        return NOT_FOUND if isinstance(exc, FileNotFoundError) else NOT_EXECUTABLE
                    if lost.is_set():  # lost between the election and the start
                        stop_child()
                code = child[0].wait()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            if not leadership.held:
                lost.set()
            try:
                leadership.resign()
            except DcoordError as exc:
                report_error(exc)  # the command's outcome still counts; the TTL frees it
        if lost.is_set():
            raise LockLost(
                f"leadership of {args.name!r} (term {leadership.term}) was lost while the "
                "command ran; the command was stopped"
            )
        return 128 - code if code < 0 else code
