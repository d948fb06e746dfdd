"""Async read-write locks on etcd: the sync slots' queues (:func:`.rwlock.rwlock_queue`:
the same keys, writers counting every earlier key, readers only earlier writers' keys)
waited on by :class:`.aio_semaphore.AsyncEtcdQueueSlot`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .aio_semaphore import AsyncEtcdQueueSlot
from .rwlock import rwlock_queue

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdBackend


class AsyncEtcdRWLocks:
    """The async read-write lock store of one etcd backend."""

    def __init__(self, backend: AsyncEtcdBackend) -> None:
        self._locks = backend.locks
        self._prefix = backend.prefix

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> AsyncEtcdQueueSlot:
        what, queue = rwlock_queue(self._prefix, name, write)
        return AsyncEtcdQueueSlot(self._locks, what, queue, ttl, auto_renew)
