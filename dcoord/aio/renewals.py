"""The renewal scheduler of one async client: one timer, and one task per batch of locks.

Every held :class:`~dcoord.aio.AsyncLock` of a client registers here when it is next to
be looked at (:func:`dcoord.core.lockstate.coalesced` renewal times, exact deadlines
without renewal). One loop timer fires at the earliest; the tick looks at every lock
due by then, or due for renewal within a quarter of its renewal interval (as the sync
client's watchdog: renewing a little early costs nothing, and those locks are then due
together again) (:meth:`AsyncLock._look`: lost at its deadline, or renewed) and renews the
ones to renew per batch of their store (``slot.renewal_batch()``, see
:class:`~dcoord.backends.aio_base.AsyncRenewalBatch`: one Redis pipeline, one pass in
memory, shared etcd leases read as now) in ONE task, then applies each lock's answer on
its own (:meth:`AsyncLock._renewed`). So 10,000 locks renewed every 0.33 s cost about a
timer and a task per 10 ms grain, not a timer, a task and a future per lock and renewal.

While a renewal is unanswered, a timer of its batch (:class:`_Overdue`) watches the
exact deadlines of its locks, so a lock is reported lost when its deadline passes
however long the batch hangs; an answer arriving later is then ignored
(``after_renewal`` never makes a lost lock held again). Thousands of locks due at once
are looked at TICK_SLICE per loop step, so the loop's other tasks run in between.
Release, loss and close unregister a lock; the client's close cancels the timer and the
tasks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..backends.aio_base import EXTEND_EACH, AsyncRenewalBatch
from ..backends.base import LockGrant, Renewed
from ..core.lockstate import RENEW_FRACTION
from ..lock import RENEWAL_COALESCE
from ..perkey import PerKey

if TYPE_CHECKING:
    from .client import AsyncClient
    from .lock import AsyncLock

# One renewal to send: the lock, the grant it holds (its generation) and the grant sent for.
Renewal = tuple["AsyncLock", int, LockGrant]

# Locks looked at in one loop step, at most (and so renewed per batch and task): with
# thousands due at once, a tick goes on in the next step, letting the loop's other
# callbacks run in between, instead of holding the loop for the whole lot.
TICK_SLICE = 256


class Renewals:
    """The renewal timer and tasks of one :class:`~dcoord.aio.AsyncClient`'s locks.

    Registration is O(log n) and synchronous (no task, no I/O): an acquire or release
    costs the loop nothing more. A held lock stays looked after until it is released,
    lost, or the client closes, even if the application dropped its handle.
    """

    def __init__(self, client: AsyncClient) -> None:
        # Per lock, the sequence number of its current heap entry; older entries are stale.
        self._current: dict[AsyncLock, int] = {}
        self._heap: list[tuple[float, int, AsyncLock, int]] = []  # (at, seq, lock, generation)
        self._seq = itertools.count()
        self._stale = 0  # entries of the heap no longer current
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        client.on_close(self.close)

    def watch(self, lock: AsyncLock, generation: int, at: float) -> None:
        """Look at ``lock`` (its grant ``generation``) at the monotonic time ``at``,
        instead of when it was to be looked at before."""
        if self._closed:
            return
        seq = next(self._seq)
        replaced = self._current.get(lock)
        self._current[lock] = seq
        heapq.heappush(self._heap, (at, seq, lock, generation))
        if replaced is not None:
            self._forget_one()
        if at < self._timer_at:
            self._arm(at)

    def discard(self, lock: AsyncLock) -> None:
        """Stop looking after ``lock`` (released or lost); a renewal in flight is left to
        finish: its answer is ignored (the grant's generation has changed)."""
        if self._current.pop(lock, None) is not None:
            self._forget_one()

    def _forget_one(self) -> None:
        """One heap entry is no longer current. Lazy removal keeps that O(1); compacting
        at half bounds the heap of a client that acquires and releases many locks with
        long TTLs (their entries would otherwise wait there for their due times)."""
        self._stale += 1
        if self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if self._current.get(e[2]) == e[1]]
            heapq.heapify(self._heap)
            self._stale = 0

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_at(at, self._tick)

    def _tick(self) -> None:
        """The timer fired: look at every lock due by now; renew per batch, one task each."""
        # No timer is armed while the tick runs (its watch() calls arm none): it arms
        # the one for the earliest entry when done.
        self._timer, self._timer_at = None, -math.inf
        now = time.monotonic()
        current = self._current  # (the heap is self._heap: a watch() may compact it)
        batches: dict[AsyncRenewalBatch, list[Renewal]] = {}
        looked = 0
        while self._heap and looked < TICK_SLICE:
            at, seq, lock, generation = self._heap[0]
            # Due now, or due for renewal within RENEWAL_COALESCE of its renewal
            # interval: renewed with these (a little early costs nothing), so locks
            # taken at different moments come to be due together and share later round
            # trips too. A lock without renewal is looked at only at its deadline (early,
            # it would only be watched again at the same time: popped over and over).
            early = at > now
            if early and (
                not lock.auto_renew or at - now > lock.ttl * RENEW_FRACTION * RENEWAL_COALESCE
            ):
                break
            heapq.heappop(self._heap)
            if current.get(lock) != seq:
                self._stale -= 1
                continue
            del current[lock]
            looked += 1
            due, sent_for = lock._look(generation, now)
            if sent_for is not None:
                # In flight now: its deadline is watched by its renewal (_Overdue).
                batch = lock._renewal_batch()
                if batch is None:  # its renewal is a request of its own: a task of its own
                    self._start(EXTEND_EACH, [(lock, generation, sent_for)])
                else:
                    batches.setdefault(batch, []).append((lock, generation, sent_for))
            elif due is not None:  # not renewed (auto_renew=False): lost at its deadline
                self.watch(lock, generation, due)
        for batch, renewals in batches.items():
            self._start(batch, renewals)
        heap = self._heap
        while heap and current.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
            self._stale -= 1
        self._timer_at = math.inf
        if heap:
            self._arm(heap[0][0])

    def _start(self, batch: AsyncRenewalBatch, renewals: list[Renewal]) -> None:
        task = asyncio.get_running_loop().create_task(
            self._renew(batch, renewals), name="dcoord lock renewals"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew(self, batch: AsyncRenewalBatch, renewals: Sequence[Renewal]) -> None:
        """Renew ``renewals`` in one round trip; apply each answer to its own lock."""
        # Released (or lost) between the tick and this task's start: not renewed.
        renewals = [r for r in renewals if r[0]._renewing == r[1]]
        if not renewals:
            return
        answers: list[Renewed]
        overdue = _Overdue(renewals)
        try:
            answers = await batch.extend_many([(r[0]._slot, r[0].ttl) for r in renewals])
        except Exception as exc:  # the round trip failed: every renewal of it failed alike
            answers = [exc] * len(renewals)
        finally:
            overdue.cancel()
        now = time.monotonic()  # one instant for the batch: its locks stay due together
        for (lock, generation, sent_for), answer in zip(renewals, answers, strict=True):
            due = lock._renewed(generation, sent_for, answer, now)
            if due is not None:
                self.watch(lock, generation, due)

    async def close(self) -> None:
        """Stop the timer and cancel the renewals in flight (the client is closing)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        self._heap.clear()
        self._current.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Overdue:
    """The exact deadlines of the locks of one renewal in flight: one loop timer at the
    earliest; a lock whose deadline passes while its renewal is unanswered is lost then
    (:meth:`AsyncLock._look`), however long the request hangs."""

    def __init__(self, renewals: Sequence[Renewal]) -> None:
        self._renewals = renewals
        self._handle: asyncio.TimerHandle | None = None
        self._arm(min(sent_for.expires_at for _, _, sent_for in renewals))

    def _arm(self, at: float) -> None:
        self._handle = asyncio.get_running_loop().call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = time.monotonic()
        later = []  # deadlines not passed yet (a user's extend() may have moved them)
        for lock, generation, _ in self._renewals:
            if lock._renewing == generation:
                due, _ = lock._look(generation, now)
                if due is not None:
                    later.append(due)
        if later:
            self._arm(min(later))

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


client_renewals: PerKey[AsyncClient, Renewals] = PerKey(Renewals)
"""The one :class:`Renewals` of a client, made at its first lock."""
