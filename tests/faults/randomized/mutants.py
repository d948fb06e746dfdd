"""Deliberately broken variants of our own code: the negative controls of the checkers.

A mutant is applied inside a worker to that worker's own client only (instance
attributes, never classes: thread workers share one process with the tests). The
checkers must then report violations within a few seeds; if one does not, the checker
is wrong.

``del-release``
    Release without the owner check: whoever holds the lock loses it. Redis: the release
    script is a plain ``DEL`` (plus the wake-up ``PUBLISH``). etcd has no single lock key
    (each waiter has its own key under the lock's prefix), so the equivalent is deleting
    the lock by name: the whole prefix, holder and queue. Memory: clear the entry
    whatever token holds it. Caught by the mutual-exclusion checker: a stale holder's
    release frees its successor's lock, and a third client runs alongside the successor.
``admit-all``
    The fence admits every token: ``admit`` always says yes and ``write`` always writes.
    Caught by the fence-order and fenced-counter checkers: a paused holder's stale write
    lands after its successor's (a lost update on the "fenced" counter).
``unchecked-term``
    The election workload's leader does not check its term: the fence admits every
    token, as ``admit-all`` (the election's own negative control). Caught by fence-order
    and fenced-counter: a leader paused past its TTL writes over its successor's term.
``commit-before-log``
    The coordinator sends commit to the participants before the COMMIT decision is in
    the log (see transfers.py). Caught by the transaction checkers: a crash between the
    two leaves participants committed under a transaction that recovery aborts.
``ignore-limit``
    The semaphore admits up to 1000 holders whatever its limit (semaphores.py applies
    it). Caught by the semaphore-limit checker: more than ``limit`` confirmed holds.
"""

from __future__ import annotations

import types
from typing import Any

import dcoord

MUTANTS = ("del-release", "admit-all", "commit-before-log", "unchecked-term", "ignore-limit")

_DEL_RELEASE_LUA = """
local n = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], 'released')
return n
"""


def apply(name: str | None, client: dcoord.Client) -> None:
    """Break ``client`` the way mutant ``name`` says (None: leave it correct)."""
    if name is None or name in ("commit-before-log", "ignore-limit"):  # in their workloads
        return
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; choose from {', '.join(MUTANTS)}")
    locks: Any = client.backend.locks
    if name in ("admit-all", "unchecked-term"):
        kv = client.backend.kv

        def write(resource: str, token: int, key: str, value: bytes) -> bool:
            kv.put(key, value)
            return True

        locks.admit = lambda resource, token: True
        locks.write = write
        return
    kind = client.backend.kind
    if kind == "redis":
        from dcoord.backends.redis.locks import LuaScript

        locks.release_script = LuaScript(_DEL_RELEASE_LUA)
        return
    release = _etcd_delete_by_name if kind == "etcd" else _memory_release_any
    original = locks.slot

    def slot(name: str, ttl: float, auto_renew: bool, fair: bool = False) -> Any:
        made = original(name, ttl, auto_renew, fair)
        made.release = types.MethodType(release, made)
        return made

    locks.slot = slot


def _memory_release_any(self: Any) -> bool:
    """MemoryLockSlot.release minus the token comparison."""
    self._token = None
    table = self._table
    with table.mutex:
        entry = table.entries.get(self._key)
        if entry is None or entry.token is None:
            return False
        entry.token = None
        entry.cond.notify_all()
        return True


def _etcd_delete_by_name(self: Any) -> bool:
    """EtcdLockSlot.release as "delete the lock called NAME": every key under its prefix."""
    self._key = None
    etcd = self._locks.etcd
    deleted = self._locks.backend.call(
        lambda: etcd.delete_prefix(self.prefix), what=f"release lock {self.name!r} (mutant)"
    )
    return bool(deleted.deleted)
