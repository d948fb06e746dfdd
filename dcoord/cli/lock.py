"""``dcoord lock``: run a command while holding a distributed lock (a distributed flock).

The lock is renewed while the command runs and released when it exits, or when dcoord
gets SIGINT/SIGTERM (forwarded to the command first). The command sees the lock's fence
as ``DCOORD_FENCE`` (and the name as ``DCOORD_LOCK``) to pass on to fenced resources.
If the lock is lost while the command runs, the command gets SIGTERM (it is no longer
protected) and dcoord exits with 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from ..backends.etcd_names import etcd_lock_prefix
from ..client import connect
from ..config import settings_from
from ..errors import ConfigError, DcoordError, LockLost, LockNotOwned, LockTimeout
from ..lock import DEFAULT_TTL, Lock
from .common import url_argument

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``lock`` command."""
    p = subparsers.add_parser(
        "lock",
        help="run a command while holding a distributed lock",
        description=(
            "Acquire lock NAME, run COMMAND with DCOORD_FENCE set to the lock's fencing "
            "token, keep the lock renewed while it runs, and release it when it exits. "
            "Exits with COMMAND's exit code (128+N if it died of signal N), or 2 if the "
            "lock was not acquired within --timeout or was lost while COMMAND ran."
        ),
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
    p.set_defaults(func=run, ttl=DEFAULT_TTL)


def _options(parser: argparse.ArgumentParser) -> None:
    url_argument(parser)
    parser.add_argument(
        "--ttl",
        type=float,
        help=f"seconds the lock outlives a crashed dcoord (default {DEFAULT_TTL:g})",
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds to wait for the lock (default: for ever)"
    )


def _parse_trailing(options: list[str], args: argparse.Namespace) -> None:
    """Parse the options that followed NAME into ``args``."""
    trailing = argparse.ArgumentParser(
        prog="dcoord lock NAME", add_help=False, argument_default=argparse.SUPPRESS
    )
    _options(trailing)
    trailing.parse_args(options, namespace=args)


def _print_etcd_key(args: argparse.Namespace, options: list[str]) -> int:
    """``--etcd-key``: print the prefix ``etcdctl lock`` / Go's NewMutex take; no server."""
    _parse_trailing(options, args)  # a command after NAME is an error here
    # The namespace connect() would use: --namespace, else the URL's (or DCOORD_URL's).
    overrides = {} if args.namespace is None else {"namespace": args.namespace}
    print(etcd_lock_prefix(settings_from(args.url, **overrides).namespace, args.name))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``dcoord lock``; raises LockTimeout / LockLost / ConfigError (exit code 2)."""
    rest = list(args.command)
    if args.etcd_key:
        return _print_etcd_key(args, rest)
    if "--" in rest:
        cut = rest.index("--")
        options, command = rest[:cut], rest[cut + 1 :]
        _parse_trailing(options, args)
    else:
        command = rest
    if not command:
        raise ConfigError("no command given: dcoord lock NAME [OPTIONS] -- COMMAND [ARGS...]")
    lost = threading.Event()
    child: list[subprocess.Popen[bytes]] = []

    def on_lost(lock: Lock) -> None:
        lost.set()
        if child:
            child[0].terminate()

    with connect(args.url, namespace=args.namespace) as client:
        lock = client.lock(args.name, ttl=args.ttl, timeout=args.timeout, on_lost=on_lost)
        if not lock.acquire():
            raise LockTimeout(f"lock {args.name!r} not acquired within {args.timeout} s")
        try:
            env = {**os.environ, "DCOORD_FENCE": str(lock.fence), "DCOORD_LOCK": args.name}
            previous = {sig: signal.getsignal(sig) for sig in FORWARDED}

            def forward(signum: int, frame: FrameType | None) -> None:
                if child:
                    child[0].send_signal(signum)

            for sig in FORWARDED:
                signal.signal(sig, forward)
            try:
                child.append(subprocess.Popen(command, env=env))
                if lost.is_set():  # lost between acquire and start
                    child[0].terminate()
                code = child[0].wait()
            except FileNotFoundError as exc:
                raise ConfigError(f"cannot run {command[0]!r}: {exc.strerror}") from None
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            try:
                lock.release()
            except LockNotOwned:
                lost.set()
            except DcoordError as exc:
                print(f"dcoord: could not release lock {args.name!r}: {exc}", file=sys.stderr)
        if lost.is_set():
            raise LockLost(
                f"lock {args.name!r} (fence {lock.fence}) was lost while the command ran; "
                "the command was sent SIGTERM"
            )
        return 128 - code if code < 0 else code
