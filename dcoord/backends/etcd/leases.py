"""The client's etcd leases: one per distinct TTL, all kept alive by one scheduler job.

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

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from ...errors import BackendUnavailable
from ...scheduler import Job, Scheduler

if TYPE_CHECKING:
    from . import EtcdBackend

log = logging.getLogger("dcoord.etcd")


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


class Leases:
    """Grants, keeps alive and revokes the client's shared leases."""

    def __init__(self, backend: EtcdBackend, scheduler: Scheduler) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._by_ttl: dict[int, Lease] = {}
        self._mutex = threading.Lock()
        self._job: Job | None = None

    def lease(self, ttl: float) -> Lease:
        """The live shared lease for ``ttl`` seconds (rounded up), granted on first use."""
        seconds = max(1, math.ceil(ttl))
        with self._mutex:
            lease = self._by_ttl.get(seconds)
            if lease is not None and not lease.lost.is_set():
                return lease
            lease = self.grant(seconds)
            self._by_ttl[seconds] = lease
            if self._job is None:
                self._job = self._scheduler.every(
                    self._interval(), self._keep_alive, name="etcd lease keep-alive"
                )
            return lease

    def grant(self, ttl: float) -> Lease:
        """A new lease that nobody keeps alive (for keys that must expire on their own)."""
        seconds = max(1, math.ceil(ttl))
        sent = time.monotonic()
        granted = self._backend.call(
            lambda: self._backend.etcd.lease(seconds), what=f"grant a {seconds} s lease"
        )
        return Lease(int(granted.id), int(granted.ttl), sent)

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
            leases, self._by_ttl = list(self._by_ttl.values()), {}
            if self._job is not None:
                self._job.cancel()
                self._job = None
        for lease in leases:
            try:
                self.revoke(lease)
            except BackendUnavailable:
                log.warning("could not revoke lease %x; it expires in %d s", lease.id, lease.ttl)
                lease.mark_lost()

    def _interval(self) -> float:
        # Refresh at a third of the shortest TTL, as etcd's own session does.
        with_ttls = [lease.ttl for lease in self._by_ttl.values()] or [3]
        return max(0.2, min(with_ttls) / 3)

    def _keep_alive(self) -> float:
        with self._mutex:
            leases = list(self._by_ttl.items())
        for seconds, lease in leases:
            self._refresh(lease)
            if lease.lost.is_set():
                with self._mutex:
                    if self._by_ttl.get(seconds) is lease:
                        del self._by_ttl[seconds]
        with self._mutex:
            return self._interval()

    def _refresh(self, lease: Lease) -> None:
        sent = time.monotonic()
        try:
            responses = self._backend.call(
                lambda: list(self._backend.etcd.refresh_lease(lease.id)),
                what=f"keep lease {lease.id:x} alive",
            )
        except BackendUnavailable as exc:
            # Past its TTL without a successful refresh, the server may have dropped the
            # lease: from here on the client must not act as if its keys were still there.
            if time.monotonic() - lease.last_refreshed >= lease.ttl:
                log.warning("lease %x presumed expired: %s", lease.id, exc)
                lease.mark_lost()
            return
        if not responses or responses[-1].TTL <= 0:
            lease.mark_lost()
        else:
            lease.last_refreshed = sent
