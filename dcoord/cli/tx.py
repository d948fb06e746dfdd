"""``dcoord tx``: look at and finish two-phase-commit transactions, for operators.

dcoord tx list [--state S] [--limit N] [--cursor C] [--newest]
                                one page of retained transactions in creation order
                                (oldest first unless --newest), with age; the next
                                page's cursor is printed last (on stderr with --json)
dcoord tx list --all [--state S]
                                every retained transaction: unfinished (stuck past the
                                deadline first) before finished, oldest first; reads the
                                whole log, so mind its size
dcoord tx show TXID             one record in full
dcoord tx recover [--kv NAMES]  drive unfinished transactions to their end
dcoord tx resolve TXID          the outcome; aborts an undecided one past its deadline

A txid that is not in the log is presumed aborted by ``show`` and ``resolve`` alike
(presumed abort: it was never logged, or it finished and its record passed retention);
neither treats it as an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from .. import txlog
from ..client import Client
from ..errors import DurabilityWarning
from ..participants import KVParticipant
from ..twopc import Coordinator, Participant
from ..txlog import TxRecord, TxState
from .common import FAILURE, connect_to, global_options, print_json
from .locks import age

#: Transactions per page of ``tx list``.
LIST_LIMIT = 100
NOT_IN_LOG = (
    "not in the log: presumed aborted (never logged, or finished and removed after its retention)"
)
PRESUMED = (
    "A TXID that is not in the log is presumed aborted (it was never logged, or it "
    "finished and its record passed retention): tx show and tx resolve both say so, "
    "and neither treats it as an error."
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tx`` and its subcommands."""
    parser = subparsers.add_parser("tx", help="list, show, recover and resolve transactions")
    global_options(parser, backend=True)
    commands = parser.add_subparsers(title="tx commands", metavar="ACTION", required=True)

    listing = commands.add_parser(
        "list",
        help="list retained transactions, a page at a time",
        description=(
            "List one page of retained transactions in creation order (oldest first, or "
            "newest first with --newest). When there are more, the last line gives the "
            "--cursor of the next page (on stderr with --json, whose output stays a JSON "
            "list). A page costs the same however long the log is; --all reads it whole."
        ),
    )
    listing.add_argument(
        "--state", choices=[s.value for s in TxState], help="only transactions in this state"
    )
    listing.add_argument(
        "--limit",
        type=int,
        default=LIST_LIMIT,
        help=f"transactions per page (default {LIST_LIMIT})",
    )
    listing.add_argument("--cursor", help="where the page starts (printed after the last one)")
    listing.add_argument("--newest", action="store_true", help="newest first")
    listing.add_argument(
        "--all",
        action="store_true",
        help="every retained transaction, unfinished (stuck first) before finished",
    )
    listing.set_defaults(func=run, action="list")

    show = commands.add_parser(
        "show",
        help="show one transaction record",
        description=f"Show the log record of TXID. {PRESUMED}",
    )
    show.add_argument("txid")
    show.set_defaults(func=run, action="show")

    recover = commands.add_parser(
        "recover",
        help="finish unfinished transactions",
        description=(
            "Abort undecided transactions past their deadline and re-send decisions that "
            "were not acknowledged. Only participants named with --kv (KVParticipants, "
            "whose state is in the backend) can be reached from here; transactions with "
            "others are decided but left for the application's own recover(). Exits "
            "with 1 when something was left unfinished."
        ),
    )
    recover.add_argument(
        "--kv", default="", metavar="NAME,...", help="KVParticipant names to drive"
    )
    recover.set_defaults(func=run, action="recover")

    resolve = commands.add_parser(
        "resolve",
        help="print a transaction's outcome (records abort past its deadline)",
        description=(
            "Print the outcome of TXID: committed, aborted, or pending (undecided and "
            "within its deadline). An undecided transaction past its deadline is aborted "
            f"in the log first, so the answer is final. {PRESUMED}"
        ),
    )
    resolve.add_argument("txid")
    resolve.set_defaults(func=run, action="resolve")

    for sub in (listing, show, recover, resolve):
        global_options(sub, backend=True)
    for sub in (listing, show, recover, resolve):
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    """Run one ``tx`` action; exit code 1 when recovery left something unfinished."""
    with connect_to(args, f"tx {args.action}") as client:
        participants: list[Participant] = []
        if args.action == "recover":
            names = [n.strip() for n in args.kv.split(",") if n.strip()]
            participants = [KVParticipant(client, name) for name in names]
        coord = quiet_coordinator(client, participants)
        if args.action == "list":
            return _list(coord, args)
        if args.action == "show":
            found = coord.get(args.txid)
            if args.json:
                print_json(_missing(args.txid) if found is None else record_json(found))
            else:
                print(
                    f"txid          {args.txid}\n{NOT_IN_LOG}"
                    if found is None
                    else _describe(found)
                )
            return 0
        if args.action == "resolve":
            outcome = coord.resolve(args.txid)
            if args.json:
                # Read after resolving: resolve may just have recorded the abort.
                in_log = coord.get(args.txid) is not None
                print_json({"txid": args.txid, "outcome": outcome, "in_log": in_log})
            else:
                print(outcome)
            return 0
        report = coord.recover()
        if args.json:
            print_json({**dataclasses.asdict(report), "clean": report.clean})
            return 0 if report.clean else FAILURE
        print(report)
        for txid, why in {**report.incomplete, **report.corrupted}.items():
            print(f"  {txid}: {why}")
        return 0 if report.clean else FAILURE


def _list(coord: Coordinator, args: argparse.Namespace) -> int:
    now = time.time()
    if args.all:
        records: list[TxRecord] = in_doubt_first(coord.transactions(state=args.state), now)
        cursor = None
    else:
        page = coord.transactions(
            state=args.state, limit=args.limit, cursor=args.cursor, newest_first=args.newest
        )
        records, cursor = page, page.cursor
    more = (
        ""
        if cursor is None
        else f"next page: --cursor '{cursor}'{' --newest' if args.newest else ''}"
    )
    if args.json:
        print_json([record_json(r) for r in records])
        if more:
            print(more, file=sys.stderr)
        return 0
    print(f"{'txid':<32}  {'state':<10}  {'created (UTC)':<19}  {'age':>7}  participants")
    for record in records:
        stuck = " (stuck: past its deadline)" if is_stuck(record, now) else ""
        print(
            f"{record.txid:<32}  {record.state.value:<10}  {_time(record.created)}"
            f"  {age(now - record.created):>7}  {','.join(record.participants)}{stuck}"
        )
    print(f"{len(records)} transaction(s)" + (f"; {more}" if more else ""))
    return 0


def in_doubt_first(records: list[TxRecord], now: float) -> list[TxRecord]:
    """Unfinished records before finished ones, those stuck past their deadline first:
    what an operator has to look at comes at the top (oldest first within each part)."""
    return sorted(records, key=lambda r: (r.state.finished, not is_stuck(r, now), r.created))


def is_stuck(record: TxRecord, now: float) -> bool:
    # Unfinished past its deadline: recovery should have ended it (by this clock).
    return not record.state.finished and record.expired(now)


def record_json(record: TxRecord) -> dict[str, Any]:
    """A record as the log stores it, plus its outcome and ``"in_log": true``."""
    doc: dict[str, Any] = json.loads(txlog.encode(record))
    doc.update(outcome=record.outcome, in_log=True)
    return doc


def _missing(txid: str) -> dict[str, Any]:
    return {"txid": txid, "in_log": False, "state": None, "outcome": "aborted"}


def quiet_coordinator(client: Client, participants: Sequence[Participant]) -> Coordinator:
    """A coordinator for operators' commands (``tx``, ``status``): no durability warning."""
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
