"""Async semaphores in the embedded store: the sync store's queues, async waiting.

Queueing, admission, grants, releases and fences are the sync slot's own steps
(:class:`.semaphore.MemoryQueueSlot`: ``enqueue``, ``step``, ``withdraw``, each a short
critical section under the table's mutex), so sync and async handles of one
``memory://`` store share one semaphore (and one read-write lock: :mod:`.aio_rwlock`).
Only waiting differs: an async waiter registers a waker on its name's queue that sets
an :class:`asyncio.Event` on the waiter's loop (thread-safely); every change of the
queue (a release, an expiry, a waiter that leaves) wakes sync and async waiters alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

from ..base import LockGrant
from .semaphore import MemoryQueueSlot, MemorySemaphores


class AsyncMemoryQueueSlot:
    """An :class:`~dcoord.backends.aio_base.AsyncLockSlot` over a sync queue slot."""

    def __init__(self, slot: MemoryQueueSlot) -> None:
        self._slot = slot
        self._mutex = slot._table.mutex

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        waker = functools.partial(loop.call_soon_threadsafe, woken.set)
        with self._mutex:
            queue = self._slot.queue()
            entry = self._slot.enqueue(queue, time.monotonic())
            # Registered under the mutex every change takes: no wake-up is missed.
            queue.wakers.add(waker)
        try:
            while True:
                with self._mutex:
                    woken.clear()
                    now = time.monotonic()
                    outcome = self._slot.step(queue, entry, now, deadline)
                if not isinstance(outcome, float):
                    return outcome
                # Woken by a change of the queue; otherwise when the step said to look.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), max(0.0, outcome - now))
        except BaseException:
            # Cancelled (or failed) while waiting: our entry leaves the queue, so it
            # blocks nobody (a waiting writer would hold up the readers behind it).
            with self._mutex:
                self._slot.withdraw(queue, entry)
            raise
        finally:
            with self._mutex:
                queue.wakers.discard(waker)

    async def release(self) -> bool:
        return self._slot.release()

    async def extend(self, ttl: float) -> LockGrant | None:
        return self._slot.extend(ttl)


class AsyncMemorySemaphores:
    """The async semaphore store of one memory backend (the sync store's queues)."""

    def __init__(self, semaphores: MemorySemaphores) -> None:
        self._semaphores = semaphores

    def slot(self, name: str, limit: int, ttl: float, auto_renew: bool) -> AsyncMemoryQueueSlot:
        return AsyncMemoryQueueSlot(self._semaphores.slot(name, limit, ttl, auto_renew))
