"""Async leader elections in the embedded store: the sync store's table, async waiting.

Campaign steps, renewals, proclamations and reads are :mod:`.election`'s own (each a
short critical section under the table's condition, never waiting), so sync and async
candidates of one ``memory://`` store compete in one election. Only waiting differs: an
async candidate or watcher registers a waker on the table that sets an
:class:`asyncio.Event` on its loop (thread-safely); every change calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from ..base import LockGrant
from ..election_base import LeaderRecord
from .election import MemoryCandidate, MemoryElections, _Table


class AsyncMemoryElections:
    """The async election store of one memory backend (shares :class:`MemoryElections`'
    table)."""

    def __init__(self, elections: MemoryElections) -> None:
        self._elections = elections

    def candidate(self, name: str, ttl: float, value: bytes) -> AsyncMemoryCandidate:
        return AsyncMemoryCandidate(self._elections.candidate(name, ttl, value))

    async def leader(self, name: str) -> LeaderRecord | None:
        return self._elections.leader(name)

    async def subscribe(self, name: str) -> AsyncMemorySubscription:
        return AsyncMemorySubscription(self._elections._table)


class _Waker:
    """An event of the caller's loop, set from whichever thread changes the table."""

    def __init__(self, table: _Table) -> None:
        self._table = table
        self.event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        with table.cond:
            table.wakers.add(self._wake)

    def _wake(self) -> None:
        # A loop closed with a waker still registered (a watch never closed) must not
        # break the change of another client's election.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.event.set)

    def remove(self) -> None:
        with self._table.cond:
            self._table.wakers.discard(self._wake)


class AsyncMemoryCandidate:
    def __init__(self, candidate: MemoryCandidate) -> None:
        self._candidate = candidate
        self._table = candidate._table

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        token = object()
        # Registered before the first try: a change between a try and the wait sets the
        # event, so the wait returns at once. Removed in any case, cancellation included.
        waker = _Waker(self._table)
        try:
            while True:
                with self._table.cond:
                    now = time.monotonic()
                    grant = self._candidate.try_lead(token, now)
                    if grant is not None:
                        return grant
                    if deadline is not None and now >= deadline:
                        return None
                    wait = self._candidate.wait_for(now, deadline)
                    waker.event.clear()
                # Woken by any change; otherwise at the leader's expiry or our deadline.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, wait)):
                        await waker.event.wait()
        finally:
            waker.remove()

    async def release(self) -> bool:
        return self._candidate.release()

    async def extend(self, ttl: float) -> LockGrant | None:
        return self._candidate.extend(ttl)

    async def proclaim(self, value: bytes) -> bool:
        return self._candidate.proclaim(value)


class AsyncMemorySubscription:
    """Every change of the store's elections wakes it (a watcher re-reads its own)."""

    def __init__(self, table: _Table) -> None:
        self._waker = _Waker(table)

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._waker.event.wait()
        self._waker.event.clear()

    async def wake(self) -> None:
        self._waker.event.set()

    async def close(self) -> None:
        self._waker.remove()
