"""One randomized run: servers, workers, the nemesis, healing, the liveness probe, checks.

::

    report = run(Config(backend="redis", workload="counter", seed=7, duration=30))
    print(report.render())

Runs are bounded: the nemesis stops at ``duration``, workers get a bounded time to stop
(then SIGKILL), and every process and server the run started is stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import dcoord
from dcoord.backends import registry
from tests.servers import ROOT, Server, start_server
from tests.topologies.cluster import ClusterSet
from tests.topologies.etcd import EtcdCluster
from tests.topologies.sentinel import SentinelSet

from . import checkers, nemesis
from .history import History, Recorder, last_event, merge
from .mutants import MUTANTS
from .workloads import LOCK, Killed, Spec

WORKLOAD_NAMES = ("counter", "transfers", "election", "semaphore")

# Lock TTLs: short, so that pauses past them are cheap; etcd grants no lease under ~2 s.
TTL = {"memory": 0.5, "redis": 1.0, "etcd": 2.0}
REQUEST_TIMEOUT = {"memory": 5.0, "redis": 0.5, "etcd": 1.0}

_CLIENT_FAULTS = {"pause-client": 1.0, "pause-holder": 2.0, "kill-client": 1.0, "crash-at": 2.0}
DEFAULT_FAULTS: dict[str, dict[str, float]] = {
    "memory": {**_CLIENT_FAULTS, "pause-server": 1},
    "redis": {**_CLIENT_FAULTS, "pause-server": 1, "restart-server": 1},
    "etcd": {**_CLIENT_FAULTS, "pause-server": 1, "restart-server": 1},
    "etcd-cluster": {
        **_CLIENT_FAULTS,
        "pause-member": 1,
        "kill-member": 1,
        "pause-leader": 1,
        "kill-leader": 1,
    },
    "redis-sentinel": {**_CLIENT_FAULTS, "kill-primary": 2, "pause-primary": 2},
    "redis-cluster": {**_CLIENT_FAULTS, "kill-cluster-primary": 2},
}
# The registered backends this runner has settings (the tables above) for.
BACKENDS = tuple(d.kind for d in registry.drivers() if d.kind in TTL)
# Faults after which a Redis Sentinel set may have lost acknowledged writes: replication
# is asynchronous, and a paused primary accepts writes until the sentinels demote it.
FAILOVER_FAULTS = ("kill-primary", "pause-primary")


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; the same config and seed replay the same schedule."""

    backend: str = "memory"
    workload: str = "counter"
    seed: int = 1
    duration: float = 20.0
    clients: int = 3
    volatile: bool = False
    """Redis only: no persistence (every restart loses all data)."""
    cluster: bool = False
    """etcd: three members, member faults; redis: a Redis Cluster (three primaries, one
    replica each), primary kills; instead of whole-server faults."""
    sentinel: bool = False
    """Redis only: a Sentinel set (primary, two replicas); failovers instead of restarts."""
    mutant: str | None = None
    faults: tuple[str, ...] | None = None
    """Fault kinds to inject (default: every kind that applies to the backend)."""
    ttl: float | None = None
    points: tuple[str, ...] | None = None
    """crash-at: the failpoints to choose from (default: all of the workload's)."""
    keep: str | None = None
    """Directory to keep the history in (default: a temporary one, removed if clean)."""
    using: str | None = None
    """Server provider: containers or processes (default: tests/servers.py's choice)."""
    aio: bool = False
    """transfers: the odd-numbered workers use dcoord.aio, mixed with sync ones."""
    fair: bool = False
    """counter: the workers' locks are fair (``fair=True``)."""

    @property
    def variant(self) -> str:
        if self.cluster:
            return f"{self.backend}-cluster"
        if self.backend == "redis" and self.sentinel:
            return "redis-sentinel"
        return self.backend

    @property
    def lock_ttl(self) -> float:
        return self.ttl if self.ttl is not None else TTL[self.backend]

    def fault_weights(self) -> dict[str, float]:
        weights = DEFAULT_FAULTS[self.variant]
        if self.faults is None:
            return dict(weights)
        unknown = set(self.faults) - set(weights)
        if unknown:
            raise ValueError(
                f"faults {sorted(unknown)} do not apply to {self.variant}; "
                f"choose from {', '.join(weights)}"
            )
        return {kind: weights[kind] for kind in self.faults}

    def command(self) -> str:
        """The command line that replays this run."""
        args = [
            f"--backend {self.backend}",
            f"--workload {self.workload}",
            f"--seed {self.seed}",
            f"--duration {self.duration:g}",
            f"--clients {self.clients}",
        ]
        if self.volatile:
            args.append("--volatile")
        if self.cluster:
            args.append("--cluster")
        if self.sentinel:
            args.append("--sentinel")
        if self.mutant:
            args.append(f"--mutant {self.mutant}")
        if self.faults is not None:
            args.append(f"--faults {','.join(self.faults)}")
        if self.ttl is not None:
            args.append(f"--ttl {self.ttl:g}")
        if self.points is not None:
            args.append(f"--points {','.join(self.points)}")
        if self.aio:
            args.append("--aio")
        if self.fair:
            args.append("--fair")
        return "python -m tests.faults.randomized " + " ".join(args)

    def describe(self) -> str:
        extra = ""
        if self.backend == "redis":
            extra = " (no persistence)" if self.volatile else " (appendfsync always)"
        if self.cluster:
            extra = " (three members)" if self.backend == "etcd" else " (Redis Cluster)"
        if self.sentinel:
            extra = " (Sentinel: primary, two replicas, three sentinels)"
        mutant = f", MUTANT {self.mutant}" if self.mutant else ""
        aio = ", odd workers async" if self.aio else ""
        aio += ", fair locks" if self.fair else ""
        return (
            f"backend {self.backend}{extra}, workload {self.workload}, seed {self.seed}, "
            f"{self.duration:g} s, {self.clients} clients, ttl {self.lock_ttl:g} s{mutant}{aio}"
        )


@dataclass
class Report:
    config: Config
    history: History
    violations: list[checkers.Violation]
    findings: dict[str, Any]
    planned: list[nemesis.Planned]
    elapsed: float
    directory: str | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def faults(self) -> Counter[str]:
        return Counter(fault.kind for fault in self.history.faults)

    def _fault_summary(self) -> str:
        parts = []
        for kind, n in sorted(self.faults.items()):
            crashes = [
                f"{f.detail.get('point')}: {f.detail.get('outcome', '?')}"
                for f in self.history.faults
                if f.kind == kind and "point" in f.detail
            ]
            parts.append(f"{kind} {n}" + (f" [{', '.join(crashes)}]" if crashes else ""))
        return ", ".join(parts) or "none"

    def render(self) -> str:
        tally = checkers.counts(self.history)
        per_f = Counter(f"{op.f}:{op.result}" for op in self.history.ops)
        faults = self._fault_summary()
        lines = [
            f"randomized fault run: {self.config.describe()}",
            f"operations: {len(self.history.ops)} (ok {tally['ok']}, fail {tally['fail']}, "
            f"unknown {tally['unknown']}) in {self.elapsed:.1f} s",
            "  by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(per_f.items())),
            f"faults injected: {sum(self.faults.values())} ({faults}) "
            f"of {len(self.planned)} planned",
        ]
        lines += [f"{k}: {v}" for k, v in self.findings.items() if not k.startswith("_")]
        if self.violations:
            lines.append(f"VIOLATIONS: {len(self.violations)}")
            lines += [v.describe() for v in self.violations]
        else:
            lines.append("violations: none")
        if self.directory:
            lines.append(f"history kept in {self.directory}")
        lines.append(f"replay: {self.config.command()}")
        return "\n".join(lines)


# -- workers ------------------------------------------------------------------------


class Pool(Protocol):
    """The worker slots of a run, as the nemesis and the runner see them."""

    def spawn(self, slot: int) -> None: ...
    def pause(self, slot: int) -> str: ...
    def resume(self, slot: int) -> None: ...
    def kill(self, slot: int) -> str: ...
    def stop(self, timeout: float) -> list[str]: ...
    def arm(self, slot: int, point: str) -> str:
        """Make the worker in ``slot`` crash when it next reaches failpoint ``point``."""
        ...

    def disarm(self, slot: int) -> bool:
        """Disarm; True if the worker crashed meanwhile (a replacement is started)."""
        ...

    def names(self) -> dict[int, str]:
        """The process name in each slot now."""
        ...


def _name(slot: int, generation: int) -> str:
    return f"c{slot}" if generation == 0 else f"c{slot}.{generation}"


class ProcessPool:
    """Workers as real processes: paused and killed by signals."""

    def __init__(self, make_spec: Callable[[str], Spec], directory: Path, slots: int) -> None:
        self._make_spec = make_spec
        self._dir = directory
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._names: dict[int, str] = {}
        self._generation = [0] * slots

    def spawn(self, slot: int) -> None:
        name = _name(slot, self._generation[slot])
        self._generation[slot] += 1
        spec = self._make_spec(name)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        with open(self._dir / f"{name}.log", "wb") as log:
            self._procs[slot] = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.randomized.workloads", spec.to_json()],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._names[slot] = name

    def names(self) -> dict[int, str]:
        return dict(self._names)

    def arm(self, slot: int, point: str) -> str:
        name = self._names[slot]
        (self._dir / f"{name}.arm").write_text(point)
        return name

    def disarm(self, slot: int) -> bool:
        name = self._names[slot]
        try:
            (self._dir / f"{name}.arm").unlink()
        except FileNotFoundError:  # claimed by the worker, which is killing itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._procs[slot].wait(10)
        if self._procs[slot].poll() is None:
            return False
        self.spawn(slot)
        return True

    def _signal(self, slot: int, sig: int) -> str:
        proc = self._procs[slot]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        return self._names[slot]

    def pause(self, slot: int) -> str:
        return self._signal(slot, signal.SIGSTOP)

    def resume(self, slot: int) -> None:
        self._signal(slot, signal.SIGCONT)

    def kill(self, slot: int) -> str:
        name = self._signal(slot, signal.SIGKILL)
        self._procs[slot].wait()
        return name

    def stop(self, timeout: float) -> list[str]:
        """SIGTERM every worker (they finish their iteration), SIGKILL stragglers."""
        for slot in self._procs:
            self._signal(slot, signal.SIGCONT)
            self._signal(slot, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed = []
        for slot, proc in self._procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(self.kill(slot))
        # A replacement spawned just before the stop may get SIGTERM before its handler
        # is installed: having recorded nothing, it did nothing.
        failed = [
            f"{self._names[s]} exited with {p.returncode}: {self._tail(self._names[s])}"
            for s, p in self._procs.items()
            if p.returncode not in (0, -signal.SIGKILL)
            and self._names[s] not in killed
            and not (
                p.returncode == -signal.SIGTERM
                and not (self._dir / f"{self._names[s]}.jsonl").exists()
            )
        ]
        return [f"{name} did not stop in {timeout:g} s: killed" for name in killed] + failed

    def _tail(self, name: str) -> str:
        lines = (self._dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])


class _ThreadWorker:
    """One thread worker and the switches the nemesis flips at its failpoints."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.killed = False
        self.armed: str | None = None
        self._mutex = threading.Lock()
        self.client: dcoord.Client | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def failpoint(self, where: str) -> None:
        self.running.wait()
        with self._mutex:
            if self.armed == where:
                self.armed = None
                self.die()
        if self.killed:
            raise Killed(where)

    def die(self) -> None:
        """Stop renewing anything and unwind at the next failpoint, releasing nothing."""
        self.killed = True
        if self.client is not None:
            self.client.scheduler.close()
        self.running.set()

    def connected(self, client: dcoord.Client) -> None:
        self.client = client


class ThreadPool:
    """Workers as threads (memory backend: the store lives in this process).

    A pause blocks the worker at its next failpoint *and* pauses its client's scheduler
    (so the lock is not renewed, as under SIGSTOP), until the nemesis heals it. A kill
    stops the scheduler and unwinds the worker at its next failpoint without releasing
    anything, as a dead process would.
    """

    def __init__(self, make_spec: Callable[[str], Spec], run: Callable[..., None], slots: int):
        self._make_spec = make_spec
        self._run = run
        self._workers: dict[int, _ThreadWorker] = {}
        self._retired: list[_ThreadWorker] = []
        self._generation = [0] * slots

    def spawn(self, slot: int) -> None:
        worker = _ThreadWorker(_name(slot, self._generation[slot]))
        self._generation[slot] += 1
        spec = self._make_spec(worker.name)

        def main() -> None:
            try:
                self._run(spec, worker.stop, worker.failpoint, worker.connected)
            except BaseException as exc:
                # A killed worker may trip over its closed client before its next
                # failpoint; that is part of dying.
                if not worker.killed:
                    worker.error = exc

        worker.thread = threading.Thread(target=main, name=f"worker-{worker.name}", daemon=True)
        self._workers[slot] = worker
        worker.thread.start()

    def names(self) -> dict[int, str]:
        return {slot: worker.name for slot, worker in self._workers.items()}

    def arm(self, slot: int, point: str) -> str:
        worker = self._workers[slot]
        worker.armed = point
        return worker.name

    def disarm(self, slot: int) -> bool:
        worker = self._workers[slot]
        with worker._mutex:
            worker.armed = None
            if not worker.killed:
                return False
        self._retired.append(worker)
        self.spawn(slot)
        return True

    def pause(self, slot: int) -> str:
        worker = self._workers[slot]
        worker.running.clear()
        if worker.client is not None:
            # Stop the client's scheduler too: no renewals while "stopped".
            worker.client.scheduler.pause(until=worker.running)
        return worker.name

    def resume(self, slot: int) -> None:
        self._workers[slot].running.set()

    def kill(self, slot: int) -> str:
        worker = self._workers[slot]
        worker.die()
        self._retired.append(worker)
        return worker.name

    def stop(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        problems = []
        for worker in self._workers.values():
            worker.stop.set()
            worker.running.set()
        for worker in [*self._workers.values(), *self._retired]:
            assert worker.thread is not None
            worker.thread.join(max(0.1, deadline - time.monotonic()))
            if worker.thread.is_alive():
                problems.append(f"{worker.name} did not stop in {timeout:g} s")
            if worker.error is not None:
                problems.append(f"{worker.name} crashed: {worker.error!r}")
        for worker in self._workers.values():
            if worker.client is not None and not worker.killed:
                worker.client.close()
        return problems


# -- servers ------------------------------------------------------------------------


class Environment:
    """The servers of a run and the fault controls that act on them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server: Server | None = None
        self.cluster: EtcdCluster | None = None
        self.sentinels: SentinelSet | None = None
        self.directory = Path(tempfile.gettempdir())
        """Where server logs go at stop (the run's directory)."""
        self.redis_cluster: ClusterSet | None = None
        self.url = ""
        self._freeze: threading.Event | None = None

    def start(self) -> None:
        if self.config.backend == "memory":
            self.url = f"memory://faults-{uuid.uuid4().hex[:10]}"
        elif self.config.variant == "redis-cluster":
            # min-replicas-to-write 0: a promoted primary has no replica until the killed
            # node is back, and the workload must go on meanwhile.
            self.redis_cluster = ClusterSet(using=self.config.using, min_replicas_to_write=0)
            self.redis_cluster.start()
            # min_replicas 0: the counter makes no forced (WAITed) writes, and the
            # workers' request timeout is below the default replica_timeout.
            self.url = self.redis_cluster.user_url("default", None, min_replicas="0")
        elif self.config.cluster:
            self.cluster = EtcdCluster(self.config.using)
            self.cluster.start()
            self.url = self.cluster.url
        elif self.config.sentinel:
            self.sentinels = SentinelSet(using=self.config.using)
            self.sentinels.start()
            self.url = self.sentinels.url
        else:
            self.server = start_server(
                self.config.backend, persistent=not self.config.volatile, using=self.config.using
            )
            self.url = self.server.url

    def stop(self) -> None:
        if self._freeze is not None:
            self._freeze.set()
        if self.server is not None:
            self.server.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.sentinels is not None:
            # Who was primary when, from the servers' side: removed with a clean run's
            # directory, kept with the evidence of a violation.
            self.sentinels.save_logs(self.directory)
            self.sentinels.stop()
        if self.redis_cluster is not None:
            self.redis_cluster.stop()

    def heal(self) -> None:
        """Undo anything a fault may have left (idempotent)."""
        if self._freeze is not None:
            self._freeze.set()
        if self.server is not None:
            self.server.resume()
            if not self.server.running():
                self.server.start()
        if self.cluster is not None:
            self.cluster.heal()
        if self.sentinels is not None:
            for member in self.sentinels.nodes:
                member.resume()
                if not member.running():
                    member.start()
        if self.redis_cluster is not None:
            for node in self.redis_cluster.nodes:
                if not node.running():
                    node.start()
            self.redis_cluster.wait_healthy()

    def controls(self, pool: Pool, busy: Callable[[str], bool]) -> dict[str, nemesis.Control]:
        """The fault controls of this environment; ``busy(process)`` tells whether a
        worker is inside its critical section (for pause-holder)."""
        paused: list[int] = []

        def pause_holder(planned: nemesis.Planned) -> str:
            slots = sorted(pool.names())
            order = slots[planned.slot :] + slots[: planned.slot]
            paused.append(next((s for s in order if busy(pool.names()[s])), planned.slot))
            return pool.pause(paused[-1])

        controls = {
            "pause-client": nemesis.Control(
                lambda p: pool.pause(p.slot), lambda p: pool.resume(p.slot)
            ),
            "pause-holder": nemesis.Control(pause_holder, lambda p: pool.resume(paused.pop())),
            "kill-client": nemesis.Control(
                lambda p: pool.kill(p.slot), lambda p: pool.spawn(p.slot)
            ),
            "crash-at": nemesis.Control(
                lambda p: pool.arm(p.slot, p.point or ""),
                lambda p: "crashed" if pool.disarm(p.slot) else "not reached",
            ),
        }
        if self.server is not None:
            server = self.server
            kind = self.config.backend
            controls["pause-server"] = nemesis.Control(
                lambda p: _act(server.pause, kind), lambda p: server.resume()
            )
            controls["restart-server"] = nemesis.Control(
                lambda p: _act(server.kill, kind), lambda p: server.start()
            )
        if self.cluster is not None:
            cluster, members = self.cluster, self.cluster.members
            controls["pause-member"] = nemesis.Control(
                lambda p: _act(lambda: cluster.pause(members[p.slot]), f"etcd member m{p.slot}"),
                lambda p: cluster.resume(members[p.slot]),
            )
            controls["kill-member"] = nemesis.Control(
                lambda p: _act(members[p.slot].kill, f"etcd member m{p.slot}"),
                lambda p: members[p.slot].start(),
            )
            hit: list[Server] = []  # the leader a leader fault hit, until healed

            def leader_fault(fault: Callable[[], Server]) -> str:
                hit.append(fault())
                return f"etcd leader {hit[-1].etcd_name}"

            controls["pause-leader"] = nemesis.Control(
                lambda p: leader_fault(cluster.pause_leader), lambda p: cluster.resume(hit.pop())
            )
            controls["kill-leader"] = nemesis.Control(
                lambda p: leader_fault(cluster.kill_leader), lambda p: hit.pop().start()
            )
        if self.sentinels is not None:
            topology, down = self.sentinels, []

            def fail(action: Callable[[], Server]) -> str:
                down.append(action())
                return f"redis primary :{down[-1].port}"

            controls["kill-primary"] = nemesis.Control(
                lambda p: fail(topology.kill_primary), lambda p: topology.rejoin(down.pop())
            )
            controls["pause-primary"] = nemesis.Control(
                lambda p: fail(topology.pause_primary), lambda p: topology.rejoin(down.pop())
            )
        if self.redis_cluster is not None:
            redis_cluster = self.redis_cluster
            # The lock key dcoord:NS:lock:{counter} hashes by its tag alone.
            lock_tag = "{" + LOCK + "}"
            controls["kill-cluster-primary"] = nemesis.Control(
                lambda p: f"redis primary :{redis_cluster.kill_primary_of(lock_tag).port}",
                lambda p: self.heal(),
            )
        if self.config.backend == "memory":
            controls["pause-server"] = nemesis.Control(self._freeze_memory, self._thaw_memory)
        return controls

    def _freeze_memory(self, _: nemesis.Planned) -> str:
        """Hold the store's locks: every operation of every client blocks, TTLs run on."""
        from dcoord.backends.memory import memory_server
        from dcoord.backends.memory.locks import _table
        from dcoord.backends.memory.semaphore import queue_table

        store = memory_server(self.url.removeprefix("memory://"))
        table, queues = _table(store), queue_table(store)
        freeze = self._freeze = threading.Event()
        held = threading.Event()

        def hold() -> None:
            with table.mutex, queues.mutex, store.cond:
                held.set()
                freeze.wait()

        threading.Thread(target=hold, name="memory-freeze", daemon=True).start()
        held.wait()
        return "memory store"

    def _thaw_memory(self, _: nemesis.Planned) -> None:
        if self._freeze is not None:
            self._freeze.set()

    def loss_windows(self, history: History) -> list[tuple[float, float]]:
        """When data may have been lost: restarts of a Redis that keeps nothing on disk,
        failovers of a Sentinel set (from the fault until the old primary is a replica) and
        of a Redis Cluster (replication is asynchronous: a write the killed primary
        acknowledged may not have reached the replica promoted)."""
        if self.sentinels is not None:
            return [(f.start, f.end) for f in history.faults if f.kind in FAILOVER_FAULTS]
        if self.config.variant == "redis-cluster":
            lossy = "kill-cluster-primary"
        elif self.config.backend == "redis" and self.config.volatile:
            lossy = "restart-server"
        else:
            return []
        return [(f.start, f.end) for f in history.faults if f.kind == lossy]


def _act(action: Callable[[], None], target: str) -> str:
    action()
    return target


# -- the run ------------------------------------------------------------------------


class Workload(Protocol):
    name: str
    pause_scale: float
    """Pauses last 1.3-2.5 times this: past the lock TTL, or the transaction deadline."""
    points: tuple[str, ...]
    """The failpoints a worker passes, for crash-at."""

    def liveness_bound(self) -> float:
        """How long operations may take after healing."""
        ...

    def worker(self) -> Callable[..., None]: ...
    def busy(self, event: dict[str, Any]) -> bool:
        """Whether a worker whose last history event is ``event`` is mid-critical-section."""
        ...

    def prepare(self, client: dcoord.Client) -> None: ...
    def probe(self, client: dcoord.Client, rec: Recorder, bound: float) -> None: ...
    def final_state(self, client: dcoord.Client) -> dict[str, Any]: ...
    def check(
        self, history: History, final: dict[str, Any], losses: list[tuple[float, float]]
    ) -> tuple[list[checkers.Violation], dict[str, Any]]: ...


def workload(name: str, config: Config) -> Workload:
    if name == "semaphore":
        from .semaphores import SemaphoreWorkload

        return SemaphoreWorkload(config.lock_ttl)
    if name == "counter":
        from .workloads import CounterWorkload

        return CounterWorkload(config.lock_ttl)
    if name == "transfers":
        from .transfers import TransfersWorkload

        return TransfersWorkload(config.lock_ttl)
    if name == "election":
        from .election import ElectionWorkload

        return ElectionWorkload(config.lock_ttl)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")


def _points(config: Config, load: Workload) -> tuple[str, ...]:
    if config.points is None:
        return load.points
    unknown = set(config.points) - set(load.points)
    if unknown:
        raise ValueError(
            f"points {sorted(unknown)} are not failpoints of the {load.name} workload; "
            f"choose from {', '.join(load.points)}"
        )
    return config.points


def _directory(config: Config) -> Path:
    if config.keep:
        path = Path(config.keep)
        path.mkdir(parents=True, exist_ok=True)
        for old in [*path.glob("*.jsonl"), *path.glob("*.log")]:
            old.unlink()
        return path
    return Path(tempfile.mkdtemp(prefix="dcoord-faults-"))


def run(config: Config) -> Report:
    """Run one randomized test and check it; raises only for infrastructure failures."""
    if config.backend not in BACKENDS:
        raise ValueError(f"unknown backend {config.backend!r}; choose from {', '.join(BACKENDS)}")
    if config.volatile and config.backend != "redis":
        raise ValueError("--volatile applies to redis only")
    if config.cluster and config.backend == "memory":
        raise ValueError("--cluster applies to redis and etcd only")
    if config.sentinel and (config.backend != "redis" or config.volatile):
        raise ValueError("--sentinel applies to redis (with persistence) only")
    mutant_for = {
        "ignore-limit": "semaphore",
        "del-release": "counter",
        "admit-all": "counter",
        "commit-before-log": "transfers",
        "unchecked-term": "election",
    }
    if config.mutant and mutant_for.get(config.mutant) != config.workload:
        raise ValueError(
            f"mutant {config.mutant!r} applies to the {mutant_for.get(config.mutant)} workload"
        )
    if config.workload == "transfers" and config.volatile:
        raise ValueError(
            "transfers need a durable decision log: a Redis without persistence forgets "
            "decisions on restart (run transfers on redis without --volatile)"
        )
    load = workload(config.workload, config)
    weights = config.fault_weights()
    schedule = nemesis.plan(
        config.seed,
        duration=config.duration,
        kinds=weights,
        slots=config.clients,
        ttl=load.pause_scale,
        points=_points(config, load),
    )
    started = time.monotonic()
    env = Environment(config)
    namespace = f"faults-{config.seed}-{uuid.uuid4().hex[:8]}"
    directory = _directory(config)
    env.directory = directory
    try:
        env.start()
        try:
            report = _run(config, env, load, schedule, directory, namespace, started)
        finally:
            env.stop()
    except BaseException:
        print(f"randomized run failed; its history is in {directory}", file=sys.stderr)
        raise
    if report.ok and not config.keep:
        shutil.rmtree(directory, ignore_errors=True)
    else:  # keep the evidence
        report.directory = str(directory)
        _dump(report, directory)
    return report


def _dump(report: Report, directory: Path) -> None:
    (directory / "report.txt").write_text(report.render() + "\n")
    with (directory / "history.txt").open("w") as out:
        for op in report.history.ops:
            out.write(op.describe() + "\n")
        for fault in report.history.faults:
            out.write("FAULT " + fault.describe() + "\n")


def _run(
    config: Config,
    env: Environment,
    load: Workload,
    schedule: list[nemesis.Planned],
    directory: Path,
    namespace: str,
    started: float,
) -> Report:
    ttl = config.lock_ttl
    request_timeout = REQUEST_TIMEOUT[config.backend]

    def make_spec(process: str) -> Spec:
        return Spec(
            workload=config.workload,
            url=env.url,
            namespace=namespace,
            process=process,
            history=str(directory / f"{process}.jsonl"),
            seed=config.seed,
            ttl=ttl,
            request_timeout=request_timeout,
            acquire_timeout=2 * ttl + 1.0,
            mutant=config.mutant,
            extra={"aio": config.aio, "fair": config.fair},
        )

    with dcoord.connect(env.url, namespace=namespace) as admin:
        load.prepare(admin)
    pool: Pool
    if config.backend == "memory":
        pool = ThreadPool(make_spec, load.worker(), config.clients)
    else:
        pool = ProcessPool(make_spec, directory, config.clients)
    recorder = Recorder(directory / "nemesis.jsonl", "nemesis")
    recorder.meta(seed=config.seed, config=config.describe(), command=config.command())

    def busy(process: str) -> bool:
        event = last_event(directory / f"{process}.jsonl")
        return event is not None and load.busy(event)

    nem = nemesis.Nemesis(schedule, env.controls(pool, busy), recorder, config.seed)
    problems: list[str] = []
    try:
        for slot in range(config.clients):
            pool.spawn(slot)
        _wait_started(pool, directory)
        begin = time.monotonic()  # the schedule's clock starts once every worker runs
        nem.start()
        time.sleep(max(0.0, begin + config.duration - time.monotonic()))
    finally:
        nem.stop()
        env.heal()
        problems += pool.stop(timeout=3 * ttl + 2 * request_timeout + 5.0)
        recorder.close()
    if nem.error is not None:
        raise RuntimeError(f"the nemesis failed: {nem.error!r}") from nem.error

    bound = load.liveness_bound()
    probe = Recorder(directory / "liveness.jsonl", "liveness")
    with dcoord.connect(env.url, namespace=namespace) as client:
        load.probe(client, probe, bound)
        final = load.final_state(client)
    probe.close()

    history = merge(directory)
    violations, findings = load.check(history, final, env.loss_windows(history))
    violations += checkers.liveness(history, bound)
    if problems:  # a worker that hung or died of an unexpected error
        violations.append(checkers.Violation("workers", f"{len(problems)} workers", problems))
    return Report(
        config=config,
        history=history,
        violations=violations,
        findings=findings,
        planned=schedule,
        elapsed=time.monotonic() - started,
    )


def _wait_started(pool: Pool, directory: Path, timeout: float = 30.0) -> None:
    """Wait until every worker has recorded its first operation."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(last_event(directory / f"{n}.jsonl") for n in pool.names().values()):
            return
        time.sleep(0.05)
    raise RuntimeError(f"workers did not start within {timeout:g} s (see their .log files)")


def with_seed(config: Config, seed: int) -> Config:
    return replace(config, seed=seed)


def parse_args(argv: list[str]) -> tuple[Config, int]:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.randomized",
        description="Randomized fault injection against dcoord locks and transactions.",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="memory")
    parser.add_argument("--workload", choices=WORKLOAD_NAMES, default="counter")
    parser.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    parser.add_argument(
        "--seeds", type=int, default=1, metavar="N", help="run N seeds: seed, seed+1, ..."
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--clients", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--volatile", action="store_true", help="redis: no persistence")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="etcd: three members; redis: a Redis Cluster (three primaries, one replica each)",
    )
    parser.add_argument("--sentinel", action="store_true", help="redis: a Sentinel set")
    parser.add_argument("--mutant", choices=MUTANTS)
    parser.add_argument("--faults", help="comma-separated fault kinds (default: all that apply)")
    parser.add_argument("--ttl", type=float, help="lock TTL in seconds")
    parser.add_argument("--points", help="crash-at: comma-separated failpoints to choose from")
    parser.add_argument("--keep", metavar="DIR", help="keep the history files in DIR")
    parser.add_argument("--servers", choices=("containers", "processes"), dest="using")
    parser.add_argument("--aio", action="store_true", help="transfers: odd workers async")
    parser.add_argument("--fair", action="store_true", help="counter: fair locks")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.seeds < 1:
        parser.error("--clients, --duration and --seeds must be positive")
    config = Config(
        backend=args.backend,
        workload=args.workload,
        seed=args.seed,
        duration=args.duration,
        clients=args.clients,
        volatile=args.volatile,
        cluster=args.cluster,
        sentinel=args.sentinel,
        mutant=args.mutant,
        faults=tuple(args.faults.split(",")) if args.faults else None,
        ttl=args.ttl,
        points=tuple(args.points.split(",")) if args.points else None,
        keep=args.keep,
        using=args.using,
        aio=args.aio,
        fair=args.fair,
    )
    return config, args.seeds


def main(argv: list[str]) -> int:
    """Run the seeds; exit 0 if every run was clean, 1 on a violation, 2 on an error."""
    try:
        config, seeds = parse_args(argv)
        failed = 0
        for seed in range(config.seed, config.seed + seeds):
            report = run(with_seed(config, seed))
            print(report.render(), end="\n\n", flush=True)
            failed += not report.ok
    except (ValueError, RuntimeError, dcoord.DcoordError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if seeds > 1:
        print(f"{seeds - failed} of {seeds} seeds clean")
    return 1 if failed else 0
