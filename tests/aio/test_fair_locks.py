"""Async fair locks' own contract: one queue with sync fair waiters, and a cancelled
waiting acquire takes its queue entry with it. (The sync fair-lock conformance tests run
on the async API in test_conformance.py.)"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import dcoord
import dcoord.backends.redis.aio_locks
from dcoord.aio import connect
from tests.aio.test_aio_locks import eventually, sync_client  # noqa: F401
from tests.conformance.test_fair_locks import queued, wait_behind_a_handed_dead_waiter


def test_sync_and_async_fair_waiters_share_one_queue(
    aio_url: str,
    namespace: str,
    backend: str,
    sync_client: dcoord.Client,  # noqa: F811
) -> None:
    """Waiters of both APIs, arriving in turn, are granted in arrival order."""
    # etcd counts the holder's key in its queue.
    already = 1 if backend == "etcd" else 0
    holder = sync_client.lock("res", ttl=30, fair=True)
    assert holder.acquire()
    order: list[str] = []

    def sync_wait(who: str) -> None:
        with dcoord.connect(aio_url, namespace=namespace) as other:
            lock = other.lock("res", ttl=30, fair=True)
            assert lock.acquire(timeout=20)
            order.append(who)
            lock.release()

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:

            async def async_wait(who: str) -> None:
                lock = client.lock("res", ttl=30, fair=True)
                assert await lock.acquire(timeout=20)
                order.append(who)
                await lock.release()

            tasks: list[asyncio.Future[None]] = []
            for i, who in enumerate(["async-1", "sync-2", "async-3", "sync-4"], start=1):
                if who.startswith("async"):
                    tasks.append(asyncio.ensure_future(async_wait(who)))
                else:
                    thread = threading.Thread(target=sync_wait, args=(who,), daemon=True)
                    thread.start()
                    tasks.append(asyncio.ensure_future(asyncio.to_thread(thread.join, 30)))
                # The next waiter arrives only once this one has queued.
                assert await eventually(lambda i=i: queued(sync_client, "res") == already + i, 10)
            await asyncio.to_thread(holder.release)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert order == ["async-1", "sync-2", "async-3", "sync-4"]

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["memory", "redis"], indirect=True)
def test_a_cancelled_fair_waiter_leaves_the_queue_and_the_next_is_called(
    aio_url: str,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    sync_client: dcoord.Client,  # noqa: F811
) -> None:
    """Cancelled while queued, a waiter's entry goes at once, not when it expires: the
    waiter behind it is granted as soon as the holder releases."""
    # An entry would live a minute: only the cancellation can take it out in time.
    monkeypatch.setattr(dcoord.backends.redis.aio_locks, "FAIR_WAITER_TTL", 60.0)

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            holder = client.lock("res", ttl=60, fair=True)
            assert await holder.acquire()
            first = asyncio.create_task(client.lock("res", ttl=60, fair=True).acquire())
            assert await eventually(lambda: queued(sync_client, "res") == 1, 10)
            second_lock = client.lock("res", ttl=60, fair=True)
            second = asyncio.create_task(second_lock.acquire())
            assert await eventually(lambda: queued(sync_client, "res") == 2, 10)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert await eventually(lambda: queued(sync_client, "res") == 1, 10)
            await holder.release()
            assert await asyncio.wait_for(second, 10)
            await second_lock.release()
            assert queued(sync_client, "res") == 0

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_an_async_fair_waiter_is_handed_the_lock_without_an_acquire_of_its_own(
    aio_url: str,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    sync_client: dcoord.Client,  # noqa: F811
) -> None:
    """The release's message carries the grant and its fence: the waiter makes no try
    after it (its entry lives a minute, so it has no reason to call)."""
    monkeypatch.setattr(dcoord.backends.redis.aio_locks, "FAIR_WAITER_TTL", 60.0)
    channel_class = dcoord.backends.redis.aio_locks._Channel
    real_wake_all, real_park = channel_class.wake_all, channel_class.park
    confirmed = 0  # subscription confirmations delivered (each wakes every waiter)
    parked: list[int] = []  # confirmations delivered before each of the waiter's parks

    def wake_all(self: Any) -> None:
        nonlocal confirmed
        confirmed += 1
        real_wake_all(self)

    def park(self: Any, token: bytes | None = None) -> Any:
        parked.append(confirmed)
        return real_park(self, token)

    monkeypatch.setattr(channel_class, "wake_all", wake_all)
    monkeypatch.setattr(channel_class, "park", park)

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            holder = client.lock("res", ttl=60, fair=True)
            assert await holder.acquire()
            waiter = client.lock("res", ttl=60, fair=True)
            slot: Any = waiter._slot  # type: ignore[attr-defined]
            real_try = slot._try
            tries = 0

            async def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal tries
                result = await real_try(*args, **kwargs)
                tries += 1
                return result

            slot._try = counted
            task = asyncio.create_task(waiter.acquire())
            # Parked after the subscription's confirmation, and that park's try answered
            # (its first try comes before it parks): only the release wakes it now.
            assert await eventually(lambda: bool(parked) and parked[-1] >= 1, 10)
            assert await eventually(lambda: tries == len(parked) + 1, 10)
            before = tries
            await holder.release()
            assert await asyncio.wait_for(task, 10)
            assert tries == before
            assert holder.fence is not None and waiter.fence is not None
            assert waiter.fence > holder.fence
            await waiter.release()
            assert queued(sync_client, "res") == 0

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_an_async_fair_waiter_cancelled_as_it_is_handed_the_lock_passes_it_on(
    aio_url: str,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    sync_client: dcoord.Client,  # noqa: F811
) -> None:
    """Cancelled just as the release's message hands it the lock, a waiter's undo lets
    go of the grant and hands it to the waiter behind: nothing waits for its TTL."""
    monkeypatch.setattr(dcoord.backends.redis.aio_locks, "FAIR_WAITER_TTL", 60.0)
    channel_class = dcoord.backends.redis.aio_locks._Channel
    real_call = channel_class.call

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            holder = client.lock("res", ttl=60, fair=True)
            assert await holder.acquire()
            first = asyncio.create_task(client.lock("res", ttl=60, fair=True).acquire())
            assert await eventually(lambda: queued(sync_client, "res") == 1, 10)
            second_lock = client.lock("res", ttl=60, fair=True)
            second = asyncio.create_task(second_lock.acquire())
            assert await eventually(lambda: queued(sync_client, "res") == 2, 10)
            handed: list[int] = []

            def call(self: Any, token: bytes, fence: int) -> None:
                real_call(self, token, fence)
                if fence and not handed:
                    handed.append(fence)
                    first.cancel()  # in the step that delivers its grant

            monkeypatch.setattr(channel_class, "call", call)
            await holder.release()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert await asyncio.wait_for(second, 10)  # not after the first's 60 s TTL
            assert second_lock.fence is not None and second_lock.fence > handed[0]
            await second_lock.release()
            assert queued(sync_client, "res") == 0

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_an_async_fair_waiter_killed_while_queued_blocks_the_next_for_its_entry_life_only(
    aio_url: str, namespace: str
) -> None:
    """An async waiter, too, is handed the lock only for its queue entry's life (5 s): one
    killed while queued holds up the waiter behind it that long, not for its TTL (30 s)."""
    assert wait_behind_a_handed_dead_waiter(aio_url, namespace, "aio") < 10
