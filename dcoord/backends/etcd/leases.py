"""The client's etcd leases: one per distinct TTL, each kept alive at a third of its TTL.

This is etcd's *session* (client/v3/concurrency) generalised to several TTLs: every key a
client wants to live only as long as the client (auto-renewed locks, group members) is
attached to the shared lease of its TTL, so a thousand such keys cost one keep-alive
stream per TTL, not a thousand. When a lease is found expired (the process was paused,
the server lost it, or keep-alives failed for longer than its TTL) it is dropped, its
``lost`` event is set and its callbacks run; the next ``lease(ttl)`` grants a fresh one.

etcd rounds a TTL up to whole seconds and enforces a minimum (about 1.5 x the election
timeout, so ~2 s by default); the granted TTL is what ``Lease.ttl`` reports.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc
from pyetcd import etcdrpc

from ...errors import BackendError, ClientClosed, DcoordError
from ...scheduler import JobResult, Scheduler, WorkerPool

if TYPE_CHECKING:
    from . import EtcdBackend

log = logging.getLogger("dcoord.etcd")

T = TypeVar("T")

# Keep-alives run on a few threads of their own, so a refresh hanging for its whole
# timeout delays neither the scheduler thread nor the refresh of another lease.
_KEEPALIVE_WORKERS = 4
_MIN_INTERVAL = 0.2


def lease_seconds(ttl: float) -> int:
    """The TTL to ask etcd for: whole seconds, rounded up, at least 1 (etcd rounds up to
    its own minimum from there)."""
    return max(1, math.ceil(ttl))


def refresh_interval(ttl: float) -> float:
    """How often a shared lease of ``ttl`` seconds is refreshed: a third of its TTL, as
    etcd's sessions do, so two refreshes may fail before it is at risk."""
    return max(_MIN_INTERVAL, ttl / 3)


def next_refresh(lease: Lease, now: float) -> float:
    """Seconds from ``now`` until the next keep-alive of a shared lease is due: a third of
    its TTL, and at the latest when it runs out (when it is then declared lost)."""
    return max(0.01, min(refresh_interval(lease.ttl), lease.expires_at - now))


class LeaseNotFound(BackendError):
    """The server has no such lease (it expired or was revoked): nor the keys on it."""


class Lease:
    """A granted etcd lease, shared by every key of one TTL."""

    def __init__(self, lease_id: int, ttl: int, granted_at: float) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.lost = threading.Event()
        # When the last successful grant/refresh was *sent*: the server's countdown started
        # no earlier, so last_refreshed + ttl is a safe (early) estimate of expiry.
        self.last_refreshed = granted_at
        self._callbacks: list[Callable[[], None]] = []
        self._mutex = threading.Lock()

    @property
    def expires_at(self) -> float:
        """Monotonic time by which the lease has surely expired unless refreshed."""
        return self.last_refreshed + self.ttl

    @property
    def usable(self) -> bool:
        """Not known to be lost, and not past its TTL since the last successful refresh."""
        return not self.lost.is_set() and time.monotonic() < self.expires_at

    def refreshed(self, sent: float) -> None:
        """A refresh sent at ``sent`` succeeded (a late reply never moves expiry back)."""
        with self._mutex:
            self.last_refreshed = max(self.last_refreshed, sent)

    def answered(self, sent: float, ttl: int) -> bool:
        """A keep-alive sent at ``sent`` was answered with ``ttl`` (0 or less: the server
        has the lease no more): refresh it, or mark it lost. True if it is still alive."""
        if ttl <= 0:
            self.mark_lost()
            return False
        self.refreshed(sent)
        return True

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once) when the lease expires; at once if it already has."""
        with self._mutex:
            if not self.lost.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def mark_lost(self) -> None:
        with self._mutex:
            if self.lost.is_set():
                return
            self.lost.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("lease %x lost-callback failed", self.id)


class LeaseHolder(Protocol):
    """A key's holder told of its lease's loss (a group member's registration)."""

    def lost(self) -> None: ...


class LeaseHolders:
    """The holders of keys on the shared leases that must hear of their lease's loss at
    once (group members: no heart-beat of theirs looks). A lease gets one lost-callback,
    not one per holder, so holders that come and go while it lives pile nothing up."""

    def __init__(self) -> None:
        self._on_lease: dict[int, set[LeaseHolder]] = {}
        self._mutex = threading.Lock()

    def add(self, holder: LeaseHolder, lease: Lease) -> None:
        """Call ``holder.lost()`` once when ``lease`` is lost (at once if it already is),
        unless :meth:`discard` comes first."""
        with self._mutex:
            holders = self._on_lease.get(lease.id)
            first = holders is None
            if holders is None:
                holders = self._on_lease[lease.id] = set()
            holders.add(holder)
        if first:
            lease.on_lost(lambda: self._lease_lost(lease.id))

    def discard(self, holder: LeaseHolder, lease: Lease) -> None:
        with self._mutex:
            self._on_lease.get(lease.id, set()).discard(holder)

    def _lease_lost(self, lease_id: int) -> None:
        with self._mutex:
            holders = self._on_lease.pop(lease_id, set())
        for holder in holders:
            try:
                holder.lost()
            except Exception:  # one holder's failure must not keep the others untold
                log.exception("lease %x: telling a holder of its loss failed", lease_id)


class Leases:
    """Grants, keeps alive and revokes the client's shared leases.

    Each shared lease has its own scheduler job, due every third of its TTL, so a lease
    with a short TTL is refreshed at its own pace from the moment it is granted. The job
    only hands the refresh to a worker (bounded by the lease's remaining validity) and
    marks the lease lost once its TTL has passed without a successful refresh, even if
    a refresh is still hanging.
    """

    def __init__(self, backend: EtcdBackend, scheduler: Scheduler) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._by_ttl: dict[int, Lease] = {}
        self._refreshing: set[int] = set()  # ids of the leases a worker is refreshing
        self._mutex = threading.Lock()
        self._granting = threading.Lock()
        self._closed = False
        self._workers = WorkerPool("dcoord-etcd-keepalive", _KEEPALIVE_WORKERS)

    def lease(self, ttl: float, *, timeout: float | None = None) -> Lease:
        """The live shared lease for ``ttl`` seconds (rounded up), granted on first use
        (within ``timeout``, default: the request timeout).

        Never one already past its TTL: that one is marked lost and a fresh one granted.
        """
        seconds = lease_seconds(ttl)
        stale = self._shared(seconds)
        if stale is not None and stale.usable:
            return stale
        # One grant at a time (so one lease per TTL), outside _mutex: the keep-alive jobs
        # take _mutex and must not wait for a grant's round trip.
        with self._granting:
            stale = self._shared(seconds)  # granted meanwhile by another thread?
            if stale is not None and stale.usable:
                return stale
            lease = self.grant(seconds, timeout=timeout)
            with self._mutex:
                self._by_ttl[seconds] = lease
            try:
                self._scheduler.every(
                    refresh_interval(lease.ttl),
                    functools.partial(self._tick, seconds, lease),
                    name=f"etcd lease {lease.id:x} keep-alive",
                )
            except ClientClosed:  # the client is closing: its scheduler has stopped
                self._drop(seconds, lease)
                self.revoke(lease)
                raise
        if stale is not None:
            stale.mark_lost()  # outside the mutex: its callbacks may take their time
        return lease

    def attached(self, lease: Callable[[], Lease], fn: Callable[[Lease], T]) -> T:
        """``fn(lease())``; if the server has already dropped that lease (before its
        keep-alive noticed), mark it lost and run ``fn`` once more on a fresh one."""
        first = lease()
        try:
            return fn(first)
        except LeaseNotFound:
            first.mark_lost()
        return fn(lease())

    def grant(self, ttl: float, *, timeout: float | None = None) -> Lease:
        """A new lease that nobody keeps alive (for keys that must expire on their own),
        granted within ``timeout`` (default: the request timeout)."""
        seconds = lease_seconds(ttl)
        sent = time.monotonic()
        granted = self._backend.call(
            lambda: self._backend.etcd.lease(seconds),
            what=f"grant a {seconds} s lease",
            timeout=timeout,
        )
        return Lease(int(granted.id), int(granted.ttl), sent)

    def keep_alive(self, lease: Lease, timeout: float | None = None) -> bool:
        """Refresh ``lease`` once; False (and the lease marked lost) if the server has it
        no more. ``timeout`` bounds the request (default: the request timeout)."""
        limit = self._backend.settings.request_timeout
        if timeout is not None:
            limit = min(limit, timeout)
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease.id)
        sent = time.monotonic()

        def once() -> int:
            replies = self._backend.rpc(
                lambda etcd: list(
                    etcd.leasestub.LeaseKeepAlive(
                        iter([request]),
                        etcd.timeout,
                        credentials=etcd.call_credentials,
                        metadata=etcd.metadata,
                    )
                )
            )
            return int(replies[-1].TTL) if replies else 0

        # Retried within the limit (a refresh is idempotent): on a cluster, a member that
        # hangs or lost its leader must not cost the lease, while another member answers.
        ttl = self._backend.call(
            once, what=f"keep lease {lease.id:x} alive", retry=True, timeout=limit
        )
        return lease.answered(sent, ttl)

    def revoke(self, lease: Lease) -> None:
        """Revoke ``lease`` now: every key attached to it is deleted at once."""

        def revoke() -> None:
            try:
                self._backend.etcd.revoke_lease(lease.id)
            except grpc.RpcError as exc:
                # Already expired on the server: its keys are gone, which is what we want.
                if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND):
                    raise

        self._backend.call(revoke, what=f"revoke lease {lease.id:x}", retry=True)
        lease.mark_lost()

    def close(self) -> None:
        """Revoke every shared lease (best effort: unrevoked ones expire by their TTL)."""
        with self._mutex:
            self._closed = True
            leases, self._by_ttl = list(self._by_ttl.values()), {}
        self._workers.close()
        for lease in leases:
            try:
                self.revoke(lease)
            except DcoordError as exc:
                log.warning(
                    "could not revoke lease %x (%s); it expires in %d s", lease.id, exc, lease.ttl
                )
                lease.mark_lost()

    def _tick(self, seconds: int, lease: Lease) -> JobResult:
        """The scheduler job of one shared lease: start a refresh, or declare it lost."""
        usable = lease.usable
        with self._mutex:
            current = not self._closed and self._by_ttl.get(seconds) is lease
            busy = lease.id in self._refreshing
            if current and usable and not busy:
                self._refreshing.add(lease.id)
        if not current:
            return False
        if not usable:
            # Past its TTL without a successful refresh (failing, or still hanging): the
            # server may have dropped it, so nobody may act as if its keys were there.
            log.warning("lease %x presumed expired: not refreshed within its TTL", lease.id)
            self._drop(seconds, lease)
            lease.mark_lost()
            # If the server still has it (the refresh was only slow), its keys would block
            # others for up to a TTL more, though their owners were told they are lost.
            self._workers.submit(lambda: self._discard(lease))
            return False
        if not busy:
            self._workers.submit(lambda: self._refresh(seconds, lease))
        return next_refresh(lease, time.monotonic())

    def _refresh(self, seconds: int, lease: Lease) -> None:
        """One keep-alive, on a worker; any failure stays with this lease."""
        try:
            remaining = lease.expires_at - time.monotonic()
            if remaining > 0 and not self.keep_alive(lease, timeout=remaining):
                log.warning("lease %x expired on the server", lease.id)
                self._drop(seconds, lease)
        except Exception as exc:  # the lease's _tick declares it lost at its deadline
            if not self._closed:
                log.warning(
                    "keep-alive of lease %x failed: %s: %s", lease.id, type(exc).__name__, exc
                )
        finally:
            with self._mutex:
                self._refreshing.discard(lease.id)

    def _discard(self, lease: Lease) -> None:
        """Revoke a lease given up for lost, on a worker (best effort: else it expires)."""
        try:
            self.revoke(lease)
        except DcoordError as exc:
            log.info("lease %x given up for lost, not revoked: %s", lease.id, exc)

    def _shared(self, seconds: int) -> Lease | None:
        with self._mutex:
            return self._by_ttl.get(seconds)

    def _drop(self, seconds: int, lease: Lease) -> None:
        with self._mutex:
            if self._by_ttl.get(seconds) is lease:
                del self._by_ttl[seconds]
