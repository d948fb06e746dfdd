"""Async semaphores on etcd, and the queue slot async read-write locks share.

The sync slots' :class:`.semaphore.Queue` (same keys, same admission: fewer than
``limit`` counted keys created before ours) driven as :mod:`.aio_locks` drives a lock,
with its leases (the client's shared lease of the TTL, or a private one without
auto-renewal): the key is removed on release, on a timeout and on a cancellation (so
nothing of the attempt is left in the queue). A waiter watches the counted range for
deletes (a release, an expiry) and checks its place again; puts do not wake it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .aio_locks import AsyncEtcdLocks, AsyncEtcdLockSlot
from .leases import Lease
from .semaphore import Queue, semaphore_queue

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdBackend


class AsyncEtcdQueueSlot(AsyncEtcdLockSlot):
    """One async handle's key in a :class:`.semaphore.Queue`: the async lock slot's
    leases, release and renewal with the queue's admission."""

    def __init__(
        self, locks: AsyncEtcdLocks, what: str, queue: Queue, ttl: float, auto_renew: bool
    ) -> None:
        super().__init__(locks, what, ttl, auto_renew)
        self.name = what  # (the lock slot's messages say "lock {name!r}")
        self.prefix = queue.own
        self._queue = queue

    def _new_key(self, lease: Lease) -> bytes:
        return self._queue.key(lease.id, self._locks.next_serial())

    async def _enqueue(self, key: bytes, lease: Lease, bound: float | None) -> tuple[int, bool]:
        response = await self._backend.txn(
            self._queue.enqueue(key, lease.id),
            what=f"acquire {self.name}",
            retry=True,
            timeout=self._budget(bound),
        )
        return self._queue.enqueued(response)

    async def _wait(
        self, key: bytes, revision: int, lease: Lease, deadline: float | None, bound: float | None
    ) -> str:
        """Wait for our turn: "acquired", "timeout", or "requeue" (our key, or its lease,
        is gone)."""
        check = self._queue.check(key, revision)
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            if not lease.usable:
                return "requeue"
            response = await self._backend.txn(
                check, what=f"wait for {self.name}", retry=True, timeout=self._budget(bound)
            )
            outcome = self._queue.checked(response)
            if outcome is not None:
                return outcome
            # Any delete in the counted range after the check may admit us: a semaphore
            # frees permits in any order, so no single predecessor can be watched.
            await self._wait_deleted(
                self._queue.counted,
                response.header.revision + 1,
                lease,
                deadline,
                bound,
                range_end=self._queue.counted_end,
            )


class AsyncEtcdSemaphores:
    """The async semaphore store of one etcd backend."""

    def __init__(self, backend: AsyncEtcdBackend) -> None:
        self._locks = backend.locks
        self._prefix = backend.prefix

    def slot(self, name: str, limit: int, ttl: float, auto_renew: bool) -> AsyncEtcdQueueSlot:
        what, queue = semaphore_queue(self._prefix, name, limit)
        return AsyncEtcdQueueSlot(self._locks, what, queue, ttl, auto_renew)
