"""Async fenced locks in the embedded store: the sync store's table, async waiting.

Grants, releases, extensions and fences are the sync slot's own steps (each a short
critical section under the table's mutex, never waiting), so a sync and an async client
of one ``memory://`` store exclude each other on one lock name. Only waiting differs: an
async waiter registers a waker on the lock's entry that sets an :class:`asyncio.Event`
on the waiter's loop (thread-safely), and a release wakes sync and async waiters alike.
"""

from __future__ import annotations

import asyncio
import functools
import time

from ..._version import __version__
from ...config import Settings
from ..aio_base import EXTEND_EACH, ExtendEach
from ..base import LockGrant, ServerInfo
from . import memory_server
from .aio_election import AsyncMemoryElections
from .aio_kv import AsyncMemoryKV
from .aio_membership import AsyncMemoryGroups
from .aio_rwlock import AsyncMemoryRWLocks
from .aio_semaphore import AsyncMemorySemaphores
from .aio_txlog import AsyncMemoryTxLog
from .election import MemoryElections
from .kv import MemoryKV
from .locks import MemoryLocks, MemoryLockSlot
from .membership import MemoryGroups
from .rwlock import MemoryRWLocks
from .semaphore import MemorySemaphores
from .txlog import MemoryTxLog


class AsyncMemoryLocks:
    """The async lock store of one memory backend (shares :class:`MemoryLocks`' table)."""

    def __init__(self, locks: MemoryLocks) -> None:
        self._locks = locks

    @property
    def store(self) -> MemoryLocks:
        """The sync store whose table this one shares (read by inspection)."""
        return self._locks

    def slot(
        self, name: str, ttl: float, auto_renew: bool, fair: bool = False
    ) -> AsyncMemoryLockSlot:
        return AsyncMemoryLockSlot(self._locks.slot(name, ttl, auto_renew, fair))

    async def admit(self, resource: str, token: int) -> bool:
        return self._locks.admit(resource, token)

    async def write(self, resource: str, token: int, key: str, value: bytes) -> bool:
        return self._locks.write(resource, token, key, value)

    async def highest(self, resource: str) -> int | None:
        return self._locks.highest(resource)

    async def close(self) -> None:
        """Nothing runs in the background."""


class AsyncMemoryLockSlot:
    def __init__(self, slot: MemoryLockSlot) -> None:
        self._slot = slot
        self._mutex = slot._table.mutex

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        token = object()
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        waker = functools.partial(loop.call_soon_threadsafe, woken.set)
        entry = None
        queued = False  # a fair waiter's token is in the entry's queue (sync ones' too)
        try:
            while True:
                with self._mutex:
                    now = time.monotonic()
                    entry = self._slot.entry()
                    if self._slot.may_take(entry, token, now):
                        if queued:
                            entry.queue.popleft()
                            queued = False
                            # Waiters behind us wait for the lock free: tell them it is not.
                            entry.wake()
                        return self._slot.try_grant(token, now)
                    if deadline is not None and now >= deadline:
                        return None
                    if self._slot.fair and not queued:
                        entry.queue.append(token)
                        queued = True
                    # Free but another fair waiter's turn: until it has taken it.
                    wait = None if entry.free(now) else entry.expires_at - now
                    if deadline is not None:
                        wait = deadline - now if wait is None else min(wait, deadline - now)
                    # Registered under the mutex that a release takes: no wake-up is missed.
                    entry.wakers.add(waker)
                    entry.waiters += 1
                    woken.clear()
                try:
                    # Woken by a release; otherwise at the holder's expiry or our deadline.
                    # A cancellation lands here, and the finallys leave nothing registered.
                    await asyncio.wait_for(woken.wait(), wait)
                except TimeoutError:
                    pass
                finally:
                    with self._mutex:
                        entry.wakers.discard(waker)
                        entry.waiters -= 1
        finally:
            if queued and entry is not None:  # gave up (deadline, cancel): the next may go
                with self._mutex:
                    entry.queue.remove(token)
                    entry.wake()

    async def release(self) -> bool:
        return self._slot.release()

    async def extend(self, ttl: float) -> LockGrant | None:
        return self._slot.extend(ttl)

    def renewal_batch(self) -> ExtendEach:
        """Renewals of many memory locks are one pass of one task (nothing to wait for)."""
        return EXTEND_EACH


class AsyncMemoryBackend:
    """The async side of ``memory://NAME``: the same process-wide store as the sync one."""

    kind = "memory"

    def __init__(self, settings: Settings) -> None:
        self.server = memory_server(settings.database)
        self.prefix = f"{settings.namespace}/"
        self.locks = AsyncMemoryLocks(
            MemoryLocks(self.server, self.prefix, settings.options["label"])
        )
        self.semaphores = AsyncMemorySemaphores(MemorySemaphores(self.server, self.prefix))
        self.rwlocks = AsyncMemoryRWLocks(MemoryRWLocks(self.server, self.prefix))
        self.groups = AsyncMemoryGroups(MemoryGroups(self.server, self.prefix))
        self.elections = AsyncMemoryElections(MemoryElections(self.server, self.prefix))

    async def start(self) -> None:
        """Nothing to connect to."""

    async def ping(self) -> ServerInfo:
        return ServerInfo(
            kind=self.kind, version=__version__, endpoint=f"memory://{self.server.name}"
        )

    @functools.cached_property
    def txlog(self) -> AsyncMemoryTxLog:
        """The 2PC log (the sync clients' log of this store and namespace)."""
        return AsyncMemoryTxLog(MemoryTxLog(self.server, self.prefix))

    @functools.cached_property
    def kv_store(self) -> AsyncMemoryKV:
        """Plain keys (the sync clients' keys of this store and namespace)."""
        return AsyncMemoryKV(MemoryKV(self.server, self.prefix))

    async def close(self) -> None:
        """The store outlives its clients, like a server would."""
