"""Distributed locks: the :class:`Lock` handle users hold.

The semantics live here once: validation, timeouts, the conservative client-side
deadline behind :attr:`Lock.held`, the watchdog that renews held locks (one scheduler
job per client, renewal requests on a small worker pool), ``on_lost``, and the context
manager. Backends only provide a :class:`~dcoord.backends.base.LockSlot` per handle
(acquire with notified waiting, compare-and-act release and extend, a fence per grant).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, cast

from . import inspect, metrics
from .backends.base import LockGrant, RenewalBatch, Renewed
from .config import is_utf8, positive_seconds
from .convoyfree import ConvoyFreeLock

# Re-exported: the other fenced primitives (election) renew by the same rules.
from .core.lockstate import CLOCK_DRIFT as CLOCK_DRIFT
from .core.lockstate import RENEW_FRACTION as RENEW_FRACTION
from .core.lockstate import (
    after_renewal,
    conservative,
    first_due,
    is_held,
    release_problem,
    tick,
)
from .errors import (
    BackendUnavailable,
    ClientClosed,
    ConfigError,
    DcoordError,
    LockError,
    LockLost,
    LockNotOwned,
    LockTimeout,
)
from .logfields import lock_fields
from .perkey import PerKey
from .scheduler import Job, JobResult, WorkerPool

if TYPE_CHECKING:
    from .client import Client
    from .inspect import LockInfo

log = logging.getLogger("dcoord.lock")

DEFAULT_TTL = 30.0
MIN_TTL = 0.001
MAX_TTL = 86_400.0 * 365
MAX_NAME_LENGTH = 1024
# Renewal requests of a client run on at most this many threads (started only when one
# is busy): a renewal stuck on a slow request leaves the others to renew the rest.
RENEWAL_WORKERS = 4
# Renewals that can share a round trip (Redis: one pipeline) go out in batches of at most
# this many: each batch is one worker's task, so a large batch neither blocks the server
# for long nor keeps the other workers idle.
RENEWAL_BATCH = 1000
# A lock due for renewal within this fraction of its renewal interval is renewed with
# the ones due now: renewing a little early costs nothing, and the locks of a batch are
# then due together again, so renewals stay batched instead of trickling out one by one.
RENEWAL_COALESCE = 0.25

OnLost = Callable[["Lock"], object]


def validate_name(what: str, name: object) -> str:
    """A lock or fence name: a non-empty str of at most 1024 characters, no NUL, no lone
    surrogate (keys are UTF-8 on every server)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH or "\x00" in name or not is_utf8(name):
        raise ConfigError(
            f"{what} must be at most {MAX_NAME_LENGTH} characters of valid Unicode with no "
            f"NUL, got {name[:80]!r}"
        )
    return name


def validate_ttl(ttl: object) -> float:
    """A lock TTL: a finite number of seconds in [0.001, one year]."""
    seconds = positive_seconds("ttl", ttl, maximum=MAX_TTL)
    if seconds < MIN_TTL:
        raise ConfigError(f"ttl must be at least {MIN_TTL:g} seconds, got {ttl!r}")
    return seconds


def validate_timeout(what: str, timeout: object) -> float:
    """A wait timeout: a finite number of seconds >= 0 (0 means one attempt)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError(f"{what} must be a number of seconds or None, got {timeout!r}")
    if not math.isfinite(timeout) or timeout < 0 or timeout > MAX_TTL:
        raise ConfigError(f"{what} must be >= 0 and <= {MAX_TTL:g} seconds, got {timeout!r}")
    return float(timeout)


class Lock:
    """A distributed lock with a TTL, a fencing token per grant, and auto-renewal.

    Made by :meth:`dcoord.Client.lock`. The lock belongs to this handle, not to a thread:
    any thread may release what another acquired through the same handle. A handle holds
    the lock at most once (it is not re-entrant); make one handle per concurrent holder.

    ``ttl`` bounds how long the lock outlives a holder that stops renewing (a crash, a
    pause, a partition). With ``auto_renew`` the client extends the lock every
    ``ttl / 3`` in the background; when that fails until the TTL has passed, or the
    server no longer has the lock, the handle turns *lost*: :attr:`held` is False and
    ``on_lost`` is called with the handle (on a background thread of the client, at the
    deadline even while a renewal request still waits for the server; keep it short).
    One lock's renewal never delays or fails another's. Writes to shared
    resources should carry :attr:`fence` so that a stale holder's writes are rejected
    (see :meth:`dcoord.Client.fence`).
    """

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        ttl: float = DEFAULT_TTL,
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
        self._registry = _client_locks(client)
        # _mutex guards the fields below and is never held across a network call;
        # _op serialises the slot's release/extend (user calls and the watchdog).
        self._mutex = threading.Lock()
        self._op = threading.Lock()
        self._grant: LockGrant | None = None
        self._generation = 0
        self._lost_reason: str | None = None
        self._last_fence: int | None = None
        self._acquiring = False
        self._renewing: int | None = None  # the generation whose renewal is in flight

    # -- state ---------------------------------------------------------------------

    def info(self) -> LockInfo | None:
        """Who holds this lock now (any process, not only this handle), as the server
        sees it; None when nobody does. See :meth:`dcoord.Client.locks`."""
        self._client.check_open()
        return inspect.lock(self._client.backend, self.name)

    @property
    def held(self) -> bool:
        """True while this handle holds the lock by a conservative client-side clock.

        False before the first acquire, after release, once the TTL passed without a
        successful renewal (measured from when the request was sent), and once the
        watchdog found the lock lost. It never errs towards True.
        """
        with self._mutex:
            grant, lost = self._grant, self._lost_reason is not None
        return is_held(grant, lost, time.monotonic())

    @property
    def fence(self) -> int:
        """The fencing token of the current (or most recent) grant.

        Strictly greater than the token of every earlier grant of this lock name, by any
        client, also across server restarts. Raises LockNotOwned if never acquired.
        """
        with self._mutex:
            fence = self._last_fence
        if fence is None:
            raise LockNotOwned(f"lock {self.name!r} has no fence: this handle never acquired it")
        return fence

    # -- acquire -------------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Acquire the lock; True if acquired (``threading.Lock.acquire`` compatible).

        ``blocking=False`` makes one attempt. Otherwise wait up to ``timeout`` seconds
        (None: the handle's timeout; -1 or a handle timeout of None: for ever). Waiters
        are woken by the release (or the holder's expiry), not by polling.
        """
        if not blocking:
            if timeout is not None and timeout != -1:
                raise ConfigError("a non-blocking acquire takes no timeout")
            wait: float | None = 0.0
        elif timeout is None:
            wait = self.timeout
        elif timeout == -1 and not isinstance(timeout, bool):
            wait = None
        else:
            wait = validate_timeout("timeout", timeout)
        started = time.monotonic()
        deadline = None if wait is None else started + wait
        if self._client.closed:
            raise ClientClosed(f"cannot acquire lock {self.name!r}: the client is closed")

        with self._mutex:
            if self._acquiring:
                raise LockError(
                    f"lock {self.name!r}: another acquire on this handle is in progress "
                    "(use one handle per concurrent holder)"
                )
            stale = self._grant
            if (
                stale is not None
                and self._lost_reason is None
                and time.monotonic() < (stale.expires_at)
            ):
                raise LockError(
                    f"lock {self.name!r} is already held by this handle "
                    "(handles are not re-entrant)"
                )
            self._acquiring = True
        try:
            if stale is not None:
                self._drop_stale()
            grant = self._slot.acquire(deadline)
            metrics.lock_acquire(self, time.monotonic() - started, grant is not None)
            if grant is None:
                return False
            grant = conservative(grant, self.ttl)
            with self._mutex:
                self._grant = grant
                self._generation += 1
                self._lost_reason = None
                self._last_fence = grant.fence
                generation = self._generation
            due = first_due(grant, self.ttl, self.auto_renew, time.monotonic())
            self._registry.add(self, generation, due)
            return True
        finally:
            with self._mutex:
                self._acquiring = False

    def _drop_stale(self) -> None:
        # A lost grant may still sit on the server (only our clock gave up on it):
        # delete it if it is still ours, so this acquire does not wait for ourselves.
        with self._mutex:
            self._grant = None
            self._generation += 1
        self._registry.discard(self)
        try:
            with self._op:
                self._slot.release()
        except DcoordError as exc:
            log.info(
                "lock %r: could not clean up a lost grant: %s",
                self.name,
                exc,
                extra=lock_fields(self),
            )

    # -- release / extend ----------------------------------------------------------

    def release(self) -> None:
        """Release the lock.

        Raises LockNotOwned if this handle does not hold it: never acquired, already
        released, or lost (TTL passed, renewal failed, taken over). In the lost case the
        server's copy is still deleted if it is ours, so nobody waits for it.
        """
        problem = self._release()
        if problem is not None:
            raise LockNotOwned(f"lock {self.name!r} is not held by this handle: {problem}")

    def _release(self) -> str | None:
        """Release; None if it was held, else why it was not (raises BackendUnavailable)."""
        with self._mutex:
            grant, reason = self._grant, self._lost_reason
            if grant is None:
                return "never acquired, or already released"
            self._grant = None
            self._generation += 1
        self._registry.discard(self)
        metrics.lock_released(self)
        expired = time.monotonic() >= grant.expires_at
        with self._op:
            released = self._slot.release()
        return release_problem(reason, expired, released)

    def extend(self, ttl: float | None = None) -> None:
        """Reset the lock's remaining time to ``ttl`` seconds (default: the lock's TTL).

        Raises LockNotOwned if the lock is not held any more (the handle is then lost).
        """
        seconds = self.ttl if ttl is None else validate_ttl(ttl)
        with self._mutex:
            grant, generation, reason = self._grant, self._generation, self._lost_reason
        if grant is None:
            raise LockNotOwned(f"lock {self.name!r} is not held by this handle")
        if reason is not None or time.monotonic() >= grant.expires_at:
            self._mark_lost(generation, "its TTL passed before extend()")
            raise LockNotOwned(f"lock {self.name!r} was lost: {reason or 'its TTL passed'}")
        with self._op:
            new = self._slot.extend(seconds)
        if new is not None:
            new = conservative(new, self.ttl)
        if new is None:
            self._mark_lost(generation, "the server no longer has it")
            raise LockNotOwned(f"lock {self.name!r} was lost: the server no longer has it")
        with self._mutex:
            if generation == self._generation and self._lost_reason is None:
                self._grant = new

    # -- watchdog ------------------------------------------------------------------

    def _tick(self, generation: int) -> tuple[float | None, bool]:
        """Look after a held lock on the scheduler thread, never waiting for the network.

        Marks the handle lost once its deadline passed. Returns the monotonic time it is
        due again (None when it is not held any more) and whether a renewal should be
        sent now; it is then marked in flight, so at most one is sent per grant.
        """
        with self._mutex:
            grant = self._grant
            if generation != self._generation or grant is None or self._lost_reason:
                return None, False
            in_flight = self._renewing == generation
        decision = tick(grant, time.monotonic(), auto_renew=self.auto_renew, in_flight=in_flight)
        if decision.lost is not None:
            self._mark_lost(generation, decision.lost)
            return None, False
        if decision.renew:
            with self._mutex:  # only this thread sets it; the renewal clears it when done
                self._renewing = generation
        # A finished renewal reschedules it sooner than this (the deadline).
        return decision.due, decision.renew

    def _renew(self, generation: int) -> None:
        """Send one renewal (on a renewal worker), then have the lock looked after again."""
        due = None
        try:
            due = self._extend_grant(generation)
        finally:
            self._renewal_done(generation, due)

    def _renewal_done(self, generation: int, due: float | None) -> None:
        """The renewal of ``generation`` has ended: look after the lock again at ``due``
        (None: it is not held any more)."""
        with self._mutex:
            if self._renewing == generation:
                self._renewing = None
        if due is not None:
            self._registry.reschedule(self, generation, due)

    def _renewable(self, generation: int) -> LockGrant | None:
        """The grant to renew, if ``generation`` is still held (call with ``_op`` held:
        a user's extend() that ran first has moved the deadline)."""
        with self._mutex:
            grant = self._grant
            if generation != self._generation or grant is None or self._lost_reason:
                return None
        return grant

    def _renewal_batch(self) -> RenewalBatch | None:
        """The batch this lock's renewals may join, if its slot has one."""
        batch_of = getattr(self._slot, "renewal_batch", None)
        return None if batch_of is None else cast("RenewalBatch | None", batch_of())

    def _extend_grant(self, generation: int) -> float | None:
        """Extend the grant; the monotonic time of the next renewal, or None if done."""
        failure: Exception | None = None
        with self._op:
            grant = self._renewable(generation)
            if grant is None:
                return None
            try:
                new = self._slot.extend(self.ttl)
            except Exception as exc:  # handled below, without _op: on_lost may release
                new, failure = None, exc
        return self._renewed(generation, grant, new, failure)

    def _renewed(
        self, generation: int, grant: LockGrant, new: LockGrant | None, failure: Exception | None
    ) -> float | None:
        """Apply a renewal's answer (or failure); the next due time, or None if done."""
        # Whatever the failure (a DcoordError or, say, a server error reply nobody
        # mapped), it is this lock's alone: after_renewal retries it until the deadline.
        if failure is not None:
            metrics.lock_renewal_failed(self)
        outcome = after_renewal(grant, self.ttl, time.monotonic(), new, failure)
        if outcome.lost is not None:
            self._mark_lost(generation, outcome.lost)
            return None
        if outcome.retrying:
            log.warning(
                "lock %r: renewal failed, retrying: %r", self.name, failure, extra=lock_fields(self)
            )
            return outcome.due
        with self._mutex:
            if generation != self._generation or self._lost_reason is not None:
                return None
            self._grant = outcome.grant
        return outcome.due

    def _mark_lost(self, generation: int, reason: str) -> None:
        with self._mutex:
            if generation != self._generation or self._lost_reason is not None:
                return
            self._lost_reason = reason
        metrics.lock_lost(self)
        log.warning(
            "lock %r (fence %s) lost: %s",
            self.name,
            self._last_fence,
            reason,
            extra=lock_fields(self),
        )
        if self._on_lost is not None:
            try:
                self._on_lost(self)
            except Exception:
                log.exception(
                    "on_lost callback of lock %r failed", self.name, extra=lock_fields(self)
                )

    def _abandon(self) -> None:
        """Let go at client close: best effort, the TTL covers what this cannot do."""
        with self._mutex:
            grant, self._grant = self._grant, None
            self._generation += 1
        if grant is not None:
            metrics.lock_released(self)
            try:
                with self._op:
                    self._slot.release()
            except Exception as exc:  # any failure: the other locks are still let go
                log.info(
                    "lock %r not released at close (it expires by its TTL): %r",
                    self.name,
                    exc,
                    extra=lock_fields(self),
                )

    # -- context manager -----------------------------------------------------------

    def __enter__(self) -> Lock:
        if not self.acquire():
            raise LockTimeout(f"lock {self.name!r} not acquired within {self.timeout} s")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The block's own exception always wins: a release problem is only logged then.
        # After a clean block, a lock lost on the way is reported as LockLost (the work
        # ran but may have overlapped another holder), never as a confusing
        # "cannot release a lock you do not own" (redis-py #3532).
        try:
            with self._mutex:
                released_by_user = self._grant is None and self._lost_reason is None
            problem = None if released_by_user else self._release()
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
        return f"<dcoord.Lock {self.name!r} ttl={self.ttl:g} {state} fence={self._last_fence}>"


class _ClientLocks:
    """The locks one client holds: one scheduler job looks after them all; closed with it.

    Acquire and release only add and remove an entry here, so a lock cycle costs the
    scheduler thread nothing; its one job wakes when the earliest lock is due. The job
    never waits for the network: it hands renewals to a small worker pool (at most one
    in flight per lock) and marks a lock lost at its deadline even while its renewal
    hangs, so one slow or failing lock never costs another. A held lock stays held (and
    renewed) until it is released or the client closes, even if the application dropped
    its handle, as with Redisson's watchdog.
    """

    def __init__(self, client: Client) -> None:
        self._scheduler = client.scheduler
        self._workers = WorkerPool("dcoord-lock-renewal", RENEWAL_WORKERS)
        # Every acquire and release of every thread takes it: a plain lock formed a convoy
        # (convoyfree.py; 8 threads cycling embedded locks made 0.2x of one thread's rate).
        self._mutex = ConvoyFreeLock()
        # Per lock: when it is due, its generation, and the earliest it may be looked at
        # with others (RENEWAL_COALESCE).
        self._due: dict[Lock, tuple[float, int, float]] = {}
        self._job: Job | None = None
        self._job_at = math.inf
        self._job_token = 0
        client.on_close(self.close)

    def add(self, lock: Lock, generation: int, due: float) -> None:
        """Have ``lock`` (this grant of it) looked after from the monotonic time ``due``."""
        with self._mutex:
            self._due[lock] = _entry(lock, generation, due)
            old = self._run_by(due)
        if old is not None:
            old.cancel()

    def reschedule(self, lock: Lock, generation: int, due: float) -> None:
        """Move the next look at ``lock`` to ``due``, unless that grant is gone meanwhile."""
        with self._mutex:
            if self._due.get(lock, _GONE)[1] != generation:
                return  # released, re-acquired or closed meanwhile
            self._due[lock] = _entry(lock, generation, due)
            try:
                old = self._run_by(due)
            except ClientClosed:  # the scheduler closed: the client is closing
                return
        if old is not None:
            old.cancel()

    def _run_by(self, due: float) -> Job | None:
        """Make the job run by ``due`` (mutex held); returns a replaced job to cancel.

        Raises ClientClosed, changing nothing, once the scheduler is closed.
        """
        if due >= self._job_at:
            return None
        token = self._job_token + 1
        job = self._scheduler.every(
            1.0,
            lambda: self._run(token),
            name="dcoord lock watchdog",
            delay=max(0.0, due - time.monotonic()),
        )
        old, self._job, self._job_token, self._job_at = self._job, job, token, due
        return old

    def discard(self, lock: Lock) -> None:
        with self._mutex:
            self._due.pop(lock, None)

    def _run(self, token: int) -> JobResult:
        now = time.monotonic()
        with self._mutex:
            if token != self._job_token:
                return False  # replaced by an earlier-due job
            ready = [(lock, gen) for lock, (_, gen, early) in self._due.items() if early <= now]
        batches: dict[RenewalBatch, list[tuple[Lock, int]]] = {}
        for lock, generation in ready:
            due, renew = lock._tick(generation)
            with self._mutex:
                if self._due.get(lock, _GONE)[1] != generation:
                    continue  # released or re-acquired meanwhile
                if due is None:
                    del self._due[lock]
                    continue
                # Set before the renewal is handed over, so its reschedule comes after.
                self._due[lock] = _entry(lock, generation, due)
            if renew:
                batch = lock._renewal_batch()
                if batch is None:
                    self._workers.submit(functools.partial(lock._renew, generation))
                else:
                    batches.setdefault(batch, []).append((lock, generation))
        for batch, entries in batches.items():
            for start in range(0, len(entries), RENEWAL_BATCH):
                chunk = entries[start : start + RENEWAL_BATCH]
                self._workers.submit(functools.partial(self._renew_batch, batch, chunk))
        with self._mutex:
            if token != self._job_token:
                return False
            if not self._due:
                self._job, self._job_at = None, math.inf
                return False
            self._job_at = min(due for due, _, _ in self._due.values())
            return max(0.0, self._job_at - time.monotonic())

    def _renew_batch(self, batch: RenewalBatch, entries: list[tuple[Lock, int]]) -> None:
        """Renew ``entries`` (marked in flight by their ticks) in one round trip.

        Each lock's answer is its own, as if renewed alone: a lock the server no longer
        has is lost (``on_lost``) while the others of the batch renew, and an error
        reply fails only its lock. A lock whose ``_op`` is busy (a user's release or
        extend in progress) is renewed alone instead of holding up the batch.
        """
        taken: list[tuple[Lock, int, LockGrant]] = []
        answers: list[Renewed] = []
        try:
            for lock, generation in entries:
                if not lock._op.acquire(blocking=False):
                    self._workers.submit(functools.partial(lock._renew, generation))
                    continue
                grant = lock._renewable(generation)
                if grant is None:
                    lock._op.release()
                    lock._renewal_done(generation, None)
                    continue
                taken.append((lock, generation, grant))
            try:
                answers = batch.extend_many([(lock._slot, lock.ttl) for lock, _, _ in taken])
            except Exception as exc:  # the round trip failed: every lock of it failed alike
                answers = [exc] * len(taken)
        finally:
            # Released before the answers are applied: on_lost may release the lock.
            for lock, _, _ in taken:
                lock._op.release()
        for (lock, generation, grant), answer in zip(taken, answers, strict=True):
            due = None
            try:
                if isinstance(answer, Exception):
                    due = lock._renewed(generation, grant, None, answer)
                else:
                    due = lock._renewed(generation, grant, answer, None)
            finally:
                lock._renewal_done(generation, due)

    def close(self) -> None:
        with self._mutex:
            locks = list(self._due.keys())
            self._due.clear()
            job, self._job = self._job, None
            self._job_token += 1
        if job is not None:
            job.cancel()
        self._workers.close()
        # The store itself is the backend's to close (Backend.close_stores), after this.
        for lock in locks:
            lock._abandon()


_GONE = (0.0, -1, 0.0)  # what _ClientLocks._due.get finds for a lock it does not look after


def _entry(lock: Lock, generation: int, due: float) -> tuple[float, int, float]:
    """A ``_ClientLocks._due`` value: ``due``, the generation, and the earliest time the
    lock may be looked at with others due before it (RENEWAL_COALESCE)."""
    slack = lock.ttl * RENEW_FRACTION * RENEWAL_COALESCE if lock.auto_renew else 0.0
    return due, generation, due - slack


_client_locks: PerKey[Client, _ClientLocks] = PerKey(_ClientLocks)
