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
from .semaphore import Recipe, ScriptSlot, recipe_script

if TYPE_CHECKING:
    from . import RedisBackend

RWLOCK = recipe_script("rwlock")


def rwlock_recipe(prefix: str, name: str, write: bool) -> Recipe:
    """The keys, channel and operations of the read or write side of rwlock ``name``."""
    base = f"{prefix}rw:{{{key_segment(name)}}}"
    channel = f"{base}:released"
    mode = "write" if write else "read"
    return Recipe(
        RWLOCK,
        tuple(f"{base}:{part}" for part in ("readers", "writer", "waiting", "fence")),
        channel,
        f"rwlock {name!r} ({mode})",
        mode,
        f"release-{mode}",
        f"extend-{mode}",
        extra=(channel,),
        give_up="unwait" if write else None,
        wakes_all=True,
    )


class RedisRWLocks:
    """The read-write lock store of one Redis backend."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> ScriptSlot:
        return ScriptSlot(self._backend, rwlock_recipe(self._backend.prefix, name, write), ttl)
