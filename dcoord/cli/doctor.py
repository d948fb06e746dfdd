"""``dcoord doctor URL``: check a server against what dcoord's guarantees need."""

from __future__ import annotations

import argparse

from ..doctor import run_checks
from ..lock import DEFAULT_TTL, validate_ttl
from .common import FAILURE, connect_to, global_options, print_json

MARK = {"pass": "ok  ", "fail": "FAIL", "info": "info"}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``doctor`` command."""
    parser = subparsers.add_parser(
        "doctor",
        help="check a server against what dcoord needs (exit 0 only if all pass)",
        description=(
            "Check the server: version, persistence and eviction (Redis), replication, "
            "cluster health (etcd), clock offset, round-trip time against --ttl, and "
            "whether this user may run everything dcoord does in the namespace (tried on "
            "scratch keys, removed after) while nobody without the password may. Each "
            "check prints a fix hint when it fails; 'info' lines never fail. Exit 0 only "
            "if no check failed."
        ),
    )
    parser.add_argument("target", nargs="?", metavar="URL", help="the server (default: --url)")
    global_options(parser, backend=True)
    parser.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL,
        help=f"the smallest lock/member TTL you use, in seconds (default {DEFAULT_TTL:g})",
    )
    parser.add_argument(
        "--json", action="store_true", help='a JSON list of {"name", "status", "detail", "hint"}'
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run every check; exit 1 if any failed."""
    if args.target is not None:
        args.url = args.target
    ttl = validate_ttl(args.ttl)
    with connect_to(args, "doctor") as client:
        checks = run_checks(client, ttl)
        where = client.url
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        print_json([check.to_json() for check in checks])
    else:
        print(f"dcoord doctor {where}")
        for check in checks:
            print(f"[{MARK[check.status]}] {check.name:<17} {check.detail}")
            if check.hint:
                print(f"       {'':<17} fix: {check.hint}")
        print(f"{len(failed)} check(s) failed" if failed else "all checks passed")
    return FAILURE if failed else 0
