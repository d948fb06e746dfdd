"""``dcoord demo``: bank transfers as two-phase commits, checked at the end.

Accounts are spread over three :class:`~dcoord.KVParticipant` banks by a
:class:`~dcoord.HashRing`; worker threads make random transfers, each a 2PC transaction
over the two banks involved. With ``--crash`` a second coordinator dies mid-flight: it is
stopped dead at each protocol failpoint in turn (a thread that stops at a failpoint,
like a killed process it sends nothing more and cleans nothing up — on the embedded
backend there is no other process to kill; the real SIGKILL runs are in tests/faults).
Recovery then finishes its work. The demo exits non-zero unless the total balance is
unchanged and nothing is left in doubt.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..client import Client, connect
from ..errors import ConfigError, DurabilityWarning, TransactionAborted
from ..participants import KVParticipant
from ..ring import HashRing
from ..twopc import Coordinator, RecoveryReport, Transaction
from .common import connect_to, global_options

BANKS = ("bank-a", "bank-b", "bank-c")
OPENING_BALANCE = 100
SEED_CHUNK = 40  # keys per seeding transaction: etcd caps the operations of one txn
CRASH_POINTS = ("after_record", "after_prepare", "after_decision", "after_commit")
CRASH_TIMEOUT = 1.0  # deadline of the crashed transactions: recovery may abort after it


class CoordinatorDied(BaseException):
    """Raised at a failpoint: no handler catches it, so the coordinator stops dead."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="bank transfers as two-phase commits, self-checking (no server needed)",
        description=(
            "Spread accounts over three banks (KV participants) with a consistent-hash "
            "ring and make random transfers between them from worker threads, each a "
            "two-phase commit over the banks involved. With --crash, a second "
            "coordinator dies at each protocol failpoint in turn and recovery finishes "
            "its work. Exits with 1 unless the total balance is unchanged and nothing is "
            "left in doubt. Runs on the embedded memory:// backend unless --url or "
            "$DCOORD_URL names another (in its own namespace, demo-<random>)."
        ),
    )
    global_options(parser, backend=True)
    parser.add_argument("--accounts", type=int, default=30, help="accounts (default 30)")
    parser.add_argument("--transfers", type=int, default=200, help="transfers (default 200)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument(
        "--crash", action="store_true", help="kill a coordinator mid-flight and recover"
    )
    parser.add_argument("--seed", type=int, help="random seed (default: random)")
    parser.set_defaults(func=run)


@dataclass
class Tally:
    committed: int = 0
    aborted: int = 0
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def count(self, committed: bool) -> None:
        with self.mutex:
            if committed:
                self.committed += 1
            else:
                self.aborted += 1


def run(args: argparse.Namespace) -> int:
    for name in ("accounts", "transfers", "workers"):
        least = 2 if name == "accounts" else 1
        if getattr(args, name) < least:
            raise ConfigError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    rng = random.Random(args.seed)
    namespace = args.namespace or f"demo-{uuid.uuid4().hex[:8]}"
    with connect_to(args, "demo", shared=False, namespace=namespace) as client:
        info = client.ping()
        print(f"backend: {info.kind} {info.version} at {info.endpoint}, namespace {namespace}")
        accounts = [f"acct-{i:04d}" for i in range(args.accounts)]
        ring = HashRing(BANKS)
        home = {account: ring.node_for(account) for account in accounts}
        shares = ", ".join(f"{b}: {list(home.values()).count(b)}" for b in BANKS)
        print(f"ring: {args.accounts} accounts over {len(BANKS)} banks ({shares})")

        banks = _banks(client)
        coord = _coordinator(client, banks.values(), retention=600)
        _seed(coord, home)
        total = OPENING_BALANCE * len(accounts)
        with client.lock("demo:audit", ttl=5) as audit:
            print(f"lock: held 'demo:audit' with fence {audit.fence}; opening total {total}")

        tally = Tally()
        crashed: dict[str, str] = {}
        expected: dict[str, str] = {}
        reports: list[RecoveryReport] = []
        started = time.monotonic()
        crasher = None
        if args.crash:

            def crash_then_recover() -> None:
                _crash_run(args.url, namespace, home, rng.random(), crashed, expected)
                # The dead coordinator's undecided transactions may be aborted once their
                # deadline passed; recovery runs while the other transfers go on.
                time.sleep(CRASH_TIMEOUT)
                reports.append(_recover("recovery", client, banks, crashed))

            crasher = threading.Thread(target=crash_then_recover)
            crasher.start()
        _transfers(coord, home, args.transfers, args.workers, rng, tally)
        elapsed = time.monotonic() - started
        if crasher is not None:
            crasher.join()
        print(
            f"transfers: {tally.committed} committed, {tally.aborted} aborted in "
            f"{elapsed:.2f} s ({tally.committed / elapsed:.0f} commits/s, "
            f"{args.workers} clients)"
        )
        coord.close()  # flush its background "done" writes before the final sweep
        reports.append(_recover("final sweep", client, banks, crashed))
        return _check(client, banks, expected, total, reports)


def _banks(client: Client) -> dict[str, KVParticipant]:
    def non_negative(new: Mapping[str, Any]) -> bool:
        return all(v is None or v >= 0 for v in new.values())

    return {
        name: KVParticipant(client, name, validate=non_negative, lock_ttl=5, lock_timeout=0.5)
        for name in BANKS
    }


def _coordinator(client: Client, banks: Any, **options: Any) -> Coordinator:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DurabilityWarning)
        coord = client.coordinator(participants=list(banks), **options)
    for warning in caught[:1]:
        print(f"warning: {warning.message}")
    return coord


def _seed(coord: Coordinator, home: Mapping[str, str]) -> None:
    for bank in BANKS:
        mine = [a for a, b in home.items() if b == bank]
        for start in range(0, len(mine), SEED_CHUNK):
            chunk = mine[start : start + SEED_CHUNK]
            with coord.transaction() as tx:
                tx.enlist(bank, {"set": dict.fromkeys(chunk, OPENING_BALANCE)})


def _enlist(tx: Transaction, home: Mapping[str, str], src: str, dst: str, n: int) -> None:
    if home[src] == home[dst]:
        tx.enlist(home[src], {"add": {src: -n, dst: n}})
    else:
        tx.enlist(home[src], {"add": {src: -n}})
        tx.enlist(home[dst], {"add": {dst: n}})


def _transfers(
    coord: Coordinator,
    home: Mapping[str, str],
    count: int,
    workers: int,
    rng: random.Random,
    tally: Tally,
) -> None:
    accounts = sorted(home)
    plan = [(*rng.sample(accounts, 2), rng.randint(1, 40)) for _ in range(count)]
    chunks = [plan[i::workers] for i in range(workers)]

    def work(chunk: list[tuple[str, str, int]]) -> None:
        for src, dst, amount in chunk:
            try:
                with coord.transaction(timeout=10) as tx:
                    _enlist(tx, home, src, dst, amount)
                tally.count(True)
            except TransactionAborted:
                tally.count(False)  # insufficient funds, or lost a wait-die conflict

    threads = [threading.Thread(target=work, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _crash_run(
    url: str | None,
    namespace: str,
    home: Mapping[str, str],
    seed: float,
    crashed: dict[str, str],
    expected: dict[str, str],
) -> None:
    """A second coordinator (its own client and bank handles) that dies at each failpoint.

    ``crashed`` gets txid -> where it died; ``expected`` txid -> the outcome recovery
    must reach: abort when it died undecided, else the decision that was in the log.
    """
    rng = random.Random(seed)
    accounts = sorted(home)
    with connect(url, namespace=namespace) as client:
        for point in CRASH_POINTS:
            coord = _coordinator(client, _banks(client).values())

            def die(
                hit: str, txid: str, _: str | None, point: str = point, coord: Coordinator = coord
            ) -> None:
                if hit == point:
                    record = coord.get(txid)
                    expected[txid] = (record.outcome if record else None) or "aborted"
                    raise CoordinatorDied(f"{point} of {txid}")

            coord.failpoint = die
            src = rng.choice(accounts)
            others = [a for a in accounts if home[a] != home[src]]
            dst = rng.choice(others or [a for a in accounts if a != src])
            tx = coord.begin(timeout=CRASH_TIMEOUT)
            crashed[tx.txid] = point
            try:
                _enlist(tx, home, src, dst, 1)
                tx.commit()
            except CoordinatorDied:
                decided = "undecided" if point in CRASH_POINTS[:2] else expected[tx.txid]
                print(
                    f"crash: a coordinator died {point.replace('_', ' ')} of {tx.txid[:12]} "
                    f"({decided})"
                )
            except TransactionAborted as exc:
                crashed[tx.txid] = f"{point}, not reached: aborted"
                expected[tx.txid] = "aborted"
                print(f"crash: {tx.txid[:12]} aborted before {point}: {exc.reason}")


def _recover(
    label: str, client: Client, banks: Mapping[str, KVParticipant], crashed: Mapping[str, str]
) -> RecoveryReport:
    report = _coordinator(client, banks.values(), retention=600).recover()
    print(f"{label}: {report}")
    # Recovery also helps live transactions along (harmless: every step is idempotent or
    # a compare-and-set); show what it did for the dead coordinator's.
    for txid in report.committed:
        if txid in crashed:
            print(f"  commit finished for {txid[:12]} (died {crashed[txid]})")
    for txid in report.aborted:
        if txid in crashed:
            print(f"  aborted {txid[:12]} (died {crashed[txid]})")
    for txid in report.in_doubt_resolved:
        print(f"  resolved prepared state of {txid[:12]} at a participant")
    return report


def _check(
    client: Client,
    banks: Mapping[str, KVParticipant],
    expected: Mapping[str, str],
    total: int,
    reports: list[RecoveryReport],
) -> int:
    recoverer = _coordinator(client, banks.values())
    problems = []
    balances = {k: v for bank in banks.values() for k, v in bank.items().items()}
    if sum(balances.values()) != total:
        problems.append(f"total balance {sum(balances.values())} != {total}")
    if any(v < 0 for v in balances.values()):
        problems.append("a balance went negative")
    in_doubt = {name: bank.in_doubt() for name, bank in banks.items() if bank.in_doubt()}
    if in_doubt:
        problems.append(f"prepared and never finished: {in_doubt}")
    unfinished = [r.txid for r in recoverer.transactions() if not r.state.finished]
    final = reports[-1]
    if unfinished or not final.clean or final.pending:
        problems.append(f"unfinished transactions in the log: {unfinished or final}")
    for txid, outcome in expected.items():
        if recoverer.resolve(txid) != outcome:
            problems.append(f"{txid} should have ended {outcome} (what its log said)")
    if problems:
        for problem in problems:
            print(f"FAILED: {problem}")
        return 1
    print(f"check: total balance {total} unchanged, nothing in doubt: OK")
    return 0
