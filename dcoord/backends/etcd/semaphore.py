"""Semaphores on etcd, and the queue slot that read-write locks share.

The etcd mutex recipe generalised: every attempt puts its own key on a lease (the
client's shared lease of its TTL, or a private one without auto-renewal) under a prefix,
and is admitted when fewer than ``limit`` keys of a *counted* range were created before
it. Semaphore ``NAME``: keys ``/dcoord/<ns>/sem/NAME/<lease>-<serial>``, every earlier
key counts, so the first ``limit`` keys by create revision hold (FIFO). The fence is the
key's create revision (Raft-committed, cluster-wide increasing): grants happen in create
order, so a grant's fence exceeds that of every grant completed before it was requested.
A waiter watches the counted range for deletes (a release, a lease expiry) and re-checks
its place; puts do not wake it (every waiter wakes on every delete: a semaphore frees
permits in any order, so no single predecessor can be watched). Release, extend and
lease handling are the lock slot's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_errors
from pyetcd.utils import prefix_range_end

from ..base import key_segment
from .leases import Lease
from .locks import EtcdLocks, EtcdLockSlot, _created_at, _first_kv, _range

if TYPE_CHECKING:
    from . import EtcdBackend

log = logging.getLogger("dcoord.etcd")


class Queue:
    """The requests of one handle's place in a queue, shared by the sync slot
    (:class:`EtcdQueueSlot`) and the async one (:mod:`.aio_semaphore`): a key is admitted
    when fewer than ``limit`` keys of the ``counted`` range were created before it.

    ``own`` is the prefix our key goes under; ``counted`` the range whose earlier keys
    count against us (it may contain ``own``, or not: a reader counts only writers).
    """

    def __init__(self, own: bytes, counted: bytes, limit: int) -> None:
        self.own = own
        self.counted = counted
        self.counted_end = prefix_range_end(counted)
        self.limit = limit

    def key(self, lease: int, serial: int) -> bytes:
        """Our new key, on ``lease``: unique per client by the serial."""
        return self.own + f"{lease:016x}-{serial:x}".encode()

    def _ahead(self, **options: Any) -> Any:
        """The first ``limit`` counted keys (with ``options``: created before ours)."""
        return _range(self.counted, self.counted_end, limit=self.limit, keys_only=True, **options)

    def enqueue(self, key: bytes, lease: int) -> Any:
        """The txn that creates ``key`` on ``lease`` (idempotent: a retry finds it)."""
        return etcdrpc.TxnRequest(
            compare=[_created_at(key, 0)],
            # The range runs before the put: every key it sees was created before ours.
            success=[
                self._ahead(),
                etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, lease=lease)),
            ],
            failure=[_range(key, keys_only=True)],
        )

    def enqueued(self, response: Any) -> tuple[int, bool]:
        """Our key's create revision, and whether it holds at once, from the answer to
        :meth:`enqueue`."""
        if response.succeeded:
            ahead = len(response.responses[0].response_range.kvs)
            return response.header.revision, ahead < self.limit
        # A retry found the key its lost first attempt made: let the wait count.
        return _first_kv(response.responses[0]).create_revision, False

    def check(self, key: bytes, revision: int) -> Any:
        """The txn that reads whether our key (created at ``revision``) is still there,
        and the counted keys ahead of it."""
        return etcdrpc.TxnRequest(
            success=[_range(key, keys_only=True), self._ahead(max_create_revision=revision - 1)]
        )

    def checked(self, response: Any) -> str | None:
        """From the answer to :meth:`check`: "requeue" (our key vanished), "acquired"
        (fewer than ``limit`` ahead), or None (wait for a delete in the counted range)."""
        if _first_kv(response.responses[0]) is None:
            return "requeue"
        if len(response.responses[1].response_range.kvs) < self.limit:
            return "acquired"
        return None


def semaphore_queue(prefix: str, name: str, limit: int) -> tuple[str, Queue]:
    """What semaphore ``name`` is called in messages, and its queue (every key counts)."""
    own = f"{prefix}sem/{key_segment(name)}/".encode()
    return f"semaphore {name!r}", Queue(own, own, limit)


class EtcdQueueSlot(EtcdLockSlot):
    """One handle's key in a :class:`Queue`: a lock slot with the queue's admission."""

    def __init__(
        self, locks: EtcdLocks, what: str, queue: Queue, ttl: float, auto_renew: bool
    ) -> None:
        super().__init__(locks, what, ttl, auto_renew)
        self.what = what
        self.prefix = queue.own  # where our keys go (the lock slot's release/extend use _key)
        self._queue = queue

    def _enqueue(self, lease: Lease, bound: float | None) -> tuple[bytes, int, bool, Lease]:
        """Create a new key on ``lease``; return it, its create revision, whether fewer
        than ``limit`` counted keys are ahead of it (it holds at once), and the lease.
        The lock slot's acquire() runs the rest."""
        key = self._queue.key(lease.id, self._locks.next_serial())
        request = self._queue.enqueue(key, lease.id)
        response = self._create(request, key, lease, bound, what=f"acquire {self.name}")
        revision, ready = self._queue.enqueued(response)
        return key, revision, ready, lease

    def _wait(self, deadline: float | None, bound: float | None) -> str:
        """Wait for our turn: "acquired", "timeout", or "requeue" (our key vanished).

        Each round watches the counted range *first*, from the current revision, and
        then checks our place: a delete before the watch is seen by the check, one
        after it by the watch. (A watch started at a past revision would be "unsynced"
        and served by etcd's catch-up loop, every 100 ms: under contention, where other
        writes land between a check and the watch, that was every other wait.)
        """
        assert self._key is not None and self._lease is not None
        key, revision, lease = self._key, self._revision, self._lease
        check = self._queue.check(key, revision)
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            with self._deletes(bound) as woken:
                response = self._locks.txn(
                    check, what=f"wait for {self.name}", retry=True, timeout=self._budget(bound)
                )
                outcome = self._queue.checked(response)
                if outcome is not None:
                    return outcome
                if not self._sleep(woken, lease, deadline, bound):
                    return "requeue"

    @contextlib.contextmanager
    def _deletes(self, bound: float | None) -> Iterator[threading.Event]:
        """An event set on every delete in the counted range from now on, while inside."""
        woken = threading.Event()
        etcd = self._locks.etcd

        def watch() -> Any:
            try:
                return etcd.add_watch_callback(
                    self._queue.counted,
                    lambda _response: woken.set(),
                    range_end=self._queue.counted_end,
                    filters=[etcdrpc.WatchCreateRequest.NOPUT],
                )
            except etcd_errors.WatchTimedOut:
                # Inside the call: past it, backend.call has made it BackendUnavailable.
                return None

        watch_id = self._locks.backend.call(
            watch, what=f"watch {self.name}", timeout=self._budget(bound)
        )
        if watch_id is None:
            # No watch: wake after a short while and check again (never wait blind).
            threading.Timer(0.1, woken.set).start()
            yield woken
            return
        try:
            yield woken
        finally:
            try:
                etcd.cancel_watch(watch_id)
            except Exception as exc:  # the watch stream may be gone already
                log.debug("cancel watch %s: %s", watch_id, exc)

    def _sleep(
        self, woken: threading.Event, lease: Lease, deadline: float | None, bound: float | None
    ) -> bool:
        """Until ``woken`` or the deadline: True; False as soon as our lease is gone."""
        while not woken.is_set():
            # Wake at least once per lease TTL: a private lease is kept alive by its
            # waiter, and a lost shared lease (our key gone) is noticed.
            wait = lease.ttl / 3 if self._private else float(lease.ttl)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return True
            if woken.wait(wait):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return True  # no keep-alive past the deadline: the caller times out
            if lease.lost.is_set() or (self._private and not self._refresh(lease, bound)):
                return False
        return True

    def _refresh(self, lease: Lease, bound: float | None) -> bool:
        """One keep-alive of a waiter's private lease; False if it has expired."""
        sent = time.monotonic()
        responses = self._locks.backend.call(
            lambda: list(self._locks.etcd.refresh_lease(lease.id)),
            what=f"keep lease {lease.id:x} alive",
            timeout=self._budget(bound),
        )
        if not responses or responses[-1].TTL <= 0:
            return False
        lease.last_refreshed = sent
        return True


class EtcdSemaphores:
    """The semaphore store of one etcd backend."""

    def __init__(self, backend: EtcdBackend) -> None:
        self._locks = backend.locks
        self._prefix = backend.prefix

    def slot(self, name: str, limit: int, ttl: float, auto_renew: bool) -> EtcdQueueSlot:
        what, queue = semaphore_queue(self._prefix, name, limit)
        return EtcdQueueSlot(self._locks, what, queue, ttl, auto_renew)
