"""Semaphores in the embedded store, and the FIFO queue that read-write locks share.

A :class:`_Queue` per name holds every holder *and* every waiter in arrival order, as
etcd's keys ordered by create revision do. An entry is admitted when fewer than
``limit`` of the entries before it count against it: for a semaphore every earlier
entry counts; for a read-write lock a writer (``exclusive``) counts every earlier entry
with limit 1, a reader only earlier writers. A waiter stays queued while it waits, so a
waiting writer blocks the readers behind it. Entries expire on the monotonic clock
(holders by their TTL, waiters unless they re-arm while they wait); fences are a counter
per name, incremented at each grant.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...convoyfree import ConvoyFreeLock, convoy_free_condition
from ...perkey import PerKey
from ..base import LockGrant

if TYPE_CHECKING:
    from . import MemoryServer


class _Entry:
    __slots__ = ("exclusive", "expires_at", "fence")

    def __init__(self, exclusive: bool, expires_at: float) -> None:
        self.exclusive = exclusive
        self.expires_at = expires_at
        self.fence = 0  # set when granted


class _Queue:
    """Holders and waiters of one name, in arrival order, and its last fence."""

    def __init__(self, mutex: ConvoyFreeLock) -> None:
        self.entries: list[_Entry] = []
        self.fence = 0
        self.cond = convoy_free_condition(mutex)
        # Run (under the mutex) at every change: async waiters, which cannot wait on the
        # condition, get an event set on their own loop this way (dcoord.aio).
        self.wakers: set[Callable[[], object]] = set()

    def changed(self) -> None:
        """Wake every waiter, sync and async (an entry left: one behind it may go)."""
        self.cond.notify_all()
        for waker in self.wakers:
            waker()

    def prune(self, now: float) -> None:
        live = [e for e in self.entries if e.expires_at > now]
        if len(live) != len(self.entries):
            self.entries = live
            self.changed()  # an expiry may admit a waiter

    def admitted(self, entry: _Entry, limit: int) -> bool:
        ahead = 0
        for other in self.entries:
            if other is entry:
                return ahead < limit
            ahead += entry.exclusive or other.exclusive
        return False

    def next_expiry(self, entry: _Entry) -> float:
        """When the earliest entry ahead of ``entry`` expires (a wake-up backstop)."""
        ahead = [e.expires_at for e in self.entries[: self.entries.index(entry)]]
        return min(ahead, default=entry.expires_at)


class _Table:
    """Every queue of one memory store (semaphores and rwlocks, by prefixed name)."""

    def __init__(self) -> None:
        self.mutex = ConvoyFreeLock()  # (a plain lock forms a convoy here: convoyfree.py)
        self.queues: dict[str, _Queue] = {}


#: ``queue_table(server)``: the queues of ``server`` (shared by every client of that store).
queue_table: PerKey[MemoryServer, _Table] = PerKey(lambda server: _Table())


class MemoryQueueSlot:
    """One handle's place in a queue: a :class:`~dcoord.backends.base.LockSlot`."""

    def __init__(self, table: _Table, key: str, exclusive: bool, limit: int, ttl: float) -> None:
        self._table = table
        self._key = key
        self._exclusive = exclusive
        self._limit = limit
        self._ttl = ttl
        self._entry: _Entry | None = None

    def queue(self) -> _Queue:
        """The queue of this handle's name (made on first use; under the table's mutex)."""
        queue = self._table.queues.get(self._key)
        if queue is None:
            queue = self._table.queues[self._key] = _Queue(self._table.mutex)
        return queue

    def acquire(self, deadline: float | None) -> LockGrant | None:
        with self._table.mutex:
            queue = self.queue()
            now = time.monotonic()
            entry = self.enqueue(queue, now)
            while True:
                outcome = self.step(queue, entry, now, deadline)
                if not isinstance(outcome, float):
                    return outcome
                queue.cond.wait(max(0.0, outcome - now))
                now = time.monotonic()

    def enqueue(self, queue: _Queue, now: float) -> _Entry:
        """A new entry of this handle at the back of ``queue`` (under the table's mutex)."""
        entry = _Entry(self._exclusive, now + self._ttl)
        queue.entries.append(entry)
        return entry

    def step(
        self, queue: _Queue, entry: _Entry, now: float, deadline: float | None
    ) -> LockGrant | float | None:
        """One look at ``queue`` for our waiting ``entry``, under the table's mutex: the
        grant; None once the deadline passed (the entry is withdrawn); else the monotonic
        time to look again at the latest (a change of the queue wakes the waiter sooner).
        """
        queue.prune(now)
        if entry not in queue.entries:  # our waiter entry expired (a long stall)
            entry.expires_at = now + self._ttl
            queue.entries.append(entry)
        if queue.admitted(entry, self._limit):
            queue.fence += 1
            entry.fence, entry.expires_at = queue.fence, now + self._ttl
            self._entry = entry
            return LockGrant(entry.fence, entry.expires_at)
        if deadline is not None and now >= deadline:
            self.withdraw(queue, entry)
            return None
        # A waiter re-arms its entry on every wake-up; woken by releases and expiries,
        # at the latest when an entry ahead expires or at a third of the TTL (to re-arm),
        # or at the deadline.
        entry.expires_at = now + self._ttl
        wake = min(queue.next_expiry(entry), now + self._ttl / 3)
        return wake if deadline is None else min(wake, deadline)

    @staticmethod
    def withdraw(queue: _Queue, entry: _Entry) -> None:
        """Take a waiting ``entry`` out of ``queue`` (under the table's mutex)."""
        if entry in queue.entries:
            queue.entries.remove(entry)
            queue.changed()  # readers behind a writer may go now

    def release(self) -> bool:
        entry, self._entry = self._entry, None
        if entry is None:
            return False
        with self._table.mutex:
            queue = self._table.queues.get(self._key)
            if queue is None or entry not in queue.entries:
                return False
            queue.entries.remove(entry)
            queue.changed()
            return entry.expires_at > time.monotonic()

    def extend(self, ttl: float) -> LockGrant | None:
        entry = self._entry
        with self._table.mutex:
            queue = self._table.queues.get(self._key)
            now = time.monotonic()
            if entry is None or queue is None or entry not in queue.entries:
                return None
            if entry.expires_at <= now:
                return None
            entry.expires_at = now + ttl
            return LockGrant(entry.fence, entry.expires_at)


class MemorySemaphores:
    """The semaphore store of one memory backend."""

    def __init__(self, server: MemoryServer, prefix: str) -> None:
        self._table = queue_table(server)
        self._prefix = prefix

    def slot(self, name: str, limit: int, ttl: float, auto_renew: bool) -> MemoryQueueSlot:
        return MemoryQueueSlot(self._table, f"{self._prefix}sem/{name}", True, limit, ttl)
