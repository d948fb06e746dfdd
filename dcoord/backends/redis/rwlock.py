"""Read-write locks on Redis: one Lua script (rwlock.lua), waiting writers block readers.

Keys of rwlock ``NAME`` (percent-encoded as lock names are) share one hash tag::

    dcoord:<ns>:rw:{NAME}:readers      sorted set: reader id -> expiry (ms, server TIME)
    dcoord:<ns>:rw:{NAME}:writer       the writer's id, with its TTL (PX)
    dcoord:<ns>:rw:{NAME}:waiting      sorted set: waiting writer id -> claim expiry
    dcoord:<ns>:rw:{NAME}:fence        the last fence handed out (never expires)
    dcoord:<ns>:rw:{NAME}:released     pub/sub channel releases are published on

A writer that finds the lock taken registers (or re-arms, every third of its TTL) a claim
in ``waiting``; a reader is refused while any claim is live, so readers drain and the
writer gets in. A writer that gives up withdraws its claim and wakes the readers; a dead
one's claim expires with its TTL. Waiting writers are not ordered among themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import key_segment
from .semaphore import ScriptSlot, recipe_script

if TYPE_CHECKING:
    from . import RedisBackend

RWLOCK = recipe_script("rwlock")


class RedisRWLocks:
    """The read-write lock store of one Redis backend."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> ScriptSlot:
        base = f"{self._backend.prefix}rw:{{{key_segment(name)}}}"
        channel = f"{base}:released"
        keys = [f"{base}:{part}" for part in ("readers", "writer", "waiting", "fence")]
        mode = "write" if write else "read"
        return ScriptSlot(
            self._backend,
            RWLOCK,
            keys,
            channel,
            f"rwlock {name!r} ({mode})",
            ttl,
            (mode, f"release-{mode}", f"extend-{mode}"),
            extra=[channel],
            give_up="unwait" if write else None,
        )
