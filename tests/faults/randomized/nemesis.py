"""The nemesis: a seeded random schedule of faults, and the thread that injects them.

:func:`plan` turns a seed into a list of faults (kind, target slot, start, duration). It
depends on nothing but its arguments, so a seed replays the same schedule; the workers'
interleaving around it still varies from run to run, as on any real cluster.

Faults run one at a time with quiet gaps between them (Jepsen's default nemesis), and
every fault is healed before the next starts. The fault kinds:

================  ==========================================================================
pause-client      SIGSTOP a worker (memory: block its thread and its client's scheduler
                  thread) for longer than the lock TTL, then SIGCONT
pause-holder      the same, aimed at a worker in the middle of its critical section (or
                  transaction) when one is, found from the tail of its history file
kill-client       SIGKILL a worker (memory: abandon it without releasing), start a
                  replacement in its slot after a short downtime
pause-server      SIGSTOP / ``docker pause`` the server (memory: hold the store's lock)
restart-server    SIGKILL / container kill the server, start it again on the same data
pause-member      pause one member of a three-member etcd cluster
kill-member       kill one member of a three-member etcd cluster, restart it later
pause-leader      pause the current leader of a three-member etcd cluster (an election
                  follows), resume it later
kill-leader       kill the current leader of a three-member etcd cluster, restart it later
kill-primary      Redis Sentinel: kill the primary; at heal, once the sentinels promoted a
                  replica, start it again and wait until it is a replica in sync
pause-primary     Redis Sentinel: pause the primary until the sentinels promoted a replica
                  (at least the planned time), resume it (a split brain until they demote
                  it) and wait until it is a replica in sync
kill-cluster-primary  kill the Redis Cluster primary serving the workload's lock, for
                  longer than the node timeout (a replica is promoted); restart it
                  (it rejoins as a replica) and wait until the Cluster is healthy
crash-at          arm a named failpoint in a worker (the workload's own points, e.g. 2PC's
                  after_prepare / after_decision / after_commit): the worker SIGKILLs
                  itself when it next reaches it (etcd robustness tests' failpoints); a
                  replacement starts at heal if it crashed, else the point is disarmed
================  ==========================================================================
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .history import Recorder

KINDS = (
    "pause-client",
    "pause-holder",
    "kill-client",
    "pause-server",
    "restart-server",
    "pause-member",
    "kill-member",
    "pause-leader",
    "kill-leader",
    "kill-primary",
    "pause-primary",
    "kill-cluster-primary",
    "crash-at",
)


@dataclass(frozen=True)
class Planned:
    """One fault of the schedule: start ``at`` seconds into the run, heal ``duration`` later."""

    at: float
    kind: str
    slot: int
    duration: float
    point: str | None = None
    """crash-at only: the failpoint armed."""


def _duration(rng: random.Random, kind: str, ttl: float) -> float:
    if kind in ("pause-client", "pause-holder", "pause-member", "pause-leader"):
        return rng.uniform(1.3, 2.5) * ttl  # longer than the TTL: the lock must expire
    if kind == "pause-server":
        # Half shorter than a request timeout (clients just wait), half past the TTL.
        return rng.uniform(0.2, 0.8) if rng.random() < 0.5 else rng.uniform(1.2, 2.0) * ttl
    if kind in ("kill-client", "kill-member", "kill-leader"):
        return rng.uniform(0.2, 1.5)  # downtime before the replacement / restart
    if kind == "kill-cluster-primary":
        return rng.uniform(3.0, 6.0)  # past the node timeout (2 s): a failover happens
    if kind == "restart-server":
        return rng.uniform(0.1, 1.0)
    if kind in ("kill-primary", "pause-primary"):
        return rng.uniform(1.0, 3.0)  # the heal also waits for the failover and resync
    if kind == "crash-at":
        return rng.uniform(0.3, 1.0)  # how long the armed point waits to be reached
    raise ValueError(f"unknown fault kind {kind!r}")


def plan(
    seed: int,
    *,
    duration: float,
    kinds: Mapping[str, float],
    slots: int,
    ttl: float,
    members: int = 3,
    points: Sequence[str] = (),
) -> list[Planned]:
    """The fault schedule of a run: a pure function of its arguments.

    ``kinds`` maps fault kind to weight; ``slots`` is the number of worker slots. Faults
    start after a warm-up and end by ``duration`` minus a tail in which the system heals.
    ``points`` are the workload's failpoint names, for crash-at.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    rng = random.Random(f"nemesis:{seed}")
    names = sorted(k for k, w in kinds.items() if w > 0)
    weights = [kinds[k] for k in names]
    schedule: list[Planned] = []
    t = rng.uniform(0.3, 1.0)
    while names:
        kind = rng.choices(names, weights)[0]
        length = _duration(rng, kind, ttl)
        if t + length > duration - max(ttl, 1.0):
            break
        slot = rng.randrange(members if kind.endswith("member") else max(slots, 1))
        point = rng.choice(points) if kind == "crash-at" and points else None
        schedule.append(Planned(round(t, 3), kind, slot, round(length, 3), point))
        t += length + rng.uniform(0.3, 1.2)
    return schedule


# A control injects one kind of fault: ``start(planned)`` returns the name of what it
# hit, ``heal(planned)`` undoes it (resume, restart, start a replacement); a str it
# returns is a note on what happened, recorded with the fault's end.
@dataclass(frozen=True)
class Control:
    start: Callable[[Planned], str]
    heal: Callable[[Planned], object]


class Nemesis:
    """Runs a schedule in a thread, recording each fault's start and heal with the seed."""

    def __init__(
        self,
        schedule: list[Planned],
        controls: Mapping[str, Control],
        recorder: Recorder,
        seed: int,
    ) -> None:
        missing = {p.kind for p in schedule} - set(controls)
        if missing:
            raise ValueError(f"no control for fault kinds {sorted(missing)}")
        self.schedule = schedule
        self.controls = controls
        self.recorder = recorder
        self.seed = seed
        self.injected = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop injecting; a fault in progress is healed before this returns."""
        self._stop.set()
        # Not started when the workers failed to start: that error must surface, not a
        # "cannot join thread before it is started" raised over it.
        if self._thread.ident is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            for planned in self.schedule:
                if self._stop.wait(max(0.0, self._t0 + planned.at - time.monotonic())):
                    return
                self._inject(planned)
        except BaseException as exc:  # reported by the runner: an infrastructure failure
            self.error = exc

    def _inject(self, planned: Planned) -> None:
        control = self.controls[planned.kind]
        started = time.monotonic()  # before the fault: a fault's window covers all its effect
        target = control.start(planned)
        self.injected += 1
        self.recorder.fault(
            "start",
            planned.kind,
            target,
            at=started,
            seed=self.seed,
            planned_at=planned.at,
            duration=planned.duration,
            **({"point": planned.point} if planned.point else {}),
        )
        try:
            self._stop.wait(planned.duration)
        finally:
            note = control.heal(planned)
            outcome = {"outcome": note} if isinstance(note, str) else {}
            self.recorder.fault("end", planned.kind, target, **outcome)  # type: ignore[arg-type]
