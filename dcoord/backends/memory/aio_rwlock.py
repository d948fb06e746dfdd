"""Async read-write locks in the embedded store: the sync store's queues (see
:mod:`.rwlock`), waited on as :mod:`.aio_semaphore` waits."""

from __future__ import annotations

from .aio_semaphore import AsyncMemoryQueueSlot
from .rwlock import MemoryRWLocks


class AsyncMemoryRWLocks:
    """The async read-write lock store of one memory backend (the sync store's queues)."""

    def __init__(self, rwlocks: MemoryRWLocks) -> None:
        self._rwlocks = rwlocks

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> AsyncMemoryQueueSlot:
        return AsyncMemoryQueueSlot(self._rwlocks.slot(name, write, ttl, auto_renew))
