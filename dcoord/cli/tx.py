"""``dcoord tx``: look at and finish two-phase-commit transactions, for operators.

dcoord tx list [--state S]      every retained transaction, oldest first
dcoord tx show TXID             one record in full
dcoord tx recover [--kv NAMES]  drive unfinished transactions to their end
dcoord tx resolve TXID          the outcome; aborts an undecided one past its deadline
"""

from __future__ import annotations

import argparse
import datetime
import warnings
from collections.abc import Sequence

from ..client import Client, connect
from ..errors import ConfigError, DurabilityWarning
from ..participants import KVParticipant
from ..twopc import Coordinator, Participant
from ..txlog import TxRecord, TxState
from .common import url_argument


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tx`` and its subcommands."""
    parser = subparsers.add_parser("tx", help="list, show, recover and resolve transactions")
    commands = parser.add_subparsers(title="tx commands", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help="list retained transactions")
    listing.add_argument(
        "--state", choices=[s.value for s in TxState], help="only transactions in this state"
    )
    listing.set_defaults(func=run, action="list")

    show = commands.add_parser("show", help="show one transaction record")
    show.add_argument("txid")
    show.set_defaults(func=run, action="show")

    recover = commands.add_parser(
        "recover",
        help="finish unfinished transactions",
        description=(
            "Abort undecided transactions past their deadline and re-send decisions that "
            "were not acknowledged. Only participants named with --kv (KVParticipants, "
            "whose state is in the backend) can be reached from here; transactions with "
            "others are decided but left for the application's own recover()."
        ),
    )
    recover.add_argument(
        "--kv", default="", metavar="NAME,...", help="KVParticipant names to drive"
    )
    recover.set_defaults(func=run, action="recover")

    resolve = commands.add_parser(
        "resolve", help="print a transaction's outcome (records abort past its deadline)"
    )
    resolve.add_argument("txid")
    resolve.set_defaults(func=run, action="resolve")

    for sub in (listing, show, recover, resolve):
        url_argument(sub)


def run(args: argparse.Namespace) -> int:
    """Run one ``tx`` action; exit code 1 when recovery left something unfinished."""
    with connect(args.url, namespace=args.namespace) as client:
        participants: list[Participant] = []
        if args.action == "recover":
            names = [n.strip() for n in args.kv.split(",") if n.strip()]
            participants = [KVParticipant(client, name) for name in names]
        coord = _coordinator(client, participants)
        if args.action == "list":
            records = coord.transactions(state=args.state)
            print(f"{'txid':<32}  {'state':<10}  {'created (UTC)':<19}  participants")
            for record in records:
                print(
                    f"{record.txid:<32}  {record.state.value:<10}  {_time(record.created)}"
                    f"  {','.join(record.participants)}"
                )
            print(f"{len(records)} transaction(s)")
            return 0
        if args.action == "show":
            found = coord.get(args.txid)
            if found is None:
                raise ConfigError(f"no transaction {args.txid!r} in the log (presumed aborted)")
            print(_describe(found))
            return 0
        if args.action == "resolve":
            print(coord.resolve(args.txid))
            return 0
        report = coord.recover()
        print(report)
        for txid, why in {**report.incomplete, **report.corrupted}.items():
            print(f"  {txid}: {why}")
        return 0 if report.clean else 1


def _coordinator(client: Client, participants: Sequence[Participant]) -> Coordinator:
    # An operator looking at the log needs no durability lecture on every command.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DurabilityWarning)
        return client.coordinator(participants=participants)


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _describe(record: TxRecord) -> str:
    lines = [
        f"txid          {record.txid}",
        f"state         {record.state.value}",
        f"outcome       {record.outcome or 'undecided (presumed abort after the deadline)'}",
        f"created       {_time(record.created)} UTC by {record.coordinator or '?'}",
        f"deadline      {_time(record.deadline)} UTC",
        f"decided at    {_time(record.decided_at)}",
        f"reason        {record.reason or '-'}",
        "participants:",
    ]
    for name in record.participants:
        acked = "acknowledged" if name in record.acks else "not acknowledged"
        lines.append(f"  {name:<20} {acked:<17} payload {record.digests.get(name, '?')}")
    return "\n".join(lines)
