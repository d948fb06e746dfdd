"""The async groups' own contract: interop with sync members, cancellation, close, and
losing a member whose heart-beats stop or fail (memory, Redis, etcd: real servers)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

import dcoord
from dcoord.aio import AsyncClient, AsyncJoinedMember, connect
from dcoord.errors import BackendUnavailable
from tests.aio.test_aio_locks import dcoord_tasks, eventually, sync_client  # noqa: F401
from tests.conformance.test_membership import short_ttl

# Slack for task wake-ups and round trips on a loaded 2-core machine.
MARGIN = 1.5


def test_sync_and_async_members_see_each_other(
    aio_url: str,
    namespace: str,
    sync_client: dcoord.Client,  # noqa: F811
) -> None:
    sync_ring = sync_client.group("g").ring(vnodes=20)
    sync_member = sync_client.group("g").join("sync", weight=2, meta={"api": "sync"}, ttl=30)

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            group = client.group("g")
            ring = await group.ring(vnodes=20)
            assert "sync" in ring
            seen = await group.members()
            assert seen["sync"] == dcoord.Member("sync", 2.0, {"api": "sync"})
            member = await group.join("async", meta={"api": "async"}, ttl=30)
            assert await ring.wait_for(lambda r: set(r.members) == {"sync", "async"}, 5)
            # Both APIs build the same ring from the same members.
            assert ring.ring == dcoord.HashRing({"sync": 2.0, "async": 1.0}, vnodes=20)
            await asyncio.to_thread(sync_ring.wait_for, lambda r: "async" in r, 5)
            assert dict(sync_client.group("g").members()["async"].meta) == {"api": "async"}
            sync_member.leave()
            assert await ring.wait_for(lambda r: "sync" not in r, 5)
            await member.leave()
            assert await group.members() == {}

    asyncio.run(main())


@pytest.mark.parametrize("yields", [0, 1, 2, 3, 5, 8])
def test_a_cancelled_join_leaves_no_member_behind(
    aio_url: str, namespace: str, yields: int
) -> None:
    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as client,
            connect(aio_url, namespace=namespace) as observer,
        ):
            join = asyncio.create_task(client.group("g").join("m", ttl=30))
            for _ in range(yields):
                await asyncio.sleep(0)
            join.cancel()
            try:
                member = await join
            except asyncio.CancelledError:
                # Cancelled in flight: whatever reached the server is undone (the TTL of
                # 30 s cannot be what removes it here).
                deadline = time.monotonic() + 5
                while "m" in await observer.group("g").members():
                    assert time.monotonic() < deadline, "a cancelled join left its member"
                    await asyncio.sleep(0.02)
            else:
                # Done before the cancel landed: a member the caller holds, alive.
                assert member.alive and "m" in await observer.group("g").members()

    asyncio.run(main())


def test_cancelling_a_waiting_watch_iteration_stops_following(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            group = client.group("g")
            views = group.watch()
            first = await anext(views)
            assert dict(first) == {}
            waiting = asyncio.create_task(anext(views))
            await asyncio.sleep(0)  # the iteration starts waiting
            assert [t for t in dcoord_tasks() if t.get_name() == "dcoord follow g"]
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # Negative control above: a follower ran while the iteration waited.
            assert await eventually(
                lambda: not [t for t in dcoord_tasks() if t.get_name().startswith("dcoord follow")]
            )
            assert group._follower is None

    asyncio.run(main())


def test_watch_yields_the_current_set_then_changes(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as a,
            connect(aio_url, namespace=namespace) as b,
        ):
            await a.group("g").join("first", ttl=30)
            seen: list[set[str]] = []
            views = b.group("g").watch()
            async for view in views:
                seen.append(set(view))
                if len(seen) == 1:
                    second = await a.group("g").join("second", ttl=30)
                elif set(view) == {"first", "second"}:
                    await second.leave()
                elif set(view) == {"first"}:
                    break
            await views.aclose()  # type: ignore[attr-defined]
            assert seen == [{"first"}, {"first", "second"}, {"first"}]

    asyncio.run(main())


def test_closing_the_client_leaves_its_members_and_cancels_its_tasks(
    aio_url: str, namespace: str
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as observer:
            client = await connect(aio_url, namespace=namespace)
            await client.group("g").join("a", ttl=30)
            await client.group("h").join("b", ttl=30)
            ring = await client.group("g").ring()
            views = client.group("g").watch()
            assert set(await anext(views)) == {"a"}
            waiting = asyncio.create_task(anext(views))
            await observer.group("g").join("o", ttl=30)  # wakes the follower as it closes
            assert await ring.wait_for(lambda r: "o" in r, 5)
            before = {t for t in dcoord_tasks() if t.get_name().startswith("dcoord follow g")}
            assert before  # negative control: the client's tasks were running
            await asyncio.wait_for(client.close(), 10)
            # The watch's iteration ends (after the change it may have had pending); the
            # members are gone at once, not by their TTL.
            with contextlib.suppress(StopAsyncIteration):
                await waiting
            async with asyncio.timeout(5):
                async for _ in views:
                    pass
            assert set(await observer.group("g").members()) == {"o"}
            assert await observer.group("h").members() == {}
            mine = [t for t in dcoord_tasks() if not t.get_name().endswith("/o")]
            assert not [t for t in mine if "follow" in t.get_name() or "heart" in t.get_name()]
            with pytest.raises(dcoord.ClientClosed):
                await client.group("g").join("again")

    asyncio.run(main())


def _stop_beating(member: AsyncJoinedMember) -> None:
    """The member's process "dies": no heart-beat is sent again; on etcd (no heart-beat
    task), no keep-alive of the client's shared lease its key is on."""
    leases = getattr(member.group.client.backend.locks, "leases", None)
    if leases is not None:
        leases._keepers[member._reg.lease.id].cancel()  # type: ignore[union-attr]
    else:
        assert member._beats is not None
        member._beats.cancel()


def test_member_whose_heart_beats_stop_disappears_within_its_ttl(
    aio_url: str, namespace: str, backend: str
) -> None:
    ttl = short_ttl(backend)

    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as client,
            connect(aio_url, namespace=namespace) as observer,
        ):
            ring = await observer.group("g").ring()
            dying = await client.group("g").join("dying", ttl=ttl)
            # Another process's (on etcd, one client's members share its lease).
            steady = await observer.group("g").join("steady", ttl=ttl)
            assert await ring.wait_for(lambda r: {"dying", "steady"} <= set(r.members), 5)
            _stop_beating(dying)
            stopped = time.monotonic()
            # Nobody reads the group: the observer's follower notices the expiry itself.
            assert await ring.wait_for(lambda r: "dying" not in r, dying.ttl + MARGIN + 2)
            elapsed = time.monotonic() - stopped
            assert elapsed <= dying.ttl + MARGIN, f"gone after {elapsed:.2f} s"
            # Negative control: the member that kept beating outlived its TTL.
            assert "steady" in ring and steady.alive
            assert not dying.alive

    asyncio.run(main())


def test_failing_heart_beats_lose_the_member_after_its_ttl_and_call_on_lost(
    aio_url: str, namespace: str, backend: str
) -> None:
    ttl = short_ttl(backend)

    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as client,
            connect(aio_url, namespace=namespace) as other,
        ):
            lost = asyncio.Event()
            reasons: list[str | None] = []

            async def on_lost(member: AsyncJoinedMember) -> None:
                reasons.append(member.lost_reason)
                lost.set()

            member = await client.group("g").join("flaky", ttl=ttl, on_lost=on_lost)
            # Another client's (on etcd, one client's members share its lease).
            healthy = await other.group("g").join("healthy", ttl=ttl)
            failures = 0

            async def unreachable(*_: object, **__: object) -> bool:
                nonlocal failures
                failures += 1
                raise BackendUnavailable("injected: server unreachable")

            if backend == "etcd":
                # Its heart-beat reads the client's shared lease, whose keep-alives fail.
                client.backend.locks.keep_alive = unreachable  # type: ignore[attr-defined]
            else:
                member._reg.refresh = unreachable  # type: ignore[method-assign]
            joined = time.monotonic()
            async with asyncio.timeout(member.ttl + MARGIN + 2):
                await lost.wait()
            assert time.monotonic() - joined >= member.ttl * 0.9
            assert failures >= 1
            assert reasons == [member.lost_reason]
            assert "heart-beats failed" in (member.lost_reason or "")
            assert not member.alive and not member.left
            # Negative control: the member whose heart-beats succeed is still alive.
            assert healthy.alive and healthy.lost_reason is None
            late: list[str] = []
            member.on_lost(lambda m: late.append(m.id))  # after the loss: called at once
            assert await eventually(lambda: late == ["flaky"])
            await member.leave()  # harmless after the loss

    asyncio.run(main())


async def _close_soon(client: AsyncClient) -> None:
    await asyncio.wait_for(client.close(), 10)


def test_close_while_a_change_wakes_the_follower_does_not_hang(
    aio_url: str, namespace: str
) -> None:
    """A leave at close sets the follower's wake-up as it is stopped (on Python 3.11,
    asyncio.wait_for then lost the cancellation and close() hung)."""

    async def main() -> None:
        for _ in range(3):
            client = await connect(aio_url, namespace=namespace)
            group = client.group("g")
            await group.join("late", ttl=30)
            ring = await group.ring()
            assert "late" in ring
            await _close_soon(client)

    asyncio.run(main())


def test_a_non_callable_on_lost_is_a_config_error_and_joins_nothing(
    aio_url: str, namespace: str
) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            with pytest.raises(dcoord.ConfigError, match="'soon'"):
                await client.group("g").join("m", on_lost="soon")  # type: ignore[arg-type]
            assert await client.group("g").members() == {}

    asyncio.run(main())
