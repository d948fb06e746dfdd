"""``dcoord leader``: print the leader of an election, once or on every change."""

from __future__ import annotations

import argparse
import threading

from ..election import Leader
from .common import USAGE, connect_to, global_options, print_json

#: Exit status when nobody leads (without --watch).
NO_LEADER = 3

DESCRIPTION = f"""\
Print the leader of election NAME: "TERM VALUE" (or, with --json, one JSON object per
line: {{"election": NAME, "term": TERM, "value": VALUE}}, or {{"election": NAME,
"term": null, "value": null}} when nobody leads; in text, "-" when nobody leads).
With --watch, print the leader now and again on every change until interrupted.

exit status: 0 a leader was printed, {NO_LEADER} nobody leads (without --watch),
1 failure (e.g. the backend is unreachable), {USAGE} bad usage or configuration,
130 --watch ended by SIGINT.
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``leader`` command."""
    p = subparsers.add_parser(
        "leader",
        help="print the leader of an election (--watch: on every change)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="election name")
    global_options(p, backend=True)
    p.add_argument("--watch", action="store_true", help="print every change until interrupted")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def _show(name: str, leader: Leader | None, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "election": name,
                "term": None if leader is None else leader.term,
                "value": None if leader is None else leader.value,
            }
        )
    else:
        print("-" if leader is None else f"{leader.term} {leader.value}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Run ``dcoord leader``."""
    with connect_to(args, "leader") as client:
        election = client.election(args.name)
        if not args.watch:
            leader = election.leader()
            _show(args.name, leader, args.json)
            return 0 if leader is not None else NO_LEADER
        with election.watch(lambda leader: _show(args.name, leader, args.json)):
            threading.Event().wait()  # until SIGINT (KeyboardInterrupt: exit 130)
    return 0
