"""The async etcd client's shared leases: one per distinct TTL, each kept alive by one
task on the loop at a third of its TTL.

The async driver of :mod:`.leases` (its :class:`~.leases.Lease` objects, TTL rounding and
keep-alive pace, written once there): every auto-renewed async lock, semaphore permit,
read-write lock, campaign and group member of a client puts its key on the shared lease
of its TTL, so ten thousand of them cost one keep-alive request per third of a TTL, not
ten thousand. A lease found expired (the loop was blocked, the server lost it, or its
keep-alives failed for longer than its TTL) is dropped and marked lost, which every
lock on it sees at its next renewal and every group member at once (``on_lost`` runs); the next
:meth:`lease` grants a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ...errors import ClientClosed
from .leases import Lease, lease_seconds, next_refresh, refresh_interval

if TYPE_CHECKING:
    from .aio_locks import AsyncEtcdLocks

log = logging.getLogger("dcoord.etcd")


class AsyncLeases:
    """Grants, keeps alive and revokes the shared leases of one async etcd client (the
    requests are its lock store's: :meth:`AsyncEtcdLocks.grant_lease` and friends)."""

    def __init__(self, locks: AsyncEtcdLocks) -> None:
        self._locks = locks
        self._by_ttl: dict[int, Lease] = {}
        self._keepers: dict[int, asyncio.Task[None]] = {}  # by lease id
        # One grant at a time, so one lease per TTL however many acquires start at once.
        self._granting = asyncio.Lock()
        self._closed = False

    async def lease(self, ttl: float, *, timeout: float | None = None) -> Lease:
        """The live shared lease for ``ttl`` seconds (rounded up), granted on first use
        (within ``timeout``, default: the request timeout); ClientClosed once closed.

        Never one already past its TTL: that one is marked lost, revoked in a task (its
        holders have been told), and a fresh one granted.
        """
        seconds = lease_seconds(ttl)
        stale = self._by_ttl.get(seconds)
        if stale is not None and stale.usable:
            return stale
        async with self._granting:
            stale = self._by_ttl.get(seconds)  # granted meanwhile by another task?
            if stale is not None and stale.usable:
                return stale
            if self._closed:
                raise ClientClosed(f"grant a {seconds} s lease: the client is closing")
            lease = await self._locks.grant_lease(seconds, timeout=timeout)
            if self._closed:  # closed during the grant: nobody would keep it alive
                self._locks.forget(lease.id)
                raise ClientClosed(f"grant a {seconds} s lease: the client is closing")
            self._by_ttl[seconds] = lease
            keeper = asyncio.get_running_loop().create_task(
                self._keep(seconds, lease), name=f"dcoord etcd lease {lease.id:x} keep-alive"
            )
            self._keepers[lease.id] = keeper
            keeper.add_done_callback(lambda _: self._keepers.pop(lease.id, None))
        if stale is not None:
            self._give_up(stale, "presumed expired: not refreshed within its TTL")
        return lease

    async def keep_alive(self, lease: Lease, *, timeout: float | None = None) -> bool:
        """Refresh ``lease`` once (within ``timeout``, default: the request timeout);
        False, and the lease marked lost, if the server has it no more."""
        sent = time.monotonic()
        return lease.answered(sent, await self._locks.keep_alive(lease.id, timeout=timeout))

    async def _keep(self, seconds: int, lease: Lease) -> None:
        """The keep-alive task of one shared lease, until it is replaced, lost or closed.

        Each refresh may take until the lease runs out (bounded by its remaining
        validity), and the lease is declared lost once its TTL has passed without a
        successful one. A failure is logged and retried at the next due time.
        """
        delay = refresh_interval(lease.ttl)
        while True:
            await asyncio.sleep(delay)
            if self._by_ttl.get(seconds) is not lease:
                return
            if not lease.usable:
                # The server may have dropped it: nobody may act as if its keys were there.
                self._drop(seconds, lease)
                self._give_up(lease, "presumed expired: not refreshed within its TTL")
                return
            limit = min(
                self._locks.backend.settings.request_timeout, lease.expires_at - time.monotonic()
            )
            try:
                if not await self.keep_alive(lease, timeout=limit):
                    log.warning("lease %x expired on the server", lease.id)
                    self._drop(seconds, lease)
                    return
            except Exception as exc:  # the next due time retries; the TTL is the limit
                log.warning(
                    "keep-alive of lease %x failed: %s: %s", lease.id, type(exc).__name__, exc
                )
            delay = next_refresh(lease, time.monotonic())

    def _give_up(self, lease: Lease, why: str) -> None:
        """Mark a dropped ``lease`` lost and revoke it in a task: if the server still has
        it (a refresh was only slow), its keys would block others for up to a TTL more,
        though their holders are told they are lost."""
        log.warning("lease %x %s", lease.id, why)
        lease.mark_lost()
        self._locks.forget(lease.id)

    def _drop(self, seconds: int, lease: Lease) -> None:
        if self._by_ttl.get(seconds) is lease:
            del self._by_ttl[seconds]

    async def close(self) -> None:
        """Stop the keep-alives and revoke every shared lease (deleting the keys on them);
        best effort: an unrevoked one expires by its TTL. No lease is granted from now."""
        self._closed = True
        leases, self._by_ttl = list(self._by_ttl.values()), {}
        keepers = list(self._keepers.values())
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        outcomes = await asyncio.gather(
            *(self._locks.revoke(lease.id) for lease in leases), return_exceptions=True
        )
        for lease, outcome in zip(leases, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.warning(
                    "could not revoke lease %x (%s); it expires in %d s",
                    lease.id,
                    outcome,
                    lease.ttl,
                )
            lease.mark_lost()
