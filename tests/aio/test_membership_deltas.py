"""The async follower applies notified changes as the sync one does (the same
:class:`~dcoord.core.membership.MemberSet`): with the resync interval out of the way it
follows joins and leaves, sync members' and its own client's, without re-reading the
group (memory, Redis, etcd: real servers)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import dcoord
from dcoord.aio import connect
from dcoord.core import membership as core
from tests.aio.test_aio_locks import sync_client  # noqa: F401
from tests.conformance.test_membership_deltas import NEVER, PATIENCE


def test_the_async_follower_applies_changes_without_re_reading(
    aio_url: str,
    namespace: str,
    sync_client: dcoord.Client,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(core, "RESYNC_INTERVAL", NEVER)

    async def main() -> None:
        async with connect(aio_url, namespace=namespace) as client:
            ring = await client.group("g").ring(vnodes=20)
            store: Any = client.backend.groups
            reads: list[str] = []
            read = store.read

            async def counted(group: str) -> Any:
                reads.append(group)
                return await read(group)

            monkeypatch.setattr(store, "read", counted)
            synced = [
                await asyncio.to_thread(sync_client.group("g").join, f"s{i}", ttl=30)
                for i in range(4)
            ]
            own = [await client.group("g").join(f"a{i}", weight=2, ttl=30) for i in range(3)]
            await asyncio.to_thread(synced[0].leave)
            await own[0].leave()
            want = {"s1", "s2", "s3", "a1", "a2"}
            assert await ring.wait_for(lambda r: set(r.members) == want, PATIENCE)
            assert ring.ring == dcoord.HashRing(dict(ring.members.weights()), vnodes=20)
            # The follower task's own first read may come after ring() returned; then
            # not one for the 9 changes.
            assert len(reads) <= 1

    asyncio.run(main())
