"""The transfers workload: two-phase-commit bank transfers over three KVParticipants.

Accounts ``acct-0`` .. ``acct-8`` start with 100 each and live at participant
``bank-(i % 3)``. Every worker is a coordinator process (its own client, its own
``KVParticipant`` objects: their state is in the backend) that loops::

    pick two accounts and an amount
    one transaction: debit at the source's bank, credit at the destination's bank, and a
    marker key ``tx/<txid>`` at every bank enlisted (set at commit only, so the marker
    tells the checker which participants committed)
    now and then: coord.recover(), racing the other coordinators as in production

A bank votes no when a balance would go negative (validation), on a key conflict
(wait-die) or when its key lock stays taken; those aborts are ordinary ``fail``
results. The nemesis kills and pauses coordinators mid-transaction. After healing the
runner recovers until nothing is pending, then checks the end state (checkers.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import dcoord
import dcoord.aio
from dcoord.aio import AsyncKVParticipant
from dcoord.participants import KVParticipant
from dcoord.twopc import FAILPOINTS

from . import checkers
from .history import OK, UNKNOWN, History, Recorder
from .workloads import Failpoint, Spec, backoff, open_worker, recorder_and_rng

BANKS = ("bank-0", "bank-1", "bank-2")
ACCOUNTS = tuple(f"acct-{i}" for i in range(9))
INITIAL = 100
MARKER = "tx/"


def home(account: str) -> str:
    return BANKS[int(account.split("-")[1]) % len(BANKS)]


def tx_timeout(ttl: float) -> float:
    """The transactions' deadline: past it, recovery may abort an undecided one."""
    return max(2.0, 2 * ttl)


def non_negative(new: Mapping[str, Any]) -> bool:
    return all(v >= 0 for k, v in new.items() if k.startswith("acct-"))


def banks(client: dcoord.Client, ttl: float) -> list[KVParticipant]:
    return [
        KVParticipant(
            client, name, validate=non_negative, lock_ttl=ttl, lock_timeout=tx_timeout(ttl) / 2
        )
        for name in BANKS
    ]


def coordinator(client: dcoord.Client, ttl: float, failpoint: Failpoint | None = None) -> Any:
    """A coordinator over the three banks; a thread worker's ``failpoint`` also runs at
    the protocol's own failpoints (after the record, a prepare, the decision, a commit),
    so that a pause or a kill lands mid-transaction as a signal would."""
    hook = None if failpoint is None else (lambda point, txid, bank: failpoint(point))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        return client.coordinator(
            participants=banks(client, ttl),
            phase2_timeout=tx_timeout(ttl),
            workers=8,
            failpoint=hook,
        )


def payloads(src: str, dst: str, amount: int, txid: str) -> dict[str, dict[str, Any]]:
    """What each enlisted bank does; a transfer within one bank enlists it once."""
    out: dict[str, dict[str, Any]] = {}
    for account, delta in ((src, -amount), (dst, amount)):
        bank = out.setdefault(home(account), {"add": {}, "set": {MARKER + txid: 1}})
        bank["add"][account] = delta
    return out


def begin(coord: Any, src: str, dst: str, amount: int, ttl: float) -> tuple[Any, dict[str, Any]]:
    """A transfer's transaction (sync or async: enlisting is sync on both) and what the
    history records of it."""
    tx = coord.begin(timeout=tx_timeout(ttl))
    plan = payloads(src, dst, amount, tx.txid)
    for name, payload in plan.items():
        tx.enlist(name, payload)
    value = {"txid": tx.txid, "from": src, "to": dst, "amount": amount, "banks": sorted(plan)}
    return tx, value


def transfer(coord: Any, rec: Recorder, src: str, dst: str, amount: int, ttl: float) -> str:
    """One recorded transfer; returns its result."""
    tx, value = begin(coord, src, dst, amount, ttl)
    with rec.invoke("transfer", value) as op:
        tx.commit()
    assert op.result is not None
    return op.result


def commit_before_log(coord: Any) -> None:
    """The commit-before-log mutant: participants hear commit before the log has it."""
    decide = coord._commit_decision

    def early(self: Any, stored: Any) -> Any:
        for name in stored.record.participants:
            self._deliver(name, stored.record.txid, "committed")
        return decide(stored)

    coord._commit_decision = types.MethodType(early, coord)


def transfers_worker(
    spec: Spec,
    stop: threading.Event,
    failpoint: Failpoint | None = None,
    connected: Callable[[dcoord.Client], None] | None = None,
) -> None:
    """A coordinator looping over random transfers until ``stop`` is set; with
    ``aio`` in the spec's extra, the odd slots' workers are async (:func:`aio_worker`)."""
    if (spec.extra or {}).get("aio") and is_async_slot(spec.process):
        asyncio.run(aio_worker(spec, stop, failpoint))
        return
    rec, rng, client = open_worker(spec, connected)
    coord = coordinator(client, spec.ttl, failpoint)
    if spec.mutant == "commit-before-log":
        commit_before_log(coord)
    next_recovery = time.monotonic() + rng.uniform(1.0, 3.0)
    try:
        while not stop.is_set():
            if failpoint is not None:
                failpoint("transfer")
            src, dst = rng.sample(ACCOUNTS, 2)
            if transfer(coord, rec, src, dst, rng.randint(1, 30), spec.ttl) == UNKNOWN:
                backoff(rng)
            if time.monotonic() >= next_recovery:
                next_recovery = time.monotonic() + rng.uniform(1.0, 3.0)
                if failpoint is not None:
                    failpoint("recover")
                with rec.invoke("recover") as op:
                    op.ok(str(coord.recover()))
    finally:
        rec.close()
        client.close()


def is_async_slot(process: str) -> bool:
    """Workers ``c1``, ``c3``, ... (and their restarts ``c1.2``) run on dcoord.aio."""
    return int(process[1:].split(".")[0]) % 2 == 1


async def aio_worker(spec: Spec, stop: threading.Event, failpoint: Failpoint | None) -> None:
    """:func:`transfers_worker` on dcoord.aio: an AsyncCoordinator over
    AsyncKVParticipants of the same banks, racing the sync workers on one log and one
    set of keys. A pause blocks its loop at a failpoint, as SIGSTOP stops a process."""
    rec, rng = recorder_and_rng(spec)
    client = await dcoord.aio.connect(
        spec.url, namespace=spec.namespace, request_timeout=spec.request_timeout
    )
    hook = None if failpoint is None else (lambda point, txid, bank: failpoint(point))
    parts = [
        AsyncKVParticipant(
            client,
            name,
            validate=non_negative,
            lock_ttl=spec.ttl,
            lock_timeout=tx_timeout(spec.ttl) / 2,
        )
        for name in BANKS
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        coord = await client.coordinator(
            participants=parts, phase2_timeout=tx_timeout(spec.ttl), failpoint=hook
        ).start()
    next_recovery = time.monotonic() + rng.uniform(1.0, 3.0)
    try:
        while not stop.is_set():
            if failpoint is not None:
                failpoint("transfer")
            src, dst = rng.sample(ACCOUNTS, 2)
            tx, value = begin(coord, src, dst, rng.randint(1, 30), spec.ttl)
            with rec.invoke("transfer", value) as op:
                await tx.commit()
            if op.result == UNKNOWN:
                await asyncio.sleep(rng.uniform(0.05, 0.2))  # as backoff(), on the loop
            if time.monotonic() >= next_recovery:
                next_recovery = time.monotonic() + rng.uniform(1.0, 3.0)
                if failpoint is not None:
                    failpoint("recover")
                with rec.invoke("recover") as op:
                    op.ok(str(await coord.recover()))
    finally:
        rec.close()
        await client.close()


def read_state(client: dcoord.Client, ttl: float) -> dict[str, Any]:
    """Balances, markers, prepared states and reservations per bank, and the log."""
    coord = coordinator(client, ttl)
    state: dict[str, Any] = {"banks": {}, "log": {}}
    for bank in banks(client, ttl):
        reserved = bank.reserved()
        state["banks"][bank.name] = {
            "items": bank.items(),
            "in_doubt": bank.in_doubt(),
            "reserved": sorted(reserved),
        }
    for record in coord.transactions():
        state["log"][record.txid] = {"state": str(record.state), "outcome": record.outcome}
    return state


class TransfersWorkload:
    """2PC transfers: worker, liveness probe (recover, then a new transfer), checks."""

    name = "transfers"

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.pause_scale = tx_timeout(ttl)
        self.points: tuple[str, ...] = (*FAILPOINTS, "recover")

    def worker(self) -> Callable[..., None]:
        return transfers_worker

    def busy(self, event: dict[str, Any]) -> bool:
        return (event.get("f"), event.get("type")) == ("transfer", "invoke")

    def liveness_bound(self) -> float:
        """Undecided transactions wait out their deadline, then recovery finishes them."""
        return tx_timeout(self.ttl) + 3 * self.ttl + 5.0

    def prepare(self, client: dcoord.Client) -> None:
        """Open the accounts in one transaction."""
        coord = coordinator(client, self.ttl)
        tx = coord.begin(timeout=30.0)
        for bank in BANKS:
            tx.enlist(bank, {"set": {a: INITIAL for a in ACCOUNTS if home(a) == bank}})
        tx.commit()

    def probe(self, client: dcoord.Client, rec: Recorder, bound: float) -> None:
        """After healing: recovery leaves nothing in doubt, and a new transfer commits."""
        coord = coordinator(client, self.ttl)
        deadline = time.monotonic() + bound
        with rec.invoke("recover-all") as op:
            while True:
                report = coord.recover()
                if report.clean and not report.pending:
                    op.ok(str(report))
                    break
                if time.monotonic() > deadline:
                    op.fail(str(report))
                    break
                time.sleep(0.2)
        balances: dict[str, int] = {}
        for bank in banks(client, self.ttl):
            balances.update({k: v for k, v in bank.items().items() if k.startswith("acct-")})
        richest = max(ACCOUNTS, key=lambda a: balances.get(a, 0))
        poorest = min(ACCOUNTS, key=lambda a: balances.get(a, 0))
        transfer(coord, rec, richest, poorest, 1, self.ttl)

    def final_state(self, client: dcoord.Client) -> dict[str, Any]:
        return read_state(client, self.ttl)

    def check(
        self, history: History, final: dict[str, Any], losses: list[tuple[float, float]]
    ) -> tuple[list[checkers.Violation], dict[str, Any]]:
        violations = checkers.transactions(
            history, final, {a: INITIAL for a in ACCOUNTS}, home, MARKER
        )
        ops = history.by_f("transfer")
        committed = sum(1 for op in ops if op.result == OK)
        aborted = sum(1 for op in ops if op.result == "fail")
        unknown = sum(1 for op in ops if op.result == UNKNOWN)
        recoveries = sum(1 for op in history.by_f("recover") if op.ok)
        findings = {
            "transfers": f"{committed} committed, {aborted} aborted, {unknown} unknown "
            f"({len(final['log'])} log records, {recoveries} recover() calls by workers)",
            "total balance": sum(
                v
                for bank in final["banks"].values()
                for k, v in bank["items"].items()
                if k.startswith("acct-")
            ),
        }
        return violations, findings
