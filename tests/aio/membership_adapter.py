"""The async groups behind the sync API's shape, so the membership conformance tests
run on them (test-only; see tests/aio/adapter.py for the loop and the client).

Every call runs the async API's coroutine on the adapter's loop and waits; a watch's
callback runs on a thread of its own (as the sync Watch's), fed by ``async for`` over
:meth:`dcoord.aio.AsyncGroup.watch`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dcoord.aio import AsyncGroup, AsyncJoinedMember, AsyncLiveRing
from dcoord.membership import GroupView, Member
from dcoord.ring import DEFAULT_VNODES, HashRing

if TYPE_CHECKING:
    from tests.aio.adapter import SyncView

T = TypeVar("T")


async def _on_loop(fn: Callable[[], T]) -> T:
    """Run a plain function on the loop's thread (the async objects are not thread-safe)."""
    return fn()


class SyncGroup:
    """An :class:`AsyncGroup` with :class:`dcoord.Group`'s methods."""

    def __init__(self, client: SyncView, name: str) -> None:
        self._client = client
        self.aio: AsyncGroup = client.aio.group(name)
        self.name = self.aio.name

    def join(self, member_id: Any, **options: Any) -> SyncMember:
        user: Callable[[SyncMember], object] | None = options.pop("on_lost", None)
        holder: list[SyncMember] = []
        if user is not None:
            options["on_lost"] = lambda _: user(holder[0])
        member = SyncMember(self._client, self._client.run(self.aio.join(member_id, **options)))
        holder.append(member)
        return member

    def members(self) -> dict[str, Member]:
        return self._client.run(self.aio.members())

    def view(self) -> GroupView:
        return self._client.run(self.aio.view())

    def epoch(self) -> int:
        return self._client.run(self.aio.epoch())

    def ring(self, vnodes: Any = DEFAULT_VNODES) -> SyncRing:
        return SyncRing(self._client, self._client.run(self.aio.ring(vnodes=vnodes)))

    def watch(self, callback: Callable[[GroupView], None]) -> SyncWatch:
        return SyncWatch(self._client, self.aio.watch(), callback)


class SyncMember(Member):
    """An :class:`AsyncJoinedMember` with :class:`dcoord.JoinedMember`'s methods."""

    def __init__(self, client: SyncView, member: AsyncJoinedMember) -> None:
        super().__init__(member.id, member.weight, member.meta)
        self._client = client
        self.aio = member

    @property
    def alive(self) -> bool:
        return self.aio.alive

    @property
    def left(self) -> bool:
        return self.aio.left

    @property
    def ttl(self) -> float:
        return self.aio.ttl

    @property
    def lost_reason(self) -> str | None:
        return self.aio.lost_reason

    def on_lost(self, callback: Callable[[SyncMember], object]) -> None:
        self._client.run(_on_loop(lambda: self.aio.on_lost(lambda _: callback(self))))

    def leave(self) -> None:
        self._client.run(self.aio.leave())


class SyncRing:
    """An :class:`AsyncLiveRing` with :class:`dcoord.LiveRing`'s methods."""

    def __init__(self, client: SyncView, ring: AsyncLiveRing) -> None:
        self._client = client
        self.aio = ring

    @property
    def ring(self) -> HashRing | None:
        return self.aio.ring

    @property
    def members(self) -> GroupView:
        return self.aio.members

    @property
    def epoch(self) -> int:
        return self.aio.epoch

    def node_for(self, key: str) -> str:
        return self.aio.node_for(key)

    def nodes_for(self, key: str, n: int) -> list[str]:
        return self.aio.nodes_for(key, n)

    def wait_for(self, predicate: Callable[[SyncRing], bool], timeout: float) -> bool:
        return self._client.run(self.aio.wait_for(lambda _: predicate(self), timeout))

    def close(self) -> None:
        self._client.run(_on_loop(self.aio.close))

    def __enter__(self) -> SyncRing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.aio)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self.aio


class SyncWatch:
    """``async for`` over a group's views, calling ``callback`` on a thread of its own."""

    def __init__(
        self,
        client: SyncView,
        views: AsyncIterator[GroupView],
        callback: Callable[[GroupView], None],
    ) -> None:
        self._client = client
        self._views = views
        self._callback = callback
        self._mutex = threading.Lock()
        self._stopped = False
        self._pending: concurrent.futures.Future[GroupView] | None = None
        self._thread = threading.Thread(target=self._run, name="test-aio-watch", daemon=True)
        self._thread.start()

    @property
    def active(self) -> bool:
        return not self._stopped

    async def _next(self) -> GroupView:
        return await anext(self._views)

    def _run(self) -> None:
        loop = self._client._loop.loop
        while True:
            with self._mutex:
                if self._stopped:
                    break
                pending = self._pending = asyncio.run_coroutine_threadsafe(self._next(), loop)
            try:
                view = pending.result()
            except (StopAsyncIteration, concurrent.futures.CancelledError):
                return  # the iteration ended (client closed) or was cancelled (stop())
            if self._stopped:
                break
            # As the sync Watch: a raising callback keeps being called.
            with contextlib.suppress(Exception):
                self._callback(view)
        # Stopped while the callback ran: the generator waits at its yield; end it.
        self._client.run(self._close())

    async def _close(self) -> None:
        aclose = getattr(self._views, "aclose", None)
        if aclose is not None:
            await aclose()

    def stop(self) -> None:
        """Cancel the waiting iteration: the watch stops following."""
        with self._mutex:
            self._stopped = True
            pending = self._pending
        if pending is not None:
            pending.cancel()

    def __enter__(self) -> SyncWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
