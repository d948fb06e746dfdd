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

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_errors
from pyetcd.utils import prefix_range_end

from ...errors import BackendUnavailable, ClientClosed, DcoordError, PermissionDenied
from ...inspect import identity_json
from ...scheduler import JobResult, Scheduler
from ..base import LockGrant, LockSlot, Renewed, key_segment
from ..etcd_names import etcd_lock_prefix
from .leases import Lease, LeaseNotFound

if TYPE_CHECKING:
    from . import EtcdBackend

log = logging.getLogger("dcoord.etcd")

_FENCE_WIDTH = 20  # decimal digits of 2**64: fixed width makes byte order numeric order
_CLEANUP_INTERVAL = 1.0
# How long a request of an acquire may run past the acquire's deadline (one started just
# before it, or the first attempt at removing the queue key after it): what keeps
# acquire(timeout=T) within about T + 0.2 s while the server hangs.
_PAST_DEADLINE = 0.1


def request_budget(deadline: float | None, request_timeout: float) -> float:
    """How long the next request of an acquire ending at ``deadline`` may take (None:
    no deadline): until the deadline, at least ``_PAST_DEADLINE``, at most the request
    timeout (shared by :class:`EtcdLockSlot` and :mod:`.aio_locks`)."""
    if deadline is None:
        return request_timeout
    return min(request_timeout, max(_PAST_DEADLINE, deadline - time.monotonic()))


def cut_short(bound: float | None) -> bool:
    """Whether a request that failed in an acquire bounded by ``bound`` (None: not
    bounded) was cut short by that deadline: then the acquire timed out."""
    return bound is not None and time.monotonic() >= bound


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


def delete_txn(key: bytes, revision: int) -> Any:
    """A txn deleting queue ``key`` if it is still the one created at ``revision`` (0: a
    key whose creation is unknown; it is unique to one attempt, so delete it anyway);
    :func:`deleted` reads its reply (shared by :class:`EtcdLocks` and :mod:`.aio_locks`)."""
    return etcdrpc.TxnRequest(
        compare=[_created_at(key, revision)] if revision else [],
        success=[etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))],
    )


def deleted(response: Any) -> bool:
    """Whether the reply to a :func:`delete_txn` says it deleted the key."""
    return bool(response.succeeded and response.responses[0].response_delete_range.deleted)


def removal_outcome(removed: bool, attempts: int, what: str) -> bool:
    """What removing a queue key (a delete, or the revoke of its lease) that took
    ``attempts`` tries came to: ``removed``, or BackendUnavailable when only a retry found
    nothing (shared by :class:`EtcdLocks` and :mod:`.aio_locks`).

    Nothing found by the first attempt means the key was not there: False. Found by a
    retry, it may be the earlier attempt (its reply lost) that removed it, or the
    lease's expiry: the outcome is unknown, and claiming either would be a guess.
    """
    if not removed and attempts > 1:
        raise BackendUnavailable(
            f"{what}: the release outcome is unknown: a reply was lost and the retry "
            "found the key gone (released by the lost attempt, or expired before it)"
        )
    return removed


def fenced_txn(prefix: str, resource: str, token: int, also: list[Any]) -> Any:
    """A txn that admits ``token`` for ``resource`` and, only then, runs ``also``
    (shared by :class:`EtcdLocks` and :mod:`.aio_locks`)."""
    key = f"{prefix}fence/{key_segment(resource)}".encode()
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


class EtcdLocks:
    """The lock store of one etcd backend."""

    def __init__(self, backend: EtcdBackend, scheduler: Scheduler) -> None:
        self.backend = backend
        self.etcd = backend.etcd
        self.prefix = backend.prefix
        self.namespace = backend.settings.namespace
        self.scheduler = scheduler
        self._serial = itertools.count(1)
        self.renewals = _SharedLeaseRenewals()

    def next_serial(self) -> int:
        return next(self._serial)

    def txn(
        self, request: Any, *, what: str, retry: bool = False, timeout: float | None = None
    ) -> Any:
        """Run a raw TxnRequest (pyetcd's builder has no sorted or limited ranges), within
        ``timeout`` (default: the request timeout)."""
        return self.backend.call(
            lambda: self._send_txn(request), what=what, retry=retry, timeout=timeout
        )

    def _send_txn(self, request: Any) -> Any:
        """One TxnRequest, its errors raw (for a function that :meth:`txn` cannot wrap)."""
        return self.backend.rpc(
            lambda etcd: etcd.kvstub.Txn(
                request, etcd.timeout, credentials=etcd.call_credentials, metadata=etcd.metadata
            )
        )

    def slot(self, name: str, ttl: float, auto_renew: bool, fair: bool = False) -> EtcdLockSlot:
        # Every etcd lock is fair: the mutex recipe queues by create revision.
        return EtcdLockSlot(self, name, ttl, auto_renew)

    def admit(self, resource: str, token: int) -> bool:
        request = fenced_txn(self.prefix, resource, token, [])
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
            fenced_txn(self.prefix, resource, token, [put]),
            what=f"fenced write of {key!r} with fence {token} for {resource!r}",
        )
        return bool(response.succeeded or response.responses[0].response_txn.succeeded)

    def highest(self, resource: str) -> int | None:
        key = f"{self.prefix}fence/{key_segment(resource)}"
        value, _ = self.backend.call(
            lambda: self.etcd.get(key), what=f"read fence of {resource!r}", retry=True
        )
        return None if value is None else int(value)

    def forget(
        self,
        key: bytes,
        revision: int,
        lease: Lease,
        private: bool,
        *,
        timeout: float | None = None,
    ) -> None:
        """Remove a queue key now (within ``timeout``, default: the request timeout), or
        keep trying in the background until it is gone.

        A key left on a shared lease would block the lock for as long as the client
        lives, so giving up is not an option. A key whose creation is unknown (revision
        0: the reply to its put was lost) is deleted once more a second after a delete
        found nothing, since its put may have reached the server behind that delete
        (a revoked private lease takes no put: nothing to repeat there).
        """
        unsure = revision == 0 and not private

        def attempt(timeout: float | None = None) -> JobResult:
            nonlocal unsure
            if lease.lost.is_set():
                return False  # the key went with its lease
            try:
                deleted = self.delete(key, revision, lease, private, timeout=timeout)
            except BackendUnavailable as exc:
                # A first attempt cut short by an acquire's deadline is no news yet.
                level = logging.WARNING if timeout is None else logging.INFO
                log.log(level, "could not remove lock key %s yet: %s", key.decode(), exc)
                return None
            except DcoordError as exc:  # refused: retrying cannot help; the lease TTL will
                log.warning("could not remove lock key %s: %s", key.decode(), exc)
                return False
            if deleted or not unsure:
                return False
            unsure = False
            return None

        if attempt(timeout) is None:
            try:
                self.scheduler.every(_CLEANUP_INTERVAL, attempt, name="etcd lock key cleanup")
            except ClientClosed:  # closing: its shared leases are revoked, keys and all
                log.info("lock key %s: cleanup stopped by close", key.decode())

    def delete(
        self,
        key: bytes,
        revision: int,
        lease: Lease,
        private: bool,
        *,
        timeout: float | None = None,
    ) -> bool:
        """Delete ``key`` if it is still the one created at ``revision``; True if it was.

        A private lease is revoked instead, which deletes its key. ``timeout`` bounds the
        request and its retries (default: the request timeout).
        """
        if private:
            return self.revoke(lease, timeout=timeout)
        request = delete_txn(key, revision)

        def delete() -> bool:
            return deleted(self._send_txn(request))

        return self._removed(delete, what=f"delete lock key {key.decode()}", timeout=timeout)

    def revoke(self, lease: Lease, *, timeout: float | None = None) -> bool:
        """Revoke a private lease (deleting its key); False if it had already expired."""

        def revoke() -> bool:
            try:
                self.etcd.revoke_lease(lease.id)
                revoked = True
            except grpc.RpcError as exc:
                if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND):
                    raise
                revoked = False
            lease.mark_lost()  # the server has it no more, whoever removed it
            return revoked

        return self._removed(revoke, what=f"revoke lease {lease.id:x}", timeout=timeout)

    def _removed(
        self, remove: Callable[[], bool], *, what: str, timeout: float | None = None
    ) -> bool:
        """Run ``remove`` (True: it removed our key; False: found nothing) with retries;
        :func:`removal_outcome` says what that came to."""
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            return remove()

        removed = self.backend.call(attempt, what=what, retry=True, timeout=timeout)
        return removal_outcome(removed, attempts, what)

    def close(self) -> None:
        """Queue keys go with the client's leases, which the backend revokes at close."""


class _SharedLeaseRenewals:
    """Renewals of locks on the client's shared leases (a
    :class:`~dcoord.backends.base.RenewalBatch`): the client keeps those leases alive
    (one keep-alive per TTL, :class:`.leases.Leases`), so renewing such a lock sends
    nothing; a batch only reads each lease's deadline, in one worker task instead of a
    task per lock."""

    def extend_many(self, requests: Sequence[tuple[LockSlot, float]]) -> list[Renewed]:
        answers: list[Renewed] = []
        for slot, ttl in requests:
            try:
                answers.append(slot.extend(ttl))
            except Exception as exc:  # its own failure, as if renewed alone
                answers.append(exc)
        return answers


class _Deletes:
    """The keys a watch saw deleted (the watch callback is :meth:`record`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._keys: set[bytes] = set()
        self.broken = False

    def record(self, response: Any) -> None:
        with self._cond:
            if isinstance(response, Exception):
                self.broken = True  # the watch is gone: whoever waits checks again
            else:
                self._keys.update(event.key for event in response.events)
            self._cond.notify_all()

    def wait(self, key: bytes, timeout: float) -> bool:
        """Until ``key`` is deleted or the watch broke (True), or ``timeout`` (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: key in self._keys or self.broken, timeout)


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
        value: bytes | None = None,
    ) -> None:
        self._locks = locks
        self._leases = locks.backend.leases
        self.name = name
        self.what = f"lock {name!r}"  # how log lines name what queues here
        # The mutex prefix etcdctl lock and Go's concurrency.Mutex use too (docs/interop.md).
        # prefix and value let an election candidate queue by this same recipe under its
        # own prefix, its key holding the candidate's value (dcoord/election.py); a lock's
        # key holds its holder's identity instead (dcoord/inspect.py).
        self.value = value
        where = prefix if prefix is not None else etcd_lock_prefix(locks.namespace, name)
        self.prefix = f"{where}/".encode()
        self._range_end = prefix_range_end(self.prefix)
        self._ttl = ttl
        self._private = not auto_renew
        self._key: bytes | None = None
        self._revision = 0
        self._lease: Lease | None = None
        self._label: str | None = locks.backend.settings.options["label"]

    # -- acquire -------------------------------------------------------------------

    def acquire(self, deadline: float | None) -> LockGrant | None:
        # A wait ends at its deadline even while the server hangs: each of its requests
        # (the cleanup's first attempt included) may take until the deadline, or
        # _PAST_DEADLINE after it, and one cut short by it makes a timeout, what it left
        # removed in the background. A single attempt (deadline already past) gives each
        # request the request timeout, as an acquire without a deadline.
        bound = deadline if deadline is not None and time.monotonic() < deadline else None
        while True:
            try:
                key, revision, lease, outcome = self._attempt(deadline, bound)
            except BackendUnavailable as exc:
                if not cut_short(bound):
                    raise
                log.info("%s: not acquired by its deadline: %s", self.what, exc)
                return None
            if outcome == "acquired":
                return LockGrant(revision, lease.expires_at)
            self._key = None
            # Timed out, or our lease is gone (or presumed gone: then its key may linger).
            self._locks.forget(key, revision, lease, self._private, timeout=self._budget(bound))
            if outcome == "timeout":
                return None
            log.info("%s: queue key %s expired while waiting; queueing again", self.what, key)

    def _attempt(
        self, deadline: float | None, bound: float | None
    ) -> tuple[bytes, int, Lease, str]:
        """Queue once and wait: our key, its revision, its lease, and the outcome."""
        # A shared lease the server dropped unnoticed fails the put (nothing written):
        # attached() then queues once more on a fresh lease.
        key, revision, ready, lease = self._leases.attached(
            lambda: self._new_lease(bound), lambda lease: self._enqueue(lease, bound)
        )
        self._key, self._revision, self._lease = key, revision, lease
        try:
            return key, revision, lease, "acquired" if ready else self._wait(deadline, bound)
        except BaseException as exc:
            self._key = None
            self._forget_after(exc, key, revision, lease, bound)
            raise

    def _budget(self, bound: float | None) -> float | None:
        """The time the next request may take (None: the request timeout)."""
        if bound is None:
            return None
        return request_budget(bound, self._locks.backend.settings.request_timeout)

    def _forget_after(
        self, error: BaseException, key: bytes, revision: int, lease: Lease, bound: float | None
    ) -> None:
        """Remove ``key`` after ``error`` failed the acquire, without hiding that error:
        the caller re-raises it, and a cleanup failure (say, the client closing under
        it) is only logged."""
        try:
            self._locks.forget(key, revision, lease, self._private, timeout=self._budget(bound))
        except Exception as exc:
            log.warning(
                "lock %r: could not remove its queue key %s after %s: %s",
                self.name,
                key.decode(),
                type(error).__name__,
                exc,
            )

    def _new_lease(self, bound: float | None) -> Lease:
        timeout = self._budget(bound)
        if self._private:
            return self._leases.grant(self._ttl, timeout=timeout)
        return self._leases.lease(self._ttl, timeout=timeout)

    def _owner_range(self) -> Any:
        return _range(
            self.prefix,
            self._range_end,
            sort_order=etcdrpc.RangeRequest.ASCEND,
            sort_target=etcdrpc.RangeRequest.CREATE,
            limit=1,
            keys_only=True,
        )

    def _enqueue(self, lease: Lease, bound: float | None) -> tuple[bytes, int, bool, Lease]:
        """Create a new key on ``lease`` (idempotent: a retry finds it); return it, its
        create revision, whether it holds the lock at once, and the lease."""
        key = self.prefix + f"{lease.id:016x}-{self._locks.next_serial():x}".encode()
        request = etcdrpc.TxnRequest(
            compare=[_created_at(key, 0)],
            success=[
                etcdrpc.RequestOp(
                    # The value names the holder, for dcoord.inspect (etcdctl writes none).
                    request_put=etcdrpc.PutRequest(
                        key=key,
                        value=(
                            identity_json(self._label, time.time())
                            if self.value is None
                            else self.value
                        ),
                        lease=lease.id,
                    )
                ),
                self._owner_range(),
            ],
            failure=[_range(key, keys_only=True), self._owner_range()],
        )
        response = self._create(request, key, lease, bound, what=f"acquire lock {self.name!r}")
        if response.succeeded:
            revision = response.header.revision
        else:
            revision = _first_kv(response.responses[0]).create_revision
        owner = _first_kv(response.responses[1])
        return key, revision, owner is None or owner.create_revision == revision, lease

    def _create(
        self, request: Any, key: bytes, lease: Lease, bound: float | None, *, what: str
    ) -> Any:
        """Run the txn that puts our new queue ``key`` on ``lease``; if it fails, make
        sure the key is gone (its reply may be what was lost) and raise its error."""
        try:
            return self._locks.txn(request, what=what, retry=True, timeout=self._budget(bound))
        except LeaseNotFound:
            raise  # nothing was written: the put needs the lease
        except PermissionDenied as exc:
            # A denied txn wrote nothing: deleting the key would only be denied too, with
            # a warning. A private lease (which holds no key) is still revoked.
            if self._private:
                self._forget_after(exc, key, 0, lease, bound)
            raise
        except BaseException as exc:
            # The put may have happened with its reply lost: remove the key for sure.
            self._forget_after(exc, key, 0, lease, bound)
            raise

    def _wait(self, deadline: float | None, bound: float | None) -> str:
        """Wait for our turn: "acquired", "timeout", or "requeue" (our key vanished).

        The queue's deletes are watched *first*, from the current revision, and then our
        place is checked: a delete before the watch is seen by the check, one after it
        by the watch, so the watch never starts in the past. (One that does is
        "unsynced" and served by etcd's catch-up loop, every 100 ms: under contention,
        where other writes land between a check and the watch, that was every other
        wait.) A waiter still wakes for its predecessor's delete only.
        """
        assert self._key is not None and self._lease is not None
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"  # also when no watch could be made by then
            with self._queue_deletes(bound) as deletes:
                outcome = self._wait_watched(deletes, deadline, bound)
                if outcome is not None:
                    return outcome
            # The watch broke (or could not be made): check again under a new one.

    def _wait_watched(
        self, deletes: _Deletes, deadline: float | None, bound: float | None
    ) -> str | None:
        """:meth:`_wait` under one watch; None when that watch has broken."""
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
        while not deletes.broken:
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            if not lease.usable:
                return "requeue"
            try:
                response = self._locks.txn(
                    check,
                    what=f"wait for lock {self.name!r}",
                    retry=True,
                    timeout=self._budget(bound),
                )
                mine, owner, predecessor = (_first_kv(r) for r in response.responses)
                if mine is None:
                    return "requeue"
                if owner is not None and owner.create_revision == revision:
                    return "acquired"
                if predecessor is None:
                    continue  # deleted between the two reads of one txn: cannot happen
                if not self._sleep_until_deleted(deletes, predecessor.key, lease, deadline, bound):
                    return "requeue"
            except BackendUnavailable as exc:
                # The server may be back before our lease runs out: a waiter keeps its
                # place in the queue (and its private lease alive) until then.
                if not self._renew(lease, bound):
                    raise
                log.info("lock %r: waiting on through a failure: %s", self.name, exc)
                backoff = min(1.0, lease.ttl / 3)
                if deadline is not None:
                    backoff = min(backoff, deadline - time.monotonic())
                lease.lost.wait(max(0.0, backoff))  # back off before the next try
        return None

    @contextlib.contextmanager
    def _queue_deletes(self, bound: float | None) -> Iterator[_Deletes]:
        """The deletes in our queue from now on, while inside (one watch)."""
        deletes = _Deletes()
        etcd = self._locks.etcd

        def watch() -> Any:
            try:
                return etcd.add_watch_callback(
                    self.prefix,
                    deletes.record,
                    range_end=self._range_end,
                    filters=[etcdrpc.WatchCreateRequest.NOPUT],
                )
            except etcd_errors.WatchTimedOut:
                # Inside the call: past it, backend.call has made it BackendUnavailable.
                return None

        watch_id = self._locks.backend.call(
            watch, what=f"watch lock {self.name!r}", timeout=self._budget(bound)
        )
        if watch_id is None:
            # No watch: check again after a short while (never wait blind).
            deletes.broken = True
            time.sleep(0.1)
            yield deletes
            return
        try:
            yield deletes
        finally:
            try:
                etcd.cancel_watch(watch_id)
            except Exception as exc:  # the watch stream may be gone already
                log.debug("cancel watch %s: %s", watch_id, exc)

    def _sleep_until_deleted(
        self,
        deletes: _Deletes,
        predecessor: bytes,
        lease: Lease,
        deadline: float | None,
        bound: float | None,
    ) -> bool:
        """Until ``predecessor`` is deleted, the watch breaks or the deadline: True;
        False as soon as our own lease is gone."""
        while True:
            # Wake at least once per lease TTL: a private lease is kept alive by its
            # waiter (more often as a failing keep-alive eats into its validity), and
            # a lost shared lease (our key gone) is noticed.
            if self._private:
                wait = max(0.05, min(lease.ttl, lease.expires_at - time.monotonic()) / 3)
            else:
                wait = float(lease.ttl)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return True
            if deletes.wait(predecessor, wait):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return True  # no keep-alive past the deadline: the caller times out
            if not self._renew(lease, bound):
                return False

    def _renew(self, lease: Lease, bound: float | None) -> bool:
        """Keep a waiter's private lease alive; False once it is gone, or presumed gone
        (its TTL passed without a successful keep-alive). The client's keep-alive renews
        a shared lease: only look at it."""
        if not self._private or not lease.usable:
            return lease.usable
        try:
            timeout = lease.expires_at - time.monotonic()
            budget = self._budget(bound)
            return self._leases.keep_alive(
                lease, timeout=timeout if budget is None else min(timeout, budget)
            )
        except BackendUnavailable as exc:
            log.info("lock %r: keep-alive of lease %x failed: %s", self.name, lease.id, exc)
            return lease.usable

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

    def renewal_batch(self) -> _SharedLeaseRenewals | None:
        """The batch of the locks on shared leases (None for a private lease, whose
        renewal is a request of its own)."""
        return None if self._private else self._locks.renewals

    def extend(self, ttl: float) -> LockGrant | None:
        lease = self._lease
        if self._key is None or lease is None or lease.lost.is_set():
            return None
        if not self._private:
            # The client keeps the shared lease alive; the lock lasts as long as it does.
            return LockGrant(self._revision, lease.expires_at)
        if ttl <= lease.ttl:
            if not self._leases.keep_alive(lease):
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
            self._leases.revoke(new)
            raise
        if not moved:
            self._leases.revoke(new)
            return None
        self._lease = new
        try:
            self._leases.revoke(old)
        except DcoordError as exc:
            log.info("old lease %x of lock %r expires by itself: %s", old.id, self.name, exc)
        return LockGrant(self._revision, new.expires_at)
