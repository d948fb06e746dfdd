"""Read-write locks in the embedded store: the FIFO queue of :mod:`.semaphore`.

A writer counts every entry ahead of it (limit 1: admitted alone, at the head); a reader
counts only writers ahead of it, so a waiting writer blocks the readers queued after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .semaphore import MemoryQueueSlot, queue_table

if TYPE_CHECKING:
    from . import MemoryServer


class MemoryRWLocks:
    """The read-write lock store of one memory backend."""

    def __init__(self, server: MemoryServer, prefix: str) -> None:
        self._table = queue_table(server)
        self._prefix = prefix

    def slot(self, name: str, write: bool, ttl: float, auto_renew: bool) -> MemoryQueueSlot:
        return MemoryQueueSlot(self._table, f"{self._prefix}rw/{name}", write, 1, ttl)
