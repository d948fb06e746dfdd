"""etcd only, async API: a member on the client's shared lease has no task of its own.

The lease's one keep-alive task keeps every member on it alive and, when it finds the
lease lost, tells each of them at once (``on_lost``), where a heart-beat task per member
polling the lease every third of its TTL learnt it up to that late. A member that left,
or whose client closed, is not told. Real etcd servers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

import dcoord
from dcoord.aio import AsyncJoinedMember, connect
from tests.aio.test_aio_locks import eventually
from tests.aio.test_etcd_leases import etcd_backend

pytestmark = pytest.mark.parametrize("backend", ["etcd"], indirect=True)


@pytest.fixture
def sync(aio_url: str, namespace: str) -> Iterator[dcoord.Client]:
    """A sync client of the namespace, to revoke leases on the server."""
    with dcoord.connect(aio_url, namespace=namespace) as client:
        yield client


def test_members_of_one_client_run_no_task_each(aio_url: str, namespace: str) -> None:
    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            before = asyncio.all_tasks()
            group = client.group("g")
            members = await asyncio.gather(*(group.join(f"m{i}", ttl=6) for i in range(200)))
            new = sorted(t.get_name() for t in asyncio.all_tasks() - before)
            # The shared lease's keep-alive, granted by the first join, and nothing else.
            assert len(new) == 1 and "keep-alive" in new[0], new[:5]
            assert all(m.alive for m in members)
            # They are kept alive all the same: past their TTL, still there.
            await asyncio.sleep(members[0].ttl + 1)
            assert all(m.alive for m in members)
            assert len(await group.members()) == 200

    asyncio.run(main())


def test_a_revoked_shared_lease_tells_every_member_at_once(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    """ttl=6: a heart-beat per member would look at the lease every 2 s, so right after
    the joins the members would learn of the revoke about 2 s late."""

    async def main() -> None:
        async with (
            connect(aio_url, namespace=namespace) as client,
            connect(aio_url, namespace=namespace) as other,
        ):
            told: dict[str, float] = {}

            def on_lost(member: AsyncJoinedMember) -> None:
                told[member.id] = time.monotonic()

            group = client.group("g")
            members = await asyncio.gather(
                *(group.join(f"m{i}", ttl=6, on_lost=on_lost) for i in range(200))
            )
            # Negative control: another client's member, on another lease.
            survivor = await other.group("g").join("survivor", ttl=6, on_lost=on_lost)
            lease = members[0]._reg.lease  # type: ignore[union-attr]
            leases: Any = etcd_backend(client).locks.leases
            revoked = time.monotonic()
            sync.backend.etcd.revoke_lease(lease.id)  # type: ignore[attr-defined]
            # What the lease's keep-alive task sends at its next due time, sent now.
            assert not await leases.keep_alive(lease)
            assert await eventually(lambda: len(told) == 200, 10), len(told)
            late = max(told.values()) - revoked
            assert late < 1.0, f"the last member was told {late:.2f} s after the revoke"
            assert not any(m.alive for m in members)
            assert all("revoked" in (m.lost_reason or "") for m in members)
            assert survivor.alive and "survivor" not in told

    asyncio.run(main())


def test_members_that_left_or_closed_are_not_told_and_pile_up_nothing(
    aio_url: str, namespace: str, sync: dcoord.Client
) -> None:
    async def main() -> None:
        told: list[str] = []
        client = await connect(aio_url, namespace=namespace)
        group = client.group("g")
        stays = await group.join("stays", ttl=6, on_lost=lambda m: told.append(m.id))
        lease = stays._reg.lease  # type: ignore[union-attr]
        for i in range(50):
            member = await group.join(f"churn{i}", ttl=6, on_lost=lambda m: told.append(m.id))
            await member.leave()
        # One lost-callback on the lease for all its members, not one per join.
        assert len(lease._callbacks) == 1
        await client.close()  # leaves "stays", then revokes the lease
        assert lease.lost.is_set()
        assert told == [] and stays.left and stays.lost_reason is None

    asyncio.run(main())
