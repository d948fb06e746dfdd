"""``dcoord locks``: the locks held now, with holder, fence, age, TTL left and waiters."""

from __future__ import annotations

import argparse
import time

from ..inspect import LockInfo
from .common import connect_to, global_options, print_json


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``locks`` command."""
    parser = subparsers.add_parser(
        "locks",
        help="list the locks held now and who holds them",
        description=(
            "List the locks held in the namespace: name, holder (host:pid), the holder's "
            "label option, fence, when it was acquired, TTL left, and waiters (on Redis: "
            "client connections subscribed to the lock's release channel, see "
            "docs/observability.md)."
        ),
    )
    global_options(parser, backend=True)
    parser.add_argument("--prefix", default="", help="only locks whose names start with this")
    parser.add_argument(
        "--json",
        action="store_true",
        help='a JSON list of {"name", "holder", "label", "fence", "acquired_at", '
        '"ttl_left", "waiters"}',
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the held locks."""
    with connect_to(args, "locks") as client:
        found = client.locks(args.prefix)
    if args.json:
        print_json([info.to_json() for info in found])
        return 0
    print("\n".join(table(found)))
    return 0


def table(found: list[LockInfo]) -> list[str]:
    """The held locks as lines of a text table (``dcoord locks`` and ``dcoord status``)."""
    now = time.time()
    rows = [("NAME", "HOLDER", "LABEL", "FENCE", "HELD FOR", "TTL LEFT", "WAITERS")]
    for info in found:
        rows.append(
            (
                info.name,
                info.holder or "?",
                info.label or "-",
                str(info.fence),
                "?" if info.acquired_at is None else age(now - info.acquired_at),
                "-" if info.ttl_left is None else f"{info.ttl_left:.1f}s",
                "?" if info.waiters is None else str(info.waiters),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(f"{len(found)} lock(s) held")
    return lines


def age(seconds: float) -> str:
    """A duration for people: ``4.2s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    if seconds < 60:
        return f"{max(0.0, seconds):.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"
