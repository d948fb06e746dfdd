"""Async group membership in the embedded store: the sync store's record, async waiting.

Joins, reads, heart-beats and leaves are :class:`.membership.MemoryGroups`' own steps
(short critical sections that never wait), so sync and async members of one
``memory://`` store see each other. Only waiting differs: a subscription registers a
waker on the group's key that sets an :class:`asyncio.Event` on its loop
(thread-safely), called by every change; it then hands over the changes from the
group's change log, as the sync subscription does.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..base import GroupChange, GroupSnapshot, TokenRegistration
from .membership import MemoryGroups


class AsyncMemoryRegistration:
    """A :class:`TokenRegistration` seen through coroutines (its steps never wait)."""

    def __init__(self, registration: TokenRegistration) -> None:
        self._reg = registration

    @property
    def ttl(self) -> float:
        return self._reg.ttl

    @property
    def expires_at(self) -> float:
        return self._reg.expires_at

    async def refresh(self) -> bool:
        return self._reg.refresh()

    async def leave(self) -> bool:
        return self._reg.leave()


class AsyncMemoryGroups:
    """The async group store of one memory backend (shares :class:`MemoryGroups`' data)."""

    def __init__(self, groups: MemoryGroups) -> None:
        self._groups = groups

    async def join(
        self, group: str, member_id: str, payload: bytes, ttl: float
    ) -> AsyncMemoryRegistration | None:
        registration = self._groups.join(group, member_id, payload, ttl)
        return None if registration is None else AsyncMemoryRegistration(registration)

    async def read(self, group: str) -> GroupSnapshot:
        return self._groups.read(group)

    async def subscribe(self, group: str) -> AsyncMemorySubscription:
        return AsyncMemorySubscription(self._groups, group)


class AsyncMemorySubscription:
    def __init__(self, groups: MemoryGroups, group: str) -> None:
        self._groups = groups
        self._group = group
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        with groups.cond:  # (no change between the epoch and the waker)
            self._seen = groups.epoch(group)
            groups.add_waker(group, self._wake)

    async def wait(self, timeout: float) -> list[GroupChange] | None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
        # (the follower stopping) that arrives as the event is set.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        self._changed.clear()
        with self._groups.cond:
            self._seen, changes = self._groups.changes(self._group, self._seen)
        return changes

    async def wake(self) -> None:
        self._changed.set()

    async def close(self) -> None:
        self._groups.remove_waker(self._group, self._wake)

    def _wake(self) -> None:
        # Runs on the thread that changed the group, under the store's condition: a
        # closed loop (its subscriber never closed) must not fail that change.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._changed.set)
