"""``dcoord lock``: run a command while holding a distributed lock (a distributed flock).

The lock is renewed while the command runs and released when it exits, or when dcoord
gets SIGINT/SIGTERM (forwarded to the command first). If the lock is lost while the
command runs, the command gets SIGTERM (it is no longer protected). Exit codes follow
timeout(1), so that dcoord's own outcomes do not collide with the command's: see
:data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from urllib.parse import urlencode

from ..backends.etcd_names import etcd_lock_prefix
from ..config import ENV_URL, OPTIONS, Settings, settings_from
from ..errors import ConfigError, DcoordError, LockLost, LockNotOwned, LockTimeout
from ..lock import DEFAULT_TTL, Lock
from .common import USAGE, Parser, connect_to, global_options, report, report_error, setup_logging

log = logging.getLogger("dcoord.cli")

FORWARDED = (signal.SIGINT, signal.SIGTERM)

LOCK_LOST = 123
LOCK_TIMEOUT = 124
FAILED = 125
NOT_EXECUTABLE = 126
NOT_FOUND = 127

#: Exit code -> meaning, for the help text and the docs.
EXIT_CODES = {
    USAGE: "bad usage or configuration, nothing run (e.g. no --url and no $DCOORD_URL)",
    LOCK_LOST: "the lock was lost while COMMAND ran (COMMAND was sent SIGTERM)",
    LOCK_TIMEOUT: "the lock was not acquired within --timeout",
    FAILED: "dcoord itself failed (e.g. the backend is unreachable)",
    NOT_EXECUTABLE: "COMMAND was found but could not be run",
    NOT_FOUND: "COMMAND was not found",
}

DESCRIPTION = """\
Acquire lock NAME, run COMMAND, keep the lock renewed while it runs, and release it
when COMMAND exits. SIGINT and SIGTERM are forwarded to COMMAND.

COMMAND's environment gets DCOORD_LOCK (the lock name), DCOORD_FENCE (the lock's
fencing token, to pass to fenced resources) and DCOORD_URL: the backend's URL with its
password removed and the namespace and other options as query parameters, so that
COMMAND may fence its writes in the same backend (with credentials of its own if the
server requires them). The password is never passed on.

exit status: COMMAND's own, 128+N if it died of signal N, or, as timeout(1) does:
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``lock`` command."""
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))
    p = subparsers.add_parser(
        "lock",
        help="run a command while holding a distributed lock",
        description=DESCRIPTION + codes,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="lock name")
    p.add_argument(
        "--etcd-key",
        action="store_true",
        help="print the etcd key prefix of lock NAME (for etcdctl lock or Go) and exit",
    )
    _options(p)
    # Options may also follow NAME (dcoord lock NAME --ttl 5 -- cmd): argparse would hand
    # them to the top-level parser, so the rest is taken whole and split at "--" in run().
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="[OPTIONS] -- COMMAND [ARGS...]")
    p.set_defaults(func=run, ttl=DEFAULT_TTL, timeout=None, exit_code=exit_code)


def _options(parser: argparse.ArgumentParser) -> None:
    global_options(parser, backend=True)
    parser.add_argument(
        "--ttl",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds the lock outlives a crashed dcoord (default {DEFAULT_TTL:g})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds to wait for the lock (default: for ever; exit {LOCK_TIMEOUT} after)",
    )


def exit_code(exc: DcoordError) -> int:
    """The exit code of a failure of ``dcoord lock`` itself (see EXIT_CODES)."""
    if isinstance(exc, LockTimeout):
        return LOCK_TIMEOUT
    if isinstance(exc, LockLost):
        return LOCK_LOST
    return USAGE if isinstance(exc, ConfigError) else FAILED


def child_url(settings: Settings) -> str:
    """The URL of ``settings`` for a child's ``DCOORD_URL``: no user or password, every
    option that is not the default as a query parameter (the namespace above all)."""
    url = dataclasses.replace(settings, username=None, password=None).url
    query = {k: v for k, v in settings.options.items() if v != OPTIONS[k][1]}
    return f"{url}?{urlencode(query)}" if query else url


def _parse_trailing(options: list[str], args: argparse.Namespace) -> bool:
    """Parse the options that followed NAME into ``args``; False if they were refused
    (the parser has reported why)."""
    trailing = Parser(prog="dcoord lock NAME", add_help=False)
    _options(trailing)
    try:
        trailing.parse_args(options, namespace=args)
    except SystemExit:  # Parser.error reported it
        return False
    setup_logging(args.verbose)  # main() set it up before a -v among these was seen
    return True


def _print_etcd_key(args: argparse.Namespace, options: list[str]) -> int:
    """``--etcd-key``: print the prefix ``etcdctl lock`` / Go's NewMutex take; no server."""
    if not _parse_trailing(options, args):  # a command after NAME is refused here
        return USAGE
    # The namespace connect() would use: --namespace, else the URL's (or DCOORD_URL's).
    overrides = {} if args.namespace is None else {"namespace": args.namespace}
    print(etcd_lock_prefix(settings_from(args.url, **overrides).namespace, args.name))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``dcoord lock``; raises LockTimeout / LockLost / ConfigError (see exit_code)."""
    rest = list(args.command)
    if args.etcd_key:
        return _print_etcd_key(args, rest)
    if "--" in rest:
        cut = rest.index("--")
        options, command = rest[:cut], rest[cut + 1 :]
        if not _parse_trailing(options, args):
            return USAGE
    else:
        command = rest
    if not command:
        raise ConfigError("no command given: dcoord lock NAME [OPTIONS] -- COMMAND [ARGS...]")
    if command[0].startswith("-"):
        raise ConfigError(
            "options after NAME must end with '--' before the command "
            f"(dcoord lock NAME [OPTIONS] -- COMMAND), got {command[0]!r} as the command"
        )
    lost = threading.Event()
    child: list[subprocess.Popen[bytes]] = []

    def on_lost(lock: Lock) -> None:
        lost.set()
        if child:
            child[0].terminate()

    with connect_to(args, "lock") as client:
        lock = client.lock(args.name, ttl=args.ttl, timeout=args.timeout, on_lost=on_lost)
        log.info("waiting for lock %r on %s", args.name, client.url)
        if not lock.acquire():
            raise LockTimeout(f"lock {args.name!r} not acquired within {args.timeout:g} s")
        log.info("holding lock %r with fence %d", args.name, lock.fence)
        try:
            env = {
                **os.environ,
                ENV_URL: child_url(client.settings),
                "DCOORD_FENCE": str(lock.fence),
                "DCOORD_LOCK": args.name,
            }
            previous = {sig: signal.getsignal(sig) for sig in FORWARDED}

            def forward(signum: int, frame: FrameType | None) -> None:
                if child:
                    child[0].send_signal(signum)

            for sig in FORWARDED:
                signal.signal(sig, forward)
            try:
                try:
                    child.append(subprocess.Popen(command, env=env))
                except OSError as exc:
                    report(type(exc).__name__, f"cannot run {command[0]!r}: {exc.strerror}")
                    return NOT_FOUND if isinstance(exc, FileNotFoundError) else NOT_EXECUTABLE
                if lost.is_set():  # lost between acquire and start
                    child[0].terminate()
                code = child[0].wait()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            try:
                lock.release()
            except LockNotOwned:
                lost.set()
            except DcoordError as exc:
                report_error(exc)  # the command's outcome still counts; the TTL frees it
        if lost.is_set():
            raise LockLost(
                f"lock {args.name!r} (fence {lock.fence}) was lost while the command ran; "
                "the command was sent SIGTERM"
            )
        return 128 - code if code < 0 else code
