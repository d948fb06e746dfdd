"""The asyncio API: the primitives of :mod:`dcoord`, on the caller's loop.

::

    async with dcoord.aio.connect("redis://localhost:6379") as client:
        async with client.lock("reports", ttl=30) as lock:
            await client.fence("reports").write(lock.fence, "report", b"...")

Locks and fences, fair locks, semaphores, read-write locks, elections, membership and
live rings, two-phase commit and inspection, with the sync API's semantics and errors.
I/O is native (``redis.asyncio``, ``grpc.aio`` with pyetcd's stubs; the memory store
wakes tasks itself): no thread pool, no background thread. Renewals, keep-alives,
watches and pub/sub wake-ups are tasks on the loop that made the client;
:meth:`AsyncClient.close` cancels them. The rules (lock validity and renewal, election
terms, membership views, the 2PC protocol) are in :mod:`dcoord.core`, shared with the
sync API, and so are the backends' scripts, keys and error mapping: a sync and an async
client on one server and namespace exclude each other on one lock name, campaign in one
election, see the same members and finish each other's transactions.
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
