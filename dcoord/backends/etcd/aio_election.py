"""Async leader elections on etcd: the sync store's recipe and keys, through ``grpc.aio``.

A candidate is an :class:`.aio_locks.AsyncEtcdLockSlot` queueing under the election's
prefix (:func:`.election.election_prefix`) with its value in its key, as the sync
:class:`.election.EtcdCandidate`: the leader is the key with the lowest create revision
and its term is that revision, so sync and async candidates (and ``etcdctl elect``)
queue in one line. As the sync candidate, each campaign puts its key on the client's
shared lease of its TTL (its renewal sends nothing: the client keeps the lease alive);
resigning deletes the key, and so does a cancelled or timed-out campaign, so no
candidate key is left in the queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyetcd import etcdrpc

from ..election_base import LeaderRecord
from .aio_locks import AsyncEtcdLockSlot
from .aio_membership import AsyncEtcdSubscription
from .election import election_prefix
from .locks import _created_at, _first_kv

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdBackend


class AsyncEtcdElections:
    """The async election store of one etcd backend."""

    def __init__(self, backend: AsyncEtcdBackend) -> None:
        self._backend = backend

    def candidate(self, name: str, ttl: float, value: bytes) -> AsyncEtcdCandidate:
        return AsyncEtcdCandidate(self._backend, name, ttl, value)

    async def leader(self, name: str) -> LeaderRecord | None:
        request = etcdrpc.TxnRequest(success=[self.candidate(name, 1, b"").owner_range()])
        response = await self._backend.txn(request, what=f"read the leader of {name!r}", retry=True)
        owner = _first_kv(response.responses[0])
        if owner is None:
            return None
        return LeaderRecord(int(owner.create_revision), bytes(owner.value), None)

    async def subscribe(self, name: str) -> AsyncEtcdSubscription:
        prefix = election_prefix(self._backend.prefix, name) + "/"
        subscription = AsyncEtcdSubscription(self._backend, name, prefix=prefix)
        await subscription.connect()
        return subscription


class AsyncEtcdCandidate(AsyncEtcdLockSlot):
    """One campaign: a queue key on the shared lease, holding the candidate's value."""

    def __init__(self, backend: AsyncEtcdBackend, name: str, ttl: float, value: bytes) -> None:
        prefix = election_prefix(backend.prefix, name)
        super().__init__(backend.locks, name, ttl, True, prefix=prefix, value=value)

    def owner_range(self) -> Any:
        """The first-created candidate key (the leader), with its value."""
        request = self._owner_range()
        request.request_range.keys_only = False
        return request

    async def proclaim(self, value: bytes) -> bool:
        key, lease = self._key, self._lease
        if key is None or lease is None or lease.lost.is_set():
            return False
        # Guarded by our key's create revision, as Go's Proclaim: a candidate that lost
        # its key never writes a value for someone else's term.
        put = etcdrpc.PutRequest(key=key, value=value, lease=lease.id)
        request = etcdrpc.TxnRequest(
            compare=[_created_at(key, self._revision)],
            success=[etcdrpc.RequestOp(request_put=put)],
        )
        # Safe to retry: putting the same value again keeps the key's create revision.
        response = await self._backend.txn(
            request, what=f"proclaim in election {self.name!r}", retry=True
        )
        if response.succeeded:
            self.value = value
        return bool(response.succeeded)
