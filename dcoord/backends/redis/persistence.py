"""What a Redis server keeps: through a crash (AOF, fsync) and under memory pressure.

Read with ``CONFIG GET``; where that is refused (an ACL without ``CONFIG``, or the
command renamed) with ``INFO persistence`` / ``INFO memory``, which show whether the AOF
is on and the eviction policy but not ``appendfsync``. The transaction log
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
            lambda: client.config_get("appendonly", "appendfsync", "maxmemory-policy"),
            what="read redis persistence settings",
            retry=True,
        )
    except BackendError as exc:
        config_refused = f"CONFIG GET refused: {exc}"
    else:
        return from_config(config)
    try:
        info = backend.call(
            lambda: {**client.info("persistence"), **client.info("memory")},
            what="read redis persistence and memory info",
            retry=True,
        )
    except BackendError as exc:
        return f"{config_refused}; INFO refused: {exc}"
    return from_info(info, config_refused)


def from_config(config: Mapping[Any, Any]) -> Persistence:
    """The settings a ``CONFIG GET`` answered (shared by the sync and async readers)."""
    return Persistence(
        appendonly=_str(config.get("appendonly")),
        appendfsync=_str(config.get("appendfsync")),
        maxmemory_policy=_str(config.get("maxmemory-policy")),
    )


def from_info(info: Mapping[str, Any], config_refused: str) -> Persistence:
    """The settings ``INFO persistence`` + ``INFO memory`` show (no ``appendfsync``)."""
    aof = info.get("aof_enabled")
    return Persistence(
        appendonly=None if aof is None else "yes" if int(aof) else "no",
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


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
