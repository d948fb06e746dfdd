"""Leader elections on etcd: the election recipe of etcd's ``client/v3/concurrency``.

Every campaign puts its own candidate key ``/dcoord/<ns>/election/NAME/<lease>-<serial>``
(NAME percent-encoded as for locks), holding the candidate's value, on the client's shared
lease of its TTL. The leader is the key with the lowest create revision and its term is
that create revision, as Go's ``Election.Rev()``; a candidate waits for the delete of its
predecessor only. This is the queue of :class:`~dcoord.backends.etcd.locks.EtcdLockSlot`
under ``election/`` instead of ``lock/``, so it also re-checks its own key after every
wait (Go's Campaign does not) and never reports leadership on a key its lease lost.
``etcdctl elect`` and Go's ``concurrency.NewElection`` given the prefix
``/dcoord/<ns>/election/NAME`` see the same leader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyetcd import etcdrpc

from ..base import key_segment
from ..election_base import LeaderRecord
from .locks import EtcdLockSlot, _created_at, _first_kv
from .membership import EtcdSubscription

if TYPE_CHECKING:
    from . import EtcdBackend


def election_prefix(namespace_prefix: str, name: str) -> str:
    """The election's prefix, without the trailing slash (as ``etcdctl elect`` takes it)."""
    return f"{namespace_prefix}election/{key_segment(name)}"


class EtcdElections:
    def __init__(self, backend: EtcdBackend) -> None:
        self._backend = backend

    def candidate(self, name: str, ttl: float, value: bytes) -> EtcdCandidate:
        return EtcdCandidate(self._backend, name, ttl, value, self.prefix(name))

    def prefix(self, name: str) -> str:
        """The election's prefix, without the trailing slash (as ``etcdctl elect`` takes it)."""
        return election_prefix(self._backend.prefix, name)

    def leader(self, name: str) -> LeaderRecord | None:
        slot = self.candidate(name, 1, b"")
        request = etcdrpc.TxnRequest(success=[slot.owner_range(keys_only=False)])
        response = self._backend.locks.txn(request, what=f"read the leader of {name!r}", retry=True)
        owner = _first_kv(response.responses[0])
        if owner is None:
            return None
        return LeaderRecord(int(owner.create_revision), bytes(owner.value), None)

    def subscribe(self, name: str) -> EtcdSubscription:
        return EtcdSubscription(self._backend, self.prefix(name) + "/", name)

    def close(self) -> None:
        """Candidate keys go with the client's leases, which the backend revokes."""


class EtcdCandidate(EtcdLockSlot):
    """One campaign: a queue key on the shared lease, holding the candidate's value."""

    def __init__(
        self, backend: EtcdBackend, name: str, ttl: float, value: bytes, prefix: str
    ) -> None:
        super().__init__(backend.locks, name, ttl, True, prefix=prefix, value=value)

    def owner_range(self, *, keys_only: bool) -> Any:
        """The first-created candidate key (the leader), with its value if asked."""
        request = self._owner_range()
        request.request_range.keys_only = keys_only
        return request

    def proclaim(self, value: bytes) -> bool:
        key, lease = self._key, self._lease
        if key is None or lease is None or lease.lost.is_set():
            return False
        # Guarded by our key's create revision, as Go's Proclaim: a candidate that lost
        # its key never writes a value for someone else's term.
        request = etcdrpc.TxnRequest(
            compare=[_created_at(key, self._revision)],
            success=[
                etcdrpc.RequestOp(
                    request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease.id)
                )
            ],
        )
        # Safe to retry: putting the same value again keeps the key's create revision.
        response = self._locks.txn(request, what=f"proclaim in election {self.name!r}", retry=True)
        if response.succeeded:
            self.value = value
        return bool(response.succeeded)
