"""``dcoord status``: one screen of what a namespace holds - server, locks, groups with
their live members, unfinished transactions; ``--watch`` redraws it in place."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from .. import inspect
from ..client import Client
from ..twopc import Coordinator
from ..txlog import TxState
from .common import connect_to, global_options
from .locks import age, table
from .tx import in_doubt_first, is_stuck, quiet_coordinator

# ANSI: cursor home, then clear to the end of the screen (plain text, no extra needed).
REDRAW = "\x1b[H\x1b[J"
# At most this many members listed per group, so the screen stays one screen.
MEMBERS_SHOWN = 8


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``status`` command."""
    parser = subparsers.add_parser(
        "status",
        help="one screen: server, held locks, groups, unfinished transactions",
        description=(
            "Print the server, the namespace, the held locks, the groups with their live "
            "members, and the unfinished transactions (stuck ones first). With --watch, "
            "redraw it in place every --interval seconds until interrupted."
        ),
    )
    global_options(parser, backend=True)
    parser.add_argument("--watch", action="store_true", help="redraw the screen in place")
    parser.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between redraws"
    )
    parser.add_argument("--count", type=int, metavar="N", help="with --watch, stop after N screens")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the status screen (once, or redrawn with ``--watch``)."""
    with connect_to(args, "status") as client:
        coord = quiet_coordinator(client, ())
        if not args.watch:
            print("\n".join(render(client, coord)))
            return 0
        shown = 0
        pause = threading.Event()  # never set: a wait that an interrupt ends at once
        while args.count is None or shown < args.count:
            if shown:
                pause.wait(args.interval)
            sys.stdout.write(REDRAW + "\n".join(render(client, coord)) + "\n")
            sys.stdout.flush()
            shown += 1
    return 0


def render(client: Client, coord: Coordinator) -> list[str]:
    """The status screen as lines of text (``coord`` reads the transaction log)."""
    now = time.time()
    server = client.ping()
    lines = [
        f"dcoord status  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}",
        f"server     {server.kind} {server.version} at {server.endpoint}",
        f"namespace  {client.namespace}",
        "",
        "LOCKS",
        *table(client.locks()),
        "",
        "GROUPS",
    ]
    live = 0
    for name in inspect.groups(client.backend):
        view = client.group(name).view()
        if not view:
            continue
        live += 1
        ids = sorted(view)
        more = f" (+{len(ids) - MEMBERS_SHOWN} more)" if len(ids) > MEMBERS_SHOWN else ""
        lines.append(
            f"{name}  {len(ids)} member(s), epoch {view.epoch}: "
            f"{', '.join(ids[:MEMBERS_SHOWN])}{more}"
        )
    lines += [f"{live} group(s) with live members", "", "UNFINISHED TRANSACTIONS"]
    # Through the unfinished states' indexes: never a read of the finished history.
    unfinished = [r for s in TxState if not s.finished for r in coord.transactions(s)]
    records = in_doubt_first(unfinished, now)
    for record in records:
        stuck = "  STUCK: past its deadline" if is_stuck(record, now) else ""
        lines.append(
            f"{record.txid}  {record.state.value}  age {age(now - record.created)}  "
            f"{','.join(record.participants)}{stuck}"
        )
    lines.append(f"{len(records)} unfinished transaction(s)")
    return lines
