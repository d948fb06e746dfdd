"""``dcoord members GROUP``: list a group's live members (and, with --watch, follow them)."""

from __future__ import annotations

import argparse
import json
import queue
import sys
from typing import TextIO

from ..membership import GroupView
from .common import connect_to, global_options


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``members`` command."""
    parser = subparsers.add_parser(
        "members",
        help="list the live members of a group",
        description=(
            "Print the live members of GROUP with their weight and metadata, and the "
            "membership epoch. With --watch, print the member set again on every change."
        ),
    )
    parser.add_argument("group", metavar="GROUP", help="the group name")
    global_options(parser, backend=True)
    parser.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per member set: {"group", "epoch", "members": {id: {"weight", '
        '"meta"}}}',
    )
    parser.add_argument(
        "--watch", action="store_true", help="keep printing the member set on every change"
    )
    parser.add_argument(
        "--count",
        type=int,
        metavar="N",
        help="with --watch, stop after N member sets (default: until interrupted)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with connect_to(args, "members") as client:
        group = client.group(args.group)
        if not args.watch:
            show(group.name, group.view(), args.json, sys.stdout)
            return 0
        views: queue.Queue[GroupView] = queue.Queue()
        with group.watch(views.put):
            shown = 0
            while args.count is None or shown < args.count:
                show(group.name, views.get(), args.json, sys.stdout)
                shown += 1
    return 0


def show(name: str, view: GroupView, as_json: bool, out: TextIO) -> None:
    """Print one member set, as text or as one JSON line."""
    if as_json:
        members = {m.id: {"weight": m.weight, "meta": dict(m.meta)} for m in view.values()}
        print(json.dumps({"group": name, "epoch": view.epoch, "members": members}), file=out)
    else:
        count = len(view)
        print(
            f"group {name!r} (epoch {view.epoch}): {count} live member{'s' * (count != 1)}",
            file=out,
        )
        width = max((len(member_id) for member_id in view), default=0)
        for member_id in sorted(view):
            member = view[member_id]
            meta = json.dumps(dict(member.meta), sort_keys=True)
            print(f"  {member_id:<{width}}  weight {member.weight:g}  {meta}", file=out)
    out.flush()
