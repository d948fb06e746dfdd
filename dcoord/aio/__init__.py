"""The asyncio API: the same locks and fences as :mod:`dcoord`, on the caller's loop.

::

    async with dcoord.aio.connect("redis://localhost:6379") as client:
        async with client.lock("reports", ttl=30) as lock:
            await client.fence("reports").write(lock.fence, "report", b"...")

I/O is native (``redis.asyncio``; the memory store wakes tasks itself): no thread pool,
no background thread. Renewals and pub/sub wake-ups are tasks on the loop that made the
client; :meth:`AsyncClient.close` cancels them. The rules (validity deadline, renewal
schedule, when a lock is lost) are :mod:`dcoord.core.lockstate`, shared with the sync
API, and so are the backends' scripts, keys and error mapping: a sync and an async
client on one server and namespace exclude each other on one lock name (and campaign in
one election: ``client.election(name)``).
"""

from __future__ import annotations

from .client import AsyncClient, connect
from .election import AsyncElection, AsyncLeadership, AsyncLeaderWatch
from .fence import AsyncFence
from .lock import AsyncLock
from .membership import AsyncGroup, AsyncJoinedMember, AsyncLiveRing
from .participants import AsyncKVParticipant, AsyncParticipant
from .rwlock import AsyncReadLock, AsyncReadWriteLock, AsyncWriteLock
from .semaphore import AsyncSemaphore
from .twopc import AsyncCoordinator, AsyncTransaction

__all__ = [
    "AsyncClient",
    "AsyncCoordinator",
    "AsyncElection",
    "AsyncFence",
    "AsyncGroup",
    "AsyncJoinedMember",
    "AsyncKVParticipant",
    "AsyncLeaderWatch",
    "AsyncLeadership",
    "AsyncLiveRing",
    "AsyncLock",
    "AsyncParticipant",
    "AsyncReadLock",
    "AsyncReadWriteLock",
    "AsyncSemaphore",
    "AsyncTransaction",
    "AsyncWriteLock",
    "connect",
]
