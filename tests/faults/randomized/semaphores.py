"""The semaphore workload: permits of one semaphore contended by more workers than permits.

Every worker loops::

    acquire a permit of semaphore "pool" (limit 2)   -> fence F
    ... work (20-80 ms: the window a pause lands in) ...
    release

A release that succeeds proves the server held that grant from the acquire to the
release (one id or key per grant, owner-checked), so ``[acquire completed, release
invoked]`` lies inside the server's hold: the checker counts these *confirmed holds*
and finds any instant at which more than ``limit`` overlapped. Lost permits (a paused
holder past its TTL) release with a failure and are not counted.

Negative control: ``--mutant ignore-limit`` makes each worker's backend admit up to
1000 holders whatever ``limit`` it is given; with more workers than permits the checker
must report the overlap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dcoord

from . import checkers
from .history import OK, History, Op, Recorder
from .workloads import Failpoint, Spec, backoff, open_worker

SEMAPHORE = "pool"
LIMIT = 2
MUTANT_LIMIT = 1000


def ignore_limit(client: dcoord.Client) -> None:
    """The ``ignore-limit`` mutant: this client's semaphore slots admit 1000 holders."""
    store: Any = client.backend.semaphores
    original = store.slot

    def slot(name: str, limit: int, ttl: float, auto_renew: bool) -> Any:
        return original(name, MUTANT_LIMIT, ttl, auto_renew)

    store.slot = slot


def semaphore_worker(
    spec: Spec,
    stop: threading.Event,
    failpoint: Failpoint | None = None,
    connected: Callable[[dcoord.Client], None] | None = None,
) -> None:
    """Acquire a permit, work, release, until ``stop`` is set."""
    rec, rng, client = open_worker(spec, connected)
    if spec.mutant == "ignore-limit":
        ignore_limit(client)
    point: Failpoint = failpoint or (lambda _: None)
    try:
        while not stop.is_set():
            point("acquire")
            permit = client.semaphore(SEMAPHORE, LIMIT, ttl=spec.ttl)
            with rec.invoke("acquire") as op:
                if permit.acquire(timeout=spec.acquire_timeout):
                    op.ok({"fence": permit.fence})
                else:
                    op.fail()
            if op.result != OK:
                if op.result != "fail":
                    backoff(rng)  # maybe granted (the TTL frees it); the server may be down
                continue
            point("work")
            time.sleep(rng.uniform(*spec.work))
            point("release")
            with rec.invoke("release", {"fence": permit.fence}):
                permit.release()
    finally:
        rec.close()
        client.close()


def admitted_overlaps(history: History, limit: int) -> list[checkers.Violation]:
    """Never more than ``limit`` confirmed holds at once (the semaphore's promise)."""
    holds = checkers.critical_sections(history)
    # Sweep the hold boundaries; at equal times a release goes first (no overlap).
    events: list[tuple[float, int, tuple[Op, Op]]] = []
    for hold in holds:
        acquire, release = hold
        events += [(acquire.complete, 1, hold), (release.invoke, -1, hold)]
    events.sort(key=lambda e: (e[0], e[1]))
    inside: dict[int, tuple[Op, Op]] = {}
    crowded = []
    most = 0
    for at, step, hold in events:
        if step < 0:
            inside.pop(id(hold), None)
            continue
        inside[id(hold)] = hold
        most = max(most, len(inside))
        if len(inside) > limit:
            crowd = ", ".join(
                f"{a.process} fence {a.out['fence']} [{a.complete:.3f} .. {r.invoke:.3f}]"
                for a, r in inside.values()
            )
            crowded.append(f"at {at:.3f}: {len(inside)} holders: {crowd}")
    if not crowded:
        return []
    return [
        checkers.Violation(
            "semaphore-limit",
            f"{len(crowded)} times more than {limit} confirmed holders at once "
            f"(up to {most}, of {len(holds)} confirmed holds)",
            crowded[: checkers.MAX_EXAMPLES],
        )
    ]


def most_at_once(history: History) -> int:
    """The largest number of confirmed holds that overlapped (for the report)."""
    events = sorted(
        (t, step)
        for a, r in checkers.critical_sections(history)
        for t, step in ((a.complete, 1), (r.invoke, -1))
    )
    inside = most = 0
    for _, step in events:
        inside += step
        most = max(most, inside)
    return most


class SemaphoreWorkload:
    """The semaphore workload: its worker, its liveness probe and its checks."""

    name = "semaphore"
    points: tuple[str, ...] = ("work", "release")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.pause_scale = ttl  # pauses must outlast the permit's TTL

    def worker(self) -> Callable[..., None]:
        return semaphore_worker

    def liveness_bound(self) -> float:
        """A dead holder's TTL to run out, an etcd election, a reconnect."""
        return 3 * self.ttl + 5.0

    def busy(self, event: dict[str, Any]) -> bool:
        return (event.get("f"), event.get("type")) == ("acquire", OK)

    def prepare(self, client: dcoord.Client) -> None:
        """Nothing to set up."""

    def probe(self, client: dcoord.Client, rec: Recorder, bound: float) -> None:
        """After healing: a new client gets a permit within ``bound`` and releases it."""
        permit = client.semaphore(SEMAPHORE, LIMIT, ttl=self.ttl)
        with rec.invoke("acquire") as op:
            if permit.acquire(timeout=bound):
                op.ok({"fence": permit.fence})
            else:
                op.fail()
        if op.result == OK:
            with rec.invoke("release", {"fence": permit.fence}):
                permit.release()

    def final_state(self, client: dcoord.Client) -> dict[str, Any]:
        return {}

    def check(
        self, history: History, final: dict[str, Any], losses: list[tuple[float, float]]
    ) -> tuple[list[checkers.Violation], dict[str, Any]]:
        violations = [*checkers.lock_fences(history), *admitted_overlaps(history, LIMIT)]
        holds = len(checkers.critical_sections(history))
        findings = {
            "semaphore": f"{holds} confirmed holds, at most {most_at_once(history)} "
            f"at once (limit {LIMIT})",
        }
        return violations, findings
