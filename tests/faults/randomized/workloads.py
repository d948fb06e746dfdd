"""Workers: the client side of a run, as real processes (Redis, etcd) or threads (memory).

A worker is given a :class:`Spec` (JSON on the command line for a process) and loops
until told to stop (SIGTERM, or its stop event), recording every operation in its own
history file. On the memory backend the store lives in the runner's process, so workers
are threads there; the runner then reaches them through a :class:`Failpoints` object
(see runner.py) instead of signals.

Fenced counter, one iteration::

    acquire lock "counter"                         -> fence F
    admit F on resource "counter"                  claim the resource *before* reading it
    read  fenced-counter, read unfenced-counter
    ... work (a random short sleep: the window a pause lands in) ...
    write unfenced-counter = u + 1                 plain put: the negative control
    write fenced-counter   = c + 1 guarded by F    atomic with the fence check
    release

Admitting the fence before the read matters: a fence checked only at the write cannot
stop a stale holder's write that lands *between* a new holder's read and write (the new
holder would then overwrite it: a lost update), so a read-modify-write claims the
resource first, and from then on every older fence is rejected.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dcoord

from . import checkers
from .history import FAIL, OK, UNKNOWN, History, Recorder

LOCK = "counter"
RESOURCE = "counter"
FENCED = "{counter}fenced-counter"  # the tag of RESOURCE: one slot with its fence
UNFENCED = "unfenced-counter"


class Killed(BaseException):
    """Raised at a failpoint of a thread worker that the nemesis killed."""


@dataclass
class Spec:
    """What one worker needs; JSON-serialisable so a process gets it on its command line."""

    workload: str
    url: str
    namespace: str
    process: str
    history: str
    seed: int
    ttl: float
    request_timeout: float
    acquire_timeout: float
    work: tuple[float, float] = (0.02, 0.08)
    mutant: str | None = None
    extra: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        data = json.loads(text)
        data["work"] = tuple(data["work"])
        return cls(**data)


# ``failpoint(name)`` is called between operations: a no-op in a process (signals do the
# work there), a place to block (pause) or unwind (kill) for a thread worker.
Failpoint = Callable[[str], None]


def _no_failpoint(name: str) -> None:
    """No faults at named points."""


class ArmedFailpoint:
    """A worker process's failpoints: SIGKILL itself at the point the nemesis armed.

    The nemesis arms by writing the point's name to ``<process>.arm`` beside the history
    file; the worker claims it by renaming it (so a disarm racing the crash can tell) and
    dies on the spot. Pauses and plain kills need no failpoint: signals land anywhere.
    """

    def __init__(self, history: str) -> None:
        self.path = Path(history).with_suffix(".arm")

    def __call__(self, where: str) -> None:
        if not self.path.exists():
            return
        try:
            if self.path.read_text() != where:
                return
            self.path.rename(self.path.with_suffix(".hit"))
        except FileNotFoundError:
            return  # disarmed meanwhile
        os.kill(os.getpid(), signal.SIGKILL)


def decode(raw: bytes | None) -> dict[str, Any] | None:
    return None if raw is None else dict(json.loads(raw))


def recorder_and_rng(spec: Spec) -> tuple[Recorder, random.Random]:
    """A worker's history recorder and its seeded random source (sync or async worker)."""
    return Recorder(Path(spec.history), spec.process), random.Random(
        f"worker:{spec.seed}:{spec.process}"
    )


def open_worker(
    spec: Spec, connected: Callable[[dcoord.Client], None] | None
) -> tuple[Recorder, random.Random, dcoord.Client]:
    """A worker's history recorder, its seeded random source, and its client."""
    rec, rng = recorder_and_rng(spec)
    client = dcoord.connect(
        spec.url, namespace=spec.namespace, request_timeout=spec.request_timeout
    )
    if connected is not None:
        connected(client)
    return rec, rng, client


def counter_worker(
    spec: Spec,
    stop: threading.Event,
    failpoint: Failpoint = _no_failpoint,
    connected: Callable[[dcoord.Client], None] | None = None,
) -> None:
    """The fenced-counter loop, until ``stop`` is set; with ``aio`` in the spec's extra,
    the odd slots' workers run it on dcoord.aio (:mod:`.aio_counter`)."""
    from . import mutants

    if (spec.extra or {}).get("aio") and is_async_slot(spec.process):
        from .aio_counter import aio_counter_worker

        asyncio.run(aio_counter_worker(spec, stop, failpoint))
        return
    rec, rng, client = open_worker(spec, connected)
    mutants.apply(spec.mutant, client)
    kv = client.backend.kv
    guard = client.fence(RESOURCE)
    try:
        while not stop.is_set():
            failpoint("acquire")
            lock = client.lock(LOCK, ttl=spec.ttl, fair=bool((spec.extra or {}).get("fair")))
            with rec.invoke("acquire") as op:
                if lock.acquire(timeout=spec.acquire_timeout):
                    op.ok({"fence": lock.fence})
                else:
                    op.fail()
            if op.result == UNKNOWN:
                backoff(rng)  # maybe granted (the TTL frees it); the server may be down
            if op.result != OK:
                continue
            fence = lock.fence
            if not _critical_section(spec, rec, rng, kv, guard, fence, failpoint):
                backoff(rng)
            failpoint("release")
            with rec.invoke("release", {"fence": fence}):
                lock.release()
    finally:
        rec.close()
        client.close()


def is_async_slot(process: str) -> bool:
    """With ``--aio``: workers ``c1``, ``c3``, ... (and their restarts ``c1.2``) run on
    dcoord.aio, the even ones on the sync API (and the runner's own, ``liveness``)."""
    slot = process[1:].split(".")[0]
    return process.startswith("c") and slot.isdigit() and int(slot) % 2 == 1


def backoff(rng: random.Random) -> None:
    """Wait a little after an operation of unknown outcome, as a real client would."""
    time.sleep(rng.uniform(0.05, 0.2))


def _critical_section(
    spec: Spec,
    rec: Recorder,
    rng: random.Random,
    kv: Any,
    guard: Any,
    fence: int,
    failpoint: Failpoint,
) -> bool:
    """Admit, read both counters, work, write both; False if a step's outcome was unknown."""
    failpoint("admit")
    with rec.invoke("admit", {"fence": fence}) as op:
        if not guard.admit(fence):
            op.fail()
    if op.result != OK:
        return op.result == FAIL
    with rec.invoke("read", {"key": FENCED}) as op:
        current = decode(kv.get(FENCED))
        op.ok(current)
    if op.result != OK:
        return False
    with rec.invoke("uread", {"key": UNFENCED}) as op:
        unfenced = decode(kv.get(UNFENCED))
        op.ok(unfenced)
    if op.result != OK:
        return False
    failpoint("work")
    time.sleep(rng.uniform(*spec.work))
    failpoint("uwrite")
    new_u = {"count": (unfenced or {}).get("count", 0) + 1, "fence": fence, "by": spec.process}
    with rec.invoke("uwrite", {"fence": fence, "read": unfenced, "value": new_u}):
        kv.put(UNFENCED, json.dumps(new_u).encode())
    failpoint("write")
    new = {"count": (current or {}).get("count", 0) + 1, "fence": fence, "by": spec.process}
    with rec.invoke("write", {"fence": fence, "read": current, "value": new}) as op:
        if not guard.write(fence, FENCED, json.dumps(new).encode()):
            op.fail()
    return op.result != UNKNOWN


class CounterWorkload:
    """The fenced counter: its worker, its liveness probe, its final state and checks."""

    name = "counter"

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.pause_scale = ttl  # pauses must outlast the lock's TTL
        self.points: tuple[str, ...] = ("admit", "work", "uwrite", "write", "release")

    def worker(self) -> Callable[..., None]:
        return counter_worker

    def liveness_bound(self) -> float:
        """A dead holder's TTL to run out, an etcd election, a reconnect."""
        return 3 * self.ttl + 5.0

    def busy(self, event: dict[str, Any]) -> bool:
        f, kind = event.get("f"), event.get("type")
        if f in ("admit", "read", "uread", "uwrite"):
            return True
        return (f, kind) in (("acquire", OK), ("write", "invoke"))

    def prepare(self, client: dcoord.Client) -> None:
        """Nothing to set up: a missing counter reads as zero."""

    def probe(self, client: dcoord.Client, rec: Recorder, bound: float) -> None:
        """After healing: a new client takes the lock and increments within ``bound``."""
        lock = client.lock(LOCK, ttl=self.ttl)
        with rec.invoke("acquire") as op:
            if lock.acquire(timeout=bound):
                op.ok({"fence": lock.fence})
            else:
                op.fail()
        if op.result != OK:
            return
        guard = client.fence(RESOURCE)
        with rec.invoke("admit", {"fence": lock.fence}) as op:
            if not guard.admit(lock.fence):
                op.fail()
        with rec.invoke("read", {"key": FENCED}) as op:
            current = decode(client.backend.kv.get(FENCED))
            op.ok(current)
        new = {"count": (current or {}).get("count", 0) + 1, "fence": lock.fence, "by": "liveness"}
        with rec.invoke("write", {"fence": lock.fence, "read": current, "value": new}) as op:
            if not guard.write(lock.fence, FENCED, json.dumps(new).encode()):
                op.fail()
        with rec.invoke("release", {"fence": lock.fence}):
            lock.release()

    def final_state(self, client: dcoord.Client) -> dict[str, Any]:
        kv = client.backend.kv
        return {"fenced": decode(kv.get(FENCED)), "unfenced": decode(kv.get(UNFENCED))}

    def check(
        self, history: History, final: dict[str, Any], losses: list[tuple[float, float]]
    ) -> tuple[list[checkers.Violation], dict[str, Any]]:
        violations = [
            *checkers.lock_fences(history),
            *checkers.mutual_exclusion(history, losses),
            *checkers.stale_admissions(history, losses),
            *checkers.fenced_counter(history, final["fenced"], losses),
        ]
        admitted = sum(1 for op in history.by_f("write") if op.ok)
        rejected = sum(1 for op in history.by_f("write", "admit") if op.result == FAIL)
        sections = len(checkers.critical_sections(history))
        lost = checkers.unfenced_lost_updates(history, final["unfenced"])
        # The same chain checker on the unfenced counter: it must find what fencing
        # prevents (a checker that never fires proves nothing).
        control = checkers.fenced_counter(history, final["unfenced"], losses, f="uwrite")
        findings = {
            "fenced counter": f"{(final['fenced'] or {}).get('count', 0)} "
            f"({admitted} admitted increments, {rejected} stale fences rejected, "
            f"{sections} confirmed critical sections)",
            "negative control (unfenced counter)": f"{lost} lost updates "
            f"(final {(final['unfenced'] or {}).get('count', 0)})",
            "_unfenced_lost": lost,
            "_unfenced_chain": control,
        }
        return violations, findings


def main(argv: list[str]) -> int:
    """A worker process: ``python -m tests.faults.randomized.workloads SPEC_JSON``."""
    from .election import election_worker
    from .semaphores import semaphore_worker
    from .transfers import transfers_worker

    spec = Spec.from_json(argv[0])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workers = {
        "transfers": transfers_worker,
        "election": election_worker,
        "semaphore": semaphore_worker,
    }
    worker = workers.get(spec.workload, counter_worker)
    worker(spec, stop, ArmedFailpoint(spec.history))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
