"""Two-phase commit under coordinator crashes, with real processes and real Redis / etcd.

A coordinator process runs transactions over three KVParticipants and is SIGKILLed at
one failpoint: after the record, after some prepares, after the decision, after some
commits. Another process (this one) then runs ``recover()`` and the checker asserts:
every transaction ended with all participants in the same state, the same as the log's
decision; every commit acknowledged to the caller is committed; money is conserved;
nothing is left in doubt (no unfinished record, no prepared state at a participant).

The negative control is a coordinator that sends commit *before* logging the decision
(:class:`EarlyCommit`, one overridden method): killed between the two, recovery finds no
decision and aborts, and the checker must report the participant that already committed.

Run as a script, this module is the coordinator process (``worker_main``); other fault
suites may reuse it, with ``--mutant`` for the broken coordinator.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import dcoord
from dcoord.participants import KVParticipant
from dcoord.twopc import Coordinator

ROOT = Path(__file__).resolve().parents[2]
PARTICIPANTS = ("p1", "p2", "p3")
TX_TIMEOUT = 1.0  # recovery may abort an undecided transaction this long after it began
KILL_AT_TX = 2  # the first two transactions are acknowledged before the kill
LOCK_TTL = 2.0  # etcd's minimum lease


# -- the coordinator process -----------------------------------------------------------


class EarlyCommit(Coordinator):
    """BROKEN on purpose: tells participants to commit before the decision is logged."""

    def _commit_decision(self, stored: Any) -> Any:
        for name in stored.record.participants:
            self._deliver(name, stored.record.txid, "committed")
        return super()._commit_decision(stored)


def participants(client: dcoord.Client) -> list[KVParticipant]:
    return [KVParticipant(client, name, lock_ttl=LOCK_TTL) for name in PARTICIPANTS]


def payloads(i: int, txid: str) -> dict[str, Any]:
    """Transaction i moves one unit p1 -> p2 and marks all three participants."""
    marker = {f"m{i}": txid}
    return {
        "p1": {"add": {"bal": -1}, "set": marker},
        "p2": {"add": {"bal": 1}, "set": marker},
        "p3": {"set": marker},
    }


def worker_main(argv: list[str]) -> None:
    """Run transactions, printing ``TX`` before and ``ACK`` after each commit; SIGKILL
    ourselves at the first hit of ``--point`` within transaction ``--kill-at``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("--point", required=True)
    parser.add_argument("--transactions", type=int, default=KILL_AT_TX + 2)
    parser.add_argument("--kill-at", type=int, default=KILL_AT_TX)
    parser.add_argument("--mutant", action="store_true")
    args = parser.parse_args(argv)
    current: list[int] = [-1]

    def failpoint(point: str, txid: str, participant: str | None) -> None:
        if point == args.point and current[0] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    with dcoord.connect(args.url, namespace=args.namespace) as client:
        kind = EarlyCommit if args.mutant else Coordinator
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            coord = kind(client, participants(client), failpoint=failpoint)
        for i in range(args.transactions):
            current[0] = i
            tx = coord.begin(timeout=TX_TIMEOUT)
            print(f"TX {i} {tx.txid}", flush=True)
            for name, payload in payloads(i, tx.txid).items():
                tx.enlist(name, payload)
            try:
                tx.commit()
            except dcoord.TransactionAborted:
                print(f"ABORTED {i} {tx.txid}", flush=True)
                continue
            print(f"ACK {i} {tx.txid}", flush=True)
    print("DONE", flush=True)


# -- the checker -----------------------------------------------------------------------


@dataclass
class Run:
    started: dict[int, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    killed: bool = False


def run_worker(url: str, namespace: str, point: str, *, mutant: bool = False) -> Run:
    command = [sys.executable, __file__, url, namespace, "--point", point]
    if mutant:
        command.append("--mutant")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = Run(killed=proc.returncode == -signal.SIGKILL)
    for line in out.splitlines():
        word, *rest = line.split()
        if word == "TX":
            run.started[int(rest[0])] = rest[1]
        elif word == "ACK":
            run.acked.add(rest[1])
    return run


def recover_all(client: dcoord.Client, deadline: float = 20.0) -> list[dcoord.RecoveryReport]:
    """Recover until nothing is pending (undecided ones wait for their deadline)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        coord = client.coordinator(participants=participants(client))
    reports = []
    stop = time.monotonic() + deadline
    while True:
        report = coord.recover()
        reports.append(report)
        if not report.pending or time.monotonic() > stop:
            return reports
        time.sleep(0.2)


def violations(client: dcoord.Client, run: Run) -> list[str]:
    """Every way the end state breaks atomicity, durability of acks, or leaves doubt."""
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcoord.DurabilityWarning)
        log = client.coordinator(participants=[])
    parts = {p.name: p for p in participants(client)}
    state = {name: p.items() for name, p in parts.items()}
    for i, txid in run.started.items():
        applied = {name for name in parts if state[name].get(f"m{i}") == txid}
        outcome = log.resolve(txid)
        if applied and applied != set(parts):
            problems.append(f"tx {i} applied only at {sorted(applied)} (log: {outcome})")
        if (outcome == "committed") != bool(applied):
            problems.append(f"tx {i}: log says {outcome} but applied at {sorted(applied)}")
        if txid in run.acked and outcome != "committed":
            problems.append(f"tx {i} was acknowledged to the caller but ended {outcome}")
    if state["p1"].get("bal", 0) + state["p2"].get("bal", 0) != 0:
        problems.append(f"money not conserved: p1 {state['p1']} p2 {state['p2']}")
    for name, p in parts.items():
        if p.in_doubt():
            problems.append(f"{name} still has prepared transactions {p.in_doubt()}")
    unfinished = [r.txid for r in log.transactions() if not r.state.finished]
    if unfinished:
        problems.append(f"unfinished in the log: {unfinished}")
    return problems


# -- the tests -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["after_record", "after_prepare", "after_decision", "after_commit"]
)
def test_killed_coordinator_is_recovered_by_another_process(
    real_backend_url: str, point: str
) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    run = run_worker(real_backend_url, namespace, point)
    assert run.killed, "the coordinator was not killed at the failpoint"
    assert len(run.acked) == KILL_AT_TX  # the earlier ones were acknowledged
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        reports = recover_all(client)
        assert all(r.clean for r in reports), reports
        assert violations(client, run) == []
        victim = run.started[KILL_AT_TX]
        decided = point in ("after_decision", "after_commit")
        expected = "committed" if decided else "aborted"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dcoord.DurabilityWarning)
            assert client.coordinator().resolve(victim) == expected
        recovered = {t for r in reports for t in (*r.committed, *r.aborted)}
        assert victim in recovered


@pytest.mark.slow
def test_negative_control_commit_before_logging_is_caught(real_backend_url: str) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    run = run_worker(real_backend_url, namespace, "after_commit", mutant=True)
    assert run.killed
    with dcoord.connect(real_backend_url, namespace=namespace) as client:
        recover_all(client)
        problems = violations(client, run)
    assert any(f"tx {KILL_AT_TX} applied only at ['p1']" in p for p in problems), problems


if __name__ == "__main__":
    worker_main(sys.argv[1:])
