"""What a Redis server keeps: through a crash (AOF, fsync) and under memory pressure.

Read with ``CONFIG GET``; where that is refused (an ACL without ``CONFIG``, or the
command renamed) with ``INFO persistence`` / ``INFO memory``, which show whether the AOF
is on and the eviction policy but not ``appendfsync``. On a Redis Cluster every node is
read (a replica becomes a primary at a failover, with its own settings). The transaction log
(:meth:`~dcoord.backends.redis.txlog.RedisTxLog.durability`) and the locks
(:class:`LockEvictionCheck`) turn what was read into a ``DurabilityWarning``.
"""

from __future__ import annotations

import logging
import threading
import warnings
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


def read(backend: RedisBackend) -> Persistence | str:
    """The settings, or why none could be read (both CONFIG GET and INFO refused)."""
    client = backend.redis
    try:
        config = backend.call(
            lambda: _merged(
                topology.on_every_node(
                    client, "config_get", "appendonly", "appendfsync", "maxmemory-policy"
                )
            ),
            what="read redis persistence settings",
            retry=True,
        )
    except BackendError as exc:
        config_refused = f"CONFIG GET refused: {exc}"
    else:
        return Persistence(
            appendonly=_str(config.get("appendonly")),
            appendfsync=_str(config.get("appendfsync")),
            maxmemory_policy=_str(config.get("maxmemory-policy")),
        )

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
    aof = info.get("aof_enabled")
    return Persistence(
        # Nodes that differ give a text no check accepts (see _merged).
        appendonly=None if aof is None else {"1": "yes", "0": "no"}.get(str(aof), str(aof)),
        appendfsync=None,  # INFO does not show it
        maxmemory_policy=_str(info.get("maxmemory_policy")),
        unread=config_refused,
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


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
