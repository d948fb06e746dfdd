"""Async read-write locks on Redis: the sync slots' recipe (rwlock.lua on the same keys,
see :mod:`.rwlock`) run by :class:`.aio_semaphore.AsyncScriptSlot`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .aio_semaphore import AsyncScriptSlot
from .rwlock import rwlock_recipe

if TYPE_CHECKING:
    from .aio_locks import AsyncRedisBackend


class AsyncRedisRWLocks:
    """The async read-write lock store of one Redis backend."""

    def __init__(self, backend: AsyncRedisBackend) -> None:
        self._backend = backend

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> AsyncScriptSlot:
        recipe = rwlock_recipe(self._backend.prefix, name, write)
        return AsyncScriptSlot(self._backend.locks, recipe, ttl)
