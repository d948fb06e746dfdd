"""``dcoord lock``: run a command while holding a distributed lock (a distributed flock).

The lock is renewed while the command runs and released when it exits, or when dcoord
gets SIGINT/SIGTERM (forwarded to the command first). If the lock is lost while the
command runs, the command gets SIGTERM (it is no longer protected). Exit codes follow
timeout(1), so that dcoord's own outcomes do not collide with the command's: see
:data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import logging

from ..backends.etcd_names import etcd_lock_prefix
from ..config import ENV_URL, settings_from
from ..errors import DcoordError, LockLost, LockNotOwned, LockTimeout
from ..lock import DEFAULT_TTL, Lock
from .child import (
    LOCK_TIMEOUT,
    Child,
    child_url,
    codes_help,
    exit_code,
    exit_codes,
    parse_trailing,
    split_command,
)
from .common import USAGE, connect_to, global_options, report_error

log = logging.getLogger("dcoord.cli")

#: Exit code -> meaning, for the help text and the docs.
EXIT_CODES = exit_codes(
    lost="the lock was lost while COMMAND ran (COMMAND was sent SIGTERM)",
    timeout="the lock was not acquired within --timeout",
)

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
    p = subparsers.add_parser(
        "lock",
        help="run a command while holding a distributed lock",
        description=DESCRIPTION + codes_help(EXIT_CODES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="lock name")
    p.add_argument(
        "--etcd-key",
        action="store_true",
        help="print the etcd key prefix of lock NAME (for etcdctl lock or Go) and exit",
    )
    _options(p)
    # Options may also follow NAME (dcoord lock NAME --ttl 5 -- cmd): split_command.
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


def _print_etcd_key(args: argparse.Namespace, options: list[str]) -> int:
    """``--etcd-key``: print the prefix ``etcdctl lock`` / Go's NewMutex take; no server."""
    if not parse_trailing("lock", _options, options, args):  # a command after NAME is refused
        return USAGE
    # The namespace connect() would use: --namespace, else the URL's (or DCOORD_URL's).
    overrides = {} if args.namespace is None else {"namespace": args.namespace}
    print(etcd_lock_prefix(settings_from(args.url, **overrides).namespace, args.name))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``dcoord lock``; raises LockTimeout / LockLost / ConfigError (see exit_code)."""
    if args.etcd_key:
        return _print_etcd_key(args, list(args.command))
    command = split_command("lock", _options, args)
    if command is None:
        return USAGE
    child = Child(command)

    def on_lost(lock: Lock) -> None:
        child.stop()

    with connect_to(args, "lock") as client:
        lock = client.lock(args.name, ttl=args.ttl, timeout=args.timeout, on_lost=on_lost)
        log.info("waiting for lock %r on %s", args.name, client.url)
        if not lock.acquire():
            raise LockTimeout(f"lock {args.name!r} not acquired within {args.timeout:g} s")
        log.info("holding lock %r with fence %d", args.name, lock.fence)
        try:
            code = child.run(
                {
                    ENV_URL: child_url(client.settings),
                    "DCOORD_FENCE": str(lock.fence),
                    "DCOORD_LOCK": args.name,
                }
            )
        finally:
            try:
                lock.release()
            except LockNotOwned:
                child.lost.set()
            except DcoordError as exc:
                report_error(exc)  # the command's outcome still counts; the TTL frees it
        if child.lost_while_running:
            raise LockLost(
                f"lock {args.name!r} (fence {lock.fence}) was lost while the command ran; "
                "the command was sent SIGTERM"
            )
        return code
