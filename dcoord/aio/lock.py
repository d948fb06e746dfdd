"""Async distributed locks: :class:`dcoord.Lock`'s semantics, driven by tasks.

The rules are :mod:`dcoord.core.lockstate`'s, the same the sync lock follows; this
module only does the I/O. A held lock is looked after by its client's renewal scheduler
(:mod:`dcoord.aio.renewals`: one loop timer for all its locks, renewals due together
sent as one batch in one task), which marks a lock lost at its deadline even while its
renewal is still unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect as pyinspect
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, cast

from .. import inspect, metrics
from ..backends.aio_base import AsyncRenewalBatch
from ..backends.base import LockGrant, Renewed
from ..core.lockstate import (
    after_renewal,
    coalesced,
    conservative,
    first_due,
    is_held,
    release_problem,
    tick,
)
from ..errors import (
    BackendUnavailable,
    ClientClosed,
    ConfigError,
    DcoordError,
    LockError,
    LockLost,
    LockNotOwned,
    LockTimeout,
)
from ..lock import validate_name, validate_timeout, validate_ttl
from ..logfields import lock_fields
from .renewals import client_renewals

if TYPE_CHECKING:
    from ..inspect import LockInfo
    from .client import AsyncClient

log = logging.getLogger("dcoord.lock")

OnLost = Callable[["AsyncLock"], object]


class AsyncLock:
    """A distributed lock with a TTL, a fencing token per grant, and auto-renewal.

    Made by :meth:`AsyncClient.lock`; see :class:`dcoord.Lock` for the semantics, which
    are the same. The handle belongs to no task: any task may release what another
    acquired through it. It holds the lock at most once (not re-entrant).

    Cancellation: a cancelled :meth:`acquire` (or one under ``asyncio.timeout``) leaves
    nothing behind on the server; ``async with`` releases the lock when the block is
    cancelled. ``on_lost(lock)`` runs in a task of its own (one per loss); it may be a
    coroutine function.
    """

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        *,
        ttl: float,
        timeout: float | None = None,
        auto_renew: bool = True,
        on_lost: OnLost | None = None,
        fair: bool = False,
    ) -> None:
        self.name = validate_name("lock name", name)
        self.ttl = validate_ttl(ttl)
        self.timeout = None if timeout is None else validate_timeout("timeout", timeout)
        if not isinstance(auto_renew, bool):
            raise ConfigError(f"auto_renew must be True or False, got {auto_renew!r}")
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost must be callable or None, got {on_lost!r}")
        if not isinstance(fair, bool):
            raise ConfigError(f"fair must be True or False, got {fair!r}")
        self.auto_renew = auto_renew
        self.fair = fair
        self._on_lost = on_lost
        self._client = client
        self._slot = client.backend.locks.slot(self.name, self.ttl, auto_renew, fair)
        self._grant: LockGrant | None = None
        self._generation = 0
        self._lost_reason: str | None = None
        self._last_fence: int | None = None
        self._acquiring = False
        self._renewals = client_renewals(client)
        # The generation whose renewal is in flight (at most one per grant), or None.
        self._renewing: int | None = None

    # -- state ---------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """True while this handle holds the lock by a conservative client-side clock
        (see :attr:`dcoord.Lock.held`); it never errs towards True."""
        return is_held(self._grant, self._lost_reason is not None, time.monotonic())

    @property
    def fence(self) -> int:
        """The fencing token of the current (or most recent) grant; raises LockNotOwned
        before the first grant."""
        if self._last_fence is None:
            raise LockNotOwned(f"lock {self.name!r} was never acquired by this handle")
        return self._last_fence

    async def info(self) -> LockInfo | None:
        """Who holds this lock now (any process, not only this handle), as the server
        sees it; None when nobody does. See :meth:`AsyncClient.locks`."""
        self._client.check_open()
        reader = inspect.backend_part(self._client.backend.kind, asynchronous=True).info
        found: LockInfo | None = await reader(self._client.backend, self.name)
        return found

    # -- acquire -------------------------------------------------------------------

    async def acquire(self, timeout: float | None = None) -> bool:
        """Acquire the lock; True once held, False if ``timeout`` passed first.

        ``timeout`` (seconds; None: the handle's timeout, and None there: for ever; 0:
        one attempt). Waiters are woken by the release (or the holder's expiry), not by
        polling. Cancelling it leaves no grant, queue entry or waiter behind.
        """
        wait = self.timeout if timeout is None else validate_timeout("timeout", timeout)
        started = time.monotonic()
        deadline = None if wait is None else started + wait
        if self._client.closed:
            raise ClientClosed(f"cannot acquire lock {self.name!r}: the client is closed")
        if self._acquiring:
            raise LockError(
                f"lock {self.name!r}: another acquire on this handle is in progress "
                "(use one handle per concurrent holder)"
            )
        if self.held:
            raise LockError(
                f"lock {self.name!r} is already held by this handle (handles are not re-entrant)"
            )
        self._acquiring = True
        try:
            if self._grant is not None:
                await self._drop_stale()
            grant = await self._slot.acquire(deadline)
            metrics.lock_acquire(self, time.monotonic() - started, grant is not None)
            if grant is None:
                return False
            if self._client.closed:
                # Granted while the client closed: nobody would renew or release it.
                with contextlib.suppress(DcoordError):
                    await self._slot.release()
                raise ClientClosed(f"cannot acquire lock {self.name!r}: the client is closed")
            grant = conservative(grant, self.ttl)
            self._grant = grant
            self._generation += 1
            self._lost_reason = None
            self._last_fence = grant.fence
            self._client._holding(self, True)
            due = first_due(grant, self.ttl, self.auto_renew, time.monotonic())
            self._renewals.watch(self, self._generation, coalesced(due) if self.auto_renew else due)
            return True
        finally:
            self._acquiring = False

    async def _drop_stale(self) -> None:
        # A lost grant may still sit on the server (only our clock gave up on it):
        # delete it if it is still ours, so this acquire does not wait for ourselves.
        self._end_grant()
        try:
            await self._slot.release()
        except DcoordError as exc:
            log.info(
                "lock %r: could not clean up a lost grant: %s",
                self.name,
                exc,
                extra=lock_fields(self),
            )

    def _end_grant(self) -> LockGrant | None:
        """Forget the grant and stop looking after it; returns the grant it was. A
        renewal in flight finishes with its batch, and its answer is ignored."""
        grant, self._grant = self._grant, None
        self._generation += 1
        self._renewing = None
        self._client._holding(self, False)
        self._renewals.discard(self)
        return grant

    # -- release / extend ----------------------------------------------------------

    async def release(self) -> None:
        """Release the lock; LockNotOwned if this handle does not hold it (never
        acquired, released, or lost: then the server's copy is still deleted if ours)."""
        problem = await self._release()
        if problem is not None:
            raise LockNotOwned(f"lock {self.name!r} is not held by this handle: {problem}")

    async def _release(self) -> str | None:
        """Release; None if it was held, else why it was not (raises BackendUnavailable)."""
        reason = self._lost_reason
        grant = self._end_grant()
        if grant is None:
            return "never acquired, or already released"
        metrics.lock_released(self)
        expired = time.monotonic() >= grant.expires_at
        released = await self._slot.release()
        return release_problem(reason, expired, released)

    async def extend(self, ttl: float | None = None) -> None:
        """Reset the lock's remaining time to ``ttl`` seconds (default: the lock's TTL);
        LockNotOwned if it is not held any more (the handle is then lost)."""
        seconds = self.ttl if ttl is None else validate_ttl(ttl)
        grant, generation, reason = self._grant, self._generation, self._lost_reason
        if grant is None:
            raise LockNotOwned(f"lock {self.name!r} is not held by this handle")
        if reason is not None or time.monotonic() >= grant.expires_at:
            await self._mark_lost(generation, "its TTL passed before extend()")
            raise LockNotOwned(f"lock {self.name!r} was lost: {reason or 'its TTL passed'}")
        new = await self._slot.extend(seconds)
        if new is None:
            await self._mark_lost(generation, "the server no longer has it")
            raise LockNotOwned(f"lock {self.name!r} was lost: the server no longer has it")
        if generation == self._generation and self._lost_reason is None:
            self._grant = conservative(new, self.ttl)

    # -- watchdog (driven by dcoord.aio.renewals) ------------------------------------

    def _look(self, generation: int, now: float) -> tuple[float | None, LockGrant | None]:
        """The scheduler's look at grant ``generation`` at ``now``: its deadline, when to
        look again unless renewed first (None: not held any more), and, if a renewal is
        to be sent now, the grant it is for (it is then in flight: at most one per
        grant). Loses the lock once its deadline has passed."""
        grant = self._grant
        if generation != self._generation or grant is None or self._lost_reason:
            return None, None
        in_flight = self._renewing == generation
        decision = tick(grant, now, auto_renew=self.auto_renew, in_flight=in_flight)
        if decision.lost is not None:
            self._lose(generation, decision.lost)
            return None, None
        if decision.renew:
            self._renewing = generation
            return decision.due, grant
        return decision.due, None  # the deadline, exactly

    def _renewal_batch(self) -> AsyncRenewalBatch | None:
        """The batch this lock's renewals may join, if its slot has one."""
        batch_of = getattr(self._slot, "renewal_batch", None)
        return None if batch_of is None else cast("AsyncRenewalBatch | None", batch_of())

    def _renewed(
        self, generation: int, sent_for: LockGrant, answer: Renewed, now: float
    ) -> float | None:
        """Apply the answer (a grant, None, or the error) to the renewal of ``sent_for``
        received at ``now``; when to look again (a coalesced renewal time), or None once
        the grant is gone or lost."""
        if self._renewing == generation:
            self._renewing = None
        failure = answer if isinstance(answer, Exception) else None
        if failure is not None:  # this lock's alone: after_renewal retries or loses it
            metrics.lock_renewal_failed(self)
        grant = self._grant
        if generation != self._generation or grant is None or self._lost_reason:
            return None
        # A user's extend() that ran meanwhile may have moved the deadline further.
        base = grant if grant.expires_at > sent_for.expires_at else sent_for
        new = None if failure is not None else cast("LockGrant | None", answer)
        outcome = after_renewal(base, self.ttl, now, new, failure)
        if outcome.lost is not None:
            self._lose(generation, outcome.lost)
            return None
        if outcome.retrying:
            log.warning(
                "lock %r: renewal failed, retrying: %r", self.name, failure, extra=lock_fields(self)
            )
        elif outcome.grant is not None and outcome.grant.expires_at > grant.expires_at:
            self._grant = outcome.grant
        assert outcome.due is not None
        return coalesced(outcome.due)

    def _lose(self, generation: int, reason: str, *, report: bool = True) -> bool:
        """Mark grant ``generation`` lost (False if it is not current or already lost);
        ``report``: run ``on_lost`` in a task of its own (one lock's slow callback
        delays no other's renewal)."""
        if generation != self._generation or self._lost_reason is not None:
            return False
        self._lost_reason = reason
        self._renewals.discard(self)
        metrics.lock_lost(self)
        log.warning(
            "lock %r (fence %s) lost: %s",
            self.name,
            self._last_fence,
            reason,
            extra=lock_fields(self),
        )
        if report and self._on_lost is not None:
            self._client._spawn(self._report_lost(), self.name)
        return True

    async def _mark_lost(self, generation: int, reason: str) -> None:
        """Mark the grant lost and run ``on_lost`` before returning (extend())."""
        if self._lose(generation, reason, report=False):
            await self._report_lost()

    async def _report_lost(self) -> None:
        if self._on_lost is None:
            return
        try:
            result = self._on_lost(self)
            if pyinspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_lost callback of lock %r failed", self.name, extra=lock_fields(self))

    async def _abandon(self) -> None:
        """Let go at client close: best effort, the TTL covers what this cannot do."""
        grant = self._end_grant()
        if grant is not None:
            metrics.lock_released(self)
            try:
                await self._slot.release()
            except Exception as exc:  # any failure: the other locks are still let go
                log.info(
                    "lock %r not released at close (it expires by its TTL): %r",
                    self.name,
                    exc,
                    extra=lock_fields(self),
                )

    # -- context manager -----------------------------------------------------------

    async def __aenter__(self) -> AsyncLock:
        if not await self.acquire():
            raise LockTimeout(f"lock {self.name!r} not acquired within {self.timeout} s")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # As Lock.__exit__: the block's exception wins; a lock lost on the way is
        # LockLost. A cancelled block still releases: shielded, so a second cancel
        # cannot interrupt the release half-way (it completes in its own task).
        if self._grant is None and self._lost_reason is None:
            return  # released by the user inside the block
        try:
            if isinstance(exc, asyncio.CancelledError):
                problem = await asyncio.shield(self._release())
            else:
                problem = await self._release()
        except BackendUnavailable as release_error:
            if exc is not None:
                log.warning(
                    "lock %r: release after a failed block: %s",
                    self.name,
                    release_error,
                    extra=lock_fields(self),
                )
                return
            raise
        if problem is None:
            return
        if exc is not None:
            log.warning(
                "lock %r: %s (while the block raised %r)",
                self.name,
                problem,
                exc,
                extra=lock_fields(self),
            )
            return
        raise LockLost(
            f"lock {self.name!r} (fence {self._last_fence}) was lost while the with-block "
            f"ran: {problem}. The block completed, but another holder may have run at the "
            "same time; guard writes with the fence (client.fence(...).admit(lock.fence))."
        )

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return (
            f"<dcoord.aio.AsyncLock {self.name!r} ttl={self.ttl:g} {state} "
            f"fence={self._last_fence}>"
        )
