"""``dcoord demo``: show what dcoord does, on the embedded backend unless --url says otherwise."""

from __future__ import annotations

import argparse

from ..client import connect
from .common import url_argument


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("demo", help="run a self-checking demo (no server needed)")
    url_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with connect(args.url, namespace=args.namespace) as client:
        info = client.ping()
        print(f"connected to {info.kind} {info.version} at {info.endpoint}")
    return 0
