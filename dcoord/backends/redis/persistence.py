"""What a Redis server keeps: through a crash (AOF, fsync), under memory pressure and
through a failover (replication).

Read with ``CONFIG GET``; where that is refused (an ACL without ``CONFIG``, or the
command renamed) with ``INFO persistence`` / ``INFO memory``, which show whether the AOF
is on and the eviction policy but not ``appendfsync``. On a Redis Cluster every node is
read (a replica becomes a primary at a failover, with its own settings). Replication
comes from ``INFO replication`` and the client's own ``min_replicas`` option. The
transaction log
(:meth:`~dcoord.backends.redis.txlog.RedisTxLog.durability`) and the locks
(:class:`LockEvictionCheck`) turn what was read into a ``DurabilityWarning``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import BackendError, BackendUnavailable, DurabilityWarning
from . import topology

if TYPE_CHECKING:
    from . import RedisBackend

log = logging.getLogger("dcoord.redis")


@dataclass(frozen=True)
class Persistence:
    """The server's settings; None where they could not be read."""

    appendonly: str | None
    appendfsync: str | None
    maxmemory_policy: str | None
    unread: str = ""
    """Why some settings are None (CONFIG GET refused), empty when all were read."""
    replication: ReplicationSetup | None = None
    """The replication set-up; None where it was not read (INFO replication refused)."""


@dataclass(frozen=True)
class ReplicationSetup:
    """Who copies the server's writes, and how many copies a write waits for."""

    topology: str
    """The client's topology: ``single``, ``sentinel`` or ``cluster``."""
    role: str | None
    """``master`` or ``slave`` (INFO's words) of the server the client reached."""
    connected_replicas: int
    min_replicas_to_write: int | None
    """The server's ``min-replicas-to-write`` (None: CONFIG GET refused)."""
    min_replicas: int
    """The client's ``min_replicas`` option: replicas a forced log write waits for."""

    @property
    def failover(self) -> bool:
        """Whether something may promote a replica over this server's head: Sentinel
        and Cluster do it by themselves."""
        return self.topology in ("sentinel", "cluster")

    def describe(self) -> str:
        """One line for messages and ``dcoord doctor``."""
        server = "unreadable" if self.min_replicas_to_write is None else self.min_replicas_to_write
        return (
            f"{self.topology} topology, role {self.role or '?'}, "
            f"{self.connected_replicas} connected replica(s), "
            f"min-replicas-to-write {server} (server), min_replicas {self.min_replicas} (client)"
        )


def read(backend: RedisBackend) -> Persistence | str:
    """The settings, or why none could be read (both CONFIG GET and INFO refused)."""
    client = backend.redis
    try:
        config = backend.call(
            lambda: _merged(
                topology.on_every_node(
                    client,
                    "config_get",
                    "appendonly",
                    "appendfsync",
                    "maxmemory-policy",
                    "min-replicas-to-write",
                )
            ),
            what="read redis persistence settings",
            retry=True,
        )
    except BackendError as exc:
        config_refused = f"CONFIG GET refused: {exc}"
    else:
        minimum = _lowest(config.get("min-replicas-to-write"))
        return from_config(config, read_replication(backend, minimum))

    def both() -> dict[str, Any]:
        persistence = topology.on_every_node(client, "info", "persistence")
        memory = topology.on_every_node(client, "info", "memory")
        return _merged({node: {**persistence[node], **memory[node]} for node in persistence})

    try:
        info = backend.call(
            both,
            what="read redis persistence and memory info",
            retry=True,
        )
    except BackendError as exc:
        return f"{config_refused}; INFO refused: {exc}"
    return from_info(info, config_refused, read_replication(backend, None))


def from_config(
    config: Mapping[Any, Any], replication: ReplicationSetup | None = None
) -> Persistence:
    """The settings a ``CONFIG GET`` answered (shared by the sync and async readers)."""
    return Persistence(
        appendonly=_str(config.get("appendonly")),
        appendfsync=_str(config.get("appendfsync")),
        maxmemory_policy=_str(config.get("maxmemory-policy")),
        replication=replication,
    )


def from_info(
    info: Mapping[str, Any], config_refused: str, replication: ReplicationSetup | None = None
) -> Persistence:
    """The settings ``INFO persistence`` + ``INFO memory`` show (no ``appendfsync``)."""
    aof = info.get("aof_enabled")
    return Persistence(
        # Nodes that differ give a text no check accepts (see _merged).
        appendonly=None if aof is None else {"1": "yes", "0": "no"}.get(str(aof), str(aof)),
        appendfsync=None,  # INFO does not show it
        maxmemory_policy=_str(info.get("maxmemory_policy")),
        unread=config_refused,
        replication=replication,
    )


def read_replication(
    backend: RedisBackend, min_replicas_to_write: int | None
) -> ReplicationSetup | None:
    """The replication set-up of the server ``backend`` reaches (None: INFO refused)."""
    client: Any = backend.redis
    try:
        info = backend.call(
            lambda: client.info("replication"), what="read redis replication", retry=True
        )
    except BackendError:
        return None
    return ReplicationSetup(
        topology=backend.settings.topology,
        role=_str(info.get("role")),
        connected_replicas=int(info.get("connected_slaves", 0)),
        min_replicas_to_write=min_replicas_to_write,
        min_replicas=int(backend.settings.options["min_replicas"]),
    )


def log_problem(found: Persistence | str) -> str | None:
    """Why the transaction log might lose a record on this server, or None."""
    if isinstance(found, str):
        return f"its persistence settings cannot be checked ({found})"
    problems = []
    if found.appendonly is None:
        problems.append(f"appendonly cannot be read ({found.unread})")
    elif found.appendonly != "yes":
        problems.append("redis has appendonly off: a server crash loses recent decisions")
    elif found.appendfsync is None:
        problems.append(
            f"appendfsync cannot be read ({found.unread}; INFO does not show it), so "
            "whether a server crash can lose the last second of decisions is unknown"
        )
    elif found.appendfsync != "always":
        problems.append(
            f"redis has appendfsync {found.appendfsync}, not always: "
            "a server crash can lose the last second of decisions"
        )
    eviction = _eviction(found, "unfinished transaction records and their index")
    if eviction is not None:
        problems.append(eviction)
    replication = found.replication
    if replication is not None and replication.failover and replication.min_replicas < 1:
        # Replication is asynchronous: the primary acknowledges a decision before any
        # replica has it, and a failover in between promotes a replica without it.
        problems.append(
            f"min_replicas is 0 on a redis {replication.topology} topology: a failover "
            "can lose acknowledged decisions; set the URL option min_replicas=1 (each "
            "forced decision then waits for a replica)"
        )
    return "; ".join(problems) or None


def lock_problem(found: Persistence | str) -> str | None:
    """Why a held lock might vanish before its TTL on this server, or None."""
    if isinstance(found, str):
        return f"whether redis may evict held locks cannot be checked ({found})"
    return _eviction(found, "held locks, so that a second client acquires a held lock")


def _eviction(found: Persistence, victims: str) -> str | None:
    policy = found.maxmemory_policy
    if policy is None:
        return f"maxmemory-policy cannot be read ({found.unread or 'not in INFO'})"
    if policy == "noeviction":
        return None
    # allkeys-* may pick any key; volatile-* keys with a TTL, which every lock has. Both
    # can remove what the protocol relies on, so only noeviction is safe.
    return (
        f"redis has maxmemory-policy {policy}, not noeviction: under memory pressure "
        f"it may evict keys such as {victims}"
    )


class LockEvictionCheck:
    """Warns (``DurabilityWarning``), once per client, at its first lock, when the server
    may evict held locks. A server that cannot be reached is checked at the next lock."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._done = False
        self._mutex = threading.Lock()

    def __call__(self) -> None:
        with self._mutex:
            if self._done:
                return
            self._done = True
        try:
            problem = lock_problem(read(self._backend))
        except BackendUnavailable as exc:
            log.debug("eviction policy not checked (will retry at the next lock): %s", exc)
            with self._mutex:
                self._done = False
            return
        if problem is not None:
            warnings.warn(
                f"locks on {self._backend.settings.url} may be lost before their TTL: {problem}",
                DurabilityWarning,
                stacklevel=5,  # this, RedisLocks.slot, Lock.__init__, Client.lock, the caller
            )


def _merged(by_node: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings of every node as one: a setting the nodes of a Cluster disagree on
    reads ``value on node, value on node ...``, which no check accepts."""
    merged: dict[str, Any] = {}
    for name in set().union(*by_node.values()):
        values = {node: settings.get(name) for node, settings in sorted(by_node.items())}
        if len({str(value) for value in values.values()}) == 1:
            merged[name] = next(iter(values.values()))
        else:
            merged[name] = ", ".join(f"{value} on {node}" for node, value in values.items())
    return merged


def _lowest(value: Any) -> int | None:
    """The smallest of a setting's values (nodes of a Cluster that disagree read
    ``value on node, ...``, see _merged): the weakest node is what a check must judge."""
    if value is None:
        return None
    return min(int(part.split(" ", 1)[0]) for part in str(value).split(", "))


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
