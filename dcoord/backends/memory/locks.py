"""Fenced locks in the embedded store: condition variables, TTLs on the monotonic clock."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...convoyfree import ConvoyFreeLock, convoy_free_condition
from ...inspect import Identity, identity
from ...perkey import PerKey
from ..base import LockGrant

if TYPE_CHECKING:
    from . import MemoryServer


class _Entry:
    """One lock name: its holder's token and deadline, and the last fence handed out."""

    def __init__(self, mutex: ConvoyFreeLock) -> None:
        self.token: object | None = None
        self.expires_at = 0.0
        self.fence = 0
        self.cond = convoy_free_condition(mutex)
        # For inspection (dcoord.inspect): who holds the lock since when, who waits.
        self.holder: Identity | None = None
        self.acquired_at = 0.0
        self.waiters = 0
        # Async waiters (dcoord.backends.memory.aio_locks): each wakes its own task on
        # its own loop, thread-safely, so sync and async clients of one store interoperate.
        self.wakers: set[Callable[[], object]] = set()
        # Fair waiters' tokens in arrival order: the lock goes to the head.
        self.queue: deque[object] = deque()

    def free(self, now: float) -> bool:
        return self.token is None or now >= self.expires_at

    def grant(self, token: object, ttl: float, holder: Identity, now: float) -> LockGrant:
        """Hand the free lock to ``token`` (mutex held): the next fence, a new deadline."""
        self.fence += 1
        self.token, self.expires_at = token, now + ttl
        self.holder, self.acquired_at = holder, time.time()
        return LockGrant(self.fence, self.expires_at)

    def wake(self) -> None:
        """Wake every waiter, sync and async (mutex held)."""
        self.cond.notify_all()
        for waker in self.wakers:
            waker()


class _Table:
    """Every lock and fence of one memory store; ``mutex`` is their linearization point."""

    def __init__(self) -> None:
        self.mutex = ConvoyFreeLock()  # (a plain lock forms a convoy here: convoyfree.py)
        self.entries: dict[str, _Entry] = {}
        self.fences: dict[str, int] = {}


_table: PerKey[MemoryServer, _Table] = PerKey(lambda server: _Table())


class MemoryLocks:
    def __init__(self, server: MemoryServer, prefix: str, label: str | None = None) -> None:
        self._server = server
        self._table = _table(server)
        self._prefix = prefix
        self._identity = identity(label)

    @property
    def table(self) -> _Table:
        """Every lock of the store (for :mod:`dcoord.backends.memory.inspect`)."""
        return self._table

    @property
    def lock_prefix(self) -> str:
        """The table key of lock ``NAME`` is this prefix + ``NAME``."""
        return f"{self._prefix}lock/"

    def slot(self, name: str, ttl: float, auto_renew: bool, fair: bool = False) -> MemoryLockSlot:
        return MemoryLockSlot(self._table, self.lock_prefix + name, ttl, self._identity, fair)

    def admit(self, resource: str, token: int) -> bool:
        key = f"{self._prefix}fence/{resource}"
        with self._table.mutex:
            if self._table.fences.get(key, token) > token:
                return False
            self._table.fences[key] = token
            return True

    def write(self, resource: str, token: int, key: str, value: bytes) -> bool:
        fence_key = f"{self._prefix}fence/{resource}"
        # The fence table's mutex, then the store's: the check and the write are one step.
        with self._table.mutex:
            if self._table.fences.get(fence_key, token) > token:
                return False
            self._table.fences[fence_key] = token
            with self._server.cond:
                self._server.data[f"{self._prefix}kv/{key}"] = bytes(value)
            return True

    def highest(self, resource: str) -> int | None:
        with self._table.mutex:
            return self._table.fences.get(f"{self._prefix}fence/{resource}")

    def close(self) -> None:
        """Nothing runs in the background."""


class MemoryLockSlot:
    def __init__(
        self, table: _Table, key: str, ttl: float, holder: Identity, fair: bool = False
    ) -> None:
        self.fair = fair
        self._table = table
        self._key = key
        self._ttl = ttl
        self._token: object | None = None
        self._holder = holder

    def entry(self) -> _Entry:
        """This lock's entry, created on first use (mutex held)."""
        entry = self._table.entries.get(self._key)
        if entry is None:
            entry = self._table.entries[self._key] = _Entry(self._table.mutex)
        return entry

    def may_take(self, entry: _Entry, token: object, now: float) -> bool:
        """Whether ``token`` may take the lock at ``now`` (mutex held): it is free and,
        fair, no other waiter is ahead of ``token`` in the queue."""
        return entry.free(now) and (not self.fair or not entry.queue or entry.queue[0] is token)

    def try_grant(self, token: object, now: float) -> LockGrant | None:
        """Take the lock for ``token`` if it is free at ``now`` (mutex held)."""
        entry = self.entry()
        if not entry.free(now):
            return None
        self._token = token
        return entry.grant(token, self._ttl, self._holder, now)

    def acquire(self, deadline: float | None) -> LockGrant | None:
        token = object()
        with self._table.mutex:
            entry = self.entry()
            queued = False
            try:
                while True:
                    now = time.monotonic()
                    free = entry.free(now)
                    if self.may_take(entry, token, now):
                        if queued:
                            entry.queue.popleft()
                            queued = False
                            # Waiters behind us wait for the lock free: tell them it is not.
                            entry.cond.notify_all()
                        self._token = token
                        return entry.grant(token, self._ttl, self._holder, now)
                    if deadline is not None and now >= deadline:
                        return None
                    if self.fair and not queued:
                        entry.queue.append(token)
                        queued = True
                    # Woken by a release; otherwise at the holder's expiry or our deadline.
                    # A free lock another fair waiter is due to take: until it has.
                    wait: float | None = None if free else entry.expires_at - now
                    if deadline is not None:
                        wait = deadline - now if wait is None else min(wait, deadline - now)
                    entry.waiters += 1
                    try:
                        entry.cond.wait(wait)
                    finally:
                        entry.waiters -= 1
            finally:
                if queued:  # gave up (deadline, interrupt): the next in line may go
                    entry.queue.remove(token)
                    entry.wake()

    def release(self) -> bool:
        token, self._token = self._token, None
        with self._table.mutex:
            entry = self._table.entries.get(self._key)
            if token is None or entry is None or entry.token is not token:
                return False
            held = not entry.free(time.monotonic())
            entry.token = None
            entry.wake()
            return held

    def extend(self, ttl: float) -> LockGrant | None:
        with self._table.mutex:
            entry = self._table.entries.get(self._key)
            now = time.monotonic()
            if self._token is None or entry is None or entry.token is not self._token:
                return None
            if entry.free(now):
                return None
            entry.expires_at = now + ttl
            return LockGrant(entry.fence, entry.expires_at)
