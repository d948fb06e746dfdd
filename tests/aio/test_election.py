"""The async elections' own contract: one election shared with sync clients, cancellation,
``async with``, close, on_lost as a coroutine (memory, Redis, etcd: real servers)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from types import SimpleNamespace

import pytest

import dcoord
from dcoord.aio import AsyncClient, AsyncLeadership, connect
from dcoord.backends.base import LockGrant
from dcoord.backends.memory.election import MemoryElections
from dcoord.election import Leader
from tests.aio.test_aio_locks import dcoord_tasks, eventually, sync_client  # noqa: F401
from tests.conformance.test_election import TTL, election_keys, sabotage
from tests.conformance.test_locks import wait_until

# Slack for task wake-ups and round trips on a loaded 2-core machine.
MARGIN = 1.5


def registered_waiters(client: AsyncClient, sync: dcoord.Client, name: str) -> int:
    """What an async client has registered to wait in election ``name``: memory: wakers
    on the store's table; Redis: waiters and live wake-ups on the election's channel;
    etcd: candidate keys behind the leader's (read by ``sync``)."""
    backend: object = client.backend
    if client.backend.kind == "memory":
        store = sync.backend.elections
        assert isinstance(store, MemoryElections)
        return len(store._table.wakers)
    if client.backend.kind == "redis":
        channel_name = backend.elections.keys(name)[2].encode()  # type: ignore[attr-defined]
        channel = backend.locks.notifier._channels.get(channel_name)  # type: ignore[attr-defined]
        if channel is None:
            return 0
        return int(channel.waiters + sum(not f.done() for f in channel.parked))
    return max(0, len(election_keys(sync)) - 1)


def test_sync_and_async_candidates_share_one_election(
    aio_url: str,
    namespace: str,
    backend: str,
    sync_client: dcoord.Client,  # noqa: F811
) -> None:
    ttl = TTL[backend] * 4
    sync_lead = sync_client.election("db").campaign("sync", ttl=ttl)
    assert sync_lead is not None
    changes: queue.Queue[Leader | None] = queue.Queue()
    sync_watch = sync_client.election("db").watch(changes.put)
    assert changes.get(timeout=10) == Leader(sync_lead.term, b"sync")

    def sync_watch_sees(expected: Leader | None) -> bool:
        """Whether the sync watcher reports ``expected`` within a while (later changes
        may merge earlier ones, so it is awaited, not each step)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if changes.get(timeout=max(0.0, deadline - time.monotonic())) == expected:
                    return True
            except queue.Empty:
                break
        return False

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            election = client.election("db")
            assert await election.leader() == Leader(sync_lead.term, b"sync")
            async with election.watch() as leaders:
                assert await leaders.__anext__() == Leader(sync_lead.term, b"sync")
            assert await election.campaign("async", timeout=0) is None
            waiting = asyncio.create_task(election.campaign("async", ttl=ttl, timeout=30))
            assert await eventually(lambda: registered_waiters(client, sync_client, "db") > 0)
            assert not waiting.done()
            # The sync leader's resignation elects the waiting async candidate.
            assert await asyncio.to_thread(sync_lead.resign)
            lead = await waiting
            assert lead is not None and lead.held and lead.term > sync_lead.term
            assert lead.fence == lead.term
            assert sync_client.election("db").leader() == Leader(lead.term, b"async")
            assert sync_client.election("db").campaign("sync", timeout=0) is None
            await lead.proclaim("async:2")
            assert sync_client.election("db").leader() == Leader(lead.term, b"async:2")
            assert await asyncio.to_thread(sync_watch_sees, Leader(lead.term, b"async:2"))
            assert await lead.resign()
            assert sync_client.election("db").leader() is None
            assert await asyncio.to_thread(sync_watch_sees, None)

    asyncio.run(main())
    sync_watch.stop()


def test_a_watcher_does_not_take_a_waiting_candidates_wake_up(aio_url: str, namespace: str) -> None:
    """A watcher and a candidate of one client wait on one channel (Redis: the client's
    notifier); a resignation must wake both, not only the first parked."""

    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as a,
            connect(aio_url, namespace=namespace) as b,
        ):
            lead = await a.election("e").campaign("a", ttl=60)
            assert lead is not None
            seen: list[Leader | None] = []

            async def follow() -> None:
                async for leader in b.election("e").watch():
                    seen.append(leader)

            follower = asyncio.create_task(follow())
            assert await eventually(lambda: len(seen) == 1)
            waiting = asyncio.create_task(b.election("e").campaign("b", ttl=60))
            await asyncio.sleep(0.2)  # let it park behind the watcher
            started = time.monotonic()
            assert await lead.resign()
            # Not the leader's TTL (60 s): woken by the resignation.
            second = await asyncio.wait_for(waiting, 10)
            assert second is not None and time.monotonic() - started < 10
            assert await eventually(lambda: seen[-1] == Leader(second.term, b"b"), 10)
            follower.cancel()
            await second.resign()

    asyncio.run(main())


@pytest.mark.parametrize("style", ["cancel", "asyncio.timeout"])
def test_a_cancelled_waiting_campaign_leaves_no_candidate_behind(
    aio_url: str,
    namespace: str,
    sync_client: dcoord.Client,  # noqa: F811
    style: str,
) -> None:
    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as a,
            connect(aio_url, namespace=namespace) as b,
        ):
            lead = await a.election("e").campaign("a", ttl=30)
            assert lead is not None
            if style == "cancel":
                waiting = asyncio.create_task(b.election("e").campaign("b", ttl=30))
                assert await eventually(lambda: registered_waiters(b, sync_client, "e") > 0)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await b.election("e").campaign("b", ttl=30)
            # Nothing registered (etcd: the candidate's key went with its lease) ...
            assert await eventually(lambda: registered_waiters(b, sync_client, "e") == 0)
            assert await lead.resign()
            # ... so nobody is elected after the resignation: no candidate was left.
            for _ in range(20):
                assert await a.election("e").leader() is None
                await asyncio.sleep(0.025)
            assert election_keys(sync_client) == []

    asyncio.run(main())


@pytest.mark.parametrize("yields", [0, 1, 2, 3, 5, 8])
def test_a_campaign_cancelled_in_flight_leaves_no_leader_behind(
    aio_url: str, namespace: str, yields: int
) -> None:
    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as client,
            connect(aio_url, namespace=namespace) as observer,
        ):
            campaign = asyncio.create_task(client.election("e").campaign("c", ttl=30))
            for _ in range(yields):
                await asyncio.sleep(0)
            campaign.cancel()
            try:
                lead = await campaign
            except asyncio.CancelledError:
                # Whatever reached the server is undone (the 30 s TTL cannot be what
                # removes it here).
                deadline = time.monotonic() + 5
                while await observer.election("e").leader() is not None:
                    assert time.monotonic() < deadline, "a cancelled campaign left a leader"
                    await asyncio.sleep(0.02)
            else:
                assert lead is not None and lead.held
                assert await observer.election("e").leader() == Leader(lead.term, b"c")

    asyncio.run(main())


def test_async_with_resigns_when_the_block_is_cancelled(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            inside = asyncio.Event()
            lead = await client.election("e").campaign("v", ttl=30)
            assert lead is not None

            async def block(leadership: AsyncLeadership) -> None:
                async with leadership:
                    inside.set()
                    await asyncio.Event().wait()

            task = asyncio.create_task(block(lead))
            await inside.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not lead.held
            assert await client.election("e").leader() is None
            assert not await lead.resign()  # already resigned

    asyncio.run(main())


def test_close_resigns_stops_renewals_and_ends_watches(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as observer:
            client = await connect(aio_url, namespace=namespace)
            lead = await client.election("e").campaign("v", ttl=30)
            assert lead is not None
            seen: list[Leader | None] = []

            async def follow() -> None:
                async for leader in client.election("e").watch():
                    seen.append(leader)

            follower = asyncio.create_task(follow())
            assert await eventually(lambda: len(seen) == 1)
            assert dcoord_tasks(), "the leadership's renewal is a task of the client"
            await client.close()
            await asyncio.wait_for(follower, 10)  # the watch ended (StopAsyncIteration)
            assert seen == [Leader(lead.term, b"v")]
            assert not lead.held
            assert await observer.election("e").leader() is None  # resigned, not expired
            assert await eventually(lambda: not dcoord_tasks() - {asyncio.current_task()})
            with pytest.raises(dcoord.ClientClosed):
                client.election("e")

    asyncio.run(main())


def test_aclose_ends_a_waiting_watch(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            watch = client.election("e").watch()
            assert await watch.__anext__() is None
            waiting = asyncio.create_task(watch.__anext__())
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await watch.aclose()
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(waiting, 10)

    asyncio.run(main())


def test_coroutine_on_lost_runs_when_the_server_forgets_the_leader(
    aio_url: str,
    namespace: str,
    backend: str,
    sync_client: dcoord.Client,  # noqa: F811
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            lost: list[AsyncLeadership] = []
            called = asyncio.Event()

            async def on_lost(leadership: AsyncLeadership) -> None:
                lost.append(leadership)
                called.set()

            lead = await client.election("x").campaign("me", ttl=TTL[backend], on_lost=on_lost)
            assert lead is not None
            seen_as = SimpleNamespace(
                election=lead.election, _slot=SimpleNamespace(_lease=SimpleNamespace(id=0))
            )
            if backend == "etcd":
                seen_as._slot._lease.id = lead._slot._lease.id  # type: ignore[attr-defined]
            sabotage(sync_client, seen_as)  # type: ignore[arg-type]
            await asyncio.wait_for(called.wait(), TTL[backend] * 2 + MARGIN * 2)
            assert lost == [lead] and not lead.held
            with pytest.raises(dcoord.LockNotOwned, match="not held"):
                await lead.proclaim("still me?")
            assert not await lead.resign()

    asyncio.run(main())


@pytest.mark.parametrize("failure", ["hangs", "fails"])
def test_a_renewal_that_hangs_or_fails_loses_leadership_at_its_deadline(
    aio_url: str, namespace: str, backend: str, failure: str
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            called = asyncio.Event()
            ttl = TTL[backend]
            lead = await client.election("e").campaign("v", ttl=ttl, on_lost=lambda _: called.set())
            assert lead is not None
            attempts = 0

            async def extend(seconds: float) -> None:
                nonlocal attempts
                attempts += 1
                if failure == "hangs":
                    await asyncio.Event().wait()
                raise dcoord.BackendUnavailable("renewal refused by the test")

            lead._slot.extend = extend  # type: ignore[method-assign]
            started = time.monotonic()
            await asyncio.wait_for(called.wait(), ttl * 2 + MARGIN * 2)
            assert not lead.held and attempts >= 1
            assert time.monotonic() - started < ttl + MARGIN
            if failure == "fails":
                assert attempts > 1, "a failed renewal is retried until the deadline"

    asyncio.run(main())


def test_a_renewal_answered_after_the_deadline_leaves_leadership_lost(namespace: str) -> None:
    """Both APIs: a leadership whose deadline passed while its renewal was unanswered
    stays lost when the server then says yes (the rule of dcoord.core.lockstate)."""
    url = f"memory://late-{namespace}"
    ttl = 1.0
    with dcoord.connect(url, namespace=namespace) as client:
        lost = threading.Event()
        lead = client.election("sync").campaign("v", ttl=ttl, on_lost=lambda _: lost.set())
        assert lead is not None
        answer = threading.Event()

        def late_extend(seconds: float) -> LockGrant:
            answer.wait(30)
            return LockGrant(lead.term, time.monotonic() + seconds)  # "yes", too late

        lead._slot.extend = late_extend  # type: ignore[method-assign]
        assert wait_until(lambda: not lead.held, ttl * 2 + MARGIN)
        answer.set()
        assert lost.wait(MARGIN * 2), "the late answer was taken as a renewal"
        assert not lead.held

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            called = asyncio.Event()
            lead = await client.election("async").campaign(
                "v", ttl=ttl, on_lost=lambda _: called.set()
            )
            assert lead is not None
            answer = asyncio.Event()

            async def late_extend(seconds: float) -> LockGrant:
                await answer.wait()
                return LockGrant(lead.term, time.monotonic() + seconds)

            lead._slot.extend = late_extend  # type: ignore[method-assign]
            assert await eventually(lambda: not lead.held, ttl * 2 + MARGIN)
            answer.set()
            await asyncio.wait_for(called.wait(), MARGIN * 2)
            assert not lead.held

    asyncio.run(main())
