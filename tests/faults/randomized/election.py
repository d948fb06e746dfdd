"""The election workload: the fenced counter, written by whoever leads an election.

Every worker loops::

    campaign in election "counter"                -> term T   (recorded as "acquire")
    read the leader                               it must be us, with term T ("leader")
    admit T, read, work, write unfenced, write fenced with T   (as the counter workload)
    resign                                        ok only if we led until now ("release")

Recording a campaign as an acquire and a resignation as a release lets the lock
checkers judge leadership as they judge locks: terms are unique and increase
(lock-fences), no two confirmed leaders overlap (mutual-exclusion), the fenced counter
stays exact. :func:`tests.faults.randomized.checkers.leader_terms` adds what only an
election has: a term read back from ``leader()`` names the process elected in it, and
leader reads never go back to an older term.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import dcoord

from . import checkers
from .history import OK, UNKNOWN, History, Recorder
from .workloads import (
    LOCK,
    CounterWorkload,
    Failpoint,
    Spec,
    _critical_section,
    _no_failpoint,
    backoff,
    open_worker,
)


def election_worker(
    spec: Spec,
    stop: threading.Event,
    failpoint: Failpoint = _no_failpoint,
    connected: Callable[[dcoord.Client], None] | None = None,
) -> None:
    """The election loop, until ``stop`` is set."""
    from . import mutants

    rec, rng, client = open_worker(spec, connected)
    mutants.apply(spec.mutant, client)
    election = client.election(LOCK)
    kv = client.backend.kv
    guard = client.fence(LOCK)
    try:
        while not stop.is_set():
            failpoint("acquire")
            with rec.invoke("acquire") as op:
                lead = election.campaign(spec.process, ttl=spec.ttl, timeout=spec.acquire_timeout)
                if lead is None:
                    op.fail()
                else:
                    op.ok({"fence": lead.term})
            if op.result == UNKNOWN:
                backoff(rng)
            if op.result != OK or lead is None:
                continue
            read_leader(rec, election)
            if not _critical_section(spec, rec, rng, kv, guard, lead.term, failpoint):
                backoff(rng)
            failpoint("release")
            with rec.invoke("release", {"fence": lead.term}) as op:
                if not lead.resign():
                    op.fail()
    finally:
        rec.close()
        client.close()


def read_leader(rec: Recorder, election: Any) -> None:
    with rec.invoke("leader") as op:
        leader = election.leader()
        op.ok(None if leader is None else {"term": leader.term, "value": leader.value})


class ElectionWorkload(CounterWorkload):
    """The fenced counter written by the leader of an election."""

    name = "election"

    def worker(self) -> Callable[..., None]:
        return election_worker

    def busy(self, event: dict[str, Any]) -> bool:
        return event.get("f") == "leader" or super().busy(event)

    def probe(self, client: dcoord.Client, rec: Recorder, bound: float) -> None:
        """After healing: a new client is elected within ``bound`` and resigns."""
        election = client.election(LOCK)
        with rec.invoke("acquire") as op:
            lead = election.campaign("liveness", ttl=self.ttl, timeout=bound)
            if lead is None:
                op.fail()
            else:
                op.ok({"fence": lead.term})
        if lead is None:
            return
        read_leader(rec, election)
        with rec.invoke("release", {"fence": lead.term}) as op:
            if not lead.resign():
                op.fail()

    def check(
        self, history: History, final: dict[str, Any], losses: list[tuple[float, float]]
    ) -> tuple[list[checkers.Violation], dict[str, Any]]:
        violations, findings = super().check(history, final, losses)
        terms = {op.out["fence"] for op in history.by_f("acquire") if op.ok}
        findings["terms"] = f"{len(terms)} elected, {len(history.by_f('leader'))} leader reads"
        return [*violations, *checkers.leader_terms(history)], findings
