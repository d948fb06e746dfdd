"""Fenced locks on etcd: the etcd mutex recipe (client/v3/concurrency) over leases.

Every attempt puts its own key ``/dcoord/<ns>/lock/NAME/<lease id>-<serial>`` under the
lock's prefix (NAME with ``%``, ``/``, ``{``, ``}`` percent-encoded, so lock ``a`` never
sees the keys of lock ``a/b``). The serial is unique per attempt in this client, so two
handles of one client (which share a lease) queue as two keys and exclude each other,
and a key is never reused. The owner is the key with the lowest create revision; the
fence is the owner's create revision (Raft-committed, cluster-wide increasing, kept
across restarts). A waiter watches only the delete of its predecessor (the newest key
created before its own): FIFO, no thundering herd, not woken by puts.

Auto-renewed locks attach their key to the client's shared lease of their TTL, which the
client keeps alive (one keep-alive for all keys of that TTL). A lock without auto-renewal
gets a lease of its own that nobody keeps alive (but its waiter, while it queues), and
release revokes it. etcd rounds lease TTLs up to whole seconds, with a minimum of ~2 s.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_errors
from pyetcd.utils import prefix_range_end

from ...errors import BackendUnavailable
from ...scheduler import JobResult, Scheduler
from ..base import LockGrant, key_segment
from .leases import Lease

if TYPE_CHECKING:
    from . import EtcdBackend

log = logging.getLogger("dcoord.etcd")

_FENCE_WIDTH = 20  # decimal digits of 2**64: fixed width makes byte order numeric order
_CLEANUP_INTERVAL = 1.0


def _range(key: bytes, range_end: bytes | None = None, **options: Any) -> Any:
    request = etcdrpc.RangeRequest(key=key, **options)
    if range_end is not None:
        request.range_end = range_end
    return etcdrpc.RequestOp(request_range=request)


def _created_at(key: bytes, revision: int) -> Any:
    """A txn compare: ``key`` was created at ``revision`` (0: the key does not exist)."""
    return etcdrpc.Compare(
        key=key,
        target=etcdrpc.Compare.CREATE,
        result=etcdrpc.Compare.EQUAL,
        create_revision=revision,
    )


def _first_kv(response: Any) -> Any:
    kvs = response.response_range.kvs
    return kvs[0] if kvs else None


class EtcdLocks:
    """The lock store of one etcd backend."""

    def __init__(self, backend: EtcdBackend, scheduler: Scheduler) -> None:
        self.backend = backend
        self.etcd = backend.etcd
        self.prefix = backend.prefix
        self.scheduler = scheduler
        self._serial = itertools.count(1)

    def next_serial(self) -> int:
        return next(self._serial)

    def txn(self, request: Any, *, what: str, retry: bool = False) -> Any:
        """Run a raw TxnRequest (pyetcd's builder has no sorted or limited ranges)."""
        etcd = self.etcd

        def run() -> Any:
            try:
                return etcd.kvstub.Txn(
                    request,
                    etcd.timeout,
                    credentials=etcd.call_credentials,
                    metadata=etcd.metadata,
                )
            except grpc.RpcError as exc:
                etcd._manage_grpc_errors(exc)  # raises pyetcd's error for the code
                raise

        return self.backend.call(run, what=what, retry=retry)

    def slot(self, name: str, ttl: float, auto_renew: bool) -> EtcdLockSlot:
        return EtcdLockSlot(self, name, ttl, auto_renew)

    def admit(self, resource: str, token: int) -> bool:
        request = self._fenced(resource, token, [])
        # Re-admitting the same token is harmless, so a retry after a lost reply is safe.
        response = self.txn(request, what=f"admit fence {token} for {resource!r}", retry=True)
        return bool(response.succeeded or response.responses[0].response_txn.succeeded)

    def write(self, resource: str, token: int, key: str, value: bytes) -> bool:
        put = etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=f"{self.prefix}kv/{key}".encode(), value=value)
        )
        # Never retried: after a lost reply a newer holder may have written, and a retry
        # would then answer "rejected" for a write that happened.
        response = self.txn(
            self._fenced(resource, token, [put]),
            what=f"fenced write of {key!r} with fence {token} for {resource!r}",
        )
        return bool(response.succeeded or response.responses[0].response_txn.succeeded)

    def _fenced(self, resource: str, token: int, also: list[Any]) -> Any:
        """A txn that admits ``token`` for ``resource`` and, only then, runs ``also``."""
        key = f"{self.prefix}fence/{key_segment(resource)}".encode()
        value = str(token).zfill(_FENCE_WIDTH).encode()
        above = str(token + 1).zfill(_FENCE_WIDTH).encode()
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value))
        # value < token+1 fails on a missing key (etcd: no value to compare), so the
        # failure branch creates the key if it does not exist yet.
        create = etcdrpc.TxnRequest(
            compare=[_created_at(key, 0)],
            success=[put, *also],
        )
        return etcdrpc.TxnRequest(
            compare=[
                etcdrpc.Compare(
                    key=key,
                    target=etcdrpc.Compare.VALUE,
                    result=etcdrpc.Compare.LESS,
                    value=above,
                )
            ],
            success=[put, *also],
            failure=[etcdrpc.RequestOp(request_txn=create)],
        )

    def highest(self, resource: str) -> int | None:
        key = f"{self.prefix}fence/{key_segment(resource)}"
        value, _ = self.backend.call(
            lambda: self.etcd.get(key), what=f"read fence of {resource!r}", retry=True
        )
        return None if value is None else int(value)

    def forget(self, key: bytes, revision: int, lease: Lease, private: bool) -> None:
        """Remove a queue key now, or keep trying in the background until it is gone.

        A key left on a shared lease would block the lock for as long as the client
        lives, so giving up is not an option.
        """

        def attempt() -> JobResult:
            if lease.lost.is_set():
                return False  # the key went with its lease
            try:
                self.delete(key, revision, lease, private)
            except BackendUnavailable as exc:
                log.warning("could not remove lock key %s yet: %s", key.decode(), exc)
                return None
            return False

        if attempt() is None:
            self.scheduler.every(_CLEANUP_INTERVAL, attempt, name="etcd lock key cleanup")

    def delete(self, key: bytes, revision: int, lease: Lease, private: bool) -> bool:
        """Delete ``key`` if it is still the one created at ``revision``; True if it was.

        A private lease is revoked instead, which deletes its key.
        """
        if private:
            return self.revoke(lease)
        # revision 0: a key whose creation is unknown; it is unique to one attempt.
        request = etcdrpc.TxnRequest(
            compare=[_created_at(key, revision)] if revision else [],
            success=[etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))],
        )
        attempts = 0

        def once() -> Any:
            nonlocal attempts
            attempts += 1
            return self.txn(request, what=f"delete lock key {key.decode()}")

        response = self.backend.call(once, what=f"delete lock key {key.decode()}", retry=True)
        # A retry that finds nothing may follow a first attempt whose reply was lost.
        return bool(response.succeeded) or attempts > 1

    def revoke(self, lease: Lease) -> bool:
        """Revoke a private lease (deleting its key); False if it had already expired."""

        def revoke() -> bool:
            try:
                self.etcd.revoke_lease(lease.id)
            except grpc.RpcError as exc:
                if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                raise
            return True

        revoked = self.backend.call(revoke, what=f"revoke lease {lease.id:x}", retry=True)
        lease.mark_lost()
        return revoked

    def close(self) -> None:
        """Queue keys go with the client's leases, which the backend revokes at close."""


class EtcdLockSlot:
    """One handle's place in one lock's queue."""

    def __init__(
        self,
        locks: EtcdLocks,
        name: str,
        ttl: float,
        auto_renew: bool,
        *,
        prefix: str | None = None,
        value: bytes = b"",
    ) -> None:
        self._locks = locks
        self._leases = locks.backend.leases
        self.name = name
        # prefix and value let an election candidate queue by this same recipe under its
        # own prefix, its key holding the candidate's value (dcoord/election.py).
        self.value = value
        where = prefix if prefix is not None else f"{locks.prefix}lock/{key_segment(name)}"
        self.prefix = f"{where}/".encode()
        self._range_end = prefix_range_end(self.prefix)
        self._ttl = ttl
        self._private = not auto_renew
        self._key: bytes | None = None
        self._revision = 0
        self._lease: Lease | None = None

    # -- acquire -------------------------------------------------------------------

    def acquire(self, deadline: float | None) -> LockGrant | None:
        while True:
            lease = (
                self._leases.grant(self._ttl) if self._private else self._leases.lease(self._ttl)
            )
            key = self.prefix + f"{lease.id:016x}-{self._locks.next_serial():x}".encode()
            try:
                revision, owner = self._enqueue(key, lease)
            except BaseException:
                # The put may have happened with its reply lost: remove the key for sure.
                self._locks.forget(key, 0, lease, self._private)
                raise
            self._key, self._revision, self._lease = key, revision, lease
            try:
                outcome = "acquired" if owner == revision else self._wait(deadline)
            except BaseException:
                self._key = None
                self._locks.forget(key, revision, lease, self._private)
                raise
            if outcome == "acquired":
                return LockGrant(revision, lease.expires_at)
            self._key = None
            if outcome == "timeout":
                self._locks.forget(key, revision, lease, self._private)
                return None
            log.info("lock %r: queue key %s expired while waiting; queueing again", self.name, key)

    def _owner_range(self) -> Any:
        return _range(
            self.prefix,
            self._range_end,
            sort_order=etcdrpc.RangeRequest.ASCEND,
            sort_target=etcdrpc.RangeRequest.CREATE,
            limit=1,
            keys_only=True,
        )

    def _enqueue(self, key: bytes, lease: Lease) -> tuple[int, int]:
        """Create our key (idempotent: a retry finds it); return its and the owner's revision."""
        request = etcdrpc.TxnRequest(
            compare=[_created_at(key, 0)],
            success=[
                etcdrpc.RequestOp(
                    request_put=etcdrpc.PutRequest(key=key, value=self.value, lease=lease.id)
                ),
                self._owner_range(),
            ],
            failure=[_range(key, keys_only=True), self._owner_range()],
        )
        response = self._locks.txn(request, what=f"acquire lock {self.name!r}", retry=True)
        if response.succeeded:
            revision = response.header.revision
        else:
            revision = _first_kv(response.responses[0]).create_revision
        owner = _first_kv(response.responses[1])
        return revision, owner.create_revision if owner is not None else revision

    def _wait(self, deadline: float | None) -> str:
        """Wait for our turn: "acquired", "timeout", or "requeue" (our key vanished)."""
        assert self._key is not None and self._lease is not None
        key, revision, lease = self._key, self._revision, self._lease
        check = etcdrpc.TxnRequest(
            success=[
                _range(key, keys_only=True),
                self._owner_range(),
                _range(
                    self.prefix,
                    self._range_end,
                    sort_order=etcdrpc.RangeRequest.DESCEND,
                    sort_target=etcdrpc.RangeRequest.CREATE,
                    max_create_revision=revision - 1,
                    limit=1,
                    keys_only=True,
                ),
            ]
        )
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            response = self._locks.txn(check, what=f"wait for lock {self.name!r}", retry=True)
            mine, owner, predecessor = (_first_kv(r) for r in response.responses)
            if mine is None:
                return "requeue"
            if owner is not None and owner.create_revision == revision:
                return "acquired"
            if predecessor is None:
                continue  # deleted between the two reads of one txn: cannot happen; re-check
            self._wait_deleted(predecessor.key, response.header.revision + 1, lease, deadline)

    def _wait_deleted(
        self, key: bytes, from_revision: int, lease: Lease, deadline: float | None
    ) -> None:
        """Return when ``key`` is deleted (after ``from_revision``), or at the deadline."""
        woken = threading.Event()
        etcd = self._locks.etcd
        try:
            watch_id = self._locks.backend.call(
                lambda: etcd.add_watch_callback(
                    key,
                    lambda _response: woken.set(),
                    start_revision=from_revision,
                    filters=[etcdrpc.WatchCreateRequest.NOPUT],
                ),
                what=f"watch lock {self.name!r}",
            )
        except (etcd_errors.WatchTimedOut, etcd_errors.RevisionCompactedError):
            return  # re-check at once
        try:
            while not woken.is_set():
                # Wake at least once per lease TTL: a private lease is kept alive by its
                # waiter, and a lost shared lease (our key gone) is noticed.
                wait = lease.ttl / 3 if self._private else float(lease.ttl)
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return
                if woken.wait(wait):
                    return
                if self._private:
                    self._keep_alive(lease)
                elif lease.lost.is_set():
                    return
        finally:
            try:
                etcd.cancel_watch(watch_id)
            except Exception as exc:  # the watch stream may be gone already
                log.debug("cancel watch %s: %s", watch_id, exc)

    def _keep_alive(self, lease: Lease) -> bool:
        """One keep-alive of a private lease; False if it has expired."""
        sent = time.monotonic()
        responses = self._locks.backend.call(
            lambda: list(self._locks.etcd.refresh_lease(lease.id)),
            what=f"keep lease {lease.id:x} alive",
        )
        if not responses or responses[-1].TTL <= 0:
            return False
        lease.last_refreshed = sent
        return True

    # -- release / extend ----------------------------------------------------------

    def release(self) -> bool:
        key, lease, self._key = self._key, self._lease, None
        if key is None or lease is None:
            return False
        try:
            return self._locks.delete(key, self._revision, lease, self._private)
        except BackendUnavailable:
            self._locks.forget(key, self._revision, lease, self._private)
            raise

    def extend(self, ttl: float) -> LockGrant | None:
        lease = self._lease
        if self._key is None or lease is None or lease.lost.is_set():
            return None
        if not self._private:
            # The client keeps the shared lease alive; the lock lasts as long as it does.
            return LockGrant(self._revision, lease.expires_at)
        if ttl <= lease.ttl:
            if not self._keep_alive(lease):
                lease.mark_lost()
                return None
            return LockGrant(self._revision, lease.expires_at)
        return self._move_to_new_lease(ttl, lease)

    def _move_to_new_lease(self, ttl: float, old: Lease) -> LockGrant | None:
        # A lease's TTL cannot grow: attach the key to a longer lease instead. A put keeps
        # the key's create revision, so the fence and the queue order stay the same.
        assert self._key is not None
        new = self._leases.grant(ttl)
        request = etcdrpc.TxnRequest(
            compare=[_created_at(self._key, self._revision)],
            success=[
                etcdrpc.RequestOp(
                    request_put=etcdrpc.PutRequest(key=self._key, lease=new.id, ignore_value=True)
                )
            ],
        )
        try:
            moved = self._locks.txn(request, what=f"extend lock {self.name!r}").succeeded
        except BaseException:
            self._locks.revoke(new)
            raise
        if not moved:
            self._locks.revoke(new)
            return None
        self._lease = new
        try:
            self._locks.revoke(old)
        except BackendUnavailable as exc:
            log.info("old lease %x of lock %r expires by itself: %s", old.id, self.name, exc)
        return LockGrant(self._revision, new.expires_at)
